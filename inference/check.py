"""Check an nnU-Net model folder before a job needs it: its problems, and a dry run.

`check_model_folder` names every problem it finds without building the network: layout,
dataset.json and plans.json, each fold's checkpoint (present and readable), the
configuration in the plans, the trainer class (in the folder or nnunetv2), and the channel
count against the inputs the node will give. `dry_run` loads the model and segments a small
synthetic array, which runs every fold's weights through the network.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .labels import LabelsError, output_labels
from .layout import ModelFolder, resolve_model_folder
from .trainers import TrainerNotFound, find_trainer_class

if TYPE_CHECKING:
    from .model import SegmentationModel


@dataclass(frozen=True)
class Problem:
    item: str  # what is wrong: "layout", "dataset.json", "fold 2", "trainer", "channels", ...
    reason: str

    def __str__(self) -> str:
        return f"{self.item}: {self.reason}"


@dataclass(frozen=True)
class DryRun:
    seconds: float
    shape: tuple[int, int, int]
    label_values: tuple[int, ...]  # the values the model wrote into the synthetic case


def check_model_folder(
    path: str | Path,
    folds: Sequence[int | str],
    checkpoint_name: str = "checkpoint_final.pth",
    configuration: str | None = None,
    trainer: str | None = None,
    plans: str | None = None,
    n_inputs: int | None = None,
) -> list[Problem]:
    """Every problem found, each with its reason; empty when the folder looks usable.
    `n_inputs`: how many channels the node will give the model (None: not checked)."""
    try:
        folder = resolve_model_folder(path, configuration, trainer, plans)
    except (FileNotFoundError, ValueError) as exc:
        return [Problem("layout", str(exc))]
    dataset_json, problems = _read_json(folder, "dataset.json")
    plans_json, more = _read_json(folder, "plans.json")
    problems += more
    checkpoints = []
    for fold in folds:
        checkpoint, problem = _read_checkpoint(folder, fold, checkpoint_name)
        checkpoints += [checkpoint] if checkpoint else []
        problems += [problem] if problem else []
    if dataset_json is not None:
        problems += _dataset_json_problems(dataset_json, n_inputs)
    if checkpoints:
        problems += _configuration_problems(folder, checkpoints[0], plans_json, configuration)
        problems += _trainer_problems(folder, checkpoints[0])
    return problems


def dry_run(model: SegmentationModel, shape: tuple[int, int, int] = (24, 32, 32), seed: int = 0) -> DryRun:
    """Segment a small random case at the model's own spacing (every fold runs)."""
    rng = np.random.default_rng(seed)
    channels = rng.normal(0.0, 1.0, (len(model.channel_names), *shape)).astype(np.float32)
    started = time.perf_counter()
    labels = model.predict(channels, model.model_spacing)
    return DryRun(time.perf_counter() - started, shape, tuple(int(v) for v in np.unique(labels)))


def _read_json(folder: ModelFolder, name: str) -> tuple[dict | None, list[Problem]]:
    try:
        return json.loads((folder.root / name).read_text(encoding="utf-8")), []
    except FileNotFoundError:
        return None, [Problem(name, f"missing in {folder.root}")]
    except (OSError, ValueError) as exc:
        return None, [Problem(name, f"not readable JSON: {exc}")]


def _read_checkpoint(folder: ModelFolder, fold: int | str, checkpoint_name: str) -> tuple[dict | None, Problem | None]:
    import torch

    file = folder.checkpoint(fold, checkpoint_name)
    if not file.is_file():
        return None, Problem(f"fold {fold}", f"missing {file.relative_to(folder.root)} in {folder.root}")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged file
        return None, Problem(f"fold {fold}", f"{file} cannot be loaded: {type(exc).__name__}: {exc}")
    missing = [k for k in ("network_weights", "trainer_name", "init_args") if k not in checkpoint]
    if missing:
        return None, Problem(f"fold {fold}", f"{file} is not an nnU-Net v2 checkpoint (no {', '.join(missing)})")
    return checkpoint, None


def _dataset_json_problems(dataset_json: dict, n_inputs: int | None) -> list[Problem]:
    """The first of: no channel names, labels nnU-Net cannot read, a channel count other than configured."""
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not channels:
        return [Problem("dataset.json", "no channel_names")]
    try:
        output_labels(dataset_json)
    except LabelsError as exc:
        return [Problem("dataset.json", str(exc).removeprefix("dataset.json "))]
    if n_inputs is not None and n_inputs != len(channels):
        names = [channels[k] for k in sorted(channels, key=int)]
        return [Problem("channels", f"the model takes {len(channels)} channels {names}, "
                                    f"the configuration gives {n_inputs}")]
    return []


def _configuration_problems(folder: ModelFolder, checkpoint: dict, plans_json: dict | None,
                            configured: str | None) -> list[Problem]:
    trained = checkpoint["init_args"].get("configuration")
    wanted = configured or folder.configuration or trained
    if wanted != trained:
        return [Problem("configuration", f"{wanted!r} configured, the checkpoints were trained with {trained!r}")]
    available = sorted((plans_json or {}).get("configurations", {}))
    if plans_json is not None and wanted not in available:
        return [Problem("configuration", f"{wanted!r} is not in plans.json (it has {available})")]
    return []


def _trainer_problems(folder: ModelFolder, checkpoint: dict) -> list[Problem]:
    try:
        find_trainer_class(checkpoint["trainer_name"], folder.code_folders())
    except TrainerNotFound as exc:
        return [Problem("trainer", str(exc))]
    except Exception as exc:  # noqa: BLE001 - the folder's trainer code itself fails to import
        return [Problem("trainer", f"importing the trainer code failed: {type(exc).__name__}: {exc}")]
    return []
