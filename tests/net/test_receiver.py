"""The receiver on real loopback associations: pynetdicom and dcmtk storescu as senders."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from dicomnode.net.receiver import Receiver
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Instance

from tests.support.nodeutil import node_config, tiny_instance, write_series

pytestmark = pytest.mark.e2e  # starts servers or subprocesses (tests/conftest.py)


def _associate(config, calling="GOODSCU", called=None):
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", config.node.port, ae_title=called or config.node.ae_title)


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


def test_an_instance_the_database_refuses_leaves_no_file_and_a_resent_one_keeps_its_own(node, monkeypatch):
    """0xA700 when the index cannot take the instance: a new instance's spool file is removed (it
    was never acknowledged); an instance acknowledged before and sent again keeps its file, which
    its index row still points to."""
    from dicomnode.store import index as index_module

    config, sessions, _ = node
    study = generate_uid()
    kept = tiny_instance(study, generate_uid(), 0)
    assoc = _associate(config)
    assert assoc.send_c_store(kept).Status == 0x0000

    def database_down(*_args, **_kwargs):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(index_module, "add_instance", database_down)
    new = tiny_instance(study, kept.SeriesInstanceUID, 1)
    assert assoc.send_c_store(new).Status == 0xA700
    assert assoc.send_c_store(kept).Status == 0xA700
    assoc.release()
    files = sorted(p.name for p in config.spool_dir.rglob("*") if p.is_file())
    assert files == [f"{kept.SOPInstanceUID}.dcm"]
    with sessions() as session:
        [row] = session.scalars(select(Instance))
    assert row.sop_instance_uid == kept.SOPInstanceUID and dcmread(row.path).PixelData == kept.PixelData
