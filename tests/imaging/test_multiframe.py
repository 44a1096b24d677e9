"""Enhanced multi-frame images: the synthetic single-frame PET/CT converted by highdicom.legacy
(Legacy Converted Enhanced PET / CT) gives the same volumes voxel for voxel, the same SUV, and
series selection gives the same verdicts (complete, a frame missing, a part still arriving,
dynamic)."""

from __future__ import annotations

import copy
import time

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.config import InputSpec
from dicomnode.imaging.frames import frame_headers
from dicomnode.imaging.headers import SeriesFacts, facts_from_dataset, group_series, series_from_paths
from dicomnode.imaging.suv import pet_suv_volume, series_factors
from dicomnode.imaging.volumes import load_series
from dicomnode.pipeline.selection import IGNORED, USED, WAITING, select_inputs

from tests.support.multiframe import convert_series


@pytest.fixture(scope="module")
def converted(synth_study, tmp_path_factory):
    """The synthetic study's PET and CT, each one Legacy Converted Enhanced instance; the PET also
    as a concatenation of two instances."""
    root = tmp_path_factory.mktemp("multiframe")
    return {
        "PT": convert_series(synth_study.pt_files, root / "one"),
        "CT": convert_series(synth_study.ct_files, root / "one"),
        "PT split": convert_series(synth_study.pt_files, root / "split", parts=2, concatenation=True),
    }


@pytest.mark.parametrize("modality", ["PT", "CT"])
def test_one_instance_is_the_same_volume_voxel_for_voxel(synth_study, converted, modality):
    single_files = synth_study.pt_files if modality == "PT" else synth_study.ct_files
    started = time.perf_counter()
    single = load_series(single_files)
    single_s = time.perf_counter() - started
    started = time.perf_counter()
    multi = load_series(converted[modality])
    multi_s = time.perf_counter() - started
    print(f"{modality}: {len(single_files)} files {single_s * 1000:.0f} ms, "
          f"1 multi-frame instance {multi_s * 1000:.0f} ms")
    assert multi.shape == single.shape == (64, *single.shape[1:])
    np.testing.assert_array_equal(multi.array, single.array)
    assert (multi.spacing, multi.origin, multi.direction) == (single.spacing, single.origin, single.direction)
    assert (multi.series_instance_uid, multi.frame_of_reference_uid, multi.modality) == (
        single.series_instance_uid, single.frame_of_reference_uid, single.modality)
    # one header per frame, in slice order, each saying which frame of which instance it is
    [instance_uid] = {str(ds.SOPInstanceUID) for ds in multi.datasets}
    assert instance_uid == str(pydicom.dcmread(converted[modality][0], stop_before_pixels=True).SOPInstanceUID)
    assert sorted(ds.frame_number for ds in multi.datasets) == list(range(1, 65))
    assert [list(ds.ImagePositionPatient) for ds in multi.datasets] == [
        list(ds.ImagePositionPatient) for ds in single.datasets]


@pytest.mark.parametrize("modality", ["PT", "CT"])
def test_highdicoms_own_volume_agrees(converted, modality):
    """highdicom's get_volume() of the same instance (its own geometry and rescale) gives the
    same voxels, ordered along its slice axis."""
    ours = load_series(converted[modality])
    theirs = hd.imread(converted[modality][0]).get_volume(dtype=np.float64)
    array = theirs.array.astype(np.float32)
    if theirs.affine[2, 0] < 0:  # highdicom stacks from the top: flip to increasing z
        array = array[::-1]
    np.testing.assert_array_equal(array, ours.array)


def test_suv_is_the_same(synth_study, converted):
    single = load_series(synth_study.pt_files)
    multi = load_series(converted["PT"])
    suv_single, suv_multi = pet_suv_volume(single), pet_suv_volume(multi)
    difference = np.abs(suv_multi - suv_single)
    print(f"SUV max {suv_single.max():.4f} vs {suv_multi.max():.4f}, mean {suv_single.mean():.6f} vs "
          f"{suv_multi.mean():.6f}, largest voxel difference {difference.max():g}")
    assert difference.max() == 0.0
    factors_single = series_factors(single.datasets)
    factors_multi = series_factors(multi.datasets)
    assert [f.factor for f in factors_multi] == [f.factor for f in factors_single]
    assert factors_multi[0].attributes == factors_single[0].attributes


def test_series_split_over_two_instances(synth_study, converted):
    single = load_series(synth_study.pt_files)
    split = load_series(converted["PT split"])
    np.testing.assert_array_equal(split.array, single.array)
    assert split.spacing == single.spacing and split.origin == single.origin
    assert len({str(ds.SOPInstanceUID) for ds in split.datasets}) == 2
    np.testing.assert_array_equal(pet_suv_volume(split), pet_suv_volume(single))


