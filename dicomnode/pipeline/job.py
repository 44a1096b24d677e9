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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config, ModelSettings
from dicomnode.imaging.measures import measure_lesions, measure_segments
from dicomnode.pipeline.dispatch import deliver
from dicomnode.pipeline.errors import DeliveryPending, JobError
from dicomnode.pipeline.inputs import Inputs, build_inputs
from dicomnode.pipeline.priors import settle_prior
from dicomnode.pipeline.timing import StepTimes
from dicomnode.results.common import write_dicom
from dicomnode.results.labelcodes import LabelCodesError, label_codes
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


def result_dir(config: Config, job: Job) -> Path:
    return config.results_dir / job.study_uid / f"job-{job.id}"


INFERENCE = "inference"  # the model's own step: the one StepTimes entry the job's other steps are counted without
LABELS_FILE = "labels.npz"  # the model's label map: objects missing later are built without inference


def make_results(config: Config, sessions: sessionmaker, job: Job, model: SegmentationModel,
                 times: StepTimes | None = None) -> Path:
    """Write the job's result objects (results_needed) into its result folder once and return the
    folder. Each file is renamed into place when complete; a later run (a retried delivery, a
    restart, an output added to the config) writes only those missing, from the label map saved
    after inference (labels.npz), so the model runs once per job and every object keeps its
    SOP Instance UID. `times` gets the seconds of each step (inputs, inference, measures, each
    object built, writing)."""
    times = times or StepTimes()
    out = result_dir(config, job)
    settings = config.model(job.model)
    missing = [kind for kind in results_needed(config, settings) if not (out / RESULT_FILES[kind]).exists()]
    if not missing:
        _event(sessions, job, EventKind.RESULTS_REUSED, f"{out} from an earlier attempt")
        return out
    inputs = build_inputs(sessions, job, settings, times)
    labels = _model_labels(sessions, job, settings, model, inputs, out, config.node.worker_memory_gb, times)
    with times("measures"):
        findings = _measure(sessions, job, settings, model, inputs, labels)
    written = []
    position = [m.name for m in config.models].index(settings.name)
    numbers = {kind: result_series_number(kind, job.run_number, position) for kind in RESULT_SERIES_OFFSET}
    version = settings.version or model_fingerprint(settings, getattr(model, "model_dir", None))
    source = Source(inputs.grid.datasets, inputs.spacing, inputs.suv, inputs.pet_header)
    algorithm = Algorithm(settings.name, version, tuple(settings.folds), job.run_number)
    try:
        out.mkdir(parents=True, exist_ok=True)
        summary = json.dumps(findings.as_json(), indent=2).encode()
        write_durably(out / "measures.json", lambda fh: fh.write(summary), out / ".measures.json.partial")
        started, cpu = time.perf_counter(), time.process_time()
        for kind, ds in build_results(missing, out, findings, source, algorithm, numbers):
            # built: the generator's time for this object
            times.add(str(kind), time.perf_counter() - started, time.process_time() - cpu)
            with times("write"):
                write_dicom(ds, out / RESULT_FILES[kind])  # whole or not at all: nothing truncated is ever sent
            written.append(f"{kind} {ds.SOPInstanceUID} series {ds.SeriesNumber}")
            started, cpu = time.perf_counter(), time.process_time()
    except OSError as exc:  # a full disk, say: this attempt fails, a later one writes what is missing
        raise JobError(f"cannot write the result objects into {out}: {exc.strerror or exc}"
                       + (f" ({', '.join(written)} written)" if written else ""), retryable=True) from exc
    _event(sessions, job, EventKind.RESULTS_WRITTEN, ", ".join(written))
    return out


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
        with times("labels saved"):
            write_durably(saved, lambda fh: np.savez_compressed(fh, labels=labels), out / f".{LABELS_FILE}.partial")
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
    with times("prior"):
        settle_prior(config, sessions, job, config.model(job.model))  # [models.priors]: fetched or ruled out first
    out = make_results(config, sessions, job, model, times)
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
