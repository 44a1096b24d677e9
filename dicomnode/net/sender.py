"""The sender: C-STORE result files to a destination, instance by instance, until each is
acknowledged.

A lost or failed response is retried on a fresh association (an instance keeps its SOP
Instance UID, so the PACS sees one object however often it is sent); a status the PACS
gives for good (e.g. the SOP class refused) is reported, never skipped silently.

A compressed file (a JPEG 2000 SEG) is proposed in its own transfer syntax and in Explicit
VR Little Endian; a destination that accepts only the latter gets it decompressed (pydicom),
with the same SOP Instance UID.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification

from dicomnode.config import Destination
from dicomnode.net.scu import responses_to_the_caller
from dicomnode.net.status import SOP_CLASS_NOT_SUPPORTED, STORED, is_permanent
from dicomnode.net.tls import NODELAY_HANDLER, client_tls_args

log = logging.getLogger("dicomnode.sender")

# What `echo` proposes: Verification in pynetdicom's default transfer syntaxes. `store_each` proposes,
# per SOP class and transfer syntax of the files it sends, `proposed_syntaxes(syntax)`.
ECHO_CONTEXT = build_context(Verification)

class SendError(Exception):
    """Some instances could not be delivered; the message says which and why."""


@dataclass(frozen=True)
class Delivered:
    path: Path
    sop_instance_uid: str
    status: int


def _ae(calling_aet: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_aet)
    # connection_timeout bounds the TCP connect and the TLS handshake too (pynetdicom: none by default)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = ae.connection_timeout = timeout
    return ae


def _associate(ae: AE, destination: Destination):  # noqa: ANN202 - pynetdicom Association
    """Request an association with `destination`, over DICOM TLS when it has a `tls` table."""
    return responses_to_the_caller(ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                                                evt_handlers=[NODELAY_HANDLER], tls_args=client_tls_args(destination)))


def echo(destination: Destination, calling_aet: str, timeout: float = 10.0) -> int:
    """C-ECHO a destination; return the status (0x0000 is success)."""
    ae = _ae(calling_aet, timeout)
    ae.add_requested_context(ECHO_CONTEXT.abstract_syntax, ECHO_CONTEXT.transfer_syntax)
    assoc = _associate(ae, destination)
    if not assoc.is_established:
        raise SendError(
            f"{destination.name}: association with {destination.ae_title}@{destination.host}:{destination.port} "
            f"not established"
        )
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
    outcomes = store_each(destination, paths, calling_aet, timeout=timeout, tries_per_instance=tries_per_instance)
    refused = [f"{o.sop_instance_uid}: {o.error}" for o in outcomes if not o.ok]
    if refused:
        raise SendError(f"{destination.name}: " + "; ".join(refused))
    return [Delivered(o.path, o.sop_instance_uid, int(o.status)) for o in outcomes]


@dataclass(frozen=True)
class Outcome:
    """What became of one file sent to one destination by `store_each`."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    tries: int  # C-STORE requests sent (0: none, e.g. no association)
    status: int | None  # the last response's status; None: no response, or nothing sent
    error: str | None = None  # None: stored (status is a success or a warning)
    permanent: bool = False  # sending the same object again cannot help (SOP class refused...)
    failed_tries: tuple[str, ...] = ()  # what went wrong on each failed C-STORE try, in order
    sop_class_refused: bool = False  # no presentation context for the SOP class, or status 0x0122

    @property
    def ok(self) -> bool:
        return self.error is None


