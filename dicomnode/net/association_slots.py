"""The associations the receiver has open, counted against max_associations and
max_associations_per_ae: in one process's memory, or, with several receiving processes behind one
port ([node] receive_processes), in a file all of them share.

A slot is taken when an A-ASSOCIATE-RQ arrives (before negotiation) and given back when its
connection closes. The shared table is a small JSON file, read and written under an exclusive
flock of a lock file beside it: association
requests are rare beside the instances they carry, so a file read and written per request costs
nothing that shows, and a lock held by a process that dies is released by the kernel. The slots of
a process that died without giving them back (killed) are dropped as soon as another process looks
at the table: every slot names its process, and a process that is gone holds nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path


def _why_not(slots: dict[str, str], calling: str, max_total: int, max_per_ae: int) -> str | None:
    """Why one more association from `calling` is refused (None: it may open)."""
    from_ae = sum(1 for ae in slots.values() if ae == calling)
    if len(slots) >= max_total:
        return f"{len(slots)} associations open (max_associations = {max_total})"
    if from_ae >= max_per_ae:
        return f"{from_ae} associations open from {calling} (max_associations_per_ae = {max_per_ae})"
    return None


class LocalSlots:
    """One receiving process: the slots in its memory."""

    def __init__(self, max_total: int, max_per_ae: int) -> None:
        self.max_total, self.max_per_ae = max_total, max_per_ae
        self._slots: dict[str, str] = {}
        self._lock = threading.Lock()

    def take(self, key: str, calling: str) -> str | None:
        """A slot for association `key` from `calling`; why not, if it cannot have one."""
        with self._lock:
            why = _why_not(self._slots, calling, self.max_total, self.max_per_ae)
            if why is None:
                self._slots[key] = calling
            return why

    def give_back(self, key: str) -> None:
        with self._lock:
            self._slots.pop(key, None)

    def count(self) -> int:
        with self._lock:
            return len(self._slots)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process has the number now: not ours, but alive
        return True
    return True


class SharedSlots:
    """Several receiving processes: the slots in `path`, as {"<pid>:<association>": calling AE}."""

    def __init__(self, path: Path, max_total: int, max_per_ae: int) -> None:
        self.path, self.max_total, self.max_per_ae = path, max_total, max_per_ae
        self._pid = os.getpid()

    def clear(self) -> None:
        """At the node's start: no association is open (the table may be a killed node's)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._update(lambda slots: slots.clear())

    def take(self, key: str, calling: str) -> str | None:
        why: list[str | None] = [None]

        def take(slots: dict[str, str]) -> None:
            why[0] = _why_not(slots, calling, self.max_total, self.max_per_ae)
            if why[0] is None:
                slots[f"{self._pid}:{key}"] = calling

        self._update(take)
        return why[0]

    def give_back(self, key: str) -> None:
        self._update(lambda slots: slots.pop(f"{self._pid}:{key}", None))

    def forget_process(self, pid: int) -> None:
        """The slots of receiving process `pid`, which has exited."""
        self._update(lambda slots: [slots.pop(k) for k in [k for k in slots if k.split(":")[0] == str(pid)]])

    def count(self) -> int:
        found = [0]
        self._update(lambda slots: found.__setitem__(0, len(slots)))
        return found[0]

    def _update(self, change) -> None:  # noqa: ANN001 - a function that changes the slots in place
        """Read the table, change it, write it whole (a new file renamed over the old one: a full
        disk leaves the old table), all under an exclusive lock on a file beside it."""
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                slots = json.loads(self.path.read_text() or "{}")
            except FileNotFoundError:
                slots = {}
            except ValueError:  # not the table (written by hand?): start again from what the processes hold
                slots = {}
            before = dict(slots)
            for key in [k for k in slots if not _alive(int(k.split(":")[0]))]:
                del slots[key]
            change(slots)
            if slots != before:
                temp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
                temp.write_text(json.dumps(slots))
                os.replace(temp, self.path)
        finally:
            os.close(fd)  # releases the lock
