"""The model's grid (config `grid`): both channels on the PET grid (default, as GLOW-FDG and
autoPET were trained) or on the CT grid (the PET SUV resampled onto it); the SEG and SR then
reference the series that gave the grid. A stand-in model replaces nnU-Net here."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from sqlalchemy import select
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import ConfigError, ModelSettings, load_config
from dicomnode.imaging.suv import pet_suv_volume
from dicomnode.imaging.volumes import load_series
from dicomnode.pipeline import assembler
from dicomnode.pipeline.inputs import assemble_inputs
from dicomnode.pipeline.job import make_results
from dicomnode.results.seg import build_seg
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Event, Job, utcnow
from dicomnode.synth import petct_phantom as ph

from tests.support.dicomtools import dciodvfy_errors
from tests.support.nodeutil import node_config, write_config
from tests.support.selectionutil import copy_series, index_files


class StandIn:
    """A model that answers the phantom's lesion labels on the grid it is given."""

    channel_names = ["CT", "PET"]
    device = "cpu"
    labels = {"background": 0, "lesion": 1}  # dataset.json's labels, as inference.SegmentationModel has them

    def __init__(self, phantom: ph.Phantom, grid: ph.Grid):
        self.answer = ph.lesion_masks(phantom, grid)
        self.seen: list[tuple] = []

    def predict(self, channels: np.ndarray, spacing) -> np.ndarray:  # noqa: ANN001
        self.seen.append((channels.shape, tuple(spacing)))
        assert channels.shape[1:] == self.answer.shape
        return self.answer


def _paths(study):
    return {"PET": study.pt_files, "CT": study.ct_files}


def test_pet_grid_is_the_default(synth_study):
    inputs = assemble_inputs(_paths(synth_study), ["CT", "PET"])
    assert inputs.grid_name == "PET" and inputs.channels.shape == (2, *ph.PET_GRID.shape)
    assert inputs.spacing == pytest.approx(ph.PET_GRID.spacing)
    assert inputs.grid.series_instance_uid == synth_study.pt_series_instance_uid
    assert inputs.grid.datasets[0].Modality == "PT" and len(inputs.grid.datasets) == ph.PET_GRID.shape[0]
    np.testing.assert_array_equal(inputs.suv, inputs.channels[1])


def _lesion_means(suv: np.ndarray, phantom: ph.Phantom, grid: ph.Grid, margin_mm: float) -> np.ndarray:
    """Mean SUV within each lesion's sphere grown by `margin_mm`."""
    z, y, x = grid.axes_mm()
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    means = []
    for les in phantom.lesions:
        cx, cy, cz = les.centre_mm
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2 <= (les.radius_mm + margin_mm) ** 2
        means.append(suv[inside].mean())
    return np.array(means)


def test_ct_grid_carries_the_suv_resampled_onto_the_ct(synth_study):
    inputs = assemble_inputs(_paths(synth_study), ["CT", "PET"], grid="CT")
    assert inputs.grid_name == "CT" and inputs.channels.shape == (2, *ph.CT_GRID.shape)
    assert inputs.spacing == pytest.approx(ph.CT_GRID.spacing)
    assert inputs.grid.series_instance_uid == synth_study.ct_series_instance_uid
    assert len(inputs.grid.datasets) == ph.CT_GRID.shape[0] and inputs.grid.datasets[0].Modality == "CT"
    np.testing.assert_array_equal(inputs.suv, inputs.channels[1])
    hu = ph.ct_hu(synth_study.phantom, ph.CT_GRID)
    np.testing.assert_array_equal(inputs.channels[0], hu)  # the CT as it is, not resampled
    truth = ph.pet_suv(synth_study.phantom, ph.CT_GRID)
    # The generator rasterises each lesion on the grid it writes before blurring, so the PET's
    # 4 mm voxels hold a coarser sphere than the CT grid's 2 mm ones: compare the mean over the
    # lesion and its spill-out (radius + 9 mm, 1.5 FWHM), where both hold the same activity.
    phantom = synth_study.phantom
    np.testing.assert_allclose(_lesion_means(inputs.suv, phantom, ph.CT_GRID, 9.0),
                               _lesion_means(truth, phantom, ph.CT_GRID, 9.0), rtol=0.05)
    labels = ph.lesion_masks(phantom, ph.CT_GRID)
    body = ph.ct_hu(synth_study.phantom, ph.CT_GRID, noise_hu=0.0) > -500
    assert abs(np.median(inputs.suv[body & (labels == 0)]) - np.median(truth[body & (labels == 0)])) < 0.05
    assert inputs.pet_header.Modality == "PT"


