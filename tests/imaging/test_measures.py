"""Lesion measures on small phantoms with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicomnode.imaging.measures import PEAK_RADIUS_MM, measure_lesions


def volume(shape=(11, 11, 11), background=1.0):
    return np.zeros(shape, dtype=np.uint8), np.full(shape, background, dtype=np.float32)


def test_peak_radius_is_that_of_a_one_ml_sphere():
    assert PEAK_RADIUS_MM == pytest.approx(6.2035, abs=1e-4)
    assert 4 / 3 * math.pi * PEAK_RADIUS_MM**3 == pytest.approx(1000.0)


def test_one_voxel_lesion_isotropic():
    mask, suv = volume()
    mask[5, 5, 5] = 1
    suv[5, 5, 5] = 10.0
    study, labels = measure_lesions(mask, suv, (4.0, 4.0, 4.0))
    (lesion,) = study.lesions
    assert lesion.number == 1 and lesion.voxels == 1
    assert lesion.volume_ml == pytest.approx(0.064)  # 4 * 4 * 4 mm^3
    assert lesion.suv_max == 10.0 and lesion.suv_mean == 10.0
    assert lesion.tlg_g == pytest.approx(0.64)
    assert lesion.max_index_zyx == (5, 5, 5)
    # Voxel centres within 6.2035 mm at 4 mm: 4*sqrt(k) <= 6.2035 for k = 0, 1, 2 -> 1 + 6 + 12
    # = 19 voxels, the maximum and 18 background voxels of SUV 1 (outside the lesion, counted).
    assert lesion.suv_peak == pytest.approx((10.0 + 18 * 1.0) / 19)
    assert study.lesion_count == 1 and study.connectivity == 18
    assert np.array_equal(labels, mask.astype(np.int32))


def test_suv_peak_with_anisotropic_spacing():
    mask, suv = volume()
    mask[5, 5, 5] = 1
    suv[5, 5, 5] = 10.0
    study, _ = measure_lesions(mask, suv, (5.0, 2.0, 2.0))
    # dz = 0: (2dy)^2 + (2dx)^2 <= 38.48 -> dy^2 + dx^2 <= 9: 29 lattice points;
    # dz = +-1: 25 + 4 (dy^2 + dx^2) <= 38.48 -> dy^2 + dx^2 <= 3: 9 points each; |dz| = 2: 10 mm.
    # 29 + 2 * 9 = 47 voxels: the maximum and 46 background voxels.
    assert study.lesions[0].suv_peak == pytest.approx((10.0 + 46) / 47)
    assert study.lesions[0].volume_ml == pytest.approx(0.020)


def test_suv_peak_is_clipped_to_the_image():
    mask, suv = volume((3, 3, 3), background=2.0)
    mask[0, 0, 0] = 1
    suv[0, 0, 0] = 8.0
    study, _ = measure_lesions(mask, suv, (4.0, 4.0, 4.0))
    # in the image's corner only offsets >= 0 exist: k = 0, 1, 2 -> 1 + 3 + 3 = 7 voxels
    assert study.lesions[0].suv_peak == pytest.approx((8.0 + 6 * 2.0) / 7)


def test_uniform_sphere_peak_equals_its_value():
    mask, suv = volume((21, 21, 21))
    zz, yy, xx = np.indices(mask.shape)
    sphere = ((zz - 10) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2) * 2.0**2 <= 10.0**2  # radius 10 mm
    mask[sphere] = 1
    suv[sphere] = 5.0
    study, _ = measure_lesions(mask, suv, (2.0, 2.0, 2.0))
    (lesion,) = study.lesions
    assert lesion.suv_max == 5.0 and lesion.suv_mean == 5.0
    assert lesion.suv_peak == pytest.approx(5.0)  # every voxel within 6.2 mm of the centre is inside
    # every lesion voxel shares the maximum: the peak is the highest over all of them (IBSI), so
    # an edge voxel (whose sphere reaches the background) is not chosen
    z, y, x = lesion.max_index_zyx
    assert sphere[z, y, x] and ((z - 10) ** 2 + (y - 10) ** 2 + (x - 10) ** 2) * 4.0 < 10.0**2 - 36
    assert lesion.voxels == int(sphere.sum())


@pytest.mark.parametrize(
    "second, expected",
    [
        ((2, 3, 3), {6: 2, 18: 1, 26: 1}),  # shares an edge with (2, 2, 2)
        ((3, 3, 3), {6: 2, 18: 2, 26: 1}),  # shares a corner only
        ((2, 2, 3), {6: 1, 18: 1, 26: 1}),  # shares a face
    ],
)
def test_connectivity(second, expected):
    mask, suv = volume((6, 6, 6))
    mask[2, 2, 2] = 1
    mask[second] = 1
    for connectivity, count in expected.items():
        study, labels = measure_lesions(mask, suv, (1.0, 1.0, 1.0), connectivity=connectivity)
        assert study.lesion_count == count, connectivity
        assert labels.max() == count and study.connectivity == connectivity


def test_default_connectivity_is_18():
    mask, suv = volume((6, 6, 6))
    mask[2, 2, 2] = mask[2, 3, 3] = 1
    assert measure_lesions(mask, suv, (1.0, 1.0, 1.0))[0].lesion_count == 1
    mask[2, 3, 3] = 0
    mask[3, 3, 3] = 1
    assert measure_lesions(mask, suv, (1.0, 1.0, 1.0))[0].lesion_count == 2


def test_mtv_tlg_and_order_by_suv_max():
    mask, suv = volume((10, 10, 10))
    # lesion A (first in C order): 2x2x2 block, SUV 1..8, mean 4.5
    mask[1:3, 1:3, 1:3] = 1
    suv[1:3, 1:3, 1:3] = np.arange(1, 9, dtype=np.float32).reshape(2, 2, 2)
    # lesion B: 1x1x3 bar, SUV 10, 12, 14, mean 12
    mask[7, 7, 5:8] = 1
    suv[7, 7, 5:8] = [10.0, 12.0, 14.0]
    study, labels = measure_lesions(mask, suv, (2.0, 3.0, 4.0))  # 24 mm^3 = 0.024 ml per voxel
    first, second = study.lesions
    assert (first.number, first.voxels, first.suv_max, first.max_index_zyx) == (1, 3, 14.0, (7, 7, 7))
    assert first.suv_mean == pytest.approx(12.0)
    assert first.volume_ml == pytest.approx(0.072)
    assert first.tlg_g == pytest.approx(12.0 * 0.072)
    assert (second.number, second.voxels, second.suv_max, second.max_index_zyx) == (2, 8, 8.0, (2, 2, 2))
    assert second.suv_mean == pytest.approx(4.5)
    assert second.volume_ml == pytest.approx(0.192)
    assert second.tlg_g == pytest.approx(0.864)
    assert study.total_mtv_ml == pytest.approx(0.264)
    assert study.total_tlg_g == pytest.approx(0.864 + 0.864)
    assert set(np.unique(labels)) == {0, 1, 2}
    assert (labels[7, 7, 5:8] == 1).all() and (labels[1:3, 1:3, 1:3] == 2).all()
    assert labels.dtype == np.int32


def test_min_volume_filter():
    mask, suv = volume((10, 10, 10))
    mask[1, 1, 1] = 1  # 0.024 ml
    suv[1, 1, 1] = 20.0
    mask[5:7, 5:7, 5:7] = 1  # 0.192 ml
    suv[5:7, 5:7, 5:7] = 3.0
    spacing = (2.0, 3.0, 4.0)
    assert measure_lesions(mask, suv, spacing)[0].lesion_count == 2  # off by default
    study, labels = measure_lesions(mask, suv, spacing, min_volume_ml=0.1)
    (lesion,) = study.lesions
    assert (lesion.number, lesion.voxels, lesion.suv_max) == (1, 8, 3.0)
    assert study.total_mtv_ml == pytest.approx(0.192) and study.total_tlg_g == pytest.approx(0.576)
    assert study.min_volume_ml == 0.1
    assert labels[1, 1, 1] == 0 and (labels[5:7, 5:7, 5:7] == 1).all()
    # a lesion exactly at the threshold is kept
    assert measure_lesions(mask, suv, spacing, min_volume_ml=0.192)[0].lesion_count == 1


def test_empty_mask():
    mask, suv = volume()
    study, labels = measure_lesions(mask, suv, (2.0, 2.0, 2.0))
    assert study.lesions == () and study.lesion_count == 0
    assert study.total_mtv_ml == 0.0 and study.total_tlg_g == 0.0
    assert labels.shape == mask.shape and not labels.any()


def test_bool_mask_and_labels_as_mask():
    mask, suv = volume((6, 6, 6))
    labels_in = np.zeros((6, 6, 6), dtype=np.int16)
    labels_in[1, 1, 1] = 3  # any non-zero value is lesion
    study, _ = measure_lesions(labels_in, suv, (1.0, 1.0, 1.0))
    assert study.lesion_count == 1
    assert measure_lesions(labels_in > 0, suv, (1.0, 1.0, 1.0))[0].lesion_count == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(connectivity=8), "connectivity"),
        (dict(min_volume_ml=-1.0), "min_volume_ml"),
        (dict(spacing_zyx=(1.0, 0.0, 1.0)), "spacing"),
        (dict(spacing_zyx=(1.0, 1.0)), "spacing"),
        (dict(suv=np.ones((5, 6, 6), np.float32)), "shape"),
    ],
)
def test_bad_inputs(kwargs, message):
    mask, suv = volume((6, 6, 6))
    args = dict(mask=mask, suv=suv, spacing_zyx=(1.0, 1.0, 1.0)) | kwargs
    with pytest.raises(ValueError, match=message):
        measure_lesions(**args)


def test_non_finite_suv_in_a_lesion_is_refused():
    mask, suv = volume((6, 6, 6))
    mask[1, 1, 1] = 1
    suv[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        measure_lesions(mask, suv, (1.0, 1.0, 1.0))


def test_equal_maxima_take_the_highest_peak():
    mask, suv = volume((11, 11, 11))
    mask[5, 5, 2:7] = 1
    suv[5, 5, 2:7] = [10.0, 2.0, 2.0, 2.0, 10.0]
    suv[5, 5, 7] = 9.0  # outside the lesion, next to the second maximum: raises its local peak
    study, _ = measure_lesions(mask, suv, (4.0, 4.0, 4.0))
    (lesion,) = study.lesions
    assert lesion.max_index_zyx == (5, 5, 6)  # not (5, 5, 2), the first in C order
    # 19 voxels around (5, 5, 6): itself 10, (5, 5, 5) 2, (5, 5, 7) 9, 16 background voxels of 1
    assert lesion.suv_peak == pytest.approx((10.0 + 2.0 + 9.0 + 16) / 19)


def test_sphere_peaks_find_the_hottest_sphere_not_the_hottest_voxel():
    from dicomnode.imaging.measures import sphere_peaks

    suv = np.ones((20, 20, 20), np.float32)
    labels = np.zeros((20, 20, 20), np.int32)
    labels[2:18, 2:18, 2:18] = 1
    suv[4, 4, 4] = 50.0  # one hot voxel: the IBSI local peak centres on it
    suv[9:16, 9:16, 9:16] = 8.0  # a hot region holding a whole sphere: the sphere's best place
    measures, numbered = measure_lesions(labels, suv, (2.0, 2.0, 2.0))
    ((peak, centre),) = sphere_peaks(suv, numbered, (2.0, 2.0, 2.0), 1)
    assert peak == pytest.approx(8.0) and centre == (12, 12, 12)
    assert measures.lesions[0].suv_peak < peak  # the sphere around the 50 voxel averages lower