def _enhanced_pet_form(path, tmp_path) -> Dataset:
    """The converted PET as an Enhanced PET has it: no Units or DecayCorrection, the unit in a
    Real World Value Map (UCUM Bq/ml), DecayCorrected YES with the DecayCorrectionDateTime."""
    ds = pydicom.dcmread(path)
    unassigned = ds.SharedFunctionalGroupsSequence[0].UnassignedSharedConvertedAttributesSequence[0]
    del unassigned.Units
    del unassigned.DecayCorrection
    unit = Dataset()
    unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "Bq/ml", "UCUM", "Becquerels/milliliter"
    mapping = Dataset()
    mapping.MeasurementUnitsCodeSequence = [unit]
    mapping.RealWorldValueFirstValueMapped, mapping.RealWorldValueLastValueMapped = 0, 32767
    mapping.RealWorldValueSlope, mapping.RealWorldValueIntercept = 1.0, 0.0
    mapping.LUTLabel, mapping.LUTExplanation = "BQML", "Bq/ml"
    ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence = [mapping]
    ds.DecayCorrected = "YES"
    ds.DecayCorrectionDateTime = f"{ds.SeriesDate}{ds.SeriesTime}"
    out = tmp_path / "enhanced-pet.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def test_enhanced_pet_units_and_decay_correction(synth_study, converted, tmp_path):
    path = _enhanced_pet_form(converted["PT"][0], tmp_path)
    frame = frame_headers(pydicom.dcmread(path, stop_before_pixels=True), [1])[0]
    assert (frame.Units, frame.DecayCorrection) == ("BQML", "START")
    factor = series_factors([frame])[0]
    assert factor.attributes["DecayReferenceFrom"] == "DecayCorrectionDateTime"
    np.testing.assert_array_equal(pet_suv_volume(load_series([path])),
                                  pet_suv_volume(load_series(synth_study.pt_files)))


# --- selection --------------------------------------------------------------------------------


def _verdicts(files) -> dict[str, object]:
    studies, unreadable = series_from_paths(files)
    assert not unreadable
    [(_, series)] = studies.items()
    selection = select_inputs(series, ["CT", "PET"], InputSpec())
    return {v.modality: v for v in selection.verdicts}, selection


def test_multiframe_series_are_selected(converted):
    verdicts, selection = _verdicts(converted["PT"] + converted["CT"])
    assert selection.ready
    assert (verdicts["PT"].state, verdicts["CT"].state) == (USED, USED)
    assert "1 instance (64 frames)" in verdicts["PT"].label
    facts = facts_from_dataset(pydicom.dcmread(converted["PT"][0], stop_before_pixels=True))
    assert facts.time_frames == 1 and facts.frames == 64  # 64 spatial frames are not a dynamic series


def test_part_of_a_concatenation_missing_waits(converted):
    first, second = converted["PT split"]
    verdicts, selection = _verdicts([first, *converted["CT"]])
    assert verdicts["PT"].state == WAITING and not selection.ready
    assert "has 1 of 2 instances of concatenation" in verdicts["PT"].text
    verdicts, selection = _verdicts([first, second, *converted["CT"]])
    assert verdicts["PT"].state == USED and selection.ready
    assert "2 instances (64 frames)" in verdicts["PT"].label


def test_frame_missing_gets_the_single_frame_verdict(synth_study, tmp_path):
    """A slice left out of the conversion: the multi-frame CT is refused for the gap with the
    single-frame series' words; a multi-frame PET that says NumberOfSlices waits for the frame."""
    ct_multi = convert_series(synth_study.ct_files, tmp_path / "ct", drop=30)
    ct_single = sorted(synth_study.ct_files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    del ct_single[30]
    pet = convert_series(synth_study.pt_files, tmp_path / "pt")
    multi, _ = _verdicts([*ct_multi, *pet])
    single, _ = _verdicts([*ct_single, *pet])
    assert multi["CT"].state == single["CT"].state == IGNORED
    assert multi["CT"].reasons == single["CT"].reasons
    assert "1 slice(s) missing" in multi["CT"].text

    pet_multi = convert_series(synth_study.pt_files, tmp_path / "pt-gap", drop=30)
    ds = pydicom.dcmread(pet_multi[0])
    ds.SharedFunctionalGroupsSequence[0].UnassignedSharedConvertedAttributesSequence[0].NumberOfSlices = 64
    ds.save_as(pet_multi[0], enforce_file_format=True)
    verdicts, selection = _verdicts([*pet_multi, *convert_series(synth_study.ct_files, tmp_path / "ct-whole")])
    assert verdicts["PT"].state == WAITING and not selection.ready
    assert "63 of 64 frames (NumberOfSlices): still arriving" in verdicts["PT"].text


def test_dynamic_multiframe_pet_is_refused(converted):
    ds = pydicom.dcmread(converted["PT"][0], stop_before_pixels=True)
    dynamic = copy.deepcopy(ds)
    for k, item in enumerate(dynamic.PerFrameFunctionalGroupsSequence):
        item.FrameContentSequence[0].TemporalPositionIndex = 1 + k % 2
    facts = facts_from_dataset(dynamic, "dynamic.dcm")
    assert facts.time_frames == 2
    [series] = group_series([facts])
    selection = select_inputs([series], ["PET"], InputSpec())
    [verdict] = selection.verdicts
    assert verdict.state == IGNORED and "not static: 2 time slices/slots/frames" in verdict.text
    assert isinstance(series, SeriesFacts)