def test_suv_outside_the_pet_field_of_view_is_zero(synth_study, tmp_path: Path):
    """A CT longer than the PET: its slices beyond the PET get SUV 0, not the nearest value."""
    def extend(k, ds):
        ds.ImagePositionPatient[2] = f"{float(ds.ImagePositionPatient[2]) - 30.0:.4f}"

    # The CT shifted 30 mm down (10 slices): its lowest slices lie below the PET's field of view.
    _, ct = copy_series(synth_study.ct_files, tmp_path / "CT", extend, series_number=2, description="CT")
    inputs = assemble_inputs({"PET": synth_study.pt_files, "CT": ct}, ["CT", "PET"], grid="CT")
    below = inputs.suv[:9]  # z below the PET's first slice centre - half a slice
    assert below.max() == 0.0
    assert inputs.suv[20:].max() > 1.0


def test_seg_from_a_label_map_on_the_ct_grid_references_the_ct(synth_study, tmp_path: Path):
    inputs = assemble_inputs(_paths(synth_study), ["CT", "PET"], grid="CT")
    labels = ph.lesion_masks(synth_study.phantom, ph.CT_GRID)
    seg = build_seg(labels, inputs.grid.datasets, model_name="m", model_version="1", folds=[0],
                    series_number=901, series_description="lesions")
    [referenced] = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == synth_study.ct_series_instance_uid
    assert (seg.Rows, seg.Columns) == ph.CT_GRID.shape[1:]
    assert seg.FrameOfReferenceUID == synth_study.frame_of_reference_uid


def test_grid_setting_in_config(tmp_path: Path):
    assert ModelSettings(name="m", path=Path(".")).grid == "PET"
    assert load_config(write_config(tmp_path, extra='grid = "CT"')).models[0].grid == "CT"
    with pytest.raises(ConfigError, match=r"models\[0\]\.grid"):
        load_config(write_config(tmp_path, extra='grid = "MR"'))
    with pytest.raises(ConfigError, match='grid = "CT" needs a CT channel'):
        load_config(write_config(tmp_path, extra='grid = "CT"\nchannels = ["PET"]\nrequired_modalities = ["PT"]'))


def test_inspect_export_writes_the_model_grid(synth_study, tmp_path: Path):
    config = write_config(tmp_path, extra='grid = "CT"')
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["inspect", str(synth_study.root), "--json", "--export", str(out), "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["grid"] == "CT"
    for name in ("pet_suv.nii.gz", "ct_hu.nii.gz"):
        image = sitk.ReadImage(str(out / name))
        assert image.GetSize() == tuple(reversed(ph.CT_GRID.shape))
        np.testing.assert_allclose(image.GetSpacing(), tuple(reversed(ph.CT_GRID.spacing)), rtol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), ph.CT_GRID.origin, atol=1e-3)


@pytest.mark.e2e
@pytest.mark.parametrize("grid", ["PET", "CT"])
def test_job_results_reference_the_grid_series(grid, synth_study, tmp_path: Path):
    config = node_config(tmp_path, node="study_quiet_seconds = 0", extra=f'grid = "{grid}"\nversion = "test-1"')
    sessions = make_sessionmaker(config.database_url)
    index_files(sessions, synth_study.ct_files + synth_study.pt_files)
    [job_id] = assembler.queue_ready_studies(sessions, config)
    with sessions() as session:
        job = session.get(Job, job_id)
    target = ph.PET_GRID if grid == "PET" else ph.CT_GRID
    model = StandIn(synth_study.phantom, target)
    out = make_results(config, sessions, job, model)
    assert model.seen == [((2, *target.shape), pytest.approx(target.spacing))]

    source_uid = synth_study.pt_series_instance_uid if grid == "PET" else synth_study.ct_series_instance_uid
    seg = pydicom.dcmread(out / "seg.dcm")
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [source_uid]
    assert (int(seg.NumberOfFrames), seg.Rows, seg.Columns) == target.shape
    assert dciodvfy_errors(out / "seg.dcm") == []
    sr = pydicom.dcmread(out / "sr.dcm")
    evidence = {
        s.SeriesInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
    }
    assert source_uid in evidence and seg.SeriesInstanceUID in evidence
    assert "443271005" in str(sr)  # FDG PET/CT: the radiopharmaceutical comes from the PET headers
    assert dciodvfy_errors(out / "sr.dcm") == []

    measures = json.loads((out / "measures.json").read_text())
    assert measures["lesion_count"] == len(synth_study.phantom.lesions)
    truth = ph.pet_suv(synth_study.phantom, target)
    labels = ph.lesion_masks(synth_study.phantom, target)
    truth_max = max(truth[labels == k].max() for k in range(1, labels.max() + 1))
    assert max(les["suv_max"] for les in measures["lesions"]) == pytest.approx(truth_max, rel=0.15)
    with sessions() as session:
        built = session.scalar(select(Event.message).where(Event.job_id == job_id, Event.kind == "inputs-built"))
    assert f"on the {grid} grid {'x'.join(map(str, target.shape))}" in built


