from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from dicomnode.pipeline.queue import (
    RetryPolicy,
    claim,
    enqueue,
    fail,
    release,
    renew_lease,
    requeue_expired,
    retry,
    succeed,
)
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Event, Job, JobState, utcnow

from tests.support.queueutil import claim_concurrently

LEASE = timedelta(seconds=60)


@pytest.fixture
def sessions(tmp_path: Path):
    return make_sessionmaker(f"sqlite:///{tmp_path / 'queue.db'}")


def test_wal_mode(sessions):
    with sessions() as session:
        assert session.connection().exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_claim_runs_oldest_first_and_succeeds(sessions):
    first = enqueue(sessions, "1.2.1", "m", RetryPolicy())
    second = enqueue(sessions, "1.2.2", "m", RetryPolicy())
    job = claim(sessions, "w1", LEASE)
    assert (job.id, job.state, job.attempts, job.lease_owner) == (first, JobState.RUNNING, 1, "w1")
    assert succeed(sessions, job.id, "w1", "done")
    assert claim(sessions, "w1", LEASE).id == second
    with sessions() as session:
        assert session.get(Job, first).state == JobState.SUCCEEDED
        kinds = list(session.scalars(select(Event.kind).where(Event.job_id == first).order_by(Event.id)))
    assert kinds == ["queued", "started", "succeeded"]


def test_concurrent_claims_never_share_a_job(sessions):
    ids = {enqueue(sessions, f"1.2.{i}", "m", RetryPolicy()) for i in range(30)}
    assert sorted(claim_concurrently(lambda: sessions)) == sorted(ids)


def test_expired_lease_is_requeued(sessions):
    job_id = enqueue(sessions, "1.2.3", "m", RetryPolicy())
    job = claim(sessions, "dead-worker", timedelta(seconds=0))
    assert requeue_expired(sessions, now=utcnow() + timedelta(seconds=1)) == [job_id]
    assert not renew_lease(sessions, job.id, "dead-worker", LEASE)  # no longer ours
    again = claim(sessions, "w2", LEASE)
    assert (again.id, again.attempts) == (job_id, 2)


def test_a_job_requeued_after_its_lease_keeps_its_place_in_line(sessions):
    """The job of a worker that died is claimed before the jobs queued after it (not sent to the back)."""
    dead = enqueue(sessions, "1.2.3", "m", RetryPolicy())
    later = enqueue(sessions, "1.2.4", "m", RetryPolicy())
    assert claim(sessions, "dead-worker", timedelta(seconds=0)).id == dead
    assert requeue_expired(sessions, now=utcnow() + timedelta(seconds=1)) == [dead]
    assert [claim(sessions, "w2", LEASE).id, claim(sessions, "w2", LEASE).id] == [dead, later]


def test_live_lease_is_not_requeued(sessions):
    enqueue(sessions, "1.2.3", "m", RetryPolicy())
    job = claim(sessions, "w1", LEASE)
    assert requeue_expired(sessions) == []
    assert renew_lease(sessions, job.id, "w1", LEASE)


def test_failures_back_off_then_fail_for_good(sessions):
    policy = RetryPolicy(max_attempts=2, backoff_seconds=3600)
    job_id = enqueue(sessions, "1.2.3", "m", policy)
    job = claim(sessions, "w1", LEASE)
    assert fail(sessions, job.id, "w1", "PACS down", policy) == JobState.QUEUED
    assert claim(sessions, "w1", LEASE) is None  # backing off
    with sessions.begin() as session:
        row = session.get(Job, job_id)
        assert row.error == "PACS down"
        assert row.not_before > utcnow() + timedelta(minutes=59)
        row.not_before = utcnow()
    job = claim(sessions, "w1", LEASE)
    assert fail(sessions, job.id, "w1", "PACS still down", policy) == JobState.FAILED
    with sessions() as session:
        row = session.get(Job, job_id)
        assert (row.state, row.attempts, row.error) == (JobState.FAILED, 2, "PACS still down")
    assert retry(sessions, job_id)
    assert claim(sessions, "w1", LEASE).attempts == 1


def test_not_retryable_fails_at_once(sessions):
    enqueue(sessions, "1.2.3", "m", RetryPolicy(max_attempts=5))
    job = claim(sessions, "w1", LEASE)
    assert fail(sessions, job.id, "w1", "PatientWeight missing", RetryPolicy(), retryable=False) == JobState.FAILED


def test_release_returns_the_attempt(sessions):
    job_id = enqueue(sessions, "1.2.3", "m", RetryPolicy())
    job = claim(sessions, "w1", LEASE)
    assert release(sessions, job.id, "w1", "shutdown")
    again = claim(sessions, "w2", LEASE)
    assert (again.id, again.attempts) == (job_id, 1)


def test_backoff_doubles():
    policy = RetryPolicy(backoff_seconds=10)
    assert [policy.delay(n).total_seconds() for n in (1, 2, 3)] == [10, 20, 40]


def test_run_numbers_count_per_study_and_model(sessions):
    a = enqueue(sessions, "1.2.3", "m", RetryPolicy())
    b = enqueue(sessions, "1.2.3", "m", RetryPolicy())
    c = enqueue(sessions, "1.2.3", "other", RetryPolicy())
    with sessions() as session:
        assert [session.get(Job, i).run_number for i in (a, b, c)] == [1, 2, 1]


def test_jobs_of_a_worker_gone_from_this_host_are_queued_at_once_and_others_keep_their_lease(sessions):
    """A node knows its own host's processes: a running job whose worker pid there is dead goes back
    to the queue now; one whose worker still runs, or that runs on another host, keeps its lease."""
    import os
    import socket

    from dicomnode.pipeline.queue import requeue_orphaned

    host = socket.gethostname()
    dead = _dead_pid()
    owners = {"dead": f"{host}:{dead}", "alive": f"{host}:{os.getpid()}", "remote": "gpu-2:1"}
    jobs = {}
    for name, owner in owners.items():
        jobs[name] = enqueue(sessions, f"1.2.{len(jobs) + 1}", "m", RetryPolicy(), name)
        assert claim(sessions, owner, timedelta(minutes=10)).id == jobs[name]
    assert requeue_orphaned(sessions, host) == [jobs["dead"]]
    with sessions() as session:
        states = {name: session.get(Job, job_id).state for name, job_id in jobs.items()}
        [message] = session.scalars(
            select(Event.message).where(Event.job_id == jobs["dead"], Event.kind == "worker-gone")
        )
    assert states == {"dead": "queued", "alive": "running", "remote": "running"}
    assert message == f"worker {owners['dead']} is not running; re-queued at once"


def _dead_pid() -> int:
    """A pid no process on this host has."""
    from dicomnode.store.components import process_alive

    top = int(Path("/proc/sys/kernel/pid_max").read_text())
    return next(pid for pid in range(top - 1, 1, -1) if not process_alive(pid))
