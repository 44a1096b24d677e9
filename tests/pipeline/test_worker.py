"""The worker in-process on the real demo model: a bad input fails with a reason that names
the attribute; results wait for a stopped PACS and arrive once, with the same UIDs (no second
inference), and `dicomnode jobs show` has the run's timeline. A worker process stopped by
SIGTERM during a job gives it back to the queue for another worker."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.pipeline import assembler
from dicomnode.pipeline.queue import claim
from dicomnode.pipeline.worker import Worker
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.events import event_data
from dicomnode.store.tables import Delivery, Event, Job
from dicomnode.synth.petct import write_study
from dicomnode.testing.orthanc import LocalOrthanc
from dicomnode.testing.ports import free_port

from tests.support.nodeutil import REPO, node_config
from tests.support.selectionutil import index_files

MODEL = REPO / "models" / "demo-petct"
pytestmark = pytest.mark.skipif(not (MODEL / "plans.json").exists(), reason="demo model not built")


def _setup(tmp_path: Path, pacs_port: int):
    config = node_config(
        tmp_path, model_path=str(MODEL),
        node="study_quiet_seconds = 0\nretry_backoff_seconds = 0\ndelivery_backoff_seconds = 0",
        extra=f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {pacs_port}\n',
    )
    return config, make_sessionmaker(config.database_url)


@pytest.fixture(scope="module")
def worker_model():
    """The worker's model cache, loaded once for the module (as the worker keeps it)."""
    return {}


def _worker(config, sessions, cache) -> Worker:
    worker = Worker(config, sessions)
    if "demo-petct" in cache:
        worker.models._models["demo-petct"] = cache["demo-petct"]
    else:
        cache["demo-petct"] = worker.models.get("demo-petct")
    return worker


def test_missing_patient_weight_fails_with_the_attribute_named(tmp_path: Path, worker_model):
    study = write_study(tmp_path / "study", seed=5)
    for path in study.pt_files:
        ds = dcmread(path)
        del ds.PatientWeight
        ds.save_as(path)
    config, sessions = _setup(tmp_path, free_port())
    index_files(sessions, study.ct_files + study.pt_files)
    [job_id] = assembler.queue_ready_studies(sessions, config)
    assert _worker(config, sessions, worker_model).run_one()
    with sessions() as session:
        job = session.get(Job, job_id)
    assert job.state == "failed" and job.attempts == 1  # not retried: trying again cannot help
    assert "PatientWeight" in job.error and "SUV" in job.error


@pytest.mark.e2e
def test_results_wait_for_a_stopped_pacs_and_arrive_once(tmp_path: Path, worker_model):
    """The PACS is down when the SEG and SR are ready: each delivery fails and backs off, the job
    goes back to the queue (the worker is free), and once the PACS is up the same files (same SOP
    Instance UIDs) arrive, once, without a second inference."""
    study = write_study(tmp_path / "study", seed=6)
    pacs_port = free_port()
    config, sessions = _setup(tmp_path, pacs_port)
    index_files(sessions, study.ct_files + study.pt_files)
    [job_id] = assembler.queue_ready_studies(sessions, config)
    worker = _worker(config, sessions, worker_model)
    assert worker.run_one()  # nobody listens on the PACS port yet
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.state == "queued" and job.attempts == 0  # deferred: the deliveries count their own attempts
        assert "not established" in job.error and "seg.dcm" in job.error
        rows = list(session.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)))
    assert [(Path(d.path).name, d.destination, d.state, d.attempts) for d in rows] == [
        ("seg.dcm", "pacs", "pending", 1), ("sr.dcm", "pacs", "pending", 1)]
    [out] = (config.results_dir / study.study_instance_uid).glob("job-*")
    written = {dcmread(out / name).Modality: str(dcmread(out / name).SOPInstanceUID) for name in ("seg.dcm", "sr.dcm")}
    with LocalOrthanc(tmp_path / "orthanc", dicom_port=pacs_port) as pacs:
        assert worker.run_one()
        assert not worker.run_one()  # nothing left: delivered once
        held: dict[str, list[str]] = {}
        for series in pacs.series_of_study(study.study_instance_uid):
            modality = series["MainDicomTags"]["Modality"]
            held.setdefault(modality, []).extend(pacs.instance_tags(i)["SOPInstanceUID"] for i in series["Instances"])
    assert held == {"SEG": [written["SEG"]], "SR": [written["SR"]]}
    with sessions() as session:
        job = session.get(Job, job_id)
        kinds = list(session.scalars(select(Event.kind).where(Event.job_id == job_id).order_by(Event.id)))
        rows = list(session.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)))
    assert job.state == "succeeded" and job.attempts == 1
    assert [(d.state, d.attempts) for d in rows] == [("sent", 2), ("sent", 2)]
    assert kinds.count("inference-done") == 1 and "results-reused" in kinds
    assert kinds.count("delivery-failed") == 2 and kinds.count("delivered") == 2
    assert (
        kinds.index("delivery-failed")
        < kinds.index("delivery-pending")
        < kinds.index("results-reused")
        < kinds.index("delivered")
    )
    _check_timeline(config, job_id)
    _check_status_names_the_loaded_model(config)


def _cli_json(config, *args: str) -> dict:
    result = CliRunner().invoke(app, [*args, "--json", "--config", str(config.source)])
    return json.loads(result.output)


