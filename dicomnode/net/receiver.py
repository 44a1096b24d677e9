"""The receiver: a pynetdicom Verification and Storage SCP for every storage SOP class pynetdicom
knows (dicomnode.imaging.sopclasses). The classes a model reads (CT, PET, MR, enhanced or not) are
accepted in the syntaxes the node can decode; every other class (SR, SEG, SC, PDF, presentation
states, RT objects, video) is stored as sent in any syntax, checked the same way, and never
starts a job (nor, with `drop_non_inputs`, is it kept).

An instance is acknowledged (0x0000) only after it is fsynced into the spool under its final name
(file and folder); its index row is written a moment later by the index writer's thread, in
batches, or, if the process dies first, at the next start from the spool (dicomnode.net.recovery);
a fetch (C-GET, WADO-RS) indexes before it answers. Any failure answers with a failure status
and a logged reason (below the disk watermark, association requests are rejected too, transient,
"local limit exceeded"):
  0xA700 out of resources (disk or database could not take it, or free space is below the
         watermark of dicomnode.store.diskspace: nothing is written; the sender may retry)
  0xA900 data set does not match the SOP class or instance of the request
  0xC000 cannot understand: whatever dicomnode.net.validation finds (the data set not in the
         negotiated syntax or cut short, invalid UIDs, a malformed attribute the later stages
         read, pixel data shorter than the image attributes say)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from tempfile import NamedTemporaryFile

import pynetdicom.dimse_messages
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dsutils import create_file_meta, decode, encode_file_meta
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config
from dicomnode.imaging.sopclasses import INPUT_CLASSES, STORAGE_CLASSES
from dicomnode.net import direct_store
from dicomnode.net.association_slots import LocalSlots, SharedSlots
from dicomnode.net.recovery import index_from_spool
from dicomnode.net.status import (
    CANNOT_UNDERSTAND,
    NO_SUCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    REJECT_LOCAL_LIMIT,
    REJECT_REASONS,
    SUCCESS,
)
from dicomnode.net.tls import NODELAY_HANDLER, server_tls_context
from dicomnode.net.uids import remember as remember_uids
from dicomnode.net.validation import Refused, check_instance
from dicomnode.net.verify import report_of
from dicomnode.store.commitments import record_report
from dicomnode.store.diskspace import Watermark
from dicomnode.store.files import start_writeback
from dicomnode.store.index import IndexWriter, ReceivedInstance
from dicomnode.store.spool import TEMP_PREFIX, Spool

log = logging.getLogger("dicomnode.receiver")

UNCOMPRESSED_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
# Lossless compressed syntaxes we accept when pydicom has a working decoder for them (the
# pylibjpeg plugins, pyjpegls, Pillow or GDCM): a syntax we could store but not read is refused
# at association time instead, so the sender can fall back to an uncompressed one.
LOSSLESS_SYNTAXES = [JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless]


def decodable(syntaxes: list[UID]) -> list[UID]:
    """Those of `syntaxes` (in order) that some installed pydicom pixel data decoder can read."""
    found = []
    for uid in syntaxes:
        try:
            if get_decoder(uid).is_available:
                found.append(uid)
        except NotImplementedError:  # pydicom has no decoder at all for this syntax
            pass
    return found


# Uncompressed first: pynetdicom's acceptor takes the first of ours that the requestor proposed.
TRANSFER_SYNTAXES = UNCOMPRESSED_SYNTAXES + decodable(LOSSLESS_SYNTAXES)
# Classes no model reads are stored as sent, never decoded: any encapsulated syntax will do (JPEG
# baseline secondary captures, MPEG video); Explicit VR Big Endian (retired) is not offered.
STORED_ONLY_SYNTAXES = UNCOMPRESSED_SYNTAXES + [
    UID(uid) for uid in AllTransferSyntaxes if UID(uid).is_encapsulated and UID(uid) not in UNCOMPRESSED_SYNTAXES
]

# The largest P-DATA-TF PDU the node receives (it says so in its A-ASSOCIATE-AC; the sender may send
# smaller ones). pynetdicom's default, 16 KiB, splits a 512 x 512 CT slice into 32 PDUs, each parsed
# in Python: 1 MiB ones cut the receiver's CPU per instance (bench/profile_receive.py).
MAX_PDU_BYTES = 1024 * 1024
LIMIT_LOG_SECONDS = 10.0  # association-limit rejections: one log line per this many seconds
IMAGE_CLASSES = INPUT_CLASSES  # their pixel data is read by the pipeline: it must be whole



# Chunked receive (pynetdicom's STORE_RECV_CHUNKED_DATASET): pynetdicom writes each C-STORE data
# set to a file as its P-DATA arrives (after a preamble and file meta) instead of collecting it in
# memory; the handler checks its header there and renames it into the spool. Both switches are
# pynetdicom's and process-wide: they are set while a Receiver runs, and its temporary files are put
# in the spool's incoming folder (the same file system: a rename, not a copy) of the last one started.
_META_READ = 64 * 1024  # the preamble and file meta are in these first bytes
_DEFER_BYTES = 64 * 1024  # header values longer than this are left in the file (pixel data)
_INCOMING: list[Path] = []  # the incoming folders of the receivers running in this process
_CHUNKED_BEFORE: list[bool] = []


_RECEIVING: dict[int, str] = {}  # an association's DUL thread -> the file it last began receiving into


def _incoming_temp_file(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - tempfile.NamedTemporaryFile's
    for folder in reversed(_INCOMING):
        if folder.is_dir():
            kwargs.update(dir=folder, prefix=f"{TEMP_PREFIX}{os.getpid()}-")  # whose: Spool.remove_incoming_of
            break
    received = _Receiving(NamedTemporaryFile(*args, **kwargs))
    _RECEIVING[threading.get_ident()] = received.name  # called in the association's DUL thread
    return received


class _Receiving:
    """The file pynetdicom receives a data set into. A write that fails (a full disk) would abort
    the association inside pynetdicom, without a word to the handler or the receiver's association
    count, and leave the file: instead the file is removed, the rest of the data set is read and
    dropped, and the handler answers 0xA700 (`failed`)."""

    def __init__(self, wrapped) -> None:  # noqa: ANN001 - tempfile's _TemporaryFileWrapper
        self._wrapped, self.name = wrapped, wrapped.name
        self.file = self  # pynetdicom flushes `.file`
        self.failed: OSError | None = None

    def write(self, data: bytes) -> int:
        self._unless_failed(self._wrapped.write, data)
        return len(data)

    def flush(self) -> None:
        self._unless_failed(self._wrapped.file.flush)

    def _unless_failed(self, call, *args) -> None:  # noqa: ANN001, ANN002
        if self.failed is not None:
            return
        try:
            call(*args)
        except OSError as exc:
            self.failed = exc
            try:
                self._wrapped.close()
            except OSError:
                pass
            Path(self.name).unlink(missing_ok=True)

    def __getattr__(self, name: str):  # noqa: ANN204 - fileno, close and the rest: the file's own
        return getattr(self._wrapped, name)


def _drop_unfinished(dul_thread: int | None) -> None:
    """When a connection closes: the file its last data set was being received into, if it is
    still there (an abort or a full disk mid-data set; pynetdicom removes only those it handed over)."""
    name = _RECEIVING.pop(dul_thread, None) if dul_thread is not None else None
    if name is not None:
        Path(name).unlink(missing_ok=True)


pynetdicom.dimse_messages.NamedTemporaryFile = _incoming_temp_file  # only chunked receive creates files there
remember_uids()  # each UID an association carries checked once per process (dicomnode.net.uids)


def _open_incoming() -> _Receiving:
    """The file dicomnode.net.direct_store receives a data set into (as pynetdicom's chunked receive)."""
    return _incoming_temp_file(delete=False, mode="wb", suffix=".part")  # not a .dcm until it is stored


def _receive_chunked(incoming: Path, on: bool) -> None:
    if on:
        if not _INCOMING:
            _CHUNKED_BEFORE.append(_config.STORE_RECV_CHUNKED_DATASET)
        _INCOMING.append(incoming)
        _config.STORE_RECV_CHUNKED_DATASET = True
    elif incoming in _INCOMING:
        _INCOMING.remove(incoming)
        if not _INCOMING:
            _config.STORE_RECV_CHUNKED_DATASET = _CHUNKED_BEFORE.pop()


def _body_offset(data: bytes) -> int:
    """Where the data set starts in a file pynetdicom wrote: after the preamble, "DICM" and the file
    meta, whose group length (0002,0000) it always writes first."""
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("no file meta before the data set")
    return 144 + int.from_bytes(data[140:144], "little")


def patient_details(ds) -> str:  # noqa: ANN001 - a pydicom Dataset
    """For log lines only with `log_patient_details = true`: by default the node logs UIDs only."""
    return (f"patient {ds.get('PatientName', '')} ID {ds.get('PatientID', '')} born {ds.get('PatientBirthDate', '')} "
            f"accession {ds.get('AccessionNumber', '')}")


@dataclass(frozen=True)
class Stored:
    """What became of one instance offered to the node: `status` as answered (0x0000: in the spool
    and the index); the rest only when stored."""

    status: int
    study_uid: str = ""
    sop_instance_uid: str = ""
    dataset: Dataset | None = None
    dropped: bool = False  # acknowledged, not stored: a class no model reads, with drop_non_inputs


class InstanceStore:
    """The one way an instance becomes the node's: checked (dicomnode.net.validation), written
    durably into the spool, indexed. The receiver's C-STORE SCP, the C-STORE sub-operations of a
    C-GET on the node's own association, and a WADO-RS fetch all store through it, so a fetched
    instance is held exactly as a pushed one (`calling_aet`: the sender, or the fetch source)."""

    def __init__(self, config: Config, sessions: sessionmaker, deferred_index: bool = False,
                 forward_rows: Callable[[list[ReceivedInstance]], None] | None = None) -> None:
        self.config = config
        self.sessions = sessions
        self.spool = Spool(config.spool_dir)
        self.watermark = Watermark(config.node.data_dir, config.node)
        # group commit across the associations storing at once; deferred (the receiver's): the row
        # is written just after the acknowledgement, or at the next start (dicomnode.net.recovery);
        # forwarded (a receiving process's): sent to serve's index writer before the acknowledgement
        self.index = IndexWriter(sessions, deferred=deferred_index or forward_rows is not None, forward=forward_rows)

    def store_event(self, event, calling_aet: str) -> Stored:  # noqa: ANN001 - pynetdicom C-STORE event
        """A C-STORE request, as received on an association (the receiver's, or a C-GET's)."""
        syntax, request = UID(event.context.transfer_syntax), event.request
        request_class, request_sop = str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID or "")
        received = getattr(request, "_dataset_file", None)
        if received is not None and not syntax.is_deflated:  # chunked receive: pynetdicom wrote the file
            return self.store_received(received, syntax, request_class, request_sop, calling_aet)
        if received is not None:  # deflated: inflated in memory to check it; the file as sent is kept
            received.flush()
            if getattr(received, "failed", None) is not None:
                log.error("could not store instance %s from %s: %s (0xA700)", request_sop, calling_aet,
                          received.failed)
                return Stored(OUT_OF_RESOURCES)
            data = Path(received.name).read_bytes()
            body = data[_body_offset(data):]
            return self.store(lambda: decode(BytesIO(body), False, True, True), body[:8], syntax, request_class,
                              request_sop, lambda: data, calling_aet, size=len(body))
        sent = request.DataSet
        return self.store(lambda: event.dataset, bytes(sent.getbuffer()[:8]), syntax, request_class, request_sop,
                          event.encoded_dataset, calling_aet, size=sent.getbuffer().nbytes)

    def store_received(self, received, syntax: UID, request_class: str, request_sop: str,  # noqa: ANN001
                       calling: str) -> Stored:
        """A data set pynetdicom's chunked receive wrote into the spool's incoming folder (preamble,
        its file meta, the data set as sent; `received` still open for writing): its header read
        (bulk values left in the file), checked, and the file itself fsynced and renamed into the
        spool: no decode, no second copy."""
        temp = Path(received.name)
        received.flush()
        if getattr(received, "failed", None) is not None:
            log.error("could not store instance %s from %s: %s (0xA700)", request_sop, calling, received.failed)
            return Stored(OUT_OF_RESOURCES)
        start_writeback(received.fileno())  # written out while the header is checked: the fsync below waits less
        with open(temp, "rb") as fh:
            start = _body_offset(fh.read(_META_READ))
            size = os.fstat(fh.fileno()).st_size
            fh.seek(start)
            head = fh.read(8)
            fh.seek(start)

            def dataset() -> Dataset:
                ds = read_dataset(fh, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=_DEFER_BYTES)
                # where pydicom reads a deferred value from, if one is asked for (a long sequence, say
                # the per-frame functional groups of a multi-frame image): this open file, which
                # outlives the rename into the spool
                ds.filename, ds.buffer, ds.fileobj_type, ds.timestamp = str(temp), fh, open, None
                return ds

            def place(final: Path) -> None:
                os.fsync(received.fileno())
                if temp.parent == self.spool.incoming:
                    os.replace(temp, final)
                else:  # another receiver's incoming folder (tests run several in one process)
                    data = temp.read_bytes()
                    self.spool.write_file(final, data)

            return self.store(dataset, head, syntax, request_class, request_sop, None, calling, size=size,
                              place=place)

    def store_encoded(self, body: bytes, syntax: UID, sop_class_uid: str, sop_instance_uid: str,
                      calling_aet: str) -> Stored:
        """A data set encoded in `syntax` (no file meta), as if it came in a C-STORE request for
        `sop_class_uid` / `sop_instance_uid` (what a query announced it to be)."""
        syntax = UID(syntax)

        def dataset() -> Dataset:
            return decode(BytesIO(body), syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)

        def encoded() -> bytes:
            meta = create_file_meta(sop_class_uid=UID(sop_class_uid), sop_instance_uid=UID(sop_instance_uid),
                                    transfer_syntax=syntax)
            return b"".join((b"\x00" * 128, b"DICM", encode_file_meta(meta), body))

        return self.store(dataset, body[:8], syntax, sop_class_uid, sop_instance_uid, encoded, calling_aet,
                          size=len(body))

    def store(self, dataset: Callable[[], Dataset], head: bytes, syntax: UID, request_class: str, request_sop: str,
              encoded: Callable[[], bytes] | None, calling: str, size: int | None = None,
              place: Callable[[Path], None] | None = None) -> Stored:
        """Check, spool and index one data set; the status to answer (logged when it is a refusal).
        With drop_non_inputs, an instance of a class no model reads is acknowledged, not stored
        (`dropped`: the caller counts and says it). The file is `encoded()` written durably, or
        what `place(final path)` puts there durably (the chunked receive's file, renamed)."""
        try:
            ds = dataset()
            facts = check_instance(ds, head, syntax, request_class, request_sop, IMAGE_CLASSES, size=size)
        except Refused as refused:
            log.warning(
                "refused instance %s from %s: %s (0x%04X)", request_sop, calling, refused.reason, refused.status
            )
            return Stored(refused.status)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on a malformed data set
            log.warning("refused instance %s from %s: unreadable data set: %s (0xC000)", request_sop, calling, exc)
            return Stored(CANNOT_UNDERSTAND)
        study_uid, series_uid, sop_uid = facts.study_uid, facts.series_uid, facts.sop_instance_uid
        sop_class, modality = str(ds.SOPClassUID), facts.modality
        if self.watermark.low():  # logged once per crossing by the watermark
            return Stored(OUT_OF_RESOURCES)
        if self.config.node.drop_non_inputs and sop_class not in INPUT_CLASSES:
            return Stored(SUCCESS, study_uid, sop_uid, ds, dropped=True)
        resent = self.spool.path_for(study_uid, series_uid, sop_uid).exists()  # acknowledged before: indexed
        try:
            if place is None:
                path = self.spool.write(study_uid, series_uid, sop_uid, encoded(), sync_folder=False)
            else:
                path = self.spool.place(study_uid, series_uid, sop_uid, place)
        except OSError as exc:
            log.error("could not store instance %s of study %s: %s (0xA700)", sop_uid, study_uid, exc)
            return Stored(OUT_OF_RESOURCES)
        try:
            self.index.record(  # fsyncs the folder; commits the row, or (deferred) hands it to its thread
                ReceivedInstance(
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_instance_uid=sop_uid,
                    sop_class_uid=sop_class,
                    transfer_syntax_uid=str(syntax),
                    modality=modality,
                    series_number=facts.series_number,
                    series_description=facts.series_description,
                    path=str(path),
                    calling_aet=calling,
                    counts_as_arrival=sop_class in INPUT_CLASSES,
                ),
                path.parent,
            )
        except Exception as exc:  # noqa: BLE001 - the database refused (locked, gone, full): transient
            log.error("could not index instance %s of study %s: %s (0xA700)", sop_uid, study_uid, exc)
            if not resent:  # refused: its file must not stay behind, unindexed (a resent one keeps its row)
                self.spool.remove(path)
            return Stored(OUT_OF_RESOURCES)
        log.debug("stored %s %s of study %s from %s", modality, sop_uid, study_uid, calling)
        return Stored(SUCCESS, study_uid, sop_uid, ds)


