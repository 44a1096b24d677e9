"""The receiver on real loopback associations: pynetdicom and dcmtk storescu as senders."""

import os
import shutil
import subprocess
import threading
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from dicomnode.net.receiver import Receiver
from dicomnode.net.scu import responses_to_the_caller
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.spool import Spool
from dicomnode.store.tables import Instance, Study

from tests.support.nodeutil import node_config, tiny_instance, write_series

pytestmark = pytest.mark.e2e  # starts servers or subprocesses (tests/conftest.py)


def _associate(config, calling="GOODSCU", called=None):
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    return responses_to_the_caller(ae.associate("127.0.0.1", config.node.port, ae_title=called or config.node.ae_title))


def test_store_is_on_disk_and_indexed_when_acknowledged(node):
    config, sessions, _ = node
    study = generate_uid()
    ds = tiny_instance(study, generate_uid(), 0)
    assoc = _associate(config)
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000
    with sessions() as session:
        row = session.scalar(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID))
    stored = dcmread(row.path)
    assert Path(row.path) == config.spool_dir / study / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert stored.PixelData == ds.PixelData and stored.StudyInstanceUID == study
    assert row.calling_aet == "GOODSCU"


def test_echo(node):
    config, _, _ = node
    assoc = _associate(config)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


@pytest.mark.parametrize("calling,called", [("INTRUDER", None), ("GOODSCU", "NOTTHENODE")])
def test_unknown_calling_or_called_aet_is_rejected(node, calling, called):
    config, _, _ = node
    assoc = _associate(config, calling, called)
    assert assoc.is_rejected
    assert not any(config.spool_dir.rglob("*.dcm")) if config.spool_dir.exists() else True


def test_malformed_instance_fails_and_node_keeps_serving(node):
    config, sessions, _ = node
    bad = tiny_instance(generate_uid(), "../../escape", 0)
    good = tiny_instance(generate_uid(), generate_uid(), 0)
    assoc = _associate(config)
    assert assoc.send_c_store(bad).Status == 0xC000
    assert assoc.send_c_store(good).Status == 0x0000
    assoc.release()
    with sessions() as session:
        assert list(session.scalars(select(Instance.sop_instance_uid))) == [good.SOPInstanceUID]
    assert not (config.node.data_dir.parent / "escape").exists()


