"""Multi-label SEG: one segment per label with its codes (label_codes.json, config, lesion
default), absent labels as empty segments; per-segment volumes and their TID 1500 SR."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from dicomnode.config import LabelCode, ModelSettings
from dicomnode.imaging.measures import measure_segments
from dicomnode.imaging.volumes import load_series
from dicomnode.results.common import Provenance, ResultError, write_dicom
from dicomnode.results.labelcodes import LESION, LabelCodesError, label_codes
from dicomnode.results.seg import build_seg
from dicomnode.results.segment_sr import build_segment_sr
from dicomnode.synth.registry import write_registry_study

from tests.support.dicomtools import dciodvfy_errors

ANATOMY = ["123037004", "SCT", "Anatomical Structure"]
ORGAN_TYPES = {"spleen": ["78961009", "SCT", "Spleen"], "kidney_right": ["9846003", "SCT", "Right kidney"],
               "kidney_left": ["18639004", "SCT", "Left kidney"], "gallbladder": ["28231008", "SCT", "Gallbladder"],
               "liver": ["10200004", "SCT", "Liver"], "stomach": ["69695003", "SCT", "Stomach"],
               "aorta": ["15825003", "SCT", "Aorta"]}


@pytest.fixture(scope="module")
def organs(tmp_path_factory):
    study = write_registry_study(tmp_path_factory.mktemp("organs"), "organs", seed=1000)
    return study, load_series(study.files["Abdomen 3.0 Br40 portal venous"])


@pytest.fixture(scope="module")
def codes(organs):
    study, _ = organs
    return {v: LabelCode(name=n, category=ANATOMY, type=ORGAN_TYPES[n]) for v, n in study.case.label_names.items()}


@pytest.fixture(scope="module")
def organ_seg(organs, codes, tmp_path_factory):
    study, ct = organs
    labels = study.case.labels.copy()
    labels[labels == 4] = 0  # no gallbladder found
    seg = build_seg(labels, ct.datasets, model_name="organs-ct", model_version="1", folds=[0], series_number=901,
                    series_description="organs", segments=codes)
    return labels, write_dicom(seg, tmp_path_factory.mktemp("seg") / "seg.dcm")


@pytest.mark.e2e
def test_each_label_is_a_segment_with_its_codes(organ_seg, codes):
    _, path = organ_seg
    assert dciodvfy_errors(path) == []
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY" and len(seg.SegmentSequence) == len(codes)
    for number, (value, code) in enumerate(codes.items(), start=1):
        item = seg.get_segment_description(number)
        assert item.segment_label == code.name and item.tracking_id == code.name
        assert (item.segmented_property_category.value, item.segmented_property_category.scheme_designator) == (
            "123037004",
            "SCT",
        )
        assert (item.segmented_property_type.value, item.segmented_property_type.meaning) == (
            code.type.value,
            code.type.meaning,
        )


def test_voxels_round_trip_and_absent_label_is_an_empty_segment(organ_seg, organs):
    labels, path = organ_seg
    _, ct = organs
    seg = hd.seg.segread(path)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in ct.datasets], assert_missing_frames_are_empty=True
    )
    assert pixels.shape == (*labels.shape, 7)
    for number in range(1, 8):  # label values 1..7 are segments 1..7
        np.testing.assert_array_equal(pixels[..., number - 1], labels == number)
    assert not pixels[..., 3].any()  # gallbladder: described, every frame empty
    assert int(dcmread(path, stop_before_pixels=True).NumberOfFrames) == 7 * labels.shape[0]


def test_label_without_segment_is_refused(organs, codes):
    study, ct = organs
    with pytest.raises(ResultError, match=r"label value \[5\] in the label map has no segment"):
        build_seg(
            study.case.labels,
            ct.datasets,
            model_name="m",
            model_version="1",
            folds=[0],
            series_number=901,
            series_description="x",
            segments={v: c for v, c in codes.items() if v != 5},
        )


def test_binary_model_keeps_the_lesion_segment(organs):
    """Without `segments`: one "lesion" segment of every non-zero voxel, as before."""
    study, ct = organs
    seg = build_seg(
        study.case.labels,
        ct.datasets,
        model_name="m",
        model_version="1",
        folds=[0],
        series_number=901,
        series_description="x",
    )
    [item] = seg.SegmentSequence
    assert item.SegmentLabel == "lesion" and item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"


# --- where the codes come from ------------------------------------------------------------------------


def _settings(folder: Path, **kwargs) -> ModelSettings:
    return ModelSettings(name="m", path=folder, channels=["CT"], **kwargs)


def test_codes_from_the_model_folder_and_config_overrides(tmp_path: Path):
    table = {
        "1": {"name": "spleen", "category": ANATOMY, "type": ORGAN_TYPES["spleen"]},
        "2": {"name": "liver", "category": ANATOMY, "type": ORGAN_TYPES["liver"]},
    }
    (tmp_path / "label_codes.json").write_text(json.dumps(table))
    labels = {"background": 0, "spleen": 1, "liver": 2}
    found = label_codes(_settings(tmp_path), labels)
    assert [(v, c.name, c.type.value) for v, c in found.items()] == [
        (1, "spleen", "78961009"),
        (2, "liver", "10200004"),
    ]
    override = LabelCode(name="hepar", category=ANATOMY, type=ORGAN_TYPES["liver"])
    assert label_codes(_settings(tmp_path, label_codes={2: override}), labels)[2].name == "hepar"


def test_binary_model_defaults_to_lesion_codes(tmp_path: Path):
    [(value, code)] = label_codes(_settings(tmp_path), {"background": 0, "lymph_node": 1}).items()
    assert value == 1 and code.name == "lymph_node" and code.type == LESION.type


def test_uncoded_labels_are_named(tmp_path: Path):
    with pytest.raises(LabelCodesError, match=r"no code for labels 1 \(spleen\), 2 \(liver\)"):
        label_codes(_settings(tmp_path), {"background": 0, "spleen": 1, "liver": 2})
    (tmp_path / "label_codes.json").write_text('{"1": {"name": "spleen", "category": ["1", "SCT"]}}')
    with pytest.raises(LabelCodesError, match=r"label_codes.json: label 1\.category"):
        label_codes(_settings(tmp_path), {"background": 0, "spleen": 1})


# --- volumes and their SR -----------------------------------------------------------------------------


def test_segment_volumes_and_components(organ_seg, organs, codes):
    labels, _ = organ_seg
    _, ct = organs
    measures = measure_segments(labels, ct.spacing, {v: c.name for v, c in codes.items()})
    voxel_ml = np.prod(ct.spacing) / 1000.0
    assert [m.label for m in measures] == list(range(1, 8))
    for m in measures:
        assert m.voxels == int((labels == m.label).sum()) and m.volume_ml == pytest.approx(m.voxels * voxel_ml)
    gallbladder = measures[3]
    assert (gallbladder.voxels, gallbladder.volume_ml, gallbladder.components) == (0, 0.0, 0)
    two = labels.copy()
    two[two == 5] = 0
    two[10:13, 10:13, 10:13] = two[30:33, 60:63, 10:13] = 5  # two separate blocks of 27 voxels
    liver = measure_segments(two, ct.spacing, {5: "liver"})[0]
    assert (liver.voxels, liver.components) == (54, 2)


@pytest.mark.e2e
def test_volume_sr(organ_seg, organs, codes, tmp_path: Path):
    labels, seg_path = organ_seg
    _, ct = organs
    seg = dcmread(seg_path)
    measures = measure_segments(labels, ct.spacing, {v: c.name for v, c in codes.items()})
    sr = build_segment_sr(
        measures,
        seg,
        ct.datasets,
        segment_codes=codes,
        model_name="organs-ct",
        model_version="1",
        series_number=951,
        series_description="organ volumes",
        provenance=Provenance({"folds": "0", "weights": "sha256:0123456789ab"}, "", "Not for diagnostic use"),
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    # AIR content (README): the disclaimer as the report's last Comment, the processing equipment
    last = sr.ContentSequence[-1]
    assert (last.ConceptNameCodeSequence[0].CodeValue, last.TextValue) == ("121106", "Not for diagnostic use")
    assert sr.ContributingEquipmentSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert "weights sha256:0123456789ab" in sr.ContributingEquipmentSequence[0].ContributionDescription
    report = hd.sr.srread(path)
    assert report.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 7
    for group, m in zip(groups, measures):
        assert group.tracking_identifier == m.name and group.finding_type.value == codes[m.label].type.value
        [volume] = group.get_measurements()
        assert volume.name.value == "118565006" and volume.unit.value == "ml"
        assert volume.value == pytest.approx(m.volume_ml, rel=1e-6)
        segment = group.referenced_segment
        assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID and segment.referenced_segment_numbers == [
            m.label
        ]
