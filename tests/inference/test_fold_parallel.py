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
    sequential = SegmentationModel(MODEL_DIR, folds=(0, 1, 2), device="cpu", use_mirroring=False,
                                   cpu_fold_per_core=False)
    assert sequential._replicas == []  # nnU-Net's own loop
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

    model = SegmentationModel(MODEL_DIR, folds=(0, 1), device="auto", use_mirroring=False, fold_devices=["cpu"],
                              cpu_fold_per_core=False)
    assert (model.device, model.fold_devices, model._replicas) == ("cpu", (), [])
    model = SegmentationModel(MODEL_DIR, folds=(0, 1), device="auto", use_mirroring=False, fold_devices=["cpu"],
                              threads=2)  # the CPU's own: one fold per core
    assert (model.fold_devices, [r.folds for r in model._replicas]) == ((), [(0,), (1,)])


def test_cpu_folds_one_per_core_give_the_sequential_mask(case, monkeypatch):
    """`cpu_fold_per_core` (the default on the CPU): the folds at once, a replica per core with one
    thread each; the logits differ from nnU-Net's loop on two threads only in rounding, the
    label map not at all, and the caller's thread count is back afterwards."""
    import torch

    from inference import SegmentationModel, foldparallel

    channels, spacing = case
    sequential = SegmentationModel(MODEL_DIR, folds=(0, 1, 2), device="cpu", use_mirroring=False, threads=2,
                                   cpu_fold_per_core=False)
    per_core = SegmentationModel(MODEL_DIR, folds=(0, 1, 2), device="cpu", use_mirroring=False, threads=2)
    assert (per_core.cpu_fold_replicas, per_core.fold_devices) == (2, ())
    # folds 0 and 1 at once, one thread each; fold 2, short of a round, on both threads afterwards
    assert [(r.folds, r.threads) for r in per_core._replicas] == [((0,), 1), ((1,), 1)]
    assert per_core.memory_bytes() > sequential.memory_bytes()  # two patches through the network at once

    threads_in: dict[str, int] = {}  # the replica's thread -> torch's intra-op threads there
    fold_logits = foldparallel.Replica.fold_logits

    def recording(self, data, parameters):  # noqa: ANN001, ANN202
        out = fold_logits(self, data, parameters)
        threads_in[threading.current_thread().name] = torch.get_num_threads()
        return out

    monkeypatch.setattr(foldparallel.Replica, "fold_logits", recording)
    expected = sequential.ensemble_logits(channels, spacing)
    got = per_core.ensemble_logits(channels, spacing)
    assert len(threads_in) == 3 and sorted(threads_in.values()) == [1, 1, 2]  # the third: the caller's thread
    assert torch.get_num_threads() == 2  # the caller's setting, restored
    assert got.dtype == expected.dtype == torch.float16 and got.shape == expected.shape
    difference = (got.float() - expected.float()).abs()
    differ = difference > 0
    # float16 rounding of sums that differ in their last float32 bits: about 5 logits in 100,000 here,
    # each by a few float16 steps (2**-10 of its size) at most
    assert float(differ.float().mean()) < 1e-3
    assert not differ.any() or float((difference[differ] / expected.float().abs()[differ]).max()) < 4 * 2**-10

    labels = per_core.predict(channels, spacing)
    assert labels.any()
    np.testing.assert_array_equal(labels, sequential.predict(channels, spacing))
    assert SegmentationModel(MODEL_DIR, folds=(0,), device="cpu", use_mirroring=False).cpu_fold_replicas == 0
