"""What `dicomnode jobs` and `dicomnode studies` show: jobs with their timelines and deliveries,
studies with their series and each series' latest verdict, read from the database. Plain
dataclasses: the CLI prints them as tables, and `as_json` gives the same data for `--json`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.store.events import EventKind, event_data
from dicomnode.store.index import series_of_study
from dicomnode.store.tables import (
    Delivery,
    Event,
    Instance,
    Job,
    JobState,
    Study,
    utcnow,
)


def as_json(value) -> str:  # noqa: ANN001 - a dataclass, or a list of them
    """The data of a query as JSON; times in ISO 8601 with their UTC offset."""
    plain = [asdict(v) for v in value] if isinstance(value, list) else asdict(value) if is_dataclass(value) else value
    return json.dumps(plain, indent=2, default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v))


@dataclass
class EventRow:
    at: datetime
    kind: str
    message: str
    study_uid: str | None
    job_id: int | None



# --- jobs -------------------------------------------------------------------------------------

@dataclass
class JobRow:
    id: int
    state: str
    priority: str  # a config.Priority
    study: str
    model: str
    run: int
    attempts: int
    max_attempts: int
    created: datetime
    started: datetime | None
    finished: datetime | None
    error: str | None
    prior_of_job: int | None = None  # [models.compare]: a compute-only job for that job's comparison


def _job_row(job: Job) -> JobRow:
    return JobRow(job.id, job.state, job.priority, job.study_uid, job.model, job.run_number, job.attempts,
                  job.max_attempts, job.created_at, job.started_at, job.finished_at, job.error, job.prior_of_job)


RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """"2h", "30m", "1d" (before now) or an ISO 8601 time (without an offset: UTC)."""
    now = now or utcnow()
    relative = RELATIVE.match(text)
    if relative:
        return now - timedelta(seconds=float(relative[1]) * UNIT_SECONDS[relative[2]])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a time: give e.g. 30m, 2h, 1d or 2024-05-01T08:00") from None
    return when if when.tzinfo else when.replace(tzinfo=now.tzinfo)


def list_jobs(
    sessions: sessionmaker, state: str | None = None, since: datetime | None = None, study: str | None = None
) -> list[JobRow]:
    """Jobs, newest first; `since`: created at or after."""
    if state is not None and state not in set(JobState):
        raise ValueError(f"no job state {state!r}: one of {', '.join(JobState)}")
    query = select(Job).order_by(Job.id.desc())
    if state is not None:
        query = query.where(Job.state == state)
    if since is not None:
        query = query.where(Job.created_at >= since)
    if study is not None:
        query = query.where(Job.study_uid == study)
    with sessions() as session:
        return [_job_row(j) for j in session.scalars(query)]


@dataclass
class Step:
    at: datetime
    event: str
    message: str
    since_previous_seconds: float | None  # None for the first step
    since_received_seconds: float | None  # since the study's first instance; None: study not in the index


@dataclass
class DeliveryRow:
    destination: str
    file: str
    sop_instance_uid: str
    state: str
    attempts: int
    max_attempts: int
    not_before: datetime
    sent_at: datetime | None
    last_error: str | None
    confirmed_at: datetime | None = None  # the destination confirmed it (verify): committed, or found by a query
    confirm_by: datetime | None = None  # confirming: the storage commitment report is awaited until then
    transaction_uid: str | None = None  # confirming: the storage commitment transaction


@dataclass
class JobDetail(JobRow):
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    result_dir: str | None = None
    deliveries: list[DeliveryRow] = field(default_factory=list)
    timeline: list[Step] = field(default_factory=list)
    comparison: list[str] = field(default_factory=list)  # [models.compare]: the comparison's text lines, if made


def _last_instance(session: Session, job: Job) -> tuple[datetime, str, str] | None:
    """When the last instance before the job arrived (the study complete), from the index."""
    last, count = session.execute(
        select(func.max(Instance.received_at), func.count()).where(
            Instance.study_uid == job.study_uid, Instance.received_at <= job.created_at
        )
    ).one()
    return (
        (last, "last-instance", f"the last of {count} instances received before the job was queued") if last else None
    )


def job_detail(sessions: sessionmaker, job_id: int) -> JobDetail | None:
    """A job, its deliveries and its timeline: the study's events up to the job (received,
    incomplete...), the last instance received, then the job's own events in order."""
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        study = session.get(Study, job.study_uid)
        events = list(
            session.scalars(
                select(Event)
                .where(
                    (Event.job_id == job_id)
                    | ((Event.study_uid == job.study_uid) & Event.job_id.is_(None) & (Event.at <= job.created_at))
                )
                .order_by(Event.id)
            )
        )
        last_instance = _last_instance(session, job)
        sends = list(session.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)))
    raw = [(e.at, e.kind, e.message) for e in events] + ([last_instance] if last_instance else [])
    raw.sort(key=lambda item: item[0])  # stable: events of one moment keep their order
    received = study.first_received_at if study else None
    timeline, previous = [], None
    for at, kind, message in raw:
        timeline.append(
            Step(
                at,
                kind,
                message,
                (at - previous).total_seconds() if previous else None,
                (at - received).total_seconds() if received else None,
            )
        )
        previous = at
    return JobDetail(
        **asdict(_job_row(job)),
        lease_owner=job.lease_owner,
        lease_expires_at=job.lease_expires_at,
        result_dir=job.result_dir,
        deliveries=[
            DeliveryRow(
                d.destination,
                Path(d.path).name,
                d.sop_instance_uid,
                d.state,
                d.attempts,
                d.max_attempts,
                d.not_before,
                d.sent_at,
                d.last_error,
                d.confirmed_at,
                d.confirm_by,
                d.transaction_uid,
            )
            for d in sends
        ],
        timeline=timeline,
        comparison=next((event_data(e).get("lines", []) for e in reversed(events)
                         if e.kind == EventKind.COMPARED.value), []),
    )


