"""The receiver's own C-STORE path (dicomnode.net.direct_store): the bytes it writes and answers
are pynetdicom's, a data set in many PDUs is stored whole, what it cannot take goes to pynetdicom,
a data set cut off by an abort leaves nothing behind, and `direct_store = false` stores the same
file through pynetdicom."""

from __future__ import annotations

import struct
import threading
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta, decode, encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from dicomnode.net.direct_store import StoreCommand, _pdvs, file_preamble_and_meta, store_command, store_response_pdu
from dicomnode.net.receiver import Receiver
from dicomnode.net.scu import responses_to_the_caller
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Instance

from tests.support.nodeutil import node_config, tiny_instance
from tests.support.pdus import pdata_pdu, store_pdvs


@pytest.mark.parametrize("message_id,sop_class,sop_instance,status", [
    (1, CTImageStorage, "1.2.3.4", 0x0000),  # even-length UIDs
    (65535, "1.2.840.10008.5.1.4.1.1.128", "1.2.826.0.1.3680043.8.498.123456789", 0xA700),  # odd: padded
    (7, "1.2.840.10008.5.1.4.1.1.66.4", "9" * 64, 0xC000),
])
def test_a_store_response_is_the_pdu_pynetdicom_encodes(message_id, sop_class, sop_instance, status):
    response = C_STORE()
    response.MessageIDBeingRespondedTo = message_id
    response.AffectedSOPClassUID, response.AffectedSOPInstanceUID, response.Status = sop_class, sop_instance, status
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    (primitive,) = message.encode_msg(5, 16384)
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    assert store_response_pdu(5, message_id, sop_class, sop_instance, status) == pdu.encode()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.826.0.1.3680043.8.498.12345"])
def test_the_file_meta_is_what_pynetdicoms_chunked_receive_writes(syntax, sop_instance):
    expected = BytesIO()
    expected.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(expected, create_file_meta(sop_class_uid=CTImageStorage, sop_instance_uid=sop_instance,
                                                    transfer_syntax=syntax))
    assert file_preamble_and_meta(CTImageStorage, sop_instance, syntax) == expected.getvalue()


