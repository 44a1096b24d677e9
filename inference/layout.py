"""Where an nnU-Net v2 model's files are: the release layout or nnU-Net's results layout.

Release layout (what GLOW-FDG publishes, `nnUNetv2_export_model_to_zip` flattened)::

    model/  dataset.json  plans.json  fold_0/checkpoint_final.pth ...

Results layout (what `nnUNetv2_train` writes under nnUNet_results, what TotalSegmentator
downloads)::

    Dataset291_X/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres/
        dataset.json  plans.json  fold_0/checkpoint_final.pth

The configured path may be the release folder, the Trainer__Plans__configuration folder, the
DatasetXXX folder above it, or a folder holding DatasetXXX folders; trainer, plans and
configuration pick one trained model where there are several. Nothing is imported or
loaded here: only names and paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PLAN_FILES = ("dataset.json", "plans.json")
_SEPARATOR = "__"


@dataclass(frozen=True)
class ModelFolder:
    """The folder that holds dataset.json, plans.json and fold_k, and what its name says."""

    path: Path  # what was configured
    root: Path  # the folder with dataset.json, plans.json and fold_k/
    layout: Literal["release", "results"]
    trainer: str | None = None  # from Trainer__Plans__configuration, or as configured
    plans: str | None = None
    configuration: str | None = None

    def checkpoint(self, fold: int | str, checkpoint_name: str) -> Path:
        return self.root / f"fold_{fold}" / checkpoint_name

    def code_folders(self) -> list[Path]:
        """Folders where a custom trainer's .py may ship: the model folder, its `trainer/`
        subfolder, and the same for the configured path when it is above the model folder."""
        candidates = [self.root, self.root / "trainer", self.path, self.path / "trainer"]
        unique: list[Path] = []
        for folder in candidates:
            if folder.is_dir() and folder not in unique and any(folder.glob("*.py")):
                unique.append(folder)
        return unique


def parse_results_name(name: str) -> tuple[str, str, str] | None:
    """("nnUNetTrainer", "nnUNetPlans", "3d_fullres") from "nnUNetTrainer__nnUNetPlans__3d_fullres"."""
    parts = name.split(_SEPARATOR)
    if len(parts) != 3 or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


def resolve_model_folder(
    path: str | os.PathLike,
    configuration: str | None = None,
    trainer: str | None = None,
    plans: str | None = None,
) -> ModelFolder:
    """The model folder under `path`; FileNotFoundError or ValueError with a reason otherwise."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    wanted = {"trainer": trainer, "plans": plans, "configuration": configuration}
    if _has_plan_files(path):
        names = parse_results_name(path.name)
        if names is None:
            return ModelFolder(path, path, "release", trainer, plans, configuration)
        _check_names(path, names, wanted)
        return ModelFolder(path, path, "results", *names)

    found = _results_folders(path)
    matching = [f for f in found if _matches(parse_results_name(f.name), wanted)]
    if len(matching) == 1:
        return ModelFolder(path, matching[0], "results", *parse_results_name(matching[0].name))
    if not found:
        raise FileNotFoundError(
            f"{path} is not an nnU-Net v2 model folder: no dataset.json and plans.json, and no "
            "Trainer__Plans__configuration folder with them (looked in it and two levels below)")
    listed = ", ".join(str(f.relative_to(path)) for f in found)
    asked = ", ".join(f"{k} = {v!r}" for k, v in wanted.items() if v) or "nothing"
    if not matching:
        raise ValueError(f"{path}: no trained model matches {asked}; there are: {listed}")
    raise ValueError(f"{path} holds several trained models ({listed}); "
                     "set trainer, plans and configuration to choose one")


def _has_plan_files(folder: Path) -> bool:
    return all((folder / name).is_file() for name in PLAN_FILES)


def _results_folders(path: Path) -> list[Path]:
    """Trainer__Plans__configuration folders with plan files in `path`, one or two levels down."""
    found = []
    for pattern in ("*", "*/*"):
        for folder in sorted(path.glob(pattern)):
            if folder.is_dir() and parse_results_name(folder.name) and _has_plan_files(folder):
                found.append(folder)
    return found


def _matches(names: tuple[str, str, str] | None, wanted: dict[str, str | None]) -> bool:
    if names is None:
        return False
    return all(value is None or value == got for value, got in zip(wanted.values(), names))


def _check_names(folder: Path, names: tuple[str, str, str], wanted: dict[str, str | None]) -> None:
    for (key, value), got in zip(wanted.items(), names):
        if value is not None and value != got:
            raise ValueError(f"{folder}: the folder name says {key} {got!r}, configured {value!r}")
