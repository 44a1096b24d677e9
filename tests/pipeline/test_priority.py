"""Job priorities: an urgent study that arrives behind five normal ones is claimed first (the real
queue on SQLite, studies assembled from files); the priority rules (calling AE title, header tags,
models; the first that fits decides, else the model's priority); urgent > high > normal > low, the
runnable-longest first within one; low jobs only within [node] low_priority_hours; an operator's
change of priority is an event and takes effect at the next claim."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from dicomnode.config import ConfigError, HoursWindow, Priority, load_config
from dicomnode.pipeline import assembler
from dicomnode.pipeline.queue import RefusedError, RetryPolicy, claim, enqueue, prioritize, succeed
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.events import EventKind, event_data
from dicomnode.store.index import ReceivedInstance, record_instance
from dicomnode.store.tables import Event, Job, utcnow

from tests.support.nodeutil import selectable_instance, write_config

LEASE = timedelta(minutes=10)

RULES = """
[[priority_rules]]
priority = "urgent"
calling_aets = ["ER_*"]

[[priority_rules]]
priority = "urgent"
tags = { StudyDescription = ["*stroke*"] }

[[priority_rules]]
priority = "low"
tags = { RequestedProcedureDescription = ["research*"] }
"""


def _study(folder: Path, sessions, at: datetime, aet: str = "PACS", **tags: str) -> str:
    """A complete tiny PET/CT study, sent by `aet`, its headers carrying `tags`, indexed as received at `at`."""
    study, frame = generate_uid(), generate_uid()
    for modality in ("CT", "PT"):
        series = generate_uid()
        for i in range(4):
            ds = selectable_instance(study, series, i, modality, frame)
            for keyword, value in tags.items():
                setattr(ds, keyword, value)
            path = folder / study / f"{series}-{i}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            record_instance(sessions, ReceivedInstance(study, series, ds.SOPInstanceUID, ds.SOPClassUID,
                                                       "1.2.840.10008.1.2.1", modality, int(ds.SeriesNumber), "",
                                                       str(path), aet), now=at)
    return study


def _node(tmp_path: Path, node: str = "", extra: str = ""):  # noqa: ANN202
    config = load_config(write_config(tmp_path, node="study_quiet_seconds = 60\n" + node, extra=extra))
    return config, make_sessionmaker(config.database_url)


def _queue(sessions, config, at: datetime) -> dict[str, Job]:
    created = assembler.queue_ready_studies(sessions, config, now=at + timedelta(seconds=61))
    with sessions() as session:
        return {job.study_uid: job for job in session.scalars(select(Job).where(Job.id.in_(created)))}


def test_an_urgent_study_behind_five_normal_ones_is_claimed_first(tmp_path: Path):
    config, sessions = _node(tmp_path, extra=RULES)
    t0 = utcnow() - timedelta(minutes=10)
    normal = [_study(tmp_path / "in", sessions, t0 + timedelta(seconds=i)) for i in range(5)]
    urgent = _study(tmp_path / "in", sessions, t0 + timedelta(seconds=10), aet="ER_CT1")
    jobs = _queue(sessions, config, t0 + timedelta(seconds=10))
    assert {uid: job.priority for uid, job in jobs.items()} == {**dict.fromkeys(normal, "normal"), urgent: "urgent"}
    assert jobs[urgent].id > max(jobs[uid].id for uid in normal)  # queued behind them

    first = claim(sessions, "w1", LEASE)
    assert first.study_uid == urgent and first.priority == Priority.URGENT
    assert [claim(sessions, "w1", LEASE).study_uid for _ in normal] == normal  # then the others in order
    with sessions() as session:
        queued = session.scalar(select(Event).where(Event.job_id == first.id, Event.kind == EventKind.QUEUED))
        started = session.scalar(select(Event).where(Event.job_id == first.id, Event.kind == EventKind.STARTED))
    assert "priority urgent (priority rule 1: calling AE ER_CT1)" in queued.message
    assert event_data(queued)["priority"] == "urgent"
    assert started.message.endswith("priority urgent")


def test_rules_by_tags_and_models_first_fit_decides(tmp_path: Path):
    extra = RULES + '\n[[priority_rules]]\npriority = "high"\nmodels = ["demo-petct"]\n'
    config, sessions = _node(tmp_path, extra=extra)
    t0 = utcnow() - timedelta(minutes=10)
    stroke = _study(tmp_path / "in", sessions, t0, StudyDescription="CT HEAD STROKE protocol")
    research = _study(tmp_path / "in", sessions, t0, RequestedProcedureDescription="Research PET/CT")
    both = _study(tmp_path / "in", sessions, t0, aet="ER_CT2", RequestedProcedureDescription="research arm")
    other = _study(tmp_path / "in", sessions, t0, StudyDescription="PET WB")
    jobs = _queue(sessions, config, t0)
    assert {uid: jobs[uid].priority for uid in (stroke, research, both, other)} == {
        stroke: "urgent", research: "low", both: "urgent", other: "high"}
    with sessions() as session:
        messages = {job.study_uid: session.scalar(select(Event.message).where(
            Event.job_id == job.id, Event.kind == EventKind.QUEUED)) for job in jobs.values()}
    assert 'priority rule 2: StudyDescription "CT HEAD STROKE protocol"' in messages[stroke]
    assert 'priority rule 3: RequestedProcedureDescription "Research PET/CT"' in messages[research]
    assert "priority rule 4: model demo-petct" in messages[other]


def test_the_models_priority_when_no_rule_fits(tmp_path: Path):
    config, sessions = _node(tmp_path, extra='priority = "high"\n')  # under [[models]]
    t0 = utcnow() - timedelta(minutes=10)
    study = _study(tmp_path / "in", sessions, t0)
    job = _queue(sessions, config, t0)[study]
    assert job.priority == "high"
    with sessions() as session:
        assert "priority high (model demo-petct)" in session.scalar(
            select(Event.message).where(Event.job_id == job.id, Event.kind == EventKind.QUEUED))


def _jobs(sessions, *priorities: Priority) -> list[int]:
    return [enqueue(sessions, generate_uid(), "demo-petct", RetryPolicy(), priority=p) for p in priorities]


def test_claim_order_urgent_high_normal_low_then_runnable_longest(tmp_path: Path):
    _, sessions = _node(tmp_path)
    low, normal1, high, normal2, urgent = _jobs(sessions, Priority.LOW, Priority.NORMAL, Priority.HIGH,
                                                Priority.NORMAL, Priority.URGENT)
    with sessions.begin() as session:  # normal2 has been runnable longer than normal1 (a retry's backoff over)
        session.execute(update(Job).where(Job.id == normal2).values(not_before=utcnow() - timedelta(hours=1)))
    assert [claim(sessions, "w", LEASE).id for _ in range(5)] == [urgent, high, normal2, normal1, low]
    assert claim(sessions, "w", LEASE) is None


def test_low_jobs_wait_for_the_off_peak_window(tmp_path: Path):
    config, sessions = _node(tmp_path, node='low_priority_hours = "20:00-06:00"')
    window = config.node.low_priority_hours
    assert str(window) == "20:00-06:00"
    low, normal = _jobs(sessions, Priority.LOW, Priority.NORMAL)
    noon, night = datetime(2026, 12, 1, 12, 0).astimezone(), datetime(2026, 12, 1, 23, 30).astimezone()
    assert claim(sessions, "w", LEASE, window, noon).id == normal
    assert claim(sessions, "w", LEASE, window, noon) is None  # the low job waits
    assert claim(sessions, "w", LEASE, window, night).id == low


@pytest.mark.parametrize("text, inside, outside", [
    ("20:00-06:00", [time(20, 0), time(23, 59), time(0, 0), time(5, 59)], [time(6, 0), time(12, 0), time(19, 59)]),
    ("12:00-14:30", [time(12, 0), time(14, 29)], [time(11, 59), time(14, 30), time(0, 0)]),
])
def test_hours_window(text, inside, outside):
    window = HoursWindow.parse(text)
    assert all(window.contains(t) for t in inside) and not any(window.contains(t) for t in outside)


@pytest.mark.parametrize("node, extra, message", [
    ('low_priority_hours = "8pm-6am"', "", "node.low_priority_hours"),
    ('low_priority_hours = "06:00-06:00"', "", "an empty window"),
    ("", '[[priority_rules]]\npriority = "urgent"\n', "a priority rule needs a condition"),
    ("", '[[priority_rules]]\npriority = "urgent"\nmodels = ["nope"]\n', "priority rule 1 names unknown model 'nope'"),
    ("", '[[priority_rules]]\npriority = "soon"\ncalling_aets = ["ER"]\n',
     r"priority_rules\[0\]\.priority': Input should be 'urgent'"),
    ("", '[[priority_rules]]\npriority = "high"\ntags = { PatientName = ["*"] }\n', "PatientName"),
])
def test_config_refuses_bad_priority_settings(tmp_path: Path, node: str, extra: str, message: str):
    path = write_config(tmp_path, node=node)
    path.write_text(path.read_text() + "\n" + extra)  # top-level tables after the model's
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_prioritize_is_an_event_and_changes_the_claim(tmp_path: Path):
    _, sessions = _node(tmp_path)
    first, second = _jobs(sessions, Priority.NORMAL, Priority.NORMAL)
    assert prioritize(sessions, second, Priority.URGENT) == "normal"
    assert prioritize(sessions, second, Priority.URGENT) == "urgent"  # no change, no second event
    with sessions() as session:
        events = list(session.scalars(select(Event).where(Event.job_id == second, Event.kind == EventKind.PRIORITIZED)))
    assert [(e.message, event_data(e)) for e in events] == [
        ("urgent (was normal) by operator", {"priority": "urgent", "was": "normal"})]
    assert claim(sessions, "w", LEASE).id == second
    assert succeed(sessions, second, "w")
    with pytest.raises(RefusedError, match=f"job {second} is succeeded"):
        prioritize(sessions, second, Priority.LOW)
    with pytest.raises(RefusedError, match="no job 999"):
        prioritize(sessions, 999, Priority.LOW)
    assert claim(sessions, "w", LEASE).id == first
