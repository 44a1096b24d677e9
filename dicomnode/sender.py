"""The sender: C-STORE result files to a destination, instance by instance, until each is
acknowledged.

A lost or failed response is retried on a fresh association (an instance keeps its SOP
Instance UID, so the PACS sees one object however often it is sent); a status the PACS
gives for good (e.g. the SOP class refused) is reported, never skipped silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomnode.config import Destination
from dicomnode.netutil import NODELAY_HANDLER

log = logging.getLogger("dicomnode.sender")

SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the warnings (stored)


class SendError(Exception):
    """Some instances could not be delivered; the message says which and why."""


@dataclass(frozen=True)
class Delivered:
    path: Path
    sop_instance_uid: str
    status: int


def _ae(calling_aet: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = timeout
    return ae


def echo(destination: Destination, calling_aet: str, timeout: float = 10.0) -> int:
    """C-ECHO a destination; return the status (0x0000 is success)."""
    ae = _ae(calling_aet, timeout)
    ae.add_requested_context(Verification)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, evt_handlers=[NODELAY_HANDLER])
    if not assoc.is_established:
        raise SendError(f"{destination.name}: association with {destination.ae_title}@{destination.host}:{destination.port} not established")
    try:
        status = assoc.send_c_echo()
        if not status:
            raise SendError(f"{destination.name}: no C-ECHO response")
        return int(status.Status)
    finally:
        assoc.release()


def send_files(
    destination: Destination,
    paths: list[Path],
    calling_aet: str,
    timeout: float = 30.0,
    tries_per_instance: int = 3,
) -> list[Delivered]:
    """C-STORE every file; raise SendError naming each instance not acknowledged."""
    datasets = {Path(p): dcmread(p) for p in paths}
    pending = list(datasets)
    tries = {p: 0 for p in pending}
    delivered: list[Delivered] = []
    refused: list[str] = []
    while pending:
        ae = _ae(calling_aet, timeout)
        for ds in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in map(datasets.get, pending)}:
            ae.add_requested_context(ds[0], [ds[1]])
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, evt_handlers=[NODELAY_HANDLER])
        if not assoc.is_established:
            raise SendError(
                f"{destination.name}: association with {destination.ae_title}@{destination.host}:{destination.port} "
                f"not established ({len(pending)} instances not sent)"
            )
        try:
            while pending:
                path = pending[0]
                ds = datasets[path]
                tries[path] += 1
                try:
                    status = assoc.send_c_store(ds)
                except ValueError as exc:  # no accepted presentation context for this SOP class
                    refused.append(f"{ds.SOPInstanceUID}: {exc}")
                    pending.pop(0)
                    continue
                if status and int(status.Status) in SUCCESS_STATUSES:
                    delivered.append(Delivered(path, str(ds.SOPInstanceUID), int(status.Status)))
                    pending.pop(0)
                    continue
                what = f"status 0x{int(status.Status):04X}" if status else "no response"
                log.warning("%s: C-STORE of %s: %s (try %d)", destination.name, ds.SOPInstanceUID, what, tries[path])
                if tries[path] >= tries_per_instance:
                    refused.append(f"{ds.SOPInstanceUID}: {what} after {tries[path]} tries")
                    pending.pop(0)
                if not status or not assoc.is_established:
                    break  # the association is in doubt: go on over a fresh one
        finally:
            if assoc.is_established:
                assoc.release()
            elif not (assoc.is_aborted or assoc.is_released):
                assoc.abort()
    if refused:
        raise SendError(f"{destination.name}: " + "; ".join(refused))
    return delivered
