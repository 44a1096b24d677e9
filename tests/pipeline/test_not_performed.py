""""AI not performed" in the study: a job that ends without results sends its status SR to each
destination that has STATUS among its outputs, once, retried like a result object, and never when
the job made results. The worker runs in-process on the synthetic study (indexed as received);
C-STORE is replaced by a recorder here (the real Orthanc round trip is in
tests/e2e/test_not_performed_e2e.py). Time is the `now` the functions take: nothing sleeps."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicomnode.net.sender import Outcome
from dicomnode.pipeline import assembler, delivery
from dicomnode.pipeline.job import result_dir
from dicomnode.pipeline.notperformed import send_status_reports
from dicomnode.pipeline.queue import RetryPolicy, enqueue
from dicomnode.pipeline.worker import Worker
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Event, Job, JobState, Study, utcnow

from tests.support.nodeutil import REPO, node_config
from tests.support.selectionutil import index_files

MODEL_ERROR = "RuntimeError: CUDA error: an illegal memory access was encountered"


class RaisingModel:
    """Takes the demo model's two channels and fails in predict, as a broken GPU would."""

    channel_names = ["CT", "PET"]
    device = "cpu"

    def predict(self, channels, spacing):  # noqa: ANN001, ANN201
        raise RuntimeError(MODEL_ERROR.split(": ", 1)[1])


class Recorder:
    """Stands in for dicomnode.net.outbound.store_each: what was sent, answered by `answers` in turn."""

    def __init__(self, answers=("ok",)) -> None:
        self.sent: list[tuple[str, str, str]] = []  # (destination, file name, SOP Instance UID)
        self.answers = list(answers)

    def __call__(self, destination, paths, calling_aet, timeout=30.0, tries_per_instance=3, on_sent=None):  # noqa: ANN001, ANN204
        outcomes = []
        for path in paths:
            ds = dcmread(path, stop_before_pixels=True)
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            self.sent.append((destination.name, Path(path).name, str(ds.SOPInstanceUID)))
            error = None if answer == "ok" else answer
            outcomes.append(Outcome(Path(path), str(ds.SOPInstanceUID), str(ds.SOPClassUID), 1,
                                    0x0000 if error is None else None, error))
        return outcomes


def _destinations(*entries: tuple[str, str]) -> str:
    return "".join(f'[[destinations]]\nname = "{name}"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 1\n{extra}\n'
                   for name, extra in entries)


def _config(tmp_path: Path, destinations: str, node: str = ""):
    return node_config(tmp_path, model_path=str(REPO / "models" / "demo-petct"),
                       node="max_attempts = 1\ndelivery_backoff_seconds = 60\n" + node,
                       extra='version = "test-1"\n' + destinations)


def _events(sessions, job_id: int) -> list[tuple[str, str]]:
    with sessions() as session:
        return [(e.kind, e.message) for e in session.scalars(select(Event).where(Event.job_id == job_id)
                                                             .order_by(Event.id))]


def _failing_job(tmp_path: Path, synth_study, monkeypatch, destinations: str, recorder: Recorder):
    config = _config(tmp_path, destinations)
    sessions = make_sessionmaker(config.database_url)
    index_files(sessions, synth_study.ct_files + synth_study.pt_files)
    monkeypatch.setattr("dicomnode.pipeline.dispatch.store_each", recorder)
    job_id = enqueue(sessions, synth_study.study_instance_uid, "demo-petct", RetryPolicy(max_attempts=1))
    worker = Worker(config, sessions)
    worker.models._models["demo-petct"] = RaisingModel()
    assert worker.run_one()
    with sessions() as session:
        job = session.get(Job, job_id)
    return config, sessions, job


def test_a_model_error_sends_the_status_sr_once(tmp_path: Path, synth_study, monkeypatch):
    recorder = Recorder()
    config, sessions, job = _failing_job(
        tmp_path, synth_study, monkeypatch,
        _destinations(("pacs", ""), ("archive", 'outputs = ["SEG", "SR"]')),  # pacs: the default outputs
        recorder)
    assert job.state == JobState.FAILED and MODEL_ERROR in job.error
    path = result_dir(config, job) / "status.dcm"
    ds = dcmread(path)
    assert recorder.sent == [("pacs", "status.dcm", ds.SOPInstanceUID)]  # not to "archive": no STATUS there
    assert ds.SeriesNumber == 905 and ds.SeriesDescription == "demo-petct not performed (run 1)"
    assert ds.StudyInstanceUID == synth_study.study_instance_uid
    texts = {i.ConceptNameCodeSequence[0].CodeValue: i.get("TextValue") for i in ds.ContentSequence}
    assert texts["111001"] == "demo-petct" and texts["111003"] == "test-1"
    assert MODEL_ERROR in texts["REASON"] and "not performed" in texts["121106"]
    assert [(d.destination, Path(d.path).name, d.state) for d in delivery.of_job(sessions, job.id)] == [
        ("pacs", "status.dcm", "sent")]
    kinds = [kind for kind, _ in _events(sessions, job.id)]
    assert kinds[-3:] == ["status-written", "deliveries-planned", "delivered"]
    assert kinds.index("failed") < kinds.index("status-written")
    # the periodic pass later: nothing more to send, the same file
    assert send_status_reports(config, sessions, utcnow() + timedelta(hours=1)) == 0
    assert len(recorder.sent) == 1 and dcmread(path).SOPInstanceUID == ds.SOPInstanceUID


