"""C-STORE requests taken straight from the socket into the spool, by the association's own reading
thread: written by hand, because pynetdicom's way costs the receiver most of its time per instance.

pynetdicom does everything else on the receiver's associations: it negotiates them, applies the
limits, serves C-ECHO, N-EVENT-REPORT and release, aborts, times out, and speaks TLS. Once an
association is established, each P-DATA-TF PDU it reads goes through `_read_pdu_data` below. A PDU
that starts a C-STORE request on a storage context (its command whole in the first PDV, the data
set not deflated), and the PDUs that carry the rest of that request's data set, are taken here:

- the data set is written as it arrives into a file in the spool's incoming folder, after the same
  preamble and file meta pynetdicom's chunked receive writes;
- once its last fragment is in, the receiver's handler stores the file (checked, fsynced, renamed,
  indexed: dicomnode.net.receiver) and its status is answered in a C-STORE response, sent on the
  socket by this same thread (its seven elements encoded here: the bytes pynetdicom's message
  classes encode, which a test checks, without their millisecond of Python).

PDVs are taken one by one: from the first that does not start a C-STORE request this code can
take (a C-ECHO, a command split over several PDVs, a deflated data set, a message pynetdicom holds
part of), the rest of the PDU is given to pynetdicom exactly as it would have read it. A command,
or another context's data, before the last fragment of the data set being received breaks the
DIMSE rules: that data set is dropped and the association aborted (an invalid PDU, as pynetdicom
answers one). An error here aborts the association the same way; an error in the handler answers
0xC211, as pynetdicom's does. What this saves, per instance, is
pynetdicom's PDU objects, its state machine events, and the hand-offs between its reading thread
and the association's thread, each of which waits on a polling loop (bench/profile_receive.py,
bench/bench_receive.py: the figures are in the README's receive section).

pynetdicom's events for PDUs and DIMSE messages (EVT_PDU_RECV, EVT_DIMSE_RECV, EVT_C_STORE and the
like) are not triggered for what is taken here: the receiver binds none of them but EVT_C_STORE,
whose handler is called directly. This relies on pynetdicom's reading loop as of the version
pinned in pyproject.toml (3.0.4).
"""

from __future__ import annotations

import logging
import select
import struct
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dul import DULServiceProvider

from dicomnode.imaging.sopclasses import STORAGE_CLASSES
from dicomnode.net.status import HANDLER_FAILED

log = logging.getLogger("dicomnode.receiver")

C_STORE_RQ = 0x0001
NO_DATA_SET = 0x0101  # (0000,0800) CommandDataSetType: no data set follows
P_DATA_TF_TYPE = 0x04
ESTABLISHED = "Sta6"  # the DICOM upper layer state machine's "association established, ready"

_PDU_HEADER = struct.Struct(">BBL")  # PDU type, reserved, length
_PDV_HEADER = struct.Struct(">LBB")  # item length, presentation context ID, message control header

# handler(association, transfer syntax, SOP class UID, SOP instance UID, file) -> status: the file
# holds preamble, file meta and the data set as sent, and is still open for writing
StoreHandler = Callable[[object, UID, str, str, object], int]


class ProtocolError(Exception):
    """What the peer sent breaks the DIMSE message rules (PS3.7 6.3.1): the association is aborted."""


class StoreCommand(NamedTuple):
    """What the node uses of a C-STORE request's command set."""

    message_id: int
    sop_class: str
    sop_instance: str


_COMMAND_ELEMENT = struct.Struct("<HHL")  # group, element, value length (Implicit VR Little Endian)
_US = struct.Struct("<H")
# (0000,xxxx) elements of a C-STORE request (PS3.7 9.3.1.1)
_AFFECTED_SOP_CLASS, _COMMAND_FIELD, _MESSAGE_ID, _DATA_SET_TYPE, _AFFECTED_SOP_INSTANCE = (
    0x0002, 0x0100, 0x0110, 0x0800, 0x1000)