def _check_timeline(config, job_id: int) -> None:
    """`jobs show` of that run: the steps in order, and durations that add up."""
    steps = _cli_json(config, "jobs", "show", str(job_id))["timeline"]
    print("\n".join(f"{s['event']:18} +{s['since_previous_seconds'] or 0:8.2f} s  {s['message'][:90]}" for s in steps))
    assert [s["event"] for s in steps if s["event"] != "series-verdict"] == [
        "study-received",
        "last-instance",
        "queued",
        "started",
        "inputs-built",
        "inference-done",
        "measured",
        "results-written",
        "deliveries-planned",
        "delivery-failed",
        "delivery-failed",
        "step-times",
        "delivery-pending",
        "started",
        "results-reused",
        "delivered",
        "delivered",
        "step-times",
        "succeeded",
    ]
    for before, step in zip(steps, steps[1:]):
        assert step["since_previous_seconds"] >= 0
        assert step["since_received_seconds"] == pytest.approx(
            before["since_received_seconds"] + step["since_previous_seconds"], abs=1e-3
        )
    inference = next(s for s in steps if s["event"] == "inference-done")
    assert (
        inference["since_previous_seconds"] >= float(inference["message"].split(" s on ")[0]) - 0.05
    )  # the model's time is in the step
    # where each attempt's time went (the message in `jobs show`, the figures in the event's data): the
    # first made the results (the model among its steps), the second only delivered them
    with make_sessionmaker(config.database_url)() as session:
        first, second = [{"message": e.message, "data": event_data(e)} for e in session.scalars(
            select(Event).where(Event.job_id == job_id, Event.kind == "step-times").order_by(Event.id))]
    assert [s["message"] for s in steps if s["event"] == "step-times"] == [first["message"], second["message"]]
    assert list(first["data"]["seconds"]) == ["prior", "select", "read", "SUV", "resample", "channels", "inference",
                                              "labels saved", "measures", "SEG", "write", "SR", "delivery"]
    assert first["data"]["seconds"]["inference"] == pytest.approx(float(inference["message"].split(" s on ")[0]),
                                                                 abs=0.05)
    assert first["data"]["besides_inference"] == pytest.approx(
        sum(first["data"]["seconds"].values()) - first["data"]["seconds"]["inference"], abs=0.01)
    assert list(second["data"]["seconds"]) == ["prior", "delivery"]
    assert first["message"].startswith(f"{first['data']['besides_inference']:.1f} s besides inference: prior ")


def _check_status_names_the_loaded_model(config) -> None:
    status = _cli_json(config, "status")
    [worker] = [c for c in status["components"] if c["name"] == "worker"]
    assert (worker["up"], worker["pid"], worker["detail"]["models"]) == (True, os.getpid(), ["demo-petct"])
    assert status["models"] == [{"name": "demo-petct", "loaded_by": [f"{socket.gethostname()}:{os.getpid()}"]}]


def _wait_for(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise TimeoutError


@pytest.mark.e2e
def test_sigterm_during_a_job_leaves_it_claimable(tmp_path: Path, synth_study):
    """`dicomnode worker` gets SIGTERM while it runs a job (loading the model or running it): it
    gives the job back (not counting the attempt) and exits 0; another worker claims the job."""
    config, sessions = _setup(tmp_path, free_port())
    index_files(sessions, synth_study.ct_files + synth_study.pt_files)
    [job_id] = assembler.queue_ready_studies(sessions, config)
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "worker", "--config", str(config.source)], stdout=log, stderr=log
        )
    try:

        def running() -> bool:
            with sessions() as session:
                return session.get(Job, job_id).state == "running"

        _wait_for(running, 60)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, (tmp_path / "worker.log").read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.state, job.attempts, job.lease_owner) == ("queued", 0, None)
        last = session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id.desc())).first()
    assert (last.kind, last.message) == ("released", "worker shutting down")
    again = claim(sessions, "another-worker", timedelta(minutes=10))
    assert (again.id, again.attempts) == (job_id, 1)
    assert f"worker {socket.gethostname()}:{worker.pid} stopping (SIGTERM)" in (tmp_path / "worker.log").read_text()


def test_a_stop_signal_while_claiming_releases_the_claimed_job(tmp_path: Path, monkeypatch):
    """SIGTERM landing just after claim() committed (before run_one holds the job) is deferred:
    run_one then stops with the job released, not left running until its lease expires."""
    import dicomnode.pipeline.worker as worker_module

    config, sessions = _setup(tmp_path, free_port())
    study = write_study(tmp_path / "study", seed=0)
    index_files(sessions, study.ct_files + study.pt_files)
    [job_id] = assembler.queue_ready_studies(sessions, config)
    worker = Worker(config, sessions)

    def claim_then_signal(*args, **kwargs):
        job = claim(*args, **kwargs)
        worker.request_stop("SIGTERM")  # what the signal handler calls; deferred while claiming
        return job

    monkeypatch.setattr(worker_module, "claim", claim_then_signal)
    with pytest.raises(worker_module.Shutdown, match="SIGTERM"):
        worker.run_one()
    assert worker.models.loaded() == []  # stopped before loading the model
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.state, job.attempts, job.lease_owner) == ("queued", 0, None)
        last = session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id.desc())).first()
    assert (last.kind, last.message) == ("released", "worker shutting down")
    worker.request_stop("SIGTERM")  # a second signal (serve's and systemd's) interrupts nothing: no release cut short
    with pytest.raises(worker_module.Shutdown):  # outside a claim the stop is immediate
        Worker(config, sessions).request_stop("SIGINT")
