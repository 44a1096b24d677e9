"""The worker's models: loaded once from their `[[models]]` entries (inference.SegmentationModel,
which imports torch: only here, in the worker process) and kept between jobs within a memory
budget. `dicomnode models check` loads them the same way."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from dicomnode.config import Config, ModelSettings

if TYPE_CHECKING:
    from inference import SegmentationModel

log = logging.getLogger("dicomnode.worker")  # the name it had in the worker: journald filters and tests use it


def load_model(
    settings: ModelSettings, use_mirroring: bool | None = None, device: str | None = None,
    fold_devices: list[str] | None = None,
) -> SegmentationModel:
    """The model of a `[[models]]` entry, loaded as configured (`use_mirroring` and `device`
    override the settings, e.g. for a quick dry run, or the CPU after the GPU ran out;
    `fold_devices`: its folds spread over these devices, the first its own)."""
    from inference import (
        SegmentationModel,  # torch is imported here, in the worker only
    )

    return SegmentationModel(
        settings.path,
        folds=settings.folds,
        checkpoint_name=settings.checkpoint,
        device=device or settings.device,
        use_mirroring=settings.use_mirroring if use_mirroring is None else use_mirroring,
        tile_step_size=settings.tile_step_size,
        configuration=settings.configuration,
        trainer=settings.trainer,
        plans=settings.plans,
        fold_devices=fold_devices,
        cpu_fold_per_core=settings.cpu_fold_per_core,
    )


def gpu_count() -> int:
    """How many CUDA GPUs torch sees (0 without torch's CUDA); imports torch: the worker only."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def place(model_device: str, worker_device: str | None, worker_index: int = 0) -> str:
    """Where a worker runs a model: a model on "cpu" or on a named GPU ("cuda:N") stays there;
    "auto" and "cuda" go to the worker's device when it has one ([[workers]] device), else, with
    several GPUs and several workers ([node] workers), worker i takes GPU i mod their number."""
    if model_device not in ("auto", "cuda"):
        return model_device
    if worker_device is not None:
        return worker_device
    gpus = gpu_count() if worker_index else 0
    return f"cuda:{worker_index % gpus}" if gpus > 1 else model_device


def device_free_bytes(device: str) -> int | None:
    """Free memory of a GPU now (torch.cuda.mem_get_info; "auto": the current GPU), None for the CPU
    or without a GPU."""
    if device not in ("auto", "cuda") and not device.startswith("cuda:"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(torch.device("cuda" if device == "auto" else device))
    return int(free)


DEVICE_BUDGET_SHARE = 0.9  # of a GPU's free memory at the worker's first model load, when model_memory_gb is unset


class ModelCache:
    """The worker's loaded models, kept between jobs; the least recently used go first.

    Within `[node] model_memory_gb` (None: no limit), after a model is loaded the least
    recently used others are unloaded until the loaded models fit. A model's memory is its
    `memory_bytes()` (inference/memory.py): measured with torch.cuda's allocator statistics on
    a GPU (the network on the device plus the peak of its predictions so far), estimated on the
    CPU (parameters and fold weights plus one sliding-window patch through the network).
    """

    def __init__(self, config: Config, device: str | None = None, worker_index: int = 0) -> None:
        self.config = config
        self.device, self.worker_index = device, worker_index  # the worker's device (None: each model's own)
        gb = config.node.model_memory_gb  # per device: each worker's cache holds its own device's models
        self.budget_bytes = None if gb is None else int(gb * 1e9)
        self._budget_read = gb is not None
        self._models: OrderedDict[str, SegmentationModel] = OrderedDict()  # least recently used first
        self._on_cpu: set[str] = set()  # models whose GPU ran out of memory: loaded on the CPU from then on

    def get(self, name: str) -> SegmentationModel:
        if name in self._models:
            self._models.move_to_end(name)
            return self._models[name]
        self._models[name] = self._load(name)
        self._fit(name)
        return self._models[name]

    def after_out_of_memory(self, name: str, gpu: bool) -> None:
        """A job of model `name` ran out of memory. Every other loaded model is unloaded, to give
        the next attempt room; when the GPU ran out and the model's device is "auto" (the site
        allows the CPU), the model itself is loaded on the CPU for the next attempt."""
        for other in [n for n in self._models if n != name]:
            self._models.pop(other).unload()
            log.info("model %s unloaded after an out-of-memory error", other)
        settings = self.config.model(name)
        if gpu and settings.device == "auto" and name not in self._on_cpu:
            self._on_cpu.add(name)
            if name in self._models:
                self._models.pop(name).unload()
            log.warning("model %s: the GPU ran out of memory; it runs on the CPU from the next attempt", name)

    def loaded(self) -> list[str]:
        """Names of the loaded models, least recently used first."""
        return list(self._models)

    def memory_bytes(self) -> int:
        return sum(model.memory_bytes() for model in self._models.values())

    def placement(self, name: str) -> str:
        """The device model `name` is loaded on by this worker (see `place`)."""
        if name in self._on_cpu:
            return "cpu"
        return place(self.config.model(name).device, self.device, self.worker_index)

    def _read_budget(self, device: str) -> None:
        """model_memory_gb unset: on a GPU, the budget is what the device has free before this worker
        loads its first model (less a tenth for the CUDA context and other processes' growth)."""
        if self._budget_read:
            return
        self._budget_read = True
        free = device_free_bytes(device)
        if free is not None:
            self.budget_bytes = int(free * DEVICE_BUDGET_SHARE)
            log.info("model memory budget on %s: %.2f GB (%.0f %% of its free memory; model_memory_gb unset)",
                     device, self.budget_bytes / 1e9, DEVICE_BUDGET_SHARE * 100)

    def _load(self, name: str) -> SegmentationModel:
        settings = self.config.model(name)
        started = time.monotonic()
        device = self.placement(name)
        self._read_budget(device)
        fold_devices = None
        if settings.fold_parallel and name not in self._on_cpu:
            others = list(self.config.fold_devices())
            if device in others:  # this worker's device first, then the node's others in their order
                others.remove(device)
            fold_devices = [device, *others] if others else None
        model = load_model(settings, device=device, fold_devices=fold_devices)
        log.info(
            "model %s loaded in %.1f s (folds %s, %s, %.2f GB %s)",
            name,
            time.monotonic() - started,
            settings.folds,
            model.device + (f", folds in parallel on {', '.join(model.fold_devices)}" if model.fold_devices else ""),
            model.memory_bytes() / 1e9,
            model.footprint.basis,
        )
        return model

    def _fit(self, newest: str) -> None:
        if self.budget_bytes is None:
            return
        while self.memory_bytes() > self.budget_bytes and len(self._models) > 1:
            name, model = self._models.popitem(last=False)
            model.unload()
            log.info(
                "model %s unloaded (least recently used; models now take %.2f of %.2f GB)",
                name,
                self.memory_bytes() / 1e9,
                self.budget_bytes / 1e9,
            )
        if self.memory_bytes() > self.budget_bytes:
            log.warning(
                "model %s alone takes %.2f GB, more than model_memory_gb = %.2f",
                newest,
                self.memory_bytes() / 1e9,
                self.budget_bytes / 1e9,
            )
