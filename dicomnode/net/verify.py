"""Proof of delivery from a destination (its `verify`), the network side; the states are
dicomnode.pipeline.delivery's.

Storage Commitment, push model (PS3.4 Annex J): the node is the SCU. `request_commitment` sends
an N-ACTION (Action Type 1) with a Transaction UID and the objects' ReferencedSOPSequence; the
destination answers the N-ACTION at once and sends its report (N-EVENT-REPORT, Event Type 1: all
committed, 2: failures exist, with FailedSOPSequence and a Failure Reason per object) later, on
this association while it is open or on a new one to the node's receiver (Orthanc always opens a
new one, to the modality it knows under the node's AE title). The association is held open for up
to `wait` seconds, until `reported()` says the report is in (by either path), so a prompt
destination is confirmed in the same pass.

Query: `missing_by_query` lists the study on the destination at IMAGE level (C-FIND, or QIDO-RS for
a DICOMweb destination; dicomnode.net.retrieve / dicomweb, as for a source) and returns the SOP
Instance UIDs not found.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from dicomnode.config import Destination, Source
from dicomnode.net.status import SUCCESS
from dicomnode.net.tls import NODELAY_HANDLER, client_tls_args
from dicomnode.store.commitments import Report

log = logging.getLogger("dicomnode.sender")

COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP Instance of the Push Model
REQUEST_COMMITMENT = 1  # Action Type ID
POLL_SECONDS = 0.05
# What `request_commitment` proposes: the Push Model, SCU role (no role selection), pynetdicom's default syntaxes
COMMITMENT_CONTEXT = build_context(StorageCommitmentPushModel)


def report_of(event) -> Report | None:  # noqa: ANN001 - a pynetdicom N-EVENT-REPORT event
    """The report in an N-EVENT-REPORT request; None when it is not a storage commitment report."""
    request = event.request
    if str(request.AffectedSOPClassUID) != StorageCommitmentPushModel:
        return None
    ds = event.event_information
    committed = tuple(str(item.ReferencedSOPInstanceUID) for item in ds.get("ReferencedSOPSequence", []))
    failed = {str(item.ReferencedSOPInstanceUID): (int(item.FailureReason) if "FailureReason" in item else None)
              for item in ds.get("FailedSOPSequence", [])}
    return Report(str(ds.TransactionUID), committed, failed)


def request_commitment(
    destination: Destination,
    calling_aet: str,
    transaction_uid: str,
    objects: Iterable[tuple[str, str]],  # (SOP Class UID, SOP Instance UID)
    *,
    timeout: float,
    on_report: Callable[[Report], None],
    reported: Callable[[], bool],
    wait: float,
) -> str | None:
    """Send the commitment request; None when the destination accepted it, else why not (no
    association, no context for the Push Model, no response, a failure status). A report that comes
    on this association goes to `on_report` (answered 0x0000)."""
    ae = AE(ae_title=calling_aet)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(COMMITMENT_CONTEXT.abstract_syntax, COMMITMENT_CONTEXT.transfer_syntax)
    came = threading.Event()

    def on_event_report(event) -> tuple[int, None]:  # noqa: ANN001 - pynetdicom event
        report = report_of(event)
        if report is not None:
            on_report(report)
            came.set()
        return SUCCESS, None

    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=[NODELAY_HANDLER, (evt.EVT_N_EVENT_REPORT, on_event_report)],
                         tls_args=client_tls_args(destination))
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    if not assoc.is_established:
        if assoc.is_aborted and not assoc.is_rejected and not assoc.accepted_contexts:
            return (f"storage commitment not requested: {where} accepted no context for the Storage Commitment "
                    "Push Model")
        why = "rejected" if assoc.is_rejected else "not established"
        return f"storage commitment not requested: association with {where} {why}"
    try:
        request = Dataset()
        request.TransactionUID = transaction_uid
        items = []
        for sop_class, sop_instance in objects:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            items.append(item)
        request.ReferencedSOPSequence = items
        try:
            status, _reply = assoc.send_n_action(request, REQUEST_COMMITMENT, StorageCommitmentPushModel,
                                                 COMMITMENT_INSTANCE)
        except ValueError as exc:  # no accepted context for the Push Model
            return f"storage commitment not requested: {exc}"
        if not status:
            return f"storage commitment request to {where}: no response"
        code = int(status.Status)
        if code != SUCCESS:
            return f"storage commitment request refused by {where}: status 0x{code:04X}"
        log.info("%s: storage commitment requested, transaction %s", destination.name, transaction_uid)
        waited = 0.0
        while waited < wait and assoc.is_established and not came.is_set() and not reported():
            came.wait(POLL_SECONDS)
            waited += POLL_SECONDS
        return None
    finally:
        if assoc.is_established:
            assoc.release()
        elif not (assoc.is_aborted or assoc.is_released):
            assoc.abort()


def missing_by_query(destination: Destination, calling_aet: str, study_uid: str, uids: Iterable[str],
                     timeout: float) -> set[str]:
    """The SOP Instance UIDs of `uids` the destination does not list in the study (C-FIND at IMAGE
    level, QIDO-RS for a DICOMweb one). Raises dicomnode.net.retrieve.SourceError when it cannot ask."""
    from dicomnode.net.dicomweb import DicomwebSource  # here: they import the receiver, which imports this module
    from dicomnode.net.retrieve import DimseSource

    fields = ("name", "ae_title", "host", "port", "url", "authorization_file", "authorization_env", "tls")
    source = Source(**{key: getattr(destination, key) for key in fields}, timeout_seconds=timeout)
    client = DicomwebSource(source) if source.is_dicomweb else DimseSource(source, calling_aet)
    found = client.announce(study_uid).instances
    return {uid for uid in uids if uid not in found}