def _store_command_set(message_id: int, sop_class: str, sop_instance: str, **more: object) -> bytes:
    """A C-STORE request's command set as pynetdicom encodes it."""
    request = C_STORE()
    request.MessageID, request.Priority = message_id, more.pop("priority", 0)
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = sop_class, sop_instance
    for keyword, value in more.items():
        setattr(request, keyword, value)
    request.DataSet = BytesIO(b"\x08\x00\x16\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return encode(message.command_set, True, True)


@pytest.mark.parametrize("message_id,sop_class,sop_instance,more", [
    (1, CTImageStorage, "1.2.3.4", {}),  # even-length UIDs
    (65535, "1.2.840.10008.5.1.4.1.1.128", "1.2.826.0.1.3680043.8.498.123456789", {"priority": 2}),  # odd
    (7, "1.2.840.10008.5.1.4.1.1.66.4", "9" * 64, {"MoveOriginatorApplicationEntityTitle": "PACS",
                                                    "MoveOriginatorMessageID": 9}),
])
def test_a_store_command_is_read_as_pynetdicom_reads_it(message_id, sop_class, sop_instance, more):
    data = _store_command_set(message_id, sop_class, sop_instance, **more)
    read = decode(BytesIO(data), True, True)
    assert store_command(memoryview(data)) == StoreCommand(
        read.MessageID, str(read.AffectedSOPClassUID), str(read.AffectedSOPInstanceUID)) == StoreCommand(
        message_id, str(sop_class), sop_instance)


def test_a_command_set_that_is_not_a_plain_store_request_is_left_to_pynetdicom():
    data = _store_command_set(3, CTImageStorage, "1.2.3.4")
    assert store_command(data) is not None
    echo = C_ECHO()
    echo.MessageID = 1
    message = C_ECHO_RQ()
    message.primitive_to_message(echo)
    assert store_command(encode(message.command_set, True, True)) is None  # another command
    no_data_set = data.replace(struct.pack("<HHLH", 0, 0x0800, 2, 0x0001), struct.pack("<HHLH", 0, 0x0800, 2, 0x0101))
    assert no_data_set != data and store_command(no_data_set) is None
    assert store_command(data[:-3]) is None  # cut short in a value
    assert store_command(data + b"\x00\x00\x10") is None  # cut short in an element header
    assert store_command(data + struct.pack("<HHL", 0x0008, 0x0016, 0)) is None  # not a command element
    assert store_command(data + struct.pack("<HHL", 0, 0x0700, 2) + b"\x00\x00") is None  # Priority twice
    several = data.replace(b"1.2.3.4", b"1.2\\3.4")
    assert store_command(several) is None  # pydicom reads it as two UIDs
    assert list(decode(BytesIO(several), True, True).AffectedSOPInstanceUID) == ["1.2", "3.4"]
    long_id = data.replace(struct.pack("<HHLH", 0, 0x0110, 2, 3), struct.pack("<HHLL", 0, 0x0110, 4, 3))
    assert long_id != data and store_command(long_id) is None  # a MessageID of the wrong length


def test_pdvs_are_read_only_when_they_fill_the_pdu():
    one = struct.pack(">LBB", 5, 1, 3) + b"abc"
    two = struct.pack(">LBB", 4, 1, 0) + b"de"
    body = memoryview(one + two)
    assert [(cx, control, bytes(body[start:end])) for cx, control, start, end in _pdvs(body)] == [
        (1, 3, b"abc"), (1, 0, b"de")]
    assert _pdvs(memoryview(one + two[:-1])) == []  # the last PDV cut short
    assert _pdvs(memoryview(one + b"\x00\x00")) == []  # a stray tail
    assert _pdvs(memoryview(struct.pack(">LBB", 1, 1, 3))) == []  # an item too short for its header


class Paths:
    """Which of the receiver's two ways each C-STORE took; for those taken directly, whether the
    association's own thread (pynetdicom's reactor) was held at its checkpoint meanwhile."""

    def __init__(self, receiver: Receiver) -> None:
        self.direct = self.pynetdicom = 0
        self.reactor_held: list[bool] = []
        direct, pynetdicom = receiver.store_direct, receiver.handle_store

        def counted_direct(assoc, *args):  # noqa: ANN001, ANN002, ANN202
            self.direct += 1
            self.reactor_held.append(not assoc._reactor_checkpoint.is_set())  # noqa: SLF001
            return direct(assoc, *args)

        def counted_pynetdicom(event):  # noqa: ANN001, ANN202
            self.pynetdicom += 1
            return pynetdicom(event)
        receiver.store_direct, receiver.handle_store = counted_direct, counted_pynetdicom


def _receiver(tmp_path: Path, node: str = "", max_pdu: int | None = None):  # noqa: ANN202
    config = node_config(tmp_path, node=f'allowed_calling_aets = ["SCU"]\nnetwork_timeout_seconds = 5\n{node}')
    sessions = make_sessionmaker(config.database_url)
    receiver = Receiver(config, sessions)
    if max_pdu is not None:  # the sender then splits each data set into PDUs of this size
        receiver.ae.maximum_pdu_size = max_pdu
    paths = Paths(receiver)
    receiver.start()
    return config, sessions, receiver, paths


def _associate(config, syntaxes=(ExplicitVRLittleEndian,)):  # noqa: ANN001, ANN202
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage, list(syntaxes))
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", config.node.port, ae_title=config.node.ae_title)
    assert assoc.is_established
    return responses_to_the_caller(assoc)  # pynetdicom's reactor once took a C-ECHO response here (CI)


def _spooled(config) -> dict[str, bytes]:  # noqa: ANN001
    return {p.stem: p.read_bytes() for p in config.spool_dir.rglob("*.dcm") if ".incoming" not in p.parts}


def _body(data: bytes) -> bytes:
    """A spooled file's data set, after its preamble and file meta."""
    return data[144 + int.from_bytes(data[140:144], "little"):]


