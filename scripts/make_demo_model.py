#!/usr/bin/env python
"""Build the demo PET/CT lesion model (models/demo-petct) with nnU-Net v2's own pipeline.

Synthetic training cases come from dicomnode.synth.petct_phantom: CT (HU) resampled onto the PET grid as
channel 0 and PET (SUVbw) as channel 1, exactly what the node feeds the model at inference.
nnU-Net then does everything else itself: dataset fingerprint, ResEnc-L planning (with the
3d_fullres target spacing forced to GLOW-FDG's 3.0 x 2.04 x 2.04 mm and the widths shrunk so
it trains and predicts on a laptop CPU), preprocessing, and 5-fold training. The result is
copied out in the nnU-Net v2 release layout (dataset.json, plans.json,
fold_k/checkpoint_final.pth), which `inference.SegmentationModel` loads through
`nnUNetPredictor.initialize_from_trained_model_folder`, the same path as a real GLOW-FDG
download. Finally the 5-fold ensemble is validated on held-out phantoms and README.md written.

    .venv/bin/python scripts/make_demo_model.py --out models/demo-petct \
        [--work-dir DIR] [--iterations 100] [--cases 24]

nnU-Net's data-augmentation workers are separate processes that may re-import this file,
hence everything runs under the `__main__` guard.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DATASET_ID = 900
DATASET_NAME = f"Dataset{DATASET_ID:03d}_DemoPetCt"
CONFIGURATION = "3d_fullres"
PLANNER = "nnUNetPlannerResEncL"
PLANS_NAME = "nnUNetResEncUNetLPlans"
TARGET_SPACING = (3.0, 2.04, 2.04)  # z, y, x mm, as GLOW-FDG's 3d_fullres
FEATURES_PER_STAGE_CAP = 32  # widths 8, 16, 32, 32, ...: tiny, but >= 8 at full resolution
FIRST_STAGE_FEATURES = 8
BATCH_SIZE = 2
TRAIN_SEED0 = 1000
HOLDOUT_SEED0 = 9000
N_FOLDS = 5
CHANNEL_NAMES = {"0": "CT", "1": "PET"}
LABELS = {"background": 0, "lesion": 1}


def log(msg: str) -> None:
    print(f"[make_demo_model {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def configure_environment(work_dir: Path, n_proc_da: int) -> dict[str, Path]:
    """nnU-Net reads its folders and process counts from the environment at import time."""
    dirs = {name: work_dir / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for key, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[key] = str(path)
    ncpu = max(1, len(os.sched_getaffinity(0)))
    os.environ["nnUNet_n_proc_DA"] = str(n_proc_da)
    os.environ.setdefault("nnUNet_def_n_proc", str(ncpu))
    os.environ["nnUNet_compile"] = "f"  # no torch.compile on CPU
    os.environ.setdefault("OMP_NUM_THREADS", str(ncpu))
    return dirs


# --------------------------------------------------------------------------- raw data
def phantom_case(seed: int):
    """(channels (2, z, y, x) float32, lesion label map (z, y, x) uint8 1..n, phantom)."""
    import numpy as np

    from dicomnode.synth.petct_phantom import (
        PET_GRID,
        ct_hu,
        lesion_masks,
        pet_suv,
        random_phantom,
    )

    ph = random_phantom(seed)
    channels = np.stack([ct_hu(ph, PET_GRID).astype(np.float32), pet_suv(ph, PET_GRID)])
    return channels, lesion_masks(ph, PET_GRID), ph


def fresh_raw_dataset(raw_root: Path, dataset_name: str) -> Path:
    """An empty nnU-Net raw dataset folder with imagesTr/ and labelsTr/."""
    ds = raw_root / dataset_name
    if ds.exists():
        shutil.rmtree(ds)
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    return ds


def write_nifti(arr, grid, path: Path) -> None:
    """A (z, y, x) array on a dicomnode.synth.petct_phantom.Grid as a compressed NIfTI file."""
    import SimpleITK as sitk

    sz, sy, sx = grid.spacing
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((sx, sy, sz))
    img.SetOrigin(grid.origin)
    sitk.WriteImage(img, str(path), useCompression=True)


def write_raw_dataset(raw_root: Path, n_cases: int) -> Path:
    import numpy as np

    from dicomnode.synth.petct_phantom import PET_GRID

    ds = fresh_raw_dataset(raw_root, DATASET_NAME)
    n_lesions = 0
    for i in range(n_cases):
        seed = TRAIN_SEED0 + i
        channels, labels, ph = phantom_case(seed)
        n_lesions += len(ph.lesions)
        case = f"phantom_{seed:05d}"
        for c in range(channels.shape[0]):
            write_nifti(channels[c], PET_GRID, ds / "imagesTr" / f"{case}_{c:04d}.nii.gz")
        write_nifti((labels > 0).astype(np.uint8), PET_GRID, ds / "labelsTr" / f"{case}.nii.gz")
    dataset_json = {
        "channel_names": CHANNEL_NAMES,
        "labels": LABELS,
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "name": "DemoPetCt",
        "description": "Synthetic PET/CT phantoms (dicomnode.synth.petct_phantom): CT in HU resampled onto the "
        "PET grid, PET in SUVbw; label 1 = planted FDG-avid lesion. Demo only, not a clinical model.",
        "reference": "dicomnode scripts/make_demo_model.py",
        "release": "demo",
        "licence": "same as dicomnode",
    }
    (ds / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    log(f"wrote {n_cases} training cases ({n_lesions} lesions, seeds "
        f"{TRAIN_SEED0}..{TRAIN_SEED0 + n_cases - 1}) to {ds}")
    return ds


# --------------------------------------------------------------------------- planning
def plan_and_preprocess(
    pre_root: Path,
    n_proc: int,
    dataset_id: int = DATASET_ID,
    dataset_name: str = DATASET_NAME,
    planner: str = PLANNER,
    plans_name: str = PLANS_NAME,
    target_spacing: tuple[float, float, float] | None = TARGET_SPACING,
) -> Path:
    """nnU-Net fingerprint, planning and preprocessing of one dataset; the plans' widths and
    batch size shrunk to CPU size. Returns the plans file."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([dataset_id], num_processes=n_proc, check_dataset_integrity=True, clean=True, verbose=False)
    # ResEnc L planner, with the 3d_fullres spacing forced to GLOW-FDG's. Passing the spacing to
    # the planner (rather than editing it afterwards) makes nnU-Net derive patch size and network
    # topology for the image shape at that spacing (64 x 128 x 128 for the phantoms).
    plan_experiments(
        [dataset_id],
        experiment_planner_class_name=planner,
        overwrite_target_spacing=list(target_spacing) if target_spacing else None,
        overwrite_plans_name=plans_name,
    )
    plans_file = pre_root / dataset_name / f"{plans_name}.json"
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"][CONFIGURATION]
    arch = cfg["architecture"]
    kw = arch["arch_kwargs"]
    planned = {
        "patch_size": cfg["patch_size"],
        "batch_size": cfg["batch_size"],
        "features_per_stage": kw["features_per_stage"],
        "spacing": cfg["spacing"],
    }
    log(f"planner's 3d_fullres: {planned}")
    (pre_root.parent / "planned_3d_fullres.json").write_text(json.dumps(planned))
    n_stages = kw["n_stages"]
    kw["features_per_stage"] = [min(FIRST_STAGE_FEATURES * 2**i, FEATURES_PER_STAGE_CAP) for i in range(n_stages)]
    cfg["batch_size"] = BATCH_SIZE
    if target_spacing:
        cfg["spacing"] = list(target_spacing)
    plans_file.write_text(json.dumps(plans, indent=4))
    log(
        f"edited 3d_fullres: network {arch['network_class_name'].rsplit('.', 1)[-1]}, "
        f"features {kw['features_per_stage']}, blocks {kw.get('n_blocks_per_stage')}, "
        f"patch {cfg['patch_size']}, batch {cfg['batch_size']}, spacing {cfg['spacing']}"
    )
    preprocess(
        [dataset_id],
        plans_identifier=plans_name,
        configurations=(CONFIGURATION,),
        num_processes=(n_proc,),
        verbose=False,
    )
    return plans_file


