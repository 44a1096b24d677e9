"""The review gate ([[models]] review = true): the worker runs the real demo model in-process and
holds the results (awaiting-review, nothing planned, nothing sent); `dicomnode review release`
queues the job, the worker makes the SR VERIFIED (same SOP Instance UIDs) and delivers it once;
`review reject` sends only the "not performed" status SR with the reason and the reader. Every
step is an event of the job; a job not awaiting review is refused with the reason and exit 1.
C-STORE is replaced by a recorder here (the Orthanc round trip is tests/e2e/test_review_e2e.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread
from rich.cells import cell_len
from sqlalchemy import select
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.pipeline import assembler, delivery
from dicomnode.pipeline.job import result_dir
from dicomnode.pipeline.queue import RefusedError, RetryPolicy, enqueue
from dicomnode.pipeline.review import check_reader, reject, release
from dicomnode.pipeline.worker import Worker
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Event, Job, JobState

from tests.pipeline.test_not_performed import Recorder
from tests.support.nodeutil import REPO, node_config
from tests.support.selectionutil import index_files

MODEL = REPO / "models" / "demo-petct"
pytestmark = pytest.mark.skipif(not (MODEL / "plans.json").exists(), reason="demo model not built")
READER = "Curie^Marie"


@pytest.fixture(scope="module")
def model_cache():
    return {}


def _node(tmp_path: Path, synth_study, monkeypatch, cache, review: bool = True):
    config = node_config(
        tmp_path, model_path=str(MODEL),
        node='study_quiet_seconds = 0\norganization = "St Elsewhere Hospital"\n'
             'result_disclaimer = "Not for diagnostic use without review"',
        extra=("review = true\n" if review else "")
        + '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 1\n',
    )
    sessions = make_sessionmaker(config.database_url)
    index_files(sessions, synth_study.ct_files + synth_study.pt_files)
    recorder = Recorder()
    monkeypatch.setattr("dicomnode.pipeline.dispatch.store_each", recorder)
    worker = Worker(config, sessions)
    if "demo-petct" in cache:
        worker.models._models["demo-petct"] = cache["demo-petct"]
    else:
        cache["demo-petct"] = worker.models.get("demo-petct")
    [job_id] = assembler.queue_ready_studies(sessions, config)
    return config, sessions, worker, recorder, job_id


def _job(sessions, job_id: int) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def _kinds(sessions, job_id: int) -> list[str]:
    with sessions() as session:
        return list(session.scalars(select(Event.kind).where(Event.job_id == job_id).order_by(Event.id)))


def _cli(config, *args: str):
    return CliRunner().invoke(app, [*args, "--config", str(config.node.data_dir.parent / "config.toml")],
                              env={"COLUMNS": "80"})


@pytest.fixture
def held(tmp_path: Path, synth_study, monkeypatch, model_cache):
    config, sessions, worker, recorder, job_id = _node(tmp_path, synth_study, monkeypatch, model_cache)
    assert worker.run_one()
    return config, sessions, worker, recorder, job_id


def test_results_are_built_and_held_nothing_sent(held):
    config, sessions, worker, recorder, job_id = held
    job = _job(sessions, job_id)
    assert job.state == JobState.AWAITING_REVIEW and job.lease_owner is None and job.attempts == 0
    out = result_dir(config, job)
    assert (out / "seg.dcm").exists() and (out / "sr.dcm").exists() and (out / "preview.png").exists()
    assert dcmread(out / "sr.dcm").VerificationFlag == "UNVERIFIED"
    assert recorder.sent == [] and delivery.of_job(sessions, job_id) == []
    steps = [kind for kind in _kinds(sessions, job_id) if kind != "step-times"]  # where the attempt's time went
    assert steps[-2:] == ["results-written", "held-for-review"]
    assert not worker.run_one()  # a held job is not claimed
    worker.send_status_reports()  # nor does it get a status SR
    assert recorder.sent == [] and not (out / "status.dcm").exists()

    listed = _cli(config, "review", "list")
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert all(cell_len(line) <= 80 for line in lines), listed.output
    [row] = [line for line in lines if line.strip().startswith(str(job_id)) or f"│ {job_id} " in line]
    assert "lesions" in row and "demo-petct" in row
    as_json = json.loads(_cli(config, "review", "list", "--json").output)
    assert [r["id"] for r in as_json] == [job_id] and as_json[0]["study"] == job.study_uid

    shown = _cli(config, "review", "show", str(job_id))
    assert shown.exit_code == 0, shown.output
    assert "preview: " + str(out / "preview.png") in shown.output.replace("\n", "")
    assert "lesions, total MTV" in shown.output and "UNVERIFIED" in shown.output
    table_lines = [line for line in shown.output.splitlines() if "│" in line]
    assert table_lines and all(cell_len(line) <= 80 for line in table_lines), shown.output  # one line per row
    detail = json.loads(_cli(config, "review", "show", str(job_id), "--json").output)
    measures = json.loads((out / "measures.json").read_text())
    assert detail["measures"] == measures and detail["preview"] == str(out / "preview.png")
    assert {f["kind"]: f["sop_instance_uid"] for f in detail["files"]} == {
        "SEG": str(dcmread(out / "seg.dcm").SOPInstanceUID), "SR": str(dcmread(out / "sr.dcm").SOPInstanceUID)}


def test_release_verifies_the_sr_and_delivers_once_with_the_same_uids(held):
    config, sessions, worker, recorder, job_id = held
    out = result_dir(config, _job(sessions, job_id))
    built = {name: str(dcmread(out / name).SOPInstanceUID) for name in ("seg.dcm", "sr.dcm")}
    released = _cli(config, "review", "release", str(job_id), "--by", READER)
    assert released.exit_code == 0, released.output
    assert _job(sessions, job_id).state == JobState.QUEUED
    worker.models._models.clear()  # as a worker started after the restart: no model loaded (the module keeps it)
    assert worker.run_one()
    assert list(worker.models.loaded()) == []  # results written already: the release loads no model to send them
    job = _job(sessions, job_id)
    assert job.state == JobState.SUCCEEDED and job.reviewed_by == READER
    assert recorder.sent == [("pacs", "seg.dcm", built["seg.dcm"]), ("pacs", "sr.dcm", built["sr.dcm"])]
    sr = dcmread(out / "sr.dcm")
    assert str(sr.SOPInstanceUID) == built["sr.dcm"]
    assert (sr.VerificationFlag, sr.CompletionFlag, sr.PreliminaryFlag) == ("VERIFIED", "COMPLETE", "FINAL")
    (observer,) = sr.VerifyingObserverSequence
    assert str(observer.VerifyingObserverName) == READER and observer.VerifyingOrganization == "St Elsewhere Hospital"
    assert observer.VerificationDateTime.startswith(job.reviewed_at.strftime("%Y%m%d%H%M%S"))
    kinds = _kinds(sessions, job_id)
    assert kinds.count("inference-done") == 1 and kinds.count("held-for-review") == 1
    assert kinds.index("held-for-review") < kinds.index("review-released") < kinds.index("delivered")
    assert kinds[-1] == "succeeded"
    assert not worker.run_one()  # delivered once

    again = _cli(config, "review", "release", str(job_id), "--by", READER)
    assert again.exit_code == 1 and "not awaiting review: released by Curie^Marie" in again.output
    refused = _cli(config, "review", "reject", str(job_id), "--by", READER, "--reason", "too late")
    assert refused.exit_code == 1 and "not awaiting review" in refused.output
    shown = _cli(config, "jobs", "show", str(job_id), "--wide")
    assert "held-for-review" in shown.output and "review-released" in shown.output and READER in shown.output


def test_reject_sends_only_the_status_sr_with_the_reason_and_the_reader(held):
    config, sessions, worker, recorder, job_id = held
    rejected = _cli(config, "review", "reject", str(job_id), "--by", READER, "--reason", "lesion in the bladder")
    assert rejected.exit_code == 0, rejected.output
    job = _job(sessions, job_id)
    assert job.state == JobState.REJECTED and job.finished_at is not None
    assert job.error == f"results rejected at review by {READER}: lesion in the bladder"
    assert not worker.run_one()  # a rejected job never runs again
    worker.send_status_reports()
    out = result_dir(config, job)
    status = dcmread(out / "status.dcm")
    assert recorder.sent == [("pacs", "status.dcm", str(status.SOPInstanceUID))]
    texts = {i.ConceptNameCodeSequence[0].CodeValue: i.get("TextValue") for i in status.ContentSequence}
    assert texts["REASON"] == job.error
    assert [d.path.endswith("status.dcm") for d in delivery.of_job(sessions, job_id)] == [True]
    kinds = _kinds(sessions, job_id)
    assert kinds.index("held-for-review") < kinds.index("review-rejected") < kinds.index("status-written")
    again = _cli(config, "review", "release", str(job_id), "--by", READER)
    assert again.exit_code == 1 and f"rejected by {READER}" in again.output


def test_without_review_results_are_sent_at_once_unverified(tmp_path: Path, synth_study, monkeypatch, model_cache):
    config, sessions, worker, recorder, job_id = _node(tmp_path, synth_study, monkeypatch, model_cache, review=False)
    assert worker.run_one()
    assert _job(sessions, job_id).state == JobState.SUCCEEDED
    assert [name for _, name, _ in recorder.sent] == ["seg.dcm", "sr.dcm"]
    out = result_dir(config, _job(sessions, job_id))
    assert dcmread(out / "sr.dcm").VerificationFlag == "UNVERIFIED" and not (out / "preview.png").exists()
    assert "held-for-review" not in _kinds(sessions, job_id)
    # the site's facts are in the objects all the same (README: AI Results content)
    seg = dcmread(out / "seg.dcm", stop_before_pixels=True)
    assert seg.ImageComments == "Not for diagnostic use without review"
    assert seg.ContributingEquipmentSequence[0].InstitutionName == "St Elsewhere Hospital"
    parameters = str(seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters)
    assert "weights=sha256:" in parameters and "mirroring=" in parameters and "tile_step_size=0.5" in parameters


def test_decisions_on_jobs_not_awaiting_review_are_refused(tmp_path: Path, synth_study):
    config = node_config(tmp_path, model_path=str(MODEL))
    sessions = make_sessionmaker(config.database_url)
    job_id = enqueue(sessions, synth_study.study_instance_uid, "demo-petct", RetryPolicy())
    with pytest.raises(RefusedError, match=f"job {job_id} is not awaiting review \\(it is queued\\)"):
        release(sessions, job_id, READER)
    with pytest.raises(RefusedError, match=f"job {job_id} is not awaiting review \\(it is queued\\)"):
        reject(sessions, job_id, READER, "no")
    with pytest.raises(RefusedError, match="no job 999"):
        release(sessions, 999, READER)
    with sessions.begin() as session:
        session.get(Job, job_id).state = JobState.AWAITING_REVIEW
    with pytest.raises(RefusedError, match="--reason needs a text"):
        reject(sessions, job_id, READER, "   ")
    for bad in ("", " ", "a\\b", "x" * 65, "a\nb"):
        with pytest.raises(RefusedError):
            check_reader(bad)
    assert _job(sessions, job_id).state == JobState.AWAITING_REVIEW  # refused: nothing changed
    release(sessions, job_id, READER)
    with pytest.raises(RefusedError, match="released by Curie\\^Marie"):  # a second reader comes too late
        reject(sessions, job_id, "Roentgen^Wilhelm", "no")
    result = _cli(config, "review", "release", "999", "--by", READER)
    assert result.exit_code == 1 and "no job 999" in result.output


def test_a_held_job_can_be_cancelled_and_then_not_decided(tmp_path: Path, synth_study):
    config = node_config(tmp_path, model_path=str(MODEL))
    sessions = make_sessionmaker(config.database_url)
    job_id = enqueue(sessions, synth_study.study_instance_uid, "demo-petct", RetryPolicy())
    with sessions.begin() as session:
        session.get(Job, job_id).state = JobState.AWAITING_REVIEW
    result = _cli(config, "jobs", "cancel", str(job_id))
    assert result.exit_code == 0, result.output
    assert _job(sessions, job_id).state == JobState.CANCELLED
    with pytest.raises(RefusedError, match="not awaiting review \\(it is cancelled\\)"):
        release(sessions, job_id, READER)
