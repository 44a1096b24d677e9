"""The node's running parts say that they are alive: a row per process in the `components`
table, which `dicomnode status` reads (the CLI reads only the database, and the database cannot
see processes). The receiver writes at every sweep, a worker between jobs and when a model loads.
"""

from __future__ import annotations

import json
import os
import socket
import time
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from dicomnode.store.tables import Component, utcnow

HEARTBEAT_SECONDS = 10.0  # a worker says it is alive at most this often (the receiver: every sweep)


class Role(StrEnum):
    """What a process of the node is; stored as its value in `components.name`."""

    RECEIVER = "receiver"
    WORKER = "worker"


EXPECTED = (Role.RECEIVER, Role.WORKER)  # a node that runs lacks neither


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, run by another user (the service's)
        return True
    return True


_last_written: dict[tuple[int, str], tuple[float, dict | None]] = {}  # (database, component): when, what


def heartbeat(sessions: sessionmaker, component: Role, detail: dict | None = None, *, every: float = 0.0) -> None:
    """Record that this process's `component` ("receiver", "worker") is alive; `detail` (the
    listening address, the models loaded) replaces the last one, None keeps it. Skipped when
    this process wrote the same less than `every` seconds ago."""
    key = (id(sessions), component)
    last = _last_written.get(key)
    kept = detail if detail is not None else last[1] if last else None
    if last is not None and time.monotonic() - last[0] < every and kept == last[1]:
        return
    _last_written[key] = (time.monotonic(), kept)
    now = utcnow()
    host, pid = socket.gethostname(), os.getpid()
    with sessions.begin() as session:
        row = session.scalar(
            select(Component).where(Component.name == component, Component.host == host, Component.pid == pid)
        )
        if row is None:
            row = Component(name=Role(component).value, host=host, pid=pid, started_at=now, detail="{}")
            session.add(row)
        row.last_seen_at = now
        if detail is not None:
            row.detail = json.dumps(detail)
