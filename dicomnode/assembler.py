"""The assembler: decides when a received study is complete and queues a job for it.

Every configured model whose `[models.applies_to]` rules fit the study (modalities present,
tag patterns such as StudyDescription) gets its own job: a study several models apply to
gets several. A study becomes a job for a model once no instance has arrived for
`study_quiet_seconds`, every modality the model needs is present, and `dicomnode.selection`
finds a consistent series for each of the model's channels (PET: all NumberOfSlices
instances; CT: no gaps or duplicate positions, covering the PET; MR and other named
channels: their SeriesDescription patterns, no gaps, the grid series' frame of reference). A PET series still arriving holds the study back,
with an "incomplete" event saying so once per arrival. The job is queued with one
"series-verdict" event per series of the study: "used for channel X" or "ignored because ...".

Instances that arrive after a study's job was created make the study a candidate again:
the next run writes a new result series and never touches the earlier one.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config, ModelSettings
from dicomnode.db import Event, Job, Study, utcnow
from dicomnode.queue import QUEUED, RetryPolicy, enqueue, log_event
from dicomnode.selection import SeriesFacts, applies_to, select_inputs, series_from_index

log = logging.getLogger("dicomnode.assembler")

VERDICT = "series-verdict"


def missing_modalities(series: list[SeriesFacts], model: ModelSettings) -> list[str]:
    present = {s.modality for s in series}
    return [m for m in model.required_modalities if m not in present]


def sweep(sessions: sessionmaker, config: Config, now: datetime | None = None) -> list[int]:
    """Queue a job for every quiet, complete study that needs one; return the new job ids."""
    now = now or utcnow()
    quiet_since = now - timedelta(seconds=config.node.study_quiet_seconds)
    created: list[int] = []
    with sessions() as session:
        quiet_studies = list(session.scalars(select(Study).where(Study.last_received_at <= quiet_since)))
    for study in quiet_studies:
        series: list[SeriesFacts] | None = None
        for model in config.models:
            with sessions() as session:
                latest = session.scalar(
                    select(Job).where(Job.study_uid == study.study_uid, Job.model == model.name).order_by(Job.id.desc()).limit(1)
                )
                if latest is not None and (latest.state == QUEUED or latest.created_at >= study.last_received_at):
                    continue  # already queued, or nothing new since the last job
                series = series if series is not None else series_from_index(session, study.study_uid)
            job_id = _queue_if_ready(sessions, config, study, model, series, latest)
            if job_id is not None:
                created.append(job_id)
    return created


def _queue_if_ready(sessions: sessionmaker, config: Config, study: Study, model: ModelSettings,
                    series: list[SeriesFacts], latest: Job | None) -> int | None:
    """Queue a job for `model` when it applies to the study and its inputs are complete."""
    why_not = applies_to(series, model)
    if why_not:
        log.debug("study %s: %s", study.study_uid, why_not)
        return None
    missing = missing_modalities(series, model)
    if missing:
        _note_incomplete(sessions, study, f"model {model.name} needs {', '.join(missing)}: not present")
        return None
    selection = select_inputs(series, model.channels, model.inputs, model.grid)
    if not selection.ready:
        _note_incomplete(sessions, study, f"model {model.name}: {selection.problem}")
        return None
    policy = RetryPolicy(config.node.max_attempts, config.node.retry_backoff_seconds)
    reason = "study complete and quiet" if latest is None else "new instances after run %d" % latest.run_number
    job_id = enqueue(sessions, study.study_uid, model.name, policy, reason,
                     details=[(VERDICT, v.message) for v in selection.verdicts])
    log.info("study %s: queued job %d for model %s (%s)", study.study_uid, job_id, model.name, reason)
    return job_id


def _note_incomplete(sessions: sessionmaker, study: Study, message: str) -> None:
    """Say once (per new arrival) why a quiet study is not processed."""
    with sessions.begin() as session:
        said = session.scalar(
            select(Event.id).where(
                Event.study_uid == study.study_uid, Event.kind == "incomplete", Event.message == message,
                Event.at >= study.last_received_at,
            ).limit(1)
        )
        if said is None:
            log_event(session, "incomplete", message, study_uid=study.study_uid)
            log.info("study %s: %s", study.study_uid, message)
