"""A pynetdicom Storage SCP on loopback for the delivery tests: which SOP classes and transfer
syntaxes it accepts, what it answers, and what it received."""

from __future__ import annotations

import threading
import time

from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, evt

from dicomnode.localpacs import free_port


class StoreSCP:
    """A pynetdicom Storage SCP on a free loopback port, accepting only `sop_classes` in
    `transfer_syntaxes` (default: pynetdicom's uncompressed ones); each C-STORE answers the next
    of `statuses` (then 0x0000). `stored` lists what it kept, `received` the data sets by UID."""

    def __init__(self, sop_classes, statuses=(), delays=(), transfer_syntaxes=DEFAULT_TRANSFER_SYNTAXES):  # noqa: ANN001
        self.port = free_port()
        self.statuses = list(statuses)
        self.delays = list(delays)  # seconds before answering, per request (then none)
        self.requests: list[str] = []
        self.stored: list[str] = []
        self.received: dict = {}
        self._lock = threading.Lock()
        ae = AE(ae_title="TESTSCP")
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, transfer_syntaxes)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event) -> int:  # noqa: ANN001
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            delay = self.delays.pop(0) if self.delays else 0
        time.sleep(delay)  # past the sender's timeout: its response is lost
        with self._lock:
            self.requests.append(uid)
            status = self.statuses.pop(0) if self.statuses else 0x0000
            if status == 0x0000 and uid not in self.stored:
                self.stored.append(uid)
                self.received[uid] = event.dataset
                self.received[uid].file_meta = event.file_meta
        return status

    def close(self) -> None:
        self._server.shutdown()
