"""[models.compare]: a follow-up PET/CT compared with the patient's prior study (PERCIST-style).

Every job of a model with compare keeps a time point (dicomnode.imaging.timepoint: SUV and the
lesion mask on the model's grid, the CT on its own grid, the patient's weight, height and sex from
the PET header (Patient.of_header), a liver mask from a chained model) as timepoint.npz in its result folder, and a
row in the `timepoints` table (patient, issuer, date, modalities) by which later studies find it.

Before the model runs, `settle_compare_prior` chooses the job's prior once (event "compare-prior",
or "no-compare-prior" with the reason): the patient's most recent study earlier than this one
(StudyDate, then StudyTime), of the same PatientID and IssuerOfPatientID, holding every one of
`modalities`, within `max_age_days` before the study's date:

  * among the time points this node kept with the same model: "already processed" (its job
    succeeded), "being processed" (its job has not ended yet, its deliveries pending, say: waited for);
  * with a `source`, the source is asked too (C-FIND / QIDO-RS by PatientID, as [models.priors]);
    when it knows a more recent one the node has no time point of, that study is processed first
    by a compute-only job (jobs.prior_of_job: the model runs and the time point is kept; no result
    object is written or delivered, so nothing goes into the old study and no status SR either):
    a study the node holds whole ("held"), else fetched ("fetched": event "fetched-as-prior" on
    it before it arrives, so the assembler queues no job of its own for it); a job of the model
    already queued or running for it is waited for ("being processed").

The follow-up then waits (InputsNotReady: back in the queue, its attempt not counted, until
job_give_up_hours) until the prior's job has ended; the worker wakes it at once when it does
(pipeline/chain.dependants). A prior job that failed leaves the follow-up without comparison
("not-compared", the reason); its own results go out as usual.

After inference `comparison` loads both time points and calls dicomnode.imaging.comparison.compare:
the result goes into measures.json, the job's "compared" event (data: the comparison and its text
lines, which `dicomnode jobs show` prints) and the SR.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from enum import StrEnum
from pathlib import Path

import numpy as np
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from dicomnode.config import CompareSettings, Config, ModelSettings
from dicomnode.imaging.comparison import Comparison, compare
from dicomnode.imaging.timepoint import TIMEPOINT_FILE, Patient, TimePoint, VolumeGeometry
from dicomnode.net.fetch import client_for, fetch_study
from dicomnode.net.receiver import InstanceStore
from dicomnode.net.retrieve import SourceError, StudyMatch, StudyQuery
from dicomnode.pipeline.errors import InputsNotReady
from dicomnode.pipeline.inputs import Inputs
from dicomnode.pipeline.queue import RetryPolicy, enqueue
from dicomnode.store.events import EventKind, event_data, log_event, record_job_event
from dicomnode.store.index import held_instances
from dicomnode.store.tables import Event, Instance, Job, JobState, Series, TimePointRow, utcnow

log = logging.getLogger("dicomnode.processing")


class PriorHow(StrEnum):
    """How the comparison's prior came to have a time point (event "compare-prior", data "how")."""

    PROCESSED = "already processed"  # a job of the model on it succeeded and kept its time point
    PROCESSING = "being processed"  # a job of the model on it was queued or running: waited for
    HELD = "held, processed first"  # the node held it whole: a compute-only job processed it
    FETCHED = "fetched, processed first"  # fetched from the source, then a compute-only job


class NoPrior(StrEnum):
    """Why a follow-up has no prior (event "no-compare-prior", data "reason")."""

    NO_KEY = "no-key"  # no PatientID or StudyDate to look one up by
    NONE_FOUND = "none-found"  # no earlier study of the patient in the window


@dataclass(frozen=True)
class StudyKey:
    """Who and when a study is, as the comparison matches priors."""

    patient_id: str
    issuer: str
    study_date: str
    study_time: str
    modalities: frozenset[str]

    def day(self) -> date | None:
        try:
            return datetime.strptime(self.study_date.strip()[:8], "%Y%m%d").date()
        except ValueError:
            return None

    @property
    def when(self) -> tuple[str, str]:
        return self.study_date, self.study_time or "999999"


@dataclass(frozen=True)
class Prior:
    """The prior a job compares with: its study, date, the job that processed it and its time point
    (None with `reason` when that job did not leave one)."""

    study_uid: str
    study_date: str
    job_id: int
    how: str
    timepoint: Path | None = None
    reason: str = ""