def store_command(fragment: memoryview | bytes) -> StoreCommand | None:
    """The C-STORE request in a whole command set (`fragment`: its bytes, Implicit VR Little
    Endian), decoded by hand: None when it is another command, has no data set, or holds anything
    this decoding does not take plainly (an element of another group or with an undefined length, a
    value cut short, a tag twice, a number of the wrong length, a UID with several values). Those
    go to pynetdicom, which judges them. The values are what pynetdicom's decoding gives
    (tests/net/test_direct_store.py): pydicom's reading is most of a millisecond per command."""
    values: dict[int, bytes] = {}
    offset, size = 0, len(fragment)
    while offset < size:
        if offset + 8 > size:
            return None
        group, element, length = _COMMAND_ELEMENT.unpack_from(fragment, offset)
        offset += 8
        if group != 0 or offset + length > size or element in values:  # an undefined length is > size
            return None
        values[element] = bytes(fragment[offset:offset + length])
        offset += length
    numbers = [values.get(element, b"") for element in (_COMMAND_FIELD, _MESSAGE_ID, _DATA_SET_TYPE)]
    if any(len(number) != 2 for number in numbers):
        return None
    command_field, message_id, data_set_type = (_US.unpack(number)[0] for number in numbers)
    if command_field != C_STORE_RQ or data_set_type == NO_DATA_SET:
        return None
    uids = []
    for element in (_AFFECTED_SOP_CLASS, _AFFECTED_SOP_INSTANCE):
        if element not in values:
            return None
        text = values[element].decode("latin-1").rstrip("\0 ")  # as pydicom reads a UI value
        if "\\" in text:
            return None
        uids.append(text)
    return StoreCommand(message_id, *uids)


class _Request:
    """A C-STORE request whose data set is being received."""

    def __init__(self, context_id: int, command: StoreCommand, file) -> None:  # noqa: ANN001 - the incoming file
        self.context_id, self.command, self.file = context_id, command, file


