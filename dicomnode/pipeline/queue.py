"""The job queue: explicit states, leases, retries with backoff, and an event per change.

    queued --claim--> running --succeed--> succeeded
       ^                 |
       |   (attempts     +--fail--> failed (attempts used up, or not retryable)
       +--- left) -------+
    running with an expired lease (worker died) --> queued again at the next sweep
    running --defer--> queued until a delivery's backoff is over or a storage commitment
                       report is due (the attempt is not counted: each delivery counts its own,
                       see dicomnode.pipeline.delivery); a report that arrives wakes it (now)
    queued, failed or awaiting-review --cancel (operator)--> cancelled (its pending deliveries too;
                       a held job sends nothing, not even a status SR); a running
                       job is not cancelled: its worker may be sending results right now
    a study --requeue (operator)--> a new job, the next run number, whatever earlier runs did
    a job --prioritize (operator)--> its priority changed (an event); it takes effect at the next claim
    a study held back past [node] status_after_hours --held_back (assembler)--> a new job, failed at
                       once with the reason: it never runs, it carries the "not performed" status SR

Claiming takes the runnable job of the highest priority (urgent, high, normal, low; a low job only
within [node] low_priority_hours), within one priority the one runnable longest (not_before,
then id). Claiming is a compare-and-set UPDATE (... WHERE state = 'queued'), atomic on SQLite and
PostgreSQL alike, so two workers never run the same job.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Sequence

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import HoursWindow, NodeSettings, NotifyEvent, Priority
from dicomnode.pipeline import notify
from dicomnode.store.components import process_alive
from dicomnode.store.events import EventKind, log_event
from dicomnode.store.tables import Commitment, Delivery, DeliveryState, Event, Job, JobState, Study, utcnow


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long something is tried again: at most `max_attempts` attempts (None: no
    count limit), `backoff_seconds` after a failed one, doubled after each but never more than
    `max_backoff_seconds`, and no more tries `give_up_after` the first (None: no time limit)."""

    max_attempts: int | None = 3
    backoff_seconds: float = 30.0
    max_backoff_seconds: float | None = None
    give_up_after: timedelta | None = None

    @classmethod
    def for_jobs(cls, node: NodeSettings) -> "RetryPolicy":
        """A job's attempts ([node] max_attempts, retry_backoff_seconds capped at
        retry_backoff_max_seconds; waits on a transient cause end job_give_up_hours after queueing)."""
        return cls(node.max_attempts, node.retry_backoff_seconds, node.retry_backoff_max_seconds,
                   timedelta(hours=node.job_give_up_hours))

    @classmethod
    def for_deliveries(cls, node: NodeSettings) -> "RetryPolicy":
        """A delivery's C-STORE tries: for delivery_give_up_hours, delivery_backoff_seconds doubled
        up to delivery_backoff_max_seconds (and at most delivery_max_attempts, when set)."""
        return cls(node.delivery_max_attempts, node.delivery_backoff_seconds, node.delivery_backoff_max_seconds,
                   timedelta(hours=node.delivery_give_up_hours))

    def delay(self, attempt: int) -> timedelta:
        """Wait before attempt `attempt + 1`: backoff, doubled after every failed attempt, capped."""
        seconds = self.backoff_seconds * 2 ** min(max(attempt - 1, 0), 60)
        if self.max_backoff_seconds is not None:
            seconds = min(seconds, self.max_backoff_seconds)
        return timedelta(seconds=seconds)

    def give_up_at(self, start: datetime) -> datetime | None:
        """When tries that began at `start` end (None: never, by time)."""
        return start + self.give_up_after if self.give_up_after is not None else None

    def attempts_left(self, attempts: int, max_attempts: int | None) -> bool:
        return max_attempts is None or attempts < max_attempts