def test_late_series_makes_a_new_run_with_a_new_result_series(synth_study, tmp_path: Path):
    """A series arriving after the first job's results: run 2 with SEG series 911 / SR 912; run 1's files stay."""
    config = node_config(tmp_path, node="study_quiet_seconds = 0", extra='version = "test-1"')
    sessions = make_sessionmaker(config.database_url)
    index_files(sessions, synth_study.ct_files + synth_study.pt_files)
    [first_id] = assembler.queue_ready_studies(sessions, config)
    model = StandIn(synth_study.phantom, ph.PET_GRID)
    with sessions() as session:
        first = session.get(Job, first_id)
    first_out = make_results(config, sessions, first, model)
    with sessions.begin() as session:
        session.get(Job, first_id).state = "succeeded"
    first_seg = pydicom.dcmread(first_out / "seg.dcm")
    assert first_seg.SeriesNumber == 901 and pydicom.dcmread(first_out / "sr.dcm").SeriesNumber == 902

    def later(_k, ds):
        ds.SliceThickness = ds.SpacingBetweenSlices = "3"

    _, late = copy_series(synth_study.ct_files, tmp_path / "late", later, series_number=7, description="CT late recon")
    index_files(sessions, late, at=utcnow())
    [second_id] = assembler.queue_ready_studies(sessions, config, now=utcnow())
    with sessions() as session:
        second = session.get(Job, second_id)
        assert second.run_number == 2
    second_out = make_results(config, sessions, second, model)
    assert second_out != first_out
    seg = pydicom.dcmread(second_out / "seg.dcm")
    sr = pydicom.dcmread(second_out / "sr.dcm")
    assert seg.SeriesNumber == 911 and sr.SeriesNumber == 912
    assert seg.SeriesInstanceUID != first_seg.SeriesInstanceUID
    assert pydicom.dcmread(first_out / "seg.dcm").SOPInstanceUID == first_seg.SOPInstanceUID


@pytest.mark.parametrize("grid", ["PET", "CT"])
def test_channels_equal_the_volumes_stacked(synth_study, grid):
    """assemble_inputs reads the grid's series into its channel and resamples the other into its
    own: the channels are bit for bit those stacked from each volume as it did before (commit
    29f7468), and the SUV and the grid's array are those channels' voxels."""
    ct = load_series(synth_study.ct_files)
    pet = load_series(synth_study.pt_files)
    pet = replace(pet, array=pet_suv_volume(pet).astype(np.float32, copy=False))
    reference, other, default = (pet, ct, -1024.0) if grid == "PET" else (ct, pet, 0.0)
    resampled = sitk.GetArrayFromImage(sitk.Resample(other.to_sitk(), reference.to_sitk(), sitk.Transform(),
                                                     sitk.sitkLinear, default, sitk.sitkFloat32))
    expected = np.stack([resampled, pet.array] if grid == "PET" else [ct.array, resampled])  # CT, PET
    inputs = assemble_inputs(_paths(synth_study), ["CT", "PET"], grid=grid)
    assert inputs.channels.dtype == np.float32 and inputs.channels.flags.c_contiguous
    np.testing.assert_array_equal(inputs.channels, expected)
    np.testing.assert_array_equal(inputs.suv, expected[1])
    np.testing.assert_array_equal(inputs.grid.array, expected[0 if grid == "CT" else 1])
