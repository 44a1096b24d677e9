"""Real notification targets for the tests, on free loopback ports: an HTTP receiver
(http.server in a thread), an HL7 MLLP listener (python-hl7's hl7.mllp server on an asyncio loop in a
thread) that parses each message and answers an ACK, and a silent listener that accepts connections
and never answers (a target that hangs). Each records what it got and wakes waiters."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from hl7.mllp import start_hl7_server


class _Recorder:
    def __init__(self) -> None:
        self.got: list = []
        self._changed = threading.Condition()

    def _add(self, item: object) -> None:
        with self._changed:
            self.got.append(item)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Until `count` items arrived (True), or `timeout` seconds passed (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self.got) >= count, timeout)


class HttpReceiver(_Recorder):
    """Records each POST as (path, headers, parsed JSON body); answers `status` (204 by default)."""

    def __init__(self, status: int = 204) -> None:
        super().__init__()
        self.status = status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver._add((self.path, dict(self.headers), json.loads(body)))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *_args) -> None:  # noqa: ANN002 - quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="http-receiver")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "HttpReceiver":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:  # noqa: ANN002
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


class MllpListener(_Recorder):
    """An HL7 v2 MLLP listener: records each message as received (the text, and parsed) and answers
    an ACK with the next code of `codes` (the last one repeated): e.g. ("AE", "AA")."""

    def __init__(self, codes: tuple[str, ...] = ("AA",)) -> None:
        super().__init__()
        self.codes = list(codes)
        self.raw: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mllp-listener")
        self.port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def handle(reader, writer) -> None:  # noqa: ANN001 - hl7.mllp's streams
            try:
                while not reader.at_eof():
                    message = await reader.readmessage()
                    code = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
                    self.raw.append(str(message))
                    self._add(message)
                    writer.writemessage(message.create_ack(code, message_id=f"ACK{len(self.got)}",
                                                           application="RIS"))
                    await writer.drain()
            except asyncio.IncompleteReadError:
                pass
            finally:
                writer.close()

        async def start() -> None:
            self._server = await start_hl7_server(handle, "127.0.0.1", 0, encoding="utf-8")
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def __enter__(self) -> "MllpListener":
        self._thread.start()
        assert self._ready.wait(10), "MLLP listener did not start"
        return self

    def __exit__(self, *_exc) -> None:  # noqa: ANN002
        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class SilentListener(_Recorder):
    """Accepts TCP connections and never reads nor answers: a target that hangs (records each
    connection accepted)."""

    def __init__(self) -> None:
        super().__init__()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True, name="silent-listener")

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._held.append(conn)
            self._add(conn.getpeername())

    def __enter__(self) -> "SilentListener":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:  # noqa: ANN002
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() in the thread (Linux)
        except OSError:
            pass
        self.sock.close()
        for conn in self._held:
            conn.close()
        self._thread.join(10)


def until(condition: Callable[[], object], timeout: float, what: str, step: Callable[[], object] | None = None,
          wake: threading.Event | None = None) -> object:
    """Call `step` (a sender's pass) and check `condition` until it holds; between rounds wait on
    `wake` (or 0.1 s): a poll of a condition, not a fixed wait."""
    deadline = time.monotonic() + timeout
    wake = wake or threading.Event()
    while time.monotonic() < deadline:
        if step is not None:
            step()
        found = condition()
        if found:
            return found
        wake.wait(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")
