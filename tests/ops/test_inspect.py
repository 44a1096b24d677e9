"""`dicomnode inspect`: verdicts, SUV attributes and exported input volumes for a folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.synth import petct_phantom as ph
from dicomnode.synth.petct import suv_to_bqml_factor

from tests.support.nodeutil import write_config
from tests.support.selectionutil import distractor_study

runner = CliRunner()


@pytest.fixture(scope="module")
def scanner_study(tmp_path_factory):
    return distractor_study(tmp_path_factory.mktemp("inspect"))


def _inspect(*args):
    result = runner.invoke(app, ["inspect", *map(str, args)])
    return result


def test_json_report_has_verdicts_and_suv_attributes(scanner_study):
    result = _inspect(scanner_study.root, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["channels"] == ["CT", "PET"]
    assert any("truth/lesions.nii.gz" in w for w in report["warnings"])  # the generator's truth is not DICOM
    [study] = report["studies"]
    assert study["study_uid"] == scanner_study.study.study_instance_uid
    assert study["ready"] and study["node_would"] == "queue a job"
    uids = scanner_study.uids
    assert study["chosen"] == {"PET": uids["pet"], "CT": uids["ct"]}
    verdicts = {s["series_uid"]: s for s in study["series"]}
    assert verdicts[uids["pet"]]["verdict"] == "used for channel PET"
    assert verdicts[uids["ct"]]["verdict"] == "used for channel CT"
    for name in ("nac", "mip", "localizer", "ct_thick"):
        assert verdicts[uids[name]]["state"] == "ignored" and verdicts[uids[name]]["verdict"].startswith(
            "ignored because "
        )
    assert "lacks ATTN" in verdicts[uids["nac"]]["verdict"]
    attributes = study["suv"]["attributes"]
    assert attributes["Units"] == "BQML"
    assert attributes["PatientWeight"] == "75 kg"
    assert attributes["DecayCorrection"] == "START"
    assert attributes["InjectionDateTime"] == "2024-03-15T08:10:00"
    assert study["suv"]["factor"] == pytest.approx(1.0 / suv_to_bqml_factor(), rel=1e-6)


def test_table_output_and_config_spec(scanner_study, tmp_path: Path):
    result = _inspect(scanner_study.root)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "used for channel PET" in text and "used for channel CT" in text and "would queue a job" in text
    assert "lacks ATTN" in text and "SUVbw factor" in text and "PatientWeight" in text
    # A model that only takes the PET: every CT is ignored.
    config = write_config(tmp_path, extra='channels = ["PET"]\nrequired_modalities = ["PT"]')
    report = json.loads(_inspect(scanner_study.root, "--json", "--config", config).output)
    verdicts = {s["series_uid"]: s["verdict"] for s in report["studies"][0]["series"]}
    assert "is not an input of the model" in verdicts[scanner_study.uids["ct"]]


def test_export_writes_the_model_inputs_on_the_pet_grid(scanner_study, tmp_path: Path):
    out = tmp_path / "out"
    result = _inspect(scanner_study.root, "--export", out)
    assert result.exit_code == 0, result.output
    pet = sitk.ReadImage(str(out / "pet_suv.nii.gz"))
    ct = sitk.ReadImage(str(out / "ct_hu.nii.gz"))
    grid = ph.PET_GRID
    for image in (pet, ct):
        assert image.GetSize() == tuple(reversed(grid.shape))
        np.testing.assert_allclose(image.GetSpacing(), tuple(reversed(grid.spacing)), rtol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), grid.origin, atol=1e-3)
        np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-9)
    truth = ph.pet_suv(scanner_study.study.phantom, grid)
    suv = sitk.GetArrayFromImage(pet)
    # Within 1 % (plus the int16 quantisation of the stored values near zero).
    np.testing.assert_allclose(suv, truth, rtol=0.01, atol=1e-4 * truth.max())
    hu = sitk.GetArrayFromImage(ct)
    body = ph.ct_hu(scanner_study.study.phantom, grid, noise_hu=0.0)
    assert np.median(np.abs(hu - body)) < 20.0  # the CT (2 mm in-plane) interpolated onto the 4 mm PET grid


def test_pet_only_folder_exports_only_the_pet(scanner_study, tmp_path: Path):
    folder = tmp_path / "pet-only"
    shutil.copytree(scanner_study.study.pt_dir, folder)
    out = tmp_path / "out"
    result = _inspect(folder, "--json", "--export", out)
    assert result.exit_code == 1  # the default model needs a CT: the node would hold the study back
    report = json.loads(result.output)
    [study] = report["studies"]
    assert study["missing"] == ["no CT series in the study"]
    assert list(study["exported"]) == ["PET"]
    assert sorted(p.name for p in out.iterdir()) == ["pet_suv.nii.gz"]


def test_pet_missing_slices_is_reported_as_waiting(scanner_study, tmp_path: Path):
    folder = tmp_path / "partial"
    shutil.copytree(scanner_study.study.ct_dir, folder / "CT")
    (folder / "PT").mkdir()
    for path in scanner_study.files["pet"][:40]:
        shutil.copy(path, folder / "PT" / path.name)
    result = _inspect(folder, "--json")
    assert result.exit_code == 1
    [study] = json.loads(result.output)["studies"]
    [pet] = [s for s in study["series"] if s["modality"] == "PT"]
    assert pet["state"] == "waiting" and "40 of 64 instances" in pet["verdict"]
    assert study["node_would"] == "hold the study back"


# --- inspect and the worker share the code that chooses series and computes the SUV factor ------


def test_inspect_and_the_worker_choose_the_same_series_on_a_grid_that_is_not_the_first_channel(tmp_path: Path):
    """The glioma stand-in's grid is T1CE, not its first channel FLAIR. A second FLAIR, acquired
    later but in another frame of reference, is the latest FLAIR; only on the T1CE grid is it
    refused (the named channels must share the grid's frame of reference). The worker's path
    (the index, a queued job) and inspect (the folder) must choose the same four series."""
    from pydicom.uid import generate_uid

    from dicomnode.config import load_config
    from dicomnode.ops.inspect import inspect_path
    from dicomnode.pipeline.inputs import select_series
    from dicomnode.pipeline.queue import RetryPolicy, enqueue
    from dicomnode.store.engine import make_sessionmaker
    from dicomnode.store.tables import Job
    from dicomnode.synth.registry import write_registry_study

    from tests.support.selectionutil import copy_series, index_files
    from tests.test_config import MR_MODEL

    study = write_registry_study(tmp_path / "glioma", "glioma", seed=1001)
    flair = study.channel_series["FLAIR"]
    other_frame = generate_uid()

    def elsewhere_and_later(_k, ds):  # noqa: ANN001, ANN202
        ds.FrameOfReferenceUID = other_frame
        ds.SeriesTime = "235959"

    copy_series(study.files[flair], study.root / "FLAIR2", elsewhere_and_later, series_number=99,
                description=f"{flair} repeat")
    config = load_config(write_config(tmp_path, extra=MR_MODEL.replace('label_codes = "codes.json"\n', "")))
    settings = config.models[0]
    assert settings.grid == "T1CE" and settings.channels[0] == "FLAIR"

    [report] = inspect_path(study.root, settings).studies
    sessions = make_sessionmaker(config.database_url)
    index_files(sessions, sorted(p for p in study.root.rglob("*.dcm")))
    job_id = enqueue(sessions, study.study_instance_uid, settings.name, RetryPolicy(), "test")
    with sessions() as session:
        job = session.get(Job, job_id)
    worker = select_series(sessions, job, settings)

    chosen_by_inspect = {c: s.series_uid for c, s in report.selection.chosen.items()}
    chosen_by_worker = {c: s.series_uid for c, s in worker.chosen.items()}
    assert worker.ready and report.ready, (worker.problem, report.selection.problem)
    assert chosen_by_inspect == chosen_by_worker
    assert chosen_by_worker["FLAIR"] == study.series[flair]  # the repeat is in another frame of reference


def test_inspect_shows_the_suv_factor_the_worker_applies_when_acquisition_time_is_odd(tmp_path: Path, synth_study):
    """PET slices whose AcquisitionDateTime is the scan start but whose AcquisitionTime is not, a
    series post-processed after the scan (SeriesTime later) and no FrameReferenceTime: the scan
    start is the earliest acquisition, taken from AcquisitionDateTime. The factor inspect reports
    must be the one the worker's input volumes carry."""
    import pydicom

    from dicomnode.imaging.volumes import load_series
    from dicomnode.ops.inspect import suv_summary
    from dicomnode.pipeline.inputs import assemble_inputs

    folder = tmp_path / "study"
    shutil.copytree(synth_study.ct_dir, folder / "CT")
    shutil.copytree(synth_study.pt_dir, folder / "PT")
    pet_files = sorted((folder / "PT").glob("*.dcm"))
    for path in pet_files:
        ds = pydicom.dcmread(path)
        start = f"{ds.AcquisitionDate}{ds.AcquisitionTime}"
        ds.AcquisitionDateTime = start
        ds.AcquisitionTime = f"{int(str(ds.AcquisitionTime)[:2]):02d}2000"  # odd: 20 minutes past the hour
        ds.SeriesTime = f"{int(str(ds.SeriesTime)[:2]):02d}2500"  # post-processed 25 minutes past the hour
        del ds.FrameReferenceTime
        ds.save_as(path, enforce_file_format=True)

    summary, problem = suv_summary(pet_files)
    assert problem is None
    assert summary["attributes"]["DecayReferenceFrom"] == "earliest AcquisitionDate/Time (series after acquisition)"
    inputs = assemble_inputs({"CT": sorted((folder / "CT").glob("*.dcm")), "PET": pet_files}, ["CT", "PET"], "PET")
    stored = load_series(pet_files)
    hot = np.unravel_index(np.argmax(stored.array), stored.array.shape)
    assert inputs.suv[hot] == pytest.approx(stored.array[hot] * summary["factor"], rel=1e-5)
