"""The synthetic study generator writes valid CT and PET series that reproduce the phantom."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicomnode.imaging.suv import pet_suv_volume
from dicomnode.imaging.volumes import load_series
from dicomnode.synth import petct_phantom as ph
from dicomnode.synth.petct import write_study

from tests.support.dicomtools import dciodvfy_errors


def test_files_and_uids(synth_study):
    assert len(synth_study.ct_files) == ph.CT_GRID.shape[0]
    assert len(synth_study.pt_files) == ph.PET_GRID.shape[0]
    headers = [
        pydicom.dcmread(p, stop_before_pixels=True)
        for p in synth_study.ct_files + synth_study.pt_files
    ]
    assert {h.StudyInstanceUID for h in headers} == {synth_study.study_instance_uid}
    assert {h.FrameOfReferenceUID for h in headers} == {synth_study.frame_of_reference_uid}
    assert {h.SeriesInstanceUID for h in headers} == {
        synth_study.ct_series_instance_uid,
        synth_study.pt_series_instance_uid,
    }
    assert len({h.SOPInstanceUID for h in headers}) == len(headers)
    assert {h.file_meta.TransferSyntaxUID for h in headers} == {pydicom.uid.ExplicitVRLittleEndian}


@pytest.mark.e2e
@pytest.mark.parametrize("series", ["CT", "PT"])
def test_series_pass_dciodvfy(synth_study, series):
    files = synth_study.ct_files if series == "CT" else synth_study.pt_files
    for path in (files[0], files[len(files) // 2], files[-1]):
        assert dciodvfy_errors(path) == [], path


def test_ct_hu_exact(synth_study):
    ct = load_series(synth_study.ct_files)
    np.testing.assert_array_equal(ct.array, ph.ct_hu(synth_study.phantom, ph.CT_GRID))
    assert ct.spacing == pytest.approx(ph.CT_GRID.spacing)
    assert ct.origin == pytest.approx(ph.CT_GRID.origin)


def test_pet_suv_recovered(synth_study):
    pet = load_series(synth_study.pt_files)
    expected = ph.pet_suv(synth_study.phantom, ph.PET_GRID)
    # int16 storage with a per-slice slope: error <= slice max / 65534, so 1 % plus a tiny
    # absolute tolerance for the near-zero voxels outside the body.
    np.testing.assert_allclose(pet_suv_volume(pet), expected, rtol=0.01, atol=1e-3)
    assert pet.spacing == pytest.approx(ph.PET_GRID.spacing)
    assert pet.origin == pytest.approx(ph.PET_GRID.origin)


def test_truth_files(synth_study):
    labels = sitk.ReadImage(str(synth_study.truth_labels))
    assert labels.GetSize() == tuple(reversed(ph.PET_GRID.shape))
    assert labels.GetOrigin() == pytest.approx(ph.PET_GRID.origin, abs=1e-4)
    assert labels.GetSpacing() == pytest.approx(tuple(reversed(ph.PET_GRID.spacing)), abs=1e-4)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(labels), ph.lesion_masks(synth_study.phantom, ph.PET_GRID)
    )
    truth = json.loads(synth_study.truth_json.read_text())
    assert truth["seed"] == 0
    assert truth["study_instance_uid"] == synth_study.study_instance_uid
    assert truth["pt_series_instance_uid"] == synth_study.pt_series_instance_uid
    assert len(truth["lesions"]) == len(synth_study.phantom.lesions)
    first = synth_study.phantom.lesions[0]
    assert truth["lesions"][0]["centre_mm"] == pytest.approx(list(first.centre_mm))
    assert truth["lesions"][0]["suv"] == pytest.approx(first.suv)


def test_same_seed_same_pixels_new_uids(synth_study, tmp_path):
    again = write_study(tmp_path / "again", seed=0, n_lesions=None)
    assert again.phantom == synth_study.phantom
    assert again.study_instance_uid != synth_study.study_instance_uid
    a = pydicom.dcmread(again.pt_files[30]).PixelData
    assert a == pydicom.dcmread(synth_study.pt_files[30]).PixelData


