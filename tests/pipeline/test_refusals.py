"""Every refusal names its reason in both places a user looks: the failed job (the JobError
text the worker records and `dicomnode jobs show` prints) and `dicomnode inspect`.

Each case is the synthetic study with one pydicom edit. The worker runs with the real demo
model, loaded once for the module; every refusal here happens before inference."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.pipeline import assembler
from dicomnode.pipeline.queue import RetryPolicy, enqueue
from dicomnode.pipeline.worker import Worker
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Event, Job

from tests.support.nodeutil import REPO, node_config
from tests.support.selectionutil import index_files

TILT = math.radians(10.0)
OBLIQUE = [1, 0, 0, 0, f"{math.cos(TILT):.6f}", f"{-math.sin(TILT):.6f}"]


def _pet(edit):
    return ("PT", edit)


def _ct(edit):
    return ("CT", edit)


def _drug(**values):
    def edit(ds):
        drug = ds.RadiopharmaceuticalInformationSequence[0]
        for keyword, value in values.items():
            if value is None:
                delattr(drug, keyword)
            else:
                setattr(drug, keyword, value)
    return edit


def _set(**values):
    def edit(ds):
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    return edit


CT_FRAME = generate_uid()

# name -> (edits, files to drop (series, indices), what the job error and inspect must both say)
CASES = {
    "no-patient-weight": ([_pet(_set(PatientWeight=None))], None, "PatientWeight: missing or empty"),
    "no-dose": ([_pet(_drug(RadionuclideTotalDose=None))], None, "RadionuclideTotalDose: missing or empty"),
    "units-not-convertible": ([_pet(_set(Units="CPS"))], None, "Units: CPS is not convertible to SUVbw"),
    "decay-time-negative": (
        [_pet(_drug(RadiopharmaceuticalStartDateTime="20240315093000"))],
        None,
        "RadiopharmaceuticalStartDateTime: decay time -0.33 h is negative: the injection is after",
    ),
    "decay-time-over-24h": (
        [_pet(_drug(RadiopharmaceuticalStartDateTime="20240313091000"))],
        None,
        "RadiopharmaceuticalStartDateTime: decay time +48.00 h is longer than 24 h",
    ),
    "missing-pet-slices": ([], ("PT", range(30, 34)), "has 60 of 64 instances (NumberOfSlices): still arriving"),
    "ct-not-covering-pet": (
        [],
        ("CT", range(0, 6)),
        "z range -76.5 to 94.5 mm does not cover the PET's -94.5 to 94.5 mm",
    ),
    "ct-other-frame-of-reference": (
        [_ct(_set(FrameOfReferenceUID=CT_FRAME))],
        None,
        f"FrameOfReferenceUID {CT_FRAME} is not the PET's",
    ),
    "oblique-ct": (
        [_ct(_set(ImageOrientationPatient=OBLIQUE))],
        None,
        'CT #2 "CT synthetic", 64 instances: not axial (ImageOrientationPatient 1\\0\\0\\0\\0.984808\\-0.173648)',
    ),
    "oblique-pet": (
        [_pet(_set(ImageOrientationPatient=OBLIQUE))],
        None,
        'PT #3 "PET AC synthetic", 64 instances: not axial (ImageOrientationPatient 1\\0\\0\\0\\0.984808\\-0.173648)',
    ),
}
SUV_CASES = {"no-patient-weight", "no-dose", "units-not-convertible", "decay-time-negative", "decay-time-over-24h"}


MODEL = REPO / "models" / "demo-petct"


@pytest.fixture(scope="module")
def demo_model():
    from inference import SegmentationModel

    return SegmentationModel(MODEL, folds=(0, 1, 2, 3, 4), device="cpu", use_mirroring=False)


def _build(synth_study, folder: Path, case: str) -> Path:
    edits, drop, _ = CASES[case]
    for series, source in (("CT", synth_study.ct_dir), ("PT", synth_study.pt_dir)):
        shutil.copytree(source, folder / series)
    if drop is not None:
        series, indices = drop
        files = sorted((folder / series).glob("*.dcm"))
        for k in indices:
            files[k].unlink()
    for series, edit in edits:
        for path in sorted((folder / series).glob("*.dcm")):
            ds = pydicom.dcmread(path)
            edit(ds)
            ds.save_as(path, enforce_file_format=True)
    return folder


@pytest.mark.parametrize("case", list(CASES))
def test_refusal_names_its_reason_in_the_job_and_in_inspect(case, synth_study, demo_model, tmp_path: Path):
    expected = CASES[case][2]
    folder = _build(synth_study, tmp_path / "study", case)

    # dicomnode inspect: the JSON report and the text output.
    result = CliRunner().invoke(app, ["inspect", str(folder), "--json"])
    [study] = json.loads(result.output)["studies"]
    said = study["warnings"] + [s["verdict"] for s in study["series"]]
    assert any(expected in line for line in said), said
    assert result.exit_code == (0 if case in SUV_CASES else 1)  # SUV refusals: the node would queue, the job fails
    text = CliRunner().invoke(app, ["inspect", str(folder)])
    assert expected in " ".join(text.output.split()), text.output

    # The node: index the files as received; the assembler queues a job when the series fit
    # (SUV refusals) and otherwise holds the study back saying why; a job queued anyway (an
    # operator's retry, a job from an earlier version) fails in the worker with the reason.
    config = node_config(
        tmp_path,
        model_path=str(MODEL),
        node="study_quiet_seconds = 0\nretry_backoff_seconds = 0",
        extra='version = "test"',
    )
    sessions = make_sessionmaker(config.database_url)
    index_files(sessions, sorted(folder.rglob("*.dcm")))
    created = assembler.queue_ready_studies(sessions, config)
    if case in SUV_CASES:
        [job_id] = created
    else:
        assert created == []
        with sessions() as session:
            [incomplete] = session.scalars(select(Event.message).where(Event.kind == "incomplete"))
        assert expected in incomplete
        job_id = enqueue(sessions, synth_study.study_instance_uid, "demo-petct", RetryPolicy(3, 0), "queued by hand")
    worker = Worker(config, sessions)
    worker.models._models["demo-petct"] = demo_model
    assert worker.run_one()
    with sessions() as session:
        job = session.get(Job, job_id)
    assert expected in job.error
    # Waiting for slices may help later (retried); every other refusal fails at once.
    assert job.state == ("queued" if case == "missing-pet-slices" else "failed")
    shown = CliRunner().invoke(app, ["jobs", "show", str(job_id), "--config", str(config.source)])
    assert shown.exit_code == 0, shown.output
    assert expected in " ".join(shown.output.split())


def test_values_that_rescale_to_infinity_fail_the_job_once_naming_the_series(synth_study, demo_model, tmp_path: Path):
    """A RescaleSlope that is a finite number (so the receiver takes it) but makes the stored values
    infinite is an input problem: the job fails at volume building, naming the series and the
    attribute, with no retries and no model run."""
    folder = tmp_path / "study"
    for series, source in (("CT", synth_study.ct_dir), ("PT", synth_study.pt_dir)):
        shutil.copytree(source, folder / series)
    hot = sorted((folder / "PT").glob("*.dcm"))[30]
    ds = pydicom.dcmread(hot)
    ds.RescaleSlope = "1e308"
    ds.save_as(hot, enforce_file_format=True)
    config = node_config(
        tmp_path,
        model_path=str(MODEL),
        node="study_quiet_seconds = 0\nretry_backoff_seconds = 0",
        extra='version = "test"',
    )
    sessions = make_sessionmaker(config.database_url)
    index_files(sessions, sorted(folder.rglob("*.dcm")))
    [job_id] = assembler.queue_ready_studies(sessions, config)
    worker = Worker(config, sessions)
    worker.models._models["demo-petct"] = demo_model
    assert worker.run_one()
    with sessions() as session:
        job = session.get(Job, job_id)
        kinds = list(session.scalars(select(Event.kind).where(Event.job_id == job_id)))
    assert job.state == "failed" and job.attempts == 1
    assert "cannot build input volumes" in job.error and "RescaleSlope 1e+308" in job.error
    assert synth_study.pt_series_instance_uid in job.error and ds.SOPInstanceUID in job.error
    assert "inference-done" not in kinds and "retry-scheduled" not in kinds
