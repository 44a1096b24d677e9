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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config, ModelSettings
from dicomnode.db import Job
from dicomnode.queue import log_event
from dicomnode.selection import Selection, select_inputs, series_from_index
from dicomnode.sender import SendError, send_files

log = logging.getLogger("dicomnode.processing")


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


def select_series(sessions: sessionmaker, job: Job, settings: ModelSettings) -> Selection:
    """The study's series and their verdicts for the job's model (dicomnode.selection's rules).

    The assembler records the verdicts when it queues a job; a job without them (queued by
    an older version) gets them here."""
    from sqlalchemy import select

    from dicomnode.assembler import VERDICT
    from dicomnode.db import Event

    with sessions() as session:
        selection = select_inputs(series_from_index(session, job.study_uid), settings.channels, settings.inputs)
        recorded = session.scalar(select(Event.id).where(Event.job_id == job.id, Event.kind == VERDICT).limit(1))
    if recorded is None:
        with sessions.begin() as session:
            for verdict in selection.verdicts:
                log_event(session, VERDICT, verdict.message, study_uid=job.study_uid, job_id=job.id)
    if not selection.ready:
        raise JobError(f"no usable inputs: {selection.problem}", retryable=bool(selection.waiting) and not selection.missing)
    return selection


def assemble_inputs(paths: dict[str, list[Path]], channel_names: list[str]) -> Inputs:
    """The model's input channels on the PET grid from each channel's files (`paths` by channel
    name: "PET" and, when a channel needs it, "CT"). `dicomnode inspect --export` writes the same."""
    from dicomnode.suv import SuvError, pet_suv_volume
    from dicomnode.volumes import CT_PADDING_HU, VolumeError, load_series, resample_to

    if "PET" not in paths:
        raise JobError("the inputs are built on the PET grid: no PET series")
    try:
        pet = load_series(paths["PET"])
        arrays = {"PET": pet_suv_volume(pet).astype(np.float32)}
        if "CT" in channel_names:
            ct = load_series(paths["CT"])
            arrays["CT"] = resample_to(ct, pet, default_value=CT_PADDING_HU).array.astype(np.float32)
    except VolumeError as exc:
        raise JobError(f"cannot build input volumes: {exc}") from exc
    except SuvError as exc:
        raise JobError(f"cannot compute SUVbw: {exc}") from exc
    channels = np.stack([arrays[c] for c in channel_names])
    return Inputs(channels=channels, spacing=tuple(pet.spacing), pet=pet)


def build_inputs(sessions: sessionmaker, job: Job, settings: ModelSettings) -> Inputs:
    """The job's model input channels, `settings.channels` in order (CT, PET)."""
    selection = select_series(sessions, job, settings)
    channel_names = list(settings.channels)
    inputs = assemble_inputs({c: selection.paths(c) for c in selection.chosen}, channel_names)
    used = ", ".join(f"{c} <- {selection.chosen[c].label()}" for c in dict.fromkeys(channel_names))
    _event(sessions, job, "inputs-built", used)
    return inputs


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
    """Run the model, measure the lesions and write the SEG and the SR (once per job); return
    the result folder. seg.dcm is renamed into place last: it marks a complete result."""
    from dicomnode.measures import measure_lesions
    from dicomnode.seg import build_seg, write_seg
    from dicomnode.sr import build_sr, write_sr

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
    inputs = build_inputs(sessions, job, settings)
    started = time.monotonic()
    labels = model.predict(inputs.channels, inputs.spacing)
    mask = labels > 0
    _event(sessions, job, "inference-done", f"{time.monotonic() - started:.1f} s on {model.device}, {int(mask.sum())} foreground voxels")

    suv = inputs.channels[list(settings.channels).index("PET")]
    measures, lesion_labels = measure_lesions(
        mask, suv, inputs.spacing, connectivity=settings.lesion_connectivity, min_volume_ml=settings.min_lesion_volume_ml
    )
    _event(sessions, job, "measured", f"{measures.lesion_count} lesions, MTV {measures.total_mtv_ml:.1f} ml, TLG {measures.total_tlg_g:.1f} g")
    version = settings.version or model_fingerprint(settings)
    seg = build_seg(
        (lesion_labels > 0).astype(np.uint8),
        inputs.pet.datasets,
        model_name=settings.name,
        model_version=version,
        folds=list(settings.folds),
        series_number=900 + job.run_number,
        series_description=f"{settings.name} lesions (run {job.run_number})"[:64],
    )
    sr = build_sr(
        measures,
        lesion_labels,
        seg,
        inputs.pet.datasets,
        model_name=settings.name,
        model_version=version,
        series_number=950 + job.run_number,
        series_description=f"{settings.name} PET measurements (run {job.run_number})"[:64],
    )
    out.mkdir(parents=True, exist_ok=True)
    write_sr(sr, out / ".sr.dcm.partial").replace(out / "sr.dcm")
    (out / "measures.json").write_text(json.dumps(asdict(measures), indent=2))
    write_seg(seg, out / ".seg.dcm.partial").replace(seg_path)
    _event(sessions, job, "results-written", f"SEG {seg.SOPInstanceUID} series {seg.SeriesNumber}, SR {sr.SOPInstanceUID} series {sr.SeriesNumber}")
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