def test_disk_failure_answers_out_of_resources(tmp_path: Path):
    config = node_config(tmp_path)
    config.node.data_dir.mkdir(parents=True)
    config.spool_dir.write_text("a file where the spool folder should be")
    sessions = make_sessionmaker(config.database_url)
    receiver = Receiver(config, sessions)
    receiver.start()
    try:
        assoc = _associate(config)
        assert assoc.send_c_store(tiny_instance(generate_uid(), generate_uid(), 0)).Status == 0xA700
        assoc.release()
    finally:
        receiver.stop()
    with sessions() as session:
        assert session.scalar(select(Instance)) is None


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed")
def test_dcmtk_storescu_folder(node, tmp_path: Path):
    config, sessions, _ = node
    study = generate_uid()
    files = write_series(tmp_path / "send", study, "CT", 12)
    result = subprocess.run(
        [
            "storescu",
            "-aet",
            "STORESCU",
            "-aec",
            config.node.ae_title,
            "+sd",
            "+r",
            "127.0.0.1",
            str(config.node.port),
            str(tmp_path / "send"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert result.returncode == 0, result.stderr
    with sessions() as session:
        stored = set(session.scalars(select(Instance.sop_instance_uid).where(Instance.study_uid == study)))
    assert stored == {str(dcmread(p).SOPInstanceUID) for p in files}


def test_an_instance_the_database_refuses_is_acknowledged_and_indexed_once_it_takes_it(node, monkeypatch):
    """The index row is written after the acknowledgement: with the database refusing (locked,
    down), an instance is acknowledged all the same (it is durable in the spool), its row waits,
    and is written when the database takes it again; a resent instance keeps its file and row."""
    from dicomnode.store import index as index_module

    config, sessions, receiver = node
    study = generate_uid()
    kept = tiny_instance(study, generate_uid(), 0)
    assoc = _associate(config)
    assert assoc.send_c_store(kept).Status == 0x0000
    assert receiver.store.index.flush(30)
    down = threading.Event()
    down.set()

    def refusing(real):  # noqa: ANN001, ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if down.is_set():
                raise RuntimeError("database is locked")
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(index_module, "add_instances", refusing(index_module.add_instances))
    monkeypatch.setattr(index_module, "add_instance", refusing(index_module.add_instance))
    new = tiny_instance(study, kept.SeriesInstanceUID, 1)
    assert assoc.send_c_store(new).Status == 0x0000
    assert assoc.send_c_store(kept).Status == 0x0000
    assoc.release()
    assert not receiver.store.index.flush(1.5)  # refused, tried again, refused: the rows wait
    files = sorted(p.name for p in config.spool_dir.rglob("*.dcm"))
    assert files == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in (kept, new))
    with sessions.sessions() as session:  # without waiting for the writer
        assert list(session.scalars(select(Instance.sop_instance_uid))) == [kept.SOPInstanceUID]
    down.clear()  # the database is back: the writer's next try writes them
    with sessions() as session:
        rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
    assert set(rows) == {kept.SOPInstanceUID, new.SOPInstanceUID}
    assert dcmread(rows[new.SOPInstanceUID].path).PixelData == new.PixelData
    assert dcmread(rows[kept.SOPInstanceUID].path).PixelData == kept.PixelData


def test_files_the_index_lacks_are_indexed_before_the_receiver_listens(tmp_path: Path):
    """What a killed receiver acknowledged and had not indexed yet: spool files without rows are
    indexed at start (their headers read), temporary files removed, rows already there kept."""
    config = node_config(tmp_path)
    sessions = make_sessionmaker(config.database_url)
    study, series = generate_uid(), generate_uid()
    receiver = Receiver(config, sessions)
    receiver.start()
    try:
        assoc = _associate(config)
        first = tiny_instance(study, series, 0)
        assert assoc.send_c_store(first).Status == 0x0000
        assoc.release()
    finally:
        receiver.stop()
    spool = Spool(config.spool_dir)
    lost = [tiny_instance(study, series, i) for i in (1, 2)]
    for ds in lost:  # acknowledged, then the process died before the row was written
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        spool.write(study, series, ds.SOPInstanceUID, buffer.getvalue())
    (config.spool_dir / ".incoming").mkdir(exist_ok=True)
    (config.spool_dir / ".incoming" / ".incoming-half").write_bytes(b"never acknowledged")
    receiver = Receiver(config, sessions)
    receiver.start()
    receiver.stop()
    with sessions() as session:
        rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
        held = session.get(Study, study)
    assert set(rows) == {first.SOPInstanceUID, *(ds.SOPInstanceUID for ds in lost)}
    assert rows[first.SOPInstanceUID].calling_aet == "GOODSCU"  # its row was there: kept as it was
    assert rows[lost[0].SOPInstanceUID].calling_aet == ""  # the sender is not in the file
    assert held.instances_received == 3
    assert not list((config.spool_dir / ".incoming").iterdir())


def test_an_association_pynetdicom_drops_on_a_fault_of_its_own_gives_its_slot_back(tmp_path, monkeypatch, caplog):
    """pynetdicom's DUL reactor, on an exception of its own, aborts and ends without EVT_CONN_CLOSE.
    With max_associations = 1, a slot left taken would refuse every later association."""
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.pdu_primitives import P_DATA

    config = node_config(tmp_path, node="max_associations = 1\nmax_associations_per_ae = 1")
    receiver = Receiver(config, make_sessionmaker(config.database_url))
    receiver.start()
    send_primitive = DULServiceProvider._process_recv_primitive
    faults = []

    def faulty(self) -> bool:  # noqa: ANN001
        queued = list(self.to_provider_queue.queue)
        if self.assoc.is_acceptor and queued and isinstance(queued[0], P_DATA) and not faults:
            faults.append(self)
            raise RuntimeError("a fault inside pynetdicom")  # as its reactor's `except Exception` catches
        return send_primitive(self)

    monkeypatch.setattr(DULServiceProvider, "_process_recv_primitive", faulty)
    try:
        first = _associate(config)
        assert first.is_established
        assert "Status" not in first.send_c_echo()  # the node's answer never left: it aborted
        assert faults
        first.abort()
        deadline, accepted = time.monotonic() + 30, None
        while accepted is None and time.monotonic() < deadline:
            second = _associate(config)
            if second.is_established:
                accepted = second
            else:
                time.sleep(0.1)  # the aborted association's threads are still ending
        assert accepted is not None, "the dropped association kept the node's only slot"
        assert accepted.send_c_store(tiny_instance(generate_uid(), generate_uid(), 0)).Status == 0x0000
        assert receiver.slots.count() == 1
        accepted.release()
    finally:
        receiver.stop()
    assert "ended without closing its connection (a fault in pynetdicom): its slot given back" in caplog.text
