"""inference.check on broken copies of the stand-in model folders: each problem named with its reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from inference.check import check_model_folder, dry_run

REPO = Path(__file__).resolve().parents[2]
LYMPH = REPO / "models" / "lymph-ct"
ORGANS = REPO / "models" / "organs-ct"
ORGANS_RUN = ORGANS / "Dataset090_Organs" / "STUNetTrainer__nnUNetPlans__3d_fullres"

pytestmark = pytest.mark.skipif(not (LYMPH / "fold_0" / "checkpoint_final.pth").is_file(),
                                reason="models/lymph-ct not built (make registry-models)")
needs_organs = pytest.mark.skipif(not (ORGANS_RUN / "fold_0" / "checkpoint_final.pth").is_file(),
                                  reason="models/organs-ct not built (make registry-models)")


@pytest.fixture
def lymph_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "lymph-ct"
    shutil.copytree(LYMPH, copy)
    return copy


def _items(problems) -> dict[str, str]:
    return {p.item: p.reason for p in problems}


@needs_organs
def test_intact_folders_have_no_problems():
    assert check_model_folder(LYMPH, folds=(0,), n_inputs=1) == []
    assert check_model_folder(ORGANS, folds=(0,), n_inputs=1) == []


def test_missing_fold_is_named(lymph_copy):
    problems = _items(check_model_folder(lymph_copy, folds=(0, 3), n_inputs=1))
    assert list(problems) == ["fold 3"]
    assert "missing fold_3/checkpoint_final.pth" in problems["fold 3"]


def test_damaged_checkpoint_is_named(lymph_copy):
    (lymph_copy / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    problems = _items(check_model_folder(lymph_copy, folds=(0,)))
    assert list(problems) == ["fold 0"] and "cannot be loaded" in problems["fold 0"]


def test_wrong_channel_count_is_named(lymph_copy):
    problems = _items(check_model_folder(lymph_copy, folds=(0,), n_inputs=2))
    assert problems == {"channels": "the model takes 1 channels ['CT'], the configuration gives 2"}


def test_unknown_trainer_class_is_named_with_where_it_was_looked_for(lymph_copy):
    (lymph_copy / "nnUNetTrainer_DGST.py").unlink()
    problems = _items(check_model_folder(lymph_copy, folds=(0,), n_inputs=1))
    assert list(problems) == ["trainer"]
    reason = problems["trainer"]
    assert "'nnUNetTrainer_DGST' not found" in reason
    assert "the model folder (it has no .py files)" in reason and "nnunetv2" in reason


def test_configuration_missing_from_plans_is_named(lymph_copy):
    plans = json.loads((lymph_copy / "plans.json").read_text())
    del plans["configurations"]["3d_fullres"]
    (lymph_copy / "plans.json").write_text(json.dumps(plans))
    problems = _items(check_model_folder(lymph_copy, folds=(0,)))
    left = sorted(plans["configurations"])
    assert problems == {"configuration": f"'3d_fullres' is not in plans.json (it has {left})"}


@needs_organs
def test_missing_plan_files_and_unknown_results_choice_are_named(lymph_copy, tmp_path):
    (lymph_copy / "plans.json").unlink()
    problems = _items(check_model_folder(lymph_copy, folds=(0,)))
    assert list(problems) == ["layout"] and "no dataset.json and plans.json" in problems["layout"]
    problems = _items(check_model_folder(ORGANS, folds=(0,), trainer="nnUNetTrainerNoMirroring"))
    assert "no trained model matches trainer = 'nnUNetTrainerNoMirroring'" in problems["layout"]
    assert "STUNetTrainer__nnUNetPlans__3d_fullres" in problems["layout"]


def test_dry_run_runs_every_fold_on_a_small_array():
    from inference import SegmentationModel

    model = SegmentationModel(LYMPH, folds=(0,), device="cpu")
    result = dry_run(model, shape=(16, 24, 24))
    assert result.shape == (16, 24, 24) and result.seconds > 0
    assert set(result.label_values) <= set(model.labels.values())