class ReceiverCounters:
    """What the receiver counts as it happens."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.instances_received = Counter(
            "dicomnode_instances_received", "Instances stored and acknowledged with 0x0000", registry=registry)
        self.instances_refused = Counter(
            "dicomnode_instances_refused",
            "C-STORE requests answered with a failure status",
            ["status"],
            registry=registry,
        )
        self.instances_dropped = Counter(
            "dicomnode_instances_dropped",
            "Instances of a class no model reads, acknowledged and not stored (drop_non_inputs = true)",
            registry=registry,
        )
        self.associations_open = Gauge(
            "dicomnode_associations_open", "Associations requested and not yet closed", registry=registry)
        self.associations_rejected = Counter(
            "dicomnode_associations_rejected", "Association requests rejected", ["reason"], registry=registry
        )


class _SupportedContexts(list):
    """The receiver's supported presentation contexts, as its pynetdicom server holds them.
    pynetdicom deep-copies them for every association it accepts (negotiation sets each copy's
    result and roles): about 170 contexts with their transfer syntaxes, each UID validated again by
    pydicom as it is rebuilt, most of the node's time per association (bench/bench_association_setup.py).
    A context's own fields are a UID, numbers, flags and a list of UIDs, all immutable but the
    list: a copy of each context with its own list is the same copy for a fraction of the time."""

    def __deepcopy__(self, memo: dict) -> list:
        copies = []
        for context in self:
            twin = copy.copy(context)
            twin._transfer_syntax = list(context._transfer_syntax)  # noqa: SLF001 - the one mutable field
            copies.append(twin)
        return copies


class _HandedOver(OSError):
    """An accepted connection was given to another receiving process: nothing for this one to serve
    (socketserver passes over an OSError from get_request)."""


class _HandedConnections(pynetdicom.transport.ThreadedAssociationServer):
    """A receiving process's server: it listens on nothing; serve gives it connections
    (dicomnode.net.receive_processes)."""

    def server_bind(self) -> None:
        self.socket.close()

    def server_activate(self) -> None:
        pass

    def server_close(self) -> None:
        pass


SLOTS_FILE = ".associations.json"  # in data_dir: the associations of all receiving processes


class Receiver:
    """Accepts associations from allowed AEs and stores what they send.

    With [node] receive_processes > 1, serve's Receiver (`shared_slots`) gives accepted
    connections to the receiving processes added with `add_process`; a receiving process's Receiver
    (`forward_rows`, started with `start_handed`) serves the connections `take_connection` gives it
    (dicomnode.net.receive_processes)."""

    def __init__(self, config: Config, sessions: sessionmaker, counters: ReceiverCounters | None = None,
                 deferred_index: bool = True, shared_slots: bool = False,
                 forward_rows: Callable[[list[ReceivedInstance]], None] | None = None) -> None:
        self.config = config
        self.sessions = sessions
        self.store = InstanceStore(config, sessions, deferred_index=deferred_index, forward_rows=forward_rows)
        self.spool, self.watermark = self.store.spool, self.store.watermark
        self.counters = counters or ReceiverCounters()
        self._server = None
        self._lock = threading.Lock()
        self._stored: dict[int, dict[str, int]] = {}  # association -> study -> instances stored
        self._dropped: dict[int, dict[str, int]] = {}  # the same, acknowledged and dropped (drop_non_inputs)
        self._requested: dict[int, str] = {}  # associations that sent an A-ASSOCIATE-RQ (not closed) -> calling AE
        self._connected: dict[int, object] = {}  # associations whose connection is open -> the Association
        self.max_associations = config.node.max_associations
        self.max_per_ae = config.node.max_associations_per_ae or max(config.node.max_associations // 2, 1)
        # the associations open (requested, not closed), against the two limits above
        self.slots: LocalSlots | SharedSlots = (
            SharedSlots(config.node.data_dir / SLOTS_FILE, self.max_associations, self.max_per_ae)
            if shared_slots else LocalSlots(self.max_associations, self.max_per_ae))
        self._links: list = []  # serve's: the receiving processes (receive_processes.ProcessLink)
        # serve's: the connections it kept (weakly: pynetdicom may drop one without closing it)
        self._served_here: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self.handed_closed: Callable[[], None] | None = None  # a receiving process's: a given connection closed
        self.max_connections = max(16 * config.node.max_associations, 256)  # silent ones included
        self._connections_full = False
        self._limit_logged_at, self._limit_unsaid = -LIMIT_LOG_SECONDS, 0
        self._patients: dict[str, str] = {}  # study -> patient, only with log_patient_details
        self.ae = AE(ae_title=config.node.ae_title)
        self.ae.require_called_aet = True
        if config.node.allowed_calling_aets:
            self.ae.require_calling_aet = list(config.node.allowed_calling_aets)
        else:
            log.warning("allowed_calling_aets is empty: any calling AE title may store to this node")
        self.ae.network_timeout = config.node.network_timeout_seconds
        self.ae.acse_timeout = config.node.network_timeout_seconds
        self.ae.dimse_timeout = config.node.network_timeout_seconds
        # pynetdicom counts every connection, silent ones too: its limit is the connection cap, and
        # _on_requested applies max_associations to the associations actually requested.
        self.ae.maximum_associations = self.max_connections
        self.ae.maximum_pdu_size = MAX_PDU_BYTES
        self.ae.add_supported_context(Verification)
        # Storage commitment reports (N-EVENT-REPORT) for the worker's requests (verify = "commitment"):
        # the PACS opens the association and acts as the SCP of the Push Model (Orthanc proposes that
        # role), or proposes no roles at all.
        self.ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        for sop_class in STORAGE_CLASSES:  # every storage class pynetdicom knows
            self.ae.add_supported_context(
                sop_class, TRANSFER_SYNTAXES if sop_class in INPUT_CLASSES else STORED_ONLY_SYNTAXES)

    # -- C-STORE ---------------------------------------------------------------------------
    def handle_store(self, event) -> int:  # noqa: ANN001 - pynetdicom event
        """pynetdicom's EVT_C_STORE: the requests dicomnode.net.direct_store leaves to pynetdicom
        (a deflated data set; all of them with direct_store = false)."""
        return self._counted(event.assoc, self.store.store_event(event, event.assoc.requestor.ae_title))

    def store_direct(self, assoc, syntax: UID, sop_class: str, sop_instance: str, received) -> int:  # noqa: ANN001
        """A C-STORE request dicomnode.net.direct_store received into `received`."""
        return self._counted(assoc, self.store.store_received(received, syntax, sop_class, sop_instance,
                                                              assoc.requestor.ae_title))

    def _counted(self, assoc, stored: Stored) -> int:  # noqa: ANN001 - pynetdicom association
        status = self._note(assoc, stored)
        if status == SUCCESS:
            self.counters.instances_received.inc()
        else:
            self.counters.instances_refused.labels(f"0x{status:04X}").inc()
        return status

    def _note(self, assoc, stored: Stored) -> int:  # noqa: ANN001 - pynetdicom association
        if stored.status != SUCCESS:
            return stored.status
        if stored.dropped:
            with self._lock:  # said per association when it closes
                per_study = self._dropped.setdefault(id(assoc), {})
                per_study[stored.study_uid] = per_study.get(stored.study_uid, 0) + 1
            self.counters.instances_dropped.inc()
            return SUCCESS
        with self._lock:
            per_study = self._stored.setdefault(id(assoc), {})
            per_study[stored.study_uid] = per_study.get(stored.study_uid, 0) + 1
            if self.config.node.log_patient_details:
                self._patients[stored.study_uid] = patient_details(stored.dataset)
        return SUCCESS

    def _on_event_report(self, event) -> tuple[int, None]:  # noqa: ANN001 - pynetdicom event
        """A storage commitment report: written for the worker (dicomnode.store.commitments), 0x0000."""
        calling = event.assoc.requestor.ae_title
        try:
            report = report_of(event)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("unreadable N-EVENT-REPORT from %s: %s", calling, exc)
            return CANNOT_UNDERSTAND, None
        if report is None:
            log.warning("N-EVENT-REPORT from %s for %s: not a storage commitment report", calling,
                        event.request.AffectedSOPClassUID)
            return NO_SUCH_SOP_CLASS, None
        try:
            record_report(self.sessions, report, str(calling))
        except Exception as exc:  # noqa: BLE001 - the database refused: the PACS may send it again
            log.error("storage commitment report from %s not recorded: %s", calling, exc)
            return PROCESSING_FAILURE, None
        return SUCCESS, None

    def _on_echo(self, event) -> int:  # noqa: ANN001
        log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
        return SUCCESS

    def _on_requested(self, event) -> None:  # noqa: ANN001
        """Before negotiating: below the disk watermark (it logs the crossing), or with
        max_associations already open, reject (transient, local limit exceeded)."""
        if self.watermark.low():
            self._reject(event, "disk-space-low")
            log.debug("association from %s rejected: disk space low", event.assoc.requestor.address)
            return
        calling = str(event.assoc.requestor.primitive.calling_ae_title).strip()  # not yet set on the requestor
        with self._lock:  # the slot and its note together: the connection may close in another thread
            try:
                why = self.slots.take(str(id(event.assoc)), calling)
            except OSError as exc:  # the shared table cannot be read or written (a full disk)
                why = f"the association table cannot be written: {exc}"
            if why is None:
                self._requested[id(event.assoc)] = calling
        if why is None:
            self.counters.associations_open.set(self.slots.count())
        else:
            self._reject(event, "association-limit")
            self._say_limited(f"association from {calling} ({event.assoc.requestor.address}) rejected: {why}")

    def _say_limited(self, message: str) -> None:
        """Log a rejection, at most one line per LIMIT_LOG_SECONDS (a flood is not a log flood)."""
        now = time.monotonic()
        with self._lock:
            if now - self._limit_logged_at < LIMIT_LOG_SECONDS:
                self._limit_unsaid += 1
                return
            unsaid, self._limit_unsaid, self._limit_logged_at = self._limit_unsaid, 0, now
        log.warning("%s%s", message, f" ({unsaid} more rejected before this, not logged)" if unsaid else "")

    def _reject(self, event, reason: str) -> None:  # noqa: ANN001
        event.assoc.acse.send_reject(*REJECT_LOCAL_LIMIT)
        self.counters.associations_rejected.labels(reason).inc()
        event.assoc.kill()

    def _on_connection_open(self, event) -> None:  # noqa: ANN001
        """An accepted socket has no timeout: a peer that sends half a PDU and stalls would hold its
        thread and slot for ever. With one, the read fails after network_timeout_seconds and
        pynetdicom closes the connection."""
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.settimeout(self.config.node.network_timeout_seconds)
        self._close_vanished()
        with self._lock:
            self._connected[id(event.assoc)] = event.assoc
        if self.config.node.direct_store:
            direct_store.attach(event.assoc, self.store_direct, _open_incoming)

    def _on_connection_closed(self, event) -> None:  # noqa: ANN001
        self._connection_gone(event.assoc)

    def _connection_gone(self, assoc) -> bool:  # noqa: ANN001 - a pynetdicom Association
        """Once per connection: its unfinished file dropped, its association slot given back."""
        with self._lock:
            if self._connected.pop(id(assoc), None) is None:
                return False  # already done (EVT_CONN_CLOSE and _close_vanished may both come)
            requested = self._requested.pop(id(assoc), None)
            if requested is not None:
                try:
                    self.slots.give_back(str(id(assoc)))
                except OSError as exc:
                    log.error("association table: slot of %s not given back: %s", requested, exc)
        direct_store.detach(assoc)
        _drop_unfinished(getattr(assoc.dul, "ident", None))
        if requested is not None:
            self.counters.associations_open.set(self.slots.count())
        if self.handed_closed is not None:
            self.handed_closed()
        return True

    def _close_vanished(self) -> None:
        """Connections whose association and DUL threads both ended without EVT_CONN_CLOSE: pynetdicom's
        DUL reactor, on an exception of its own, sends an A-ABORT and returns without it. Their slots
        would stay taken for good (max_associations such faults and the node refuses everyone), so each
        new connection first closes them here."""
        with self._lock:
            gone = [assoc for assoc in self._connected.values()
                    if assoc.ident is not None and not assoc.is_alive() and not assoc.dul.is_alive()]
        for assoc in gone:
            with contextlib.suppress(OSError, AttributeError):
                assoc.dul.socket.close()  # pynetdicom left it open: the peer sees the connection end
            if self._connection_gone(assoc):
                log.warning("association from %s ended without closing its connection (a fault in pynetdicom): "
                            "its slot given back", assoc.requestor.ae_title or assoc.requestor.address)

    def _accept_connection(self, _request, client_address) -> bool:  # noqa: ANN001
        """socketserver's verify_request: beyond max_connections (silent peers included), a new
        connection is closed at once; the crossing and the return are logged once each."""
        full = self._connections_open() >= self.max_connections
        if full != self._connections_full:
            self._connections_full = full
            if full:
                log.warning("%d connections open (16 x max_associations): closing new ones (%s:%s first)",
                            self.max_connections, *client_address[:2])
            else:
                log.info("connections below %d again: accepting new ones", self.max_connections)
        if full:
            self.counters.associations_rejected.labels("connection-limit").inc()
        return not full

    def _on_rejected(self, event) -> None:  # noqa: ANN001
        rejection = event.assoc.acceptor.primitive
        reason = (
            REJECT_REASONS.get(rejection.diagnostic, "local-limit")
            if rejection.result_source == 0x01
            else "local-limit"
        )
        self.counters.associations_rejected.labels(reason).inc()
        requestor = event.assoc.requestor
        log.warning(
            "association rejected: calling AE %r called AE %r from %s",
            requestor.ae_title,
            event.assoc.acceptor.ae_title,
            requestor.address,
        )

    def _on_accepted(self, event) -> None:  # noqa: ANN001
        requestor = event.assoc.requestor
        log.info("association from %s (%s)", requestor.ae_title, requestor.address)

    def _on_closed(self, event) -> None:  # noqa: ANN001
        with self._lock:
            per_study = self._stored.pop(id(event.assoc), {})
            dropped = self._dropped.pop(id(event.assoc), {})
        how = "aborted" if event.event is evt.EVT_ABORTED else "released"
        for study_uid, count in dropped.items():
            log.info("study %s: %d instances of classes no model reads acknowledged and not stored "
                     "(drop_non_inputs = true), from %s", study_uid, count, event.assoc.requestor.ae_title)
        for study_uid, count in per_study.items():
            patient = self._patients.pop(study_uid, None)
            log.info(
                "study %s: %d instances stored from %s (association %s)%s",
                study_uid,
                count,
                event.assoc.requestor.ae_title,
                how,
                f"; {patient}" if patient else "",
            )

    # -- lifecycle -------------------------------------------------------------------------
    def _handlers(self) -> list:
        return [
            NODELAY_HANDLER,
            (evt.EVT_CONN_OPEN, self._on_connection_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_N_EVENT_REPORT, self._on_event_report),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
        ]

    def _prepare_receiving(self) -> None:
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
            # pynetdicom's standard handlers format a log line for every PDU and DIMSE message that
            # its logger (at WARNING in `serve`) then drops: not bound for new associations
            _config.LOG_HANDLER_LEVEL = "none"
        try:
            self.spool.incoming.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # then pynetdicom writes to the system's temporary folder; the spool refuses
            log.error("spool folder %s cannot be used: %s", self.spool.incoming, exc)

    def start(self) -> None:
        removed = self.spool.remove_leftovers()
        if removed:
            log.info("removed %d temporary files a previous run left unacknowledged", removed)
        recovered = index_from_spool(self.spool, self.sessions)
        if recovered:
            log.warning("indexed %d acknowledged instances a previous run left out of the index", recovered)
        if isinstance(self.slots, SharedSlots):
            self.slots.clear()
            associations_open = self.counters.associations_open
            if hasattr(associations_open, "set_function"):  # every receiving process's, read when scraped
                associations_open.set_function(self.slots.count)
        self._prepare_receiving()
        _receive_chunked(self.spool.incoming, True)
        tls = self.config.node.tls
        with self._lock:
            try:
                self._server = self.ae.start_server(
                    (self.config.node.bind, self.config.node.port),
                    block=False,
                    evt_handlers=self._handlers(),
                    ssl_context=server_tls_context(tls) if tls else None,
                )
            except BaseException:
                _receive_chunked(self.spool.incoming, False)
                raise
            self._server.verify_request = self._accept_connection
            self._server.get_request = functools.partial(self._get_request, self._server)
            self._server.contexts = _SupportedContexts(self._server.contexts)
        log.info(
            "receiver %s listening on %s:%d%s",
            self.config.node.ae_title,
            self.config.node.bind,
            self.config.node.port,
            " (DICOM TLS" + (", client certificates required)" if tls.require_client_certificate else ")")
            if tls
            else "",
        )

    # -- several receiving processes (dicomnode.net.receive_processes) ---------------------
    def add_process(self, link) -> None:  # noqa: ANN001 - a receive_processes.ProcessLink
        """A receiving process to give connections to (once it says it is ready)."""
        with self._lock:
            self._links.append(link)

    def remove_process(self, link) -> None:  # noqa: ANN001
        with self._lock:
            if link in self._links:
                self._links.remove(link)
        if isinstance(self.slots, SharedSlots):
            self.slots.forget_process(link.pid)
        try:
            removed = self.spool.remove_incoming_of(link.pid)
        except OSError as exc:
            log.error("incoming files of receiving process %d not removed: %s", link.pid, exc)
        else:
            if removed:
                log.info("removed %d unacknowledged incoming files of receiving process %d", removed, link.pid)

    def _connections_open(self) -> int:
        """This process's connections and those given to the receiving processes, not yet closed."""
        return len(self.ae.active_associations) + sum(max(link.open, 0) for link in list(self._links))

    def _open_here(self) -> int:
        """The connections this process kept and has not closed (counted from the accept, not from
        the association's thread, which starts later)."""
        with self._lock:
            return sum(1 for sock in list(self._served_here) if sock.fileno() != -1)

    def _get_request(self, server) -> tuple[socket.socket, tuple]:  # noqa: ANN001 - serve's pynetdicom server
        """socketserver's get_request: accept the next connection and serve it here, or give it to
        the receiving process with the fewest connections open (raising _HandedOver)."""
        connection, address = server.socket.accept()
        links = [link for link in list(self._links) if link.ready.is_set()]
        if links:
            least = min(links, key=lambda link: link.open)
            if least.open < self._open_here():
                if not self._accept_connection(connection, address):
                    connection.close()
                    raise _HandedOver("connection cap")
                try:
                    least.hand_over(connection, address)
                except OSError as exc:  # the process just died: serve it here
                    log.warning("receiving process %d cannot take a connection: %s", least.pid, exc)
                else:
                    connection.close()
                    raise _HandedOver(f"given to process {least.pid}")
        if server.ssl_context:
            connection = server.ssl_context.wrap_socket(connection, server_side=True)
        with self._lock:
            self._served_here.add(connection)
        return connection, address

    def start_handed(self) -> None:
        """A receiving process's start: ready for the connections `take_connection` gives it (serve
        has cleaned the spool and indexed what it held; this process listens on nothing)."""
        self._prepare_receiving()
        _receive_chunked(self.spool.incoming, True)
        tls = self.config.node.tls
        with self._lock:
            self._server = self.ae.make_server(
                (self.config.node.bind, self.config.node.port),
                evt_handlers=self._handlers(),
                ssl_context=server_tls_context(tls) if tls else None,
                server_class=_HandedConnections,
            )
            self._server.contexts = _SupportedContexts(self._server.contexts)

    def take_connection(self, connection: socket.socket, address: tuple) -> None:
        """Serve `connection` (accepted by serve) on a thread of its own, as pynetdicom's server would."""
        threading.Thread(target=self._serve_given, args=(connection, address), daemon=True,
                         name=f"given-{address[0]}:{address[1]}").start()

    def _serve_given(self, connection: socket.socket, address: tuple) -> None:
        server = self._server
        try:
            if server is None:
                raise OSError("stopping")
            connection.setblocking(True)
            if server.ssl_context:  # the TLS handshake here, not in the thread taking connections
                connection = server.ssl_context.wrap_socket(connection, server_side=True)
            server.finish_request(connection, address)  # pynetdicom starts the association's thread
        except Exception as exc:  # noqa: BLE001 - a failed handshake: this connection only
            log.warning("connection from %s:%s closed: %s", address[0], address[1], exc)
            try:
                connection.close()
            except OSError:
                pass
            if self.handed_closed is not None:
                self.handed_closed()

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.config.node.port

    @property
    def listening(self) -> bool:
        return self._server is not None

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Stop taking associations (the open ones are aborted), the receiving processes too; then
        index every row acknowledged, theirs included."""
        with self._lock:
            server, self._server = self._server, None
            links, self._links = list(self._links), []
        if server is not None:
            if isinstance(server, _HandedConnections):
                for assoc in server.active_associations:
                    assoc.abort()
            else:
                server.shutdown()
            _receive_chunked(self.spool.incoming, False)
        for link in links:
            link.close()
        for link in links:
            if not link.drain(drain_seconds):
                log.error("receiving process %d did not stop in %.0f s: rows it sent after this are indexed "
                          "at the next start", link.pid, drain_seconds)
        self.store.index.close()  # the rows of what was acknowledged
