"""Several workers on one queue, as real processes.

* One workstation: `dicomnode serve` with two [[workers]] (two "cpu" devices here, two GPUs on
  a site) starts and supervises both; each job's `started` event names the worker and device
  that ran it, `status` lists both; one worker killed with SIGKILL mid-job is restarted while
  the other goes on, and its job is finished.
* Workers on other hosts: two `dicomnode worker` processes, each from its own working directory
  and config file (other node name, the same PostgreSQL database, the same data_dir) share a
  queue of 10 studies; one is killed with SIGKILL mid-job and the other finishes that job once
  its lease has expired; every study gets one job and one SEG and one SR at the PACS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from pynetdicom.sop_class import Comprehensive3DSRStorage, SegmentationStorage
from sqlalchemy import select

from dicomnode.pipeline import assembler
from dicomnode.store.components import Role
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.events import EventKind, event_data
from dicomnode.store.tables import Component, JobState, utcnow

from tests.support.nodeutil import REPO, node_config, write_config
from tests.support.pgserver import PostgresServer, postgres_bin
from tests.support.workerutil import (
    index_files,
    job_events,
    jobs,
    small_studies,
    start_worker,
    stop,
    wait_for,
)

pytestmark = pytest.mark.e2e

MODEL = REPO / "models" / "demo-petct"


def _started_by(sessions, job_id: int) -> list[dict]:  # noqa: ANN001
    return [event_data(e) for e in job_events(sessions, job_id) if e.kind == EventKind.STARTED]


def _pid(owner: str) -> int:
    return int(owner.rsplit(":", 1)[1])


def test_serve_runs_one_worker_per_device_and_survives_one_killed(tmp_path: Path, small_study):
    _, ct_files, pt_files = small_study
    config = node_config(
        tmp_path, model_path=str(MODEL),
        node="study_quiet_seconds = 0\nworker_restart_seconds = 1\nlease_seconds = 60\nretry_backoff_seconds = 0",
        extra='[[workers]]\ndevice = "cpu"\nname = "gpu-a"\n[[workers]]\ndevice = "cpu"\nname = "gpu-b"\n',
    )
    sessions = make_sessionmaker(config.database_url)
    studies = small_studies(tmp_path / "studies", ct_files, pt_files, 4)
    for _, files in studies:
        index_files(sessions, files)
    with open(tmp_path / "serve.log", "wb") as log:
        serve = subprocess.Popen([sys.executable, "-m", "dicomnode", "serve", "--config", str(config.source)],
                                 stdout=log, stderr=log)
    try:
        # both workers busy at once, each with its own job
        running = wait_for(lambda: (lambda r: r if len({j.lease_owner for j in r}) == 2 else None)(
            [j for j in jobs(sessions) if j.state == JobState.RUNNING]), 600, "two jobs running at once")
        victim = running[0]
        os.kill(_pid(victim.lease_owner), signal.SIGKILL)
        killed_at = time.monotonic()
        done = wait_for(lambda: (lambda a: a if len(a) == 4 and all(j.state == JobState.SUCCEEDED for j in a)
                                 else None)(jobs(sessions)), 1800, "every job succeeded")
        finished = time.monotonic()

        def worker_names() -> Counter:
            with sessions() as session:
                rows = list(session.scalars(select(Component).where(Component.name == Role.WORKER)))
            return Counter(json.loads(w.detail).get("name") for w in rows)

        # the killed worker started again under its own name (its row written at its first heartbeat)
        names = wait_for(lambda: (lambda n: n if sum(n.values()) == 3 else None)(worker_names()), 600,
                         "the killed worker restarted")
        status = subprocess.run([sys.executable, "-m", "dicomnode", "status", "--json", "--config",
                                 str(config.source)], capture_output=True, text=True, timeout=120)
        report = json.loads(status.stdout)
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(90)
    log_text = (tmp_path / "serve.log").read_text()
    assert code == 0, log_text[-3000:]

    assert sorted(j.study_uid for j in done) == sorted(uid for uid, _ in studies)  # one job per study
    starts = {j.id: _started_by(sessions, j.id) for j in done}
    assert all(s["device"] == "cpu" for started in starts.values() for s in started)
    assert {s["worker"] for started in starts.values() for s in started} == {"gpu-a", "gpu-b"}
    assert len(starts[victim.id]) == 2  # the killed attempt, then the finished one
    assert starts[victim.id][0]["owner"] == victim.lease_owner
    kinds = [e.kind for e in job_events(sessions, victim.id)]
    assert EventKind.WORKER_GONE in kinds or EventKind.LEASE_EXPIRED in kinds
    inference = [event_data(e) for j in done for e in job_events(sessions, j.id)
                 if e.kind == EventKind.INFERENCE_DONE]
    assert inference and {d["device"] for d in inference} == {"cpu"}
    # the killed worker was started again under its own name, the other one never stopped
    victim_name = starts[victim.id][0]["worker"]
    assert names[victim_name] == 2 and sum(names.values()) == 3, names
    assert "SIGKILL" in log_text and f"({victim_name}) exited with -9" in log_text
    up = [c for c in report["components"] if c["name"] == "worker" and c["up"]]
    assert sorted((c["detail"]["name"], c["detail"]["device"]) for c in up) == [("gpu-a", "cpu"), ("gpu-b", "cpu")]
    print(f"\n4 studies, 2 workers: the killed worker's job done {finished - killed_at:.1f} s after the kill")


@pytest.fixture(scope="module")
def postgres():
    if postgres_bin() is None and not os.environ.get("CI"):
        pytest.skip("PostgreSQL not installed (make system-packages installs it)")
    folder = Path(tempfile.mkdtemp(prefix="dicomnode-pg-"))  # not pytest's: the server runs as postgres
    folder.chmod(0o755)
    try:
        server = PostgresServer(folder / "cluster")
        yield server
        server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


LEASE_SECONDS = 10


def test_workers_on_two_hosts_share_a_queue(tmp_path: Path, small_study, postgres, scp_factory):
    _, ct_files, pt_files = small_study
    pacs = scp_factory([SegmentationStorage, Comprehensive3DSRStorage])
    url = postgres.new_database()
    shared = tmp_path / "shared-data"  # the NFS / CephFS mount of a site
    hosts = {}
    for name in ("host-a", "host-b"):
        folder = tmp_path / name
        folder.mkdir()
        write_config(folder, model_path=str(MODEL), node=(
            f'ae_title = "{name.upper()}"\ndata_dir = "{shared}"\ndatabase_url = "{url}"\n'
            f"lease_seconds = {LEASE_SECONDS}\nstudy_quiet_seconds = 0\nretry_backoff_seconds = 0"),
            extra=f'[[destinations]]\nname = "pacs"\nae_title = "TESTSCP"\nhost = "127.0.0.1"\nport = {pacs.port}\n')
        hosts[name] = folder
    (tmp_path / "receiver").mkdir()
    config = node_config(tmp_path / "receiver", model_path=str(MODEL), node=(  # the receiver host's view
        f'data_dir = "{shared}"\ndatabase_url = "{url}"\nstudy_quiet_seconds = 0'),
        extra=f'[[destinations]]\nname = "pacs"\nae_title = "TESTSCP"\nhost = "127.0.0.1"\nport = {pacs.port}\n')
    sessions = make_sessionmaker(url)
    studies = small_studies(tmp_path / "studies", ct_files, pt_files, 10)
    for _, files in studies:
        index_files(sessions, files)
    assert len(assembler.queue_ready_studies(sessions, config)) == 10

    started = time.monotonic()
    a = start_worker(hosts["host-a"], "--name", "host-a-gpu0", "--device", "cpu")
    b = start_worker(hosts["host-b"], "--name", "host-b-gpu0", "--device", "cpu")
    try:
        # A mid-job, after two jobs of its own: inputs built, the model running, results not yet written
        def a_mid_job():  # noqa: ANN202
            all_ = jobs(sessions)
            if sum(1 for j in all_ if j.state == JobState.SUCCEEDED
                   and _started_by(sessions, j.id)[-1]["worker"] == "host-a-gpu0") < 2:
                return None
            for job in all_:
                if job.state == JobState.RUNNING and job.lease_owner and _pid(job.lease_owner) == a.pid:
                    if EventKind.INPUTS_BUILT in [e.kind for e in job_events(sessions, job.id)]:
                        return job
            return None

        # generous limits: on a loaded 2-core machine one study took up to 4 minutes
        victim = wait_for(a_mid_job, 1800, "worker A running its third job", poll=0.2)
        a.send_signal(signal.SIGKILL)
        a.wait()
        killed_at, killed_utc = time.monotonic(), utcnow()
        done = wait_for(lambda: (lambda all_: all_ if all(j.state == JobState.SUCCEEDED for j in all_) else None)(
            jobs(sessions)), 2400, "all 10 jobs succeeded")
        finished = time.monotonic()
    finally:
        assert stop(b) == 0, (hosts["host-b"] / "worker.log").read_text()[-3000:]
        stop(a)

    # every study done once: one job each, one SEG and one SR each at the PACS
    assert sorted(j.study_uid for j in done) == sorted(uid for uid, _ in studies)
    kinds = Counter((pacs.received[uid].StudyInstanceUID, pacs.received[uid].SOPClassUID) for uid in pacs.stored)
    assert kinds == Counter({(uid, cls): 1 for uid, _ in studies for cls in (SegmentationStorage,
                                                                             Comprehensive3DSRStorage)})
    # the killed worker's job: lease expired, taken over by B, finished once
    events = job_events(sessions, victim.id)
    kinds_in_order = [e.kind for e in events]
    assert kinds_in_order.count(EventKind.STARTED) == 2 and EventKind.LEASE_EXPIRED in kinds_in_order
    first, second = [event_data(e) for e in events if e.kind == EventKind.STARTED]
    assert (first["worker"], second["worker"]) == ("host-a-gpu0", "host-b-gpu0")
    expired_at = next(e.at for e in events if e.kind == EventKind.LEASE_EXPIRED)
    taken_at = [e.at for e in events if e.kind == EventKind.STARTED][1]
    by_worker = Counter(_started_by(sessions, j.id)[-1]["worker"] for j in done)
    assert by_worker["host-a-gpu0"] >= 2 and by_worker["host-b-gpu0"] >= 2
    assert by_worker["host-a-gpu0"] + by_worker["host-b-gpu0"] == 10
    # both hosts wrote into the one shared data_dir
    assert sorted(p.parent.parent.name for p in (shared / "results").glob("*/job-*/seg.dcm")) == sorted(
        uid for uid, _ in studies)
    print(f"\n10 studies, 2 worker processes on PostgreSQL: {finished - started:.1f} s "
          f"({(finished - started) / 10:.1f} s per study; jobs finished by A {by_worker['host-a-gpu0']}, "
          f"B {by_worker['host-b-gpu0']}); lease {LEASE_SECONDS} s: the killed job re-queued "
          f"{(expired_at - killed_utc).total_seconds():.1f} s after the kill, claimed again by B "
          f"{(taken_at - killed_utc).total_seconds():.1f} s after the kill; kill to all done "
          f"{finished - killed_at:.1f} s")
