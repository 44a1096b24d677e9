"""Load an nnU-Net v2 model folder once and segment numpy volumes with it.

The model folder is the nnU-Net v2 *release* layout (what `nnUNetv2_export_model_to_zip`
produces and what GLOW-FDG publishes)::

    model_dir/
        dataset.json
        plans.json
        fold_0/checkpoint_final.pth
        ...
        fold_4/checkpoint_final.pth

Loading goes through nnU-Net's own `nnUNetPredictor.initialize_from_trained_model_folder`, so a
real model dropped in place takes exactly the same code path as the bundled demo model.
Preprocessing (normalisation, resampling to the model's spacing), sliding-window inference,
fold ensembling and resampling back to the input grid are all nnU-Net's.

No DICOM here: this module must never import pydicom, pynetdicom or highdicom.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

_PLAN_FILES = ("dataset.json", "plans.json")


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but torch sees no CUDA device")
        return device
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {device!r}")


def _fold_dir_name(fold: int | str) -> str:
    return f"fold_{fold}"


class SegmentationModel:
    """An nnU-Net v2 model (one or more folds), loaded once, predicting on numpy arrays.

    Attributes:
        channel_names: input channel names from dataset.json, in channel order
            (for GLOW-FDG / autoPET-style models: CT in HU, then PET in SUVbw).
        labels: label name -> value, from dataset.json (e.g. {"background": 0, "lesion": 1}).
        device: "cpu" or "cuda[:N]", where the network runs.
        folds: the folds that are ensembled.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        folds: Sequence[int | str] = (0, 1, 2, 3, 4),
        checkpoint_name: str = "checkpoint_final.pth",
        device: str = "auto",
        use_mirroring: bool = False,
        tile_step_size: float = 0.5,
        threads: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir).resolve()
        self.folds = tuple(int(f) if str(f).isdigit() else str(f) for f in folds)
        if not self.folds:
            raise ValueError("at least one fold is needed")
        self.checkpoint_name = checkpoint_name
        self._check_layout()

        with open(self.model_dir / "dataset.json", encoding="utf-8") as f:
            dataset_json = json.load(f)
        channels = dataset_json.get("channel_names", dataset_json.get("modality"))
        if not channels:
            raise ValueError(f"{self.model_dir / 'dataset.json'} has no channel_names")
        self.channel_names: list[str] = [channels[k] for k in sorted(channels, key=int)]
        self.labels: dict[str, int] = self._plain_labels(dataset_json["labels"])
        if max(self.labels.values()) > 255:
            raise ValueError("label values above 255 do not fit the uint8 label map")

        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self.device = _resolve_device(device)
        if self.device == "cpu":
            # nnU-Net lowers torch's intra-op thread count in some code paths (and so may other
            # libraries); prediction on CPU wants every core we are allowed to use.
            torch.set_num_threads(threads or _available_cpus())
        elif threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self._lift_nnunet_thread_cap(self.threads)
        on_gpu = self.device.startswith("cuda")

        self._predictor = nnUNetPredictor(
            tile_step_size=tile_step_size,
            use_gaussian=True,
            use_mirroring=use_mirroring,
            perform_everything_on_device=on_gpu,
            device=torch.device(self.device),
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        self._predictor.initialize_from_trained_model_folder(
            str(self.model_dir), use_folds=self.folds, checkpoint_name=checkpoint_name
        )
        self.use_mirroring = use_mirroring
        self.tile_step_size = tile_step_size
        self.model_spacing = tuple(float(s) for s in self._predictor.configuration_manager.spacing)
        self.patch_size = tuple(int(s) for s in self._predictor.configuration_manager.patch_size)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _lift_nnunet_thread_cap(threads: int) -> None:
        """nnU-Net caps torch's threads during prediction at `nnUNet_def_n_proc` (default 8),
        read once at import. Raise that cap so a big CPU box uses the threads asked for."""
        import nnunetv2.inference.predict_from_raw_data as pfr

        if getattr(pfr, "default_num_processes", threads) < threads:
            pfr.default_num_processes = threads

    def _check_layout(self) -> None:
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"model folder {self.model_dir} does not exist")
        missing = [name for name in _PLAN_FILES if not (self.model_dir / name).is_file()]
        missing += [
            f"{_fold_dir_name(f)}/{self.checkpoint_name}"
            for f in self.folds
            if not (self.model_dir / _fold_dir_name(f) / self.checkpoint_name).is_file()
        ]
        if missing:
            raise FileNotFoundError(
                f"{self.model_dir} is not a complete nnU-Net v2 model folder; missing: "
                + ", ".join(missing)
            )

    @staticmethod
    def _plain_labels(labels: dict) -> dict[str, int]:
        # nnU-Net allows region-based labels (a tuple/list of values per name); the label map we
        # return holds the region index in that case, which is the first listed value's order.
        out: dict[str, int] = {}
        for name, value in labels.items():
            if isinstance(value, (list, tuple)):
                value = value[0]
            out[str(name)] = int(value)
        return out

    def __repr__(self) -> str:
        return (
            f"SegmentationModel({str(self.model_dir)!r}, folds={self.folds}, device={self.device!r}, "
            f"channels={self.channel_names}, labels={self.labels})"
        )

    # ------------------------------------------------------------------ predict
    def predict(
        self, channels: np.ndarray, spacing_zyx: tuple[float, float, float]
    ) -> np.ndarray:
        """Segment one case.

        Args:
            channels: (c, z, y, x) array, channel order as `channel_names`, all channels on the
                same voxel grid (e.g. CT resampled onto the PET grid, then PET in SUVbw).
            spacing_zyx: voxel spacing of that grid in mm, (z, y, x).

        Returns:
            (z, y, x) uint8 label map on the input grid, values as in `labels`.
        """
        channels = np.asarray(channels)
        if channels.ndim != 4:
            raise ValueError(
                f"channels must be a 4-D (c, z, y, x) array, got shape {channels.shape}"
            )
        n_expected = len(self.channel_names)
        if channels.shape[0] != n_expected:
            raise ValueError(
                f"model {self.model_dir.name} expects {n_expected} input channels "
                f"{self.channel_names}, got {channels.shape[0]} (array shape {channels.shape})"
            )
        if min(channels.shape[1:]) < 1:
            raise ValueError(f"empty volume: shape {channels.shape}")
        spacing = tuple(float(s) for s in spacing_zyx)
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing_zyx must be three positive numbers in mm, got {spacing_zyx!r}")
        data = np.ascontiguousarray(channels, dtype=np.float32)
        if not np.isfinite(data).all():
            raise ValueError("channels contain NaN or infinite values")

        # nnU-Net's SimpleITK reader hands the predictor (c, z, y, x) arrays with spacing in
        # (z, y, x) order, which is exactly what we get; the properties dict is modified in place.
        properties = {"spacing": list(spacing)}
        with self._lock:
            seg = self._predictor.predict_single_npy_array(data, properties, None, None, False)
        seg = np.asarray(seg)
        if seg.shape != data.shape[1:]:
            raise RuntimeError(
                f"nnU-Net returned shape {seg.shape}, expected the input grid {data.shape[1:]}"
            )
        return seg.astype(np.uint8, copy=False)
