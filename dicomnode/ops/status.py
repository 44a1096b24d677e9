"""What `dicomnode status` shows: which of the node's processes are up, the queue, the oldest
waiting job, disk use, the models loaded and the last errors, read from the database (and the
data folder's disk), so it works while the service runs. Plain dataclasses: the CLI prints
them as tables, and `history.as_json` gives the same data for `--json`."""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config, Priority
from dicomnode.ops.history import EventRow
from dicomnode.pipeline import notify
from dicomnode.pipeline.queue import low_priority_open
from dicomnode.store.components import EXPECTED, HEARTBEAT_SECONDS, Role, process_alive
from dicomnode.store.diskspace import existing_folder
from dicomnode.store.events import ERROR_KINDS
from dicomnode.store.schema import current_revision
from dicomnode.store.tables import (
    Component,
    Delivery,
    DeliveryState,
    Event,
    Job,
    JobState,
    Notification,
    NotificationSend,
    NotifyState,
    utcnow,
)

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


def _component_status(row: Component, now: datetime, stale_after: float, busy: dict[str, Job]) -> ComponentStatus:
    """Up: seen within `stale_after` seconds (or, a worker, holding a live lease: a long job keeps
    it from its poll loop) and, on this host, its process running."""
    age = (now - row.last_seen_at).total_seconds()
    job = busy.get(f"{row.host}:{row.pid}")
    if row.host == socket.gethostname() and not process_alive(row.pid):
        up, why = False, f"process {row.pid} is not running; last seen {age:.0f} s ago"
    elif age <= stale_after:
        up, why = True, f"seen {age:.0f} s ago"
    elif job is not None:
        up, why = True, f"running job {job.id}, lease renewed until {job.lease_expires_at:%H:%M:%S} UTC"
    else:
        up, why = False, f"not seen for {age:.0f} s"
    return ComponentStatus(
        row.name, up, why, row.host, row.pid, row.started_at, row.last_seen_at, json.loads(row.detail or "{}")
    )


def components(sessions: sessionmaker, stale_after: float, now: datetime | None = None) -> list[ComponentStatus]:
    """Per component and host: the processes that are up, or else the last one seen; a receiver
    or worker never seen is listed as such."""
    now = now or utcnow()
    with sessions() as session:
        rows = list(
            session.scalars(select(Component).order_by(Component.name, Component.host, Component.last_seen_at.desc()))
        )
        busy = {
            j.lease_owner: j
            for j in session.scalars(select(Job).where(Job.state == JobState.RUNNING, Job.lease_expires_at > now))
        }
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
    priority: str = Priority.NORMAL.value


@dataclass
class LowPriorityHours:
    """[node] low_priority_hours: low jobs are claimed only within it (the node's local time)."""

    window: str  # "20:00-06:00"
    open_now: bool


@dataclass
class ModelStatus:
    name: str
    loaded_by: list[str]  # "host:pid" of each worker that is up and has the model loaded


@dataclass
class Undelivered:
    """A result object that failed for good to reach a destination (its job failed with it)."""

    job_id: int
    study_uid: str
    destination: str
    file: str
    error: str | None


@dataclass
class NotificationGivenUp:
    """A notification a [[notify]] target never took (refused, or every try failed): the job goes on."""

    job_id: int | None
    event: str
    target: str
    attempts: int
    error: str | None
    at: datetime


