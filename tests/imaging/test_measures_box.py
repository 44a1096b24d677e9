"""measure_lesions labels and measures within the lesions' bounding box (a whole-body CT grid is
78 M voxels, its lesions' box a few percent): the figures and the label map must be exactly those
of the whole-volume computation it replaced, kept here as the reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.imaging.measures import (
    PEAK_RADIUS_MM,
    _local_peaks,
    _sphere_offsets,
    foreground_box,
    label_boxes,
    measure_lesions,
)

_RANK = {6: 1, 18: 2, 26: 3}


def _whole_volume(mask: np.ndarray, suv: np.ndarray, spacing: tuple[float, float, float], connectivity: int,
                  min_volume_ml: float) -> tuple[list[dict], np.ndarray]:
    """measure_lesions as it was before the box (commit 29f7468): components of the whole volume,
    each lesion's box from find_objects, then numbered by SUVmax."""
    binary = mask != 0
    components, n = ndimage.label(binary, structure=ndimage.generate_binary_structure(3, _RANK[connectivity]))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    offsets = _sphere_offsets(spacing, PEAK_RADIUS_MM)
    found = []
    for label, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        inside = components[box] == label
        voxels = int(inside.sum())
        if voxels * voxel_ml < min_volume_ml:
            continue
        values = suv[box][inside].astype(np.float64)
        candidates = np.argwhere(inside & (suv[box] == values.max())) + np.array([s.start for s in box])
        peaks = _local_peaks(suv, candidates, offsets)
        best = int(np.argmax(peaks))
        found.append((label, {"voxels": voxels, "volume_ml": voxels * voxel_ml, "suv_max": float(values.max()),
                              "suv_mean": float(values.mean()), "suv_peak": float(peaks[best]),
                              "tlg_g": float(values.mean()) * (voxels * voxel_ml),
                              "max_index_zyx": tuple(int(v) for v in candidates[best])}))
    found.sort(key=lambda item: -item[1]["suv_max"])
    relabel = np.zeros(n + 1, dtype=np.int32)
    lesions = []
    for number, (label, lesion) in enumerate(found, start=1):
        relabel[label] = number
        lesions.append({"number": number, **lesion})
    return lesions, relabel[components]


def _case(seed: int, shape: tuple[int, int, int], density: float, levels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Random blobs (some touching the volume's faces) and an SUV volume; `levels`: SUVs drawn from
    that many values, so that lesions tie on SUVmax and voxels tie on the maximum."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), 1.0)
    mask = (field > np.quantile(field, 1.0 - density)) | (rng.random(shape) < density / 20)
    suv = rng.integers(0, levels, shape).astype(np.float32) if levels else rng.gamma(2.0, 2.0, shape).astype(np.float32)
    return mask, suv


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_box_measures_equal_the_whole_volume_computation(seed: int, connectivity: int) -> None:
    shape = ((7, 30, 25), (12, 9, 40), (20, 20, 20))[seed % 3]
    mask, suv = _case(seed, shape, 0.35 if seed % 2 else 0.15, levels=3 if seed < 3 else None)
    for margin in (0, 3):  # the lesions at the faces, then in the middle with background around
        padded_mask = np.pad(mask, margin)
        padded_suv = np.pad(suv, margin, constant_values=1.5)
        spacing = (3.0, 1.5, 0.98)
        min_volume = 0.0 if seed % 2 else 0.01
        study, labels = measure_lesions(padded_mask, padded_suv, spacing, connectivity=connectivity,
                                        min_volume_ml=min_volume)
        expected, expected_labels = _whole_volume(padded_mask, padded_suv, spacing, connectivity, min_volume)
        assert study.lesion_count == len(expected) > 0
        assert [dataclasses.asdict(les) for les in study.lesions] == expected
        assert labels.dtype == expected_labels.dtype == np.int32
        np.testing.assert_array_equal(labels, expected_labels)


def test_box_of_one_lesion_far_from_the_origin() -> None:
    mask = np.zeros((40, 50, 60), dtype=np.uint8)
    mask[30:33, 10:12, 41:45] = 2  # any non-zero label is lesion
    suv = np.ones(mask.shape, dtype=np.float32)
    suv[31, 11, 43] = 9.0
    assert foreground_box(mask != 0) == (slice(30, 33), slice(10, 12), slice(41, 45))
    study, labels = measure_lesions(mask, suv, (2.0, 2.0, 2.0))
    expected, expected_labels = _whole_volume(mask, suv, (2.0, 2.0, 2.0), 18, 0.0)
    assert [dataclasses.asdict(les) for les in study.lesions] == expected
    assert study.lesions[0].max_index_zyx == (31, 11, 43) and study.lesions[0].voxels == 24
    np.testing.assert_array_equal(labels, expected_labels)


def test_box_of_an_empty_mask() -> None:
    mask = np.zeros((3, 4, 5), dtype=bool)
    assert foreground_box(mask) == (slice(0, 0),) * 3
    study, labels = measure_lesions(mask, np.zeros(mask.shape), (1.0, 1.0, 1.0))
    assert study.lesion_count == 0 and labels.shape == mask.shape and labels.dtype == np.int32 and not labels.any()


@pytest.mark.parametrize("seed", range(4))
def test_label_boxes_equal_find_objects_on_the_whole_array(seed: int) -> None:
    """label_boxes (RTSTRUCT, SR) searches within the labels' box: the boxes are scipy's on the
    whole array, for label maps with gaps in the numbering, with and without max_label."""
    mask, suv = _case(seed, ((7, 30, 25), (12, 9, 40), (20, 20, 20), (9, 17, 33))[seed], 0.15, None)
    _, labels = measure_lesions(np.pad(mask, ((2, 1), (0, 3), (4, 0))), np.pad(suv, ((2, 1), (0, 3), (4, 0))),
                                (2.0, 1.0, 1.0))
    labels[labels == 2] = 0  # a number without voxels
    count = int(labels.max())
    for max_label in (None, count, count + 2, 1):
        expected = ndimage.find_objects(labels, max_label=max_label or 0)
        assert label_boxes(labels, max_label) == expected
    assert label_boxes(labels)[1] is None and len(label_boxes(labels)) == count


@pytest.mark.parametrize("labels", [np.zeros((3, 4, 5), np.int32), -np.ones((3, 4, 5), np.int32)])
def test_label_boxes_without_labels(labels: np.ndarray) -> None:
    assert label_boxes(labels) == ndimage.find_objects(labels) == []
    assert label_boxes(labels, 2) == ndimage.find_objects(labels, max_label=2) == [None, None]