def study_key(sessions: sessionmaker, study_uid: str) -> StudyKey:
    """The study's patient, issuer, date and time from one of its spooled images; its modalities from the index."""
    with sessions() as session:
        path = session.scalar(select(Instance.path).where(Instance.study_uid == study_uid).limit(1))
        modalities = frozenset(m for m in session.scalars(select(Series.modality).where(Series.study_uid == study_uid))
                               if m)
    if path is None:
        return StudyKey("", "", "", "", modalities)
    ds = dcmread(path, stop_before_pixels=True,
                 specific_tags=["PatientID", "IssuerOfPatientID", "StudyDate", "StudyTime"])
    return StudyKey(*(str(ds.get(k, "") or "").strip() for k in ("PatientID", "IssuerOfPatientID", "StudyDate",
                                                                  "StudyTime")), modalities)


def _decision(sessions: sessionmaker, job_id: int) -> Event | None:
    kinds = [EventKind.COMPARE_PRIOR.value, EventKind.NO_COMPARE_PRIOR.value]
    with sessions() as session:
        return session.scalar(select(Event).where(Event.job_id == job_id, Event.kind.in_(kinds))
                              .order_by(Event.id).limit(1))


def settle_compare_prior(config: Config, sessions: sessionmaker, job: Job, settings: ModelSettings) -> Prior | None:
    """The job's prior with its time point, None when there is none (see the module); raises
    InputsNotReady while the prior's job has not ended, or the source cannot be asked or fetched from."""
    decision = _decision(sessions, job.id)
    if decision is None:
        _choose(config, sessions, job, settings)
        decision = _decision(sessions, job.id)
    if decision is None or decision.kind == EventKind.NO_COMPARE_PRIOR.value:
        return None
    data = event_data(decision)
    prior = Prior(data["study_uid"], data.get("study_date", ""), int(data["job_id"]), data.get("how", ""))
    with sessions() as session:
        theirs = session.get(Job, prior.job_id)
        row = session.get(TimePointRow, prior.job_id)
    if theirs is None:
        return replace(prior, reason=f"the prior's job {prior.job_id} is gone")
    if theirs.state in (JobState.QUEUED, JobState.RUNNING):
        raise InputsNotReady(f"waiting for the prior study {prior.study_uid} of {prior.study_date} to be processed "
                             f"first (job {theirs.id}, {theirs.state})")
    if row is None and theirs.state != JobState.SUCCEEDED:  # (a time point whose job failed delivering is good)
        return replace(prior, reason=f"the prior's job {theirs.id} {theirs.state}: {theirs.error or 'no reason given'}")
    if row is None or not Path(row.path).is_file():
        return replace(prior, reason=f"the prior's job {theirs.id} left no time point")
    return replace(prior, timepoint=Path(row.path))


def _choose(config: Config, sessions: sessionmaker, job: Job, settings: ModelSettings) -> None:
    """Make the job's prior decision: an event, and a compute-only job when the prior needs processing."""
    compare_settings: CompareSettings = settings.compare  # type: ignore[assignment] - compares
    key = study_key(sessions, job.study_uid)
    day = key.day()
    if not key.patient_id or day is None:
        missing = "PatientID" if not key.patient_id else f"a valid StudyDate (got {key.study_date!r})"
        _no_prior(sessions, job, NoPrior.NO_KEY, f"the study has no {missing} to look a prior up by")
        return
    since = day - timedelta(days=compare_settings.max_age_days)
    wanted = set(compare_settings.modalities)
    local = _local_prior(sessions, job, key, since, wanted)
    remote = _source_prior(config, job, key, since, day, wanted) if compare_settings.source else None
    if local is not None and (remote is None or (local.study_date, local.study_time or "999999")
                              >= (remote.study_date, remote.study_time or "999999")):
        with sessions() as session:
            state = session.get(Job, local.job_id).state
        how = PriorHow.PROCESSED if state == JobState.SUCCEEDED else PriorHow.PROCESSING
        _chosen(sessions, job, local.study_uid, local.study_date, local.job_id, how, f"job {local.job_id}, {state}")
        return
    if remote is None:
        where = f" or on {compare_settings.source}" if compare_settings.source else " (no source to ask)"
        _no_prior(sessions, job, NoPrior.NONE_FOUND,
                  f"no earlier study of the patient with {'/'.join(sorted(wanted)) or 'any modality'} from "
                  f"{since.isoformat()} to {day.isoformat()} processed by {settings.name} on this node{where}",
                  {"from": since.isoformat(), "to": day.isoformat()})
        return
    _process_first(config, sessions, job, settings, remote)


