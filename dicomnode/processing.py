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
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config, ModelSettings
from dicomnode.db import Delivery, Job
from dicomnode.queue import RetryPolicy, log_event
from dicomnode.selection import Selection, select_inputs, series_from_index
from dicomnode.sender import Outcome, store_each

log = logging.getLogger("dicomnode.processing")


class JobError(Exception):
    """A job cannot succeed. `retryable` says whether trying again could help."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Inputs:
    """The model's input channels on one grid (the model's `grid` setting: PET or CT).

    `grid` is the volume of the series that gives the grid: its `.datasets` are the source
    images the SEG and SR reference, slice for slice. `suv` is the PET in SUVbw on that grid
    (what the lesions are measured on), whether or not the model takes a PET channel."""

    channels: np.ndarray  # (c, z, y, x) on the grid
    spacing: tuple[float, float, float]  # (z, y, x) mm of the grid
    grid: object  # volumes.Volume of the series that gives the grid (PET or CT)
    suv: np.ndarray  # (z, y, x) PET SUVbw on the grid
    grid_name: str = "PET"  # "PET" or "CT"
    pet_header: object = None  # the first PET slice header (radiopharmaceutical for the SR)


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


def assemble_inputs(paths: dict[str, list[Path]], channel_names: list[str], grid: str = "PET") -> Inputs:
    """The model's input channels on the `grid` series' grid from each channel's files (`paths`
    by channel name: "PET" and, when a channel or the grid needs it, "CT").

    grid "PET": the CT (HU) is resampled onto the PET grid (linear, outside: -1024 HU).
    grid "CT": the PET SUV is resampled onto the CT grid (linear, outside: SUV 0).
    `dicomnode inspect --export` writes the same."""
    from dataclasses import replace

    from dicomnode.suv import SuvError, pet_suv_volume
    from dicomnode.volumes import CT_PADDING_HU, VolumeError, load_series, resample_to

    if grid not in ("PET", "CT"):
        raise JobError(f"unknown grid {grid!r}: PET or CT")
    if "PET" not in paths:
        raise JobError("no PET series: the SUV is needed on every grid")
    if grid == "CT" and "CT" not in paths:
        raise JobError("the model's inputs are built on the CT grid (grid = \"CT\"): no CT series")
    try:
        pet = load_series(paths["PET"])
        suv = pet_suv_volume(pet).astype(np.float32)
        ct = load_series(paths["CT"]) if "CT" in channel_names or grid == "CT" else None
        if grid == "PET":
            reference = pet
            arrays = {"PET": suv}
            if ct is not None:
                arrays["CT"] = resample_to(ct, pet, default_value=CT_PADDING_HU).array.astype(np.float32)
        else:
            reference = ct
            suv = resample_to(replace(pet, array=suv), ct, default_value=0.0).array.astype(np.float32)
            arrays = {"PET": suv, "CT": ct.array.astype(np.float32)}
    except VolumeError as exc:
        raise JobError(f"cannot build input volumes: {exc}") from exc
    except SuvError as exc:
        raise JobError(f"cannot compute SUVbw: {exc}") from exc
    channels = np.stack([arrays[c] for c in channel_names])
    return Inputs(channels=channels, spacing=tuple(reference.spacing), grid=reference, suv=suv, grid_name=grid,
                  pet_header=pet.datasets[0])


def build_inputs(sessions: sessionmaker, job: Job, settings: ModelSettings) -> Inputs:
    """The job's model input channels, `settings.channels` in order (CT, PET)."""
    selection = select_series(sessions, job, settings)
    channel_names = list(settings.channels)
    inputs = assemble_inputs({c: selection.paths(c) for c in selection.chosen}, channel_names, settings.grid)
    used = ", ".join(f"{c} <- {selection.chosen[c].label()}" for c in dict.fromkeys(channel_names))
    used += f"; on the {settings.grid} grid {'x'.join(str(n) for n in inputs.suv.shape)}"
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

    measures, lesion_labels = measure_lesions(
        mask, inputs.suv, inputs.spacing, connectivity=settings.lesion_connectivity, min_volume_ml=settings.min_lesion_volume_ml
    )
    _event(sessions, job, "measured", f"{measures.lesion_count} lesions, MTV {measures.total_mtv_ml:.1f} ml, TLG {measures.total_tlg_g:.1f} g")
    version = settings.version or model_fingerprint(settings)
    seg = build_seg(
        (lesion_labels > 0).astype(np.uint8),
        inputs.grid.datasets,
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
        inputs.grid.datasets,
        pet_header=inputs.pet_header,
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


class DeliveryPending(Exception):
    """Some deliveries wait for their backoff: the job goes back to the queue until `not_before`
    (queue.defer) instead of holding the worker; the next run reuses the results."""

    def __init__(self, message: str, not_before: datetime) -> None:
        super().__init__(message)
        self.not_before = not_before


TRIES_PER_PASS = 2  # C-STORE tries of one object in one delivery pass (a lost response is retried at once)


def fallback_for(delivery: Delivery, outcome: Outcome) -> None:
    """Hook for objects a destination refuses for good (no presentation context for the SOP
    class, e.g. a PACS without Segmentation Storage). TODO (a later item): an optional fallback
    output, e.g. a secondary capture of the SEG overlay, planned here as a further delivery."""
    return None


def deliver(config: Config, sessions: sessionmaker, job: Job, out: Path) -> str:
    """Send the job's result objects (seg.dcm first, then sr.dcm) to each destination, each
    object to each destination as its own delivery (dicomnode.delivery) with its own retries.
    Returns a summary when every delivery is sent; raises DeliveryPending while some wait for
    their backoff, and JobError (not retryable: the deliveries did their retrying) naming the
    destination and the object once none is pending and one failed."""
    from dicomnode import delivery as deliveries

    settings = config.model(job.model)
    policy = RetryPolicy(config.node.delivery_max_attempts, config.node.delivery_backoff_seconds)
    destinations = {d.name: d for d in config.destinations_for(settings)}
    deliveries.plan(sessions, job.id, job.study_uid, sorted(out.glob("*.dcm")), list(destinations), policy)
    by_destination: dict[str, list[Delivery]] = {}
    for item in deliveries.due(sessions, job.id):
        by_destination.setdefault(item.destination, []).append(item)
    for name, items in by_destination.items():
        destination = destinations.get(name)
        outcomes: dict[int, Outcome] = {}
        sendable = []
        for item in items:
            path = Path(item.path)
            if destination is None:
                outcomes[item.id] = Outcome(path, item.sop_instance_uid, item.sop_class_uid, 0, None,
                                            f"destination {name} is no longer configured", permanent=True)
            elif not path.is_file():
                outcomes[item.id] = Outcome(path, item.sop_instance_uid, item.sop_class_uid, 0, None,
                                            f"result file {path} is gone", permanent=True)
            else:
                sendable.append(item)
        if sendable:
            tries = {Path(i.path): max(min(TRIES_PER_PASS, i.max_attempts - i.attempts), 1) for i in sendable}
            sent = store_each(destination, list(tries), config.node.ae_title,
                              timeout=config.node.network_timeout_seconds, tries_per_instance=tries)
            outcomes.update({item.id: outcome for item, outcome in zip(sendable, sent)})
        for item in items:
            outcome = outcomes[item.id]
            state = deliveries.record(sessions, item.id, outcome, policy, study_uid=job.study_uid)
            log.info("job %d: %s: %s", job.id, deliveries.describe(item), state if outcome.ok else f"{state}, {outcome.error}")
            if state == deliveries.FAILED and outcome.permanent:
                fallback_for(item, outcome)
    summary = deliveries.summary(sessions, job.id)
    if summary.pending:
        why = "; ".join(summary.waiting) or "not tried yet"
        raise DeliveryPending(f"{summary.pending} of {summary.total} deliveries pending: {why}", summary.next_due)
    if summary.failed:
        raise JobError("delivery failed: " + "; ".join(summary.failed), retryable=False)
    return f"{summary.sent} objects delivered to {len(destinations)} destinations"


def process(config: Config, sessions: sessionmaker, job: Job, model) -> str:  # noqa: ANN001
    out = make_results(config, sessions, job, model)
    return f"results in {out}; {deliver(config, sessions, job, out)}"
