"""DICOM SEG from the synthetic PET and its lesion truth: valid, and reads back voxel for voxel;
frames JPEG 2000 lossless when that is smaller than bit-packed, else bit-packed."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicomnode.results.common import ResultError, write_dicom
from dicomnode.results.seg import build_seg, packed_size

from tests.support.dicomtools import dciodvfy_errors

SEG_ARGS = dict(
    model_name="demo-petct",
    model_version="0.1.0",
    folds=[0, 1, 2, 3, 4],
    series_number=901,
    series_description="demo-petct lesions",
)


@pytest.fixture(scope="module")
def seg_path(pet, truth, tmp_path_factory):
    seg = build_seg(truth, pet.datasets, **SEG_ARGS)
    return write_dicom(seg, tmp_path_factory.mktemp("seg") / "seg.dcm")


@pytest.mark.e2e
def test_seg_passes_dciodvfy(seg_path):
    assert dciodvfy_errors(seg_path) == []


def test_seg_reads_back(seg_path, pet, truth, synth_study):
    seg = hd.seg.segread(seg_path)
    assert seg.StudyInstanceUID == synth_study.study_instance_uid
    assert seg.FrameOfReferenceUID == synth_study.frame_of_reference_uid
    assert seg.SeriesInstanceUID not in (synth_study.pt_series_instance_uid, synth_study.ct_series_instance_uid)
    assert seg.SeriesNumber == 901 and seg.SegmentationType == "BINARY"
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    referenced = {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence}
    assert referenced == {synth_study.pt_series_instance_uid}
    uids = [ds.SOPInstanceUID for ds in pet.datasets]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    np.testing.assert_array_equal(pixels[..., 0], (truth > 0).astype(pixels.dtype))


def test_seg_algorithm_and_codes(seg_path):
    ds = pydicom.dcmread(seg_path)
    (segment,) = ds.SegmentSequence
    assert segment.SegmentLabel == "lesion"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
    assert (kind.CodeValue, kind.CodingSchemeDesignator) == ("108369006", "SCT")
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "demo-petct"
    assert algorithm.AlgorithmVersion == "0.1.0"
    assert "folds=0,1,2,3,4" in algorithm.AlgorithmParameters
    family = algorithm.AlgorithmFamilyCodeSequence[0]
    assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")


@pytest.mark.e2e
def test_empty_result_still_gives_a_valid_seg(pet, tmp_path):
    empty = np.zeros(pet.shape, dtype=np.uint8)
    path = write_dicom(build_seg(empty, pet.datasets, **SEG_ARGS), tmp_path / "empty.dcm")
    assert dciodvfy_errors(path) == []
    seg = hd.seg.segread(path)
    assert seg.number_of_segments == 1
    uids = [ds.SOPInstanceUID for ds in pet.datasets]
    assert not seg.get_pixels_by_source_instance(source_sop_instance_uids=uids).any()


def test_sources_without_accession_number(pet, truth):
    sources = [pydicom.Dataset(ds) for ds in pet.datasets]
    for ds in sources:
        del ds.AccessionNumber
    seg = build_seg(truth, sources, **SEG_ARGS)
    assert seg.AccessionNumber == ""
    assert all("AccessionNumber" not in ds for ds in sources)  # the caller's headers are untouched


def test_labels_must_fit_the_source(pet, truth):
    with pytest.raises(ResultError, match="does not match the source grid"):
        build_seg(truth[:-1], pet.datasets, **SEG_ARGS)


@pytest.mark.e2e
def test_frames_compressed_only_when_smaller(pet, truth, tmp_path):
    """Lesions compress well (JPEG 2000 lossless, a third of the bit-packed size here); a mask of
    random noise does not, and is stored bit-packed; both read back voxel for voxel."""
    noise = (np.random.default_rng(0).random(pet.shape) > 0.5).astype(np.uint8)
    uids = [ds.SOPInstanceUID for ds in pet.datasets]
    for labels, syntax in ((truth, pydicom.uid.JPEG2000Lossless), (noise, pydicom.uid.ExplicitVRLittleEndian)):
        seg = build_seg(labels, pet.datasets, **SEG_ARGS)
        assert seg.file_meta.TransferSyntaxUID == syntax
        if syntax.is_compressed:
            assert len(seg.PixelData) < packed_size(labels.shape) / 2
        else:
            assert len(seg.PixelData) == packed_size(labels.shape) == 64 * 64 * 64 // 8
        path = write_dicom(seg, tmp_path / f"{syntax.name}.dcm")
        assert dciodvfy_errors(path) == []
        pixels = hd.seg.segread(path).get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
        np.testing.assert_array_equal(pixels[..., 0], (labels > 0).astype(pixels.dtype))
