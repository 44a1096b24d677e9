"""Result objects drawn on enhanced multi-frame sources (the synthetic PET converted by
highdicom.legacy): the SEG references each source frame and reads back voxel for voxel, the SR
names the instance once and measures as on the single-frame series, the RT structure set
references frames; every object passes dciodvfy."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicomnode.imaging.measures import measure_lesions
from dicomnode.imaging.suv import pet_suv_volume
from dicomnode.imaging.volumes import load_series
from dicomnode.results.common import write_dicom
from dicomnode.results.rtstruct import build_rtstruct
from dicomnode.results.sc import build_sc
from dicomnode.results.seg import build_seg
from dicomnode.results.sr import build_sr

from tests.support.dicomtools import dciodvfy_errors
from tests.support.multiframe import convert_series

MODEL = dict(model_name="demo-petct", model_version="0.1.0")


@pytest.fixture(scope="module")
def sources(synth_study, tmp_path_factory):
    root = tmp_path_factory.mktemp("mf-results")
    return {
        "one": load_series(convert_series(synth_study.pt_files, root / "one")),
        "split": load_series(convert_series(synth_study.pt_files, root / "split", parts=2, concatenation=True)),
    }


@pytest.fixture(scope="module")
def written(sources, truth, tmp_path_factory):
    """SEG, SR, RTSTRUCT and SC of the truth lesions on each multi-frame source."""
    out = tmp_path_factory.mktemp("mf-objects")
    files = {}
    for name, volume in sources.items():
        suv = pet_suv_volume(volume)
        measures, labels = measure_lesions(truth > 0, suv, volume.spacing)
        seg = build_seg((truth > 0).astype(np.uint8), volume.datasets, folds=[0], series_number=901,
                        series_description="lesions", **MODEL)
        files[name, "seg"] = write_dicom(seg, out / f"{name}-seg.dcm")
        sr = build_sr(measures, labels, seg, volume.datasets, series_number=902, series_description="measures",
                      **MODEL)
        files[name, "sr"] = write_dicom(sr, out / f"{name}-sr.dcm")
        rt = build_rtstruct(labels, volume.datasets, series_number=903, series_description="contours", **MODEL)
        files[name, "rtstruct"] = write_dicom(rt, out / f"{name}-rtstruct.dcm")
        sc = build_sc(suv, labels, measures, volume.datasets, volume.spacing, series_number=904,
                      series_description="mip", **MODEL)
        files[name, "sc"] = write_dicom(sc, out / f"{name}-sc.dcm")
    return files


def _position(ds) -> tuple[float, ...]:  # noqa: ANN001
    return tuple(round(float(v), 3) for v in ds.ImagePositionPatient)


@pytest.mark.parametrize("name", ["one", "split"])
def test_seg_references_each_source_frame(sources, written, truth, name):
    volume = sources[name]
    seg = pydicom.dcmread(written[name, "seg"])
    frames = {(str(ds.SOPInstanceUID), ds.frame_number): ds for ds in volume.datasets}
    referenced = {str(i.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence
                  for i in s.ReferencedInstanceSequence}
    assert referenced == {uid for uid, _ in frames}  # every instance of the series, once
    assert len(seg.PerFrameFunctionalGroupsSequence) == 64
    for item in seg.PerFrameFunctionalGroupsSequence:
        [source] = item.DerivationImageSequence[0].SourceImageSequence
        frame = frames[str(source.ReferencedSOPInstanceUID), int(source.ReferencedFrameNumber)]
        assert _position(frame) == _position(item.PlanePositionSequence[0])
    # read back by highdicom, by source frame: the truth voxel for voxel
    reader = hd.seg.segread(written[name, "seg"])
    mask = np.zeros_like(truth, dtype=bool)
    for uid in sorted(referenced):
        slices = [k for k, ds in enumerate(volume.datasets) if str(ds.SOPInstanceUID) == uid]
        pixels = reader.get_pixels_by_source_frame(
            source_sop_instance_uid=uid, source_frame_numbers=[volume.datasets[k].frame_number for k in slices],
            segment_numbers=[1])
        mask[slices] = pixels[..., 0].astype(bool)
    np.testing.assert_array_equal(mask, truth > 0)


def test_sr_names_each_instance_once_and_measures_as_single_frame(sources, written, pet, truth):
    single, _ = measure_lesions(truth > 0, pet_suv_volume(pet), pet.spacing)
    for name, volume in sources.items():
        multi, _ = measure_lesions(truth > 0, pet_suv_volume(volume), volume.spacing)
        assert multi == single
        sr = pydicom.dcmread(written[name, "sr"])
        evidence = [item.ReferencedSOPInstanceUID
                    for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
                    for item in series.ReferencedSOPSequence]
        instances = {str(ds.SOPInstanceUID) for ds in volume.datasets}
        assert len(evidence) == len(set(evidence)) == len(instances) + 1  # the instances and the SEG
        assert instances < set(evidence)


def test_rtstruct_references_frames(sources, written):
    volume = sources["one"]
    rt = pydicom.dcmread(written["one", "rtstruct"])
    images = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    references = [(str(i.ReferencedSOPInstanceUID), int(i.ReferencedFrameNumber)) for i in images.ContourImageSequence]
    assert references == [(str(ds.SOPInstanceUID), ds.frame_number) for ds in volume.datasets]
    by_frame = {ds.frame_number: ds for ds in volume.datasets}
    for roi in rt.ROIContourSequence:
        for contour in roi.get("ContourSequence", []):
            [image] = contour.ContourImageSequence
            z = float(contour.ContourData[2])
            assert abs(z - float(by_frame[int(image.ReferencedFrameNumber)].ImagePositionPatient[2])) < 1e-3


@pytest.mark.e2e  # dciodvfy is a subprocess
def test_every_object_passes_dciodvfy(written):
    errors = {key: dciodvfy_errors(path) for key, path in written.items()}
    assert errors == {key: [] for key in written}
