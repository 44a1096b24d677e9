"""The comparison engine on the synthetic patient timeline (dicomnode.synth.timeline): a baseline
and a follow-up in another frame of reference (rotated 4.6 deg, shifted 27 mm), with known lesion
courses. Known truth, stated tolerances:

- matching: every lesion's course recognised (shrinking and unchanged matched to themselves, the
  new one new, the disappeared one resolved); current and mapped prior centroids within
  CENTROID_TOLERANCE_MM of the truth position;
- registration: body-surface residual under 2 mm (a 4.08 mm grid), rotation within 0.5 deg;
- changes: the shrinking lesion's MTV ratio 0.5 +- 0.1 and SULpeak ratio 0.5 +- 0.15 (the 1 ml
  peak sphere around a noisy maximum reaches the blurred edge of the smaller lesion), the
  unchanged lesion's MTV and SULpeak within 10 %; the liver SULmean = 2.0 SUVbw x LBM/W within 5 %;
- the PERCIST category of each scenario, and "not assessable" with the premise named."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.imaging.comparison import Comparison, compare
from dicomnode.imaging.lesion_match import MatchStatus
from dicomnode.imaging.percist import Category
from dicomnode.imaging.sul import lean_body_mass_kg
from dicomnode.imaging.timepoint import Patient
from dicomnode.synth import petct_phantom as ph
from dicomnode.synth.timeline import PATIENT, Timeline, rotation_matrix, timeline

CENTROID_TOLERANCE_MM = 3.0

_cache: dict = {}


def compared(scenario: str, **kwargs) -> tuple[Timeline, Comparison]:
    key = (scenario, tuple(sorted(kwargs.items())))
    if key not in _cache:
        tl = timeline(scenario)
        prior, current = tl.timepoints(**kwargs)
        _cache[key] = (tl, compare(current, prior))
    return _cache[key]


def row_near(comparison: Comparison, point: np.ndarray, side: str):
    """The row whose current (or mapped prior) centroid is nearest `point`, and the distance."""
    best, distance = None, np.inf
    for row in comparison.lesions:
        values = getattr(row, side)
        if values is None:
            continue
        d = float(np.linalg.norm(np.asarray(values.centroid_mm) - point))
        if d < distance:
            best, distance = row, d
    return best, distance


def test_matching_recognises_every_course():
    tl, comparison = compared("mixed")
    courses = {c.name: c for c in tl.courses}
    rows = {}
    for name, course in courses.items():
        expected = tl.scanner_point(course.centre_mm, "after")  # where the lesion is (or was) now
        if course.after is not None:
            rows[name], d_now = row_near(comparison, expected, "current")
            assert d_now < CENTROID_TOLERANCE_MM, (name, d_now)
        if course.before is not None:
            row, d_before = row_near(comparison, expected, "prior")  # the prior centroid mapped into now
            assert d_before < CENTROID_TOLERANCE_MM, (name, d_before)
            if course.after is not None:
                assert row is rows[name], name  # the same row: matched with itself
            else:
                rows[name] = row
    assert rows["shrinking"].status is MatchStatus.MATCHED
    assert rows["unchanged"].status is MatchStatus.MATCHED
    assert rows["new"].status is MatchStatus.NEW and rows["new"].prior is None
    assert rows["resolved"].status is MatchStatus.RESOLVED and rows["resolved"].current is None
    assert len(comparison.lesions) == 4  # nothing else matched, new or resolved
    print(f"matching: {len(rows)} of {len(courses)} lesion courses recognised")
    assert rows["shrinking"].pair.current != rows["unchanged"].pair.current


def test_changes_within_tolerance():
    tl, comparison = compared("mixed")
    shrinking = row_near(comparison, tl.scanner_point(tl.courses[0].centre_mm, "after"), "current")[0]
    unchanged = row_near(comparison, tl.scanner_point(tl.courses[2].centre_mm, "after"), "current")[0]
    assert shrinking.current.mtv_ml / shrinking.prior.mtv_ml == pytest.approx(0.5, abs=0.1)
    assert shrinking.current.peak / shrinking.prior.peak == pytest.approx(0.5, abs=0.15)
    assert shrinking.mtv_change_percent == pytest.approx(-50, abs=10)
    assert unchanged.current.mtv_ml / unchanged.prior.mtv_ml == pytest.approx(1.0, abs=0.1)
    assert unchanged.current.peak / unchanged.prior.peak == pytest.approx(1.0, abs=0.1)
    # per patient
    assert (comparison.prior.lesion_count, comparison.current.lesion_count) == (3, 3)
    assert comparison.lesion_count_change == 0
    assert (len(comparison.new_lesions), len(comparison.resolved_lesions)) == (1, 1)
    assert comparison.unit == "SUL"
    factor = lean_body_mass_kg(75.0, 1.75, "M") / 75.0
    assert comparison.current.sul.factor == pytest.approx(factor)
    for study in (comparison.current, comparison.prior):
        assert study.liver.assessed
        assert study.liver.mean == pytest.approx(ph.LIVER_SUV * factor, rel=0.05)
        assert study.liver.centre_mm[0] < 0  # the patient's right (LPS -x)
    # the hottest lesion before was the shrinking one (SUV 10), now the new one (SUV 7): different lesions
    assert comparison.prior.hottest.number == shrinking.prior.number
    new = comparison.new_lesions[0]
    assert comparison.current.hottest.number == new.current.number
    assert comparison.hottest_change == pytest.approx(comparison.current.hottest.peak - comparison.prior.hottest.peak)
    assert comparison.current.total_mtv_ml == pytest.approx(sum(r.current.mtv_ml for r in comparison.lesions
                                                                if r.current))


def test_registration_residual():
    tl, comparison = compared("mixed")
    reg = comparison.registration
    truth_angle = np.degrees(np.arccos((np.trace(rotation_matrix(tl.rotation_deg)) - 1) / 2))
    assert reg.rotation_deg == pytest.approx(truth_angle, abs=0.5)
    assert reg.surface_residual_mm < 2.0
    assert reg.surface_residual_before_mm > 10.0
    print(f"registration: rotation {reg.rotation_deg:.2f} deg (truth {truth_angle:.2f}), surface residual "
          f"{reg.surface_residual_mm:.2f} mm (unregistered {reg.surface_residual_before_mm:.2f} mm), "
          f"metric {reg.final_metric:.3f}")


@pytest.mark.parametrize("scenario,category", [
    ("mixed", Category.PMD),  # by the new lesion
    ("response", Category.PMR),
    ("progression", Category.PMD),  # by SULpeak
    ("stable", Category.SMD),
    ("complete", Category.CMR),
])
def test_percist_category(scenario, category):
    _, comparison = compared(scenario)
    response = comparison.response
    print(f"{scenario}: {response.category.value} ({response.reason})")
    assert response.category is category, response.reason
    if scenario == "mixed":
        assert response.new_avid_lesions == 1 and "new FDG-avid" in response.reason
    if scenario == "progression":
        assert response.new_avid_lesions == 0
        assert response.change_percent > 30 and response.change_sul > 0.8
    if scenario == "response":
        assert response.change_percent < -30 and response.change_sul < -0.8
    assert comparison.as_json()["response"]["category"] == category.value


@pytest.mark.parametrize("patient,premise", [
    (Patient(weight_kg=75.0, height_m=None, sex="M"), "no patient height"),
    (Patient(weight_kg=75.0, height_m=1.75, sex=""), "patient sex unknown"),
    (Patient(weight_kg=75.0, height_m=175.0, sex="M"), "implausible"),
])
def test_not_assessable_without_sul(patient, premise):
    _, comparison = compared("response", patient=patient, ct=False)  # no registration needed to say so
    assert comparison.response.category is Category.NOT_ASSESSABLE
    assert "no SUL for the current study" in comparison.response.reason and premise in comparison.response.reason
    assert comparison.unit == "SUVbw"  # values still given, in SUVbw
    assert comparison.current.hottest is not None and comparison.current.sul is None


def test_not_assessable_without_height_in_the_prior_only():
    _, comparison = compared("response", prior_patient=Patient(weight_kg=75.0, height_m=None, sex="M"), ct=False)
    assert comparison.response.category is Category.NOT_ASSESSABLE
    assert "no SUL for the prior study: no patient height" in comparison.response.reason


def test_not_assessable_without_liver_mask():
    _, comparison = compared("response", liver=False, ct=False)
    assert comparison.response.category is Category.NOT_ASSESSABLE
    assert "no liver reference" in comparison.response.reason and "liver_from" in comparison.response.reason
    assert not comparison.current.liver.assessed


def test_without_ct_lesions_are_matched_in_scanner_coordinates_and_said_so():
    _, comparison = compared("response", liver=False, ct=False)
    assert comparison.registration.stage == "none"
    assert "no CT in the current study" in comparison.registration_note
    assert "registration: none" in "\n".join(comparison.lines())


def test_lines_and_json():
    _, comparison = compared("mixed")
    text = "\n".join(comparison.lines())
    assert "progressive metabolic disease" in text and "new" in text and "resolved" in text
    data = comparison.as_json()
    assert data["prior"]["study_uid"] and data["new_lesions"] == 1 and data["resolved_lesions"] == 1
    assert data["days_between"] == 84
    import json

    json.dumps(data)  # serialisable as it is


def test_patient_default_has_height_and_sex():
    assert PATIENT.height_m and PATIENT.sex == "M"