class DirectStore:
    """One association's C-STORE requests, taken by its DUL thread (see the module's docstring).
    `open_file()` makes the file a data set is received into (in the spool's incoming folder);
    `handler` stores it and answers its status."""

    def __init__(self, assoc, handler: StoreHandler, open_file: Callable[[], object]) -> None:  # noqa: ANN001
        self.assoc, self.handler, self.open_file = assoc, handler, open_file
        self._syntaxes: dict[int, UID | None] = {}  # context ID -> its transfer syntax, None: not taken here
        self._request: _Request | None = None
        self._spare = None  # the next data set's incoming file, made ahead (make_spare)

    def _syntax(self, context_id: int) -> UID | None:
        """The transfer syntax of a storage context of this association whose requests are taken here."""
        if context_id not in self._syntaxes:
            context = self.assoc._accepted_cx.get(context_id)  # noqa: SLF001 - pynetdicom's negotiated contexts
            syntax = UID(context.transfer_syntax[0]) if context is not None and context.transfer_syntax else None
            taken = (context is not None and syntax is not None and not syntax.is_deflated
                     and str(context.abstract_syntax) in STORAGE_CLASSES)
            self._syntaxes[context_id] = syntax if taken else None
        return self._syntaxes[context_id]

    def take(self, body: memoryview) -> int:
        """Take what it can of one P-DATA-TF PDU (`body`: after its 6-byte header), PDV by PDV: the
        offset in `body` where what is left for pynetdicom starts (len(body): all taken; 0: none).
        ProtocolError: a PDV no request can be given (a command, or another context's data, before
        the last fragment of the data set being received); that request is dropped."""
        pdvs = _pdvs(body)
        if not pdvs:
            return 0
        for context_id, control, start, end in pdvs:
            request = self._request
            if request is None:
                if not self._start(context_id, control, body[start:end]):
                    return start - 6  # from this PDV's item header on: pynetdicom's
                continue
            if control & 1 or context_id != request.context_id:
                self._drop()
                raise ProtocolError(f"PDV of context {context_id} (control header 0x{control:02X}) before the last "
                                    f"fragment of the data set of context {request.context_id}")
            request.file.write(body[start:end])
            if control & 2:  # the data set's last fragment
                self._request = None
                self._answer(request, self._store(request))
        if self._request is None:
            self.make_spare()
        return len(body)

    def _start(self, context_id: int, control: int, fragment: memoryview) -> bool:
        """Begin a C-STORE request if this PDV is one's whole command on a context taken here, and
        pynetdicom holds no part of another message; False: it is pynetdicom's."""
        syntax = self._syntax(context_id)
        if control & 3 != 3 or syntax is None or self.assoc.dimse.message is not None:
            return False
        command = store_command(fragment)
        if command is None:
            return False  # a command set pynetdicom will judge (and answer or abort)
        try:
            meta = file_preamble_and_meta(command.sop_class, command.sop_instance, syntax)
        except UnicodeEncodeError:  # not ASCII: pynetdicom's to judge
            return False
        self._request = _Request(context_id, command, self._take_spare() or self.open_file())
        self._request.file.write(meta)
        return True

    def _take_spare(self):  # noqa: ANN202 - the incoming file made ahead, if any
        spare, self._spare = self._spare, None
        return spare

    def make_spare(self) -> None:
        """Make the next data set's incoming file now, while the peer reads the answer and sends
        the next request, rather than after that request has come."""
        if self._spare is None and self._request is None:
            try:
                self._spare = self.open_file()
            except OSError:  # a full disk, say: the next request tries again, and answers for it
                self._spare = None

    def _store(self, request: _Request) -> int:
        command = request.command
        try:
            return self.handler(self.assoc, self._syntaxes[request.context_id], command.sop_class,
                                command.sop_instance, request.file)
        except Exception:  # noqa: BLE001 - as pynetdicom's attempt(): an error answers, and the node goes on
            log.exception("C-STORE of %s failed in the receiver (0x%04X)", command.sop_instance, HANDLER_FAILED)
            return HANDLER_FAILED
        finally:
            _close_and_remove(request.file)

    def _answer(self, request: _Request, status: int) -> None:
        # the state machine's state, not assoc.is_established: pynetdicom sets that flag after the
        # A-ASSOCIATE-AC is sent (a first request can be stored before it), and clears it when it
        # kills the association, while the state only changes in this thread, after this answer
        if self.assoc.dul.state_machine.current_state != ESTABLISHED:
            return
        command = request.command
        self.assoc.dul.socket.send(store_response_pdu(
            request.context_id, command.message_id, command.sop_class, command.sop_instance, status))

    def _drop(self) -> None:
        """The request being received will not be stored (its file removed)."""
        if self._request is not None:
            _close_and_remove(self._request.file)
            self._request = None

    def close(self) -> None:
        self._drop()
        spare = self._take_spare()
        if spare is not None:
            _close_and_remove(spare)


def _element(group_element: int, value: bytes) -> bytes:
    """One element of a command set: Implicit VR Little Endian, tag (0000,xxxx)."""
    return struct.pack("<HHL", 0, group_element, len(value)) + value


def _uid(uid: str) -> bytes:
    value = str(uid).encode("ascii")
    return value + b"\x00" * (len(value) % 2)  # a UI value is padded to even length with a NUL


def store_response_pdu(context_id: int, message_id: int, sop_class: str, sop_instance: str, status: int) -> bytes:
    """The P-DATA-TF PDU of a C-STORE response (PS3.7 9.3.1.2): one PDV, the whole command set.
    pynetdicom's C_STORE_RSP encodes the same bytes (tests/net/test_direct_store.py), in a
    millisecond of Python per answer."""
    elements = b"".join((
        _element(0x0002, _uid(sop_class)),  # AffectedSOPClassUID
        _element(0x0100, struct.pack("<H", 0x8001)),  # CommandField: C-STORE-RSP
        _element(0x0120, struct.pack("<H", message_id)),  # MessageIDBeingRespondedTo
        _element(0x0800, struct.pack("<H", NO_DATA_SET)),  # CommandDataSetType
        _element(0x0900, struct.pack("<H", status)),  # Status
        _element(0x1000, _uid(sop_instance)),  # AffectedSOPInstanceUID
    ))
    command = _element(0x0000, struct.pack("<L", len(elements))) + elements  # CommandGroupLength
    pdv = _PDV_HEADER.pack(len(command) + 2, context_id, 0x03) + command  # a command, its last fragment
    return _PDU_HEADER.pack(P_DATA_TF_TYPE, 0, len(pdv)) + pdv


