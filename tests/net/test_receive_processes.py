"""`dicomnode serve` with [node] receive_processes = 2: serve's receiver accepts every connection
and gives each to the receiving process with the fewest open; every instance either process
acknowledges is indexed by serve, the association limits count both, the counters are serve's,
and a receiving process killed with -9 loses nothing it acknowledged and is started again."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from dicomnode.config import load_config
from dicomnode.net.association_slots import SharedSlots
from dicomnode.net.scu import responses_to_the_caller
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Instance, Series
from dicomnode.testing.node import RunningNode, start_node
from dicomnode.testing.ports import free_port

from tests.support.nodeutil import tiny_instance, write_config, write_series
from tests.support.pdus import pdata_pdu, store_pdvs
from tests.support.workerutil import wait_for

pytestmark = pytest.mark.e2e  # starts `serve` and its receiving processes


def _ready_processes(log: Path) -> list[int]:
    """The receiving processes that said they are ready, by process ID, in order."""
    return [int(pid) for pid in re.findall(r"dicomnode\.receiver\[(\d+)\]: receiving process ready", log.read_text())]


def _start(tmp_path: Path, node: str = "") -> tuple[RunningNode, object, int]:
    config_path = write_config(tmp_path, node="receive_processes = 2\nworker_restart_seconds = 0.5\n" + node)
    config = load_config(config_path)
    running = start_node(config_path, config.node.port, tmp_path / "node.log", extra_args=("--no-worker",))
    [child] = wait_for(lambda: _ready_processes(tmp_path / "node.log"), 60, "the receiving process ready", 0.1)
    return running, config, child


def _indexed(config) -> dict[str, str]:  # noqa: ANN001
    sessions = make_sessionmaker(config.database_url)
    with sessions() as session:
        return dict(session.execute(select(Instance.sop_instance_uid, Instance.path)).all())


def _associate(port: int, calling: str = "SCU"):  # noqa: ANN202
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    return responses_to_the_caller(ae.associate("127.0.0.1", port, ae_title="TESTNODE"))


def test_four_studies_at_once_are_shared_out_and_serve_indexes_and_counts_them_all(tmp_path: Path):
    metrics_port = free_port()
    node, config, child = _start(tmp_path, f"metrics_port = {metrics_port}")
    sent: dict[str, Path] = {}
    folders = []
    for number in range(4):
        paths = write_series(tmp_path / f"study{number}", generate_uid(), "CT", 25)
        sent.update((str(dcmread(path).SOPInstanceUID), path) for path in paths)
        folders.append(paths[0].parent)
    try:
        senders = [subprocess.Popen(["storescu", "-aet", "SCU", "-aec", "TESTNODE", "+sd", "+r", "127.0.0.1",
                                     str(config.node.port), str(folder)], env={**os.environ, "TCP_NODELAY": "1"},
                                    stderr=subprocess.PIPE) for folder in folders]
        for sender in senders:
            _, err = sender.communicate(timeout=120)
            assert sender.returncode == 0 and b"E: " not in err, err
        indexed = wait_for(lambda: (rows := _indexed(config)) and len(rows) >= len(sent) and rows, 60, "every row", 0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            samples = {s.name: s.value for family in text_string_to_metric_families(response.read().decode())
                       for s in family.samples}
    finally:
        assert node.stop() == 0
    assert set(indexed) == set(sent)
    for uid, path in indexed.items():  # each data set as sent, element for element, pixels included
        assert dcmread(path) == dcmread(sent[uid])
    assert samples["dicomnode_instances_received_total"] == len(sent)  # those acknowledged by the child too
    assert samples["dicomnode_associations_open"] == 0
    log = (tmp_path / "node.log").read_text()
    by_child = re.findall(rf"dicomnode\.receiver\[{child}\]: study \S+: (\d+) instances stored from SCU", log)
    by_serve = re.findall(r"dicomnode\.receiver: study \S+: (\d+) instances stored from SCU", log)
    assert by_child and by_serve, log  # both took associations
    assert sum(map(int, by_child + by_serve)) == len(sent)


def test_association_limits_count_the_associations_of_every_receiving_process(tmp_path: Path):
    node, config, child = _start(tmp_path, "max_associations = 2\nmax_associations_per_ae = 2")
    try:
        first = _associate(config.node.port)  # kept by serve
        assert first.is_established
        second = _associate(config.node.port)  # given to the receiving process (it has none open)
        assert second.is_established
        third = _associate(config.node.port)  # serve's own count is 1: only the shared table says 2
        assert third.is_rejected
        assert (third.acceptor.primitive.result, third.acceptor.primitive.result_source,
                third.acceptor.primitive.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit exceeded
        assert second.send_c_store(tiny_instance(generate_uid(), generate_uid(), 0)).Status == 0x0000
        second.release()
        fourth = wait_for(lambda: (a := _associate(config.node.port)).is_established and a, 30, "a slot again", 0.1)
        fourth.release()
        first.release()
    finally:
        assert node.stop() == 0
    log = (tmp_path / "node.log").read_text()
    assert "rejected: 2 associations open (max_associations = 2)" in log
    assert re.search(rf"dicomnode\.receiver\[{child}\]: association from SCU", log)


def test_a_killed_receiving_process_loses_nothing_it_acknowledged_and_is_started_again(tmp_path: Path):
    node, config, child = _start(tmp_path)
    acknowledged: list[str] = []
    try:
        held = _associate(config.node.port)  # serve's: the next one goes to the receiving process
        assoc = _associate(config.node.port)
        study, series = generate_uid(), generate_uid()
        for index in range(40):
            ds = tiny_instance(study, series, index)
            assert assoc.send_c_store(ds).Status == 0x0000
            acknowledged.append(str(ds.SOPInstanceUID))
        log = tmp_path / "node.log"
        assert re.search(rf"dicomnode\.receiver\[{child}\]: association from SCU", log.read_text())
        # a data set half sent when the process dies: its incoming file is the child's, named so
        cx = next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage)
        items = store_pdvs(tiny_instance(study, series, 99, rows=64), cx)
        assoc.dul.socket.send(pdata_pdu(items[:3]))
        incoming = config.spool_dir / ".incoming"
        [half] = wait_for(lambda: list(incoming.glob(f".incoming-{child}-*")), 30, "the child's incoming file", 0.1)
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: not assoc.is_established, 30, "the association gone", 0.1)  # its connection went with it
        wait_for(lambda: not half.exists(), 30, "the dead child's incoming file removed by serve", 0.1)
        # every row it sent before acknowledging is indexed by serve
        wait_for(lambda: set(acknowledged) <= set(_indexed(config)), 30, "every acknowledged row", 0.1)
        [restarted] = wait_for(lambda: [pid for pid in _ready_processes(log) if pid != child], 60, "a new process", 0.1)
        held.release()
        again = _associate(config.node.port)
        also = _associate(config.node.port)  # one of the two is the new receiving process's
        for index, one in enumerate((again, also), start=40):
            ds = tiny_instance(study, series, index)
            assert one.send_c_store(ds).Status == 0x0000
            acknowledged.append(str(ds.SOPInstanceUID))
            one.release()
    finally:
        assert node.stop() == 0
    text = (tmp_path / "node.log").read_text()
    assert f"receiving process {child} (receiver-2) exited with -9 (SIGKILL: out of memory?)" in text
    assert f"removed 1 unacknowledged incoming files of receiving process {child}" in text
    assert re.search(rf"dicomnode\.receiver\[{restarted}\]: association from SCU", text)
    assert set(_indexed(config)) == set(acknowledged) and len(acknowledged) == 42


def test_the_shared_association_table_forgets_the_slots_of_a_process_that_is_gone(tmp_path: Path):
    slots = SharedSlots(tmp_path / "slots.json", max_total=2, max_per_ae=2)
    slots.clear()
    script = ("import sys; from pathlib import Path; from dicomnode.net.association_slots import SharedSlots; "
              "print(SharedSlots(Path(sys.argv[1]), 2, 2).take('1', 'OTHER'))")
    taken = subprocess.run([sys.executable, "-c", script, str(tmp_path / "slots.json")], capture_output=True,
                           text=True, check=True)
    assert taken.stdout.strip() == "None"  # it had a slot, and has exited without giving it back
    assert slots.take("a", "SCU") is None
    assert slots.take("b", "SCU") is None  # the other process's slot is not counted: it is gone
    assert slots.take("c", "SCU") == "2 associations open (max_associations = 2)"
    counts = []
    threads = [threading.Thread(target=lambda: counts.append(slots.count())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counts == [2] * 8
    slots.give_back("a")
    assert slots.count() == 1


def test_a_long_series_description_from_a_receiving_process_is_indexed_cut_as_serve_keeps_it(tmp_path: Path):
    """A row goes to serve in one message of at most 64 KiB: free text is cut to what the index keeps."""
    node, config, child = _start(tmp_path)
    try:
        held = _associate(config.node.port)  # serve's: the next one goes to the receiving process
        assoc = _associate(config.node.port)
        ds = tiny_instance(generate_uid(), generate_uid(), 0)
        ds.SeriesDescription = "long " * 30000  # 150 kB, a value no sender should send but one may
        assert assoc.send_c_store(ds).Status == 0x0000
        next_ds = tiny_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, 1)
        assert assoc.send_c_store(next_ds).Status == 0x0000  # the link goes on
        assoc.release()
        held.release()
        indexed = wait_for(lambda: (rows := _indexed(config)) and len(rows) == 2 and rows, 60, "both rows", 0.1)
    finally:
        assert node.stop() == 0
    assert set(indexed) == {ds.SOPInstanceUID, next_ds.SOPInstanceUID}
    assert ds.SeriesDescription.encode() in Path(indexed[ds.SOPInstanceUID]).read_bytes()  # the file keeps it whole
    with make_sessionmaker(config.database_url)() as session:
        assert session.scalar(select(Series.description)) == ds.SeriesDescription[:64]
    log = (tmp_path / "node.log").read_text()
    assert re.search(rf"dicomnode\.receiver\[{child}\]: study \S+: 2 instances stored", log)
