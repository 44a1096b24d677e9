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
    settings: ModelSettings, use_mirroring: bool | None = None, device: str | None = None
) -> SegmentationModel:
    """The model of a `[[models]]` entry, loaded as configured (`use_mirroring` and `device`
    override the settings, e.g. for a quick dry run, or the CPU after the GPU ran out)."""
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
    )


class ModelCache:
    """The worker's loaded models, kept between jobs; the least recently used go first.

    Within `[node] model_memory_gb` (None: no limit), after a model is loaded the least
    recently used others are unloaded until the loaded models fit. A model's memory is its
    `memory_bytes()` (inference/memory.py): measured with torch.cuda's allocator statistics on
    a GPU (the network on the device plus the peak of its predictions so far), estimated on the
    CPU (parameters and fold weights plus one sliding-window patch through the network).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        gb = config.node.model_memory_gb
        self.budget_bytes = None if gb is None else int(gb * 1e9)
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

    def _load(self, name: str) -> SegmentationModel:
        settings = self.config.model(name)
        started = time.monotonic()
        model = load_model(settings, device="cpu" if name in self._on_cpu else None)
        log.info(
            "model %s loaded in %.1f s (folds %s, %s, %.2f GB %s)",
            name,
            time.monotonic() - started,
            settings.folds,
            model.device,
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
