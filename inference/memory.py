"""How much memory a loaded model takes: measured on a GPU, estimated on the CPU.

Two parts: resident (held while the model is loaded: the network and the fold weights kept
for ensembling) and working set (extra memory while one case is predicted).

* On a GPU both are measured with torch.cuda's allocator statistics: resident is what
  loading the network onto the device allocated; working set is the peak above the resident
  memory during a prediction (the largest seen so far). Before the first prediction the
  working set is the estimate below.
* On the CPU both are estimated: resident is the bytes of the network's parameters and
  buffers plus the fold weights (each stored tensor counted once); working set is one
  sliding-window patch through the network: input and logits, and at each stage four
  feature maps (skip, upsampled, concatenated, convolved) at that stage's resolution, in
  float32. Whole-image buffers (the logits accumulated over the image) depend on the image
  and are not included: `case_bytes` estimates them for a given case.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where the model loads, not with this module
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from contextlib import contextmanager

DEFAULT_FEATURES = (32, 64, 128, 256, 320, 320, 320, 320)  # nnU-Net's default widths
FLOAT32_BYTES = 4


class Footprint:
    def __init__(self, device: str) -> None:
        self.device = device
        self.on_gpu = device.startswith("cuda")
        self.resident_bytes = 0
        self.estimated_working_bytes = 0
        self.measured_working_bytes: int | None = None

    @property
    def basis(self) -> str:
        """"measured" (GPU allocator statistics) or "estimated" (CPU, or GPU before a prediction)."""
        return "measured" if self.on_gpu and self.measured_working_bytes is not None else "estimated"

    def working_bytes(self) -> int:
        """The working set of one prediction: measured (GPU) or estimated (CPU)."""
        return self.estimated_working_bytes if self.measured_working_bytes is None else self.measured_working_bytes

    def total_bytes(self) -> int:
        working = self.measured_working_bytes
        return self.resident_bytes + (self.estimated_working_bytes if working is None else working)

    @contextmanager
    def measure_resident(self) -> Iterator[None]:
        """Around loading the network: on a GPU, what it allocated there."""
        if not self.on_gpu:
            yield
            return
        import torch

        before = torch.cuda.memory_allocated(self.device)
        yield
        self.resident_bytes = torch.cuda.memory_allocated(self.device) - before

    @contextmanager
    def measure_working_set(self) -> Iterator[None]:
        """Around one prediction: on a GPU, the peak it allocated above the resident memory."""
        if not self.on_gpu:
            yield
            return
        import torch

        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        yield
        peak = torch.cuda.max_memory_allocated(self.device) - before
        self.measured_working_bytes = max(peak, self.measured_working_bytes or 0)

    def estimate(self, network: torch.nn.Module, fold_weights: list[dict], configuration_manager: ConfigurationManager,
                 n_in: int, n_out: int, replicas: int = 1) -> None:
        """The CPU estimate of resident bytes, and the working-set estimate on any device
        (`replicas`: patches through the network at once, the CPU's folds one per core)."""
        if not self.on_gpu:
            self.resident_bytes = _tensor_bytes([*network.parameters(), *network.buffers()]) + \
                _tensor_bytes([t for weights in fold_weights for t in weights.values()])
        self.estimated_working_bytes = replicas * patch_working_set_bytes(configuration_manager, n_in, n_out)

    def release(self) -> None:
        self.resident_bytes = 0
        if self.on_gpu:
            import torch

            torch.cuda.empty_cache()


def case_bytes(shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float],
               model_spacing: tuple[float, float, float], n_in: int, n_out: int) -> int:
    """float32 bytes of the whole-image buffers of one case: its channels resampled to the model's
    spacing, the logits accumulated over the sliding window and their count, the logits resampled
    back to the case's grid and the label map, with a quarter more for padding and copies."""
    original = math.prod(shape_zyx)
    at_model = math.prod(max(1, round(n * s / m)) for n, s, m in zip(shape_zyx, spacing_zyx, model_spacing))
    return int(1.25 * FLOAT32_BYTES * (at_model * (n_in + n_out + 1) + original * (n_in + n_out + 1)))


def patch_working_set_bytes(configuration_manager: ConfigurationManager, n_in: int, n_out: int) -> int:
    """float32 bytes of one patch through the network (see the module docstring)."""
    patch = math.prod(configuration_manager.patch_size)
    strides = configuration_manager.pool_op_kernel_sizes
    features = configuration_manager.network_arch_init_kwargs.get("features_per_stage", DEFAULT_FEATURES)
    voxels, maps = patch, 0
    for stride, width in zip(strides, features):
        voxels /= math.prod(stride)
        maps += 4 * width * voxels
    return int(FLOAT32_BYTES * ((n_in + 2 * n_out) * patch + maps))


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
