"""RT Structure Set of the synthetic study's lesions: valid (dciodvfy), in the source study, one
ROI per lesion whose contours, rasterised back onto the slices they reference, give the lesion."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from skimage.draw import polygon

from dicomnode.results.common import ResultError, write_dicom
from dicomnode.results.rtstruct import NO_LESIONS, build_rtstruct

from tests.support.dicomtools import dciodvfy_errors

ARGS = dict(model_name="demo-petct", model_version="0.1.0", series_number=971, series_description="demo-petct contours")


@pytest.fixture(scope="module")
def rtstruct_path(pet, truth, tmp_path_factory):
    return write_dicom(build_rtstruct(truth, pet.datasets, **ARGS), tmp_path_factory.mktemp("rt") / "rtstruct.dcm")


@pytest.mark.e2e
def test_rtstruct_passes_dciodvfy(rtstruct_path):
    assert dciodvfy_errors(rtstruct_path) == []


def test_rtstruct_header_and_rois(rtstruct_path, pet, truth, synth_study):
    ds = pydicom.dcmread(rtstruct_path)
    assert ds.SOPClassUID == pydicom.uid.RTStructureSetStorage and ds.Modality == "RTSTRUCT"
    assert ds.StudyInstanceUID == synth_study.study_instance_uid and ds.PatientID == pet.datasets[0].PatientID
    assert ds.SeriesInstanceUID not in (synth_study.pt_series_instance_uid, synth_study.ct_series_instance_uid)
    assert ds.FrameOfReferenceUID == synth_study.frame_of_reference_uid and ds.SeriesNumber == 971
    [frame] = ds.ReferencedFrameOfReferenceSequence
    [series] = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == synth_study.pt_series_instance_uid
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == [d.SOPInstanceUID for d in pet.datasets]
    lesions = [int(n) for n in np.unique(truth) if n > 0]
    assert [(r.ROINumber, r.ROIName, r.ROIGenerationAlgorithm) for r in ds.StructureSetROISequence] == [
        (n, f"lesion {n}", "AUTOMATIC") for n in lesions]
    assert all("demo-petct 0.1.0" in r.ROIGenerationDescription for r in ds.StructureSetROISequence)
    assert [(o.ReferencedROINumber, o.RTROIInterpretedType) for o in ds.RTROIObservationsSequence] == [
        (n, "GTV") for n in lesions
    ]


def _rasterise(roi_contours, source, grid: sitk.Image) -> np.ndarray:
    """Contours back to a (z, y, x) mask through `grid`'s geometry (even-odd, as RT systems fill)."""
    slices = {ds.SOPInstanceUID: k for k, ds in enumerate(source)}
    shape = (len(source), int(source[0].Rows), int(source[0].Columns))
    mask = np.zeros(shape, bool)
    for contour in roi_contours.ContourSequence:
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        k = slices[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        assert len(points) == contour.NumberOfContourPoints
        index = np.array([grid.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points])
        np.testing.assert_allclose(index[:, 2], k, atol=1e-3)  # on the slice it references
        filled = np.zeros(shape[1:], bool)
        filled[polygon(index[:, 1], index[:, 0], shape[1:])] = True
        mask[k] ^= filled
    return mask


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _grid_from_headers(source) -> sitk.Image:
    """An image with the geometry the DICOM headers describe (for edited headers)."""
    first = source[0]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    step = float(np.dot(np.subtract(source[1].ImagePositionPatient, first.ImagePositionPatient), normal))
    normal, step = normal * np.sign(step), abs(step)  # the slices' direction, whichever way the normal points
    grid = sitk.Image(int(first.Columns), int(first.Rows), len(source), sitk.sitkUInt8)
    grid.SetOrigin([float(v) for v in first.ImagePositionPatient])
    grid.SetSpacing([float(first.PixelSpacing[1]), float(first.PixelSpacing[0]), step])
    grid.SetDirection(np.column_stack([orientation[:3], orientation[3:], normal]).ravel().tolist())
    return grid


def test_contours_give_back_each_lesion(rtstruct_path, pet, truth, synth_study):
    """Rasterised through the truth NIfTI's geometry (SimpleITK), each ROI is its lesion."""
    ds = pydicom.dcmread(rtstruct_path)
    grid = sitk.ReadImage(str(synth_study.truth_labels))
    for roi in ds.ROIContourSequence:
        n = roi.ReferencedROINumber
        assert _dice(_rasterise(roi, pet.datasets, grid), truth == n) > 0.97, n


@pytest.mark.e2e
def test_contours_follow_pixel_spacing_and_orientation(pet, truth, tmp_path):
    """Rows 2 mm apart, columns 3 mm, the row direction mirrored: contours still land on the lesion."""
    source = [pydicom.Dataset(ds) for ds in pet.datasets]
    for ds in source:
        ds.PixelSpacing = [2.0, 3.0]
        ds.ImageOrientationPatient = [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    path = write_dicom(build_rtstruct(truth, source, **ARGS), tmp_path / "rt.dcm")
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    grid = _grid_from_headers(source)
    first = np.asarray(ds.ROIContourSequence[0].ContourSequence[0].ContourData, dtype=float).reshape(-1, 3)
    assert first[:, 0].max() <= float(source[0].ImagePositionPatient[0])  # columns run towards -x
    for roi in ds.ROIContourSequence:
        assert _dice(_rasterise(roi, source, grid), truth == roi.ReferencedROINumber) > 0.97


@pytest.mark.e2e
def test_all_negative_gives_one_empty_roi(pet, tmp_path):
    path = write_dicom(build_rtstruct(np.zeros(pet.shape, np.int32), pet.datasets, **ARGS), tmp_path / "rt.dcm")
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    [roi] = ds.StructureSetROISequence
    [contours] = ds.ROIContourSequence
    assert roi.ROIName == NO_LESIONS and "ContourSequence" not in contours
    assert ds.RTROIObservationsSequence[0].RTROIInterpretedType == ""


def test_labels_must_fit_the_source(pet, truth):
    with pytest.raises(ResultError, match="does not match the source grid"):
        build_rtstruct(truth[:, :-1], pet.datasets, **ARGS)
