"""Deliveries: every result object of a job to every destination, each with its own state,
retries with backoff and events. The database side only; the network side is
dicomnode.net.sender.store_each and the orchestration is dicomnode.processing.deliver.

    pending --stored--> sent
       |  ^
       |  +-- a transient failure with attempts left: not_before = now + backoff
       +--> failed (attempts used up, or refused for good: e.g. no presentation context
                    for the SOP class)
                 |
                 +--the destination has a fallback--> replaced (its error kept; the fallback
                    object, e.g. the secondary capture, is planned to the destination instead)

    A destination that verifies (verify = "commitment" or "query") confirms what it stored:
    sent --commitment requested--> confirming --committed in the report--> confirmed
    sent --found by C-FIND / QIDO-RS--> confirmed
    confirming or sent --not committed (Failure Reason), not found, no report by confirm_by,
        request refused--> pending again (the same file and SOP Instance UID, after the backoff
        of its attempts so far), or failed at the retry policy's horizon, with the reason

A job succeeds once every one of its deliveries is sent or replaced and fails once none is
pending and one failed. The "not performed" status SR (status.dcm, dicomnode.pipeline.notperformed)
is planned and retried here like a result object, but it is a delivery of a job that ended
without results: `due`, `summary` and `sent_to` leave it out unless asked (status=True), so it
never holds up, verifies with, or fails a job's results. While some wait for their backoff the
job waits in the queue (queue.defer), so a PACS that is down never holds the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

from pydicom import dcmread
from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from dicomnode.config import OutputKind
from dicomnode.net.sender import Outcome
from dicomnode.pipeline import notify
from dicomnode.pipeline.queue import RetryPolicy
from dicomnode.results.writer import RESULT_FILES
from dicomnode.store import commitments
from dicomnode.store.events import EventKind, log_event
from dicomnode.store.tables import Delivery, DeliveryState, utcnow

STATUS_FILE = RESULT_FILES[OutputKind.STATUS]


def is_status(delivery: Delivery) -> bool:
    """Whether `delivery` sends the job's "not performed" status SR rather than a result object."""
    return Path(delivery.path).name == STATUS_FILE


@dataclass(frozen=True)
class Summary:
    """Where a job's deliveries stand. `pending` counts every delivery not settled yet: those to
    send, and those sent to a destination that verifies and not confirmed yet (`confirming`)."""

    pending: int
    sent: int  # settled by the destination's answer alone (verify = "none")
    failed: tuple[str, ...]  # one line per failed delivery: the object, the destination, why
    next_due: datetime | None  # the earliest not_before of a pending delivery
    waiting: tuple[str, ...] = ()  # the last error of each pending delivery that has one
    replaced: tuple[str, ...] = ()  # one line per delivery replaced by a fallback: the object, the destination, why
    confirmed: int = 0  # sent and confirmed by the destination
    confirming: int = 0  # sent, the destination's confirmation awaited (among `pending`)

    @property
    def total(self) -> int:
        return self.pending + self.sent + self.confirmed + len(self.failed) + len(self.replaced)


def describe(delivery: Delivery) -> str:
    """'seg.dcm (Segmentation Storage 1.2.3...) to pacs': the object and the destination."""
    kind = UID(delivery.sop_class_uid).name or delivery.sop_class_uid
    return f"{Path(delivery.path).name} ({kind} {delivery.sop_instance_uid}) to {delivery.destination}"


def plan(
    sessions: sessionmaker, job_id: int, study_uid: str, files: Sequence[Path], destinations: Sequence[str],
    policy: RetryPolicy, now: datetime | None = None,
) -> int:
    """One pending delivery per file per destination, for those the job does not have yet
    (idempotent: a job run again after a crash plans nothing twice). Returns how many were added."""
    now = now or utcnow()
    headers = [_header(path) for path in files]
    added: list[str] = []
    with sessions.begin() as session:
        have = {(row.destination, row.sop_instance_uid) for row in session.execute(
            select(Delivery.destination, Delivery.sop_instance_uid).where(Delivery.job_id == job_id)
        )}
        for destination in destinations:
            for header in headers:
                if (destination, header[1]) in have:
                    continue
                session.add(_pending(job_id, destination, header, policy, now))
                added.append(f"{header[0].name} to {destination}")
        if added:
            log_event(
                session, EventKind.DELIVERIES_PLANNED, ", ".join(added), study_uid=study_uid, job_id=job_id, at=now
            )
    return len(added)


