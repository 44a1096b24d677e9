"""The parts of the comparison on their own: SUL (Janmahasatian), the liver reference sphere, the
PERCIST 1.0 thresholds at their edges, one-to-one lesion matching."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.imaging.lesion_match import MATCH_MAX_CENTROID_MM, MatchStatus, match_lesions
from dicomnode.imaging.liver_reference import (
    LIVER_SPHERE_DIAMETER_MM,
    LiverReference,
    liver_reference,
    regularise_liver,
)
from dicomnode.imaging.percist import Category, StudyFigures, categorise, measurability_threshold
from dicomnode.imaging.sul import SulError, lean_body_mass_kg, sul_factor
from dicomnode.imaging.timepoint import Patient, VolumeGeometry
from dicomnode.synth import petct_phantom as ph
from dicomnode.synth.timeline import grid_geometry, timeline

# --- SUL ---------------------------------------------------------------------------------


def test_janmahasatian_lean_body_mass():
    # 75 kg, 1.75 m: BMI 24.49; men 9270 * 75 / (6680 + 216 * 24.49) = 58.08 kg, women 46.46 kg
    assert lean_body_mass_kg(75.0, 1.75, "M") == pytest.approx(9270 * 75 / (6680 + 216 * 75 / 1.75**2))
    assert lean_body_mass_kg(75.0, 1.75, "M") == pytest.approx(58.08, abs=0.01)
    assert lean_body_mass_kg(75.0, 1.75, "F") == pytest.approx(9270 * 75 / (8780 + 244 * 75 / 1.75**2))
    factor = sul_factor(Patient(75.0, 1.75, "M"))
    assert factor.factor == pytest.approx(58.08 / 75, abs=1e-4) and factor.lbm_kg == pytest.approx(58.08, abs=0.01)


@pytest.mark.parametrize("patient,reason", [
    (Patient(75.0, None, "M"), "no patient height"),
    (Patient(None, 1.75, "M"), "no patient weight"),
    (Patient(75.0, 1.75, ""), "patient sex unknown"),
    (Patient(75.0, 1.75, "O"), "patient sex unknown"),
    (Patient(75.0, 175.0, "F"), "height 175 m is implausible"),
    (Patient(7500.0, 1.75, "F"), "weight 7500 kg is implausible"),
])
def test_sul_refused_with_the_reason(patient, reason):
    with pytest.raises(SulError, match=reason):
        sul_factor(patient)


# --- liver reference -----------------------------------------------------------------------


def _liver_case(semi_axes_mm=(50.0, 40.0, 30.0)):
    geometry = VolumeGeometry(origin=(-120.0, -100.0, -90.0), spacing=(4.0, 4.0, 3.0))
    shape = (60, 50, 60)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    pts = geometry.index_to_point(np.stack([z.ravel(), y.ravel(), x.ravel()], axis=1)).reshape(*shape, 3)
    ax, ay, az = semi_axes_mm
    centre = (-40.0, 0.0, 0.0)
    liver = (((pts[..., 0] - centre[0]) / ax) ** 2 + ((pts[..., 1] - centre[1]) / ay) ** 2
             + ((pts[..., 2] - centre[2]) / az) ** 2) <= 1
    uptake = np.where(liver, 1.5, 0.5).astype(np.float32)
    uptake[liver & (pts[..., 0] > -40.0)] = 3.0  # the left half differs: it must not be sampled
    return geometry, liver, uptake


def test_liver_sphere_in_the_right_half_fully_inside():
    geometry, liver, uptake = _liver_case()
    ref = liver_reference(uptake, liver, geometry)
    assert ref.assessed, ref.reason
    assert ref.mean == pytest.approx(1.5) and ref.sd == pytest.approx(0.0)  # right half only, all inside
    assert ref.centre_mm[0] <= -40.0  # right of the liver's median (LPS -x)
    assert ref.depth_mm >= LIVER_SPHERE_DIAMETER_MM / 2
    expected = 4 / 3 * np.pi * 15.0**3 / (4 * 4 * 3)
    assert ref.voxels == pytest.approx(expected, rel=0.1)


def test_liver_too_small_or_missing_is_not_assessed():
    geometry, liver, uptake = _liver_case((20.0, 20.0, 12.0))
    ref = liver_reference(uptake, liver, geometry)
    assert not ref.assessed and "no room for a 30 mm sphere" in ref.reason
    assert "no liver mask" in liver_reference(uptake, None, geometry).reason
    assert "empty" in liver_reference(uptake, np.zeros_like(liver), geometry).reason


def test_a_solid_liver_is_left_as_it_is_by_the_regularisation():
    geometry, liver, _ = _liver_case()
    assert np.array_equal(regularise_liver(liver, geometry.spacing_zyx), liver)


def test_liver_sphere_in_a_fragmented_mask_lies_in_the_true_liver():
    """An organ model's ragged liver (as the stand-in organ model gives on the synthetic PET/CT):
    the phantom's true liver with 20 % of its voxels missing at random, a notch cut into its right
    lobe, and a rim of loose fragments around it. Closed, filled and reduced to its largest
    component, the mask still holds the sphere, fully inside the true liver, and SULmean is right."""
    grid, geometry = ph.PET_GRID, grid_geometry(ph.PET_GRID)
    spacing = geometry.spacing_zyx
    truth = ph.liver_mask(grid)
    suv = ph.pet_suv(timeline("mixed").phantom("before"), grid)
    rng = np.random.default_rng(16)
    ragged = truth & (rng.random(truth.shape) > 0.20)  # salt-and-pepper holes
    z, y, x = np.indices(truth.shape)
    ragged &= ~((np.abs(y - 34) <= 1) & (x < 24))  # a notch one voxel wide across the right lobe
    outside = ndimage.distance_transform_edt(~truth, sampling=spacing)
    rim = (outside > 4.5) & (outside <= 12.0)
    ragged |= rim & (rng.random(truth.shape) < 0.08)  # loose fragments 4.5 to 12 mm outside
    pieces = ndimage.label(ragged, structure=np.ones((3, 3, 3), bool))[1]
    assert pieces > 50  # the stand-in organ model's liver on the baseline: 81 pieces on the PET grid

    ref = liver_reference(suv, ragged, geometry)
    assert ref.assessed, ref.reason
    centre = np.rint(geometry.point_to_index(np.array([ref.centre_mm]))[0]).astype(int)
    truth_depth = ndimage.distance_transform_edt(np.pad(truth, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    assert truth[tuple(centre)] and truth_depth[tuple(centre)] >= LIVER_SPHERE_DIAMETER_MM / 2  # fully inside
    assert ref.centre_mm[0] < -45.0  # the right lobe (the liver's centre is at x = -45 mm)
    assert ref.mean == pytest.approx(ph.LIVER_SUV, rel=0.05)  # uptake is SUVbw here: the truth is 2.0
    clean = liver_reference(suv, truth, geometry)
    assert ref.mean == pytest.approx(clean.mean, rel=0.03) and ref.sd == pytest.approx(clean.sd, rel=0.25)
    assert ref.voxels == pytest.approx(clean.voxels, rel=0.05)


def test_fragments_alone_leave_no_room_and_say_so():
    """Scattered voxels with nothing solid among them: still not assessed, with the reason."""
    geometry, liver, uptake = _liver_case()
    sparse = liver & (np.random.default_rng(3).random(liver.shape) < 0.02)
    sparse[::6] = False  # every sixth slice empty: nothing bridges it
    ref = liver_reference(uptake, sparse, geometry)
    assert not ref.assessed and "no room for a 30 mm sphere" in ref.reason and "regularised" in ref.reason


# --- PERCIST thresholds ----------------------------------------------------------------------

LIVER = LiverReference(assessed=True, mean=1.5, sd=0.2, voxels=100)  # threshold 1.5 * 1.5 + 2 * 0.2 = 2.65


def figures(label, peaks, tlg=100.0, liver=LIVER, sul_reason=""):
    return StudyFigures(label, sul_reason, liver, tuple(peaks), tlg)


def test_measurability_threshold():
    assert measurability_threshold(LIVER) == pytest.approx(2.65)


@pytest.mark.parametrize("before,now,new,tlg_now,category", [
    ([10.0], [6.9], [], 100.0, Category.PMR),  # -31 %, -3.1 SUL
    ([10.0], [7.1], [], 100.0, Category.SMD),  # -29 %
    ([2.7], [1.8], [], 100.0, Category.PMR),  # -33 %, -0.9 SUL: both thresholds met
    ([2.7], [1.6], [], 100.0, Category.PMR),  # -41 %, -1.1 SUL
    ([10.0], [13.1], [], 100.0, Category.PMD),  # +31 %, +3.1 SUL
    ([2.7], [3.4], [], 100.0, Category.SMD),  # +26 %
    ([10.0], [10.5], [], 180.0, Category.PMD),  # TLG +80 % and no fall of the target
    ([10.0], [9.5], [], 180.0, Category.SMD),  # TLG +80 % but the target fell
    ([10.0], [1.4], [], 10.0, Category.CMR),  # below the liver mean
    ([10.0], [], [], 0.0, Category.CMR),
    ([10.0], [10.0, 3.0], [3.0], 110.0, Category.PMD),  # a new lesion above 2.65
    ([10.0], [10.0, 2.0], [2.0], 110.0, Category.SMD),  # a new lesion below the threshold does not decide
    ([2.0], [1.0], [], 100.0, Category.NOT_ASSESSABLE),  # no measurable target at baseline
    ([2.0], [2.0, 4.0], [4.0], 100.0, Category.PMD),  # ... but a new avid lesion is progression
    ([], [], [], 0.0, Category.NOT_ASSESSABLE),
])
def test_categories_at_the_thresholds(before, now, new, tlg_now, category):
    response = categorise(figures("prior", before), figures("current", now, tlg_now), new)
    assert response.category is category, response.reason


def test_absolute_change_rule_decides_small_targets():
    # -35 % but only -0.7 SUL: the 0.8 SUL rule keeps it stable
    response = categorise(figures("prior", [2.0], liver=LiverReference(True, mean=1.0, sd=0.1, voxels=9)),
                          figures("current", [1.3], liver=LiverReference(True, mean=1.0, sd=0.1, voxels=9)), [])
    assert response.category is Category.SMD
    assert response.change_percent == pytest.approx(-35.0)


def test_not_assessable_names_the_premise():
    no_liver = LiverReference(assessed=False, reason="no liver mask")
    r = categorise(figures("prior", [10.0], liver=no_liver), figures("current", [5.0]), [])
    assert r.category is Category.NOT_ASSESSABLE and r.reason == "no liver reference for the prior study: no liver mask"
    no_height = "no patient height (PatientSize)"
    r = categorise(figures("prior", [10.0]), figures("current", [5.0], sul_reason=no_height), [])
    assert r.reason == "no SUL for the current study: no patient height (PatientSize)"


def test_liver_disagreement_is_a_warning():
    other = LiverReference(assessed=True, mean=2.0, sd=0.2, voxels=100)
    r = categorise(figures("prior", [10.0]), figures("current", [6.0], liver=other), [])
    assert r.category is Category.PMR and r.warnings and "20 %" in r.warnings[0]


# --- matching ------------------------------------------------------------------------------


def test_one_to_one_matching_new_and_resolved():
    current = np.zeros((10, 10, 30), np.int32)
    prior = np.zeros_like(current)
    current[2:5, 2:5, 2:5] = 1  # overlaps prior 2
    prior[2:5, 2:5, 3:6] = 2
    current[2:5, 2:5, 20:23] = 2  # new: nothing near
    prior[6:9, 6:9, 10:13] = 1  # resolved
    c_centroids = np.array([[3.0, 3.0, 3.0], [40.0, 3.0, 3.0]])
    p_centroids = np.array([[11.0, 7.0, 7.0], [4.0, 3.0, 3.0]])
    pairs = match_lesions(current, prior, c_centroids, p_centroids)
    assert [(p.status, p.current, p.prior) for p in pairs] == [
        (MatchStatus.MATCHED, 1, 2), (MatchStatus.NEW, 2, None), (MatchStatus.RESOLVED, None, 1)]
    assert pairs[0].dice == pytest.approx(2 * 18 / 54)


def test_matching_by_centroid_distance_without_overlap():
    current = np.zeros((5, 5, 5), np.int32)
    prior = np.zeros_like(current)
    current[0, 0, 0] = 1
    prior[4, 4, 4] = 1
    near = match_lesions(current, prior, np.array([[0.0, 0, 0]]), np.array([[MATCH_MAX_CENTROID_MM - 1, 0, 0]]))
    far = match_lesions(current, prior, np.array([[0.0, 0, 0]]), np.array([[MATCH_MAX_CENTROID_MM + 1, 0, 0]]))
    assert [p.status for p in near] == [MatchStatus.MATCHED]
    assert [p.status for p in far] == [MatchStatus.NEW, MatchStatus.RESOLVED]


def test_two_candidates_share_nothing():
    # two current lesions both near one prior lesion: only the nearer matches
    current = np.zeros((5, 5, 5), np.int32)
    prior = np.zeros_like(current)
    pairs = match_lesions(current, prior, np.array([[0.0, 0, 0], [5.0, 0, 0]]), np.array([[4.0, 0, 0]]))
    assert [(p.status, p.current, p.prior) for p in pairs] == [(MatchStatus.MATCHED, 2, 1), (MatchStatus.NEW, 1, None)]
