"""What the `dicomnode` command shows about a node: its status, its studies and its jobs, read
from the database (and the data folder's disk use), so it works while the service runs.

Every query returns plain dataclasses: the CLI prints them as tables, and `as_json` gives the
same data for `--json`. The database cannot see processes, so the receiver and the worker say
that they are alive with `heartbeat` (a row per process in the `components` table).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config
from dicomnode.store.components import EXPECTED, HEARTBEAT_SECONDS, Role
from dicomnode.store.events import ERROR_KINDS, EventKind
from dicomnode.store.index import series_of_study
from dicomnode.store.schema import current_revision
from dicomnode.store.tables import (
    Component,
    Delivery,
    Event,
    Instance,
    Job,
    JobState,
    Study,
    utcnow,
)


def as_json(value) -> str:  # noqa: ANN001 - a dataclass, or a list of them
    """The data of a query as JSON; times in ISO 8601 with their UTC offset."""
    plain = [asdict(v) for v in value] if isinstance(value, list) else asdict(value) if is_dataclass(value) else value
    return json.dumps(plain, indent=2, default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v))


# --- components: which processes are alive ---------------------------------------------------

@dataclass
class ComponentStatus:
    name: str
    up: bool
    why: str  # "seen 3 s ago", "process 1234 is not running", "never seen"...
    host: str | None = None
    pid: int | None = None
    started_at: datetime | None = None
    last_seen_at: datetime | None = None
    detail: dict = field(default_factory=dict)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, run by another user (the service's)
        return True
    return True


def _component_status(row: Component, now: datetime, stale_after: float, busy: dict[str, Job]) -> ComponentStatus:
    """Up: seen within `stale_after` seconds (or, a worker, holding a live lease: a long job keeps
    it from its poll loop) and, on this host, its process running."""
    age = (now - row.last_seen_at).total_seconds()
    job = busy.get(f"{row.host}:{row.pid}")
    if row.host == socket.gethostname() and not _pid_alive(row.pid):
        up, why = False, f"process {row.pid} is not running; last seen {age:.0f} s ago"
    elif age <= stale_after:
        up, why = True, f"seen {age:.0f} s ago"
    elif job is not None:
        up, why = True, f"running job {job.id}, lease renewed until {job.lease_expires_at:%H:%M:%S} UTC"
    else:
        up, why = False, f"not seen for {age:.0f} s"
    return ComponentStatus(row.name, up, why, row.host, row.pid, row.started_at, row.last_seen_at, json.loads(row.detail or "{}"))


def components(sessions: sessionmaker, stale_after: float, now: datetime | None = None) -> list[ComponentStatus]:
    """Per component and host: the processes that are up, or else the last one seen; a receiver
    or worker never seen is listed as such."""
    now = now or utcnow()
    with sessions() as session:
        rows = list(session.scalars(select(Component).order_by(Component.name, Component.host, Component.last_seen_at.desc())))
        busy = {j.lease_owner: j for j in session.scalars(select(Job).where(Job.state == JobState.RUNNING, Job.lease_expires_at > now))}
    listed: list[ComponentStatus] = []
    by_place: dict[tuple[str, str], list[ComponentStatus]] = {}
    for row in rows:
        by_place.setdefault((row.name, row.host), []).append(_component_status(row, now, stale_after, busy))
    for statuses in by_place.values():
        listed.extend([s for s in statuses if s.up] or statuses[:1])
    seen = {s.name for s in listed}
    listed.extend(ComponentStatus(name, False, "never seen") for name in EXPECTED if name not in seen)
    return listed


# --- node status ------------------------------------------------------------------------------

@dataclass
class DiskUse:
    data_dir: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    spool_bytes: int
    results_bytes: int
    database_bytes: int | None  # None: not an SQLite file


@dataclass
class WaitingJob:
    job_id: int
    study_uid: str
    model: str
    queued_at: datetime
    waiting_seconds: float


@dataclass
class ModelStatus:
    name: str
    loaded_by: list[str]  # "host:pid" of each worker that is up and has the model loaded


@dataclass
class EventRow:
    at: datetime
    kind: str
    message: str
    study_uid: str | None
    job_id: int | None


@dataclass
class NodeStatus:
    checked_at: datetime
    components: list[ComponentStatus]
    queue: dict[str, int]  # jobs by state, every state
    oldest_waiting: WaitingJob | None
    disk: DiskUse
    models: list[ModelStatus]
    last_errors: list[EventRow]  # newest first
    schema: str | None  # the database's schema revision (dicomnode.store.schema)


def tree_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 when it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed while we walk
                pass
    return total


def disk_use(config: Config) -> DiskUse:
    data_dir = config.node.data_dir
    existing = next(p for p in (data_dir, *data_dir.parents) if p.exists())
    usage = shutil.disk_usage(existing)
    database = None
    if config.database_url.startswith("sqlite"):
        path = Path(make_url(config.database_url).database or "")
        database = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.is_file())
    return DiskUse(str(data_dir), usage.total, usage.used, usage.free, tree_bytes(config.spool_dir), tree_bytes(config.results_dir), database)


def node_status(sessions: sessionmaker, config: Config, now: datetime | None = None, errors: int = 5) -> NodeStatus:
    now = now or utcnow()
    stale_after = 3 * max(config.node.sweep_seconds, HEARTBEAT_SECONDS)
    parts = components(sessions, stale_after, now)
    with sessions() as session:
        counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        oldest = session.scalar(select(Job).where(Job.state == JobState.QUEUED).order_by(Job.created_at, Job.id).limit(1))
        recent = list(session.scalars(select(Event).where(Event.kind.in_(ERROR_KINDS)).order_by(Event.id.desc()).limit(errors)))
    waiting = None
    if oldest is not None:
        waiting = WaitingJob(oldest.id, oldest.study_uid, oldest.model, oldest.created_at, (now - oldest.created_at).total_seconds())
    workers = [c for c in parts if c.name == Role.WORKER and c.up]
    models = [ModelStatus(m.name, [f"{w.host}:{w.pid}" for w in workers if m.name in w.detail.get("models", [])]) for m in config.models]
    return NodeStatus(
        checked_at=now,
        components=parts,
        queue={state: counts.get(state, 0) for state in JobState},
        oldest_waiting=waiting,
        disk=disk_use(config),
        models=models,
        last_errors=[EventRow(e.at, e.kind, e.message, e.study_uid, e.job_id) for e in recent],
        schema=current_revision(sessions.kw["bind"]),
    )


# --- jobs -------------------------------------------------------------------------------------

@dataclass
class JobRow:
    id: int
    state: str
    study: str
    model: str
    run: int
    attempts: int
    max_attempts: int
    created: datetime
    started: datetime | None
    finished: datetime | None
    error: str | None


def _job_row(job: Job) -> JobRow:
    return JobRow(job.id, job.state, job.study_uid, job.model, job.run_number, job.attempts, job.max_attempts,
                  job.created_at, job.started_at, job.finished_at, job.error)


RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """"2h", "30m", "1d" (before now) or an ISO 8601 time (without an offset: UTC)."""
    now = now or utcnow()
    relative = RELATIVE.match(text)
    if relative:
        return now - timedelta(seconds=float(relative[1]) * UNIT_SECONDS[relative[2]])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a time: give e.g. 30m, 2h, 1d or 2024-05-01T08:00") from None
    return when if when.tzinfo else when.replace(tzinfo=now.tzinfo)


def list_jobs(sessions: sessionmaker, state: str | None = None, since: datetime | None = None, study: str | None = None) -> list[JobRow]:
    """Jobs, newest first; `since`: created at or after."""
    if state is not None and state not in set(JobState):
        raise ValueError(f"no job state {state!r}: one of {', '.join(JobState)}")
    query = select(Job).order_by(Job.id.desc())
    if state is not None:
        query = query.where(Job.state == state)
    if since is not None:
        query = query.where(Job.created_at >= since)
    if study is not None:
        query = query.where(Job.study_uid == study)
    with sessions() as session:
        return [_job_row(j) for j in session.scalars(query)]


@dataclass
class Step:
    at: datetime
    event: str
    message: str
    since_previous_seconds: float | None  # None for the first step
    since_received_seconds: float | None  # since the study's first instance; None: study not in the index


@dataclass
class DeliveryRow:
    destination: str
    file: str
    sop_instance_uid: str
    state: str
    attempts: int
    max_attempts: int
    not_before: datetime
    sent_at: datetime | None
    last_error: str | None


@dataclass
class JobDetail(JobRow):
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    result_dir: str | None = None
    deliveries: list[DeliveryRow] = field(default_factory=list)
    timeline: list[Step] = field(default_factory=list)


def _last_instance(session, job: Job) -> tuple[datetime, str, str] | None:  # noqa: ANN001
    """When the last instance before the job arrived (the study complete), from the index."""
    last, count = session.execute(
        select(func.max(Instance.received_at), func.count()).where(Instance.study_uid == job.study_uid, Instance.received_at <= job.created_at)
    ).one()
    return (last, "last-instance", f"the last of {count} instances received before the job was queued") if last else None


def job_detail(sessions: sessionmaker, job_id: int) -> JobDetail | None:
    """A job, its deliveries and its timeline: the study's events up to the job (received,
    incomplete...), the last instance received, then the job's own events in order."""
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        study = session.get(Study, job.study_uid)
        events = list(session.scalars(select(Event).where(
            (Event.job_id == job_id)
            | ((Event.study_uid == job.study_uid) & Event.job_id.is_(None) & (Event.at <= job.created_at))
        ).order_by(Event.id)))
        last_instance = _last_instance(session, job)
        sends = list(session.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)))
    raw = [(e.at, e.kind, e.message) for e in events] + ([last_instance] if last_instance else [])
    raw.sort(key=lambda item: item[0])  # stable: events of one moment keep their order
    received = study.first_received_at if study else None
    timeline, previous = [], None
    for at, kind, message in raw:
        timeline.append(Step(at, kind, message, (at - previous).total_seconds() if previous else None,
                             (at - received).total_seconds() if received else None))
        previous = at
    return JobDetail(
        **asdict(_job_row(job)), lease_owner=job.lease_owner, lease_expires_at=job.lease_expires_at, result_dir=job.result_dir,
        deliveries=[DeliveryRow(d.destination, Path(d.path).name, d.sop_instance_uid, d.state, d.attempts, d.max_attempts,
                                d.not_before, d.sent_at, d.last_error) for d in sends],
        timeline=timeline,
    )