# --- studies ----------------------------------------------------------------------------------


@dataclass
class SeriesRow:
    series_uid: str
    modality: str
    number: int | None
    description: str
    instances: int
    last_received: datetime
    verdict: str | None = None  # the latest job's verdict for the series, e.g. "used for channel PET"
    verdict_job: int | None = None


@dataclass
class StudyRow:
    study: str
    first_received: datetime
    last_received: datetime
    instances: int
    series: list[SeriesRow]
    jobs: list[JobRow]  # newest first


@dataclass
class StudyDetail(StudyRow):
    events: list[EventRow] = field(default_factory=list)  # the study's own events (received, incomplete)


def _verdicts(session: Session, study_uid: str) -> dict[str, tuple[str, int | None]]:
    """Series UID -> (the latest verdict's text, its job), from the verdict events' data."""
    latest: dict[str, tuple[str, int | None]] = {}
    for data, job_id in session.execute(
        select(Event.data, Event.job_id)
        .where(Event.study_uid == study_uid, Event.kind == EventKind.SERIES_VERDICT)
        .order_by(Event.id)
    ):
        verdict = event_data(data)
        if "series_uid" in verdict:
            latest[verdict["series_uid"]] = (verdict["verdict"], job_id)
    return latest


def _study_row(session: Session, study: Study) -> StudyRow:
    verdicts = _verdicts(session, study.study_uid)
    series = [
        SeriesRow(
            s.series_uid,
            s.modality,
            s.series_number,
            s.description,
            s.instances,
            s.last_received_at,
            *verdicts.get(s.series_uid, (None, None)),
        )
        for s in series_of_study(session, study.study_uid)
    ]
    jobs = [
        _job_row(j)
        for j in session.scalars(select(Job).where(Job.study_uid == study.study_uid).order_by(Job.id.desc()))
    ]
    return StudyRow(
        study.study_uid, study.first_received_at, study.last_received_at, study.instances_received, series, jobs
    )


def list_studies(sessions: sessionmaker, since: datetime | None = None) -> list[StudyRow]:
    """Studies, the most recently received first; `since`: received at or after."""
    query = select(Study).order_by(Study.last_received_at.desc())
    if since is not None:
        query = query.where(Study.last_received_at >= since)
    with sessions() as session:
        return [_study_row(session, s) for s in session.scalars(query)]


def study_detail(sessions: sessionmaker, study_uid: str) -> StudyDetail | None:
    with sessions() as session:
        study = session.get(Study, study_uid)
        if study is None:
            return None
        events = session.scalars(
            select(Event).where(Event.study_uid == study_uid, Event.job_id.is_(None)).order_by(Event.id)
        )
        return StudyDetail(
            **vars(_study_row(session, study)),
            events=[EventRow(e.at, e.kind, e.message, e.study_uid, e.job_id) for e in events],
        )


# --- the event log ----------------------------------------------------------------------------


def iter_events(sessions: sessionmaker, since: datetime | None = None, kind: str | None = None,
                study: str | None = None, batch: int = 2000) -> Iterator[dict]:
    """Every event (oldest first) as a plain dict, read in batches by id so a long export holds
    no transaction open for long (the receiver writes on meanwhile)."""
    last_id = 0
    while True:
        query = select(Event).where(Event.id > last_id).order_by(Event.id).limit(batch)
        if since is not None:
            query = query.where(Event.at >= since)
        if kind is not None:
            query = query.where(Event.kind == kind)
        if study is not None:
            query = query.where(Event.study_uid == study)
        with sessions() as session:
            rows = list(session.scalars(query))
        if not rows:
            return
        for e in rows:
            yield {"id": e.id, "at": e.at.isoformat(), "kind": e.kind, "study_uid": e.study_uid, "job_id": e.job_id,
                   "message": e.message, "data": event_data(e) or None}
        last_id = rows[-1].id
