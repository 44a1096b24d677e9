"""`[[models]] fold_parallel`: one case's folds at once on several devices give exactly the
sequential ensemble. On the CPU, two "cpu" devices: two replicas of the network, each running
its share of the folds in its own thread, the logits summed in fold order."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "demo-petct"
SEED = 424243

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "fold_4" / "checkpoint_final.pth").is_file(),
    reason="models/demo-petct not built (scripts/make_demo_model.py)",
)


@pytest.fixture(scope="module")
def case():
    from dicomnode.synth.petct_phantom import PET_GRID, ct_hu, pet_suv, random_phantom

    ph = random_phantom(SEED)
    return np.stack([ct_hu(ph, PET_GRID).astype(np.float32), pet_suv(ph, PET_GRID)]), PET_GRID.spacing


def test_folds_in_parallel_equal_the_sequential_ensemble(case, monkeypatch):
    import torch

    from inference import SegmentationModel, foldparallel

    channels, spacing = case
    sequential = SegmentationModel(MODEL_DIR, folds=(0, 1, 2), device="cpu", use_mirroring=False)
    parallel = SegmentationModel(MODEL_DIR, folds=(0, 1, 2), device="auto", use_mirroring=False,
                                 fold_devices=["cpu", "cpu"])
    assert parallel.fold_devices == ("cpu", "cpu") and parallel.device == "cpu"
    assert [r.folds for r in parallel._replicas] == [(0, 2), (1,)]
    assert parallel._replicas[1].predictor.network is not parallel._replicas[0].predictor.network

    ran_in: dict[int, str] = {}  # fold position -> the thread that ran it
    fold_logits = foldparallel.Replica.fold_logits

    def recording(self, data, parameters):  # noqa: ANN001, ANN202
        out = fold_logits(self, data, parameters)
        ran_in.update({position: threading.current_thread().name for position in out})
        return out

    monkeypatch.setattr(foldparallel.Replica, "fold_logits", recording)

    expected = sequential.ensemble_logits(channels, spacing)
    got = parallel.ensemble_logits(channels, spacing)
    assert got.dtype == expected.dtype == torch.float16
    assert got.shape == expected.shape and torch.equal(got, expected)  # the averaged logits, bit for bit
    assert sorted(ran_in) == [0, 1, 2]
    assert len({ran_in[0], ran_in[1]}) == 2 and ran_in[0] == ran_in[2]  # two replicas, each in its thread

    labels_sequential = sequential.predict(channels, spacing)
    labels_parallel = parallel.predict(channels, spacing)
    assert labels_parallel.dtype == np.uint8 and labels_sequential.any()
    np.testing.assert_array_equal(labels_parallel, labels_sequential)
    parallel.unload()
    assert parallel._replicas == []


def test_one_fold_device_is_the_sequential_path():
    from inference import SegmentationModel

    model = SegmentationModel(MODEL_DIR, folds=(0, 1), device="auto", use_mirroring=False, fold_devices=["cpu"])
    assert (model.device, model.fold_devices, model._replicas) == ("cpu", (), [])