def enqueue(
    sessions: sessionmaker, study_uid: str, model: str, policy: RetryPolicy, reason: str = "",
    details: Sequence[tuple[EventKind, str, dict | None]] = (), priority: Priority = Priority.NORMAL,
    priority_reason: str = "", prior_of_job: int | None = None,
) -> int:
    """Queue a job; `details` are further (kind, message, data) events of the job, written with it;
    `priority_reason` says where a priority other than normal came from (a rule, the model);
    `prior_of_job`: a compute-only job for that job's comparison ([models.compare]: nothing delivered)."""
    now = utcnow()
    with sessions.begin() as session:
        previous = session.scalar(
            select(Job.run_number)
            .where(Job.study_uid == study_uid, Job.model == model)
            .order_by(Job.run_number.desc())
            .limit(1)
        )
        job = Job(
            study_uid=study_uid,
            model=model,
            state=JobState.QUEUED,
            priority=Priority(priority).value,
            attempts=0,
            max_attempts=policy.max_attempts,
            run_number=(previous or 0) + 1,
            not_before=now,
            give_up_at=policy.give_up_at(now),
            created_at=now,
            prior_of_job=prior_of_job,
        )
        session.add(job)
        session.flush()
        said = "" if priority == Priority.NORMAL and not priority_reason else (
            f", priority {priority}" + (f" ({priority_reason})" if priority_reason else ""))
        log_event(
            session,
            EventKind.QUEUED,
            f"model {model}, run {job.run_number}{said}{': ' + reason if reason else ''}",
            study_uid=study_uid,
            job_id=job.id,
            at=now,
            data={"priority": job.priority, "priority_reason": priority_reason,
                  **({"prior_of_job": prior_of_job} if prior_of_job is not None else {})},
        )
        for kind, message, data in details:
            log_event(session, kind, message, study_uid=study_uid, job_id=job.id, at=now, data=data)
        return job.id


def held_back(sessions: sessionmaker, study_uid: str, model: str, reason: str, policy: RetryPolicy,
              now: datetime | None = None) -> int:
    """A job for a study that was held back too long (a series missing or still arriving), made
    failed at once with `reason` as its error: it never runs; its run number is taken (a later run
    that does produce results comes after it) and it carries the "not performed" status SR
    (dicomnode.pipeline.notperformed); `jobs retry` runs it like any failed job (`policy`'s attempts).
    Returns its id."""
    now = now or utcnow()
    with sessions.begin() as session:
        previous = session.scalar(
            select(Job.run_number).where(Job.study_uid == study_uid, Job.model == model)
            .order_by(Job.run_number.desc()).limit(1)
        )
        job = Job(study_uid=study_uid, model=model, state=JobState.FAILED, priority=Priority.NORMAL.value,
                  attempts=0, max_attempts=policy.max_attempts, run_number=(previous or 0) + 1, not_before=now,
                  give_up_at=now, created_at=now, finished_at=now, error=reason)
        session.add(job)
        session.flush()
        log_event(session, EventKind.HELD_BACK, f"model {model}, run {job.run_number}: not run",
                  study_uid=study_uid, job_id=job.id, at=now)
        log_event(session, EventKind.FAILED, reason, study_uid=study_uid, job_id=job.id, at=now,
                  data={"held_back": True})
        notify.job_failed(session, job, now)
        return job.id


# The claim order: urgent first ... low last (the column holds the Priority's value).
PRIORITY_RANK = case({p.value: p.rank for p in Priority}, value=Job.priority, else_=Priority.NORMAL.rank)


def low_priority_open(window: HoursWindow | None, local_now: datetime | None = None) -> bool:
    """Whether low jobs may be claimed now: always without a window, else within it (local time)."""
    return window is None or window.contains((local_now or datetime.now().astimezone()).time())


