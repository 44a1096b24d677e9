"""Storage commitment transactions (verify = "commitment"), by Transaction UID: the worker that
sent the N-ACTION opens one (`opened`), and the report (N-EVENT-REPORT) is written here by
whichever process receives it: the worker itself when the destination answers on the same
association, the receiver when it opens a new one to the node (`record_report`). Writing a report
wakes the job that waits for it (its not_before set to now), so the worker applies it at once
instead of at the report's deadline.

Failure Reasons (PS3.3 C.14.1.1) are kept as numbers; `failure_reason` names them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.store.events import EventKind, log_event
from dicomnode.store.tables import Commitment, Job, JobState, utcnow

log = logging.getLogger("dicomnode.commitment")

FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}


def failure_reason(code: int | None) -> str:
    if code is None:
        return "no failure reason given"
    return f"0x{code:04X} ({FAILURE_REASONS.get(code, 'failure')})"


@dataclass(frozen=True)
class Report:
    """What an N-EVENT-REPORT of the Storage Commitment Push Model said."""

    transaction_uid: str
    committed: tuple[str, ...] = ()  # SOP Instance UIDs (ReferencedSOPSequence)
    failed: dict[str, int | None] = field(default_factory=dict)  # FailedSOPSequence: UID -> Failure Reason


def opened(session: Session, transaction_uid: str, job_id: int, destination: str, at: datetime) -> None:
    """A commitment request about to be sent (written with the deliveries it covers)."""
    session.add(Commitment(transaction_uid=transaction_uid, job_id=job_id, destination=destination,
                           requested_at=at))


def record_report(sessions: sessionmaker, report: Report, reported_by: str, at: datetime | None = None) -> int | None:
    """Write a report received from `reported_by` (a calling AE title) and wake its job; returns
    the job's id, None for a transaction the node never opened (logged, kept nowhere) or one
    already reported (the first report counts)."""
    at = at or utcnow()
    with sessions.begin() as session:
        row = session.get(Commitment, report.transaction_uid, with_for_update=True)
        if row is None:
            log.warning("storage commitment report from %s for transaction %s, which this node never requested",
                        reported_by, report.transaction_uid)
            return None
        if row.reported_at is not None:
            log.info("storage commitment report from %s for transaction %s again: the first one counts",
                     reported_by, report.transaction_uid)
            return None
        row.reported_at, row.reported_by = at, reported_by
        row.committed = json.dumps(list(report.committed))
        row.failed = json.dumps(report.failed)
        job = session.get(Job, row.job_id)
        failures = ", ".join(f"{uid}: {failure_reason(code)}" for uid, code in report.failed.items())
        log_event(session, EventKind.COMMITMENT_REPORTED,
                  f"transaction {report.transaction_uid} from {reported_by} ({row.destination}): "
                  f"{len(report.committed)} committed, {len(report.failed)} failed"
                  + (f": {failures}" if failures else ""),
                  study_uid=job.study_uid if job else None, job_id=row.job_id, at=at,
                  data={"transaction_uid": report.transaction_uid, "committed": len(report.committed),
                        "failed": len(report.failed)})
        session.execute(update(Job).where(Job.id == row.job_id, Job.state == JobState.QUEUED).values(not_before=at)
                        .execution_options(synchronize_session=False))
        job_id = row.job_id
    log.info("storage commitment report for transaction %s from %s: %d committed, %d failed (job %d)",
             report.transaction_uid, reported_by, len(report.committed), len(report.failed), job_id)
    return job_id


def reports(session: Session, transaction_uids: set[str]) -> dict[str, Commitment]:
    """The reported transactions among `transaction_uids`."""
    if not transaction_uids:
        return {}
    rows = session.scalars(select(Commitment).where(Commitment.transaction_uid.in_(transaction_uids),
                                                    Commitment.reported_at.is_not(None)))
    return {row.transaction_uid: row for row in rows}


def committed_of(row: Commitment) -> set[str]:
    return set(json.loads(row.committed or "[]"))


def failed_of(row: Commitment) -> dict[str, int | None]:
    return dict(json.loads(row.failed or "{}"))
