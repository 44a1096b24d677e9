""""AI not performed" in the study: a job that ends without results sends the destinations that
have "STATUS" among their outputs (the default) a small SR (dicomnode.results.status_sr) that says
which model did not run and why, in a series of its own.

A job ends without results when it is failed for good and none of its result objects was ever
planned for delivery: its input was refused, the model raised, its inputs never became ready
(job_give_up_hours), or its study was held back (a series missing or still arriving) longer than
[node] status_after_hours (the assembler then makes a job failed at once: queue.held_back); or
when a reader rejected its results at review (state rejected, dicomnode.pipeline.review: the
reason is "results rejected at review by NAME: TEXT"). A
job that wrote results and failed delivering them gets none: the model did run, and its result
deliveries say what failed.

Exactly once: the SR is written once into the job's result folder (status.dcm) with SOP Instance
and Series Instance UIDs derived from the job, so every try, every worker and every rewrite after
a crash send the same object; one delivery per destination (dicomnode.pipeline.delivery, the same
states, backoff and horizon as results, no fallback, no verify). The worker sends it right after
the job fails and `send_status_reports` (the worker's periodic pass) retries what is due. Nothing
here raises into the caller: a status SR never blocks or fails anything else.

Series number: result_series_number(STATUS, run, model position) = 900 + 10 per earlier run + 5
(+ 1000 per model before it), so a later successful run's SEG/SR (a higher run) come after it.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config, ModelSettings, OutputKind
from dicomnode.pipeline import delivery
from dicomnode.pipeline.dispatch import send_pass
from dicomnode.pipeline.job import model_fingerprint, result_dir
from dicomnode.pipeline.queue import RetryPolicy
from dicomnode.results.common import ResultError, write_dicom
from dicomnode.results.status_sr import build_status_sr
from dicomnode.results.writer import result_series_number
from dicomnode.store.events import EventKind, record_job_event
from dicomnode.store.tables import Instance, Job, JobState, utcnow

log = logging.getLogger("dicomnode.processing")

STATUS_FILE = delivery.STATUS_FILE
# failed for good, or rejected at review (dicomnode.pipeline.review: its results were never planned)
ENDED_WITHOUT_RESULTS = (JobState.FAILED, JobState.REJECTED)
MAX_EVIDENCE_SERIES = 64  # one instance per series of the study as the SR's evidence (patient, study)


def report_not_performed(config: Config, sessions: sessionmaker, job_id: int,
                         now: datetime | None = None) -> str | None:
    """For a job failed for good without results: its status SR written (once), planned to each
    destination that wants it (once) and the due deliveries sent. Returns what happened in a few
    words, or None when the job needs no status SR. Never raises: a problem is logged and an
    event of the job, and the next pass tries again."""
    try:
        return _report(config, sessions, job_id, now)
    except Exception as exc:  # noqa: BLE001 - the status SR never fails anything else
        log.exception("job %d: status SR not sent: %s", job_id, exc)
        return None


def send_status_reports(config: Config, sessions: sessionmaker, now: datetime | None = None) -> int:
    """The periodic pass: every job failed within the last delivery_give_up_hours gets its status
    SR written, planned and, when due, sent (report_not_performed). Returns how many jobs it
    sent something for."""
    now = now or utcnow()
    since = now - timedelta(hours=config.node.delivery_give_up_hours)
    with sessions() as session:
        ids = list(session.scalars(select(Job.id).where(Job.state.in_(ENDED_WITHOUT_RESULTS), Job.finished_at >= since)
                                   .order_by(Job.id)))
    return sum(bool(report_not_performed(config, sessions, job_id, now)) for job_id in ids)


def _report(config: Config, sessions: sessionmaker, job_id: int, now: datetime | None) -> str | None:
    with sessions() as session:
        job = session.get(Job, job_id)
    if job is None or job.state not in ENDED_WITHOUT_RESULTS or job.prior_of_job is not None:
        return None  # a compute-only job (a comparison's prior) sends nothing into its old study
    try:
        settings = config.model(job.model)
    except KeyError:
        return None  # a model no longer configured: no destinations to name
    destinations = config.status_destinations(settings)
    if not destinations:
        return None
    rows = delivery.of_job(sessions, job.id)
    if any(not delivery.is_status(d) for d in rows):
        return None  # it had results: their deliveries say what failed
    planned = {d.destination for d in rows}
    path = result_dir(config, job) / STATUS_FILE
    policy = RetryPolicy.for_deliveries(config.node)
    if not {d.name for d in destinations} <= planned:
        if not path.exists():
            _write(config, sessions, job, settings, path)
        delivery.plan(sessions, job.id, job.study_uid, [path], [d.name for d in destinations], policy, now)
    items = delivery.due(sessions, job.id, now, status=True)
    if not items:
        return None
    send_pass(config, sessions, job, path.parent, {d.name: d for d in destinations}, items, policy,
              with_fallbacks=False)
    done = delivery.summary(sessions, job.id, status=True)
    return (f"status SR: {done.sent} sent, {done.pending} pending, {len(done.failed)} failed"
            + (f" ({'; '.join(done.failed)})" if done.failed else ""))


def _write(config: Config, sessions: sessionmaker, job: Job, settings: ModelSettings, path: Path) -> None:
    evidence = _evidence(sessions, job.study_uid)
    if not evidence:
        raise ResultError(f"no readable instance of study {job.study_uid} left for the status SR's patient and study")
    position = [m.name for m in config.models].index(settings.name)
    number = result_series_number(OutputKind.STATUS, job.run_number, position)
    seed = ["dicomnode-status", job.study_uid, job.model, str(job.run_number), str(job.id)]
    sr = build_status_sr(
        evidence,
        model_name=settings.name,
        model_version=_version(settings),
        run=job.run_number,
        reason=job.error or "no reason recorded",
        when=job.finished_at or utcnow(),
        series_number=number,
        series_description=f"{settings.name} not performed (run {job.run_number})",
        sop_instance_uid=generate_uid(entropy_srcs=[*seed, "instance"]),
        series_instance_uid=generate_uid(entropy_srcs=[*seed, "series"]),
    )
    write_dicom(sr, path)
    record_job_event(sessions, job, EventKind.STATUS_WRITTEN,
                     f"{path.name} {sr.SOPInstanceUID} series {number}: {settings.name} not performed", log,
                     data={"sop_instance_uid": str(sr.SOPInstanceUID), "series_number": number})


def _version(settings: ModelSettings) -> str:
    if settings.version:
        return settings.version
    try:
        return model_fingerprint(settings)
    except OSError:  # the folder is gone, or in nnU-Net's results layout: no fingerprint without loading it
        return "unknown"


def _evidence(sessions: sessionmaker, study_uid: str) -> list:
    """One readable instance header per series of the study (its first received)."""
    with sessions() as session:
        rows = session.execute(select(Instance.series_uid, Instance.path).where(Instance.study_uid == study_uid)
                               .order_by(Instance.received_at, Instance.sop_instance_uid)).all()
    headers, seen = [], set()
    for series_uid, path in rows:
        if series_uid in seen or len(seen) >= MAX_EVIDENCE_SERIES:
            continue
        try:
            headers.append(dcmread(path, stop_before_pixels=True))
        except (OSError, InvalidDicomError):
            continue
        seen.add(series_uid)
    return headers