def store_each(
    destination: Destination,
    paths: list[Path],
    calling_aet: str,
    timeout: float = 30.0,
    tries_per_instance: int | Mapping[Path, int] = 3,
    on_sent: Callable[[Outcome], None] | None = None,  # called with each file's outcome as it is known
) -> list[Outcome]:
    """C-STORE every file (in order) and say, per file, whether the destination stored it; never raises
    for a network problem. A lost response (no answer, association aborted) or a failed status is
    retried, up to `tries_per_instance` C-STORE requests per file (a number, or per path), over a fresh
    association when the old one is in doubt: an object is never skipped without an outcome saying why.
    A SOP class / transfer syntax the destination accepts no presentation context for is a permanent
    failure of that object, at once."""
    datasets = {Path(p): dcmread(p) for p in paths}
    budget = {
        p: (tries_per_instance.get(p, 3) if isinstance(tries_per_instance, Mapping) else tries_per_instance)
        for p in datasets
    }
    pending = [p for p in datasets if budget[p] > 0]
    tries = {p: 0 for p in datasets}
    history: dict[Path, list[str]] = {p: [] for p in datasets}
    outcomes: dict[Path, Outcome] = {}

    def done(
        path: Path,
        status: int | None,
        error: str | None = None,
        permanent: bool = False,
        sop_class_refused: bool = False,
    ) -> None:
        ds = datasets[path]
        outcomes[path] = Outcome(
            path,
            str(ds.SOPInstanceUID),
            str(ds.SOPClassUID),
            tries[path],
            status,
            error,
            permanent,
            tuple(history[path]),
            sop_class_refused,
        )
        pending.remove(path)
        if on_sent is not None:
            on_sent(outcomes[path])

    while pending:
        ae = _ae(calling_aet, timeout)
        for sop_class, syntax in dict.fromkeys(
            (datasets[p].SOPClassUID, datasets[p].file_meta.TransferSyntaxUID) for p in pending
        ):
            ae.add_requested_context(sop_class, proposed_syntaxes(syntax))
        assoc = _associate(ae, destination)
        if not assoc.is_established:
            # Accepted, but with no presentation context at all: pynetdicom aborts at once. The
            # objects of a rejected context are refused for good; anything else may pass later.
            negotiated = assoc.is_aborted and not assoc.is_rejected and not assoc.accepted_contexts
            refused = {cx.abstract_syntax for cx in assoc.rejected_contexts} if negotiated else set()
            why = "rejected" if assoc.is_rejected else "not established"
            message = f"association with {destination.ae_title}@{destination.host}:{destination.port} {why}"
            for path in list(pending):
                if datasets[path].SOPClassUID in refused:
                    done(path, None, _no_context(destination, datasets[path]), permanent=True, sop_class_refused=True)
                else:
                    done(path, None, message)
            break
        try:
            while pending:
                path = pending[0]
                ds = datasets[path]
                syntax = _accepted_syntax(assoc, ds)
                if syntax is None:  # pipeline.dispatch.fallback_for may send another object instead
                    done(path, None, _no_context(destination, ds), permanent=True, sop_class_refused=True)
                    continue
                if syntax != ds.file_meta.TransferSyntaxUID:
                    try:
                        ds = datasets[path] = uncompressed(ds)
                    except (RuntimeError, ValueError, NotImplementedError) as exc:
                        done(
                            path, None, f"not sent: cannot decompress for {destination.ae_title}: {exc}", permanent=True
                        )
                        continue
                tries[path] += 1
                try:
                    status = assoc.send_c_store(ds)
                except ValueError as exc:  # pynetdicom found no usable presentation context after all
                    done(path, None, f"not sent: {exc}", permanent=True)
                    continue
                if status and int(status.Status) in STORED:
                    done(path, int(status.Status))
                    continue
                code = int(status.Status) if status and "Status" in status else None
                what = f"status 0x{code:04X}" if code is not None else "no response"
                history[path].append(what)
                log.warning("%s: C-STORE of %s: %s (try %d)", destination.name, ds.SOPInstanceUID, what, tries[path])
                if code is not None and is_permanent(code):
                    done(
                        path,
                        code,
                        f"refused: {what}",
                        permanent=True,
                        sop_class_refused=code == SOP_CLASS_NOT_SUPPORTED,
                    )
                elif tries[path] >= budget[path]:
                    done(path, code, f"{what} after {tries[path]} {'try' if tries[path] == 1 else 'tries'}")
                if code is None or not assoc.is_established:
                    break  # the association is in doubt: go on over a fresh one
        finally:
            if assoc.is_established:
                assoc.release()
            elif not (assoc.is_aborted or assoc.is_released):
                assoc.abort()
    for path in datasets:  # files given no try at all (a budget of 0)
        if path not in outcomes:
            ds = datasets[path]
            outcomes[path] = Outcome(
                path, str(ds.SOPInstanceUID), str(ds.SOPClassUID), 0, None, "not sent: no tries left"
            )
    return [outcomes[p] for p in datasets]


def proposed_syntaxes(syntax: str) -> list[UID]:
    """The transfer syntaxes a file is offered in: its own, and Explicit VR Little Endian when it is compressed."""
    return [UID(syntax)] + ([ExplicitVRLittleEndian] if UID(syntax).is_compressed else [])


def _accepted_syntax(assoc, ds: Dataset) -> UID | None:  # noqa: ANN001 - a pynetdicom Association
    """The transfer syntax `ds` goes in over `assoc`: its own when accepted, else Explicit VR
    Little Endian when that is; None when no context for its SOP class was accepted."""
    accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts if cx.abstract_syntax == ds.SOPClassUID}
    return next((s for s in proposed_syntaxes(ds.file_meta.TransferSyntaxUID) if s in accepted), None)


def uncompressed(ds: Dataset) -> Dataset:
    """`ds` with its pixel data decoded into Explicit VR Little Endian, in place, keeping its SOP
    Instance UID. 1-bit frames (a BINARY SEG) are bit-packed again: pydicom's decompress would
    leave them one byte per pixel."""
    if ds.BitsAllocated == 1:
        packed = pack_bits(ds.pixel_array)
        del ds.PixelData
        ds.add_new("PixelData", "OB", packed)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    else:
        ds.decompress(generate_instance_uid=False)
    return ds


def _no_context(destination: Destination, ds: Dataset) -> str:
    sop_class = UID(ds.SOPClassUID)
    syntaxes = " or ".join(s.name for s in proposed_syntaxes(ds.file_meta.TransferSyntaxUID))
    return (
        f"SOP class rejected: {destination.ae_title} accepted no presentation context for "
        f"{sop_class.name or 'SOP class'} ({sop_class}) in {syntaxes}"
    )
