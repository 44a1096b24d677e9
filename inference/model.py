"""Load an nnU-Net v2 model once and segment numpy volumes with it.

The model folder is either layout nnU-Net uses (see inference/layout.py): the release layout
(dataset.json, plans.json, fold_k/checkpoint_final.pth, as GLOW-FDG publishes) or the results
layout (DatasetXXX/Trainer__Plans__configuration/fold_k, as TotalSegmentator downloads).
The checkpoint's trainer class is found in the model folder's own .py files or in nnunetv2
(inference/trainers.py) and builds the network; the network, plans and fold weights are
handed to nnU-Net's `nnUNetPredictor.manual_initialization`, so preprocessing (normalisation,
resampling to the model's spacing), sliding-window inference, fold ensembling and resampling
back to the input grid are all nnU-Net's own.

No DICOM here: this module must never import pydicom, pynetdicom or highdicom.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from .labels import output_labels
from .layout import resolve_model_folder
from .memory import Footprint, case_bytes
from .trainers import TrainerNotFound, build_network, find_trainer_class

log = logging.getLogger("inference")


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _resolve_device(device: str) -> str:
    """"cpu" or "cuda[:N]"; "auto" and "cuda" fall back to the CPU, with a warning, when torch
    sees no GPU."""
    import torch

    if device == "cpu":
        return "cpu"
    if device not in ("auto", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {device!r}")
    if torch.cuda.is_available():
        return "cuda" if device == "auto" else device
    log.warning("device %r: torch sees no CUDA GPU, running on the CPU instead", device)
    return "cpu"


class ChannelsAtOnce:
    """nnU-Net's configuration manager for preprocessing one case, except that its data resampling
    (`resampling_fn_data`: each channel resampled to the model's spacing on its own, a third-order
    spline by default) runs the channels at once in up to `threads` threads: SciPy's interpolation
    lets go of the GIL, so a two-channel case uses two cores where nnU-Net uses one. Each channel
    goes through nnU-Net's own function, so each comes out as it would in nnU-Net's loop."""

    def __init__(self, configuration_manager: object, threads: int) -> None:
        self._configuration_manager = configuration_manager
        self._threads = threads

    def __getattr__(self, name: str) -> object:
        return getattr(self._configuration_manager, name)

    @property
    def resampling_fn_data(self):  # noqa: ANN201
        resample = self._configuration_manager.resampling_fn_data
        threads = self._threads

        def channels_at_once(data, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if threads < 2 or len(data) < 2:
                return resample(data, *args, **kwargs)
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(threads, len(data)), thread_name_prefix="resample") as pool:
                channels = list(pool.map(lambda c: resample(data[c:c + 1], *args, **kwargs), range(len(data))))
            return np.concatenate(channels)

        return channels_at_once


class SegmentationModel:
    """An nnU-Net v2 model (one or more folds), loaded once, predicting on numpy arrays.

    Attributes:
        channel_names: input channel names from dataset.json, in channel order
            (for GLOW-FDG / autoPET-style models: CT in HU, then PET in SUVbw).
        labels: label name -> value of the label map, from dataset.json (e.g. {"background": 0,
            "lesion": 1}; region-based models as inference.labels names their values).
        device: "cpu" or "cuda[:N]", where the network runs.
        folds: the folds that are ensembled.
        folder: where the files are (inference.layout.ModelFolder).
        trainer_name, configuration: from the checkpoint; trainer_class: the class that built
            the network (from the model folder or nnunetv2).
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
        configuration: str | None = None,
        trainer: str | None = None,
        plans: str | None = None,
        fold_devices: Sequence[str] | None = None,
        cpu_fold_per_core: bool = True,
    ) -> None:
        self.folder = resolve_model_folder(model_dir, configuration, trainer, plans)
        self.model_dir = self.folder.root
        self.name = Path(model_dir).name
        self.folds = tuple(int(f) if str(f).isdigit() else str(f) for f in folds)
        if not self.folds:
            raise ValueError("at least one fold is needed")
        self.checkpoint_name = checkpoint_name
        missing = [f"fold_{f}/{checkpoint_name}" for f in self.folds
                   if not self.folder.checkpoint(f, checkpoint_name).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.model_dir} is not a complete nnU-Net v2 model folder; "
                                    "missing: " + ", ".join(missing))
        dataset_json = json.loads((self.model_dir / "dataset.json").read_text(encoding="utf-8"))
        plans_json = json.loads((self.model_dir / "plans.json").read_text(encoding="utf-8"))
        channels = dataset_json.get("channel_names", dataset_json.get("modality"))
        if not channels:
            raise ValueError(f"{self.model_dir / 'dataset.json'} has no channel_names")
        self.channel_names: list[str] = [channels[k] for k in sorted(channels, key=int)]
        self.labels: dict[str, int] = output_labels(dataset_json)
        if max(self.labels.values()) > 255:
            raise ValueError("label values above 255 do not fit the uint8 label map")

        import torch

        # fold_devices: one case's folds spread over these devices at once (inference/foldparallel.py);
        # its first entry is the model's own device. One entry, or none: folds one after the other.
        fold_devices = [_resolve_device(d) for d in fold_devices or ()]
        self.device = fold_devices[0] if fold_devices else _resolve_device(device)
        self.fold_devices: tuple[str, ...] = tuple(fold_devices) if len(fold_devices) > 1 else ()
        if self.device == "cpu":
            # nnU-Net lowers torch's intra-op thread count in some code paths (and so may other
            # libraries); prediction on CPU wants every core we are allowed to use.
            torch.set_num_threads(threads or _available_cpus())
        elif threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self._lift_nnunet_thread_cap(self.threads)
        # cpu_fold_per_core: on the CPU, without fold_devices, the folds run at once, one replica of
        # the network per core (at most one per fold), each with an equal share of the threads, instead
        # of one fold after the other on all of them (see _cpu_fold_replicas).
        self.cpu_fold_replicas = self._cpu_fold_replicas(cpu_fold_per_core)
        self.use_mirroring = use_mirroring
        self.tile_step_size = tile_step_size
        self._lock = threading.Lock()
        self._load(dataset_json, plans_json)

    # ------------------------------------------------------------------ loading
    def _load(self, dataset_json: dict, plans_json: dict) -> None:
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        checkpoints = [torch.load(self.folder.checkpoint(f, self.checkpoint_name), map_location="cpu",
                                  weights_only=False) for f in self.folds]
        first = checkpoints[0]
        self.trainer_name = self._checked("trainer", self.folder.trainer, first["trainer_name"])
        self.configuration = self._checked("configuration", self.folder.configuration,
                                           first["init_args"]["configuration"])
        if self.configuration not in plans_json.get("configurations", {}):
            raise ValueError(f"{self.model_dir / 'plans.json'} has no configuration {self.configuration!r} "
                             f"(it has {sorted(plans_json.get('configurations', {}))})")
        plans_manager = PlansManager(plans_json)
        configuration_manager = plans_manager.get_configuration(self.configuration)
        try:
            self.trainer_class = find_trainer_class(self.trainer_name, self.folder.code_folders())
        except TrainerNotFound as exc:
            raise TrainerNotFound(f"{self.model_dir}: {exc}") from None
        n_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
        n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        network = build_network(self.trainer_class, plans_manager, configuration_manager, dataset_json, n_in, n_out)
        parameters = [c["network_weights"] for c in checkpoints]
        network.load_state_dict(parameters[0])

        self._predictor = nnUNetPredictor(
            tile_step_size=self.tile_step_size,
            use_gaussian=True,
            use_mirroring=self.use_mirroring,
            perform_everything_on_device=self.device.startswith("cuda"),
            device=torch.device(self.device),
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        self.footprint = Footprint(self.device)
        with self.footprint.measure_resident():
            self._predictor.manual_initialization(
                network.to(self.device), plans_manager, configuration_manager, parameters, dataset_json,
                self.trainer_name, first.get("inference_allowed_mirroring_axes"))
        self.footprint.estimate(network, parameters, configuration_manager, n_in, n_out,
                                max(1, self.cpu_fold_replicas))
        self._replicas = []
        if self.fold_devices or self.cpu_fold_replicas:
            from .foldparallel import make_replicas

            def predictor_on(device: str) -> nnUNetPredictor:
                return nnUNetPredictor(
                    tile_step_size=self.tile_step_size, use_gaussian=True, use_mirroring=self.use_mirroring,
                    perform_everything_on_device=device.startswith("cuda"), device=torch.device(device),
                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)

            if self.fold_devices:
                self._replicas = make_replicas(self.fold_devices, self._predictor, len(parameters), predictor_on)
            else:  # the CPU's folds one replica per core, the threads shared out among them
                self._replicas = make_replicas(["cpu"] * self.cpu_fold_replicas, self._predictor, len(parameters),
                                               predictor_on, threads=max(1, self.threads // self.cpu_fold_replicas))
        self.model_spacing = tuple(float(s) for s in configuration_manager.spacing)
        self.patch_size = tuple(int(s) for s in configuration_manager.patch_size)

    def _cpu_fold_replicas(self, wanted: bool) -> int:
        """How many CPU replicas run the folds at once: min(threads, folds) with cpu_fold_per_core on
        the CPU, else 0 (nnU-Net's own loop: one fold after the other, every thread on each).

        A small 3D network does not keep two cores busy within one fold (torch's intra-op threads
        wait at each layer's end for the slowest, a long wait on a core shared with other work), so
        the folds, independent until they are summed, run on a core each; the sum is still in fold
        order (inference/foldparallel.py). The one difference from nnU-Net's loop is each
        convolution's thread count, which moves a logit in its last float32 bits (a few 1e-6,
        then rounded to the float16 nnU-Net sums the folds in): bench/bench_models.py counts the
        voxels where the node's mask differs from nnUNetv2_predict's (none so far)."""
        if not wanted or self.device != "cpu" or self.fold_devices or len(self.folds) < 2 or self.threads < 2:
            return 0
        return min(self.threads, len(self.folds))

    def _checked(self, what: str, configured: str | None, in_checkpoint: str) -> str:
        if configured is not None and configured != in_checkpoint:
            raise ValueError(f"{self.model_dir}: {what} {configured!r} configured (or in the folder name), "
                             f"but the checkpoints were trained with {what} {in_checkpoint!r}")
        return in_checkpoint

    @staticmethod
    def _lift_nnunet_thread_cap(threads: int) -> None:
        """nnU-Net caps torch's threads during prediction at `nnUNet_def_n_proc` (default 8),
        read once at import. Raise that cap so a big CPU box uses the threads asked for."""
        import nnunetv2.inference.predict_from_raw_data as pfr

        if getattr(pfr, "default_num_processes", threads) < threads:
            pfr.default_num_processes = threads

    def memory_bytes(self) -> int:
        """What this model holds while loaded, plus its working set (see inference/memory.py)."""
        return self.footprint.total_bytes()

    def case_bytes(self, channels_shape: tuple[int, ...], spacing_zyx: tuple[float, float, float]) -> int:
        """Memory one case of this (c, z, y, x) shape needs on top of memory_bytes() (an estimate,
        inference/memory.py), to refuse a case too big for the budget before it is predicted."""
        n_out = max(len(self.labels), 2)  # the network's output channels, background included
        return case_bytes(tuple(channels_shape[1:]), spacing_zyx, self.model_spacing, channels_shape[0], n_out)

    def unload(self) -> None:
        """Free the network and the fold weights (and the GPU memory they held)."""
        with self._lock:
            self._predictor = None
            self._replicas = []
            self.footprint.release()

    @property
    def loaded(self) -> bool:
        return self._predictor is not None

    def __repr__(self) -> str:
        return (
            f"SegmentationModel({str(self.model_dir)!r}, folds={self.folds}, device={self.device!r}, "
            + (f"fold_devices={self.fold_devices}, " if self.fold_devices else "") +
            f"trainer={self.trainer_name!r}, channels={self.channel_names}, labels={self.labels})"
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
        data, _ = self._checked_input(channels, spacing_zyx)
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        # What nnUNetPredictor.predict_single_npy_array does, with the fold ensemble our own call
        # (ensemble_logits: one device after the other, or at once on several).
        with self._lock:
            logits, properties = self._ensemble(channels, spacing_zyx)
            predictor = self._predictor
            seg = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager,
                properties, return_probabilities=False)
        seg = np.asarray(seg)
        if seg.shape != data.shape[1:]:
            raise RuntimeError(
                f"nnU-Net returned shape {seg.shape}, expected the input grid {data.shape[1:]}"
            )
        return seg.astype(np.uint8, copy=False)

    def ensemble_logits(self, channels: np.ndarray, spacing_zyx: tuple[float, float, float]):  # noqa: ANN201
        """The folds' averaged logits of one case (a float16 torch tensor on the CPU, on the model's
        preprocessed grid): what `predict` turns into the label map."""
        with self._lock:
            return self._ensemble(channels, spacing_zyx)[0]

    def _ensemble(self, channels: np.ndarray, spacing_zyx: Sequence[float]) -> tuple:
        """(averaged logits, the preprocessing's properties); the caller holds the lock."""
        from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy

        data, spacing = self._checked_input(channels, spacing_zyx)
        if self._predictor is None:
            raise RuntimeError(f"model {self.name} was unloaded")
        predictor = self._predictor
        # nnU-Net's SimpleITK reader hands the predictor (c, z, y, x) arrays with spacing in
        # (z, y, x) order, which is exactly what we get; the properties dict is modified in place.
        preprocessed = next(PreprocessAdapterFromNpy(
            [data], [None], [{"spacing": list(spacing)}], [None], predictor.plans_manager, predictor.dataset_json,
            ChannelsAtOnce(predictor.configuration_manager, self.threads), num_threads_in_multithreaded=1,
            verbose=False))
        with self.footprint.measure_working_set():
            if self._replicas:
                from .foldparallel import ensemble_logits

                logits = ensemble_logits(self._replicas, preprocessed["data"], predictor.list_of_parameters)
            else:
                logits = predictor.predict_logits_from_preprocessed_data(preprocessed["data"])
        return logits.cpu(), preprocessed["data_properties"]

    def _checked_input(
        self, channels: np.ndarray, spacing_zyx: Sequence[float]
    ) -> tuple[np.ndarray, tuple[float, float, float]]:
        channels = np.asarray(channels)
        if channels.ndim != 4:
            raise ValueError(
                f"channels must be a 4-D (c, z, y, x) array, got shape {channels.shape}"
            )
        n_expected = len(self.channel_names)
        if channels.shape[0] != n_expected:
            raise ValueError(
                f"model {self.name} expects {n_expected} input channels "
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
        return data, spacing
