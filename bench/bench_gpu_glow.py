"""A GLOW-FDG-sized model on a whole-body-sized volume: seconds per study and peak GPU memory.

The network is what nnU-Net's ResEnc L planner gives GLOW-FDG-like data (nnUNetPlannerResEncL:
ResidualEncoderUNet, widths 32-320, blocks per stage 1, 3, 4, 6, 6, 6, patch 192^3 at
3.0 x 2.04 x 2.04 mm, 2 channels CT + PET), with random weights, 5 folds, run through
nnU-Net's predictor exactly as inference.SegmentationModel runs it (preprocessing, sliding
window with tile step 0.5, fold ensembling, export), with and without test-time mirroring.
The plans start from models/demo-petct/plans.json (planned by nnUNetPlannerResEncL on the
same spacing) with the planner's own widths and patch put back.

    .venv/bin/python bench/bench_gpu_glow.py              # CUDA: 300 x 200 x 200 voxels (900 x 408 x 408 mm)
    .venv/bin/python bench/bench_gpu_glow.py --toy        # CPU: a tiny network and volume, proves the script runs
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo-petct"
RESENC_L = {"features_per_stage": [32, 64, 128, 256, 320, 320], "patch_size": [192, 192, 192],
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5}
TOY = {"features_per_stage": [4, 8, 16, 16, 16, 16], "patch_size": [32, 64, 64],
       "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4 + [[1, 2, 2]]}
WHOLE_BODY = (300, 200, 200)
TOY_VOLUME = (40, 72, 72)
SPACING = (3.0, 2.04, 2.04)
N_FOLDS = 5


def plans_with(network: dict) -> dict:
    plans = json.loads((DEMO / "plans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    kw = cfg["architecture"]["arch_kwargs"]
    kw["features_per_stage"] = network["features_per_stage"]
    kw["strides"] = network["strides"]
    cfg["patch_size"] = network["patch_size"]
    cfg["spacing"] = list(SPACING)
    return plans


def make_predictor(plans: dict, device: str, mirroring: bool) -> nnUNetPredictor:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.loads((DEMO / "dataset.json").read_text())
    plans_manager = PlansManager(copy.deepcopy(plans))
    cfg = plans_manager.get_configuration("3d_fullres")
    folds = []
    for fold in range(N_FOLDS):  # random weights, a different draw per fold
        torch.manual_seed(fold)
        folds.append(nnUNetTrainer.build_network_architecture(plans_manager, cfg, 2, 2, False).state_dict())
    network = nnUNetTrainer.build_network_architecture(plans_manager, cfg, 2, 2, False).to(device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=mirroring,
                                perform_everything_on_device=device == "cuda", device=torch.device(device),
                                verbose=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, cfg, folds, dataset_json, "nnUNetTrainer", (0, 1, 2))
    n_params = sum(p.numel() for p in network.parameters())
    return predictor, n_params


def run(
    predictor: nnUNetPredictor, shape: tuple[int, int, int], device: str, repeats: int
) -> tuple[float, float | None]:
    """Median seconds per study and peak GPU memory in GB (None on the CPU)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    ct = rng.normal(40.0, 200.0, shape).astype(np.float32)
    pet = rng.gamma(2.0, 0.5, shape).astype(np.float32)
    data = np.stack([ct, pet])
    seconds = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.predict_single_npy_array(data, {"spacing": list(SPACING)}, None, None, False)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    return float(np.median(seconds)), peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy", action="store_true", help="tiny network and volume on the CPU")
    parser.add_argument("--repeats", type=int, default=2, help="timed studies per setting (after one warm-up)")
    args = parser.parse_args(argv)
    import torch

    device = "cpu" if args.toy else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("torch sees no CUDA GPU; run with --toy on the CPU")
    network, shape = (TOY, TOY_VOLUME) if args.toy else (RESENC_L, WHOLE_BODY)
    plans = plans_with(network)
    gpu = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{'toy' if args.toy else 'ResEnc L'}: patch {network['patch_size']}, widths {network['features_per_stage']}, "
        f"{N_FOLDS} folds, volume {'x'.join(map(str, shape))} at {SPACING} mm, tile step 0.5; {gpu}"
    )
    print("| mirroring | s per study | peak GPU memory GB |\n|---|---|---|")
    for mirroring in (False, True):
        predictor, n_params = make_predictor(plans, device, mirroring)
        run(predictor, shape, device, 1)  # warm-up: cuDNN autotuning, allocator
        seconds, peak = run(predictor, shape, device, args.repeats)
        print(
            f"| {'on' if mirroring else 'off'} | {seconds:.1f} | {'-' if peak is None else f'{peak:.1f}'} |", flush=True
        )
    print(f"network parameters per fold: {n_params / 1e6:.1f} M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
