"""Retention on a database and files built here: exactly the studies whose latest jobs all
succeeded long enough ago, or that never became a job and have been quiet long enough, lose
their spooled instances and result folders; the index keeps their history."""

from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from dicomnode.pipeline.queue import RetryPolicy, claim, enqueue, fail, succeed
from dicomnode.store import retention
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.index import ReceivedInstance, record_instance
from dicomnode.store.spool import Spool
from dicomnode.store.tables import Event, Instance, Job, Study, TimePointRow, utcnow

from tests.support.nodeutil import node_config

POLICY = RetryPolicy(max_attempts=1)
NOW = utcnow()


def _receive(config, sessions, study_uid: str, count: int = 2, at=NOW) -> list[Path]:
    series_uid = generate_uid()
    paths = []
    for _ in range(count):
        sop_uid = generate_uid()
        path = Spool(config.spool_dir).write(study_uid, series_uid, sop_uid, b"DICM")
        record_instance(sessions, ReceivedInstance(study_uid, series_uid, sop_uid, "1.2.840.10008.5.1.4.1.1.2",
                                                   "1.2.840.10008.1.2.1", "CT", 1, "", str(path), "TEST"), now=at)
        paths.append(path)
    return paths


def _job(config, sessions, study_uid: str, outcome: str, finished_hours_ago: float = 0) -> int:
    """A job run through the queue to `outcome` (succeeded, failed or queued), with a result folder."""
    job_id = enqueue(sessions, study_uid, "demo-petct", POLICY)
    if outcome != "queued":
        job = claim(sessions, "test", timedelta(minutes=5))
        assert job.id == job_id
        (config.results_dir / study_uid / f"job-{job_id}").mkdir(parents=True)
        (config.results_dir / study_uid / f"job-{job_id}" / "seg.dcm").write_bytes(b"DICM")
        if outcome == "succeeded":
            succeed(sessions, job_id, "test")
        else:
            fail(sessions, job_id, "test", "delivery failed", POLICY, retryable=False)
    with sessions.begin() as session:
        at = NOW - timedelta(hours=finished_hours_ago)
        session.execute(
            update(Job).where(Job.id == job_id).values(created_at=at - timedelta(minutes=10), finished_at=at)
        )
    return job_id


@pytest.fixture
def site(tmp_path: Path):
    config = node_config(tmp_path, node="retention_hours = 72")
    return config, make_sessionmaker(config.database_url)


def test_retention_removes_exactly_the_done_studies(site):
    config, sessions = site
    s = {
        name: generate_uid()
        for name in ("old", "recent", "failed", "rerun", "late", "waiting", "no_job", "no_job_recent")
    }
    files = {
        name: _receive(config, sessions, uid, at=NOW - timedelta(hours=70 if name == "no_job_recent" else 200))
        for name, uid in s.items()
    }
    jobs = {
        "old": [_job(config, sessions, s["old"], "succeeded", 100)],
        "recent": [_job(config, sessions, s["recent"], "succeeded", 71)],
        "failed": [_job(config, sessions, s["failed"], "failed", 100)],
        "rerun": [
            _job(config, sessions, s["rerun"], "failed", 150),
            _job(config, sessions, s["rerun"], "succeeded", 100),
        ],
        "late": [_job(config, sessions, s["late"], "succeeded", 100)],
    }
    files["late"] += _receive(
        config, sessions, s["late"], count=1, at=NOW - timedelta(hours=90)
    )  # after its job: a new run is due
    jobs["waiting"] = [_job(config, sessions, s["waiting"], "queued", 100)]

    assert sorted(retention.purge_due(sessions, config, now=NOW)) == sorted([s["old"], s["rerun"], s["no_job"]])

    for name in ("old", "rerun", "no_job"):
        assert not any(path.exists() for path in files[name])
        assert not (config.spool_dir / s[name]).exists() and not (config.results_dir / s[name]).exists()
    for name in ("recent", "failed", "late", "waiting", "no_job_recent"):
        assert all(path.exists() for path in files[name]), name
        for job_id in jobs.get(name, []):
            if name != "waiting":
                assert (config.results_dir / s[name] / f"job-{job_id}" / "seg.dcm").exists(), name
    with sessions() as session:
        held = set(session.scalars(select(Instance.study_uid)))
        assert held == {s[n] for n in ("recent", "failed", "late", "waiting", "no_job_recent")}
        assert session.get(Study, s["old"]).instances_received == 2  # the history stays
        assert session.get(Job, jobs["old"][0]).state == "succeeded"
        purged = {e.study_uid: e.message for e in session.scalars(select(Event).where(Event.kind == "purged"))}
    assert set(purged) == {s["old"], s["rerun"], s["no_job"]}
    assert purged[s["rerun"]].startswith(
        f"2 instances and the results of jobs {jobs['rerun'][0]}, {jobs['rerun'][1]} removed"
    )
    assert purged[s["no_job"]] == "2 instances removed 72 h after the last one arrived (the study never became a job)"

    assert retention.purge_due(sessions, config, now=NOW) == []  # nothing left to do
    assert sorted(retention.purge_due(sessions, config, now=NOW + timedelta(hours=2))) == sorted(
        [s["recent"], s["no_job_recent"]]
    )