def _meta_element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One file meta element: Explicit VR Little Endian, tag (0002,xxxx)."""
    if vr == b"OB":  # a 4-byte length after two reserved bytes
        return struct.pack("<HH", 2, tag) + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return struct.pack("<HH", 2, tag) + vr + struct.pack("<H", len(value)) + value


def file_preamble_and_meta(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    """What pynetdicom's chunked receive writes before a data set (create_file_meta and pydicom's
    write_file_meta_info, tests/net/test_direct_store.py): the preamble, "DICM" and the file meta."""
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    elements = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),  # FileMetaInformationVersion
        _meta_element(0x0002, b"UI", _uid(sop_class)),  # MediaStorageSOPClassUID
        _meta_element(0x0003, b"UI", _uid(sop_instance)),  # MediaStorageSOPInstanceUID
        _meta_element(0x0010, b"UI", _uid(syntax)),  # TransferSyntaxUID
        _meta_element(0x0012, b"UI", _uid(PYNETDICOM_IMPLEMENTATION_UID)),  # ImplementationClassUID
        _meta_element(0x0013, b"SH", version + b" " * (len(version) % 2)),  # ImplementationVersionName
    ))
    return b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<L", len(elements))) + elements


def _pdvs(body: memoryview) -> list[tuple[int, int, int, int]]:
    """The PDVs of a P-DATA-TF PDU's body: (context ID, message control header, start, end of the
    fragment); empty when they do not fill the body exactly (pynetdicom then judges it)."""
    found, offset, size = [], 0, len(body)
    while offset < size:
        if offset + 6 > size:
            return []
        length, context_id, control = _PDV_HEADER.unpack_from(body, offset)
        if length < 2 or offset + 4 + length > size:
            return []
        found.append((context_id, control, offset + 6, offset + 4 + length))
        offset += 4 + length
    return found


def _close_and_remove(file) -> None:  # noqa: ANN001 - the incoming file (renamed away when stored)
    try:
        file.close()
    except OSError:
        pass
    Path(file.name).unlink(missing_ok=True)


# -- pynetdicom's reading, with C-STORE requests taken on the way ---------------------------------
_LOGGER = logging.getLogger("pynetdicom.dul")
_pynetdicom_read_pdu_data = DULServiceProvider._read_pdu_data  # noqa: SLF001


def _read_pdu_data(self: DULServiceProvider) -> None:
    """DULServiceProvider._read_pdu_data (pynetdicom 3.0.4): the same events for the same faults,
    and a P-DATA-TF PDU offered to the association's DirectStore first. After a PDU taken there, the
    next one is awaited for up to FOLLOW_SECONDS and read at once: going back to pynetdicom's loop
    would cost its 1 ms sleep between the peer's PDUs. Anything for pynetdicom to do (a PDU it takes,
    a primitive to send, the association killed) ends the wait."""
    direct: DirectStore | None = getattr(self, "direct_store", None)
    if direct is None or self.state_machine.current_state != ESTABLISHED:
        _pynetdicom_read_pdu_data(self)
        return
    # The association's own thread (pynetdicom's reactor) has nothing to do while PDUs are taken
    # here, yet it wakes every millisecond, and each wake-up takes the GIL from the threads
    # receiving (the node's CPU per instance with four associations: a quarter more). It waits on
    # its checkpoint instead until a PDU goes to pynetdicom, pynetdicom has something to send, or
    # the association is killed: the loop below ends then. The node never calls release() or a
    # send_*() on an association it accepted (they clear the checkpoint themselves); abort() and
    # kill() set it.
    reactor = self.assoc._reactor_checkpoint  # noqa: SLF001
    reactor.clear()
    try:
        while _read_one(self, direct) and _next_pdu_soon(self):
            pass
    finally:
        reactor.set()


FOLLOW_SECONDS = 0.01
_PREALLOCATED_AT_MOST = 4 * 1024 * 1024  # a PDU buffer is allocated whole up to this (the node offers 1 MiB)


def _next_pdu_soon(dul: DULServiceProvider) -> bool:
    """Whether the peer's next PDU is there within FOLLOW_SECONDS, with nothing else for the DUL to
    do meanwhile."""
    if (dul._kill_thread or dul.to_provider_queue.queue or dul.event_queue.queue  # noqa: SLF001
            or dul.state_machine.current_state != ESTABLISHED):
        return False
    raw = dul.socket.socket if dul.socket is not None else None
    if raw is None:
        return False
    pending = getattr(raw, "pending", None)  # TLS: bytes already decrypted are not seen by select
    if pending is not None and pending():
        return True
    try:
        ready, _, _ = select.select([raw], [], [], FOLLOW_SECONDS)
    except (OSError, ValueError):
        return False  # pynetdicom's own loop finds the connection closed
    return bool(ready)


def _read_one(self: DULServiceProvider, direct: DirectStore) -> bool:
    """Read one PDU: True when DirectStore took it; otherwise it was given to pynetdicom as its
    own reading would (an event queued: the PDU's, or Evt17/Evt19 for a fault)."""
    try:
        header = self.socket.recv(6)
        pdu_type, _, pdu_length = _PDU_HEADER.unpack(header)
    except (OSError, TimeoutError, struct.error):  # READ_PDU_EXC_A/B: the connection closed
        self.event_queue.put("Evt17")
        return False
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):  # READ_PDU_EXC_C
        _LOGGER.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
        self.event_queue.put("Evt19")
        return False
    try:
        if pdu_length > _PREALLOCATED_AT_MOST:  # more than the node offered to take: as pynetdicom reads
            body = self.socket.recv(pdu_length)
            view, read = memoryview(body), len(body)
        else:
            body = bytearray(pdu_length)
            view, read = memoryview(body), 0
            raw = self.socket.socket
            while read < pdu_length:
                count = raw.recv_into(view[read:], pdu_length - read)
                if not count:
                    break
                read += count
    except (OSError, TimeoutError):  # READ_PDU_EXC_D
        _LOGGER.error("Connection closed before the entire PDU was received")
        self.event_queue.put("Evt17")
        return False
    if read != pdu_length:  # READ_PDU_EXC_E
        _LOGGER.error(f"The received PDU is shorter than expected ({6 + read} of {6 + pdu_length} bytes received)")
        self.event_queue.put("Evt17")
        return False
    self._idle_timer.restart()  # a PDU came: the association is not idle, however long storing takes
    if pdu_type == P_DATA_TF_TYPE:
        try:
            taken = direct.take(view)
        except Exception as exc:  # noqa: BLE001 - a broken peer, or a fault here: aborted as pynetdicom does
            log.error("association from %s aborted: %s", self.assoc.requestor.ae_title, exc,
                      exc_info=not isinstance(exc, ProtocolError))
            direct.close()
            self.event_queue.put("Evt19")  # an invalid PDU: the state machine aborts (AA-8)
            return False
        if taken == pdu_length:
            return True
        if taken:  # the rest of its PDVs, as a PDU of their own
            header, body = _PDU_HEADER.pack(P_DATA_TF_TYPE, 0, pdu_length - taken), view[taken:]
    try:
        pdu, event = self._decode_pdu(bytes(header) + bytes(body))
        self.event_queue.put(event)
    except Exception as exc:  # noqa: BLE001 - READ_PDU_EXC_F, as pynetdicom
        _LOGGER.error("Unable to decode the received PDU data")
        _LOGGER.exception(exc)
        self.event_queue.put("Evt19")
        return False
    self._recv_pdu.put(pdu)
    return False


DULServiceProvider._read_pdu_data = _read_pdu_data  # noqa: SLF001 - only associations given a DirectStore differ


def attach(assoc, handler: StoreHandler, open_file: Callable[[], object]) -> None:  # noqa: ANN001
    """Take the C-STORE requests of `assoc` (a pynetdicom acceptor association, before it is
    established) here from now on."""
    assoc.dul.direct_store = DirectStore(assoc, handler, open_file)


def detach(assoc) -> None:  # noqa: ANN001
    """When its connection closes: the data set being received, if any, is dropped."""
    direct = getattr(assoc.dul, "direct_store", None)
    if direct is not None:
        direct.close()

