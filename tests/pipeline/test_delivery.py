"""Deliveries: one per result object per destination, each with its own retries.

State changes at the database level, then the worker in-process (results already in the
job's folder, so no model runs) against small pynetdicom Storage SCPs on loopback: one that
supports only CT Image Storage (the SEG and the SR are refused at once, for good) and one
that answers 0xA700 once (the object is sent again and stored once). A JPEG 2000 SEG reaches
an SCP that accepts only uncompressed SEGs decompressed, voxel for voxel."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from sqlalchemy import select

from dicomnode.net.sender import Outcome, store_each
from dicomnode.pipeline import delivery
from dicomnode.pipeline.job import result_dir
from dicomnode.pipeline.queue import RetryPolicy, claim, defer, enqueue, fail, retry
from dicomnode.pipeline.worker import Worker
from dicomnode.results.common import write_dicom
from dicomnode.results.seg import build_seg
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Delivery, Event, Job, JobState, utcnow
from dicomnode.testing.ports import free_port

from tests.support.dicomtools import dciodvfy_errors
from tests.support.nodeutil import node_config, tiny_instance

LEASE = timedelta(seconds=60)
POLICY = RetryPolicy(max_attempts=3, backoff_seconds=10)


def _result_file(folder: Path, name: str, sop_class: str, study_uid: str) -> Path:
    """A small object of the SEG's or SR's SOP class (the SCPs here never look inside)."""
    ds = tiny_instance(study_uid, generate_uid(), 0)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)
    return folder / name


# ---------------------------------------------------------------- database level


@pytest.fixture
def sessions(tmp_path: Path):
    return make_sessionmaker(f"sqlite:///{tmp_path / 'queue.db'}")


@pytest.fixture
def planned(sessions, tmp_path: Path):
    """A running job with seg.dcm and sr.dcm planned to two destinations."""
    job_id = enqueue(sessions, "1.2.3", "m", RetryPolicy())
    claim(sessions, "w1", LEASE)
    files = [_result_file(tmp_path / "out", "seg.dcm", SegmentationStorage, "1.2.3"),
             _result_file(tmp_path / "out", "sr.dcm", Comprehensive3DSRStorage, "1.2.3")]
    assert delivery.plan(sessions, job_id, "1.2.3", files, ["pacs", "viewer"], POLICY) == 4
    return job_id, files


def _outcome(
    item: Delivery, tries: int = 1, error: str | None = None, permanent: bool = False, status: int | None = 0
) -> Outcome:
    return Outcome(Path(item.path), item.sop_instance_uid, item.sop_class_uid, tries, status, error, permanent)


def test_plan_is_one_pending_delivery_per_object_per_destination_once(sessions, planned):
    job_id, files = planned
    assert delivery.plan(sessions, job_id, "1.2.3", files, ["pacs", "viewer"], POLICY) == 0  # idempotent
    rows = delivery.of_job(sessions, job_id)
    assert [(d.destination, Path(d.path).name, d.state, d.attempts, d.max_attempts) for d in rows] == [
        ("pacs", "seg.dcm", "pending", 0, 3),
        ("pacs", "sr.dcm", "pending", 0, 3),
        ("viewer", "seg.dcm", "pending", 0, 3),
        ("viewer", "sr.dcm", "pending", 0, 3),
    ]
    assert {d.sop_instance_uid for d in rows} == {dcmread(f).SOPInstanceUID for f in files}
    assert rows[0].sop_class_uid == SegmentationStorage
    assert len(delivery.due(sessions, job_id)) == 4


def test_transient_failures_back_off_then_fail_for_good(sessions, planned):
    job_id, _ = planned
    item = delivery.due(sessions, job_id)[0]
    now = utcnow()
    assert (
        delivery.record(sessions, item.id, _outcome(item, 0, "not established", status=None), POLICY, now=now)
        == "pending"
    )
    [row] = [d for d in delivery.of_job(sessions, job_id) if d.id == item.id]
    assert (row.attempts, row.last_error, row.not_before) == (1, "not established", now + timedelta(seconds=10))
    assert item.id not in {d.id for d in delivery.due(sessions, job_id, now=now)}
    assert item.id in {d.id for d in delivery.due(sessions, job_id, now=now + timedelta(seconds=10))}
    later = now + timedelta(seconds=10)
    assert (
        delivery.record(
            sessions, item.id, _outcome(item, 2, "status 0xA700 after 2 tries", status=0xA700), POLICY, now=later
        )
        == "failed"
    )
    [row] = [d for d in delivery.of_job(sessions, job_id) if d.id == item.id]
    assert row.attempts == 3  # every C-STORE try counts
    summary = delivery.summary(sessions, job_id)
    assert (summary.pending, summary.sent, len(summary.failed)) == (3, 0, 1)
    assert "seg.dcm" in summary.failed[0] and "to pacs" in summary.failed[0] and "0xA700" in summary.failed[0]
    assert delivery.record(sessions, item.id, _outcome(item), POLICY) == "failed"  # settled: unchanged


def test_permanent_failure_at_once_and_success(sessions, planned):
    job_id, _ = planned
    seg, sr = delivery.due(sessions, job_id)[:2]
    assert (
        delivery.record(sessions, seg.id, _outcome(seg, 0, "SOP class rejected", permanent=True, status=None), POLICY)
        == "failed"
    )
    assert delivery.record(sessions, sr.id, _outcome(sr, 2), POLICY) == "sent"
    summary = delivery.summary(sessions, job_id)
    assert (summary.pending, summary.sent, len(summary.failed)) == (2, 1, 1)
    with sessions() as session:
        events = list(session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id)))
    kinds = [e.kind for e in events]
    assert kinds[-3:] == ["deliveries-planned", "delivery-failed", "delivered"]
    assert "refused for good" in events[-2].message and "Segmentation Storage" in events[-2].message
    assert "attempt 2 of 3" in events[-1].message


def test_refused_objects_replaced_by_one_fallback_delivery(sessions, planned, tmp_path: Path):
    job_id, _ = planned
    fallback = _result_file(tmp_path / "out", "sc.dcm", SecondaryCaptureImageStorage, "1.2.3")
    seg, sr = delivery.due(sessions, job_id)[:2]  # both to pacs
    for item in (seg, sr):
        delivery.record(sessions, item.id, _outcome(item, 0, "SOP class rejected", permanent=True, status=None), POLICY)
    first = delivery.replace(sessions, seg.id, fallback, POLICY)
    assert delivery.replace(sessions, sr.id, fallback, POLICY) == first  # one SC for the destination
    assert delivery.replace(sessions, seg.id, fallback, POLICY) is None  # no longer failed
    rows = delivery.of_job(sessions, job_id)
    assert [(d.destination, Path(d.path).name, d.state) for d in rows] == [
        ("pacs", "seg.dcm", "replaced"),
        ("pacs", "sr.dcm", "replaced"),
        ("viewer", "seg.dcm", "pending"),
        ("viewer", "sr.dcm", "pending"),
        ("pacs", "sc.dcm", "pending"),
    ]
    assert rows[0].last_error == "SOP class rejected" and rows[-1].id == first
    summary = delivery.summary(sessions, job_id)
    assert (summary.pending, summary.failed, len(summary.replaced), summary.total) == (3, (), 2, 5)
    with sessions() as session:
        planned_events = list(session.scalars(select(Event.message).where(Event.kind == "fallback-planned")))
    assert len(planned_events) == 2 and all("sc.dcm to pacs instead" in m for m in planned_events)


def test_defer_returns_the_attempt_and_retry_resets_failed_deliveries(sessions, planned):
    job_id, _ = planned
    when = utcnow() + timedelta(hours=1)
    assert defer(sessions, job_id, "w1", when, "2 of 4 deliveries pending: pacs down")
    assert not defer(sessions, job_id, "w1", when, "again")  # no longer running
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.state, job.attempts, job.not_before, job.lease_owner) == (JobState.QUEUED, 0, when, None)
        assert "pacs down" in job.error
    assert claim(sessions, "w1", LEASE) is None  # waits for the backoff
    with sessions.begin() as session:
        session.get(Job, job_id).not_before = utcnow()
    assert claim(sessions, "w1", LEASE).attempts == 1
    item = delivery.due(sessions, job_id)[0]
    delivery.record(sessions, item.id, _outcome(item, 0, "refused", permanent=True, status=None), POLICY)
    assert fail(sessions, job_id, "w1", "delivery failed", POLICY, retryable=False) == JobState.FAILED
    assert retry(sessions, job_id)
    rows = delivery.of_job(sessions, job_id)
    assert all(d.state == "pending" for d in rows) and rows[0].attempts == 0


# ---------------------------------------------------------------- over the network


def _job_with_results(tmp_path: Path, port: int, node: str = ""):
    config = node_config(
        tmp_path,
        node="delivery_backoff_seconds = 0\n" + node,
        extra=f'[[destinations]]\nname = "pacs"\nae_title = "TESTSCP"\nhost = "127.0.0.1"\nport = {port}\n',
    )
    sessions = make_sessionmaker(config.database_url)
    study_uid = generate_uid()
    job_id = enqueue(sessions, study_uid, "demo-petct", RetryPolicy())
    with sessions() as session:
        out = result_dir(config, session.get(Job, job_id))
    files = [
        _result_file(out, "seg.dcm", SegmentationStorage, study_uid),
        _result_file(out, "sr.dcm", Comprehensive3DSRStorage, study_uid),
    ]
    worker = Worker(config, sessions)
    worker.models._models["demo-petct"] = object()  # results exist: make_results reuses them, no model runs
    return config, sessions, job_id, worker, files


def _events(sessions, job_id) -> list[Event]:
    with sessions() as session:
        return list(session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id)))


@pytest.mark.e2e
def test_sop_class_rejected_fails_the_delivery_at_once(tmp_path: Path, scp_factory):
    scp = scp_factory([CTImageStorage])
    config, sessions, job_id, worker, files = _job_with_results(tmp_path, scp.port)
    assert worker.run_one()
    with sessions() as session:
        job = session.get(Job, job_id)
    assert job.state == JobState.FAILED and job.attempts == 1
    assert "to pacs" in job.error and "seg.dcm" in job.error and "sr.dcm" in job.error
    assert "SOP class rejected" in job.error and "Segmentation Storage" in job.error
    rows = delivery.of_job(sessions, job_id)
    assert [(d.state, d.attempts) for d in rows] == [("failed", 1), ("failed", 1)]
    assert scp.requests == []
    assert not worker.run_one()  # not retried
    kinds = [e.kind for e in _events(sessions, job_id)]
    assert kinds.count("delivery-failed") == 2 and kinds[-1] == "failed"


@pytest.mark.e2e
def test_sop_class_rejected_for_one_object_only(tmp_path: Path, scp_factory):
    """The destination takes the SR but not the SEG: the SR is delivered, the job fails naming the SEG."""
    scp = scp_factory([Comprehensive3DSRStorage])
    config, sessions, job_id, worker, files = _job_with_results(tmp_path, scp.port)
    assert worker.run_one()
    with sessions() as session:
        job = session.get(Job, job_id)
    assert job.state == JobState.FAILED and "seg.dcm" in job.error and "sr.dcm" not in job.error
    assert scp.stored == [dcmread(files[1]).SOPInstanceUID]
    assert [d.state for d in delivery.of_job(sessions, job_id)] == ["failed", "sent"]


@pytest.mark.e2e
def test_failed_status_once_is_sent_again_and_stored_once(tmp_path: Path, scp_factory):
    scp = scp_factory([SegmentationStorage, Comprehensive3DSRStorage], statuses=[0xA700])
    config, sessions, job_id, worker, files = _job_with_results(tmp_path, scp.port)
    seg_uid, sr_uid = (str(dcmread(f).SOPInstanceUID) for f in files)
    assert worker.run_one()
    with sessions() as session:
        job = session.get(Job, job_id)
    assert job.state == JobState.SUCCEEDED and job.attempts == 1, job.error
    assert scp.requests == [seg_uid, seg_uid, sr_uid] and scp.stored == [seg_uid, sr_uid]
    rows = delivery.of_job(sessions, job_id)
    assert [(d.state, d.attempts, d.sop_instance_uid) for d in rows] == [("sent", 2, seg_uid), ("sent", 1, sr_uid)]
    delivered = [e.message for e in _events(sessions, job_id) if e.kind == "delivered"]
    assert len(delivered) == 2 and "attempt 2;" in delivered[0] and "0xA700" in delivered[0]
    assert not worker.run_one()  # nothing left to do: sent once


@pytest.mark.e2e
def test_lost_response_is_sent_again_and_stored_once(tmp_path: Path, scp_factory):
    """The PACS stores the SEG but its response comes after the sender gave up: the sender sends
    the same file (same SOP Instance UID) again over a fresh association; the PACS keeps one."""
    scp = scp_factory([SegmentationStorage, Comprehensive3DSRStorage], late=1)
    config, sessions, job_id, worker, files = _job_with_results(tmp_path, scp.port, node="network_timeout_seconds = 3")
    seg_uid, sr_uid = (str(dcmread(f).SOPInstanceUID) for f in files)
    assert worker.run_one()
    with sessions() as session:
        job = session.get(Job, job_id)
    assert job.state == JobState.SUCCEEDED, job.error
    assert scp.wait_answered(3)  # the first, late answer's handler finishes too
    assert sorted(scp.requests) == sorted([seg_uid, seg_uid, sr_uid]) and sorted(scp.stored) == sorted(
        [seg_uid, sr_uid]
    )
    assert [(d.state, d.attempts) for d in delivery.of_job(sessions, job_id)] == [("sent", 2), ("sent", 1)]
    [seg_event, _] = [e.message for e in _events(sessions, job_id) if e.kind == "delivered"]
    assert "no response" in seg_event


@pytest.mark.e2e
def test_failures_across_passes_defer_the_job_without_holding_the_worker(tmp_path: Path, scp_factory):
    """The SEG fails twice (both tries of the first pass): the job waits in the queue, not in the
    worker; the next pass (one try left of 3) sends the same file again and it is stored once."""
    scp = scp_factory([SegmentationStorage, Comprehensive3DSRStorage], statuses=[0xA700, 0xA700])
    config, sessions, job_id, worker, files = _job_with_results(tmp_path, scp.port, node="delivery_max_attempts = 3")
    seg_uid = str(dcmread(files[0]).SOPInstanceUID)
    assert worker.run_one()  # the SEG: 0xA700 twice (2 tries this pass), the SR stored
    with sessions() as session:
        job = session.get(Job, job_id)
    assert (job.state, job.attempts) == (JobState.QUEUED, 0) and "0xA700" in job.error
    assert [(d.state, d.attempts) for d in delivery.of_job(sessions, job_id)] == [("pending", 2), ("sent", 1)]
    assert worker.run_one()  # backoff 0: due again; one try left
    with sessions() as session:
        job = session.get(Job, job_id)
    assert job.state == JobState.SUCCEEDED, job.error
    assert scp.requests.count(seg_uid) == 3 and scp.stored.count(seg_uid) == 1
    assert [(d.state, d.attempts) for d in delivery.of_job(sessions, job_id)] == [("sent", 3), ("sent", 1)]
    kinds = [e.kind for e in _events(sessions, job_id)]
    assert kinds.count("results-reused") == 2 and "delivery-pending" in kinds and kinds[-1] == "succeeded"


def test_store_each_reports_every_object_when_nobody_listens(tmp_path: Path):
    from dicomnode.config import Destination

    files = [_result_file(tmp_path, "seg.dcm", SegmentationStorage, "1.2.3")]
    [outcome] = store_each(
        Destination(name="x", ae_title="X", host="127.0.0.1", port=free_port()), files, "TESTNODE", timeout=5
    )
    assert not outcome.ok and not outcome.permanent and "not established" in outcome.error and outcome.tries == 0


@pytest.mark.e2e
@pytest.mark.parametrize("accepted", [[ExplicitVRLittleEndian], [JPEG2000Lossless, ExplicitVRLittleEndian]])
def test_compressed_seg_reaches_a_destination_in_a_syntax_it_accepts(accepted, pet, truth, scp_factory, tmp_path: Path):
    """A JPEG 2000 SEG goes as it is where JPEG 2000 is accepted, else decompressed (frames bit-packed
    again) with the same SOP Instance UID; either way the destination gets the same voxels."""
    from dicomnode.config import Destination

    path = write_dicom(
        build_seg(
            truth,
            pet.datasets,
            model_name="demo-petct",
            model_version="0.1.0",
            folds=[0],
            series_number=901,
            series_description="lesions",
        ),
        tmp_path / "seg.dcm",
    )
    sent = dcmread(path)
    assert sent.file_meta.TransferSyntaxUID == JPEG2000Lossless
    scp = scp_factory([SegmentationStorage], transfer_syntaxes=accepted)
    [outcome] = store_each(
        Destination(name="pacs", ae_title="TESTSCP", host="127.0.0.1", port=scp.port), [path], "TESTNODE", timeout=10
    )
    assert outcome.ok, outcome.error
    assert scp.stored == [sent.SOPInstanceUID]
    received = scp.received[sent.SOPInstanceUID]
    assert received.file_meta.TransferSyntaxUID == accepted[0]
    received.save_as(tmp_path / "received.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "received.dcm") == []
    seg = hd.seg.segread(tmp_path / "received.dcm")
    uids = [ds.SOPInstanceUID for ds in pet.datasets]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    np.testing.assert_array_equal(pixels[..., 0], (truth > 0).astype(pixels.dtype))
    assert len(received.PixelData) == (len(sent.PixelData) if accepted[0].is_compressed else 64 * 64 * 64 // 8)


# ---------------------------------------------------------------- outages measured in hours


def _backoff(sessions, job_id) -> float:
    """Seconds the job's deliveries wait after their last failed try."""
    with sessions() as session:
        rows = list(session.scalars(select(Delivery).where(Delivery.job_id == job_id)))
    return max((d.not_before - d.updated_at).total_seconds() for d in rows)


