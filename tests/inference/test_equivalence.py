"""The node's in-memory pipeline gives the same mask as nnU-Net's own CLI on the exported NIfTIs.

`dicomnode inspect --export` writes the volumes the model gets; nnU-Net's
`nnUNetv2_predict_from_modelfolder` (which loads the model folder itself and reads the files
with its own SimpleITK reader) segments them; the worker's path (selection, volumes, SUVbw,
CT onto the PET grid, then inference.SegmentationModel.predict on the arrays) segments the
same study. Same folds, no mirroring on both sides: the masks must agree (Dice >= 0.999).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytestmark = pytest.mark.e2e  # starts servers or subprocesses (tests/conftest.py)

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "demo-petct"
FOLDS = ("0", "1")  # two of the five folds keep the test short; the same two on both sides
BIN = Path(sys.executable).parent


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def exported(synth_study, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    result = subprocess.run([str(BIN / "dicomnode"), "inspect", str(synth_study.root), "--export", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_node_and_nnunet_cli_give_the_same_mask(synth_study, exported, tmp_path):
    from dicomnode.config import ModelSettings
    from dicomnode.ops.inspect import inspect_path
    from dicomnode.pipeline.inputs import assemble_inputs
    from inference import SegmentationModel

    # nnU-Net's CLI on the exported files, named as nnU-Net wants: CASE_0000 = CT, CASE_0001 = PET
    images, predicted = tmp_path / "imagesTs", tmp_path / "predicted"
    images.mkdir()
    shutil.copy(exported / "ct_hu.nii.gz", images / "study_0000.nii.gz")
    shutil.copy(exported / "pet_suv.nii.gz", images / "study_0001.nii.gz")
    env = {**os.environ, "nnUNet_compile": "f"}
    result = subprocess.run(
        [str(BIN / "nnUNetv2_predict_from_modelfolder"), "-i", str(images), "-o", str(predicted),
         "-m", str(MODEL_DIR), "-f", *FOLDS, "--disable_tta", "-device", "cpu", "-npp", "1", "-nps", "1"],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    cli_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(predicted / "study.nii.gz"))) > 0

    # the worker's path, in memory
    settings = ModelSettings(name="demo-petct", path=MODEL_DIR, use_mirroring=False)
    study = inspect_path(synth_study.root, settings).studies[0]
    inputs = assemble_inputs({c: study.selection.paths(c) for c in study.selection.chosen}, ["CT", "PET"], "PET")
    model = SegmentationModel(MODEL_DIR, folds=tuple(int(f) for f in FOLDS), device="cpu", use_mirroring=False)
    node_mask = model.predict(inputs.channels, inputs.spacing) > 0

    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(synth_study.truth_labels))) > 0
    assert node_mask.shape == cli_mask.shape == truth.shape
    assert _dice(node_mask, truth) > 0.5  # a real segmentation, not two empty masks
    assert _dice(node_mask, cli_mask) >= 0.999, f"node vs nnU-Net CLI Dice {_dice(node_mask, cli_mask):.4f}"
