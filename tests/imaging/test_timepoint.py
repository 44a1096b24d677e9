"""TimePoint: what a processed study leaves for a later comparison, saved and loaded back."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.imaging.timepoint import TIMEPOINT_FILE, Patient, TimePoint, TimePointError, VolumeGeometry


def _timepoint(with_ct: bool = True, with_liver: bool = True) -> TimePoint:
    rng = np.random.default_rng(3)
    geometry = VolumeGeometry(origin=(-10.0, -20.0, 30.0), spacing=(4.0, 4.0, 3.0))
    ct_geometry = VolumeGeometry(origin=(-10.5, -20.5, 30.0), spacing=(2.0, 2.0, 3.0))
    return TimePoint(
        study_uid="1.2.3.4", study_date="20240315", study_time="090500",
        patient=Patient(weight_kg=75.0, height_m=1.75, sex="M"),
        suv=rng.random((6, 7, 8)).astype(np.float32) * 10,
        labels=(rng.random((6, 7, 8)) > 0.8).astype(np.uint8),
        geometry=geometry,
        ct=np.round(rng.normal(0, 300, (6, 14, 16))).astype(np.float32) if with_ct else None,
        ct_geometry=ct_geometry if with_ct else None,
        liver=(rng.random((6, 7, 8)) > 0.5).astype(np.uint8) if with_liver else None,
    )


@pytest.mark.parametrize("with_ct,with_liver", [(True, True), (False, False)])
def test_save_load_round_trip(tmp_path, with_ct, with_liver):
    original = _timepoint(with_ct, with_liver)
    path = tmp_path / TIMEPOINT_FILE
    original.save(path)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temp file left
    loaded = TimePoint.load(path)
    assert (loaded.study_uid, loaded.study_date, loaded.study_time) == ("1.2.3.4", "20240315", "090500")
    assert loaded.patient == original.patient
    assert loaded.geometry == original.geometry and loaded.ct_geometry == original.ct_geometry
    np.testing.assert_array_equal(loaded.suv, original.suv)
    np.testing.assert_array_equal(loaded.labels, original.labels)
    if with_ct:
        np.testing.assert_array_equal(loaded.ct, original.ct)
        np.testing.assert_array_equal(loaded.liver, original.liver)
    else:
        assert loaded.ct is None and loaded.liver is None


def test_unknown_patient_fields_round_trip(tmp_path):
    tp = _timepoint()
    tp = TimePoint(**{**tp.__dict__, "patient": Patient(weight_kg=None, height_m=None, sex="")})
    tp.save(tmp_path / "t.npz")
    assert TimePoint.load(tmp_path / "t.npz").patient == Patient(None, None, "")


def test_mismatched_shapes_refused():
    tp = _timepoint()
    with pytest.raises(TimePointError, match="labels shape"):
        TimePoint(**{**tp.__dict__, "labels": np.zeros((2, 2, 2), np.uint8)})
    with pytest.raises(TimePointError, match="ct and ct_geometry"):
        TimePoint(**{**tp.__dict__, "ct_geometry": None})


def test_damaged_file_refused(tmp_path):
    path = tmp_path / TIMEPOINT_FILE
    path.write_bytes(b"not a zip")
    with pytest.raises(TimePointError, match="cannot read"):
        TimePoint.load(path)


def test_geometry_points_and_indices_invert():
    geometry = VolumeGeometry(origin=(-10.0, -20.0, 30.0), spacing=(4.0, 2.0, 3.0))
    index = np.array([[0, 0, 0], [1, 2, 3], [5.5, 0.5, 7.0]])
    points = geometry.index_to_point(index)
    np.testing.assert_allclose(points[1], [-10.0 + 3 * 4.0, -20.0 + 2 * 2.0, 30.0 + 1 * 3.0])
    np.testing.assert_allclose(geometry.point_to_index(points), index)


def test_patient_of_header():
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PatientWeight, ds.PatientSize, ds.PatientSex = "75.0", "1.75", "M"
    assert Patient.of_header(ds) == Patient(75.0, 1.75, "M")
    ds.PatientSex, ds.PatientSize = "O", ""
    assert Patient.of_header(ds) == Patient(75.0, None, "")
    assert Patient.of_header(Dataset()) == Patient(None, None, "")
