"""Several receiving processes behind the node's one port ([node] receive_processes): one Python
process takes C-STORE as fast as one core lets it (its threads share one interpreter lock), so with
several modalities sending at once `serve` starts more receiving processes and shares the
associations out among them.

- `serve`'s own receiver listens on the port and accepts every connection. Each accepted
  connection goes to the receiving process with the fewest connections open (`serve`'s own
  included), its socket passed over a Unix socket (SCM_RIGHTS): the one listening socket, so one
  connection cap, and no process picked by chance as SO_REUSEPORT would.
- A receiving process (`dicomnode receive-process`, started and restarted by `serve`) serves the
  connections it is given exactly as `serve`'s receiver does: the same checks, the same statuses,
  the same durable spool writes, TLS included.
- The index stays with `serve`: a receiving process sends the index row of each instance to `serve`
  before it acknowledges the instance, and `serve`'s index writer writes it with its own rows, in
  its batches (one writer: no two processes contend for SQLite's lock). A row sent is in the
  kernel's socket buffer even if its process is killed a moment later: nothing acknowledged is
  lost with a receiving process; if `serve` itself dies, the next start indexes from the spool.
- max_associations and max_associations_per_ae count the associations of all the processes
  (dicomnode.net.association_slots, a file they share); counters (Prometheus) are sent to `serve`
  and counted there.

Messages both ways are JSON objects on a SOCK_SEQPACKET socket pair (one message, one packet),
`kind` one of `Kind`.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import asdict
from enum import Enum

from dicomnode.net.receiver import Receiver
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.index import ReceivedInstance

log = logging.getLogger("dicomnode.receiver")

MAX_MESSAGE = 64 * 1024  # the largest message sent or read (one packet, one message: a longer one is cut)


class MessageError(ValueError):
    """A message that is not one (cut, not JSON, of no known kind)."""


class Kind(str, Enum):
    CONNECTION = "connection"  # serve -> process: an accepted connection, its socket attached
    READY = "ready"  # process -> serve: it takes connections now
    ROWS = "rows"  # process -> serve: the index rows of instances about to be acknowledged
    COUNT = "count"  # process -> serve: one more on a counter (`counter`, `label` when it has one)
    CLOSED = "closed"  # process -> serve: a connection it was given has closed


def send(sock: socket.socket, kind: Kind, fds: list[int] | None = None, flags: int = 0, **fields: object) -> None:
    data = json.dumps({"kind": kind.value, **fields}).encode()
    if len(data) > MAX_MESSAGE:
        raise MessageError(f"a {kind.value} message of {len(data)} bytes (at most {MAX_MESSAGE})")
    if fds:
        socket.send_fds(sock, [data], fds, flags)
    else:
        sock.send(data, flags)


def receive(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """The next message and the descriptors that came with it; (None, []) when the other end closed;
    MessageError for one that is not a message (its descriptors closed)."""
    data, fds, flags, _address = socket.recv_fds(sock, MAX_MESSAGE, 1)
    try:
        if not data:
            raise EOFError
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise MessageError(f"a message cut at {len(data)} bytes")
        try:
            message = json.loads(data)
            Kind(message["kind"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MessageError(f"not a message: {exc}") from None
    except (EOFError, MessageError) as exc:
        for fd in fds:
            socket.close(fd)
        if isinstance(exc, EOFError):
            return None, []
        raise
    return message, fds


# -- serve's side ------------------------------------------------------------------------------
class ProcessLink:
    """serve's end of one receiving process: what it has been given, and what it says."""

    def __init__(self, sock: socket.socket, pid: int, take_rows: Callable[[list[ReceivedInstance]], None],
                 count: Callable[[str, str | None], None]) -> None:
        self.sock, self.pid = sock, pid
        self._open = 0  # connections given and not yet said closed
        self.ready = threading.Event()
        self._take_rows, self._count = take_rows, count
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name=f"receive-process-{pid}", daemon=True)
        self._reader.start()

    @property
    def open(self) -> int:
        return self._open

    def hand_over(self, connection: socket.socket, address: tuple) -> None:
        """Give `connection` to the process (this process's copy is closed by the caller). Never
        waits: a process that does not read its link (stuck, or its buffer full) raises OSError,
        and the caller serves the connection itself."""
        with self._lock:
            send(self.sock, Kind.CONNECTION, [connection.fileno()], socket.MSG_DONTWAIT, address=list(address[:2]))
            self._open += 1

    def _read(self) -> None:
        while True:
            try:
                message, fds = receive(self.sock)
            except MessageError as exc:  # a bug, not a fault: the process is stopped and started again
                log.error("receiving process %d: %s; stopping it", self.pid, exc)
                break
            except OSError as exc:
                log.error("receiving process %d: its link failed: %s", self.pid, exc)
                break
            for fd in fds:
                socket.close(fd)
            if message is None:
                break
            try:
                kind = Kind(message["kind"])
                if kind is Kind.ROWS:
                    self._take_rows([ReceivedInstance(**row) for row in message["rows"]])
                elif kind is Kind.COUNT:
                    self._count(message["counter"], message.get("label"))
                elif kind is Kind.CLOSED:
                    with self._lock:
                        self._open -= 1
                elif kind is Kind.READY:
                    self.ready.set()
            except Exception:  # noqa: BLE001 - one bad message must not end the link
                log.exception("receiving process %d: message %r not understood", self.pid, message)
        self.ready.clear()
        try:  # the process sees the link closed and stops (its supervisor starts it again)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """No more connections: the process stops once it sees this; its last rows still come."""
        self.ready.clear()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def drain(self, timeout: float) -> bool:
        """Wait until the process has closed its end (every row it sent taken); False on timeout."""
        self._reader.join(timeout)
        if self._reader.is_alive():
            return False
        self.sock.close()
        return True