# --- studies ----------------------------------------------------------------------------------

@dataclass
class SeriesRow:
    series_uid: str
    modality: str
    number: int | None
    description: str
    instances: int
    last_received: datetime
    verdict: str | None = None  # the latest job's verdict for the series, e.g. "used for channel PET"
    verdict_job: int | None = None


@dataclass
class StudyRow:
    study: str
    first_received: datetime
    last_received: datetime
    instances: int
    series: list[SeriesRow]
    jobs: list[JobRow]  # newest first


@dataclass
class StudyDetail(StudyRow):
    events: list[EventRow] = field(default_factory=list)  # the study's own events (received, incomplete)


VERDICT_TEXT = re.compile(r"^.*? instances?: (.*) \[([0-9.]+)\]$")


def _verdicts(session, study_uid: str) -> dict[str, tuple[str, int | None]]:  # noqa: ANN001
    """Series UID -> (the latest verdict's text, its job)."""
    latest: dict[str, tuple[str, int | None]] = {}
    for message, job_id in session.execute(
        select(Event.message, Event.job_id).where(Event.study_uid == study_uid, Event.kind == EventKind.SERIES_VERDICT).order_by(Event.id)
    ):
        parsed = VERDICT_TEXT.match(message)
        if parsed:
            latest[parsed[2]] = (parsed[1], job_id)
    return latest


