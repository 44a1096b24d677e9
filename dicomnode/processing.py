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
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config, Destination, ModelSettings
from dicomnode.store.tables import Delivery, Job
from dicomnode.queue import RetryPolicy
from dicomnode.store.events import log_event
from dicomnode.store.files import write_durably
from dicomnode.results.common import write_dicom
from dicomnode.results.writer import (
    RESULT_FILES,
    RESULT_SERIES_OFFSET,
    Algorithm,
    Findings,
    Source,
    build_results,
    result_series_number,
    results_needed,
)
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
    """The model's input channels on one grid (the model's `grid` setting: one of its channels).

    `grid` is the volume of the series that gives the grid: its `.datasets` are the source
    images the SEG and SR reference, slice for slice. `suv` is the PET in SUVbw on that grid
    (what the lesions are measured on), None for a model without a PET channel."""

    channels: np.ndarray  # (c, z, y, x) on the grid
    spacing: tuple[float, float, float]  # (z, y, x) mm of the grid
    grid: object  # volumes.Volume of the series that gives the grid
    suv: np.ndarray | None  # (z, y, x) PET SUVbw on the grid, None without a PET channel
    grid_name: str = "PET"  # the channel that gives the grid: "PET", "CT", "T1CE", ...
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
    from dicomnode.store.tables import Event

    with sessions() as session:
        selection = select_inputs(series_from_index(session, job.study_uid), settings.channels, settings.inputs,
                                  settings.grid)
        recorded = session.scalar(select(Event.id).where(Event.job_id == job.id, Event.kind == VERDICT).limit(1))
    if recorded is None:
        with sessions.begin() as session:
            for verdict in selection.verdicts:
                log_event(session, VERDICT, verdict.message, study_uid=job.study_uid, job_id=job.id)
    if not selection.ready:
        raise JobError(f"no usable inputs: {selection.problem}", retryable=bool(selection.waiting) and not selection.missing)
    return selection


def assemble_inputs(paths: dict[str, list[Path]], channel_names: list[str], grid: str = "PET") -> Inputs:
    """The model's input channels on the `grid` channel's series grid, from each channel's files
    (`paths` by channel name): "CT" in HU, "PET" in SUVbw, any other (named: MR, ...) as
    stored, rescale applied. Every other channel is resampled linearly onto the grid; outside
    its field of view: -1024 HU for the CT, SUV 0 for the PET, 0 for the rest (e.g. the CT onto
    the PET grid as GLOW-FDG was trained, or T1, T2 and FLAIR onto the T1 post contrast).
    `dicomnode inspect --export` writes the same."""
    from dicomnode.imaging.suv import SuvError
    from dicomnode.imaging.volumes import CT_PADDING_HU, VolumeError, resample_to

    padding = {"CT": CT_PADDING_HU, "PET": 0.0}  # outside a resampled channel's field of view; else 0
    lacking = [c for c in dict.fromkeys([*channel_names, grid]) if c not in paths]
    if lacking:
        raise JobError(f"no series for channel{'s' if len(lacking) > 1 else ''} {', '.join(lacking)}"
                       f"{' (the grid)' if grid in lacking else ''}")
    try:
        volumes = {c: _channel_volume(c, paths[c]) for c in dict.fromkeys([*channel_names, grid])}
        reference = volumes[grid]
        arrays = {c: v.array if c == grid else resample_to(v, reference, default_value=padding.get(c, 0.0)).array
                  for c, v in volumes.items()}
    except VolumeError as exc:
        raise JobError(f"cannot build input volumes: {exc}") from exc
    except SuvError as exc:
        raise JobError(f"cannot compute SUVbw: {exc}") from exc
    for c in channel_names:
        if not np.isfinite(arrays[c]).all():
            raise JobError(f"channel {c} ({volumes[c].modality} series {volumes[c].series_instance_uid}) holds NaN or "
                           "infinite values: check its RescaleSlope/RescaleIntercept and pixel data")
    channels = np.stack([arrays[c].astype(np.float32, copy=False) for c in channel_names])
    pet = volumes.get("PET")
    return Inputs(channels=channels, spacing=tuple(reference.spacing), grid=reference,
                  suv=arrays["PET"].astype(np.float32, copy=False) if pet is not None else None, grid_name=grid,
                  pet_header=pet.datasets[0] if pet is not None else None)



def _channel_volume(channel: str, paths: list[Path]):  # noqa: ANN202 - volumes.Volume
    """One channel's series as a volume: the PET in SUVbw, anything else as its rescaled values."""
    from dataclasses import replace

    from dicomnode.imaging.suv import pet_suv_volume
    from dicomnode.imaging.volumes import load_series

    volume = load_series(paths)
    return replace(volume, array=pet_suv_volume(volume).astype(np.float32)) if channel == "PET" else volume


