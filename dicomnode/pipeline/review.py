"""The review gate ([[models]] review = true): a job's results are built and held until a reader
releases or rejects them, with the CLI (`dicomnode review ...`), no web stack.

    running --results built, none planned for delivery--> awaiting-review (event held-for-review)
    awaiting-review --release JOB --by NAME--> queued (event review-released; reviewed_by/at set):
        the worker claims it, makes the SR VERIFIED (Verifying Observer NAME, the site's
        organization, the time of release) and delivers the objects as usual, once
    awaiting-review --reject JOB --by NAME --reason TEXT--> rejected (event review-rejected): no
        result object is ever planned for delivery; the worker's periodic pass sends the "not
        performed" status SR (dicomnode.pipeline.notperformed) with the reason and the reader
        to each destination that wants it

Release and reject are compare-and-set updates of the job's row: two readers (or a reader and
a `jobs cancel`) cannot both decide, and a job not awaiting review is refused with the reason.
The state is in the database, so a held job waits across restarts; a release written while the
node runs is claimed by its worker within a poll (about a second). The CLI writes only the
database: the worker, which owns the result files, rewrites the SR.

The released SR keeps its SOP Instance UID (README, "Review gate"): the UNVERIFIED instance was
never sent nor released outside the node, so no other instance with that UID exists anywhere.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from dicomnode.config import ModelSettings, NotifyEvent, OutputKind
from dicomnode.pipeline import notify
from dicomnode.pipeline.queue import RefusedError
from dicomnode.results.verification import verify_sr
from dicomnode.results.writer import RESULT_FILES
from dicomnode.store.events import EventKind, log_event
from dicomnode.store.tables import Delivery, Job, JobState, utcnow

log = logging.getLogger("dicomnode.processing")

PREVIEW_FILE = "preview.png"  # the PET MIP with the lesions outlined, written for a reader to look at
MAX_NAME = 64  # a PN component group, and the reviewed_by column


def found_in(out: Path) -> str:
    """What a job found in one line, from the measures.json of its result folder `out`."""
    try:
        measures = json.loads((out / "measures.json").read_text())
    except (OSError, ValueError):
        return "no measures.json"
    if isinstance(measures, dict) and "lesion_count" in measures:
        return (f"{measures['lesion_count']} lesions, MTV {measures.get('total_mtv_ml', 0):.1f} ml, "
                f"TLG {measures.get('total_tlg_g', 0):.1f} g")
    if isinstance(measures, list):
        return "; ".join(f"{m.get('name')} {m.get('volume_ml', 0):.1f} ml" for m in measures)
    return "no measures in measures.json"


def held_for_review(sessions: sessionmaker, settings: ModelSettings, job: Job) -> bool:
    """Whether this run must hold the job's results: its model asks for review, nobody has
    released it yet, and none of its result objects was planned for delivery (a job already
    delivering when review was turned on finishes as it started)."""
    if not settings.review or job.reviewed_at is not None:
        return False
    with sessions() as session:
        planned = session.scalar(select(Delivery.id).where(Delivery.job_id == job.id).limit(1))
    return planned is None


def hold(sessions: sessionmaker, job_id: int, owner: str, message: str, data: dict | None = None,
         now: datetime | None = None) -> bool:
    """A running job (under `owner`'s lease) whose results are built waits for a reader:
    awaiting-review, the attempt not counted (the results are kept and reused). False when the
    job is no longer ours."""
    now = now or utcnow()
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.RUNNING or job.lease_owner != owner:
            return False
        job.state, job.lease_owner, job.lease_expires_at, job.error = JobState.AWAITING_REVIEW, None, None, None
        job.attempts = max(job.attempts - 1, 0)
        log_event(session, EventKind.HELD_FOR_REVIEW, message, study_uid=job.study_uid, job_id=job.id, at=now,
                  data=data)
        notify.enqueue(session, NotifyEvent.HELD_FOR_REVIEW, job, reason=message, now=now)
        return True


def check_reader(by: str) -> str:
    """The reader's name as given, checked: it becomes a DICOM PN (Verifying Observer Name)."""
    name = by.strip()
    if not name:
        raise RefusedError("--by needs the reader's name")
    if len(name) > MAX_NAME:
        raise RefusedError(f"--by {name!r} is longer than {MAX_NAME} characters")
    if any(c in name for c in "\\=") or any(ord(c) < 32 for c in name):
        raise RefusedError(f"--by {name!r}: no backslash, '=' or control characters (a DICOM person name); "
                           "use 'Family^Given' or plain words")
    return name


def release(sessions: sessionmaker, job_id: int, by: str, now: datetime | None = None) -> Job:
    """A reader releases the held results: the job is queued again at once, its release recorded
    (reviewed_by, reviewed_at; event review-released). RefusedError unless it awaits review."""
    name = check_reader(by)
    now = now or utcnow()
    with sessions.begin() as session:
        job = _decide(session, job_id, dict(state=JobState.QUEUED, not_before=now, reviewed_by=name,
                                            reviewed_at=now))
        log_event(session, EventKind.REVIEW_RELEASED, f"released by {name}: the SR is made VERIFIED, then delivered",
                  study_uid=job.study_uid, job_id=job.id, at=now, data={"by": name, "at": now.isoformat()})
        return job


def reject(sessions: sessionmaker, job_id: int, by: str, reason: str, now: datetime | None = None) -> Job:
    """A reader rejects the held results: the job is rejected (final), no result object is sent;
    the destinations that want STATUS get the "not performed" status SR with `reason` and the
    reader (the worker's next status pass). RefusedError unless it awaits review."""
    name = check_reader(by)
    reason = " ".join(reason.split())
    if not reason:
        raise RefusedError("--reason needs a text: why the results are rejected")
    now = now or utcnow()
    error = f"results rejected at review by {name}: {reason}"
    with sessions.begin() as session:
        job = _decide(session, job_id, dict(state=JobState.REJECTED, finished_at=now, error=error,
                                            reviewed_by=name, reviewed_at=now))
        log_event(session, EventKind.REVIEW_REJECTED, f"rejected by {name}: {reason}", study_uid=job.study_uid,
                  job_id=job.id, at=now, data={"by": name, "reason": reason})
        notify.enqueue(session, NotifyEvent.JOB_FAILED, job, reason=error, now=now)  # ended without results sent
        return job


def _decide(session, job_id: int, values: dict) -> Job:  # noqa: ANN001 - a Session
    job = session.get(Job, job_id)
    if job is None:
        raise RefusedError(f"no job {job_id}")
    changed = session.execute(  # compare-and-set: another reader may decide meanwhile
        update(Job).where(Job.id == job_id, Job.state == JobState.AWAITING_REVIEW).values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount
    session.refresh(job)
    if changed != 1:
        raise RefusedError(_not_awaiting(job))
    return job


def _not_awaiting(job: Job) -> str:
    when = f"{job.reviewed_at:%Y-%m-%d %H:%M:%S} UTC" if job.reviewed_at else ""
    if job.state == JobState.REJECTED:
        return f"job {job.id} is not awaiting review: rejected by {job.reviewed_by} at {when}"
    if job.reviewed_by:
        return f"job {job.id} is not awaiting review: released by {job.reviewed_by} at {when} (now {job.state})"
    return f"job {job.id} is not awaiting review (it is {job.state})"


def awaiting(sessions: sessionmaker) -> list[Job]:
    """The jobs awaiting review, oldest first."""
    with sessions() as session:
        return list(session.scalars(select(Job).where(Job.state == JobState.AWAITING_REVIEW).order_by(Job.id)))


def verify_released(sessions: sessionmaker, job: Job, out: Path, organization: str = "") -> bool:
    """Before a released job's objects are sent: its SR made VERIFIED by the reader who released
    it, at the time of release (once: a later attempt finds it verified). True when written now."""
    path = out / RESULT_FILES[OutputKind.SR]
    if job.reviewed_at is None or not job.reviewed_by or not path.exists():
        return False
    written = verify_sr(path, job.reviewed_by, organization, job.reviewed_at)
    if written:
        with sessions.begin() as session:
            log_event(session, EventKind.RESULTS_WRITTEN,
                      f"{path.name} made VERIFIED (Verifying Observer {job.reviewed_by}"
                      + (f", {organization}" if organization else "") + "), same SOP Instance UID",
                      study_uid=job.study_uid, job_id=job.id)
    return written
