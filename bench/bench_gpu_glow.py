"""A GLOW-FDG-sized model on whole-body-sized studies, on one GPU: seconds per study through the
warm worker and through `nnUNetv2_predict`, peak GPU memory, per setting.

The network is what nnU-Net's ResEnc L planner gives GLOW-FDG-like data (nnUNetPlannerResEncL:
ResidualEncoderUNet, widths 32-320, blocks per stage 1, 3, 4, 6, 6, 6, patch 192^3 at
3.0 x 2.04 x 2.04 mm, 2 channels CT + PET), with random weights, 5 folds, written as an nnU-Net
model folder (plans.json, dataset.json, fold_k/checkpoint_final.pth; the plans start from
models/demo-petct/plans.json, planned by nnUNetPlannerResEncL on the same spacing, with the
planner's widths and patch put back). The studies are whole-body-sized volumes (300 x 200 x 200 at
3 x 4 x 4 mm, the PET grid of bench_receive.py / bench_wholebody.py), random CT and PET values.

Two ways, on the same studies:

* warm worker: `inference.SegmentationModel` (what `dicomnode worker` holds between jobs) loaded
  once per setting, one study to warm up (cuDNN autotuning, the allocator), then each study
  timed; peak GPU memory from torch (max allocated / max reserved).
* `nnUNetv2_predict`: nnU-Net's CLI once per study on NIfTI files of the same arrays (as a
  site running nnU-Net per study would: each call starts Python and loads the 5 folds); peak
  GPU memory of the whole GPU while it runs, sampled from nvidia-smi (less what was in use
  before). Writing the NIfTIs is not counted.

Settings of the warm worker (`--settings`, default all): test-time mirroring off / on; autocast
float16 (nnU-Net's own choice: `torch.autocast("cuda")` with torch's default dtype) or bfloat16
(torch's autocast dtype set to bfloat16 for the process; nnU-Net offers no switch, so the CLI
runs float16 only); `perform_everything_on_device` on (nnU-Net's default on CUDA: the logits of
the whole case stay on the GPU) or off (accumulated on the CPU: the choice for cases that do not
fit). The CLI runs mirroring off (and on with `--cli-mirroring`), float16, on device.

Throughput ratio (the issue's goal: warm queue >= 3x nnUNetv2_predict): the CLI's total over the
warm worker's load + total, on the same studies. The whole job from the last instance to the SEG
in the PACS is this inference plus bench_wholebody.py's figures (the goal: <= 90 s with 5 folds).

    .venv/bin/python bench/bench_gpu_glow.py                 # CUDA, everything (~10 min on one H100-class GPU)
    .venv/bin/python bench/bench_gpu_glow.py --settings fp16,bf16 --studies 2
    .venv/bin/python bench/bench_gpu_glow.py --smoke         # CPU: a tiny network and volume, the same code paths
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo-petct"
DATASET = "Dataset901_GlowSized"
PLANS = "nnUNetResEncUNetLPlans"
RESULTS_NAME = f"nnUNetTrainer__{PLANS}__3d_fullres"
RESENC_L = {"features_per_stage": [32, 64, 128, 256, 320, 320], "patch_size": [192, 192, 192],
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5}
TOY = {"features_per_stage": [2, 4, 4, 4, 4, 4], "patch_size": [16, 32, 32],  # seconds on a busy 2-core CPU
       "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 1]]}
WHOLE_BODY = (300, 200, 200)  # the PET grid (z, y, x)
WHOLE_BODY_SPACING = (3.0, 4.0, 4.0)
TOY_VOLUME = (16, 20, 20)
MODEL_SPACING = (3.0, 2.04, 2.04)
N_FOLDS = 5
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Setting:
    name: str
    mirroring: bool
    dtype: str  # autocast dtype on CUDA: "float16" or "bfloat16"
    on_device: bool  # perform_everything_on_device


SETTINGS = {
    "fp16": Setting("fp16", False, "float16", True),
    "bf16": Setting("bf16", False, "bfloat16", True),
    "fp16-not-on-device": Setting("fp16-not-on-device", False, "float16", False),
    "fp16-mirroring": Setting("fp16-mirroring", True, "float16", True),
}


@dataclass
class Figures:
    way: str  # "warm worker" or "nnUNetv2_predict"
    setting: str
    load_s: float  # model loaded once (warm worker); 0 for the CLI (inside each study's time)
    per_study_s: list[float]
    peak_gb: float | None  # GPU memory: torch's max allocated (warm), nvidia-smi's peak (CLI)
    reserved_gb: float | None = None  # warm worker: torch's max reserved

    @property
    def median_s(self) -> float:
        return statistics.median(self.per_study_s)


# --- the model folder -------------------------------------------------------------------------


def plans_with(network: dict) -> dict:
    plans = json.loads((DEMO / "plans.json").read_text())
    plans["dataset_name"], plans["plans_name"] = DATASET, PLANS
    cfg = plans["configurations"]["3d_fullres"]
    kw = cfg["architecture"]["arch_kwargs"]
    kw["features_per_stage"] = network["features_per_stage"]
    kw["strides"] = network["strides"]
    cfg["patch_size"] = network["patch_size"]
    cfg["spacing"] = list(MODEL_SPACING)
    return plans


def write_model(folder: Path, network: dict) -> int:
    """A random-weight nnU-Net model folder (release layout, what SegmentationModel and, linked into
    a results folder, nnUNetv2_predict load); its parameters per fold."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = plans_with(network)
    dataset_json = json.loads((DEMO / "dataset.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    plans_manager = PlansManager(copy.deepcopy(plans))
    cfg = plans_manager.get_configuration("3d_fullres")
    n_params = 0
    for fold in range(N_FOLDS):  # random weights, a different draw per fold, stored as float16
        torch.manual_seed(fold)
        net = nnUNetTrainer.build_network_architecture(plans_manager, cfg, 2, 2, False)
        n_params = sum(p.numel() for p in net.parameters())
        weights = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save({"network_weights": weights, "trainer_name": "nnUNetTrainer",
                    "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold,
                                  "dataset_json": dataset_json, "device": "cpu"},
                    "inference_allowed_mirroring_axes": (0, 1, 2)}, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return n_params


def studies(count: int, shape: tuple[int, int, int]) -> list[np.ndarray]:
    """(2, z, y, x) float32 CT (HU-like) + PET (SUV-like) volumes, one seed each."""
    out = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        ct = rng.normal(40.0, 200.0, shape).astype(np.float32)
        pet = rng.gamma(2.0, 0.5, shape).astype(np.float32)
        out.append(np.stack([ct, pet]))
    return out


# --- the warm worker ---------------------------------------------------------------------------


def warm_worker(folder: Path, setting: Setting, cases: list[np.ndarray], spacing: tuple, device: str) -> Figures:
    import torch

    from inference import SegmentationModel

    cuda = device.startswith("cuda")
    if cuda:
        torch.set_autocast_dtype("cuda", getattr(torch, setting.dtype))  # nnU-Net's torch.autocast("cuda") reads it
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = SegmentationModel(folder, folds=range(N_FOLDS), device=device, use_mirroring=setting.mirroring)
    model._predictor.perform_everything_on_device = setting.on_device and cuda  # nnU-Net's own switch
    load = time.perf_counter() - started
    model.predict(cases[0], spacing)  # warm-up: cuDNN autotuning, the caching allocator
    seconds = []
    for case in cases:
        started = time.perf_counter()
        labels = model.predict(case, spacing)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        assert labels.shape == case.shape[1:], labels.shape
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    reserved = torch.cuda.max_memory_reserved() / 1e9 if cuda else None
    model.unload()
    del model
    if cuda:
        torch.set_autocast_dtype("cuda", torch.float16)
        torch.cuda.empty_cache()
    return Figures("warm worker", setting.name, load, seconds, peak, reserved)


# --- nnUNetv2_predict --------------------------------------------------------------------------


class GpuMemoryPeak:
    """The peak of nvidia-smi's memory.used on GPU `index` while the block runs, less what was in
    use at its start (None without nvidia-smi)."""

    def __init__(self, index: int = 0) -> None:
        self.index, self.peak_mb, self.base_mb = index, None, None
        self._stop = threading.Event()

    def _used(self) -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", f"--id={self.index}", "--query-gpu=memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
            return float(out.stdout.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            used = self._used()
            if used is not None:
                self.peak_mb = max(self.peak_mb or 0.0, used)

    def __enter__(self) -> "GpuMemoryPeak":
        if shutil.which("nvidia-smi"):
            self.base_mb = self._used()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.base_mb is not None:
            self._thread.join()

    @property
    def gb(self) -> float | None:
        if self.base_mb is None or self.peak_mb is None:
            return None
        return max(0.0, self.peak_mb - self.base_mb) / 1000.0


def cli(folder: Path, cases: list[np.ndarray], spacing: tuple, device: str, mirroring: bool, work: Path) -> Figures:
    import SimpleITK as sitk

    results = work / "nnUNet_results"
    (results / DATASET).mkdir(parents=True, exist_ok=True)
    link = results / DATASET / RESULTS_NAME
    if not link.exists():
        link.symlink_to(folder.resolve())
    env = {**os.environ, "nnUNet_results": str(results), "nnUNet_raw": str(work), "nnUNet_preprocessed": str(work),
           "nnUNet_compile": "f"}
    seconds, peaks = [], []
    for k, case in enumerate(cases):
        images, out = work / f"images-{k}", work / f"predicted-{k}-{'m' if mirroring else 'n'}"
        if not images.exists():
            images.mkdir()
            for channel, array in enumerate(case):  # (z, y, x) -> NIfTI with (x, y, z) spacing, as inspect --export
                image = sitk.GetImageFromArray(array)
                image.SetSpacing(tuple(float(s) for s in reversed(spacing)))
                sitk.WriteImage(image, str(images / f"study_{channel:04d}.nii.gz"))
        command = [str(BIN / "nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d", DATASET, "-c", "3d_fullres",
                   "-p", PLANS, "-tr", "nnUNetTrainer", "-f", *[str(f) for f in range(N_FOLDS)],
                   "-device", "cuda" if device.startswith("cuda") else "cpu", "-npp", "1", "-nps", "1",
                   "--disable_progress_bar", *([] if mirroring else ["--disable_tta"])]
        with GpuMemoryPeak() as peak:
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
            seconds.append(time.perf_counter() - started)
        if done.returncode != 0 or not (out / "study.nii.gz").exists():
            raise RuntimeError(f"nnUNetv2_predict failed ({done.returncode}): {done.stderr[-3000:]}")
        peaks.append(peak.gb)
    known = [p for p in peaks if p is not None]
    return Figures("nnUNetv2_predict", "fp16-mirroring" if mirroring else "fp16", 0.0, seconds,
                   max(known) if known else None)


# --- the report ---------------------------------------------------------------------------------


def table(rows: list[Figures], cuda: bool) -> str:
    def gb(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = ["| way | setting | load (s) | s per study (median) | each study (s) | peak GPU GB (reserved) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        setting = SETTINGS.get(r.setting)
        what = r.setting if setting is None else (
            f"{r.setting}: mirroring {'on' if setting.mirroring else 'off'}, "
            f"{setting.dtype if cuda else 'float32 (no autocast on the CPU)'}, "
            f"on device {'yes' if setting.on_device and cuda else 'no'}")
        lines.append(f"| {r.way} | {what} | {r.load_s:.1f} | {r.median_s:.2f} | "
                     f"{', '.join(f'{s:.2f}' for s in r.per_study_s)} | {gb(r.peak_gb)}"
                     + (f" ({gb(r.reserved_gb)})" if r.reserved_gb is not None else "") + " |")
    return "\n".join(lines)


def ratios(rows: list[Figures]) -> list[tuple[str, float]]:
    """nnUNetv2_predict's total over the warm worker's load + total, per CLI setting."""
    out = []
    for c in (r for r in rows if r.way == "nnUNetv2_predict"):
        warm = next((r for r in rows if r.way == "warm worker" and r.setting == c.setting), None)
        if warm is not None:
            out.append((c.setting, sum(c.per_study_s) / (warm.load_s + sum(warm.per_study_s))))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, a tiny network and volume: the same code paths, to show the script works")
    parser.add_argument("--studies", type=int, default=None, help="studies per setting (default 3; --smoke 1)")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"warm worker settings, comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--cli-mirroring", action="store_true", help="nnUNetv2_predict with mirroring too (slow)")
    parser.add_argument("--no-cli", action="store_true", help="the warm worker only")
    parser.add_argument("--work", type=Path, help="keep the model folder and NIfTIs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    import torch

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("torch sees no CUDA GPU; run with --smoke on the CPU")
    wanted = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}: choose from {', '.join(SETTINGS)}")
    network, shape = (TOY, TOY_VOLUME) if args.smoke else (RESENC_L, WHOLE_BODY)
    n_studies = args.studies or (1 if args.smoke else 3)
    gpu = (f"{torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 1e9:.0f} GB"
           if device == "cuda" else f"CPU, {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory(prefix="bench-gpu-glow-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        folder = work / "model"
        started = time.perf_counter()
        n_params = write_model(folder, network)
        written = time.perf_counter() - started
        cases = studies(n_studies, shape)
        print(f"{'smoke (toy network)' if args.smoke else 'ResEnc L'}: patch {network['patch_size']}, widths "
              f"{network['features_per_stage']}, {n_params / 1e6:.1f} M parameters per fold, {N_FOLDS} folds "
              f"(random weights, written in {written:.0f} s); {n_studies} studies of {'x'.join(map(str, shape))} "
              f"at {WHOLE_BODY_SPACING} mm; tile step 0.5; {gpu}; torch {torch.__version__}\n", flush=True)
        rows = []
        for name in wanted:
            rows.append(warm_worker(folder, SETTINGS[name], cases, WHOLE_BODY_SPACING, device))
            print(f"warm worker {name}: {rows[-1].median_s:.2f} s per study", flush=True)
        if not args.no_cli:
            for mirroring in (False, True) if args.cli_mirroring else (False,):
                rows.append(cli(folder, cases, WHOLE_BODY_SPACING, device, mirroring, work))
                print(f"nnUNetv2_predict {rows[-1].setting}: {rows[-1].median_s:.2f} s per study", flush=True)
    print()
    print(table(rows, device == "cuda"))
    for setting, ratio in ratios(rows):
        print(f"throughput, warm worker (one load) / nnUNetv2_predict, {setting}, {n_studies} studies: {ratio:.2f}x "
              f"(goal >= 3x)")
    if args.json:
        args.json.write_text(json.dumps({"bench": "gpu_glow", "device": gpu, "smoke": args.smoke,
                                         "rows": [{**asdict(r), "median_s": r.median_s} for r in rows],
                                         "ratios": dict(ratios(rows))}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