def replace(
    sessions: sessionmaker,
    delivery_id: int,
    fallback: Path,
    policy: RetryPolicy,
    *,
    study_uid: str | None = None,
    now: datetime | None = None,
) -> int | None:
    """A delivery refused for good becomes `replaced` (its error kept) and `fallback`, another
    result file of the job, is planned to the same destination instead, once (a second refused
    object of that destination shares it). Returns the fallback delivery's id; None when the
    delivery is not failed."""
    now = now or utcnow()
    header = _header(fallback)
    with sessions.begin() as session:
        refused = session.get(Delivery, delivery_id)
        if refused is None or refused.state != DeliveryState.FAILED:
            return None
        planned = session.scalar(
            select(Delivery).where(
                Delivery.job_id == refused.job_id,
                Delivery.destination == refused.destination,
                Delivery.sop_instance_uid == header[1],
            )
        )
        if planned is None:
            planned = _pending(refused.job_id, refused.destination, header, policy, now)
            session.add(planned)
            session.flush()
        refused.state, refused.updated_at = DeliveryState.REPLACED, now
        log_event(
            session,
            EventKind.FALLBACK_PLANNED,
            f"{describe(refused)} refused for good ({refused.last_error}): "
            f"{Path(fallback).name} to {refused.destination} instead",
            study_uid=study_uid,
            job_id=refused.job_id,
            at=now,
        )
        return planned.id


def _header(path: Path) -> tuple[Path, str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return Path(path), str(ds.SOPInstanceUID), str(ds.SOPClassUID)


def _pending(
    job_id: int, destination: str, header: tuple[Path, str, str], policy: RetryPolicy, now: datetime
) -> Delivery:
    path, sop_instance_uid, sop_class_uid = header
    return Delivery(
        job_id=job_id,
        destination=destination,
        path=str(path),
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class_uid,
        state=DeliveryState.PENDING,
        attempts=0,
        max_attempts=policy.max_attempts,
        not_before=now,
        give_up_at=policy.give_up_at(now),
        created_at=now,
        updated_at=now,
    )


def of_job(sessions: sessionmaker, job_id: int) -> list[Delivery]:
    with sessions() as session:
        return list(session.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)))


def due(sessions: sessionmaker, job_id: int, now: datetime | None = None, *, status: bool = False) -> list[Delivery]:
    """The job's pending deliveries whose backoff is over, in the order they were planned: its
    result objects' (status=False) or its status SR's (status=True)."""
    now = now or utcnow()
    with sessions() as session:
        rows = session.scalars(
            select(Delivery)
            .where(Delivery.job_id == job_id, Delivery.state == DeliveryState.PENDING, Delivery.not_before <= now)
            .order_by(Delivery.id)
        )
        return [d for d in rows if is_status(d) == status]


def record(
    sessions: sessionmaker,
    delivery_id: int,
    outcome: Outcome,
    policy: RetryPolicy,
    *,
    study_uid: str | None = None,
    now: datetime | None = None,
) -> str:
    """Write what one send did to a delivery, with its event; return the delivery's new state.

    Every C-STORE try counts as an attempt (an association that could not be opened counts
    as one); a transient failure backs off by `policy` (doubled per attempt, capped) until the
    delivery's give_up_at (or its max_attempts, when it has one); then it has failed for good."""
    now = now or utcnow()
    with sessions.begin() as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None or delivery.state != DeliveryState.PENDING:
            return delivery.state if delivery else "missing"
        delivery.attempts += max(outcome.tries, 1)
        delivery.updated_at = now
        what = describe(delivery)
        tally = f"attempt {delivery.attempts}" + (f" of {delivery.max_attempts}" if delivery.max_attempts else "")
        if outcome.ok:
            delivery.state, delivery.sent_at, delivery.last_error = DeliveryState.SENT, now, None
            before = f"; failed tries before: {', '.join(outcome.failed_tries)}" if outcome.failed_tries else ""
            status = f"status 0x{outcome.status:04X}" if outcome.status is not None else "stored"
            kind, message = EventKind.DELIVERED, f"{what}: {status}, {tally}{before}"
        else:
            delivery.last_error = outcome.error
            if outcome.permanent:
                delivery.state = DeliveryState.FAILED
                kind, message = (
                    EventKind.DELIVERY_FAILED,
                    f"{what}: {outcome.error}; refused for good, not retried ({tally})",
                )
            elif not policy.attempts_left(delivery.attempts, delivery.max_attempts):
                delivery.state = DeliveryState.FAILED
                kind, message = EventKind.DELIVERY_FAILED, f"{what}: {outcome.error}; no attempts left ({tally})"
            elif delivery.give_up_at is not None and now >= delivery.give_up_at:
                delivery.state = DeliveryState.FAILED
                hours = (now - delivery.created_at).total_seconds() / 3600
                kind, message = (
                    EventKind.DELIVERY_FAILED,
                    f"{what}: {outcome.error}; gave up after {hours:.1f} h of tries (delivery_give_up_hours, {tally})",
                )
                delivery.last_error = f"{outcome.error}; gave up after {hours:.1f} h (delivery_give_up_hours)"
            else:
                delivery.not_before = now + policy.delay(delivery.attempts)
                kind, message = (
                    EventKind.DELIVERY_FAILED,
                    f"{what}: {outcome.error}; {tally}, next try after {delivery.not_before:%H:%M:%S} UTC",
                )
        log_event(session, kind, message, study_uid=study_uid, job_id=delivery.job_id, at=now)
        if delivery.state == DeliveryState.FAILED:
            notify.delivery_failed(session, delivery, now)
        return delivery.state


