"""Channel volumes for any channel set: four MR series on three grids resampled onto the grid
channel's series, and a CT-only model on its CT."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.pipeline.errors import JobError
from dicomnode.pipeline.inputs import assemble_inputs
from dicomnode.synth.registry import write_registry_study

MR_CHANNELS = ["FLAIR", "T1", "T1CE", "T2"]


@pytest.fixture(scope="module")
def glioma(tmp_path_factory):
    return write_registry_study(tmp_path_factory.mktemp("glioma"), "glioma", seed=1001)


@pytest.fixture(scope="module")
def mr_inputs(glioma):
    paths = {c: glioma.files[glioma.channel_series[c]] for c in MR_CHANNELS}
    return assemble_inputs(paths, MR_CHANNELS, grid="T1CE")


def test_grid_series_gives_the_grid(glioma, mr_inputs):
    case = glioma.case
    assert mr_inputs.channels.shape == (4, *case.grid.shape) and mr_inputs.channels.dtype == np.float32
    assert mr_inputs.spacing == pytest.approx(case.grid.spacing)
    assert mr_inputs.grid_name == "T1CE" and mr_inputs.suv is None and mr_inputs.pet_header is None
    assert mr_inputs.grid.series_instance_uid == glioma.series["t1_mprage_tra_post_gd"]
    z = [float(ds.ImagePositionPatient[2]) for ds in mr_inputs.grid.datasets]  # the SEG's source, slice for slice
    assert z == pytest.approx(list(case.grid.axes_mm()[0]), abs=1e-3)


def test_series_on_the_grid_are_as_stored(glioma, mr_inputs):
    """FLAIR and T1CE were written on the case's grid: their values are the stored integers."""
    for c in ("FLAIR", "T1CE"):
        expected = np.round(glioma.case.channels[c]).clip(0, 4095)
        np.testing.assert_array_equal(mr_inputs.channels[MR_CHANNELS.index(c)], expected)


@pytest.mark.parametrize("channel", ["T1", "T2"])
def test_other_grids_are_resampled_onto_the_grid(glioma, mr_inputs, channel):
    """T1 (2 mm in-plane, 80x80) and T2 (4 mm slices) come back onto the 2.5 mm / 3 mm grid: inside
    each tumour region (away from its border, where linear interpolation mixes tissues) the
    signal is the phantom's within 3 %, and the regions keep their contrast."""
    case, array = glioma.case, mr_inputs.channels[MR_CHANNELS.index(channel)]
    assert np.corrcoef(array.ravel(), case.channels[channel].ravel())[0, 1] > 0.97  # in place, voxel for voxel
    means = {}
    for value, name in case.label_names.items():
        core = ndimage.binary_erosion(case.labels == value)
        assert core.sum() > 20, name
        means[name] = array[core].mean()
        assert means[name] == pytest.approx(case.channels[channel][core].mean(), rel=0.03), name
    if channel == "T2":  # necrosis is the brightest in T2 (phantoms.MR_SIGNAL)
        assert means["necrosis"] > 1.2 * max(means["oedema"], means["enhancing_tumour"])


def test_ct_only_model(tmp_path):
    study = write_registry_study(tmp_path, "lymph", seed=1000)
    inputs = assemble_inputs({"CT": study.files["Abdomen 2.0 Br40 venous"]}, ["CT"], grid="CT")
    assert inputs.grid_name == "CT" and inputs.suv is None
    np.testing.assert_array_equal(inputs.channels[0], study.case.channels["CT"])  # HU, as written


def test_missing_channel_is_named(glioma):
    with pytest.raises(JobError, match="no series for channel T2"):
        assemble_inputs({c: glioma.files[glioma.channel_series[c]] for c in ("FLAIR", "T1", "T1CE")},
                        MR_CHANNELS, grid="T1CE")
