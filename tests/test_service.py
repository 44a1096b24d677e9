"""`dicomnode serve` as a process: the worker is a separate, supervised process, so killing
it never stops the receiver, and it comes back; SIGTERM gives the running job back to the queue."""

import os
import signal
import socket
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from dicomnode.config import Destination, load_config
from dicomnode.net.sender import send_files
from dicomnode.pipeline import queue
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Event, Job
from dicomnode.testing.node import start_node

from tests.support.nodeutil import tiny_instance, write_config


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _wait_for(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError


@pytest.mark.e2e
def test_killed_worker_never_stops_the_receiver_and_is_restarted(tmp_path: Path):
    config_path = write_config(tmp_path)
    config = load_config(config_path)
    node = start_node(config_path, config.node.port, tmp_path / "node.log")
    try:
        [worker] = _wait_for(lambda: _children(node.process.pid), 30)
        os.kill(worker, signal.SIGKILL)  # as the kernel's OOM killer would
        ae = AE(ae_title="ANYSCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", config.node.port, ae_title=config.node.ae_title)
        assert assoc.send_c_store(tiny_instance(generate_uid(), generate_uid(), 0)).Status == 0x0000
        assoc.release()
        [restarted] = _wait_for(lambda: [p for p in _children(node.process.pid) if p != worker], 30)
        assert restarted != worker
    finally:
        assert node.stop() == 0
    log = (tmp_path / "node.log").read_text()
    assert f"worker process {worker} (worker) exited with -9 (SIGKILL: out of memory?) after" in log


MODEL = Path(__file__).resolve().parents[1] / "models" / "demo-petct"


def _job_states(sessions) -> dict[int, str]:
    with sessions() as session:
        return dict(session.execute(select(Job.id, Job.state)).all())


@pytest.mark.e2e
@pytest.mark.skipif(not (MODEL / "plans.json").exists(), reason="demo model not built")
def test_sigterm_while_a_job_runs_queues_it_again_and_exits(tmp_path: Path, synth_study):
    """systemctl stop during a job: no new associations, the job goes back to the queue (its
    attempt not counted) and the node exits 0 in time."""
    # mirroring: a job of several seconds, so it is still running when the stop reaches the worker
    # (without it, on a loaded machine, the demo job could finish in between)
    config_path = write_config(tmp_path, model_path=str(MODEL), mirroring=True)
    config = load_config(config_path)
    node = start_node(config_path, config.node.port, tmp_path / "node.log")
    sessions = make_sessionmaker(config.database_url)
    try:
        into_node = Destination(name="node", ae_title=config.node.ae_title, host="127.0.0.1", port=config.node.port)
        send_files(into_node, synth_study.ct_files + synth_study.pt_files, "STORESCU")
        [job_id] = _wait_for(lambda: [i for i, state in _job_states(sessions).items() if state == "running"], 120)
    finally:
        started = time.monotonic()
        assert node.stop(timeout=60) == 0
    assert time.monotonic() - started < 45
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", config.node.port), timeout=2)
    with sessions() as session:
        job = session.get(Job, job_id)
        events = [e.kind for e in session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id))]
    assert job.state == "queued" and job.attempts == 0 and job.lease_owner is None
    # stopped mid-attempt (the model loads when the job first needs it, so it may have built its inputs)
    assert "started" in events and events[-1] == "released", events
    assert not {"results-written", "failed"} & set(events[events.index("started"):]), events
    assert queue.claim(sessions, "next-worker", timedelta(minutes=1)).id == job_id  # re-claimable at once


@pytest.mark.e2e
@pytest.mark.skipif(not (MODEL / "plans.json").exists(), reason="demo model not built")
def test_a_restarted_node_takes_its_dead_workers_job_back_at_once(tmp_path: Path, synth_study):
    """kill -9 of the whole node (serve and its worker) during a job: the node started again knows
    that the worker it supervised is gone and queues the job at once, not after its 600 s lease;
    the job then succeeds. A job leased by a worker on another host is left to its lease."""
    config_path = write_config(tmp_path, model_path=str(MODEL), node="lease_seconds = 600")
    config = load_config(config_path)
    sessions = make_sessionmaker(config.database_url)
    remote = queue.enqueue(sessions, generate_uid(), "demo-petct", queue.RetryPolicy(), "a job on another host")
    queue.claim(sessions, "gpu-host-2:4242", timedelta(minutes=10))
    node = start_node(config_path, config.node.port, tmp_path / "node.log")
    try:
        into_node = Destination(name="node", ae_title=config.node.ae_title, host="127.0.0.1", port=config.node.port)
        send_files(into_node, synth_study.ct_files + synth_study.pt_files, "STORESCU")
        [job_id] = _wait_for(
            lambda: [i for i, state in _job_states(sessions).items() if state == "running" and i != remote], 120
        )
        for pid in [*_children(node.process.pid), node.process.pid]:
            os.kill(pid, signal.SIGKILL)
        node.process.wait()
    finally:
        node.stop()
    restarted_at = time.monotonic()
    node = start_node(config_path, config.node.port, tmp_path / "node-2.log")
    try:
        _wait_for(lambda: _job_states(sessions)[job_id] != "running", 60)
        back_after = time.monotonic() - restarted_at
        _wait_for(lambda: _job_states(sessions)[job_id] == "succeeded", 180)
    finally:
        assert node.stop() == 0
    with sessions() as session:
        kinds = [e.kind for e in session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id))]
        remote_job = session.get(Job, remote)
    print(f"job {job_id} back in the queue {back_after:.1f} s after the restart (lease 600 s)")
    assert back_after < 60 and "worker-gone" in kinds and "lease-expired" not in kinds
    assert kinds.count("started") == 2 and kinds[-1] == "succeeded"
    assert (
        remote_job.state == "running" and remote_job.lease_owner == "gpu-host-2:4242"
    )  # another host: its lease holds


def test_a_sweep_longer_than_its_interval_is_logged_once_with_its_time(tmp_path: Path, caplog):
    """APScheduler's "skipped" warning, once per interval while a sweep runs long, is dropped;
    the sweep itself logs one line saying how long it took."""
    import logging

    from dicomnode import service

    from tests.support.nodeutil import node_config

    config = node_config(tmp_path, node="sweep_seconds = 0.000001")
    sessions = make_sessionmaker(config.database_url)
    with caplog.at_level(logging.WARNING, logger="dicomnode.service"):
        service.periodic_sweep(sessions, config)
    [line] = [r.getMessage() for r in caplog.records if r.name == "dicomnode.service"]
    assert line.startswith("sweep took ") and "longer than sweep_seconds = 1e-06" in line

    skipped = logging.LogRecord(
        "apscheduler.scheduler",
        logging.WARNING,
        __file__,
        1,
        'Execution of job "%s" skipped: maximum number of running instances reached (%d)',
        ("sweep (trigger: interval[0:00:00.500000])", 1),
        None,
    )
    other = logging.LogRecord(
        "apscheduler.scheduler", logging.WARNING, __file__, 1, "Run time of job was missed", (), None
    )
    keep = service._SkippedRunsFilter()
    assert (keep.filter(skipped), keep.filter(other)) == (False, True)