def test_a_status_sr_not_stored_is_sent_again_with_the_same_uid(tmp_path: Path, synth_study, monkeypatch):
    recorder = Recorder(answers=["association rejected", "ok"])
    config, sessions, job = _failing_job(tmp_path, synth_study, monkeypatch, _destinations(("pacs", "")), recorder)
    [row] = delivery.of_job(sessions, job.id)
    assert row.state == "pending" and row.attempts == 1 and "association rejected" in row.last_error
    assert send_status_reports(config, sessions, utcnow() + timedelta(seconds=10)) == 0  # backoff: not due yet
    assert send_status_reports(config, sessions, utcnow() + timedelta(seconds=61)) == 1
    assert [uid for *_, uid in recorder.sent] == [row.sop_instance_uid] * 2
    [row] = delivery.of_job(sessions, job.id)
    assert row.state == "sent"


def test_no_status_sr_when_no_destination_wants_it(tmp_path: Path, synth_study, monkeypatch):
    recorder = Recorder()
    config, sessions, job = _failing_job(tmp_path, synth_study, monkeypatch,
                                         _destinations(("pacs", 'outputs = ["SEG", "SR"]')), recorder)
    assert job.state == JobState.FAILED
    assert recorder.sent == [] and delivery.of_job(sessions, job.id) == []
    assert not (result_dir(config, job) / "status.dcm").exists()


def test_a_status_delivery_never_counts_in_a_retried_jobs_results(tmp_path: Path, synth_study, monkeypatch):
    """A pending status delivery is left out of the job's result pass and summary."""
    recorder = Recorder(answers=["association rejected"])
    config, sessions, job = _failing_job(tmp_path, synth_study, monkeypatch, _destinations(("pacs", "")), recorder)
    assert delivery.due(sessions, job.id, utcnow() + timedelta(hours=1)) == []
    assert delivery.summary(sessions, job.id).total == 0
    assert delivery.summary(sessions, job.id, status=True).pending == 1


def _held_back_study(tmp_path: Path, synth_study, monkeypatch, node: str = ""):
    config = _config(tmp_path, _destinations(("pacs", "")), node)
    sessions = make_sessionmaker(config.database_url)
    pet = sorted(synth_study.pt_files)
    index_files(sessions, synth_study.ct_files + pet[:30] + pet[34:])  # 4 PET slices never arrive
    recorder = Recorder()
    monkeypatch.setattr("dicomnode.pipeline.dispatch.store_each", recorder)
    with sessions() as session:
        last = session.get(Study, synth_study.study_instance_uid).last_received_at
    return config, sessions, recorder, last


def _jobs(sessions) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def test_a_study_held_back_past_status_after_hours_gets_one_status_sr(tmp_path: Path, synth_study, monkeypatch):
    config, sessions, recorder, last = _held_back_study(tmp_path, synth_study, monkeypatch,
                                                        "status_after_hours = 6")
    assert assembler.queue_ready_studies(sessions, config, now=last + timedelta(minutes=5)) == []
    assert assembler.queue_ready_studies(sessions, config, now=last + timedelta(hours=5.9)) == []
    [job_id] = assembler.queue_ready_studies(sessions, config, now=last + timedelta(hours=6))
    [job] = _jobs(sessions)
    assert job.id == job_id and job.state == JobState.FAILED and job.run_number == 1 and job.attempts == 0
    assert "study held back" in job.error and "has 60 of 64 instances" in job.error
    assert "status_after_hours = 6" in job.error
    assert [k for k, _ in _events(sessions, job.id)] == ["held-back", "failed"]
    # later sweeps: still once
    assert assembler.queue_ready_studies(sessions, config, now=last + timedelta(hours=30)) == []
    assert send_status_reports(config, sessions, last + timedelta(hours=6, seconds=5)) == 1
    assert send_status_reports(config, sessions, last + timedelta(hours=7)) == 0
    [(name, file, uid)] = recorder.sent
    ds = dcmread(result_dir(config, job) / "status.dcm")
    assert (name, file, uid) == ("pacs", "status.dcm", ds.SOPInstanceUID)
    reason = {i.ConceptNameCodeSequence[0].CodeValue: i.get("TextValue") for i in ds.ContentSequence}["REASON"]
    assert "has 60 of 64 instances" in reason and ds.SeriesNumber == 905
    # the missing slices arrive: the study is a candidate again, and its real run is run 2 (911, 912 > 905)
    index_files(sessions, sorted(synth_study.pt_files)[30:34], at=last + timedelta(hours=31))
    with sessions() as session:
        arrived = session.get(Study, synth_study.study_instance_uid).last_received_at
    [second] = assembler.queue_ready_studies(sessions, config, now=arrived + timedelta(seconds=5))
    assert [(j.id, j.state, j.run_number) for j in _jobs(sessions)] == [
        (job_id, "failed", 1), (second, "queued", 2)]


def test_status_after_hours_zero_holds_back_without_a_status_sr(tmp_path: Path, synth_study, monkeypatch):
    config, sessions, recorder, last = _held_back_study(tmp_path, synth_study, monkeypatch,
                                                        "status_after_hours = 0")
    assert assembler.queue_ready_studies(sessions, config, now=last + timedelta(days=3)) == []
    assert _jobs(sessions) == [] and recorder.sent == []


@pytest.mark.parametrize("outputs", ['["SEG", "SR", "STATUS"]', '["STATUS", "SEG"]'])
def test_status_is_an_output_kind(tmp_path: Path, outputs: str):
    config = _config(tmp_path, _destinations(("pacs", f"outputs = {outputs}")))
    assert "STATUS" in config.destinations[0].outputs