def _local_prior(sessions: sessionmaker, job: Job, key: StudyKey, since: date, wanted: set[str]) -> TimePointRow | None:
    """The most recent earlier time point of the patient kept by a job of the model that succeeded, or
    that has not ended yet (its deliveries pending, say: it is waited for)."""
    with sessions() as session:
        rows = list(session.scalars(
            select(TimePointRow).join(Job, Job.id == TimePointRow.job_id)
            .where(TimePointRow.patient_id == key.patient_id, TimePointRow.issuer == key.issuer,
                   TimePointRow.model == job.model, TimePointRow.study_uid != job.study_uid,
                   TimePointRow.study_date >= since.strftime("%Y%m%d"), TimePointRow.study_date <= key.study_date,
                   Job.state.in_((JobState.SUCCEEDED, JobState.QUEUED, JobState.RUNNING)))))
    earlier = [r for r in rows if (r.study_date, r.study_time or "999999") < key.when
               and wanted <= set(filter(None, r.modalities.split("/")))]
    return max(earlier, key=lambda r: (r.study_date, r.study_time, r.job_id), default=None)


def _source_prior(config: Config, job: Job, key: StudyKey, since: date, day: date,
                  wanted: set[str]) -> StudyMatch | None:
    """The most recent earlier study of the patient on the source holding every wanted modality."""
    source = config.fetch_source(config.model(job.model).compare.source)  # type: ignore[union-attr, arg-type]
    try:
        matches = client_for(source, config).find_studies(StudyQuery(patient_id=key.patient_id, since=since,
                                                                     until=day))
    except SourceError as exc:
        raise InputsNotReady(f"comparison prior not looked up on {source.name}: {exc}") from None
    return latest_earlier(matches, job.study_uid, key, wanted)


def latest_earlier(matches: list[StudyMatch], study_uid: str, key: StudyKey, wanted: set[str]) -> StudyMatch | None:
    """Of a source's answers, the most recent study before this one (`key.when`) holding every wanted
    modality; a match the source says has another IssuerOfPatientID is another patient's (one the
    source does not say about is taken as the same)."""
    earlier = [m for m in matches if m.study_uid != study_uid and m.study_date
               and (m.study_date, m.study_time or "999999") < key.when and wanted <= set(m.modalities)
               and (not m.issuer or not key.issuer or m.issuer == key.issuer)]
    return max(earlier, key=lambda m: (m.study_date, m.study_time), default=None)


def _process_first(config: Config, sessions: sessionmaker, job: Job, settings: ModelSettings,
                   prior: StudyMatch) -> None:
    """A prior the node has no time point of: wait for its job, or process it (held or fetched) first."""
    with sessions() as session:
        theirs = session.scalar(select(Job).where(Job.study_uid == prior.study_uid, Job.model == job.model)
                                .order_by(Job.id.desc()).limit(1))
        kept = theirs is not None and session.get(TimePointRow, theirs.id) is not None
    if theirs is not None and (theirs.state in (JobState.QUEUED, JobState.RUNNING)
                               or (theirs.state == JobState.SUCCEEDED and kept)):
        how = PriorHow.PROCESSED if theirs.state == JobState.SUCCEEDED else PriorHow.PROCESSING
        _chosen(sessions, job, prior.study_uid, prior.study_date, theirs.id, how, f"job {theirs.id}, {theirs.state}")
        return
    source = config.fetch_source(settings.compare.source)  # type: ignore[union-attr, arg-type]
    try:
        client = client_for(source, config)
        announced = client.announce(prior.study_uid)
        with sessions() as session:
            held = held_instances(session, set(announced.wanted()))
        if announced.wanted() and held == set(announced.wanted()):
            how, said = PriorHow.HELD, f"its {len(held)} instances held already"
        else:
            with sessions.begin() as session:  # before it arrives: the assembler must not make it a job
                log_event(session, EventKind.FETCHED_AS_PRIOR, f"fetched as the comparison prior of job {job.id} "
                          f"(study {job.study_uid})", study_uid=prior.study_uid,
                          data={"job_id": job.id, "for_study": job.study_uid, "source": source.name})
            fetched = fetch_study(client, announced, InstanceStore(config, sessions), sessions)
            how = PriorHow.FETCHED
            said = f"{fetched.arrived} instances by {fetched.method} from {source.name} in {fetched.seconds:.1f} s"
    except SourceError as exc:
        raise InputsNotReady(f"comparison prior {prior.study_uid} not fetched: {exc}") from None
    queued = enqueue(sessions, prior.study_uid, job.model, RetryPolicy.for_jobs(config.node),
                     f"the comparison prior of job {job.id} (study {job.study_uid}): computed, nothing delivered",
                     priority=job.priority, prior_of_job=job.id)
    _chosen(sessions, job, prior.study_uid, prior.study_date, queued, how, f"{said}; compute-only job {queued}")


