"""The worker in-process on the real demo model: a bad input fails with a reason that names
the attribute; a delivery failure is retried with the same SEG (no second inference)."""

from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicomnode import assembler
from dicomnode.db import Event, Job, make_sessionmaker, utcnow
from dicomnode.index import ReceivedInstance, record_instance
from dicomnode.localpacs import LocalOrthanc, free_port
from dicomnode.synth import write_study
from dicomnode.worker import Worker

from nodeutil import REPO, node_config

MODEL = REPO / "models" / "demo-petct"
pytestmark = pytest.mark.skipif(not (MODEL / "plans.json").exists(), reason="demo model not built")


def _index_folder(sessions, files):
    """Index files as the receiver would (the receiver itself is tested on the network)."""
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        record_instance(sessions, ReceivedInstance(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1",
            ds.Modality, int(ds.SeriesNumber), str(ds.get("SeriesDescription", "")), str(path), "TEST"),
            now=utcnow().replace(year=2020))


def _setup(tmp_path: Path, pacs_port: int):
    config = node_config(
        tmp_path, model_path=str(MODEL),
        node="study_quiet_seconds = 0\nretry_backoff_seconds = 0",
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
    _index_folder(sessions, study.ct_files + study.pt_files)
    [job_id] = assembler.sweep(sessions, config)
    assert _worker(config, sessions, worker_model).run_one()
    with sessions() as session:
        job = session.get(Job, job_id)
    assert job.state == "failed" and job.attempts == 1  # not retried: trying again cannot help
    assert "PatientWeight" in job.error and "SUV" in job.error


def test_delivery_failure_is_retried_with_the_same_seg(tmp_path: Path, worker_model):
    study = write_study(tmp_path / "study", seed=6)
    pacs_port = free_port()
    config, sessions = _setup(tmp_path, pacs_port)
    _index_folder(sessions, study.ct_files + study.pt_files)
    [job_id] = assembler.sweep(sessions, config)
    worker = _worker(config, sessions, worker_model)
    assert worker.run_one()  # nobody listens on the PACS port yet
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.state == "queued" and job.attempts == 1
        assert "not established" in job.error
    [seg_path] = (config.results_dir / study.study_instance_uid).glob("job-*/seg.dcm")
    written_uid = dcmread(seg_path).SOPInstanceUID
    with LocalOrthanc(tmp_path / "orthanc", dicom_port=pacs_port) as pacs:
        assert worker.run_one()
        series = pacs.wait_for_series(study.study_instance_uid, "SEG", timeout=30)
        [instance] = series["Instances"]
        assert pacs.instance_tags(instance)["SOPInstanceUID"] == written_uid
    with sessions() as session:
        job = session.get(Job, job_id)
        kinds = list(session.scalars(select(Event.kind).where(Event.job_id == job_id).order_by(Event.id)))
    assert job.state == "succeeded" and job.attempts == 2
    assert kinds.count("inference-done") == 1 and "results-reused" in kinds
    assert kinds.index("delivery-failed") < kinds.index("retry-scheduled") < kinds.index("results-reused") < kinds.index("delivered")
