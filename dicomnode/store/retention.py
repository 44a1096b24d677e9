"""Retention: a study's spooled instances and result folders are removed `retention_hours`
after its work is done.

A study's work is done when the latest job of every model that has one succeeded (so every
delivery was sent) and no instance arrived after those jobs were queued. A queued, running or
failed latest job keeps everything (a failed one until an operator retries it). A study that
never got a job (no model applies to it, or its series never became complete) is done when its
last instance arrived: it goes `retention_hours` after that, its verdicts staying in the index. The index
keeps the study, its series, jobs, deliveries and events (the CLI still shows its history);
the instances' rows and files go, with a "purged" event. Files are removed before rows, so a
crash in between is finished by the next sweep; an instance that arrives during a purge is
kept, as are its rows. A job's time point ([models.compare], timepoint.npz) stays in its result
folder until it is older than the longest comparison window (purge_timepoints).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config
from dicomnode.store.events import EventKind, log_event
from dicomnode.store.tables import Instance, Job, JobState, Study, TimePointRow, utcnow

log = logging.getLogger("dicomnode.retention")


@dataclass(frozen=True)
class Done:
    """A study whose work is done: since when, and what may go."""

    study_uid: str
    finished_at: datetime  # the last of its latest jobs to succeed
    queued_at: datetime  # the first of its latest jobs to be queued: instances up to then may go
    job_ids: tuple[int, ...]  # every job of the study (their result folders may go); none: never a job


def _done(session, study_uid: str) -> Done | None:  # noqa: ANN001 - a Session
    jobs = list(session.scalars(select(Job).where(Job.study_uid == study_uid).order_by(Job.id)))
    latest = list({job.model: job for job in jobs}.values())  # per model, its last job
    study = session.get(Study, study_uid)
    if not latest:
        if study is None:
            return None
        return Done(study_uid, study.last_received_at, study.last_received_at, ())
    # a job rejected at review is settled too: its results were built and will never be sent
    if any(job.state not in (JobState.SUCCEEDED, JobState.REJECTED) or job.finished_at is None for job in latest):
        return None
    queued_at = min(job.created_at for job in latest)
    if study is not None and study.last_received_at > queued_at:
        return None  # new instances: a new run is coming
    return Done(study_uid, max(job.finished_at for job in latest), queued_at, tuple(job.id for job in jobs))


def due(sessions: sessionmaker, retention: timedelta, now: datetime | None = None) -> list[Done]:
    """Studies holding spooled instances whose work was done at least `retention` ago."""
    now = now or utcnow()
    with sessions() as session:
        holding = list(session.scalars(select(Instance.study_uid).distinct()))
        found = [_done(session, study_uid) for study_uid in holding]
    return [done for done in found if done is not None and done.finished_at <= now - retention]


def _remove_empty_folders(folder: Path, stop: Path) -> None:
    """Remove `folder` and its parents up to (not including) `stop` while they are empty."""
    while folder != stop and folder.is_relative_to(stop):
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone and its parent not empty)
            if folder.exists():
                return
        folder = folder.parent


def purge(sessions: sessionmaker, config: Config, done: Done) -> int:
    """Remove a done study's instances (files, then rows) and its jobs' result folders; return
    how many instances went."""
    with sessions() as session:
        paths = [Path(p) for p in session.scalars(select(Instance.path).where(
            Instance.study_uid == done.study_uid, Instance.received_at <= done.queued_at))]
    for path in paths:
        path.unlink(missing_ok=True)
    for folder in {path.parent for path in paths}:
        _remove_empty_folders(folder, config.spool_dir)
    results = config.results_dir / done.study_uid
    with sessions() as session:
        kept = {row.job_id: Path(row.path) for row in session.scalars(
            select(TimePointRow).where(TimePointRow.job_id.in_(done.job_ids)))}
    for job_id in done.job_ids:
        folder = results / f"job-{job_id}"
        if job_id in kept:  # [models.compare]: the time point stays for later studies (purge_timepoints)
            for path in folder.iterdir() if folder.is_dir() else ():
                if path != kept[job_id]:
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    _remove_empty_folders(results, config.results_dir)
    with sessions.begin() as session:
        session.execute(
            delete(Instance).where(Instance.study_uid == done.study_uid, Instance.received_at <= done.queued_at)
        )
        log_event(
            session, EventKind.PURGED, f"{len(paths)} instances {_what_went(config, done)}", study_uid=done.study_uid
        )
    return len(paths)


def _what_went(config: Config, done: Done) -> str:
    hours = f"{config.node.retention_hours:g} h"
    if not done.job_ids:
        return f"removed {hours} after the last one arrived (the study never became a job)"
    return f"and the results of jobs {', '.join(map(str, done.job_ids))} removed {hours} after the last job succeeded"


def purge_timepoints(sessions: sessionmaker, config: Config, now: datetime | None = None) -> int:
    """Time points ([models.compare]) made longer ago than the longest compare window (max_age_days)
    go, file and row. By when they were made, not by their study's date: a follow-up is compared with
    priors of the window before its own date, and a study sent late (its date long past, a
    retrospective batch) still finds the priors processed with it. No model compares: all go.
    Returns how many went."""
    now = now or utcnow()
    windows = [m.compare.max_age_days for m in config.models if m.compares]  # type: ignore[union-attr]
    with sessions() as session:
        rows = list(session.scalars(select(TimePointRow)))
    if windows:
        oldest = now - timedelta(days=max(windows))
        rows = [row for row in rows if row.created_at < oldest]
    for row in rows:
        Path(row.path).unlink(missing_ok=True)
        _remove_empty_folders(Path(row.path).parent, config.results_dir)
    if rows:
        with sessions.begin() as session:
            session.execute(delete(TimePointRow).where(TimePointRow.job_id.in_([row.job_id for row in rows])))
        log.info("%d time points removed: older than the comparison window", len(rows))
    return len(rows)


def purge_due(sessions: sessionmaker, config: Config, now: datetime | None = None) -> list[str]:
    """Purge every study that is due, and the time points no comparison can use any more; return
    the studies' UIDs. Off when retention_hours is 0."""
    if config.node.retention_hours <= 0:
        return []
    purge_timepoints(sessions, config, now)
    purged = []
    for done in due(sessions, timedelta(hours=config.node.retention_hours), now):
        count = purge(sessions, config, done)
        log.info("study %s: %d instances %s (retention)", done.study_uid, count, _what_went(config, done))
        purged.append(done.study_uid)
    return purged
