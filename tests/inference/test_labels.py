"""inference.labels: what each value of a model's label map means, plain and region-based, checked
against what nnU-Net's own LabelManager writes into the map."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from inference.check import check_model_folder
from inference.labels import LabelsError, output_labels

REPO = Path(__file__).resolve().parents[2]
GLIOMA = REPO / "models" / "glioma-mr"

BRATS = {"labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3},
         "regions_class_order": [1, 2, 3]}


def test_plain_labels_are_read_as_they_are_and_the_ignore_label_is_left_out():
    dataset = {"labels": {"background": 0, "liver": 1, "spleen": 2, "ignore": 3}}
    assert output_labels(dataset) == {"background": 0, "liver": 1, "spleen": 2}


def test_region_values_are_named_for_their_region_less_the_later_ones():
    assert output_labels(BRATS) == {"background": 0, "whole tumor without tumor core": 1,
                                    "tumor core without enhancing tumor": 2, "enhancing tumor": 3}


def test_region_names_match_the_voxels_nnunet_writes():
    """Nested spheres of region probability, turned into a label map by nnU-Net's LabelManager:
    each value's voxels are its region's sphere less the later region's, as its name says."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    zz, yy, xx = np.mgrid[:24, :24, :24]
    radius = np.sqrt((zz - 12) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2)
    spheres = {"whole tumor": radius < 10, "tumor core": radius < 6, "enhancing tumor": radius < 3}
    probabilities = np.stack([s.astype(np.float32) for s in spheres.values()])
    manager = LabelManager(BRATS["labels"], BRATS["regions_class_order"])
    label_map = manager.convert_probabilities_to_segmentation(probabilities)
    expected = {"whole tumor without tumor core": spheres["whole tumor"] & ~spheres["tumor core"],
                "tumor core without enhancing tumor": spheres["tumor core"] & ~spheres["enhancing tumor"],
                "enhancing tumor": spheres["enhancing tumor"]}
    for name, value in output_labels(BRATS).items():
        if value:
            assert np.array_equal(label_map == value, expected[name]), name
    assert expected["enhancing tumor"].sum() > 0 and expected["whole tumor without tumor core"].sum() > 0


def test_region_order_other_than_the_label_order_gives_the_listed_values():
    dataset = {"labels": {"background": 0, "tumour": [1, 2, 3], "core": [1, 3], "enhancing": [3]},
               "regions_class_order": [2, 1, 3]}
    assert output_labels(dataset) == {"background": 0, "tumour without core": 2, "core without enhancing": 1,
                                      "enhancing": 3}


def test_disjoint_regions_keep_their_names():
    dataset = {"labels": {"background": 0, "left": [1, 2], "right": [3, 4]}, "regions_class_order": [1, 3]}
    assert output_labels(dataset) == {"background": 0, "left": 1, "right": 3}


@pytest.mark.parametrize(
    ("dataset", "reason"),
    [
        ({}, "dataset.json has no labels"),
        ({"labels": {"background": 0, "a": [1, 2], "b": 2}}, "2 regions (a, b) but regions_class_order is None"),
        (
            {"labels": {"background": 0, "a": [1, 2], "b": 2}, "regions_class_order": [1]},
            "it needs one label value per region",
        ),
        (
            {"labels": {"background": 0, "a": [1, 2], "b": 2}, "regions_class_order": [2, 2]},
            "must be distinct and above 0",
        ),
        ({"labels": {"background": 0, "a": "one"}}, "label 'a': 'one' is not a label value"),
    ],
)
def test_unreadable_labels_say_why(dataset, reason):
    with pytest.raises(LabelsError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        output_labels(dataset)


needs_glioma = pytest.mark.skipif(
    not (GLIOMA / "fold_0" / "checkpoint_final.pth").is_file(),
    reason="models/glioma-mr not built (make registry-models)",
)


@pytest.fixture
def region_model(tmp_path: Path) -> Path:
    """The glioma stand-in turned region-based: three sigmoid heads (the foreground classes' output
    weights) for tumour, core and enhancing, written back in BraTS order 2, 1, 3."""
    import torch

    folder = tmp_path / "glioma-regions"
    shutil.copytree(GLIOMA, folder)
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "tumour": [1, 2, 3], "core": [1, 3], "enhancing": [3]}
    dataset["regions_class_order"] = [2, 1, 3]
    (folder / "dataset.json").write_text(json.dumps(dataset))
    checkpoint_file = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    weights = checkpoint["network_weights"]
    for key in [k for k in weights if k.startswith("decoder.seg_layers.")]:
        weights[key] = weights[key][1:].clone()
    torch.save(checkpoint, checkpoint_file)
    return folder


@needs_glioma
def test_region_based_model_loads_and_its_map_holds_the_region_values(region_model: Path):
    from inference.model import SegmentationModel

    assert check_model_folder(region_model, folds=(0,), n_inputs=4) == []
    model = SegmentationModel(region_model, folds=(0,), device="cpu", use_mirroring=False)
    assert model.labels == {"background": 0, "tumour without core": 2, "core without enhancing": 1, "enhancing": 3}
    rng = np.random.default_rng(0)
    label_map = model.predict(rng.normal(size=(4, 16, 32, 32)).astype(np.float32), model.model_spacing)
    assert label_map.shape == (16, 32, 32) and set(np.unique(label_map)) <= {0, 1, 2, 3}


@needs_glioma
def test_region_order_that_does_not_fit_the_regions_is_a_folder_problem(region_model: Path):
    dataset = json.loads((region_model / "dataset.json").read_text())
    dataset["regions_class_order"] = [1, 2]
    (region_model / "dataset.json").write_text(json.dumps(dataset))
    [problem] = check_model_folder(region_model, folds=(0,), n_inputs=4)
    assert problem.item == "dataset.json"
    assert problem.reason == (
        "has 3 regions (tumour, core, enhancing) but regions_class_order is [1, 2]: it needs one label value per region"
    )
