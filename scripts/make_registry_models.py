#!/usr/bin/env python
"""Build the registry's tiny stand-in models (models/lymph-ct, glioma-mr, organs-ct) with nnU-Net v2.

Each stand-in has the on-disk format of a published model the node must run, trained here on
the synthetic cases of dicomnode/registry_cases.py with nnU-Net's own fingerprinting, planning
(nnU-Net's default planner, widths and batch shrunk to CPU size), preprocessing and trainer:

    lymph-ct   LN-Seg-FM's format: release layout, CT only, a custom trainer class
               (nnUNetTrainer_DGST) whose .py ships in the folder; labels background, lymph_node
    glioma-mr  BraTS format: release layout, four MR channels FLAIR, T1, T1CE, T2; labels
               necrosis, oedema, enhancing_tumour
    organs-ct  STU-Net / TotalSegmentator format: results layout
               Dataset090_Organs/STUNetTrainer__nnUNetPlans__3d_fullres/fold_0, one fold, seven
               organs, a custom trainer and network class shipped in that folder, and
               label_codes.json (label -> SNOMED CT code) at the top

The trainer .py files are part of the model folders (written by hand, kept when a model is
rebuilt); this script trains with exactly those classes (a subclass shortens the schedule, the
checkpoint names the shipped class). Each folder gets a README with Dice per label on
held-out seeds and seconds per case.

    .venv/bin/python scripts/make_registry_models.py [--models lymph-ct glioma-mr organs-ct]

nnU-Net's data-augmentation workers may re-import this file, hence the `__main__` guard.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts")] if str(REPO / "scripts") not in sys.path else []  # make_demo_model beside it

import make_demo_model as demo  # noqa: E402  (shared nnU-Net helpers)

TRAIN_SEED0 = 0  # phantoms' training seeds are 0..999
HOLDOUT_SEED0 = 2000  # validation seeds for the READMEs; the tests use 1000..1999
PLANNER = "ExperimentPlanner"  # nnU-Net's default planner, plans "nnUNetPlans"
PLANS_NAME = "nnUNetPlans"

# Anatomical Structure, and SNOMED CT codes of the organs (DICOM CID 7154 / 4031 and SNOMED CT)
ANATOMY = ["123037004", "SCT", "Anatomical Structure"]
ORGAN_CODES = {
    "spleen": ["78961009", "SCT", "Spleen"],
    "kidney_right": ["9846003", "SCT", "Right kidney"],
    "kidney_left": ["18639004", "SCT", "Left kidney"],
    "gallbladder": ["28231008", "SCT", "Gallbladder"],
    "liver": ["10200004", "SCT", "Liver"],
    "stomach": ["69695003", "SCT", "Stomach"],
    "aorta": ["15825003", "SCT", "Aorta"],
}


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    dataset_id: int
    case: str  # function name in dicomnode.synth.registry_cases
    channels: tuple[str, ...]
    trainer: str  # class name; its .py in `code_dir` or nnunetv2's
    folds: tuple[int, ...]
    iterations: int
    train_patch: tuple[int, int, int]  # training crop (z, y, x); inference uses the plans' patch
    oversample_foreground: float  # share of training crops centred on a foreground voxel
    layout: str  # "release" or "results"
    format_note: str
    augmentation: bool = True  # nnU-Net's spatial and intensity augmentation while training
    # plans.json gets the training crop as its patch, so inference tiles with what training saw
    # (else the planner's larger patch, the network being fully convolutional)
    ship_training_patch: bool = False

    @property
    def dataset_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name.replace('-', '')}"

    def model_root(self, out: Path) -> Path:
        """The folder with dataset.json, plans.json and fold_k."""
        if self.layout == "results":
            return out / "Dataset090_Organs" / f"{self.trainer}__{PLANS_NAME}__{demo.CONFIGURATION}"
        return out


SPECS = {
    "lymph-ct": Spec(
        "lymph-ct",
        901,
        "lymph_node_case",
        ("CT",),
        "nnUNetTrainer_DGST",
        (0,),
        600,
        (16, 32, 32),
        0.5,
        "release",
        "LN-Seg-FM (CT lymph nodes): release layout, CT only, custom trainer "
        "`nnUNetTrainer_DGST` in `nnUNetTrainer_DGST.py` beside dataset.json",
    ),
    "glioma-mr": Spec(
        "glioma-mr",
        902,
        "glioma_case",
        ("FLAIR", "T1", "T1CE", "T2"),
        "nnUNetTrainer",
        (0,),
        600,
        (16, 32, 32),
        1.0,
        "release",
        "BraTS-style glioma model: release layout, four MR channels "
        "FLAIR, T1, T1CE, T2 (dataset.json channel_names), BraTS labels",
    ),
    # Seven labels, two of them (the kidneys) told apart only by side: with nnU-Net's augmentation
    # 800 CPU iterations learned the liver alone, so this one trains on the unaugmented crops. Its
    # plans carry the crop as patch: on the planner's whole-image patch the instance norms saw
    # other statistics and the gallbladder and stomach fell to Dice 0.29 and 0.39 held out.
    "organs-ct": Spec(
        "organs-ct",
        90,
        "organ_case",
        ("CT",),
        "STUNetTrainer",
        (0,),
        3000,
        (32, 64, 64),
        1.0,
        "results",
        "STU-Net / TotalSegmentator-style organ model: results layout "
        "`Dataset090_Organs/STUNetTrainer__nnUNetPlans__3d_fullres/fold_0`, one fold, seven "
        "labels, custom trainer `STUNetTrainer.py` building the network class in `stunet.py`, "
        "label codes in `label_codes.json`",
        augmentation=False,
        ship_training_patch=True,
    ),
}


def make_case(spec: Spec, seed: int):
    from dicomnode.synth import registry_cases

    return getattr(registry_cases, spec.case)(seed)


# --------------------------------------------------------------------------- raw data
def write_raw_dataset(spec: Spec, raw_root: Path, n_cases: int) -> dict:
    import numpy as np

    ds = demo.fresh_raw_dataset(raw_root, spec.dataset_name)
    for i in range(n_cases):
        case = make_case(spec, TRAIN_SEED0 + i)
        stem = f"{spec.name.replace('-', '_')}_{TRAIN_SEED0 + i:04d}"
        for c, role in enumerate(spec.channels):
            demo.write_nifti(case.channels[role], case.grid, ds / "imagesTr" / f"{stem}_{c:04d}.nii.gz")
        demo.write_nifti(case.labels.astype(np.uint8), case.grid, ds / "labelsTr" / f"{stem}.nii.gz")
    labels = {"background": 0, **{name: value for value, name in sorted(case.label_names.items())}}
    dataset_json = {
        "channel_names": {str(c): role for c, role in enumerate(spec.channels)},
        "labels": labels,
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "name": spec.name,
        "description": f"Stand-in for {spec.format_note.split(':')[0]}, trained on synthetic cases "
        f"(dicomnode.synth.registry_cases.{spec.case}). Not a clinical model.",
        "reference": "dicomnode scripts/make_registry_models.py",
        "licence": "same as dicomnode",
    }
    (ds / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    demo.log(f"{spec.name}: wrote {n_cases} training cases to {ds}")
    return dataset_json


# --------------------------------------------------------------------------- training
def train(spec: Spec, out: Path, dirs: dict[str, Path], n_cases: int, n_proc: int) -> dict:
    from inference.layout import ModelFolder
    from inference.trainers import find_trainer_class

    write_raw_dataset(spec, dirs["nnUNet_raw"], n_cases)
    plans_file = demo.plan_and_preprocess(
        dirs["nnUNet_preprocessed"],
        n_proc,
        dataset_id=spec.dataset_id,
        dataset_name=spec.dataset_name,
        planner=PLANNER,
        plans_name=PLANS_NAME,
        target_spacing=None,
    )
    root = spec.model_root(out)
    shipped = find_trainer_class(spec.trainer, ModelFolder(out, root, spec.layout).code_folders())
    trainer_cls = demo.make_trainer_class(
        spec.iterations,
        20,
        base=shipped,
        name=f"{spec.trainer}_short",
        oversample_foreground=spec.oversample_foreground,
    )
    if not spec.augmentation:
        trainer_cls = without_augmentation(trainer_cls)
    for stale in [*root.glob("*.json"), *root.glob("fold_*")]:  # the shipped .py files stay
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    fold_seconds = []
    for fold in spec.folds:
        demo.log(f"{spec.name}: training fold {fold} ({spec.iterations} iterations, {spec.trainer})")
        ckpt, seconds = demo.train_fold(
            trainer_cls,
            plans_file,
            dirs["nnUNet_preprocessed"],
            fold,
            list(spec.train_patch),
            dataset_name=spec.dataset_name,
        )
        fold_seconds.append(seconds)
        demo.export_checkpoint(
            ckpt,
            root / f"fold_{fold}" / "checkpoint_final.pth",
            trained_with=f"{trainer_cls.__name__} (scripts/make_registry_models.py: "
            f"{spec.iterations} iterations, foreground oversampling "
            f"{spec.oversample_foreground})",
            trainer_name=spec.trainer,
        )
    shutil.copy(dirs["nnUNet_preprocessed"] / spec.dataset_name / "dataset.json", root / "dataset.json")
    shipped_plans = json.loads(plans_file.read_text())
    plans = shipped_plans["configurations"][demo.CONFIGURATION]
    planned_patch = list(plans["patch_size"])
    if spec.ship_training_patch:
        plans["patch_size"] = list(spec.train_patch)
    (root / "plans.json").write_text(json.dumps(shipped_plans, indent=4))
    return {
        "fold_seconds": fold_seconds,
        "patch_size": planned_patch,
        "inference_patch": plans["patch_size"],
        "spacing": plans["spacing"],
        "n_stages": len(plans["architecture"]["arch_kwargs"]["strides"]),
        "features": plans["architecture"]["arch_kwargs"]["features_per_stage"],
    }


def without_augmentation(trainer_cls):
    """`trainer_cls` trained on the plain crops, as nnU-Net's nnUNetTrainerNoDA does: the
    validation transforms (deep-supervision targets only) in place of the training ones, and
    crops of the patch size since nothing is rotated. Only training changes, not the network."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class NoAugmentation(trainer_cls):
        @staticmethod
        def get_training_transforms(
            patch_size,
            rotation_for_DA,
            deep_supervision_scales,
            mirror_axes,
            do_dummy_2d_data_aug,
            use_mask_for_norm=None,
            is_cascaded=False,
            foreground_labels=None,
            regions=None,
            ignore_label=None,
        ):
            return nnUNetTrainer.get_validation_transforms(
                deep_supervision_scales, is_cascaded, foreground_labels, regions, ignore_label
            )

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
            rotation, dummy_2d, _, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            return rotation, dummy_2d, self.configuration_manager.patch_size, mirror_axes

    NoAugmentation.__name__ = NoAugmentation.__qualname__ = f"{trainer_cls.__name__}_noDA"
    return NoAugmentation