def test_an_instance_arriving_during_the_purge_is_kept(site):
    config, sessions = site
    study = generate_uid()
    old = _receive(config, sessions, study, at=NOW - timedelta(hours=200))
    _job(config, sessions, study, "succeeded", 100)
    [done] = retention.due(sessions, timedelta(hours=72), NOW)
    [new] = _receive(config, sessions, study, count=1)  # arrives between the check and the purge
    assert retention.purge(sessions, config, done) == 2
    assert not any(p.exists() for p in old) and new.exists()
    with sessions() as session:
        assert list(session.scalars(select(Instance.path))) == [str(new)]


def test_retention_zero_keeps_everything(tmp_path: Path):
    config = node_config(tmp_path, node="retention_hours = 0")
    sessions = make_sessionmaker(config.database_url)
    study = generate_uid()
    files = _receive(config, sessions, study, at=NOW - timedelta(hours=2000))
    _job(config, sessions, study, "succeeded", 1000)
    assert retention.purge_due(sessions, config, now=NOW) == []
    assert all(p.exists() for p in files)


def test_time_points_outlive_their_results_until_the_comparison_window_passes(tmp_path: Path):
    """[models.compare]: a purged study's time point stays in its folder (the rest goes) until it was
    made longer than max_age_days ago (whatever its study's date: a study sent late keeps its priors);
    then file and row go."""
    config = node_config(tmp_path, node="retention_hours = 72", extra="[models.compare]\nmax_age_days = 100\n")
    sessions = make_sessionmaker(config.database_url)
    kept, old = generate_uid(), generate_uid()
    rows = {}
    for study_uid, made in ((kept, NOW - timedelta(days=90)), (old, NOW - timedelta(days=110))):
        _receive(config, sessions, study_uid, at=NOW - timedelta(hours=200))
        job_id = _job(config, sessions, study_uid, "succeeded", 100)
        path = config.results_dir / study_uid / f"job-{job_id}" / "timepoint.npz"
        path.write_bytes(b"PK")
        with sessions.begin() as session:
            session.add(TimePointRow(job_id=job_id, study_uid=study_uid, model="demo-petct", patient_id="P",
                                     issuer="", study_date="20100101", study_time="", modalities="CT/PT",
                                     path=str(path), created_at=made))
        rows[study_uid] = path
    assert sorted(retention.purge_due(sessions, config, NOW)) == sorted([kept, old])
    assert [p.name for p in rows[kept].parent.iterdir()] == ["timepoint.npz"]  # seg.dcm gone, the time point kept
    assert not rows[old].parent.exists()  # older than the window: gone with its folder
    with sessions() as session:
        assert [r.study_uid for r in session.scalars(select(TimePointRow))] == [kept]
    retention.purge_timepoints(sessions, config, NOW + timedelta(days=20))  # 110 days old now
    assert not rows[kept].parent.exists()
    with sessions() as session:
        assert list(session.scalars(select(TimePointRow))) == []