@pytest.mark.e2e
@pytest.mark.parametrize("direct", [True, False])
def test_a_data_set_in_many_pdus_is_stored_whole_and_the_same_either_way(tmp_path: Path, direct: bool):
    config, sessions, receiver, paths = _receiver(tmp_path, f"direct_store = {str(direct).lower()}", max_pdu=4096)
    study, series = generate_uid(), generate_uid()
    sent = [tiny_instance(study, series, i, rows=64) for i in range(3)]  # 8 KiB of pixels: 3 PDUs or more
    try:
        assoc = _associate(config)
        statuses = [assoc.send_c_store(ds).Status for ds in sent[:2]]
        statuses.append(assoc.send_c_echo().Status)  # pynetdicom's, between two direct C-STOREs
        statuses.append(assoc.send_c_store(sent[2]).Status)
        assoc.release()
    finally:
        receiver.stop()
    assert statuses == [0x0000] * 4
    assert (paths.direct, paths.pynetdicom) == ((3, 0) if direct else (0, 3))
    # taken directly, the reactor waits (it does not poll) and is let go for the C-ECHO and the release
    assert paths.reactor_held == [True] * paths.direct
    spooled = _spooled(config)
    assert set(spooled) == {ds.SOPInstanceUID for ds in sent}
    for ds in sent:
        data = spooled[ds.SOPInstanceUID]
        assert _body(data) == encode(ds, False, True)  # the data set as sent, byte for byte
        assert data[:_body_start(data)] == file_preamble_and_meta(CTImageStorage, ds.SOPInstanceUID,
                                                                  ExplicitVRLittleEndian)
    with sessions() as session:
        rows = session.scalars(select(Instance.sop_instance_uid)).all()
    assert sorted(rows) == sorted(ds.SOPInstanceUID for ds in sent)
    assert not list((config.spool_dir / ".incoming").iterdir())


@pytest.mark.e2e
def test_the_next_data_sets_file_is_made_ahead_and_removed_when_the_association_ends(tmp_path: Path):
    config, sessions, receiver, paths = _receiver(tmp_path)
    study, series = generate_uid(), generate_uid()
    sent = [tiny_instance(study, series, i) for i in range(2)]
    incoming = config.spool_dir / ".incoming"
    try:
        assoc = _associate(config)
        assert assoc.send_c_store(sent[0]).Status == 0x0000
        _wait(lambda: len(list(incoming.iterdir())) == 1, "no file made ahead for the next data set")
        (ahead,) = incoming.iterdir()
        assert ahead.stat().st_size == 0
        assert assoc.send_c_store(sent[1]).Status == 0x0000
        assert not ahead.exists()  # the second data set was received into it, then renamed into the spool
        assoc.release()
        _wait(lambda: not any(incoming.iterdir()), "the file made ahead outlived its association")
        assert receiver.listening
    finally:
        receiver.stop()
    assert paths.direct == 2 and set(_spooled(config)) == {ds.SOPInstanceUID for ds in sent}


def _body_start(data: bytes) -> int:
    return 144 + int.from_bytes(data[140:144], "little")


@pytest.mark.e2e
def test_a_deflated_data_set_is_left_to_pynetdicom(tmp_path: Path):
    config, sessions, receiver, paths = _receiver(tmp_path)
    ds = tiny_instance(generate_uid(), generate_uid(), 0)
    try:
        assoc = _associate(config, [DeflatedExplicitVRLittleEndian])
        status = assoc.send_c_store(ds).Status
        assoc.release()
    finally:
        receiver.stop()
    assert status == 0x0000 and (paths.direct, paths.pynetdicom) == (0, 1)
    assert set(_spooled(config)) == {ds.SOPInstanceUID}


@pytest.mark.e2e
@pytest.mark.parametrize("direct", [True, False])
def test_a_data_set_cut_off_by_an_abort_leaves_nothing_and_the_node_goes_on(tmp_path: Path, direct: bool):
    config, sessions, receiver, paths = _receiver(tmp_path, f"direct_store = {str(direct).lower()}")
    study, series = generate_uid(), generate_uid()
    cut, whole = tiny_instance(study, series, 0, rows=64), tiny_instance(study, series, 1)
    incoming = config.spool_dir / ".incoming"
    try:
        assoc = _associate(config)
        cx = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage)
        items = store_pdvs(cut, cx)
        assert len(items) > 3
        for item in items[:3]:  # the command and the data set's first fragments, then an abort
            assoc.dul.socket.send(pdata_pdu([item]))
        _wait(lambda: any(incoming.iterdir()), "the receiver began no file")
        assoc.abort()
        _wait(lambda: not any(incoming.iterdir()), "the cut data set's file stayed in the incoming folder")
        status = _store_on_a_new_association(config, whole)
    finally:
        receiver.stop()
    assert status == 0x0000
    assert set(_spooled(config)) == {whole.SOPInstanceUID}
    with sessions() as session:
        assert session.scalars(select(Instance.sop_instance_uid)).all() == [whole.SOPInstanceUID]


