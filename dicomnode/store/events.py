"""The event log: every state change of a study or a job, in order, as a row of the `events`
table. This is the timeline `dicomnode jobs show` prints and what `/metrics` and `status` count.

Every kind of event is an `EventKind`; no module writes a kind as a bare string. A message is
prose for people: a number another module needs is stored beside it as data
(`log_event(..., data=...)`), never parsed back out of the message.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.store.tables import Event, Job, utcnow


class EventKind(StrEnum):
    """What happened; stored as its value (the names `dicomnode jobs show` prints)."""

    # a study, before any job
    STUDY_RECEIVED = "study-received"
    INCOMPLETE = "incomplete"  # quiet, but not ready for a model: why (said once per arrival)
    ASSEMBLY_FAILED = "assembly-failed"  # the study could not be checked: why (said once per arrival)
    PURGED = "purged"  # retention removed its files
    FETCHED = "fetched"  # retrieved from a source ([[sources]]) by `dicomnode fetch`: how, how many
    FETCHED_AS_PRIOR = "fetched-as-prior"  # retrieved as a job's prior study: it gets no job of its own
    # a job: the queue
    QUEUED = "queued"
    SERIES_VERDICT = "series-verdict"  # one per series of the study, written with the job
    STARTED = "started"
    SUCCEEDED = "succeeded"
    RETRY_SCHEDULED = "retry-scheduled"
    FAILED = "failed"
    LEASE_EXPIRED = "lease-expired"
    WORKER_GONE = "worker-gone"  # its worker process on this host is not running: re-queued at once
    WAITING = "waiting"  # inputs not ready yet (a transient cause): re-queued, the attempt not counted
    WOKEN = "woken"  # a waiting job made runnable now: the job it waited for has ended
    RELEASED = "released"
    RETRY_REQUESTED = "retry-requested"
    CANCELLED = "cancelled"
    DELIVERY_PENDING = "delivery-pending"  # results ready, deliveries backing off: the job waits
    PRIORITIZED = "prioritized"  # its priority changed by an operator (data: priority, was)
    HELD_BACK = "held-back"  # a job made failed at once: its study was held back past status_after_hours
    # a job: the review gate ([[models]] review = true; dicomnode.pipeline.review)
    HELD_FOR_REVIEW = "held-for-review"  # results built, nothing sent: awaiting a reader (data: measures, files)
    REVIEW_RELEASED = "review-released"  # released by a reader (data: by, at): the SR made VERIFIED, then delivered
    REVIEW_REJECTED = "review-rejected"  # rejected by a reader (data: by, reason): nothing sent but the status SR
    # a job: its work
    PRIOR_USED = "prior-used"  # [models.priors]: the prior study fetched (or already held) for the job
    NO_PRIOR = "no-prior"  # [models.priors]: no prior study to fetch, and why
    # [models.compare]: the follow-up's prior, the chained models' label maps, the comparison
    COMPARE_PRIOR = "compare-prior"  # the prior chosen: its UID, date, how (processed / held / fetched), its job
    NO_COMPARE_PRIOR = "no-compare-prior"  # no prior to compare with, and why (data: reason)
    LABELS_FROM_MODEL = "labels-from-model"  # another model's label map on this study used (liver_from): which job
    NO_LABELS_FROM_MODEL = "no-labels-from-model"  # that label map is not to be had (not configured, failed): why
    TIMEPOINT_SAVED = "timepoint-saved"  # the job's time point kept for a later comparison
    COMPARED = "compared"  # the comparison with the prior (data: comparison, lines)
    NOT_COMPARED = "not-compared"  # no comparison in the results, and why
    INPUTS_BUILT = "inputs-built"
    INFERENCE_DONE = "inference-done"
    LABELS_REUSED = "labels-reused"
    MEASURED = "measured"
    RESULTS_WRITTEN = "results-written"
    RESULTS_REUSED = "results-reused"
    STEP_TIMES = "step-times"  # where the job's time went: seconds per step (data: seconds, besides_inference)
    # a job: its deliveries
    DELIVERIES_PLANNED = "deliveries-planned"
    DELIVERED = "delivered"
    DELIVERY_FAILED = "delivery-failed"
    FALLBACK_PLANNED = "fallback-planned"
    STATUS_WRITTEN = "status-written"  # a job without results: its "not performed" status SR written (UID, series)
    # a job: proof of delivery (a destination's verify)
    COMMITMENT_REQUESTED = "commitment-requested"  # N-ACTION sent: the transaction, the objects
    COMMITMENT_REPORTED = "commitment-reported"  # N-EVENT-REPORT received: committed and failed objects
    CONFIRMED = "delivery-confirmed"  # the destination holds the object (commitment or query)
    UNCONFIRMED = "delivery-unconfirmed"  # not committed, missing, or no report in time: sent again, or failed
    # a job: its notifications ([[notify]] targets, dicomnode.pipeline.notify)
    NOTIFIED = "notified"  # a target took a notification (data: target, event, attempts)
    NOTIFY_FAILED = "notify-failed"  # a try failed (data: target, event, given_up): tried again, or given up


# What `dicomnode status` lists as the last errors.
ERROR_KINDS = (EventKind.FAILED, EventKind.RETRY_SCHEDULED, EventKind.DELIVERY_FAILED, EventKind.LEASE_EXPIRED,
               EventKind.ASSEMBLY_FAILED, EventKind.UNCONFIRMED, EventKind.NOTIFY_FAILED)


def log_event(session: Session, kind: EventKind, message: str = "", *, study_uid: str | None = None,
              job_id: int | None = None, at: datetime | None = None, data: dict | None = None) -> None:
    """Add an event to `session` (written with the caller's transaction); `data`: what another
    module reads back (JSON), e.g. an inference's seconds."""
    session.add(Event(at=at or utcnow(), study_uid=study_uid, job_id=job_id, kind=EventKind(kind).value,
                      message=message, data=json.dumps(data) if data is not None else None))


def record_job_event(sessions: sessionmaker, job: Job, kind: EventKind, message: str, logger: logging.Logger, *,
                     data: dict | None = None) -> None:
    """Write one event of `job` in its own transaction and say it in `logger`'s log."""
    with sessions.begin() as session:
        log_event(session, kind, message, study_uid=job.study_uid, job_id=job.id, data=data)
    logger.info("job %d study %s: %s %s", job.id, job.study_uid, kind, message)


def event_data(event: Event | str | None) -> dict:
    """An event's data (or the `data` column's text) as a dict; {} when it has none."""
    text = event.data if isinstance(event, Event) else event
    return json.loads(text) if text else {}


def fetched_as_prior(sessions: sessionmaker, study_uid: str) -> bool:
    """Whether the study was fetched as some job's prior ([models.priors], [models.compare]: the
    assembler queues no job for it; a comparison queues its own compute-only job). Here, not in
    pipeline/priors, so the receiver's sweep does not load the fetching code."""
    with sessions() as session:
        found = session.scalar(select(Event.id).where(Event.study_uid == study_uid,
                                                      Event.kind == EventKind.FETCHED_AS_PRIOR.value).limit(1))
    return found is not None