def claim(sessions: sessionmaker, owner: str, lease: timedelta, low_hours: HoursWindow | None = None,
          local_now: datetime | None = None, worker: dict | None = None) -> Job | None:
    """Take the runnable job of the highest priority, within it the one runnable longest, or None;
    a low job only within `low_hours` ([node] low_priority_hours, the node's local time; `local_now`
    for tests). Atomic against other workers. `worker` ({"worker": name, "device": ...}) goes into
    the `started` event's data and message: which worker, on which device, ran the attempt."""
    low_open = low_priority_open(low_hours, local_now)
    while True:
        now = utcnow()
        with sessions.begin() as session:
            runnable = select(Job.id).where(Job.state == JobState.QUEUED, Job.not_before <= now)
            if not low_open:
                runnable = runnable.where(Job.priority != Priority.LOW.value)
            candidate = session.scalar(runnable.order_by(PRIORITY_RANK, Job.not_before, Job.id).limit(1))
            if candidate is None:
                return None
            taken = session.execute(
                update(Job)
                .where(Job.id == candidate, Job.state == JobState.QUEUED)
                .values(
                    state=JobState.RUNNING,
                    attempts=Job.attempts + 1,
                    lease_owner=owner,
                    lease_expires_at=now + lease,
                    started_at=now,
                    error=None,
                )
                .execution_options(synchronize_session=False)
            ).rowcount
            if taken != 1:
                continue  # another worker won the race; look again
            job = session.get(Job, candidate, populate_existing=True)
            by = f"{owner} ({worker['worker']} on {worker['device']})" if worker else owner
            log_event(
                session,
                EventKind.STARTED,
                f"attempt {job.attempts} of {job.max_attempts} by {by}"
                + ("" if job.priority == Priority.NORMAL else f", priority {job.priority}"),
                study_uid=job.study_uid,
                job_id=job.id,
                at=now,
                data={"owner": owner, **(worker or {})},
            )
            return job


def renew_lease(sessions: sessionmaker, job_id: int, owner: str, lease: timedelta) -> bool:
    """Extend a running job's lease; False if the job is no longer ours."""
    with sessions.begin() as session:
        return (
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == owner)
                .values(lease_expires_at=utcnow() + lease)
            ).rowcount
            == 1
        )


def succeed(sessions: sessionmaker, job_id: int, owner: str, message: str = "") -> bool:
    now = utcnow()
    with sessions.begin() as session:
        job = _held(session, job_id, owner)
        if job is None:
            return False
        job.state, job.finished_at, job.lease_owner, job.lease_expires_at = JobState.SUCCEEDED, now, None, None
        log_event(session, EventKind.SUCCEEDED, message, study_uid=job.study_uid, job_id=job.id, at=now)
        notify.enqueue(session, NotifyEvent.JOB_SUCCEEDED, job, reason=message or None, now=now)
        return True


def wake(sessions: sessionmaker, job_ids: Sequence[int], reason: str) -> list[int]:
    """Queued jobs among `job_ids` that wait (a prior's or a chained model's job they need has
    ended) become runnable now instead of after their backoff; returns those woken."""
    now = utcnow()
    woken = []
    with sessions.begin() as session:
        for job in session.scalars(select(Job).where(Job.id.in_(list(job_ids)), Job.state == JobState.QUEUED,
                                                     Job.not_before > now)):
            job.not_before = now
            woken.append(job.id)
            log_event(session, EventKind.WOKEN, reason, study_uid=job.study_uid, job_id=job.id, at=now)
    return woken


def _held(session: Session, job_id: int, owner: str) -> Job | None:
    """The job when it is running under `owner`'s lease, else None (another worker, or done)."""
    job = session.get(Job, job_id)
    return job if job is not None and job.state == JobState.RUNNING and job.lease_owner == owner else None