def build_inputs(sessions: sessionmaker, job: Job, settings: ModelSettings) -> Inputs:
    """The job's model input channels, `settings.channels` in order, on the `settings.grid` grid."""
    selection = select_series(sessions, job, settings)
    channel_names = list(settings.channels)
    inputs = assemble_inputs({c: selection.paths(c) for c in selection.chosen}, channel_names, settings.grid)
    used = ", ".join(f"{c} <- {selection.chosen[c].label()}" for c in dict.fromkeys(channel_names))
    used += f"; on the {settings.grid} grid {'x'.join(str(n) for n in inputs.channels.shape[1:])}"
    _event(sessions, job, "inputs-built", used)
    return inputs


def model_fingerprint(settings: ModelSettings, root: Path | None = None) -> str:
    """A short, stable identity of a model folder: its plans, dataset.json and checkpoints' sizes.
    `root`: the folder holding them when it is not the configured path (nnU-Net's results layout)."""
    root = root or settings.path
    digest = hashlib.sha256()
    for name in ("dataset.json", "plans.json"):
        digest.update((root / name).read_bytes())
    for fold in settings.folds:
        checkpoint = root / f"fold_{fold}" / settings.checkpoint
        digest.update(f"{fold}:{checkpoint.stat().st_size}".encode())
    return f"sha256:{digest.hexdigest()[:12]}"


def result_dir(config: Config, job: Job) -> Path:
    return config.results_dir / job.study_uid / f"job-{job.id}"


LABELS_FILE = "labels.npz"  # the model's label map: objects missing later are built without inference


def make_results(config: Config, sessions: sessionmaker, job: Job, model) -> Path:  # noqa: ANN001 - inference.SegmentationModel
    """Write the job's result objects (results_needed) into its result folder once and return the
    folder. Each file is renamed into place when complete; a later run (a retried delivery, a
    restart, an output added to the config) writes only those missing, from the label map saved
    after inference (labels.npz), so the model runs once per job and every object keeps its
    SOP Instance UID."""
    out = result_dir(config, job)
    settings = config.model(job.model)
    missing = [kind for kind in results_needed(config, settings) if not (out / RESULT_FILES[kind]).exists()]
    if not missing:
        _event(sessions, job, "results-reused", f"{out} from an earlier attempt")
        return out
    inputs = build_inputs(sessions, job, settings)
    labels = _model_labels(sessions, job, settings, model, inputs, out)
    findings = _measure(sessions, job, settings, model, inputs, labels)
    out.mkdir(parents=True, exist_ok=True)
    (out / "measures.json").write_text(json.dumps(findings.as_json(), indent=2))
    written = []
    position = [m.name for m in config.models].index(settings.name)
    numbers = {kind: result_series_number(kind, job.run_number, position) for kind in RESULT_SERIES_OFFSET}
    version = settings.version or model_fingerprint(settings, getattr(model, "model_dir", None))
    source = Source(inputs.grid.datasets, inputs.spacing, inputs.suv, inputs.pet_header)
    algorithm = Algorithm(settings.name, version, tuple(settings.folds), job.run_number)
    for kind, ds in build_results(missing, out, findings, source, algorithm, numbers):
        write_dicom(ds, out / RESULT_FILES[kind])
        written.append(f"{kind} {ds.SOPInstanceUID} series {ds.SeriesNumber}")
    _event(sessions, job, "results-written", ", ".join(written))
    return out


def _measure(sessions: sessionmaker, job: Job, settings: ModelSettings, model, inputs: Inputs,  # noqa: ANN001
             labels: np.ndarray) -> Findings:
    from dicomnode.results.labelcodes import LabelCodesError, label_codes
    from dicomnode.imaging.measures import measure_lesions, measure_segments

    if inputs.suv is not None:
        measures, lesion_labels = measure_lesions(labels > 0, inputs.suv, inputs.spacing, connectivity=settings.lesion_connectivity,
                                                  min_volume_ml=settings.min_lesion_volume_ml)
        _event(sessions, job, "measured", f"{measures.lesion_count} lesions, MTV {measures.total_mtv_ml:.1f} ml, TLG {measures.total_tlg_g:.1f} g")
        return Findings(measures, lesion_labels)
    try:
        codes = label_codes(settings, model.labels, Path(model.model_dir))
    except LabelCodesError as exc:
        raise JobError(str(exc)) from exc
    segments = measure_segments(labels, inputs.spacing, {value: code.name for value, code in codes.items()},
                                connectivity=settings.lesion_connectivity)
    _event(sessions, job, "measured", "; ".join(f"{m.name} {m.volume_ml:.1f} ml in {m.components} parts" for m in segments))
    return Findings(segments, labels, codes)


def _model_labels(sessions: sessionmaker, job: Job, settings: ModelSettings, model, inputs: Inputs, out: Path) -> np.ndarray:  # noqa: ANN001
    """The model's label map on the grid: saved by an earlier attempt, else predicted and saved."""
    saved = out / LABELS_FILE
    if saved.exists():
        with np.load(saved) as data:
            labels = data["labels"]
        _event(sessions, job, "labels-reused", f"{saved} from an earlier attempt: no inference")
        return labels
    if len(settings.channels) != len(model.channel_names):
        raise JobError(
            f"model {settings.name} takes {len(model.channel_names)} channels {model.channel_names} "
            f"but config models.channels lists {len(settings.channels)}: {settings.channels}"
        )
    started = time.monotonic()
    labels = model.predict(inputs.channels, inputs.spacing)
    _event(sessions, job, "inference-done", f"{time.monotonic() - started:.1f} s on {model.device}, {int((labels > 0).sum())} foreground voxels")
    out.mkdir(parents=True, exist_ok=True)
    write_durably(saved, lambda fh: np.savez_compressed(fh, labels=labels), out / f".{LABELS_FILE}.partial")
    return labels


