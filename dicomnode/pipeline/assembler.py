"""The assembler: decides when a received study is complete and queues a job for it.

Every configured model whose `[models.applies_to]` rules fit the study (modalities present,
tag patterns such as StudyDescription) gets its own job: a study several models apply to
gets several. A study becomes a job for a model once no instance has arrived for
`study_quiet_seconds`, every modality the model needs is present, and `dicomnode.pipeline.selection`
finds a consistent series for each of the model's channels (PET: all NumberOfSlices
instances; CT: no gaps or duplicate positions, covering the PET; MR and other named
channels: their SeriesDescription patterns, no gaps, the grid series' frame of reference). A
PET series still arriving holds the study back, with an "incomplete" event saying so once per
arrival. The job is queued with one "series-verdict" event per series of the study: "used
for channel X" or "ignored because ...".

Each job gets its priority (dicomnode.pipeline.priority): the first [[priority_rules]] entry
that fits the study (calling AE title, header tags) and the model, else the model's priority.

A study fetched as another study's prior ([models.priors] or [models.compare], event
"fetched-as-prior") gets no job here: its results would go into the old study (a comparison
queues its own compute-only job for it, dicomnode.pipeline.followup).

Instances that arrive after a study's job was created make the study a candidate again:
the next run writes a new result series and never touches the earlier one.

A study held back (quiet but incomplete for a model that applies) for [node] status_after_hours
after its last instance, for a model with a destination that wants "STATUS", gets a job failed at
once with the reason (queue.held_back): it never runs and carries the model's "not performed"
status SR (dicomnode.pipeline.notperformed). That is once per arrival: the job is newer than the
study's last instance, so the study is not looked at again until new instances come.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config, ModelSettings
from dicomnode.imaging.headers import SeriesFacts
from dicomnode.pipeline.facts import series_from_index
from dicomnode.pipeline.priority import calling_aets, job_priority
from dicomnode.pipeline.queue import RetryPolicy, enqueue, held_back
from dicomnode.pipeline.selection import applies_to, select_inputs
from dicomnode.store.events import EventKind, fetched_as_prior, log_event
from dicomnode.store.tables import Event, Job, JobState, Study, utcnow

log = logging.getLogger("dicomnode.assembler")
_SWEEPING = threading.Lock()  # whoever calls it (the scheduler, the start-up sweep), one sweep at a time


def missing_modalities(series: list[SeriesFacts], model: ModelSettings) -> list[str]:
    present = {s.modality for s in series if s.is_input}
    return [m for m in model.required_modalities if m not in present]


def queue_ready_studies(sessions: sessionmaker, config: Config, now: datetime | None = None) -> list[int]:
    """Queue a job for every quiet, complete study that needs one; return the new job ids. A study
    that cannot be assembled (a bug, a database error) is that study's problem: it is said once per
    arrival as an "assembly-failed" event and the sweep goes on with the next study. One sweep at a
    time in a process: two at once would each find no job and each queue one (two runs, two SEGs)."""
    with _SWEEPING:
        return _queue_ready_studies(sessions, config, now)


def _queue_ready_studies(sessions: sessionmaker, config: Config, now: datetime | None) -> list[int]:
    now = now or utcnow()
    quiet_since = now - timedelta(seconds=config.node.study_quiet_seconds)
    created: list[int] = []
    with sessions() as session:
        quiet_studies = list(session.scalars(select(Study).where(Study.last_received_at <= quiet_since)))
    for study in quiet_studies:
        try:
            created.extend(_sweep_study(sessions, config, study, now))
        except Exception as exc:  # noqa: BLE001 - one study never stops the others
            message = f"could not be checked for completeness: {type(exc).__name__}: {exc}"
            if _note_once(sessions, study, EventKind.ASSEMBLY_FAILED, message):
                log.exception("study %s: %s", study.study_uid, message)
    return created


def _sweep_study(sessions: sessionmaker, config: Config, study: Study, now: datetime | None = None) -> list[int]:
    created = []
    if any(m.priors or m.compares for m in config.models) and fetched_as_prior(sessions, study.study_uid):
        log.debug("study %s: fetched as a prior study: no job of its own", study.study_uid)
        return created
    series: list[SeriesFacts] | None = None
    aets: set[str] = set()
    for model in config.models:
        with sessions() as session:
            latest = session.scalar(
                select(Job)
                .where(Job.study_uid == study.study_uid, Job.model == model.name)
                .order_by(Job.id.desc())
                .limit(1)
            )
            if latest is not None and (latest.state == JobState.QUEUED or latest.created_at >= study.last_received_at):
                continue  # already queued, or nothing new since the last job
            if series is None:
                series = series_from_index(session, study.study_uid)
                aets = calling_aets(session, study.study_uid)
        job_id = _queue_if_ready(sessions, config, study, model, series, latest, aets, now)
        if job_id is not None:
            created.append(job_id)
    return created


def _queue_if_ready(
    sessions: sessionmaker,
    config: Config,
    study: Study,
    model: ModelSettings,
    series: list[SeriesFacts],
    latest: Job | None,
    aets: frozenset[str] | set[str] = frozenset(),
    now: datetime | None = None,
) -> int | None:
    """Queue a job for `model` when it applies to the study and its inputs are complete (or, held
    back past status_after_hours, a job failed at once for its status SR)."""
    why_not = applies_to(series, model)
    if why_not:
        log.debug("study %s: %s", study.study_uid, why_not)
        return None
    missing = missing_modalities(series, model)
    if missing:
        problem = f"model {model.name} needs {', '.join(missing)}: not present"
        _note_incomplete(sessions, study, problem)
        return _held_back_too_long(sessions, config, study, model, problem, now)
    selection = select_inputs(series, model.channels, model.inputs, model.grid)
    if not selection.ready:
        problem = f"model {model.name}: {selection.problem}"
        _note_incomplete(sessions, study, problem)
        return _held_back_too_long(sessions, config, study, model, problem, now)
    policy = RetryPolicy.for_jobs(config.node)
    reason = "study complete and quiet" if latest is None else "new instances after run %d" % latest.run_number
    priority, priority_reason = job_priority(config, model, series, aets)
    job_id = enqueue(
        sessions,
        study.study_uid,
        model.name,
        policy,
        reason,
        details=[(EventKind.SERIES_VERDICT, v.message, v.as_dict()) for v in selection.verdicts],
        priority=priority,
        priority_reason=priority_reason,
    )
    log.info("study %s: queued job %d for model %s, priority %s (%s)", study.study_uid, job_id, model.name,
             priority, reason)
    return job_id


def _held_back_too_long(sessions: sessionmaker, config: Config, study: Study, model: ModelSettings, problem: str,
                        now: datetime | None) -> int | None:
    """A job failed at once (queue.held_back) when the study has waited status_after_hours since its
    last instance and a destination of the model wants the status SR; else None."""
    hours = config.node.status_after_hours
    now = now or utcnow()
    if not hours or now - study.last_received_at < timedelta(hours=hours) or not config.status_destinations(model):
        return None
    waited = (now - study.last_received_at).total_seconds() / 3600
    reason = (f"study held back: {problem}; nothing arrived for {waited:.1f} h since the last instance "
              f"(status_after_hours = {hours:g})")
    job_id = held_back(sessions, study.study_uid, model.name, reason, RetryPolicy.for_jobs(config.node), now)
    log.warning("study %s: job %d for model %s not run: %s", study.study_uid, job_id, model.name, reason)
    return job_id


def _note_incomplete(sessions: sessionmaker, study: Study, message: str) -> None:
    """Say once (per new arrival) why a quiet study is not processed."""
    if _note_once(sessions, study, EventKind.INCOMPLETE, message):
        log.info("study %s: %s", study.study_uid, message)


def _note_once(sessions: sessionmaker, study: Study, kind: str, message: str) -> bool:
    """Write the study's event unless it was written since the study's last arrival; True if written now."""
    with sessions.begin() as session:
        said = session.scalar(
            select(Event.id)
            .where(
                Event.study_uid == study.study_uid,
                Event.kind == kind,
                Event.message == message,
                Event.at >= study.last_received_at,
            )
            .limit(1)
        )
        if said is None:
            log_event(session, kind, message, study_uid=study.study_uid)
        return said is None