def _run_when_due(worker, sessions, job_id) -> None:
    """Run the job as soon as its deliveries' backoff is over (measured, not slept out)."""
    now = utcnow()
    with sessions.begin() as session:
        session.get(Job, job_id).not_before = now
        for row in session.scalars(select(Delivery).where(Delivery.job_id == job_id)):
            row.not_before = min(row.not_before, now)
    assert worker.run_one()


@pytest.mark.e2e
def test_a_destination_down_longer_than_the_old_budget_gets_its_results_once_when_back(tmp_path: Path, scp_factory):
    """With the defaults a delivery no longer gives up after 5 tries (about 7.5 minutes): it is
    bounded by delivery_give_up_hours (24), and its backoff is capped (delivery_backoff_max_seconds),
    so results arrive within one capped backoff after the PACS comes back, once, same UIDs."""
    port = free_port()
    config, sessions, job_id, worker, files = _job_with_results(
        tmp_path, port, node="delivery_backoff_seconds = 1\ndelivery_backoff_max_seconds = 8")
    assert config.node.delivery_max_attempts is None and config.node.delivery_give_up_hours == 24
    waits = []
    for _ in range(12):  # 12 passes, each a failed association (one attempt): the PACS is down
        _run_when_due(worker, sessions, job_id)
        waits.append(_backoff(sessions, job_id))
        with sessions() as session:
            assert session.get(Job, job_id).state == JobState.QUEUED
    assert waits[:6] == pytest.approx([1.0, 2.0, 4.0, 8.0, 8.0, 8.0], abs=0.1)  # doubled, capped at 8 s
    assert max(waits) == pytest.approx(8.0, abs=0.1)
    scp = scp_factory([SegmentationStorage, Comprehensive3DSRStorage], port=port)
    _run_when_due(worker, sessions, job_id)
    with sessions() as session:
        job = session.get(Job, job_id)
    assert job.state == JobState.SUCCEEDED, job.error
    assert scp.stored == [str(dcmread(f).SOPInstanceUID) for f in files] and len(scp.requests) == 2
    rows = delivery.of_job(sessions, job_id)
    assert all(d.state == "sent" and d.attempts > 5 for d in rows)


