"""A job's inputs: the series chosen for each of the model's channels (dicomnode.pipeline.selection,
with the verdicts recorded) built into volumes on the model's grid, the PET in SUVbw."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from dicomnode.config import ModelSettings
from dicomnode.imaging.suv import SuvError, pet_suv_volume
from dicomnode.imaging.volumes import (
    CT_PADDING_HU,
    Allocate,
    Volume,
    VolumeError,
    load_series,
    resample_to,
)
from dicomnode.pipeline.errors import InputsNotReady, JobError
from dicomnode.pipeline.facts import series_from_index
from dicomnode.pipeline.selection import Selection, select_inputs
from dicomnode.pipeline.timing import StepTimes
from dicomnode.store.events import EventKind, log_event, record_job_event
from dicomnode.store.tables import Event, Job

log = logging.getLogger("dicomnode.processing")  # the name it had before the split: journald filters use it


@dataclass(frozen=True)
class Inputs:
    """The model's input channels on one grid (the model's `grid` setting: one of its channels).

    `grid` is the volume of the series that gives the grid: its `.datasets` are the source
    images the SEG and SR reference, slice for slice. `suv` is the PET in SUVbw on that grid
    (what the lesions are measured on), None for a model without a PET channel. Where they are
    the same voxels, `grid.array` and `suv` are views of `channels` (not copies): none of them is
    written to after it is built (nnU-Net's preprocessing copies its input)."""

    channels: np.ndarray  # (c, z, y, x) on the grid
    spacing: tuple[float, float, float]  # (z, y, x) mm of the grid
    grid: Volume  # the series that gives the grid
    suv: np.ndarray | None  # (z, y, x) PET SUVbw on the grid, None without a PET channel
    grid_name: str = "PET"  # the channel that gives the grid: "PET", "CT", "T1CE", ...
    pet_header: Dataset | None = None  # the first PET slice header (radiopharmaceutical for the SR)
    ct: Volume | None = None  # the CT channel's series on its own grid, in HU ([models.compare]'s time point)


def _event(sessions: sessionmaker, job: Job, kind: EventKind, message: str, data: dict | None = None) -> None:
    record_job_event(sessions, job, kind, message, log, data=data)


def select_series(sessions: sessionmaker, job: Job, settings: ModelSettings) -> Selection:
    """The study's series and their verdicts for the job's model (dicomnode.pipeline.selection's rules).

    The assembler records the verdicts when it queues a job; a job without them (queued by
    an older version) gets them here."""
    with sessions() as session:
        selection = select_inputs(series_from_index(session, job.study_uid), settings.channels, settings.inputs,
                                  settings.grid)
        recorded = session.scalar(
            select(Event.id).where(Event.job_id == job.id, Event.kind == EventKind.SERIES_VERDICT).limit(1)
        )
    if recorded is None:
        with sessions.begin() as session:
            for verdict in selection.verdicts:
                log_event(
                    session,
                    EventKind.SERIES_VERDICT,
                    verdict.message,
                    study_uid=job.study_uid,
                    job_id=job.id,
                    data=verdict.as_dict(),
                )
    if not selection.ready:
        if selection.waiting and not selection.missing:
            raise InputsNotReady(f"no usable inputs yet: {selection.problem}")
        raise JobError(f"no usable inputs: {selection.problem}")
    return selection


def assemble_inputs(paths: dict[str, list[Path]], channel_names: list[str], grid: str = "PET",
                    times: StepTimes | None = None) -> Inputs:
    """The model's input channels on the `grid` channel's series grid, from each channel's files
    (`paths` by channel name): "CT" in HU, "PET" in SUVbw, any other (named: MR, ...) as
    stored, rescale applied. Every other channel is resampled linearly onto the grid; outside
    its field of view: -1024 HU for the CT, SUV 0 for the PET, 0 for the rest (e.g. the CT onto
    the PET grid as GLOW-FDG was trained, or T1, T2 and FLAIR onto the T1 post contrast).
    `dicomnode inspect --export` writes the same. `times` gets the seconds of reading the
    series ("read"), SUV ("SUV") and resampling ("resample")."""
    times = times or StepTimes()
    padding = {"CT": CT_PADDING_HU, "PET": 0.0}  # outside a resampled channel's field of view; else 0
    lacking = [c for c in dict.fromkeys([*channel_names, grid]) if c not in paths]
    if lacking:
        raise JobError(
            f"no series for channel{'s' if len(lacking) > 1 else ''} {', '.join(lacking)}"
            f"{' (the grid)' if grid in lacking else ''}"
        )
    # The channels are written straight into the model's input array: the grid's series is read
    # into its channel and every other channel resampled into its own, so that a whole-body CT
    # grid (512 x 512 x 300 float32: 300 MB a channel) is not copied again to stack them.
    channels: np.ndarray | None = None
    grid_index = channel_names.index(grid) if grid in channel_names else None

    def into_grid_channel(shape: tuple[int, int, int]) -> np.ndarray:
        nonlocal channels
        channels = np.empty((len(channel_names), *shape), dtype=np.float32)
        return channels[grid_index]

    try:
        volumes = {c: _channel_volume(c, paths[c], times, into_grid_channel if c == grid and grid_index is not None
                                      else None)
                   for c in dict.fromkeys([*channel_names, grid])}
        reference = volumes[grid]
        if channels is None:  # the grid is no input channel of the model
            channels = np.empty((len(channel_names), *reference.shape), dtype=np.float32)
        with times("resample"):
            arrays = {
                c: v.array if c == grid else resample_to(
                    v, reference, default_value=padding.get(c, 0.0),
                    out=channels[channel_names.index(c)] if c in channel_names else None).array
                for c, v in volumes.items()
            }
    except VolumeError as exc:
        raise JobError(f"cannot build input volumes: {exc}") from exc
    except SuvError as exc:
        raise JobError(f"cannot compute SUVbw: {exc}") from exc
    with times("channels"):
        for c in channel_names:
            if not _all_finite(arrays[c]):
                raise JobError(
                    f"channel {c} ({volumes[c].modality} series {volumes[c].series_instance_uid}) holds NaN or "
                    "infinite values: check its RescaleSlope/RescaleIntercept and pixel data"
                )
        for k, c in enumerate(channel_names):  # those not read or resampled into their place (the PET in SUV)
            if not _same_memory(arrays[c], channels[k]):
                channels[k] = arrays[c]
    pet = volumes.get("PET")
    return Inputs(
        channels=channels,
        spacing=tuple(reference.spacing),
        grid=reference,
        suv=arrays["PET"].astype(np.float32, copy=False) if pet is not None else None,
        grid_name=grid,
        pet_header=pet.datasets[0] if pet is not None else None,
        ct=volumes.get("CT"),
    )


def _all_finite(array: np.ndarray) -> bool:
    """No NaN and no infinity: both extremes finite (a NaN makes min and max NaN), two reductions
    instead of a boolean array of the volume's size."""
    return array.size == 0 or bool(np.isfinite(array.min()) and np.isfinite(array.max()))


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether `a` is `b`'s very voxels (same shape, same first byte, same strides)."""
    return (a.shape == b.shape and a.strides == b.strides
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


def _channel_volume(channel: str, paths: list[Path], times: StepTimes, allocate: Allocate | None = None) -> Volume:
    """One channel's series as a volume: the PET in SUVbw, anything else as its rescaled values
    (read into `allocate`'s array when given: dicomnode.imaging.volumes.load_series)."""
    with times("read"):
        volume = load_series(paths, allocate)
    if channel != "PET":
        return volume
    with times("SUV"):
        return replace(volume, array=pet_suv_volume(volume).astype(np.float32, copy=False))


def build_inputs(sessions: sessionmaker, job: Job, settings: ModelSettings, times: StepTimes | None = None) -> Inputs:
    """The job's model input channels, `settings.channels` in order, on the `settings.grid` grid;
    `times` gets the seconds of each step (series selection "select", then assemble_inputs')."""
    times = times or StepTimes()
    with times("select"):
        selection = select_series(sessions, job, settings)
    channel_names = list(settings.channels)
    inputs = assemble_inputs({c: selection.paths(c) for c in selection.chosen}, channel_names, settings.grid, times)
    used = ", ".join(f"{c} <- {selection.chosen[c].label()}" for c in dict.fromkeys(channel_names))
    used += f"; on the {settings.grid} grid {'x'.join(str(n) for n in inputs.channels.shape[1:])}"
    _event(sessions, job, EventKind.INPUTS_BUILT, used)
    return inputs
