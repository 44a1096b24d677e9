"""A TLS terminator in front of a local HTTP server, as a hospital puts nginx in front of its
PACS's DICOMweb: https on a free loopback port, each connection forwarded byte for byte to the
plain-HTTP port behind it. (Debian's Orthanc 1.10 crashes on its own `SslEnabled` with OpenSSL 3,
so the tests put this in front of it.)"""

from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path

from dicomnode.testing.ports import free_port


class TlsProxy:
    """`with TlsProxy(server_pem, 8042) as proxy:` https://127.0.0.1:{proxy.port} -> http://127.0.0.1:8042."""

    def __init__(self, server_pem: Path, backend_port: int) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(server_pem))
        self.backend_port = backend_port
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            backend_reader, backend_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, backend_writer), self._pipe(backend_reader, writer))

    def __enter__(self) -> "TlsProxy":
        self._thread.start()
        start = asyncio.start_server(self._client, "127.0.0.1", self.port, ssl=self.context)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            asyncio.run_coroutine_threadsafe(self._server.wait_closed(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