def _study_row(session, study: Study) -> StudyRow:  # noqa: ANN001
    verdicts = _verdicts(session, study.study_uid)
    series = [SeriesRow(s.series_uid, s.modality, s.series_number, s.description, s.instances, s.last_received_at,
                        *verdicts.get(s.series_uid, (None, None))) for s in series_of_study(session, study.study_uid)]
    jobs = [_job_row(j) for j in session.scalars(select(Job).where(Job.study_uid == study.study_uid).order_by(Job.id.desc()))]
    return StudyRow(study.study_uid, study.first_received_at, study.last_received_at, study.instances_received, series, jobs)


def list_studies(sessions: sessionmaker, since: datetime | None = None) -> list[StudyRow]:
    """Studies, the most recently received first; `since`: received at or after."""
    query = select(Study).order_by(Study.last_received_at.desc())
    if since is not None:
        query = query.where(Study.last_received_at >= since)
    with sessions() as session:
        return [_study_row(session, s) for s in session.scalars(query)]


def study_detail(sessions: sessionmaker, study_uid: str) -> StudyDetail | None:
    with sessions() as session:
        study = session.get(Study, study_uid)
        if study is None:
            return None
        events = session.scalars(select(Event).where(Event.study_uid == study_uid, Event.job_id.is_(None)).order_by(Event.id))
        return StudyDetail(**vars(_study_row(session, study)),
                           events=[EventRow(e.at, e.kind, e.message, e.study_uid, e.job_id) for e in events])