def write_label_codes(spec: Spec, out: Path) -> None:
    if spec.name != "organs-ct":
        return
    from dicomnode.synth.registry_cases import ORGAN_LABELS

    table = {
        str(value): {"name": name, "category": ANATOMY, "type": ORGAN_CODES[name]}
        for value, name in ORGAN_LABELS.items()
    }
    (out / "label_codes.json").write_text(json.dumps(table, indent=2) + "\n")


# --------------------------------------------------------------------------- validation
def evaluate(spec: Spec, out: Path, n_cases: int) -> dict:
    import numpy as np

    from inference import SegmentationModel

    model = SegmentationModel(out, folds=spec.folds, device="cpu", use_mirroring=False)
    dices: dict[str, list[float]] = {name: [] for name in model.labels if name != "background"}
    seconds = []
    for i in range(n_cases):
        case = make_case(spec, HOLDOUT_SEED0 + i)
        channels = np.stack([case.channels[role] for role in spec.channels])
        t0 = time.perf_counter()
        pred = model.predict(channels, case.grid.spacing)
        seconds.append(time.perf_counter() - t0)
        for name in dices:
            value = model.labels[name]
            p, t = pred == value, case.labels == value
            dices[name].append(float(2.0 * (p & t).sum() / max(1, p.sum() + t.sum())))
        demo.log(
            f"{spec.name}: held-out seed {HOLDOUT_SEED0 + i}: "
            + ", ".join(f"{n} {d[-1]:.3f}" for n, d in dices.items())
            + f", {seconds[-1]:.1f} s"
        )
    return {
        "dice": {n: (float(np.mean(d)), float(np.min(d))) for n, d in dices.items()},
        "seconds": float(np.median(seconds)),
        "cases": n_cases,
        "threads": model.threads,
    }


