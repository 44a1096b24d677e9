"""The registry's stand-in model folders load in their own formats and segment their registry_cases.

lymph-ct: release layout with a custom trainer shipped in the folder; glioma-mr: four MR
channels; organs-ct: nnU-Net's results layout, one fold, a custom trainer building a custom
network class from the folder. CPU, no mirroring, held-out seeds (>= 1000).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from dicomnode.synth import registry_cases
from inference.layout import resolve_model_folder
from inference.trainers import TrainerNotFound, find_trainer_class, source_file

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
ORGANS_RUN = MODELS / "organs-ct" / "Dataset090_Organs" / "STUNetTrainer__nnUNetPlans__3d_fullres"
CASES = {  # model folder -> (phantom, folds)
    "lymph-ct": (registry_cases.lymph_node_case, (0,)),
    "glioma-mr": (registry_cases.glioma_case, (0,)),
    "organs-ct": (registry_cases.organ_case, (0,)),
}
TEST_SEED = 1003
MIN_DICE = 0.6

BUILT = {name for name in CASES if any((MODELS / name).rglob("checkpoint_final.pth"))}


def needs(*names: str):  # noqa: ANN201 - a skip mark
    missing = [name for name in names if name not in BUILT]
    return pytest.mark.skipif(bool(missing), reason=f"models/{', '.join(missing)} not built (make registry-models)")


def _model(name: str):
    from inference import SegmentationModel

    return SegmentationModel(MODELS / name, folds=CASES[name][1], device="cpu", use_mirroring=False)


@pytest.mark.parametrize("name", [pytest.param(name, marks=needs(name)) for name in CASES])
def test_model_segments_its_phantom(name):
    model = _model(name)
    case = CASES[name][0](TEST_SEED)
    assert model.channel_names == list(case.channels)
    assert model.labels == {"background": 0, **{n: v for v, n in case.label_names.items()}}
    channels = np.stack([case.channels[c] for c in model.channel_names])
    pred = model.predict(channels, case.grid.spacing)
    assert pred.shape == case.labels.shape and pred.dtype == np.uint8
    for value, label in case.label_names.items():
        p, t = pred == value, case.labels == value
        dice = 2.0 * (p & t).sum() / (p.sum() + t.sum())
        assert dice > MIN_DICE, f"{name}: {label} Dice {dice:.3f}"


@needs("organs-ct", "lymph-ct")
def test_results_layout_resolves_from_any_level():
    for path in (MODELS / "organs-ct", MODELS / "organs-ct" / "Dataset090_Organs", ORGANS_RUN):
        folder = resolve_model_folder(path)
        assert (folder.root, folder.layout) == (ORGANS_RUN, "results")
        assert (folder.trainer, folder.plans, folder.configuration) == ("STUNetTrainer", "nnUNetPlans", "3d_fullres")
    release = resolve_model_folder(MODELS / "lymph-ct")
    assert (release.root, release.layout) == (MODELS / "lymph-ct", "release")


@needs("organs-ct")
def test_results_layout_choice_between_trained_models(tmp_path):
    dataset = tmp_path / "Dataset090_Organs"
    shutil.copytree(ORGANS_RUN, dataset / ORGANS_RUN.name)
    shutil.copytree(ORGANS_RUN, dataset / "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres")
    with pytest.raises(ValueError, match="several trained models"):
        resolve_model_folder(tmp_path)
    assert resolve_model_folder(tmp_path, trainer="STUNetTrainer").root == dataset / ORGANS_RUN.name
    with pytest.raises(ValueError, match="no trained model matches plans = 'nnUNetResEncUNetLPlans'"):
        resolve_model_folder(tmp_path, plans="nnUNetResEncUNetLPlans")
    with pytest.raises(ValueError, match="the folder name says trainer 'STUNetTrainer', configured 'X'"):
        resolve_model_folder(ORGANS_RUN, trainer="X")


@needs("organs-ct", "lymph-ct")
def test_custom_trainer_and_network_come_from_the_model_folder(monkeypatch):
    import nnunetv2
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    lymph, organs = _model("lymph-ct"), _model("organs-ct")
    assert lymph.trainer_name == "nnUNetTrainer_DGST"
    assert Path(source_file(lymph.trainer_class)) == MODELS / "lymph-ct" / "nnUNetTrainer_DGST.py"
    network_class = type(organs._predictor.network)
    assert (organs.trainer_name, network_class.__name__) == ("STUNetTrainer", "STUNet")
    assert Path(source_file(network_class)) == ORGANS_RUN / "stunet.py"
    # nothing installed: the folders' modules are gone from sys.modules, nnunetv2 has no such code
    assert not {"nnUNetTrainer_DGST", "STUNetTrainer", "stunet"} & set(sys.modules)
    package = Path(nnunetv2.__path__[0])
    assert not [f for f in package.rglob("*.py") if "nnUNetTrainer_DGST" in f.read_text(errors="ignore")]
    # and nnU-Net's own loader, which looks only in its package, cannot load the folder
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer nnUNetTrainer_DGST"):
        nnUNetPredictor(device=torch.device("cpu")).initialize_from_trained_model_folder(
            str(MODELS / "lymph-ct"), use_folds=(0,))


def test_a_class_of_the_trainers_name_that_is_no_trainer_is_refused_naming_its_file(tmp_path: Path):
    (tmp_path / "MyTrainer.py").write_text("class MyTrainer:\n    def run_training(self):\n        pass\n")
    with pytest.raises(
        TrainerNotFound, match=f"'MyTrainer' in {tmp_path / 'MyTrainer.py'} is not an nnUNetTrainer subclass"
    ):
        find_trainer_class("MyTrainer", [tmp_path])
