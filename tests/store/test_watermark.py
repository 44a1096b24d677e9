"""The disk watermark, low space simulated through the configured limit: associations are
rejected (transient, local limit exceeded), a C-STORE in an open association gets 0xA700 with
nothing written, and each crossing is logged once."""

import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select

from dicomnode.config import NodeSettings
from dicomnode.net.receiver import Receiver, ReceiverCounters
from dicomnode.net.scu import responses_to_the_caller
from dicomnode.store.diskspace import GB, limit_bytes
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Instance

from tests.support.nodeutil import node_config, tiny_instance

LOW = {"min_free_gb": 1e9}  # a billion GB: no disk has that much free


def _associate(config):
    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context(CTImageStorage)
    return responses_to_the_caller(ae.associate("127.0.0.1", config.node.port, ae_title=config.node.ae_title))


def _spooled(config) -> list[Path]:
    """Every file that holds something (the empty one an open association keeps for its next data
    set, dicomnode.net.direct_store, holds nothing)."""
    if not config.spool_dir.exists():
        return []
    return [p for p in config.spool_dir.rglob("*") if p.is_file() and (p.stat().st_size or ".incoming" not in p.parts)]


@pytest.mark.parametrize("total_gb,percent,gb,limit_gb", [
    (1000, 10, 5, 100),  # a large disk: 10 % is the larger limit
    (20, 10, 5, 5),  # a small one: 5 GB is
    (20, 0, 5, 5), (1000, 10, 0, 100), (1000, 0, 0, 0),  # 0 turns a limit off
])
def test_the_limit_is_the_larger_of_percent_and_gb(total_gb, percent, gb, limit_gb):
    settings = NodeSettings(min_free_percent=percent, min_free_gb=gb)
    assert limit_bytes(int(total_gb * GB), settings) == pytest.approx(limit_gb * GB)


@pytest.mark.e2e
def test_low_disk_rejects_associations_and_logs_once(tmp_path: Path, caplog):
    config = node_config(tmp_path, node=f"min_free_gb = {LOW['min_free_gb']:.0f}")
    registry = CollectorRegistry()
    receiver = Receiver(config, make_sessionmaker(config.database_url), ReceiverCounters(registry))
    receiver.start()
    try:
        with caplog.at_level(logging.INFO, logger="dicomnode"):
            for _ in range(2):
                assoc = _associate(config)
                assert assoc.is_rejected and not assoc.is_established
                rejection = assoc.acceptor.primitive
                assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x02, 0x03, 0x02)
    finally:
        receiver.stop()
    assert _spooled(config) == []
    low = [r.getMessage() for r in caplog.records if "disk space low" in r.getMessage()]
    assert len(low) == 1 and f"on {config.node.data_dir}" in low[0]
    assert registry.get_sample_value("dicomnode_associations_rejected_total", {"reason": "disk-space-low"}) == 2


@pytest.mark.e2e
def test_store_below_the_watermark_gets_a700_and_nothing_is_written(tmp_path: Path, caplog):
    config = node_config(tmp_path)
    sessions = make_sessionmaker(config.database_url)
    receiver = Receiver(config, sessions)
    receiver.start()
    study, series = generate_uid(), generate_uid()
    normal = receiver.watermark.settings
    try:
        with caplog.at_level(logging.INFO, logger="dicomnode"):
            assoc = _associate(config)
            assert assoc.is_established  # space was fine when the association opened
            receiver.watermark.settings = normal.model_copy(update=LOW)  # then it runs low
            assert [assoc.send_c_store(tiny_instance(study, series, i)).Status for i in range(2)] == [0xA700, 0xA700]
            assert _spooled(config) == []
            receiver.watermark.settings = normal  # space is back
            assert assoc.send_c_store(tiny_instance(study, series, 2)).Status == 0x0000
            assoc.release()
    finally:
        receiver.stop()
    assert len(_spooled(config)) == 1
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum("disk space low" in m for m in messages) == 1
    assert sum("disk space back" in m for m in messages) == 1