def _chosen(sessions: sessionmaker, job: Job, study_uid: str, study_date: str, job_id: int, how: PriorHow,
            detail: str) -> None:
    record_job_event(sessions, job, EventKind.COMPARE_PRIOR,
                     f"prior study {study_uid} of {study_date}: {how} ({detail})", log,
                     data={"study_uid": study_uid, "study_date": study_date, "job_id": job_id, "how": how.value})


def _no_prior(sessions: sessionmaker, job: Job, reason: NoPrior, message: str, data: dict | None = None) -> None:
    record_job_event(sessions, job, EventKind.NO_COMPARE_PRIOR, message, log,
                     data={"reason": reason.value, **(data or {})})


# --- the time point and the comparison ---------------------------------------------------------


def keep_timepoint(sessions: sessionmaker, job: Job, inputs: Inputs, labels: np.ndarray, out: Path,
                   liver: np.ndarray | None) -> TimePoint:
    """The job's time point: saved by an earlier attempt, else made, saved (timepoint.npz) and indexed."""
    path = out / TIMEPOINT_FILE
    if path.is_file():
        return TimePoint.load(path)
    header = inputs.pet_header
    key = study_key(sessions, job.study_uid)
    timepoint = TimePoint(
        study_uid=job.study_uid,
        study_date=str(header.get("StudyDate", "") or key.study_date) if header is not None else key.study_date,
        study_time=str(header.get("StudyTime", "") or key.study_time) if header is not None else key.study_time,
        patient=Patient.of_header(header) if header is not None else Patient(None, None, ""),
        suv=inputs.suv,
        labels=(labels > 0).astype(np.uint8),
        geometry=VolumeGeometry.of_volume(inputs.grid),
        ct=inputs.ct.array if inputs.ct is not None else None,
        ct_geometry=VolumeGeometry.of_volume(inputs.ct) if inputs.ct is not None else None,
        liver=liver,
    )
    out.mkdir(parents=True, exist_ok=True)
    timepoint.save(path)
    with sessions.begin() as session:
        session.merge(TimePointRow(job_id=job.id, study_uid=job.study_uid, model=job.model, patient_id=key.patient_id,
                                   issuer=key.issuer, study_date=timepoint.study_date, study_time=timepoint.study_time,
                                   modalities="/".join(sorted(key.modalities)), path=str(path), created_at=utcnow()))
    patient = timepoint.patient
    record_job_event(sessions, job, EventKind.TIMEPOINT_SAVED,
                     f"{path.name}: study of {timepoint.study_date}, weight {patient.weight_kg or '?'} kg, height "
                     f"{patient.height_m or '?'} m, sex {patient.sex or '?'}, liver mask "
                     f"{'kept' if liver is not None else 'none'}", log,
                     data={"path": str(path), "liver": liver is not None})
    return timepoint


def comparison(sessions: sessionmaker, job: Job, settings: ModelSettings, current: TimePoint, prior: Prior | None,
               liver_label_present: bool | None) -> tuple[Comparison | None, TimePoint | None]:
    """The follow-up compared with its prior (event "compared") and the prior's time point, or
    (None, None): no prior (its decision says why), the prior's time point missing, or the
    comparison failing (event "not-compared")."""
    if prior is None:
        return None, None
    if prior.timepoint is None:
        record_job_event(sessions, job, EventKind.NOT_COMPARED, prior.reason, log,
                         data={"prior_study_uid": prior.study_uid, "reason": prior.reason})
        return None, None
    try:
        before = TimePoint.load(prior.timepoint)
        result = compare(current, before, liver_label_present=liver_label_present,
                         connectivity=settings.lesion_connectivity, min_volume_ml=settings.min_lesion_volume_ml)
    except Exception as exc:  # noqa: BLE001 - the study's own results still go out, the reason kept
        reason = f"comparison with {prior.study_uid} failed: {type(exc).__name__}: {exc}"
        log.exception("job %d: %s", job.id, reason)
        record_job_event(sessions, job, EventKind.NOT_COMPARED, reason, log,
                         data={"prior_study_uid": prior.study_uid, "reason": reason})
        return None, None
    lines = result.lines()
    record_job_event(sessions, job, EventKind.COMPARED,
                     f"with prior study {prior.study_uid} of {prior.study_date} ({prior.how}): "
                     + (lines[0] if lines else ""), log,
                     data={"prior_study_uid": prior.study_uid, "prior_job_id": prior.job_id,
                           "comparison": result.as_json(), "lines": lines})
    return result, before
