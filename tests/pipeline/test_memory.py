"""Memory faults in the worker: a worker that runs out of memory under a real limit fails the
attempt saying so and the job is retried, while the receiver keeps receiving; a case too big
for worker_memory_gb is refused before inference; a worker that cannot even start is restarted
with a growing delay, never in a storm; the GPU running out moves the model to the CPU."""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from dicomnode.config import load_config
from dicomnode.pipeline import assembler
from dicomnode.pipeline.worker import Worker
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Event, Job
from dicomnode.testing.node import start_node

from tests.support.nodeutil import REPO, tiny_instance, write_config
from tests.support.selectionutil import index_files

MODEL = REPO / "models" / "demo-petct"
pytestmark = pytest.mark.skipif(not (MODEL / "plans.json").exists(), reason="demo model not built")

PROBE = """
import sys
from dicomnode.config import load_config
from dicomnode.pipeline.job import process_data_bytes
from dicomnode.pipeline.model_cache import ModelCache
config = load_config(sys.argv[1])
ModelCache(config).get("demo-petct")
print(process_data_bytes())
"""


def _job_of_small_study(tmp_path: Path, small_study, node: str = "") -> tuple:
    study_uid, ct_files, pt_files = small_study
    config_path = write_config(tmp_path, model_path=str(MODEL),
                               node="study_quiet_seconds = 0\nretry_backoff_seconds = 0\n" + node)
    config_path.write_text(config_path.read_text().replace("folds = [0, 1, 2, 3, 4]", "folds = [0]"))  # one fold: quick
    config = load_config(config_path)
    sessions = make_sessionmaker(config.database_url)
    index_files(sessions, ct_files + pt_files)
    [job_id] = assembler.queue_ready_studies(sessions, config)
    return config_path, config, sessions, job_id


def _events(sessions, job_id) -> list[Event]:  # noqa: ANN001
    with sessions() as session:
        return list(session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id)))


@pytest.mark.e2e
def test_a_worker_out_of_memory_fails_the_attempt_saying_so_and_the_job_is_retried(tmp_path: Path, small_study):
    """The worker runs under a data limit (RLIMIT_DATA, as a cgroup or ulimit would impose) just
    above what it holds once the model is loaded: the prediction cannot allocate. Each attempt
    fails with "out of memory", the worker lives on and the job is retried until its attempts are
    used up; a receiver beside it stores instances all the while."""
    config_path, config, sessions, job_id = _job_of_small_study(tmp_path, small_study)
    probe = subprocess.run([sys.executable, "-c", PROBE, str(config_path)], capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    limit = int(probe.stdout.split()[-1]) + 150 * 2**20  # the loaded model fits; a prediction (~400 MB more) does not

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    node = start_node(config_path, config.node.port, tmp_path / "node.log", extra_args=("--no-worker",))
    worker = subprocess.Popen([sys.executable, "-m", "dicomnode", "worker", "--config", str(config_path)],
                              preexec_fn=limited, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "worker.log", "wb"))
    try:
        stored = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            stored.append(_store_one(config))  # the receiver, beside the worker that runs out of memory
            with sessions() as session:
                if session.get(Job, job_id).state == "failed":
                    break
            time.sleep(1)
        assert worker.poll() is None, "the worker died instead of failing the attempt"
    finally:
        worker.terminate()
        worker.wait(60)
        node.stop()
    with sessions() as session:
        job = session.get(Job, job_id)
    kinds = [e.kind for e in _events(sessions, job_id)]
    assert job.state == "failed" and job.attempts == job.max_attempts == 3
    assert job.error.startswith("out of memory while running the job:"), job.error
    assert kinds.count("started") == 3 and kinds.count("retry-scheduled") == 2
    assert stored and all(s == 0x0000 for s in stored)
    print(
        f"limit {limit / 2**20:.0f} MiB: 3 attempts failed with {job.error[:90]!r}; "
        f"{len(stored)} instances stored meanwhile"
    )