@dataclass
class NodeStatus:
    checked_at: datetime
    components: list[ComponentStatus]
    queue: dict[str, int]  # jobs by state, every state
    queued_by_priority: dict[str, int]  # queued jobs by priority, every priority, urgent first
    oldest_waiting: WaitingJob | None
    disk: DiskUse
    models: list[ModelStatus]
    last_errors: list[EventRow]  # newest first
    schema: str | None  # the database's schema revision (dicomnode.store.schema)
    undelivered: list[Undelivered] = field(default_factory=list)  # of failed jobs: `jobs retry` sends them again
    # deliveries by state, every state: "sent" (stored, the destination not asked to confirm) apart from
    # "confirming" (asked) and "confirmed" (the destination committed or listed it)
    deliveries: dict[str, int] = field(default_factory=dict)
    low_priority_hours: LowPriorityHours | None = None  # None: low jobs run at any time
    notifications: dict[str, int] = field(default_factory=dict)  # [[notify]] sends by state, every state
    notifications_given_up: list[NotificationGivenUp] = field(default_factory=list)  # the latest, newest first


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
    usage = shutil.disk_usage(existing_folder(data_dir))
    database = None
    if config.database_url.startswith("sqlite"):
        path = Path(make_url(config.database_url).database or "")
        database = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.is_file())
    return DiskUse(
        str(data_dir),
        usage.total,
        usage.used,
        usage.free,
        tree_bytes(config.spool_dir),
        tree_bytes(config.results_dir),
        database,
    )


def node_status(sessions: sessionmaker, config: Config, now: datetime | None = None, errors: int = 5) -> NodeStatus:
    now = now or utcnow()
    stale_after = 3 * max(config.node.sweep_seconds, HEARTBEAT_SECONDS)
    parts = components(sessions, stale_after, now)
    with sessions() as session:
        counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        by_state = dict(session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
        by_priority = dict(session.execute(
            select(Job.priority, func.count()).where(Job.state == JobState.QUEUED).group_by(Job.priority)).all())
        oldest = session.scalar(
            select(Job).where(Job.state == JobState.QUEUED).order_by(Job.created_at, Job.id).limit(1)
        )
        recent = list(
            session.scalars(select(Event).where(Event.kind.in_(ERROR_KINDS)).order_by(Event.id.desc()).limit(errors))
        )
        undelivered = [
            Undelivered(job.id, job.study_uid, d.destination, Path(d.path).name, d.last_error)
            for d, job in session.execute(
                select(Delivery, Job).join(Job, Job.id == Delivery.job_id)
                .where(Delivery.state == DeliveryState.FAILED, Job.state == JobState.FAILED)
                .order_by(Delivery.id)
            )
        ]
        notifications = notify.counts_by_state(session)
        given_up = [
            NotificationGivenUp(n.job_id, n.kind, send.target, send.attempts, send.last_error, send.updated_at)
            for send, n in session.execute(
                select(NotificationSend, Notification)
                .join(Notification, Notification.id == NotificationSend.notification_id)
                .where(NotificationSend.state == NotifyState.FAILED).order_by(NotificationSend.id.desc()).limit(errors)
            )
        ]
    waiting = None
    if oldest is not None:
        waiting = WaitingJob(
            oldest.id, oldest.study_uid, oldest.model, oldest.created_at, (now - oldest.created_at).total_seconds(),
            oldest.priority,
        )
    window = config.node.low_priority_hours
    workers = [c for c in parts if c.name == Role.WORKER and c.up]
    models = [
        ModelStatus(m.name, [f"{w.host}:{w.pid}" for w in workers if m.name in w.detail.get("models", [])])
        for m in config.models
    ]
    return NodeStatus(
        checked_at=now,
        components=parts,
        queue={state: counts.get(state, 0) for state in JobState},
        queued_by_priority={p.value: by_priority.get(p.value, 0) for p in Priority},
        oldest_waiting=waiting,
        disk=disk_use(config),
        models=models,
        last_errors=[EventRow(e.at, e.kind, e.message, e.study_uid, e.job_id) for e in recent],
        schema=current_revision(sessions.kw["bind"]),
        undelivered=undelivered,
        deliveries={state: by_state.get(state, 0) for state in DeliveryState},
        low_priority_hours=None if window is None else LowPriorityHours(str(window), low_priority_open(window)),
        notifications=notifications,
        notifications_given_up=given_up,
    )