def fail(
    sessions: sessionmaker, job_id: int, owner: str, error: str, policy: RetryPolicy, retryable: bool = True
) -> str:
    """Record a failed attempt: back to queued after a backoff, or failed for good. Returns the new state."""
    now = utcnow()
    with sessions.begin() as session:
        job = _held(session, job_id, owner)
        if job is None:
            current = session.get(Job, job_id)
            return current.state if current else "missing"
        job.error = error
        job.lease_owner, job.lease_expires_at = None, None
        if retryable and policy.attempts_left(job.attempts, job.max_attempts):
            job.state = JobState.QUEUED
            job.not_before = now + policy.delay(job.attempts)
            log_event(
                session,
                EventKind.RETRY_SCHEDULED,
                f"attempt {job.attempts} failed: {error}; next try after {job.not_before:%H:%M:%S} UTC",
                study_uid=job.study_uid,
                job_id=job.id,
                at=now,
            )
        else:
            job.state, job.finished_at = JobState.FAILED, now
            log_event(session, EventKind.FAILED, error, study_uid=job.study_uid, job_id=job.id, at=now)
            notify.job_failed(session, job, now)
        return job.state


def wait(sessions: sessionmaker, job_id: int, owner: str, reason: str, policy: RetryPolicy) -> str:
    """The job's inputs are not ready yet (a transient cause: a series still arriving): back to the
    queue without counting the attempt, after a backoff that doubles with each wait up to the
    policy's cap, until the job's give_up_at; then failed for good, saying how long it waited.
    Returns the new state."""
    now = utcnow()
    with sessions.begin() as session:
        job = _held(session, job_id, owner)
        if job is None:
            current = session.get(Job, job_id)
            return current.state if current else "missing"
        job.lease_owner, job.lease_expires_at, job.error = None, None, reason
        job.attempts = max(job.attempts - 1, 0)
        if job.give_up_at is not None and now >= job.give_up_at:
            waited = (now - job.created_at).total_seconds() / 3600
            job.state, job.finished_at = JobState.FAILED, now
            job.error = f"{reason}; still not ready after {waited:.1f} h (job_give_up_hours)"
            log_event(session, EventKind.FAILED, job.error, study_uid=job.study_uid, job_id=job.id, at=now)
            notify.job_failed(session, job, now)
            return job.state
        waits = session.scalar(select(func.count()).select_from(Event).where(
            Event.job_id == job.id, Event.kind == EventKind.WAITING))
        job.state, job.not_before = JobState.QUEUED, now + policy.delay(waits + 1)
        log_event(session, EventKind.WAITING, f"{reason}; next try after {job.not_before:%H:%M:%S} UTC",
                  study_uid=job.study_uid, job_id=job.id, at=now)
        return job.state


def requeue_orphaned(sessions: sessionmaker, host: str, now: datetime | None = None) -> list[int]:
    """Running jobs whose worker was a process on `host` that no longer runs (this node was
    restarted, or its worker was killed) go back to the queue at once instead of after their
    lease: a node knows that the workers it supervised before are gone. A worker on another host
    keeps its lease (only its own heartbeat can say whether it is alive)."""
    now = now or utcnow()
    with sessions.begin() as session:
        running = list(session.scalars(select(Job).where(Job.state == JobState.RUNNING,
                                                          Job.lease_owner.like(f"{host}:%"))))
        orphaned = [job for job in running if not process_alive(_owner_pid(job.lease_owner))]
        for job in orphaned:
            log_event(session, EventKind.WORKER_GONE, f"worker {job.lease_owner} is not running; re-queued at once",
                      study_uid=job.study_uid, job_id=job.id, at=now)
            job.state, job.lease_owner, job.lease_expires_at = JobState.QUEUED, None, None
            job.not_before = min(job.not_before, now)  # its place in line kept: runnable since then
        return [job.id for job in orphaned]


