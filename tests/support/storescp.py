"""A pynetdicom Storage SCP on loopback for the delivery tests: which SOP classes and transfer
syntaxes it accepts, what it answers, and what it received."""

from __future__ import annotations

import threading

from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, evt

from dicomnode.testing.ports import free_port


class StoreSCP:
    """A pynetdicom Storage SCP on a free loopback port, accepting only `sop_classes` in
    `transfer_syntaxes` (default: pynetdicom's uncompressed ones); each C-STORE answers the next
    of `statuses` (then 0x0000). The first `late` requests are answered only once the same
    instance is sent again, so the sender has given up on them and their responses are lost.
    `stored` lists what it kept, `received` the data sets by UID, `answered` counts responses."""

    def __init__(self, sop_classes, statuses=(), late=0, transfer_syntaxes=DEFAULT_TRANSFER_SYNTAXES,  # noqa: ANN001
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.statuses = list(statuses)
        self.late = late
        self.requests: list[str] = []
        self.stored: list[str] = []
        self.received: dict = {}
        self.answered = 0
        self._lock = threading.Condition()
        ae = AE(ae_title="TESTSCP")
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, transfer_syntaxes)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event) -> int:  # noqa: ANN001
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.requests.append(uid)
            self._lock.notify_all()
            if self.late:
                self.late -= 1
                times_sent = self.requests.count(uid)
                self._lock.wait_for(lambda: self.requests.count(uid) > times_sent, timeout=60)
            status = self.statuses.pop(0) if self.statuses else 0x0000
            if status == 0x0000 and uid not in self.stored:
                self.stored.append(uid)
                self.received[uid] = event.dataset
                self.received[uid].file_meta = event.file_meta
            self.answered += 1
            self._lock.notify_all()
        return status

    def wait_answered(self, count: int, timeout: float = 60) -> bool:
        """Wait until `count` requests have had their response (late ones included)."""
        with self._lock:
            return self._lock.wait_for(lambda: self.answered >= count, timeout=timeout)

    def close(self) -> None:
        self._server.shutdown()