def summary(sessions: sessionmaker, job_id: int, verifying: frozenset[str] = frozenset(), *,
            status: bool = False) -> Summary:
    """`verifying`: the destinations that confirm (a sent delivery to one is not settled yet);
    `status`: of the status SR's deliveries instead of the result objects'."""
    rows = [d for d in of_job(sessions, job_id) if is_status(d) == status]
    pending = [d for d in rows if d.state == DeliveryState.PENDING]
    confirming = [d for d in rows if d.state == DeliveryState.CONFIRMING
                  or (d.state == DeliveryState.SENT and d.destination in verifying)]
    due = [d.not_before for d in pending] + [d.confirm_by or utcnow() for d in confirming]
    return Summary(
        pending=len(pending) + len(confirming),
        sent=sum(d.state == DeliveryState.SENT and d.destination not in verifying for d in rows),
        failed=tuple(f"{describe(d)}: {d.last_error}" for d in rows if d.state == DeliveryState.FAILED),
        next_due=min(due, default=None),
        waiting=tuple(f"{describe(d)}: {d.last_error}" for d in pending if d.last_error)
        + tuple(f"{describe(d)}: {_awaited(d)}" for d in confirming),
        replaced=tuple(f"{describe(d)}: {d.last_error}" for d in rows if d.state == DeliveryState.REPLACED),
        confirmed=sum(d.state == DeliveryState.CONFIRMED for d in rows),
        confirming=len(confirming),
    )


def _awaited(d: Delivery) -> str:
    if d.state == DeliveryState.CONFIRMING and d.confirm_by is not None:
        return (f"storage commitment report for transaction {d.transaction_uid} awaited until "
                f"{d.confirm_by:%H:%M:%S} UTC")
    return "sent, not confirmed yet"


# ---------------------------------------------------------------- proof of delivery (verify)


def sent_to(sessions: sessionmaker, job_id: int, destination: str) -> list[Delivery]:
    """The job's deliveries to `destination` that are sent and not yet confirmed nor being confirmed."""
    with sessions() as session:
        rows = session.scalars(
            select(Delivery).where(Delivery.job_id == job_id, Delivery.destination == destination,
                                   Delivery.state == DeliveryState.SENT).order_by(Delivery.id))
        return [d for d in rows if not is_status(d)]  # the status SR is not verified


def commitment_requested(
    sessions: sessionmaker, job_id: int, destination: str, transaction_uid: str, delivery_ids: Sequence[int],
    confirm_by: datetime, *, study_uid: str | None = None, now: datetime | None = None,
) -> None:
    """Before the N-ACTION goes out (its report may come at once, to another process): the
    transaction is opened and the deliveries are `confirming` until `confirm_by`."""
    now = now or utcnow()
    with sessions.begin() as session:
        commitments.opened(session, transaction_uid, job_id, destination, now)
        rows = [session.get(Delivery, i) for i in delivery_ids]
        for d in rows:
            d.state, d.transaction_uid, d.confirm_by = DeliveryState.CONFIRMING, transaction_uid, confirm_by
            d.updated_at = now
        log_event(session, EventKind.COMMITMENT_REQUESTED,
                  f"transaction {transaction_uid} to {destination}: {', '.join(Path(d.path).name for d in rows)}; "
                  f"report awaited until {confirm_by:%H:%M:%S} UTC",
                  study_uid=study_uid, job_id=job_id, at=now,
                  data={"transaction_uid": transaction_uid, "objects": len(rows)})


def confirm(sessions: sessionmaker, delivery_id: int, how: str, *, study_uid: str | None = None,
            now: datetime | None = None) -> str:
    """The destination holds the object: `confirmed` (from sent or confirming)."""
    now = now or utcnow()
    with sessions.begin() as session:
        d = session.get(Delivery, delivery_id)
        if d is None or d.state not in (DeliveryState.SENT, DeliveryState.CONFIRMING):
            return d.state if d else "missing"
        _confirm(session, d, how, study_uid, now)
        return d.state