def _owner_pid(owner: str) -> int:
    try:
        return int(owner.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return -1  # not a pid: never alive


def requeue_expired(sessions: sessionmaker, now: datetime | None = None) -> list[int]:
    """Running jobs whose lease ran out (their worker died) go back to the queue, in the place they
    had (not_before kept): the next claim of their priority takes them before jobs queued later."""
    now = now or utcnow()
    with sessions.begin() as session:
        expired = list(session.scalars(select(Job).where(Job.state == JobState.RUNNING, Job.lease_expires_at < now)))
        for job in expired:
            log_event(
                session,
                EventKind.LEASE_EXPIRED,
                f"worker {job.lease_owner} stopped renewing; re-queued",
                study_uid=job.study_uid,
                job_id=job.id,
                at=now,
            )
            job.state, job.lease_owner, job.lease_expires_at = JobState.QUEUED, None, None
            job.not_before = min(job.not_before, now)  # its place in line kept: runnable since then
        return [job.id for job in expired]


def retry(sessions: sessionmaker, job_id: int, jobs: RetryPolicy | None = None,
          deliveries: RetryPolicy | None = None) -> bool:
    """Operator retry of a failed job: queued again with a fresh set of attempts and, by the
    policies given, a fresh time horizon for it and its failed deliveries."""
    now = utcnow()
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.FAILED:
            return False
        job.state, job.attempts, job.not_before, job.finished_at = JobState.QUEUED, 0, now, None
        job.give_up_at = jobs.give_up_at(now) if jobs is not None else None
        # Deliveries that failed get a fresh set of attempts too (the same files, the same UIDs).
        reset = session.execute(
            update(Delivery)
            .where(Delivery.job_id == job_id, Delivery.state == DeliveryState.FAILED)
            .values(state=DeliveryState.PENDING, attempts=0, not_before=now, updated_at=now,
                    give_up_at=deliveries.give_up_at(now) if deliveries is not None else None)
        ).rowcount
        log_event(
            session,
            EventKind.RETRY_REQUESTED,
            "by operator" + (f"; {reset} failed deliveries pending again" if reset else ""),
            study_uid=job.study_uid,
            job_id=job.id,
            at=now,
        )
        return True


def defer(sessions: sessionmaker, job_id: int, owner: str, not_before: datetime, reason: str) -> bool:
    """Put a running job back in the queue until `not_before` without counting the attempt: its
    deliveries wait for their backoff (they count their own attempts)."""
    now = utcnow()
    with sessions.begin() as session:
        job = _held(session, job_id, owner)
        if job is None:
            return False
        job.state, job.lease_owner, job.lease_expires_at = JobState.QUEUED, None, None
        job.not_before, job.error = max(not_before, now), reason
        job.attempts = max(job.attempts - 1, 0)
        # A storage commitment report written while the job ran (after its deliveries were read)
        # found it running and could not wake it: it is due now. (A report written after this
        # transaction finds the job queued and wakes it itself: dicomnode.store.commitments.)
        reported = session.scalar(
            select(func.count()).select_from(Delivery)
            .join(Commitment, Commitment.transaction_uid == Delivery.transaction_uid)
            .where(Delivery.job_id == job_id, Delivery.state == DeliveryState.CONFIRMING,
                   Commitment.reported_at.is_not(None))
        )
        if reported:
            job.not_before = now
        log_event(
            session,
            EventKind.DELIVERY_PENDING,
            f"{reason}; job waits until {job.not_before:%H:%M:%S} UTC",
            study_uid=job.study_uid,
            job_id=job.id,
            at=now,
        )
        return True


def release(sessions: sessionmaker, job_id: int, owner: str, reason: str) -> bool:
    """Give a running job back to the queue without counting the attempt (shutdown)."""
    now = utcnow()
    with sessions.begin() as session:
        job = _held(session, job_id, owner)
        if job is None:
            return False
        job.state, job.lease_owner, job.lease_expires_at, job.not_before = JobState.QUEUED, None, None, now
        job.attempts = max(job.attempts - 1, 0)
        log_event(session, EventKind.RELEASED, reason, study_uid=job.study_uid, job_id=job.id, at=now)
        return True


class RefusedError(Exception):
    """An operator's request the queue cannot carry out; the message says why."""


def cancel(sessions: sessionmaker, job_id: int) -> None:
    """Operator cancel of a queued, failed or awaiting-review job: it will not run again, and its pending
    deliveries are cancelled with it. A running job is refused (its worker may be sending)."""
    now = utcnow()
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise RefusedError(f"no job {job_id}")
        cancelled = session.execute(  # compare-and-set: a worker may claim the job meanwhile
            update(Job)
            .where(Job.id == job_id, Job.state.in_((JobState.QUEUED, JobState.FAILED, JobState.AWAITING_REVIEW)))
            .values(state=JobState.CANCELLED, finished_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount
        if cancelled != 1:
            session.refresh(job)
            raise RefusedError(_not_cancellable(job))
        dropped = session.execute(
            update(Delivery)
            .where(Delivery.job_id == job_id,
                   Delivery.state.in_((DeliveryState.PENDING, DeliveryState.CONFIRMING)))
            .values(state=DeliveryState.CANCELLED, updated_at=now)
        ).rowcount
        log_event(
            session,
            EventKind.CANCELLED,
            "by operator" + (f"; {dropped} pending deliveries cancelled" if dropped else ""),
            study_uid=job.study_uid,
            job_id=job_id,
            at=now,
        )


def _not_cancellable(job: Job) -> str:
    if job.state == JobState.RUNNING:
        return (
            f"job {job.id} is running (worker {job.lease_owner}) and may be sending results: "
            "cancel it once it has finished or gone back to the queue"
        )
    return f"job {job.id} is {job.state}: only queued, failed or awaiting-review jobs can be cancelled"


def prioritize(sessions: sessionmaker, job_id: int, priority: Priority, by: str = "operator") -> str:
    """Change a job's priority (an event in its timeline); returns the one it had. A queued job is
    claimed by it from now on; a running or failed one when it goes back to the queue. A job that
    succeeded or was cancelled is refused: it will not be claimed again."""
    priority = Priority(priority)
    now = utcnow()
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise RefusedError(f"no job {job_id}")
        if job.state in (JobState.SUCCEEDED, JobState.CANCELLED):
            raise RefusedError(f"job {job_id} is {job.state}: it will not run again (`dicomnode jobs requeue "
                               f"{job.study_uid} --priority {priority}` makes a new job)")
        was = job.priority
        if was == priority:
            return was
        changed = session.execute(  # compare-and-set: a worker may claim or finish it meanwhile
            update(Job).where(Job.id == job_id, Job.priority == was,
                              Job.state.notin_((JobState.SUCCEEDED, JobState.CANCELLED)))
            .values(priority=priority.value).execution_options(synchronize_session=False)
        ).rowcount
        if changed != 1:
            raise RefusedError(f"job {job_id} changed meanwhile; try again")
        log_event(session, EventKind.PRIORITIZED, f"{priority} (was {was}) by {by}", study_uid=job.study_uid,
                  job_id=job_id, at=now, data={"priority": priority.value, "was": was})
        return was


def requeue(sessions: sessionmaker, study_uid: str, model: str, policy: RetryPolicy,
            priority: Priority = Priority.NORMAL, priority_reason: str = "") -> int:
    """Operator re-run of a study with a model: a new job with the next run number (its results
    go into new series), even when an earlier run succeeded. Refused while a job of the study
    for the model is queued or running."""
    with sessions() as session:
        if session.get(Study, study_uid) is None:
            raise RefusedError(f"no study {study_uid} in the index")
        active = session.scalar(
            select(Job).where(
                Job.study_uid == study_uid, Job.model == model, Job.state.in_((JobState.QUEUED, JobState.RUNNING))
            )
        )
        if active is not None:
            raise RefusedError(f"job {active.id} of study {study_uid} for model {model} is already {active.state}")
    return enqueue(sessions, study_uid, model, policy, "requeued by operator", priority=priority,
                   priority_reason=priority_reason)
