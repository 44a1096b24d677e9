"""The model side: the bundled demo nnU-Net model loads through nnU-Net and finds the lesions.

CPU only, no mirroring; the 5-fold ensemble on one 64^3 phantom takes a few seconds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "demo-petct"
HELD_OUT_SEED = 424242  # far from the training seeds (1000..) and the README's validation seeds (9000..)
DICOM_MODULES = ("pydicom", "pynetdicom", "highdicom")

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "fold_4" / "checkpoint_final.pth").is_file(),
    reason="models/demo-petct not built (scripts/make_demo_model.py)",
)


@pytest.fixture(scope="module")
def model():
    from inference import SegmentationModel

    return SegmentationModel(MODEL_DIR, folds=(0, 1, 2, 3, 4), device="cpu", use_mirroring=False)


@pytest.fixture(scope="module")
def case():
    from dicomnode.synth.petct_phantom import (
        PET_GRID,
        ct_hu,
        lesion_masks,
        pet_suv,
        random_phantom,
    )

    ph = random_phantom(HELD_OUT_SEED)
    channels = np.stack([ct_hu(ph, PET_GRID).astype(np.float32), pet_suv(ph, PET_GRID)])
    return channels, lesion_masks(ph, PET_GRID), ph, PET_GRID.spacing


def test_model_metadata(model):
    assert model.channel_names == ["CT", "PET"]
    assert model.labels == {"background": 0, "lesion": 1}
    assert model.device == "cpu"
    assert model.folds == (0, 1, 2, 3, 4)
    assert model.model_spacing == pytest.approx((3.0, 2.04, 2.04))
    # the real loader path: nnU-Net built the ResEnc network from plans.json
    assert type(model._predictor.network).__name__ == "ResidualEncoderUNet"
    assert len(model._predictor.list_of_parameters) == 5


def test_predict_finds_planted_lesions(model, case):
    channels, truth, ph, spacing = case
    pred = model.predict(channels, spacing)
    assert pred.shape == truth.shape == channels.shape[1:]
    assert pred.dtype == np.uint8
    assert set(np.unique(pred)) <= {0, 1}
    p, t = pred > 0, truth > 0
    dice = 2.0 * (p & t).sum() / (p.sum() + t.sum())
    assert dice > 0.5, f"Dice {dice:.3f}"
    for k in range(1, len(ph.lesions) + 1):
        assert p[truth == k].any(), f"lesion {k} of {len(ph.lesions)} ({ph.lesions[k - 1]}) missed"


def test_predict_casts_input_dtype_and_spacing_type(model, case):
    channels, truth, _, spacing = case
    # same call with a float64 array and a list spacing: the model casts, result identical
    pred = model.predict(channels.astype(np.float64), list(spacing))
    assert pred.dtype == np.uint8 and pred.shape == truth.shape


def test_wrong_channel_count_is_a_clear_error(model, case):
    channels, _, _, spacing = case
    with pytest.raises(ValueError, match=r"expects 2 input channels \['CT', 'PET'\], got 1"):
        model.predict(channels[1:], spacing)
    with pytest.raises(ValueError, match="expects 2 input channels"):
        model.predict(np.concatenate([channels, channels[:1]]), spacing)
    with pytest.raises(ValueError, match="4-D"):
        model.predict(channels[0], spacing)
    with pytest.raises(ValueError, match="spacing"):
        model.predict(channels, (3.0, 0.0, 4.08))


def test_missing_model_folder_is_a_clear_error(tmp_path):
    from inference import SegmentationModel

    with pytest.raises(FileNotFoundError, match="does not exist"):
        SegmentationModel(tmp_path / "nope", device="cpu")
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="plans.json"):
        SegmentationModel(tmp_path, folds=(0,), device="cpu")


@pytest.mark.e2e
def test_inference_package_never_imports_dicom_libraries():
    code = (
        "import sys, inference, inference.model\n"
        f"bad = [m for m in {DICOM_MODULES!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_inference_sources_do_not_mention_dicom_imports():
    for src in (REPO / "inference").rglob("*.py"):
        for line in src.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                assert not any(m in stripped for m in DICOM_MODULES), f"{src}: {stripped}"