# --------------------------------------------------------------------------- training
def make_trainer_class(
    iterations: int, iters_per_epoch: int, base=None, name: str = "DemoPetCtTrainer", oversample_foreground: float = 1.0
):
    """A subclass of `base` (default nnUNetTrainer) with a short schedule, called `name`."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    base = base or nnUNetTrainer

    class DemoPetCtTrainer(base):
        """The base trainer with a short schedule and full foreground oversampling.

        Only the schedule and the sampling differ from the base trainer; the network comes from
        its inherited `build_network_architecture`, so the weights are exactly what the base
        trainer builds at inference time.
        """

        # explicit signature: nnUNetTrainer records its init arguments by inspecting it
        def __init__(
            self,
            plans: dict,
            configuration: str,
            fold: int,
            dataset_json: dict,
            device: torch.device = torch.device("cuda"),
        ):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch = iters_per_epoch
            self.num_epochs = max(1, round(iterations / iters_per_epoch))
            self.num_val_iterations_per_epoch = 2
            # default 0.33: with so few iterations 2 of 5 folds learned to predict nothing
            self.oversample_foreground_percent = oversample_foreground
            self.save_every = 10**6  # only checkpoint_final matters here

    DemoPetCtTrainer.__name__ = DemoPetCtTrainer.__qualname__ = name
    return DemoPetCtTrainer


def train_fold(
    trainer_cls,
    plans_file: Path,
    pre_root: Path,
    fold: int,
    train_patch: list[int] | None,
    dataset_name: str = DATASET_NAME,
) -> tuple[Path, float]:
    import torch

    plans = json.loads(plans_file.read_text())
    if train_patch:
        # Train on crops smaller than the plans' (inference) patch: the network is fully
        # convolutional and the patch must only be divisible by the strides, see README.
        plans["configurations"][CONFIGURATION]["patch_size"] = list(train_patch)
    plans["continue_training"] = False  # nnunetv2 2.8's run_training passes this inside the plans
    dataset_json = json.loads((pre_root / dataset_name / "dataset.json").read_text())
    trainer = trainer_cls(
        plans=plans, configuration=CONFIGURATION, fold=fold, dataset_json=dataset_json, device=torch.device("cpu")
    )
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    t0 = time.perf_counter()
    trainer.run_training()
    seconds = time.perf_counter() - t0
    ckpt = Path(trainer.output_folder) / "checkpoint_final.pth"
    if not ckpt.is_file():
        raise RuntimeError(f"fold {fold}: no {ckpt}")
    return ckpt, seconds


def _half_weights(weights: dict) -> dict:
    """float16 copies of the float tensors. Tensors shared under two keys (the decoder keeps a
    reference to the encoder) stay shared, so each is stored once."""
    converted: dict = {}
    out = {}
    for key, tensor in weights.items():
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if ident not in converted:
            converted[ident] = tensor.half().contiguous() if tensor.is_floating_point() else tensor.contiguous()
        out[key] = converted[ident]
    return out


def export_checkpoint(src: Path, dst: Path, trained_with: str, trainer_name: str = "nnUNetTrainer") -> None:
    """Copy a checkpoint for inference only: no optimizer state, weights stored as float16
    (half the size; torch's load_state_dict casts them back into the float32 network),
    `trainer_name` recorded (default nnUNetTrainer).

    nnUNetPredictor looks `trainer_name` up inside the installed nnunetv2.training.nnUNetTrainer
    package and only calls its `build_network_architecture` (from the plans). The demo trainer is
    defined in this script and does not override that method, so the stock nnUNetTrainer builds
    the identical network; recording it keeps the folder loadable by plain nnU-Net.
    """
    import torch

    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    slim = {
        "network_weights": _half_weights(ckpt["network_weights"]),
        "init_args": ckpt["init_args"],
        "trainer_name": trainer_name,
        "trained_with": trained_with,
        "current_epoch": ckpt.get("current_epoch"),
        "inference_allowed_mirroring_axes": ckpt.get("inference_allowed_mirroring_axes"),
    }
    init_args = dict(slim["init_args"])
    if "device" in init_args:
        init_args["device"] = str(init_args["device"])
    slim["init_args"] = init_args
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, dst)


# --------------------------------------------------------------------------- validation
def evaluate(model_dir: Path, n_cases: int, folds=tuple(range(N_FOLDS)), threads: int | None = None) -> dict:
    import numpy as np
    from scipy import ndimage

    from dicomnode.synth.petct_phantom import PET_GRID
    from inference import SegmentationModel

    t0 = time.perf_counter()
    model = SegmentationModel(model_dir, folds=tuple(folds), device="cpu", use_mirroring=False, threads=threads)
    load_s = time.perf_counter() - t0
    found = total = false_pos = 0
    dices, times, rows = [], [], []
    for i in range(n_cases):
        seed = HOLDOUT_SEED0 + i
        channels, truth, ph = phantom_case(seed)
        t0 = time.perf_counter()
        pred = model.predict(channels, PET_GRID.spacing)
        times.append(time.perf_counter() - t0)
        p = pred > 0
        t = truth > 0
        dice = 2.0 * (p & t).sum() / max(1, p.sum() + t.sum())
        hit = [bool(p[truth == k].any()) for k in range(1, len(ph.lesions) + 1)]
        comps, n_comp = ndimage.label(p)
        fp = sum(1 for c in range(1, n_comp + 1) if not t[comps == c].any())
        found += sum(hit)
        total += len(hit)
        false_pos += fp
        dices.append(dice)
        rows.append(
            {
                "seed": seed,
                "lesions": len(hit),
                "found": sum(hit),
                "dice": round(float(dice), 3),
                "false_positive_components": fp,
                "seconds": round(times[-1], 2),
            }
        )
        log(
            f"  held-out seed {seed}: {sum(hit)}/{len(hit)} lesions found, Dice {dice:.3f}, "
            f"{fp} false-positive components, {times[-1]:.1f} s"
        )
    return {
        "cases": n_cases,
        "seeds": f"{HOLDOUT_SEED0}..{HOLDOUT_SEED0 + n_cases - 1}",
        "lesions_found": found,
        "lesions_total": total,
        "mean_dice": float(np.mean(dices)),
        "min_dice": float(np.min(dices)),
        "false_positive_components": false_pos,
        "load_seconds": load_s,
        "predict_seconds_first": times[0],
        "predict_seconds_median": float(np.median(times)),
        "threads": model.threads,
        "per_case": rows,
    }


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_readme(out: Path, info: dict) -> None:
    ev = info["evaluation"]
    cfg = info["plans_summary"]
    fold_lines = "\n".join(f"| {k} | {s:.0f} s |" for k, s in enumerate(info["fold_seconds"]))
    case_lines = "\n".join(
        f"| {r['seed']} | {r['found']}/{r['lesions']} | {r['dice']:.3f} | {r['false_positive_components']} |"
        for r in ev["per_case"]
    )
    text = f"""# demo-petct: synthetic PET/CT lesion model (nnU-Net v2, ResEnc)

A tiny nnU-Net v2 model that segments the hot spherical "lesions" of the synthetic phantoms in
`dicomnode/synth/petct_phantom.py`. It exists so the node can be run and tested end to end without the real
model. **Not a clinical model**: it has only ever seen synthetic phantoms.

It has the nnU-Net v2 release layout, the same as the published GLOW-FDG weights:

```
dataset.json  plans.json  fold_0..fold_4/checkpoint_final.pth
```

Input contract (same as GLOW-FDG / autoPET): channel 0 = CT in HU resampled onto the PET grid,
channel 1 = PET in SUVbw, both on one grid (`channel_names` {json.dumps(CHANNEL_NAMES)}); output
labels {json.dumps(LABELS)}. Load it with `inference.SegmentationModel("models/demo-petct")`, which
goes through `nnUNetPredictor.initialize_from_trained_model_folder`; replacing this folder by the
real GLOW-FDG folder uses the same code path.

## How it was made

```
{info["command"]}
```

(nnunetv2 {info["versions"]["nnunetv2"]}, torch {info["versions"]["torch"]}, CPU only, {info["cpus"]} cores,
about {info["total_minutes"]:.0f} min in all.)

1. {info["n_cases"]} training phantoms, `random_phantom(seed)` for seeds
   {TRAIN_SEED0}..{TRAIN_SEED0 + info["n_cases"] - 1} ({info["n_train_lesions"]} lesions), rasterised on the PET grid
   (64 x 64 x 64 voxels, spacing z, y, x = 3.0, 4.08, 4.08 mm): `ct_hu` and `pet_suv` as channels,
   `lesion_masks > 0` as label, written as nnU-Net raw NIfTI (`{DATASET_NAME}`) in a temporary work folder.
2. nnU-Net fingerprint + planning with **`{PLANNER}`** (GLOW-FDG is a ResEnc L model) and
   `overwrite_target_spacing` = {list(TARGET_SPACING)} mm (GLOW-FDG's 3d_fullres spacing), so
   nnU-Net itself derives patch size and topology for the resampled 64 x 128 x 128 images.
   Then the plans were edited to make it CPU-sized: `features_per_stage` {cfg["features_per_stage"]}
   (planner: {cfg["planned_features_per_stage"]}), batch size {cfg["batch_size"]}
   (planner: {cfg["planned_batch_size"]}). Unchanged from the planner: network class
   `{cfg["network_class_name"]}`, {cfg["n_stages"]} stages, blocks per stage
   {cfg["n_blocks_per_stage"]}, strides {cfg["strides"]}, patch size {cfg["patch_size"]}
   (the whole resampled image), normalisation {cfg["normalization_schemes"]}.
3. nnU-Net preprocessing and training of 5 folds (nnU-Net's own 5-fold split) with
   `DemoPetCtTrainer`, a subclass of `nnUNetTrainer` defined in the script: {info["iterations"]}
   iterations per fold ({info["epochs"]} epochs x {info["iters_per_epoch"]} iterations), foreground
   oversampling 1.0 (an earlier run with nnU-Net's default 0.33 and this few iterations had 2 of
   5 folds predicting nothing), everything else nnUNetTrainer's defaults (SGD, poly LR from 1e-2,
   Dice + CE with deep supervision, nnU-Net's data augmentation).
   {info["train_patch_note"]}
4. Export: `dataset.json`, `plans.json` and each fold's `checkpoint_final.pth` with the optimizer
   state dropped. **`trainer_name` is recorded as `nnUNetTrainer`** (the real trainer is noted under
   the extra key `trained_with`). Reason: `nnUNetPredictor` looks `trainer_name` up inside the
   installed `nnunetv2.training.nnUNetTrainer` package and only uses it to call
   `build_network_architecture(plans...)`. `DemoPetCtTrainer` lives in the script and does not
   override that method, so stock `nnUNetTrainer` builds the identical network and the folder
   loads with plain nnU-Net, no extra code installed.

Per-fold training time on this machine (CPU, {info["cpus"]} cores):

| fold | time |
|---|---|
{fold_lines}

## Validation (5-fold ensemble, CPU, no mirroring, tile step 0.5)

{ev["cases"]} held-out phantoms (seeds {ev["seeds"]}, never used in training), fed exactly as the node
feeds them (CT on the PET grid + PET SUV, 64 x 64 x 64 at 3.0 x 4.08 x 4.08 mm). A planted lesion
counts as found if the predicted mask overlaps it.

* lesions found: **{ev["lesions_found"]}/{ev["lesions_total"]}**
* mean Dice (lesion vs. background, per case): **{ev["mean_dice"]:.3f}** (lowest {ev["min_dice"]:.3f})
* false-positive components (predicted blobs touching no lesion), all cases: {ev["false_positive_components"]}
* prediction time per case, 5 folds, no mirroring, {ev["threads"]} CPU threads: **{ev["predict_seconds_median"]:.1f} s**
  (first call {ev["predict_seconds_first"]:.1f} s; loading the 5 folds {ev["load_seconds"]:.1f} s)

| seed | lesions found | Dice | false-positive components |
|---|---|---|---|
{case_lines}

Folder size: {info["folder_bytes"] / 1e6:.1f} MB.
"""
    (out / "README.md").write_text(text)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "models" / "demo-petct")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="nnUNet_raw/preprocessed/results go here (default: a temporary folder, removed at the end)",
    )
    parser.add_argument("--iterations", type=int, default=100, help="training iterations per fold")
    parser.add_argument("--iters-per-epoch", type=int, default=20)
    parser.add_argument(
        "--train-patch",
        type=int,
        nargs=3,
        default=[32, 64, 64],
        help="training crop (z y x) if smaller than the plans' patch; 0 0 0 = plans' patch",
    )
    parser.add_argument("--cases", type=int, default=24, help="synthetic training cases")
    parser.add_argument("--folds", type=int, nargs="*", default=list(range(N_FOLDS)))
    parser.add_argument("--val-cases", type=int, default=6, help="held-out phantoms for the validation figures")
    parser.add_argument("--n-proc-da", type=int, default=1, help="nnU-Net data-augmentation worker processes")
    parser.add_argument(
        "--evaluate-only", action="store_true", help="skip training; only validate an existing --out folder"
    )
    args = parser.parse_args(argv)
    if args.train_patch and not any(args.train_patch):
        args.train_patch = None
    command = "python scripts/make_demo_model.py " + " ".join(
        a if " " not in a else repr(a) for a in (argv if argv is not None else sys.argv[1:])
    )

    out: Path = args.out.resolve()
    if args.evaluate_only:
        ev = evaluate(out, args.val_cases, folds=args.folds)
        print(json.dumps({k: v for k, v in ev.items() if k != "per_case"}, indent=2))
        return 0

    t_start = time.perf_counter()
    keep_work = args.work_dir is not None
    work_dir = (args.work_dir or Path(tempfile.mkdtemp(prefix="demo-petct-nnunet-"))).resolve()
    if REPO in work_dir.parents or work_dir == REPO:
        parser.error("--work-dir must be outside the repository")
    dirs = configure_environment(work_dir, args.n_proc_da)
    log(f"nnU-Net work folder: {work_dir}")
    ncpu = max(1, len(os.sched_getaffinity(0)))

    import nnunetv2
    import torch

    write_raw_dataset(dirs["nnUNet_raw"], args.cases)
    plans_file = plan_and_preprocess(dirs["nnUNet_preprocessed"], n_proc=ncpu)
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"][CONFIGURATION]

    trainer_cls = make_trainer_class(args.iterations, args.iters_per_epoch)
    epochs = max(1, round(args.iterations / args.iters_per_epoch))
    staging = work_dir / "export"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    fold_seconds = []
    for fold in args.folds:
        log(f"training fold {fold} ({epochs} epochs x {args.iters_per_epoch} iterations)")
        ckpt, seconds = train_fold(trainer_cls, plans_file, dirs["nnUNet_preprocessed"], fold, args.train_patch)
        fold_seconds.append(seconds)
        log(f"fold {fold} trained in {seconds:.0f} s")
        export_checkpoint(
            ckpt,
            staging / f"fold_{fold}" / "checkpoint_final.pth",
            trained_with=f"{trainer_cls.__name__} (scripts/make_demo_model.py: "
            f"{args.iterations} iterations, foreground oversampling 1.0)",
        )
    # plans.json as planned and edited above (inference patch size), not the trainer's copy
    # (which carries the smaller training crop when --train-patch is used)
    shutil.copy(dirs["nnUNet_preprocessed"] / DATASET_NAME / "dataset.json", staging / "dataset.json")
    shutil.copy(plans_file, staging / "plans.json")

    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(staging, out)
    log(f"model written to {out}; validating the {len(args.folds)}-fold ensemble on held-out phantoms")

    ev = evaluate(out, args.val_cases, folds=args.folds)
    kw = cfg["architecture"]["arch_kwargs"]
    planned = (
        json.loads((work_dir / "planned_3d_fullres.json").read_text())
        if (work_dir / "planned_3d_fullres.json").exists()
        else {}
    )
    info = {
        "command": command,
        "versions": {
            "nnunetv2": getattr(nnunetv2, "__version__", _pkg_version("nnunetv2")),
            "torch": torch.__version__,
        },
        "cpus": ncpu,
        "n_cases": args.cases,
        "n_train_lesions": sum(len(phantom_case(TRAIN_SEED0 + i)[2].lesions) for i in range(args.cases)),
        "iterations": epochs * args.iters_per_epoch,
        "epochs": epochs,
        "iters_per_epoch": args.iters_per_epoch,
        "fold_seconds": fold_seconds,
        "plans_summary": {
            "network_class_name": cfg["architecture"]["network_class_name"],
            "features_per_stage": kw["features_per_stage"],
            "planned_features_per_stage": planned.get("features_per_stage", "?"),
            "batch_size": cfg["batch_size"],
            "planned_batch_size": planned.get("batch_size", "?"),
            "n_stages": kw["n_stages"],
            "n_blocks_per_stage": kw.get("n_blocks_per_stage"),
            "strides": kw["strides"],
            "patch_size": cfg["patch_size"],
            "normalization_schemes": cfg["normalization_schemes"],
        },
        "evaluation": ev,
        "train_patch_note": (
            f"Training crops were {args.train_patch} voxels (z, y, x), batch {cfg['batch_size']}, "
            f"smaller than the {cfg['patch_size']} patch in plans.json: one training step on the full "
            "patch takes 4-5 s on 2 CPU cores, on the crop about 0.7 s. The network is fully "
            "convolutional and the crop is divisible by the strides, so the same weights run on the "
            "plans' patch at inference, where one window covers the whole resampled PET-grid "
            "volume (fast sliding window). The trainer's own plans copy (with the crop) is recorded "
            "in each checkpoint's init_args; plans.json here is the planned one."
            if args.train_patch
            else f"Training used the plans' patch {cfg['patch_size']}, batch {cfg['batch_size']}."
        ),
        "total_minutes": (time.perf_counter() - t_start) / 60.0,
        "folder_bytes": 0,
    }
    write_readme(out, info)
    info["folder_bytes"] = folder_size(out)
    write_readme(out, info)
    if not keep_work:
        shutil.rmtree(work_dir, ignore_errors=True)

    log("done")
    print(
        json.dumps(
            {
                "out": str(out),
                "fold_seconds": [round(s) for s in fold_seconds],
                "lesions_found": f"{ev['lesions_found']}/{ev['lesions_total']}",
                "mean_dice": round(ev["mean_dice"], 3),
                "false_positive_components": ev["false_positive_components"],
                "predict_seconds_per_case": round(ev["predict_seconds_median"], 2),
                "folder_mb": round(info["folder_bytes"] / 1e6, 2),
            },
            indent=2,
        )
    )
    return 0


def _pkg_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main())
