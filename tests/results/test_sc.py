"""Secondary capture of the PET MIP: valid (dciodvfy), in the source study, BurnedInAnnotation
YES, each lesion outlined in its colour where it projects, no colour at all when nothing was found."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from dicomnode.imaging.measures import measure_lesions
from dicomnode.imaging.suv import pet_suv_volume
from dicomnode.results.common import ResultError
from dicomnode.results.preview import PALETTE, default_zoom, panel_size
from dicomnode.results.sc import CAVEAT, build_sc, key_figures

from tests.support.dicomtools import dciodvfy_errors

ARGS = dict(model_name="demo-petct", model_version="0.1.0", series_number=981, series_description="demo-petct PET MIP")


@pytest.fixture(scope="module")
def suv(pet):
    return pet_suv_volume(pet).astype(np.float32)


@pytest.fixture(scope="module")
def lesions(suv, truth, pet):
    return measure_lesions(truth > 0, suv, pet.spacing)  # (measures, lesion labels numbered by SUVmax)


def _capture(suv, lesions, pet, folder):
    measures, labels = lesions
    path = folder / "sc.dcm"
    build_sc(suv, labels, measures, pet.datasets, pet.spacing, **ARGS).save_as(path, enforce_file_format=True)
    return path


def _projected(labels: np.ndarray, spacing, width: int, height: int) -> np.ndarray:
    """The lesion labels' coronal projection (head up) sampled onto the panel's pixels."""
    projection = labels.max(axis=1)[::-1]
    rows = np.minimum(((np.arange(height) + 0.5) * projection.shape[0] / height).astype(int), projection.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * projection.shape[1] / width).astype(int), projection.shape[1] - 1)
    return projection[rows][:, cols]


def _coloured(image: np.ndarray) -> np.ndarray:
    return ~((image[..., 0] == image[..., 1]) & (image[..., 1] == image[..., 2]))


@pytest.mark.e2e
def test_capture_passes_dciodvfy_and_header(suv, lesions, pet, synth_study, tmp_path):
    path = _capture(suv, lesions, pet, tmp_path)
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert ds.StudyInstanceUID == synth_study.study_instance_uid and ds.PatientID == pet.datasets[0].PatientID
    assert ds.SeriesInstanceUID not in (synth_study.pt_series_instance_uid, synth_study.ct_series_instance_uid)
    assert (ds.SeriesNumber, ds.SeriesDescription) == (981, "demo-petct PET MIP")
    assert (ds.BurnedInAnnotation, ds.ConversionType, list(ds.PatientOrientation)) == ("YES", "WSD", ["L", "F"])
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BitsAllocated) == ("RGB", 3, 8)
    assert (ds.ManufacturerModelName, ds.SoftwareVersions) == ("demo-petct", "0.1.0")


def test_each_lesion_outlined_in_its_colour_where_it_projects(suv, lesions, pet, tmp_path):
    measures, labels = lesions
    image = pydicom.dcmread(_capture(suv, lesions, pet, tmp_path)).pixel_array
    width, height = panel_size(labels.shape, pet.spacing, default_zoom(labels.shape, pet.spacing))
    assert image.shape[1] == width and image.shape[0] > height
    header, panel = image[:-height], image[-height:]
    assert (header < 100).any() and not _coloured(header).any()  # black text on white
    projected = _projected(labels, pet.spacing, width, height)
    near = ndimage.binary_dilation(projected > 0, iterations=2)
    assert not (_coloured(panel) & ~near).any()  # colour only around projected lesions
    for lesion in measures.lesions:
        ring = ndimage.binary_dilation(projected == lesion.number, iterations=2) & (projected == 0)
        colour = np.all(panel == PALETTE[(lesion.number - 1) % len(PALETTE)], axis=2)
        assert (colour & ring).sum() > 0.5 * ring.sum(), lesion.number


def test_all_negative_has_no_colour(suv, pet, tmp_path):
    negative = measure_lesions(np.zeros(suv.shape, bool), suv, pet.spacing)
    image = pydicom.dcmread(_capture(suv, negative, pet, tmp_path)).pixel_array
    assert not _coloured(image).any()
    assert (image < 100).any()  # the text, and the uptake in the MIP


def test_key_figures_burned_in(lesions):
    measures, _ = lesions
    line = key_figures(measures, 10.0)
    suv_max = max(lesion.suv_max for lesion in measures.lesions)
    assert line.startswith(f"{measures.lesion_count} lesions | MTV {measures.total_mtv_ml:.1f} ml | "
                           f"TLG {measures.total_tlg_g:.1f} g | SUVmax {suv_max:.1f}")
    assert "not for diagnosis" in CAVEAT


def test_labels_must_fit_the_pet(suv, lesions, pet):
    measures, labels = lesions
    with pytest.raises(ResultError, match="differs from the PET"):
        build_sc(suv, labels[:-1], measures, pet.datasets, pet.spacing, **ARGS)