def write_readme(spec: Spec, out: Path, info: dict, ev: dict) -> None:
    rows = "\n".join(f"| {n} | {mean:.3f} | {low:.3f} |" for n, (mean, low) in ev["dice"].items())
    folds = "\n".join(f"| {f} | {s:.0f} s |" for f, s in zip(spec.folds, info["fold_seconds"]))
    tree = "\n".join(
        sorted(
            str(p.relative_to(out))
            for p in out.rglob("*")
            if p.is_file() and p.name != "README.md" and not p.name.startswith(".") and "__pycache__" not in p.parts
        )
    )
    patch_note = (
        "and plans.json carries that crop as its patch, so inference tiles the image with it"
        if spec.ship_training_patch
        else "the network being fully convolutional, while inference uses the plans' patch"
    )
    augmentation = "" if spec.augmentation else ", no data augmentation as in nnU-Net's `nnUNetTrainerNoDA`"
    text = f"""# {spec.name}: tiny stand-in with the on-disk format of a published model

{spec.format_note}. Trained here on synthetic cases (`dicomnode.synth.registry_cases.{spec.case}`, seeds
{TRAIN_SEED0}..{TRAIN_SEED0 + info["n_cases"] - 1}) so the node can run this format end to end
without the real weights. **Not a clinical model.** A site replaces this folder by the real
one and changes nothing else.

```
{tree}
```

Channels (dataset.json, in order): {", ".join(spec.channels)}. Labels: {json.dumps(info["labels"])}.

## How it was made

```
{info["command"]}
```

nnU-Net {info["nnunet"]} on the CPU ({info["cpus"]} cores): fingerprint and `{PLANNER}` planning
(plans `{PLANS_NAME}`, 3d_fullres: spacing {info["spacing"]} mm, patch {info["patch_size"]},
{info["n_stages"]} stages), then widths shrunk to {info["features"]} and batch size
{demo.BATCH_SIZE} (scripts/make_demo_model.py's `plan_and_preprocess`), nnU-Net preprocessing, and
training with the shipped trainer class `{spec.trainer}` (a subclass shortens the schedule to
{spec.iterations} iterations, {spec.oversample_foreground:.0%} of the crops centred on foreground{augmentation};
nnU-Net's 5-fold split, folds {list(spec.folds)}; crops {list(spec.train_patch)} voxels, {patch_note}).
Checkpoints: optimizer state dropped, weights float16,
`trainer_name` = `{spec.trainer}`.

| fold | training time |
|---|---|
{folds}

## Validation

{ev["cases"]} held-out cases (seeds {HOLDOUT_SEED0}..{HOLDOUT_SEED0 + ev["cases"] - 1}), folds
{list(spec.folds)}, CPU, no mirroring, tile step 0.5, {ev["threads"]} threads:
**{ev["seconds"]:.2f} s per case** (median).

| label | mean Dice | lowest Dice |
|---|---|---|
{rows}

Folder size: {demo.folder_size(out) / 1e6:.1f} MB.
"""
    (out / "README.md").write_text(text)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--out-root", type=Path, default=REPO / "models")
    parser.add_argument("--cases", type=int, default=24, help="synthetic training cases per model")
    parser.add_argument("--val-cases", type=int, default=4)
    parser.add_argument(
        "--iterations", type=int, default=None, help="training iterations per fold (default: each model's own)"
    )
    parser.add_argument("--evaluate-only", action="store_true", help="only validate and rewrite the READMEs")
    args = parser.parse_args(argv)
    command = "python scripts/make_registry_models.py " + " ".join(argv if argv is not None else sys.argv[1:])

    work_dir = Path(tempfile.mkdtemp(prefix="registry-models-"))
    dirs = demo.configure_environment(work_dir, n_proc_da=1)
    n_proc = max(1, len(os.sched_getaffinity(0)))
    import nnunetv2  # noqa: F401  (after the environment is set)

    summary = {}
    for name in args.models:
        spec, out = SPECS[name], (args.out_root / name).resolve()
        if args.iterations:
            spec = dataclasses.replace(spec, iterations=args.iterations)
        info_file = out / ".build.json"
        if args.evaluate_only:
            info = json.loads(info_file.read_text())
        else:
            info = train(spec, out, dirs, args.cases, n_proc)
            info.update(
                command=command,
                n_cases=args.cases,
                nnunet=demo._pkg_version("nnunetv2"),
                cpus=n_proc,
                labels=json.loads((spec.model_root(out) / "dataset.json").read_text())["labels"],
            )
            info_file.write_text(json.dumps(info, indent=2))
            write_label_codes(spec, out)
        ev = evaluate(spec, out, args.val_cases)
        write_readme(spec, out, info, ev)
        summary[name] = {
            "dice": {n: round(m, 3) for n, (m, _) in ev["dice"].items()},
            "seconds_per_case": round(ev["seconds"], 2),
            "fold_seconds": [round(s) for s in info["fold_seconds"]],
            "folder_mb": round(demo.folder_size(out) / 1e6, 2),
        }
    shutil.rmtree(work_dir, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