def unconfirmed(sessions: sessionmaker, delivery_id: int, reason: str, policy: RetryPolicy, *,
                study_uid: str | None = None, now: datetime | None = None) -> str:
    """The destination does not confirm the object: sent again (pending) or failed; the new state."""
    now = now or utcnow()
    with sessions.begin() as session:
        d = session.get(Delivery, delivery_id)
        if d is None or d.state not in (DeliveryState.SENT, DeliveryState.CONFIRMING):
            return d.state if d else "missing"
        _unconfirm(session, d, reason, policy, study_uid, now)
        return d.state


def apply_reports(sessions: sessionmaker, job_id: int, policy: RetryPolicy, *, study_uid: str | None = None,
                  now: datetime | None = None) -> int:
    """Settle the job's `confirming` deliveries whose report came (committed: confirmed; failed or
    left out: pending again) or is overdue (pending again). Returns how many changed."""
    now = now or utcnow()
    changed = 0
    with sessions.begin() as session:
        waiting = list(session.scalars(select(Delivery).where(Delivery.job_id == job_id,
                                                              Delivery.state == DeliveryState.CONFIRMING)))
        reported = commitments.reports(session, {d.transaction_uid for d in waiting if d.transaction_uid})
        for d in waiting:
            row = reported.get(d.transaction_uid)
            if row is not None:
                failed = commitments.failed_of(row)
                if d.sop_instance_uid in commitments.committed_of(row) and d.sop_instance_uid not in failed:
                    _confirm(session, d, f"committed by {row.reported_by} (transaction {d.transaction_uid})",
                             study_uid, now, at=row.reported_at)
                elif d.sop_instance_uid in failed:
                    _unconfirm(session, d, f"storage commitment failed at {d.destination}: "
                               f"{commitments.failure_reason(failed[d.sop_instance_uid])} "
                               f"(transaction {d.transaction_uid})", policy, study_uid, now)
                else:
                    _unconfirm(session, d, f"left out of {d.destination}'s storage commitment report "
                               f"(transaction {d.transaction_uid})", policy, study_uid, now)
                changed += 1
            elif d.confirm_by is not None and now >= d.confirm_by:
                _unconfirm(session, d, f"no storage commitment report from {d.destination} for transaction "
                           f"{d.transaction_uid} by {d.confirm_by:%H:%M:%S} UTC (verify_timeout_seconds)",
                           policy, study_uid, now)
                changed += 1
    return changed


def _confirm(session, d: Delivery, how: str, study_uid: str | None, now: datetime,  # noqa: ANN001 - a Session
             at: datetime | None = None) -> None:
    d.state, d.confirmed_at, d.updated_at, d.last_error = DeliveryState.CONFIRMED, at or now, now, None
    log_event(session, EventKind.CONFIRMED, f"{describe(d)}: {how}", study_uid=study_uid, job_id=d.job_id, at=now)


def _unconfirm(session, d: Delivery, reason: str, policy: RetryPolicy, study_uid: str | None,  # noqa: ANN001
               now: datetime) -> None:
    """Not confirmed: sent again after the backoff of the attempts so far (not one more: the next
    C-STORE counts), unless its attempts are used up or its horizon has passed."""
    what = describe(d)
    d.transaction_uid, d.confirm_by, d.updated_at = None, None, now
    if not policy.attempts_left(d.attempts, d.max_attempts):
        d.state, d.last_error = DeliveryState.FAILED, f"{reason}; no attempts left"
    elif d.give_up_at is not None and now >= d.give_up_at:
        hours = (now - d.created_at).total_seconds() / 3600
        d.state, d.last_error = DeliveryState.FAILED, f"{reason}; gave up after {hours:.1f} h (delivery_give_up_hours)"
    else:
        d.state, d.last_error = DeliveryState.PENDING, reason
        d.not_before = now + policy.delay(d.attempts)
        log_event(session, EventKind.UNCONFIRMED,
                  f"{what}: {reason}; sent again (same SOP Instance UID) after {d.not_before:%H:%M:%S} UTC",
                  study_uid=study_uid, job_id=d.job_id, at=now)
        return
    log_event(session, EventKind.UNCONFIRMED, f"{what}: {d.last_error}", study_uid=study_uid, job_id=d.job_id, at=now)
    log_event(session, EventKind.DELIVERY_FAILED, f"{what}: {d.last_error}", study_uid=study_uid, job_id=d.job_id,
              at=now)
    notify.delivery_failed(session, d, now)
