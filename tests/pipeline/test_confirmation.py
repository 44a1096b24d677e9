"""Proof of delivery at the database level (the network side is tests/e2e/test_commitment_e2e.py,
against Orthanc): sent -> confirming -> confirmed, a report that wakes the waiting job (also one
that came while the job ran), a report overdue or with failures sends the object again (same SOP
Instance UID), the horizon fails it with the reason, and status / metrics tell sent from confirmed."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom.sop_class import Comprehensive3DSRStorage, SegmentationStorage

from dicomnode.net.sender import Outcome
from dicomnode.ops.metrics import DatabaseCollector
from dicomnode.ops.status import node_status
from dicomnode.pipeline import delivery
from dicomnode.pipeline.queue import RetryPolicy, claim, defer, enqueue
from dicomnode.store.commitments import Report, record_report
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.events import EventKind
from dicomnode.store.tables import DeliveryState, Event, Job, JobState, utcnow

from tests.support.nodeutil import node_config, tiny_instance

LEASE = timedelta(seconds=60)
POLICY = RetryPolicy(max_attempts=None, backoff_seconds=10, give_up_after=timedelta(hours=1))


@pytest.fixture
def sessions(tmp_path: Path):
    return make_sessionmaker(f"sqlite:///{tmp_path / 'queue.db'}")


def _file(folder: Path, name: str, sop_class: str) -> Path:
    ds = tiny_instance("1.2.3", generate_uid(), 0)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)
    return folder / name


@pytest.fixture
def requested(sessions, tmp_path: Path):
    """A running job whose SEG and SR were stored by 'pacs' and are in one commitment transaction."""
    job_id = enqueue(sessions, "1.2.3", "m", RetryPolicy())
    claim(sessions, "w1", LEASE)
    files = [_file(tmp_path, "seg.dcm", SegmentationStorage), _file(tmp_path, "sr.dcm", Comprehensive3DSRStorage)]
    delivery.plan(sessions, job_id, "1.2.3", files, ["pacs"], POLICY)
    for item in delivery.of_job(sessions, job_id):
        delivery.record(sessions, item.id, Outcome(Path(item.path), item.sop_instance_uid, item.sop_class_uid, 1, 0),
                        POLICY)
    items = delivery.sent_to(sessions, job_id, "pacs")
    transaction = generate_uid(prefix=None)
    delivery.commitment_requested(sessions, job_id, "pacs", transaction, [d.id for d in items],
                                  utcnow() + timedelta(seconds=300))
    return job_id, transaction, items


def _job(sessions, job_id) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def test_a_report_confirms_the_committed_and_sends_the_failed_again(sessions, requested):
    job_id, transaction, (seg, sr) = requested
    summary = delivery.summary(sessions, job_id, frozenset({"pacs"}))
    assert (summary.pending, summary.confirming, summary.sent, summary.confirmed) == (2, 2, 0, 0)
    assert record_report(sessions, Report(transaction, (seg.sop_instance_uid,), {sr.sop_instance_uid: 0x0112}),
                         "PACS") == job_id
    assert record_report(sessions, Report(transaction, (), {}), "PACS") is None  # the first report counts
    assert delivery.apply_reports(sessions, job_id, POLICY) == 2
    after_seg, after_sr = delivery.of_job(sessions, job_id)
    assert (after_seg.state, after_seg.confirmed_at is not None) == (DeliveryState.CONFIRMED, True)
    assert (after_sr.state, after_sr.sop_instance_uid, after_sr.transaction_uid) == (
        DeliveryState.PENDING, sr.sop_instance_uid, None)
    assert "0x0112 (no such object instance)" in after_sr.last_error
    assert after_sr.not_before > utcnow() + timedelta(seconds=5)  # the backoff of its attempts so far
    summary = delivery.summary(sessions, job_id, frozenset({"pacs"}))
    assert (summary.pending, summary.confirmed, summary.sent) == (1, 1, 0)


def test_no_report_by_the_deadline_sends_again_and_the_horizon_fails_with_the_reason(sessions, requested):
    job_id, transaction, (seg, sr) = requested
    assert delivery.apply_reports(sessions, job_id, POLICY) == 0  # not due yet
    later = utcnow() + timedelta(seconds=301)
    assert delivery.apply_reports(sessions, job_id, POLICY, now=later) == 2
    rows = delivery.of_job(sessions, job_id)
    assert [d.state for d in rows] == [DeliveryState.PENDING] * 2
    assert all("no storage commitment report from pacs" in d.last_error for d in rows)
    # sent again and asked again; past the horizon the missing report fails the delivery, with the reason
    for item in rows:
        delivery.record(sessions, item.id, Outcome(Path(item.path), item.sop_instance_uid, item.sop_class_uid, 1, 0),
                        POLICY, now=later)
    delivery.commitment_requested(sessions, job_id, "pacs", generate_uid(prefix=None), [d.id for d in rows],
                                  later + timedelta(seconds=300), now=later)
    delivery.apply_reports(sessions, job_id, POLICY, now=utcnow() + timedelta(hours=2))
    rows = delivery.of_job(sessions, job_id)
    assert [(d.state, d.attempts) for d in rows] == [(DeliveryState.FAILED, 2)] * 2
    assert all("no storage commitment report" in d.last_error and "delivery_give_up_hours" in d.last_error
               for d in rows)
    assert len(delivery.summary(sessions, job_id, frozenset({"pacs"})).failed) == 2


def test_a_report_wakes_the_waiting_job_and_one_that_came_while_it_ran_too(sessions, requested):
    job_id, transaction, (seg, sr) = requested
    due = utcnow() + timedelta(seconds=300)
    # the report comes while the job still runs: the defer that follows sees it, the job is due now
    record_report(sessions, Report(transaction, (seg.sop_instance_uid, sr.sop_instance_uid)), "PACS")
    assert defer(sessions, job_id, "w1", due, "confirming")
    assert _job(sessions, job_id).not_before <= utcnow()
    delivery.apply_reports(sessions, job_id, POLICY)
    assert [d.state for d in delivery.of_job(sessions, job_id)] == [DeliveryState.CONFIRMED] * 2
    # a job waiting in the queue for a later transaction is woken by its report
    claim(sessions, "w1", LEASE)
    second = generate_uid(prefix=None)
    with sessions.begin() as session:
        for row in delivery.of_job(sessions, job_id):
            session.get(type(row), row.id).state = DeliveryState.SENT
    delivery.commitment_requested(sessions, job_id, "pacs", second, [seg.id, sr.id], due)
    assert defer(sessions, job_id, "w1", due, "confirming")
    assert _job(sessions, job_id).not_before > utcnow() + timedelta(seconds=200)
    record_report(sessions, Report(second, (seg.sop_instance_uid, sr.sop_instance_uid)), "PACS")
    assert _job(sessions, job_id).state == JobState.QUEUED and _job(sessions, job_id).not_before <= utcnow()
    with sessions() as session:
        kinds = [e.kind for e in session.query(Event).filter(Event.job_id == job_id)]
    assert kinds.count(EventKind.COMMITMENT_REPORTED) == 2 and kinds.count(EventKind.CONFIRMED) == 2


def test_status_and_metrics_tell_sent_from_confirmed(sessions, requested, tmp_path: Path):
    job_id, transaction, (seg, sr) = requested
    record_report(sessions, Report(transaction, (seg.sop_instance_uid,), {sr.sop_instance_uid: 0x0112}), "PACS")
    delivery.apply_reports(sessions, job_id, POLICY)
    config = node_config(tmp_path / "node", node=f'database_url = "{sessions.kw["bind"].url}"')
    node = node_status(sessions, config)
    assert node.deliveries[DeliveryState.CONFIRMED] == 1 and node.deliveries[DeliveryState.PENDING] == 1
    assert node.deliveries[DeliveryState.SENT] == 0
    metrics = {(s.name, s.labels.get("state")): s.value for m in DatabaseCollector(config, sessions).collect()
               for s in m.samples}
    assert metrics[("dicomnode_deliveries", "confirmed")] == 1 and metrics[("dicomnode_deliveries", "sent")] == 0
    assert metrics[("dicomnode_delivery_confirmation_failures_total", None)] == 1