def _store_one(config) -> int:  # noqa: ANN001
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", config.node.port, ae_title=config.node.ae_title)
    status = int(assoc.send_c_store(tiny_instance(generate_uid(), generate_uid(), 0)).Status)
    assoc.release()
    return status


def test_a_case_too_big_for_worker_memory_gb_is_refused_before_inference(tmp_path: Path, small_study):
    from inference import SegmentationModel

    _, config, sessions, job_id = _job_of_small_study(tmp_path, small_study, node="worker_memory_gb = 0.05")
    worker = Worker(config, sessions)
    worker.models._models["demo-petct"] = SegmentationModel(MODEL, folds=(0,), device="cpu", use_mirroring=False)
    assert worker.run_one()
    with sessions() as session:
        job = session.get(Job, job_id)
    kinds = [e.kind for e in _events(sessions, job_id)]
    assert job.state == "failed" and job.attempts == 1
    assert re.search(
        r"the case needs about [0-9.]+ GB to segment with model demo-petct \(16x64x64 voxels on the PET grid", job.error
    ), job.error
    assert "more than worker_memory_gb = 0.05: refused before inference" in job.error
    assert "inference-done" not in kinds and "retry-scheduled" not in kinds


@pytest.mark.e2e
def test_a_worker_that_cannot_start_is_restarted_with_a_growing_delay(tmp_path: Path):
    """worker_memory_gb far too small for Python to start: the worker dies at once, every time.
    The supervisor waits worker_restart_seconds, then twice as long after each quick exit; the
    receiver serves all the while."""
    config_path = write_config(tmp_path, node="worker_memory_gb = 0.02\nworker_restart_seconds = 0.5")
    config = load_config(config_path)
    node = start_node(config_path, config.node.port, tmp_path / "node.log")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_restarts(tmp_path / "node.log")) < 4:
            assert _store_one(config) == 0x0000
            time.sleep(0.5)
    finally:
        assert node.stop() == 0
    restarts = _restarts(tmp_path / "node.log")
    assert [delay for delay, _ in restarts[:4]] == [0.5, 1.0, 2.0, 4.0], restarts
    assert [count for _, count in restarts[:4]] == [1, 2, 3, 4]


def _restarts(log: Path) -> list[tuple[float, int]]:
    return [(float(d), int(n)) for d, n in re.findall(r"restarting in ([0-9.]+) s \((\d+) quick exit", log.read_text())]


def test_the_gpu_running_out_moves_the_model_to_the_cpu_and_the_job_is_retried_there(tmp_path: Path, small_study):
    """No GPU here: the first prediction raises torch's own CUDA out-of-memory error (the fault is
    injected; the model, the cache and the worker are real). With device "auto" the site allows
    the CPU, so the model is loaded again on the CPU and the job's next attempt succeeds."""
    import torch

    from dicomnode.pipeline import model_cache

    _, config, sessions, job_id = _job_of_small_study(tmp_path, small_study)
    assert config.model("demo-petct").device == "auto"
    loaded_on = []
    real_load = model_cache.load_model

    def load(settings, use_mirroring=None, device=None, fold_devices=None):  # noqa: ANN001, ANN202
        model = real_load(settings, use_mirroring, device, fold_devices=fold_devices)
        loaded_on.append(device)
        if device != "cpu":  # as it was configured ("auto"): "the GPU"

            def out_of_gpu_memory(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

            model.predict = out_of_gpu_memory
        return model

    model_cache.load_model = load
    try:
        worker = Worker(config, sessions)
        assert worker.run_one()
        with sessions.begin() as session:
            first = session.get(Job, job_id)
            assert first.state == "queued" and first.error.startswith("CUDA out of memory while running the job")
            first.not_before = first.created_at
        assert worker.run_one()
    finally:
        model_cache.load_model = real_load
    with sessions() as session:
        assert session.get(Job, job_id).state == "succeeded"
    assert loaded_on == ["auto", "cpu"]