class DeliveryPending(Exception):
    """Some deliveries wait for their backoff: the job goes back to the queue until `not_before`
    (queue.defer) instead of holding the worker; the next run reuses the results."""

    def __init__(self, message: str, not_before: datetime) -> None:
        super().__init__(message)
        self.not_before = not_before


TRIES_PER_PASS = 2  # C-STORE tries of one object in one delivery pass (a lost response is retried at once)


def fallback_for(
    sessions: sessionmaker, job: Job, out: Path, refused: Delivery, outcome: Outcome, destination: Destination | None,
    policy: RetryPolicy,
) -> int | None:
    """The destination refused `refused`'s SOP class for good (no presentation context for it, or
    0x0122): its fallback object (written with the results, see results_needed) is planned to it
    as a further delivery of the same job and `refused` becomes replaced. Returns the fallback
    delivery's id; None when there is no fallback (none configured, or the refused object is it)."""
    from dicomnode import delivery as deliveries

    if destination is None or destination.fallback is None or not outcome.sop_class_refused:
        return None
    fallback = out / RESULT_FILES[destination.fallback]
    if Path(refused.path).name == fallback.name:
        return None
    return deliveries.replace(sessions, refused.id, fallback, policy, study_uid=job.study_uid)


def deliver(config: Config, sessions: sessionmaker, job: Job, out: Path) -> str:
    """Send each destination its outputs (by default seg.dcm, then sr.dcm), each object to each
    destination as its own delivery (dicomnode.delivery) with its own retries; an object refused
    for good is replaced by the destination's fallback, sent in the same pass. Returns a summary
    when every delivery is sent or replaced; raises DeliveryPending while some wait for their
    backoff, and JobError (not retryable: the deliveries did their retrying) naming the
    destination and the object once none is pending and one failed."""
    from dicomnode import delivery as deliveries

    settings = config.model(job.model)
    policy = RetryPolicy(config.node.delivery_max_attempts, config.node.delivery_backoff_seconds)
    destinations = {d.name: d for d in config.destinations_for(settings)}
    for destination in destinations.values():
        files = [out / RESULT_FILES[kind] for kind in destination.outputs]
        deliveries.plan(sessions, job.id, job.study_uid, files, [destination.name], policy)
    fallbacks = _send(config, sessions, job, out, destinations, deliveries.due(sessions, job.id), policy)
    if fallbacks:  # planned just now: sent at once, not after a trip through the queue
        _send(config, sessions, job, out, destinations, [d for d in deliveries.due(sessions, job.id) if d.id in fallbacks], policy)
    summary = deliveries.summary(sessions, job.id)
    if summary.pending:
        why = "; ".join(summary.waiting) or "not tried yet"
        raise DeliveryPending(f"{summary.pending} of {summary.total} deliveries pending: {why}", summary.next_due)
    if summary.failed:
        raise JobError("delivery failed: " + "; ".join(summary.failed), retryable=False)
    replaced = f"; replaced by the destination's fallback: {'; '.join(summary.replaced)}" if summary.replaced else ""
    return f"{summary.sent} objects delivered to {len(destinations)} destinations{replaced}"


def _send(config: Config, sessions: sessionmaker, job: Job, out: Path, destinations: dict[str, Destination],
          items: list[Delivery], policy: RetryPolicy) -> set[int]:
    """One pass over due deliveries, destination by destination: send, record each outcome, plan
    fallbacks for objects refused for good. Returns the fallback deliveries planned."""
    from dicomnode import delivery as deliveries

    by_destination: dict[str, list[Delivery]] = {}
    for item in items:
        by_destination.setdefault(item.destination, []).append(item)
    fallbacks = set()
    for name, batch in by_destination.items():
        destination = destinations.get(name)
        outcomes = _store(config, destination, name, batch)
        for item in batch:
            outcome = outcomes[item.id]
            state = deliveries.record(sessions, item.id, outcome, policy, study_uid=job.study_uid)
            log.info("job %d: %s: %s", job.id, deliveries.describe(item), state if outcome.ok else f"{state}, {outcome.error}")
            planned = fallback_for(sessions, job, out, item, outcome, destination, policy) if state == deliveries.FAILED else None
            if planned is not None:
                fallbacks.add(planned)
    return fallbacks


def _store(config: Config, destination: Destination | None, name: str, items: list[Delivery]) -> dict[int, Outcome]:
    """C-STORE the deliveries' files to one destination; an outcome per delivery id."""
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
    return outcomes


def process(config: Config, sessions: sessionmaker, job: Job, model) -> str:  # noqa: ANN001
    out = make_results(config, sessions, job, model)
    return f"results in {out}; {deliver(config, sessions, job, out)}"