@pytest.mark.e2e
def test_after_its_horizon_a_delivery_fails_with_its_reason_and_retry_sends_the_same_objects(
    tmp_path: Path, scp_factory
):
    port = free_port()
    config, sessions, job_id, worker, files = _job_with_results(
        tmp_path, port, node="delivery_give_up_hours = 0.0005\ndelivery_backoff_max_seconds = 0.5")
    _run_when_due(worker, sessions, job_id)
    with sessions.begin() as session:  # the horizon (1.8 s after planning) has passed
        for row in session.scalars(select(Delivery).where(Delivery.job_id == job_id)):
            row.give_up_at = utcnow() - timedelta(seconds=1)
    _run_when_due(worker, sessions, job_id)
    with sessions() as session:
        job = session.get(Job, job_id)
    assert job.state == JobState.FAILED
    assert "gave up after" in job.error and "(delivery_give_up_hours)" in job.error and "seg.dcm" in job.error
    from typer.testing import CliRunner

    from dicomnode.cli import app

    status = CliRunner().invoke(app, ["status", "--config", str(config.source)])
    assert "delivery failed for good" in " ".join(status.output.split()), status.output
    scp = scp_factory([SegmentationStorage, Comprehensive3DSRStorage], port=port)
    retried = CliRunner().invoke(app, ["jobs", "retry", str(job_id), "--config", str(config.source)])
    assert retried.exit_code == 0, retried.output
    assert worker.run_one()
    with sessions() as session:
        assert session.get(Job, job_id).state == JobState.SUCCEEDED
    assert scp.stored == [str(dcmread(f).SOPInstanceUID) for f in files]