def _store_on_a_new_association(config, ds) -> int:  # noqa: ANN001 - the node goes on
    assoc = _associate(config)
    status = assoc.send_c_store(ds).Status
    assoc.release()
    return status


def _wait(condition, why: str, timeout: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, why
        threading.Event().wait(0.02)


@pytest.mark.e2e
def test_an_error_in_the_handler_answers_c211_and_the_association_goes_on(tmp_path: Path, monkeypatch):
    config, sessions, receiver, paths = _receiver(tmp_path)
    study, series = generate_uid(), generate_uid()
    broken, whole = tiny_instance(study, series, 0), tiny_instance(study, series, 1)
    store_received = receiver.store.store_received

    def fails_for_broken(received, syntax, sop_class, sop_instance, calling):  # noqa: ANN001, ANN202
        if sop_instance == broken.SOPInstanceUID:
            raise RuntimeError("a bug in the handler")
        return store_received(received, syntax, sop_class, sop_instance, calling)
    monkeypatch.setattr(receiver.store, "store_received", fails_for_broken)
    try:
        assoc = _associate(config)
        statuses = [assoc.send_c_store(broken).Status, assoc.send_c_store(whole).Status]
        assoc.release()
    finally:
        receiver.stop()
    assert statuses == [0xC211, 0x0000] and paths.direct == 2
    assert set(_spooled(config)) == {whole.SOPInstanceUID}
    assert not list((config.spool_dir / ".incoming").iterdir())  # the failed one's file removed


def _echo_item(context_id: int) -> bytes:
    request = C_ECHO()
    request.MessageID, request.AffectedSOPClassUID = 2, Verification
    message = C_ECHO_RQ()
    message.primitive_to_message(request)
    ((cx, data),) = next(message.encode_msg(context_id, 16384)).presentation_data_value_list
    return struct.pack(">LB", len(data) + 1, cx) + data


@pytest.mark.e2e
def test_a_request_after_the_last_fragment_in_the_same_pdu_goes_to_pynetdicom(tmp_path: Path):
    config, sessions, receiver, paths = _receiver(tmp_path)
    ds = tiny_instance(generate_uid(), generate_uid(), 0, rows=32)
    try:
        assoc = _associate(config)
        store_cx = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage)
        echo_cx = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == Verification)
        # the requestor's reactor paused (as pynetdicom's send_c_store does), so the answers stay queued here
        assoc._reactor_checkpoint.clear()  # noqa: SLF001
        _wait(lambda: assoc._is_paused, "the requestor's reactor did not pause")  # noqa: SLF001
        # one PDU: the whole C-STORE request, then a C-ECHO request
        assoc.dul.socket.send(pdata_pdu([*store_pdvs(ds, store_cx), _echo_item(echo_cx)]))
        answers = [assoc.dimse.get_msg(block=True)[1] for _ in range(2)]
        assoc._reactor_checkpoint.set()  # noqa: SLF001
        assoc.release()
    finally:
        receiver.stop()
    assert [(type(a).__name__, a.Status) for a in answers] == [("C_STORE", 0x0000), ("C_ECHO", 0x0000)]
    assert paths.direct == 1 and set(_spooled(config)) == {ds.SOPInstanceUID}


@pytest.mark.e2e
def test_a_command_before_the_last_fragment_aborts_and_leaves_nothing(tmp_path: Path):
    config, sessions, receiver, paths = _receiver(tmp_path)
    study, series = generate_uid(), generate_uid()
    cut, whole = tiny_instance(study, series, 0, rows=64), tiny_instance(study, series, 1)
    try:
        assoc = _associate(config)
        cx = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage)
        items = store_pdvs(cut, cx)
        assert len(items) > 3
        assoc.dul.socket.send(pdata_pdu(items[:2]))  # the command and the first fragment
        assoc.dul.socket.send(pdata_pdu([_echo_item(cx)]))  # a command before the data set's last fragment
        _wait(lambda: assoc.is_aborted, "the receiver did not abort the association")
        status = _store_on_a_new_association(config, whole)
    finally:
        receiver.stop()
    assert status == 0x0000
    assert set(_spooled(config)) == {whole.SOPInstanceUID}
    assert not list((config.spool_dir / ".incoming").iterdir())
