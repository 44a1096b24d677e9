"""Acknowledged means durable: the receiver acknowledges an instance once it is fsynced into the
spool and writes its index row a moment later (dicomnode.store.index.IndexWriter, deferred), so a
node killed with SIGKILL while a study comes in must hold, after a restart, every instance it
acknowledged: in the spool and in the index (dicomnode.net.recovery indexes what the index
lacked), and the study must then complete as any other. So that some rows are surely not yet
written at the kill, another process holds the database's write lock meanwhile."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.engine import make_url

from dicomnode.config import load_config
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Instance, Job
from dicomnode.synth.petct import write_study
from dicomnode.testing.node import start_node

from tests.support.nodeutil import REPO, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed")]

ENV = {**os.environ, "TCP_NODELAY": "1"}
SENDING = re.compile(r"Sending file: (\S+)")


def _storescu(folder: Path, port: int, verbose: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        # line-buffered (stdbuf): its progress is read as it happens
        ["stdbuf", "-oL", "-eL", "storescu", *(["-v"] if verbose else []), "-aet", "STORESCU", "-aec", "TESTNODE",
         "+sd", "+r", "+sp", "*.dcm", "127.0.0.1", str(port), str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def _acknowledged(lines: list[str]) -> list[Path]:
    """The files storescu -v says were answered Success (each response follows its file's line)."""
    acknowledged, current = [], None
    for line in lines:
        if match := SENDING.search(line):
            current = Path(match.group(1))
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.append(current)
            current = None
    return acknowledged


def test_every_acknowledged_instance_is_indexed_after_a_kill_9_and_the_study_completes(tmp_path: Path):
    study = write_study(tmp_path / "study", seed=5)
    files = study.ct_files + study.pt_files
    (tmp_path / "node").mkdir()
    config_path = write_config(tmp_path / "node", node="study_quiet_seconds = 2",
                               model_path=str(REPO / "models" / "demo-petct"))
    config = load_config(config_path)
    port = config.node.port
    database, busy = make_url(config.database_url).database, None
    node = start_node(config_path, port, tmp_path / "node.log", extra_args=("--no-worker",))
    try:
        sender = _storescu(study.root, port, verbose=True)
        lines: list[str] = []
        for line in sender.stdout:
            lines.append(line.rstrip("\n"))
            if "Received Store Response" not in line:
                continue
            acknowledged = len(_acknowledged(lines))
            if busy is None and acknowledged >= 10:
                # another process holds the database's write lock: the node goes on acknowledging
                # (the spool is the durable record) and cannot write the rows
                busy = sqlite3.connect(database, timeout=30)
                busy.execute("BEGIN IMMEDIATE")
            if acknowledged >= len(files) // 3:  # SIGKILL the node with a third of the study acknowledged
                node.process.kill()
                break
        node.process.wait(30)
        lines.extend(sender.communicate(timeout=60)[0].splitlines())  # responses read before the kill
    finally:
        if node.process.poll() is None:
            node.process.kill()
            node.process.wait()
        if busy is not None:
            busy.rollback()
            busy.close()
    acknowledged = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in _acknowledged(lines)}
    assert len(files) // 3 <= len(acknowledged) < len(files), len(acknowledged)
    sessions = make_sessionmaker(config.database_url)
    with sessions() as session:
        indexed_at_kill = set(session.scalars(select(Instance.sop_instance_uid)))

    node = start_node(config_path, port, tmp_path / "node.log", extra_args=("--no-worker",))
    try:
        with sessions() as session:  # it listens only after indexing what the spool holds
            rows = {r.sop_instance_uid: r for r in session.scalars(select(Instance))}
        missing = acknowledged - set(rows)
        assert not missing, f"{len(missing)} acknowledged instances not in the index after the restart"
        for uid in acknowledged:
            assert dcmread(rows[uid].path).SOPInstanceUID == uid
        recovered = acknowledged - indexed_at_kill
        assert recovered, "every acknowledged row was written before the kill: the recovery was not needed"
        print(f"\nkill -9 after {len(acknowledged)} of {len(files)} acknowledged: {len(acknowledged & indexed_at_kill)}"
              f" indexed before the kill, {len(recovered)} indexed at the restart from the spool")
        sender = _storescu(study.root, port)  # the PACS sends the study again, as after any failure
        output = sender.communicate(timeout=120)[0]
        assert sender.returncode == 0 and "E: " not in output, output
        deadline, jobs = time.monotonic() + 60, []
        while time.monotonic() < deadline and not jobs:  # quiet for 2 s, then one sweep queues it
            with sessions() as session:
                jobs = list(session.scalars(select(Job).where(Job.study_uid == study.study_instance_uid)))
            time.sleep(0.2)
        assert len(jobs) == 1, "the study did not complete"
        with sessions() as session:
            held = set(session.scalars(select(Instance.sop_instance_uid)
                                       .where(Instance.study_uid == study.study_instance_uid)))
        assert held == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    finally:
        node.stop()
