"""A day in one test run (`make soak`, about 20 minutes; not part of `make test`).

Four senders (dcmtk storescu) send 60 synthetic PET/CT studies with random pauses, each study
again until storescu succeeds, while a chaos loop kills the worker or the second receiving process
(receive_processes = 2), kills the whole node (-9) and restarts it, and stops the destination PACS
(Orthanc) for a while, at random moments.
At the end every study has exactly one SEG and one SR in Orthanc, with the node's one set of
SOP Instance UIDs; every instance sent is in the spool and the index, and nothing else is; the
receiver's memory did not grow; the counts and the memory curve are printed."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Instance, Job
from dicomnode.synth.petct import write_study
from dicomnode.testing.node import RunningNode, start_node
from dicomnode.testing.orthanc import LocalOrthanc, orthanc_binary
from dicomnode.testing.ports import free_port

from tests.support.e2e import REPO, write_node_config

pytestmark = [
    pytest.mark.soak,
    pytest.mark.e2e,
    pytest.mark.skipif(orthanc_binary() is None, reason="Debian package orthanc not installed"),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed"),
]

STUDIES = int(os.environ.get("SOAK_STUDIES", 60))
SENDERS = 4
CHAOS_SECONDS = float(os.environ.get("SOAK_CHAOS_SECONDS", 660))
SETTLE_SECONDS = 600  # after the chaos: time for the last jobs and deliveries
ONE_FOLD = f"""
[[models]]
name = "demo-petct"
path = "{REPO / 'models' / 'demo-petct'}"
folds = [0]
use_mirroring = false
"""
NODE = """lease_seconds = 600
max_attempts = 8
delivery_backoff_seconds = 2
delivery_backoff_max_seconds = 10
worker_restart_seconds = 1
receive_processes = 2
"""


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Site:
    """Orthanc and a node that know each other; the node can be killed and started again."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.pacs = LocalOrthanc(work / "orthanc", modalities={"dicomnode": ("DICOMNODE", "127.0.0.1", self.port)})
        self.config_path = write_node_config(work, self.pacs, self.port, quiet_seconds=3, models=ONE_FOLD, node=NODE)
        self.node: RunningNode | None = None
        self.incarnation = 0
        self.lock = threading.Lock()

    def start_node(self) -> None:
        self.incarnation += 1
        self.node = start_node(self.config_path, self.port, self.work / f"node-{self.incarnation}.log")

    def kill_node(self) -> None:
        children = subprocess.run(["pgrep", "-P", str(self.node.process.pid)], capture_output=True, text=True).stdout
        for pid in [*map(int, children.split()), self.node.process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.node.process.wait()

    def kill_child(self, kind: str) -> bool:
        """SIGKILL to the node's child process of `kind` (its command: "worker", "receive-process")."""
        children = subprocess.run(["pgrep", "-P", str(self.node.process.pid)], capture_output=True, text=True).stdout
        for pid in map(int, children.split()):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if kind.encode() in command:
                os.kill(pid, signal.SIGKILL)
                return True
        return False


def test_a_day_of_studies_kills_and_outages(tmp_path: Path):
    rng = random.Random(2026)
    site = Site(tmp_path)
    studies = [write_study(tmp_path / "studies" / f"{k:02d}", seed=100 + k) for k in range(STUDIES)]
    site.pacs.start()
    site.start_node()
    counts = {"node killed": 0, "worker killed": 0, "receiving process killed": 0, "pacs stopped": 0,
              "storescu retries": 0}
    rss: list[tuple[float, int, float]] = []  # (seconds, incarnation, MB)
    began = time.monotonic()
    chaos_over = threading.Event()

    def send(mine: list) -> None:
        for study in mine:
            time.sleep(rng.uniform(0, 2 * CHAOS_SECONDS * SENDERS / STUDIES))  # spread over the chaos
            while True:
                done = subprocess.run(
                    ["storescu", "-aet", "STORESCU", "-aec", "DICOMNODE", "+sd", "+r", "+sp", "*.dcm", "127.0.0.1",
                     str(site.port), str(study.root)],
                    capture_output=True, text=True, timeout=300, env={**os.environ, "TCP_NODELAY": "1"},
                )
                if done.returncode == 0:
                    break
                counts["storescu retries"] += 1
                time.sleep(3)

    def chaos() -> None:
        while time.monotonic() - began < CHAOS_SECONDS:
            if chaos_over.wait(rng.uniform(20, 60)):
                return
            action = rng.choices(["worker", "receive-process", "node", "pacs"], weights=[3, 2, 3, 2])[0]
            with site.lock:
                if action == "worker" and site.kill_child("worker"):
                    counts["worker killed"] += 1
                elif action == "receive-process" and site.kill_child("receive-process"):
                    counts["receiving process killed"] += 1
                elif action == "node":
                    site.kill_node()
                    counts["node killed"] += 1
                    time.sleep(rng.uniform(2, 5))
                    site.start_node()
                elif action == "pacs":
                    site.pacs.stop()
                    counts["pacs stopped"] += 1
                    time.sleep(rng.uniform(10, 40))
                    site.pacs.start()

    def sample() -> None:
        while not chaos_over.wait(5):
            with site.lock:
                mb = _rss_mb(site.node.process.pid)
                if mb is not None:
                    rss.append((time.monotonic() - began, site.incarnation, mb))

    senders = [threading.Thread(target=send, args=(studies[k::SENDERS],)) for k in range(SENDERS)]
    helpers = [threading.Thread(target=chaos), threading.Thread(target=sample, daemon=True)]
    for thread in senders + helpers:
        thread.start()
    try:
        for thread in senders:
            thread.join()
        helpers[0].join()
        sessions = make_sessionmaker(f"sqlite:///{tmp_path / 'var' / 'dicomnode.db'}")
        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline:
            with sessions() as session:
                done = session.scalar(select(func.count()).select_from(Job).where(Job.state == "succeeded"))
            if done >= STUDIES:
                break
            time.sleep(5)
        chaos_over.set()
        elapsed = time.monotonic() - began
        _check(site, sessions, studies, tmp_path)
    finally:
        chaos_over.set()
        if site.node is not None and site.node.process.poll() is None:
            site.node.stop()
        site.pacs.stop()
    last = [mb for _, incarnation, mb in rss if incarnation == site.incarnation]
    curve = ", ".join(f"{t:.0f}s:{mb:.0f}" for t, _, mb in rss[::12])
    print(f"\nsoak: {STUDIES} studies in {elapsed / 60:.1f} min; {counts}; receiver RSS (MB) every minute: {curve}")
    if len(last) >= 24:  # two minutes or more of the last node's life: after its first minute, growth < 10 %
        settled, end = last[12], max(last[-3:])
        print(f"last node's receiver: {settled:.0f} MB after a minute, {end:.0f} MB at the end")
        assert end < settled * 1.10


def _check(site: Site, sessions, studies: list, work: Path) -> None:  # noqa: ANN001
    by_study = {s.study_instance_uid: s for s in studies}
    with sessions() as session:
        jobs = list(session.scalars(select(Job)))
        rows = list(session.scalars(select(Instance)))
    assert sorted(j.study_uid for j in jobs) == sorted(by_study), "exactly one job per study"
    assert {j.state for j in jobs} == {"succeeded"} and {j.run_number for j in jobs} == {1}
    sent = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for s in studies for p in [*s.ct_files, *s.pt_files]}
    assert {r.sop_instance_uid for r in rows} == set(sent)  # nothing acknowledged missing, nothing else
    spool = {p for p in (work / "var" / "spool").rglob("*") if p.is_file()}
    assert spool == {Path(r.path) for r in rows}  # no orphan file, no row without its file
    for job in jobs:
        out = work / "var" / "results" / job.study_uid / f"job-{job.id}"
        mine = {dcmread(out / name, stop_before_pixels=True).SOPInstanceUID for name in ("seg.dcm", "sr.dcm")}
        series = site.pacs.series_of_study(job.study_uid)
        results = [s for s in series if s["MainDicomTags"].get("Modality") in ("SEG", "SR")]
        assert sorted(s["MainDicomTags"]["Modality"] for s in results) == ["SEG", "SR"], results
        in_pacs = set()
        for s in results:
            [instance] = s["Instances"]
            in_pacs.add(site.pacs.instance_tags(instance)["SOPInstanceUID"])
        assert in_pacs == mine, (job.study_uid, in_pacs, mine)