# -- a receiving process's side ----------------------------------------------------------------
class ServeLink:
    """A receiving process's end: rows and counts to serve."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def say(self, kind: Kind, **fields: object) -> None:
        with self._lock:
            send(self.sock, kind, **fields)

    def rows(self, items: list[ReceivedInstance]) -> None:
        """Index rows for serve, in one message; raises OSError if serve is gone and MessageError
        if they do not fit in one (the instances are then refused). Free text is cut to what the
        index keeps, so one row is well under a kilobyte."""
        self.say(Kind.ROWS, rows=[{**asdict(item), "series_description": item.series_description[:64],
                                   "calling_aet": item.calling_aet[:16]} for item in items])


class _Sent:
    """A counter (or counter with a label) whose increments are sent to serve."""

    def __init__(self, link: ServeLink, name: str, label: str | None = None) -> None:
        self._link, self._name, self._label = link, name, label

    def labels(self, label: str) -> _Sent:
        return _Sent(self._link, self._name, label)

    def inc(self) -> None:
        try:
            self._link.say(Kind.COUNT, counter=self._name, label=self._label)
        except OSError:  # serve is gone: this process is about to stop
            pass

    def set(self, _value: float) -> None:  # a gauge: serve reads the shared table itself
        pass


class SentCounters:
    """ReceiverCounters' names, counted in serve (dicomnode.net.receiver.ReceiverCounters)."""

    NAMES = ("instances_received", "instances_refused", "instances_dropped", "associations_open",
             "associations_rejected")

    def __init__(self, link: ServeLink) -> None:
        for name in self.NAMES:
            setattr(self, name, _Sent(link, name))


def run_receiving_process(config, control: socket.socket) -> None:  # noqa: ANN001 - a dicomnode Config
    """`dicomnode receive-process`: serve the connections serve gives over `control` until serve
    closes it (it stops, or died); then abort what is open and return."""
    # serve stops its receiving processes itself (it closes the link): under systemd, the SIGTERM
    # every process of the service gets would otherwise end this one before serve has stopped it
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    link = ServeLink(control)
    receiver = Receiver(config, make_sessionmaker(config.database_url), counters=SentCounters(link),
                        shared_slots=True, forward_rows=link.rows)

    def closed() -> None:
        try:
            link.say(Kind.CLOSED)
        except OSError:
            pass

    receiver.handed_closed = closed
    receiver.start_handed()
    link.say(Kind.READY)
    log.info("receiving process ready")
    try:
        while True:
            message, fds = receive(control)
            if message is None:
                break
            if Kind(message["kind"]) is Kind.CONNECTION and fds:
                receiver.take_connection(socket.socket(fileno=fds[0]), tuple(message["address"]))
            else:
                for fd in fds:
                    socket.close(fd)
    finally:
        receiver.stop()
        log.info("receiving process stopped")
