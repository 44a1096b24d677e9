"""What `dicomnode review list` and `review show` read: the jobs held for review ([[models]]
review = true, dicomnode.pipeline.review), what each found (its measures.json), its preview PNG
and its result files. Reads the database and the job's result folder only."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config
from dicomnode.pipeline.job import result_dir
from dicomnode.pipeline.review import PREVIEW_FILE, awaiting, found_in
from dicomnode.results.writer import RESULT_FILES, RESULT_KINDS
from dicomnode.store.events import EventKind, event_data
from dicomnode.store.tables import Event, Job


@dataclass
class ReviewRow:
    id: int
    study: str
    model: str
    run: int
    held_at: datetime | None
    found: str  # one line: lesions, MTV, TLG (or the segments' volumes)


@dataclass
class ResultFile:
    kind: str  # an OutputKind
    path: str
    sop_class: str
    sop_instance_uid: str
    verification: str  # an SR's VerificationFlag; "" for the others


@dataclass
class ReviewDetail:
    id: int
    state: str  # a JobState
    study: str
    model: str
    run: int
    held_at: datetime | None
    result_dir: str
    preview: str | None  # the preview PNG's path; None: none (a model without PET, or not written)
    measures: object  # measures.json as written: a dict of lesions and totals, or a list of segments
    files: list[ResultFile] = field(default_factory=list)
    reviewed_by: str | None = None
    reviewed_at: datetime | None = None


def _measures(out: Path) -> object:
    try:
        return json.loads((out / "measures.json").read_text())
    except (OSError, ValueError):
        return None


def _held_at(sessions: sessionmaker, job_id: int) -> datetime | None:
    with sessions() as session:
        return session.scalar(select(Event.at).where(Event.job_id == job_id,
                                                     Event.kind == EventKind.HELD_FOR_REVIEW.value)
                              .order_by(Event.id.desc()).limit(1))


def _folder(config: Config, sessions: sessionmaker, job: Job) -> Path:
    """The job's result folder, as the held-for-review event says (else where it is written)."""
    with sessions() as session:
        event = session.scalar(select(Event).where(Event.job_id == job.id,
                                                   Event.kind == EventKind.HELD_FOR_REVIEW.value)
                               .order_by(Event.id.desc()).limit(1))
    folder = event_data(event).get("result_dir") if event is not None else None
    return Path(folder) if folder else result_dir(config, job)


def list_awaiting(config: Config, sessions: sessionmaker) -> list[ReviewRow]:
    """The jobs awaiting review, oldest first."""
    return [ReviewRow(job.id, job.study_uid, job.model, job.run_number, _held_at(sessions, job.id),
                      found_in(_folder(config, sessions, job)))
            for job in awaiting(sessions)]


def review_detail(config: Config, sessions: sessionmaker, job_id: int) -> ReviewDetail | None:
    """A job's results as a reader reviews them (any job that has a result folder); None: no job."""
    with sessions() as session:
        job = session.get(Job, job_id)
    if job is None:
        return None
    out = _folder(config, sessions, job)
    preview = out / PREVIEW_FILE
    files = []
    for kind in RESULT_KINDS:
        path = out / RESULT_FILES[kind]
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (OSError, InvalidDicomError):
            continue
        sop_class = UID(str(ds.SOPClassUID))
        files.append(ResultFile(kind.value, str(path), sop_class.name or str(sop_class), str(ds.SOPInstanceUID),
                                str(ds.get("VerificationFlag", ""))))
    return ReviewDetail(job.id, job.state, job.study_uid, job.model, job.run_number, _held_at(sessions, job.id),
                        str(out), str(preview) if preview.exists() else None, _measures(out), files,
                        job.reviewed_by, job.reviewed_at)
