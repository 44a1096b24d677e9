"""The synthetic patient timeline written as DICOM: one patient, two studies 84 days apart in two
frames of reference, the PET's SUVbw as the phantom's, height and sex as asked, the truth liver."""

from __future__ import annotations

import json
from datetime import date

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicomnode.imaging.suv import pet_suv_volume
from dicomnode.imaging.timepoint import Patient
from dicomnode.imaging.volumes import load_series
from dicomnode.synth import petct_phantom as ph
from dicomnode.synth.timeline import DAYS_BETWEEN, SCENARIOS, timeline, write_timeline


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return write_timeline(tmp_path_factory.mktemp("tl"), timeline("mixed"))


def test_one_patient_two_studies_two_frames(written):
    before = pydicom.dcmread(written.baseline.pt_files[0])
    after = pydicom.dcmread(written.followup.pt_files[0])
    assert before.PatientID == after.PatientID == "SYNTH-TIMELINE-1"
    assert before.StudyInstanceUID != after.StudyInstanceUID
    assert before.FrameOfReferenceUID != after.FrameOfReferenceUID
    days = date.fromisoformat(f"{after.StudyDate[:4]}-{after.StudyDate[4:6]}-{after.StudyDate[6:]}") - \
        date.fromisoformat(f"{before.StudyDate[:4]}-{before.StudyDate[4:6]}-{before.StudyDate[6:]}")
    assert days.days == DAYS_BETWEEN
    assert Patient.of_header(after) == Patient(75.0, 1.75, "M")
    truth = json.loads(written.truth_json.read_text())
    assert truth["followup_study_uid"] == after.StudyInstanceUID and truth["scenario"] == "mixed"


def test_followup_pet_is_the_moved_phantom(written):
    tl = written.timeline
    pet = load_series(written.followup.pt_files)
    suv = pet_suv_volume(pet)
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(written.followup.root / "truth" / "liver.nii.gz"))) > 0
    np.testing.assert_array_equal(liver, tl.liver_mask("after") > 0)
    core = liver & (ph.liver_mask(ph.PET_GRID, tl.pose("after")))
    assert float(np.median(suv[core])) == pytest.approx(ph.LIVER_SUV, rel=0.05)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(written.followup.truth_labels)))
    assert labels.max() == len(tl.present("after")) == 3
    # the new lesion lies where the pose puts it
    new = [c for c in tl.courses if c.name == "new"][0]
    k = [c.name for c in tl.present("after")].index("new") + 1
    index = np.argwhere(labels == k).mean(axis=0)
    sz, sy, sx = ph.PET_GRID.spacing
    ox, oy, oz = ph.PET_GRID.origin
    centre = np.array([ox + index[2] * sx, oy + index[1] * sy, oz + index[0] * sz])
    assert np.linalg.norm(centre - tl.scanner_point(new.centre_mm, "after")) < 2.0


def test_without_height(tmp_path):
    tl = timeline("response", patient=Patient(75.0, None, "F"))
    written = write_timeline(tmp_path, tl)
    ds = pydicom.dcmread(written.followup.pt_files[0])
    assert "PatientSize" not in ds and ds.PatientSex == "F"


def test_scenarios_known():
    assert set(SCENARIOS) == {"mixed", "response", "progression", "stable", "complete"}
    with pytest.raises(ValueError, match="unknown scenario"):
        timeline("worse")
