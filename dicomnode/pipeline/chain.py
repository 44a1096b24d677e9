"""Model chaining: a job that needs another model's label map on the same study.

A model with `[models.compare] liver_from = "organs-ct"` takes its liver mask from the label map
of that model's job on the same study. `await_labels` runs before the job's own model: the other
model's latest job on the study is looked at, and

  * queued or running: the job waits (InputsNotReady: back in the queue, the attempt not counted,
    the timeline says "waiting for organs-ct on this study (job N, queued)"); the worker wakes it
    when that job ends (`dependants`);
  * succeeded: its label map (labels.npz in its result folder: the labels, their grid and
    dataset.json's label names) is used: event "labels-from-model";
  * failed or cancelled, none at all, the model not configured, its label map gone (retention) or
    without the label: "no-labels-from-model" with the reason, and the job goes on without it
    (the comparison reports the liver reference as not assessed).

A compute-only job (a comparison's prior, fetched: the assembler queued nothing for it) queues
the other model's compute-only job on that study itself, and waits for it.

`label_mask` then puts the label (by its name in the other model's label codes, else in its
dataset.json) onto this job's grid, nearest neighbour (SimpleITK): both models' grids lie in the
study's one frame of reference (PET and CT share it, pipeline/selection).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config
from dicomnode.imaging.volumes import Volume
from dicomnode.pipeline.errors import InputsNotReady
from dicomnode.pipeline.queue import RetryPolicy, enqueue
from dicomnode.pipeline.resultdir import LABELS_FILE, result_dir
from dicomnode.results.labelcodes import LabelCodesError, label_codes
from dicomnode.store.events import EventKind, record_job_event
from dicomnode.store.tables import Job, JobState

log = logging.getLogger("dicomnode.processing")


@dataclass(frozen=True)
class ChainedLabels:
    """Another model's label map on the study: where it is, or why there is none (`reason`)."""

    model: str
    job_id: int | None = None
    path: Path | None = None
    reason: str = ""

    @property
    def found(self) -> bool:
        return self.path is not None


def _latest_job(sessions: sessionmaker, study_uid: str, model: str) -> Job | None:
    with sessions() as session:
        return session.scalar(select(Job).where(Job.study_uid == study_uid, Job.model == model)
                              .order_by(Job.id.desc()).limit(1))


def await_labels(config: Config, sessions: sessionmaker, job: Job, other: str) -> ChainedLabels:
    """The label map of model `other`'s job on this job's study, once that job has ended (see the module);
    raises InputsNotReady while it is queued or running."""
    names = [m.name for m in config.models]
    if other not in names:
        return _none(sessions, job, other, None, f"model {other} is not configured")
    theirs = _latest_job(sessions, job.study_uid, other)
    if theirs is None and job.prior_of_job is not None:  # a fetched prior: nothing queued it but us
        queued = enqueue(sessions, job.study_uid, other, RetryPolicy.for_jobs(config.node),
                         f"its label map for job {job.id} (model {job.model}), computed for the comparison of job "
                         f"{job.prior_of_job}: nothing delivered", priority=job.priority, prior_of_job=job.id)
        raise InputsNotReady(f"waiting for {other} on this study (job {queued}, queued for it)")
    if theirs is None:
        return _none(sessions, job, other, None, f"model {other} has no job on this study")
    if theirs.state in (JobState.QUEUED, JobState.RUNNING):
        raise InputsNotReady(f"waiting for {other} on this study (job {theirs.id}, {theirs.state})")
    if theirs.state != JobState.SUCCEEDED:
        return _none(sessions, job, other, theirs.id,
                     f"{other}'s job {theirs.id} on this study {theirs.state}: {theirs.error or 'no reason given'}")
    path = result_dir(config, theirs) / LABELS_FILE
    if not path.is_file():
        return _none(sessions, job, other, theirs.id, f"{other}'s job {theirs.id} left no label map ({path} is gone)")
    record_job_event(sessions, job, EventKind.LABELS_FROM_MODEL, f"{other}'s label map from job {theirs.id}", log,
                     data={"model": other, "job_id": theirs.id, "path": str(path)})
    return ChainedLabels(other, theirs.id, path)


def _none(sessions: sessionmaker, job: Job, other: str, job_id: int | None, reason: str) -> ChainedLabels:
    record_job_event(sessions, job, EventKind.NO_LABELS_FROM_MODEL, reason, log,
                     data={"model": other, "job_id": job_id, "reason": reason})
    return ChainedLabels(other, job_id, None, reason)


def label_mask(config: Config, chained: ChainedLabels, label: str, grid: Volume) -> tuple[np.ndarray | None, str]:
    """The voxels of `label` (a name) in the chained label map, on `grid` (0/1 uint8), and a line
    saying what was taken; (None, why) when the label map has no such label or cannot be read."""
    if chained.path is None:
        return None, chained.reason
    try:
        with np.load(chained.path) as data:
            labels = data["labels"]
            if "label_names" not in data:
                return None, f"{chained.path} has no grid or label names (written before model chaining)"
            spacing, origin, direction = data["spacing"], data["origin"], data["direction"]
            names = json.loads(str(data["label_names"]))
    except (OSError, ValueError, KeyError) as exc:
        return None, f"cannot read {chained.path}: {exc}"
    value = _label_value(config, chained.model, names, label)
    if value is None:
        return None, f"{chained.model} has no label {label!r} (its labels: {', '.join(n for n in names if n)})"
    source = sitk.GetImageFromArray((labels == value).astype(np.uint8))
    source.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    source.SetOrigin(tuple(float(o) for o in origin))
    source.SetDirection(tuple(float(d) for d in direction))
    mask = sitk.GetArrayFromImage(sitk.Resample(source, grid.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor,
                                                0, sitk.sitkUInt8))
    return mask, (f"{label} (label {value} of {chained.model}, job {chained.job_id}): {int(mask.sum())} voxels "
                  "on this grid")


def _label_value(config: Config, model: str, names: dict[str, int], label: str) -> int | None:
    """The value of the label called `label` in the model's label codes, else in dataset.json's names."""
    wanted = label.strip().lower()
    try:
        settings = config.model(model)
        codes = label_codes(settings, names, settings.path)
    except (KeyError, LabelCodesError):
        codes = {}
    for value, code in codes.items():
        if code.name.strip().lower() == wanted:
            return value
    for name, value in names.items():
        if name.strip().lower() == wanted and value:
            return int(value)
    return None


def dependants(config: Config, sessions: sessionmaker, job: Job) -> list[int]:
    """Jobs that may wait for `job`: the job it was queued for (a comparison's prior, a chained
    label map), and the queued jobs on its study of models that chain on its model."""
    chaining = [m.name for m in config.models if m.compare is not None and m.compare.liver_from == job.model]
    ids = [job.prior_of_job] if job.prior_of_job is not None else []
    if chaining:
        with sessions() as session:
            ids += list(session.scalars(select(Job.id).where(Job.study_uid == job.study_uid, Job.model.in_(chaining),
                                                             Job.state == JobState.QUEUED)))
    return ids
