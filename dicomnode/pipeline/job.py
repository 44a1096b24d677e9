"""One job, start to end: build the inputs, run the model, measure, write the result objects
into data_dir/results once, and deliver them (dicomnode.pipeline.dispatch).

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
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config, ModelSettings
from dicomnode.imaging.comparison import Comparison
from dicomnode.imaging.measures import measure_lesions, measure_segments
from dicomnode.imaging.timepoint import TIMEPOINT_FILE
from dicomnode.imaging.volumes import Volume
from dicomnode.pipeline.chain import ChainedLabels, await_labels, label_mask
from dicomnode.pipeline.dispatch import deliver
from dicomnode.pipeline.errors import AwaitingReview, DeliveryPending, JobError
from dicomnode.pipeline.followup import Prior, keep_timepoint, settle_compare_prior
from dicomnode.pipeline.followup import comparison as followup_comparison
from dicomnode.pipeline.inputs import Inputs, build_inputs
from dicomnode.pipeline.priors import settle_prior
from dicomnode.pipeline.resultdir import LABELS_FILE, result_dir
from dicomnode.pipeline.review import PREVIEW_FILE, found_in, held_for_review, verify_released
from dicomnode.pipeline.timing import StepTimes
from dicomnode.results.common import write_dicom
from dicomnode.results.labelcodes import LabelCodesError, label_codes
from dicomnode.results.preview import PriorView
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
from dicomnode.store.events import EventKind, record_job_event
from dicomnode.store.files import write_durably
from dicomnode.store.tables import Job

if TYPE_CHECKING:  # torch is imported where the model loads (dicomnode.pipeline.model_cache)
    from inference import SegmentationModel

log = logging.getLogger("dicomnode.processing")  # the name it had before the split: journald filters use it


def _event(sessions: sessionmaker, job: Job, kind: EventKind, message: str, data: dict | None = None) -> None:
    record_job_event(sessions, job, kind, message, log, data=data)


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


_WEIGHTS: dict[tuple, str] = {}  # (checkpoint paths, sizes, mtimes) -> digest: each file hashed once per process


def weights_fingerprint(settings: ModelSettings, root: Path | None = None) -> str:
    """A fingerprint of the model's weights themselves: SHA-256 over the bytes of each fold's
    checkpoint, in fold order (12 hex digits); remembered per file size and mtime, so a model is
    hashed once per worker process (about 1 s per GB)."""
    root = root or settings.path
    files = [root / f"fold_{fold}" / settings.checkpoint for fold in settings.folds]
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _WEIGHTS:
        digest = hashlib.sha256()
        for fold, checkpoint in zip(settings.folds, files):
            digest.update(f"{fold}:".encode())
            with checkpoint.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        _WEIGHTS[key] = f"sha256:{digest.hexdigest()[:12]}"
    return _WEIGHTS[key]



INFERENCE = "inference"  # the model's own step: the one StepTimes entry the job's other steps are counted without


def make_results(config: Config, sessions: sessionmaker, job: Job, model: SegmentationModel,
                 compared: Compared | None = None, times: StepTimes | None = None) -> Path:
    """Write the job's result objects (results_needed) into its result folder once and return the
    folder. Each file is renamed into place when complete; a later run (a retried delivery, a
    restart, an output added to the config) writes only those missing, from the label map saved
    after inference (labels.npz), so the model runs once per job and every object keeps its
    SOP Instance UID. A model with [models.compare] keeps its time point too, and `compared`
    (its prior, the chained liver labels) puts the comparison into measures.json and the SR; a
    compute-only job (a comparison's prior) writes no result object, only the time point. `times`
    gets the seconds of each step (inputs, inference, measures, comparison, each object built, writing)."""
    times = times or StepTimes()
    out = result_dir(config, job)
    settings = config.model(job.model)
    kinds = [] if job.prior_of_job is not None else results_needed(config, settings)
    missing = [kind for kind in kinds if not (out / RESULT_FILES[kind]).exists()]
    keeps_timepoint = settings.compares and not (out / TIMEPOINT_FILE).exists()
    computes = job.prior_of_job is not None and not (out / LABELS_FILE).exists()  # compute-only: the label map
    if not missing and not keeps_timepoint and not computes:
        _event(sessions, job, EventKind.RESULTS_REUSED, f"{out} from an earlier attempt")
        return out
    inputs = build_inputs(sessions, job, settings, times)
    labels = _model_labels(sessions, job, settings, model, inputs, out, config.node.worker_memory_gb, times)
    with times("measures"):
        findings = _measure(sessions, job, settings, model, inputs, labels)
    comparison, prior_view = None, None
    summary_json = findings.as_json()
    if settings.compares:
        with times("comparison"):
            liver_mask, liver_present = compared.liver(config, inputs.grid) if compared else (None, None)
            current = keep_timepoint(sessions, job, inputs, labels, out, liver_mask)
            if job.prior_of_job is None and compared is not None:
                comparison, before = followup_comparison(sessions, job, settings, current, compared.prior,
                                                         liver_present)
                if before is not None:
                    prior_view = PriorView(before.suv, before.labels, before.spacing_zyx, before.study_date)
        if comparison is not None:
            summary_json = {**summary_json, "comparison": comparison.as_json()}
    written = []
    position = [m.name for m in config.models].index(settings.name)
    numbers = {kind: result_series_number(kind, job.run_number, position) for kind in RESULT_SERIES_OFFSET}
    root = getattr(model, "model_dir", None)
    version = settings.version or model_fingerprint(settings, root)
    source = Source(inputs.grid.datasets, inputs.spacing, inputs.suv, inputs.pet_header)
    algorithm = Algorithm(settings.name, version, tuple(settings.folds), job.run_number,
                          mirroring=settings.use_mirroring, tile_step_size=settings.tile_step_size,
                          weights=_weights_or_none(settings, root), organization=config.node.organization,
                          disclaimer=config.node.result_disclaimer)
    try:
        out.mkdir(parents=True, exist_ok=True)
        summary = json.dumps(summary_json, indent=2).encode()
        write_durably(out / "measures.json", lambda fh: fh.write(summary), out / ".measures.json.partial")
        started, cpu = time.perf_counter(), time.process_time()
        for kind, ds in build_results(missing, out, findings, source, algorithm, numbers, comparison, prior_view):
            # built: the generator's time for this object
            times.add(str(kind), time.perf_counter() - started, time.process_time() - cpu)
            with times("write"):
                write_dicom(ds, out / RESULT_FILES[kind])  # whole or not at all: nothing truncated is ever sent
            written.append(f"{kind} {ds.SOPInstanceUID} series {ds.SeriesNumber}")
            started, cpu = time.perf_counter(), time.process_time()
        wants_preview = settings.review or prior_view is not None  # a reader's look; a follow-up's comparison
        if wants_preview and source.suv is not None and not (out / PREVIEW_FILE).exists():
            with times("preview"):
                _write_preview(out / PREVIEW_FILE, source, findings, f"{settings.name} run {job.run_number}",
                               prior_view, comparison)
    except OSError as exc:  # a full disk, say: this attempt fails, a later one writes what is missing
        raise JobError(f"cannot write the result objects into {out}: {exc.strerror or exc}"
                       + (f" ({', '.join(written)} written)" if written else ""), retryable=True) from exc
    if job.prior_of_job is not None:
        _event(sessions, job, EventKind.RESULTS_WRITTEN, f"compute-only (for job {job.prior_of_job}): label map"
               + (", time point" if settings.compares else "") + " and measures kept, no result object")
    else:
        _event(sessions, job, EventKind.RESULTS_WRITTEN, ", ".join(written))
    return out


def _weights_or_none(settings: ModelSettings, root: Path | None) -> str | None:
    try:
        return weights_fingerprint(settings, root)
    except OSError as exc:  # a layout without the checkpoints where we look: the version still names it
        log.warning("model %s: no weights fingerprint: %s", settings.name, exc)
        return None


def _write_preview(path: Path, source: Source, findings: Findings, title: str, prior: PriorView | None = None,
                   comparison: Comparison | None = None) -> None:
    """The PET MIP with the lesions outlined (results.preview) for a reader at review; a follow-up's
    beside its prior's, with the change ([models.compare])."""
    from dicomnode.results.preview import mip_png

    partial = path.with_name(f".{path.name}.partial.png")
    mip_png(source.suv, findings.labels, source.spacing, partial, title, prior=prior,
            comparison=comparison if prior is not None else None)
    write_durably(path, lambda fh: fh.write(partial.read_bytes()), path.with_name(f".{path.name}.partial"))
    partial.unlink(missing_ok=True)


@dataclass(frozen=True)
class Compared:
    """What a job of a model with [models.compare] found before its model ran: its prior (None:
    none, the decision event says why) and the chained model's label map for the liver (None: no
    liver_from)."""

    prior: Prior | None
    chained: ChainedLabels | None
    liver_label: str = "liver"

    def liver(self, config: Config, grid: Volume) -> tuple[np.ndarray | None, bool | None]:
        """The liver mask on the grid, and whether the chained label map gave one (None: no liver_from)."""
        if self.chained is None:
            return None, None
        mask, _ = label_mask(config, self.chained, self.liver_label, grid)
        return mask, mask is not None


def _measure(sessions: sessionmaker, job: Job, settings: ModelSettings, model: SegmentationModel, inputs: Inputs,
             labels: np.ndarray) -> Findings:
    if inputs.suv is not None:
        measures, lesion_labels = measure_lesions(
            labels > 0,
            inputs.suv,
            inputs.spacing,
            connectivity=settings.lesion_connectivity,
            min_volume_ml=settings.min_lesion_volume_ml,
        )
        _event(
            sessions,
            job,
            EventKind.MEASURED,
            f"{measures.lesion_count} lesions, MTV {measures.total_mtv_ml:.1f} ml, TLG {measures.total_tlg_g:.1f} g",
        )
        return Findings(measures, lesion_labels)
    try:
        codes = label_codes(settings, model.labels, Path(model.model_dir))
    except LabelCodesError as exc:
        raise JobError(str(exc)) from exc
    segments = measure_segments(
        labels,
        inputs.spacing,
        {value: code.name for value, code in codes.items()},
        connectivity=settings.lesion_connectivity,
    )
    _event(
        sessions,
        job,
        EventKind.MEASURED,
        "; ".join(f"{m.name} {m.volume_ml:.1f} ml in {m.components} parts" for m in segments),
    )
    return Findings(segments, labels, codes)


def _model_labels(
    sessions: sessionmaker, job: Job, settings: ModelSettings, model: SegmentationModel, inputs: Inputs, out: Path,
    budget_gb: float | None = None, times: StepTimes | None = None,
) -> np.ndarray:
    """The model's label map on the grid: saved by an earlier attempt, else predicted and saved."""
    times = times or StepTimes()
    saved = out / LABELS_FILE
    if saved.exists():
        with np.load(saved) as data:
            labels = data["labels"]
        _event(sessions, job, EventKind.LABELS_REUSED, f"{saved} from an earlier attempt: no inference")
        return labels
    if len(settings.channels) != len(model.channel_names):
        raise JobError(
            f"model {settings.name} takes {len(model.channel_names)} channels {model.channel_names} "
            f"but config models.channels lists {len(settings.channels)}: {settings.channels}"
        )
    _check_memory(settings, model, inputs, budget_gb)
    started = time.monotonic()
    with times(INFERENCE):
        labels = model.predict(inputs.channels, inputs.spacing)
    seconds, foreground = time.monotonic() - started, int((labels > 0).sum())
    _event(
        sessions,
        job,
        EventKind.INFERENCE_DONE,
        f"{seconds:.1f} s on {model.device}, {foreground} foreground voxels",
        data={"seconds": round(seconds, 3), "device": str(model.device), "foreground_voxels": foreground},
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
        grid = inputs.grid  # where the label map lies, and what its values name: another model may chain on it
        with times("labels saved"):
            write_durably(saved, lambda fh: np.savez_compressed(
                fh, labels=labels, spacing=np.asarray(grid.spacing), origin=np.asarray(grid.origin),
                direction=np.asarray(grid.direction), label_names=np.asarray(json.dumps(dict(model.labels)))),
                out / f".{LABELS_FILE}.partial")
    except OSError as exc:  # not kept: the next attempt runs the model again
        log.warning("job %d: label map not saved in %s: %s", job.id, out, exc.strerror or exc)
    return labels


def _check_memory(settings: ModelSettings, model: SegmentationModel, inputs: Inputs, budget_gb: float | None) -> None:
    """A case too big for worker_memory_gb is refused before inference, not killed mid-way: what
    this process holds now (its data, as RLIMIT_DATA counts it) plus the model's working set and
    the case's whole-image buffers (estimates, inference/memory.py) must fit."""
    if budget_gb is None:
        return
    held = process_data_bytes()
    case = model.case_bytes(inputs.channels.shape, inputs.spacing) + model.footprint.working_bytes()
    if held + case > budget_gb * 1e9:
        grid = "x".join(str(n) for n in inputs.channels.shape[1:])
        raise JobError(
            f"the case needs about {(held + case) / 1e9:.2f} GB to segment with model {settings.name} "
            f"({grid} voxels on the {inputs.grid_name} grid: {case / 1e9:.2f} GB; the worker holds "
            f"{held / 1e9:.2f} GB), more than worker_memory_gb = {budget_gb:g}: refused before inference"
        )


def process_data_bytes() -> int:
    """This process's data (heap and private anonymous mappings: VmData), which RLIMIT_DATA limits."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process(config: Config, sessions: sessionmaker, job: Job, model: SegmentationModel) -> str:
    """Run the job: its prior, its results (made once), their deliveries; a step-times event
    says where the time went."""
    times = StepTimes()
    settings = config.model(job.model)
    with times("prior"):
        if job.prior_of_job is None:
            settle_prior(config, sessions, job, settings)  # [models.priors]: fetched or ruled out first
        compared = None
        if settings.compares:  # the prior and the chained label map, each waited for before the model runs
            compare = settings.compare
            prior = settle_compare_prior(config, sessions, job, settings) if job.prior_of_job is None else None
            chained = await_labels(config, sessions, job, compare.liver_from) if compare.liver_from else None
            compared = Compared(prior, chained, compare.liver_label)
    out = make_results(config, sessions, job, model, compared, times)
    if job.prior_of_job is not None:
        _record_times(sessions, job, times)
        return f"results in {out}; computed for job {job.prior_of_job}: nothing delivered"
    if held_for_review(sessions, settings, job):  # review = true: nothing is sent until a reader decides
        _record_times(sessions, job, times)
        raise AwaitingReview(_held_message(out), {"result_dir": str(out)})
    verify_released(sessions, job, out, config.node.organization)  # a released job: its SR VERIFIED first
    try:
        with times("delivery"):
            delivered = deliver(config, sessions, job, out)
    except DeliveryPending:
        _record_times(sessions, job, times)
        raise
    _record_times(sessions, job, times)
    return f"results in {out}; {delivered}"


def _record_times(sessions: sessionmaker, job: Job, times: StepTimes) -> None:
    besides = times.total(leaving_out=(INFERENCE,))
    _event(sessions, job, EventKind.STEP_TIMES, f"{besides:.1f} s besides inference: {times.text()}",
           data={"seconds": times.as_data(), "cpu_seconds": times.as_data(cpu=True),
                 "besides_inference": round(besides, 3)})


def _held_message(out: Path) -> str:
    """What a held job found, from its measures.json, for the held-for-review event."""
    return (f"{found_in(out)}; results in {out}, nothing sent: `dicomnode review release JOB --by NAME` "
            "or `review reject JOB --by NAME --reason TEXT`")
