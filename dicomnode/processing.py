"""One job, start to end: select series, build the model's input volumes, run the model,
write the SEG into data_dir/results, and deliver it to every destination.

Results are written once per job and reused when a job is retried (a failed delivery does
not re-run the model, and the PACS receives the same SOP Instance UIDs again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config, ModelSettings
from dicomnode.db import Job
from dicomnode.index import SeriesSummary, instance_paths, series_of_study
from dicomnode.queue import log_event
from dicomnode.sender import SendError, send_files

log = logging.getLogger("dicomnode.processing")

# The series modality behind each kind of model channel (config: models.channels).
CHANNEL_SOURCES = {"CT": "CT", "PET": "PT"}


class JobError(Exception):
    """A job cannot succeed. `retryable` says whether trying again could help."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Inputs:
    channels: np.ndarray  # (c, z, y, x) on the PET grid
    spacing: tuple[float, float, float]
    pet: object  # volumes.Volume of the PET series (grid and source headers for the SEG)


def _event(sessions: sessionmaker, job: Job, kind: str, message: str) -> None:
    with sessions.begin() as session:
        log_event(session, kind, message, study_uid=job.study_uid, job_id=job.id)
    log.info("job %d study %s: %s %s", job.id, job.study_uid, kind, message)


def select_series(series: list[SeriesSummary], modality: str) -> SeriesSummary:
    """The series of a modality with the most instances (the inputs issue refines this)."""
    candidates = [s for s in series if s.modality == modality]
    if not candidates:
        raise JobError(f"no {modality} series in the study")
    return max(candidates, key=lambda s: (s.instances, s.last_received_at))


def build_inputs(sessions: sessionmaker, job: Job, channel_names: list[str]) -> Inputs:
    """The model's input channels on the PET grid, `channel_names` as in config (CT, PET)."""
    from dicomnode.suv import SuvError, pet_suv_volume
    from dicomnode.volumes import VolumeError, load_series, resample_to

    with sessions() as session:
        series = series_of_study(session, job.study_uid)
        chosen = {m: select_series(series, m) for m in {CHANNEL_SOURCES[c] for c in channel_names}}
        paths = {m: [Path(p) for p in instance_paths(session, s.series_uid)] for m, s in chosen.items()}
    try:
        volumes = {m: load_series(p) for m, p in paths.items()}
        pet = volumes["PT"]
        arrays = {"PT": pet_suv_volume(pet).astype(np.float32)}
        if "CT" in volumes:
            arrays["CT"] = resample_to(volumes["CT"], pet, default_value=-1024.0).array.astype(np.float32)
    except VolumeError as exc:
        raise JobError(f"cannot build input volumes: {exc}") from exc
    except SuvError as exc:
        raise JobError(f"cannot compute SUVbw: {exc}") from exc
    channels = np.stack([arrays[CHANNEL_SOURCES[c]] for c in channel_names])
    used = ", ".join(f"{c} <- {chosen[CHANNEL_SOURCES[c]].modality} series {chosen[CHANNEL_SOURCES[c]].series_number} ({chosen[CHANNEL_SOURCES[c]].instances} instances)" for c in channel_names)
    _event(sessions, job, "inputs-built", used)
    return Inputs(channels=channels, spacing=tuple(pet.spacing), pet=pet)


def model_fingerprint(settings: ModelSettings) -> str:
    """A short, stable identity of a model folder: its plans, dataset.json and checkpoints' sizes."""
    digest = hashlib.sha256()
    for name in ("dataset.json", "plans.json"):
        digest.update((settings.path / name).read_bytes())
    for fold in settings.folds:
        checkpoint = settings.path / f"fold_{fold}" / settings.checkpoint
        digest.update(f"{fold}:{checkpoint.stat().st_size}".encode())
    return f"sha256:{digest.hexdigest()[:12]}"


def result_dir(config: Config, job: Job) -> Path:
    return config.results_dir / job.study_uid / f"job-{job.id}"


def make_results(config: Config, sessions: sessionmaker, job: Job, model) -> Path:  # noqa: ANN001 - inference.SegmentationModel
    """Run the model and write the SEG (once per job); return the result folder."""
    from dicomnode.seg import build_seg, write_seg

    out = result_dir(config, job)
    seg_path = out / "seg.dcm"
    if seg_path.exists():
        _event(sessions, job, "results-reused", f"{seg_path} from an earlier attempt")
        return out
    settings = config.model(job.model)
    if len(settings.channels) != len(model.channel_names):
        raise JobError(
            f"model {settings.name} takes {len(model.channel_names)} channels {model.channel_names} "
            f"but config models.channels lists {len(settings.channels)}: {settings.channels}"
        )
    inputs = build_inputs(sessions, job, list(settings.channels))
    started = time.monotonic()
    labels = model.predict(inputs.channels, inputs.spacing)
    lesion_voxels = int((labels > 0).sum())
    _event(sessions, job, "inference-done", f"{time.monotonic() - started:.1f} s on {model.device}, {lesion_voxels} foreground voxels")
    seg = build_seg(
        (labels > 0).astype(np.uint8),
        inputs.pet.datasets,
        model_name=settings.name,
        model_version=settings.version or model_fingerprint(settings),
        folds=list(settings.folds),
        series_number=900 + job.run_number,
        series_description=f"{settings.name} lesions (run {job.run_number})"[:64],
    )
    out.mkdir(parents=True, exist_ok=True)
    temp = out / ".seg.dcm.partial"
    write_seg(seg, temp)
    temp.replace(seg_path)
    (out / "summary.json").write_text(
        json.dumps({"job": job.id, "study": job.study_uid, "model": settings.name, "run": job.run_number,
                    "seg_sop_instance_uid": str(seg.SOPInstanceUID), "foreground_voxels": lesion_voxels}, indent=2)
    )
    _event(sessions, job, "results-written", f"SEG {seg.SOPInstanceUID} series {seg.SeriesNumber}")
    return out


def deliver(config: Config, sessions: sessionmaker, job: Job, out: Path) -> None:
    settings = config.model(job.model)
    files = sorted(out.glob("*.dcm"))
    failures = []
    for destination in config.destinations_for(settings):
        try:
            sent = send_files(destination, files, config.node.ae_title, timeout=config.node.network_timeout_seconds)
        except SendError as exc:
            _event(sessions, job, "delivery-failed", str(exc))
            failures.append(str(exc))
            continue
        _event(sessions, job, "delivered", f"{len(sent)} objects to {destination.name}")
    if failures:
        raise JobError("; ".join(failures), retryable=True)


def process(config: Config, sessions: sessionmaker, job: Job, model) -> str:  # noqa: ANN001
    out = make_results(config, sessions, job, model)
    deliver(config, sessions, job, out)
    return f"results in {out}"
