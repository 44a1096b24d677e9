"""A model's prior study (`[models.priors]`): found and fetched before the job's model runs.

`settle_prior` runs first in every job of a model with priors. It reads the study's PatientID,
StudyDate and StudyTime from a spooled instance, asks the prior source for that patient's
studies of the `max_age_days` before (C-FIND or QIDO-RS), keeps those earlier than the study
that hold one of `modalities`, and fetches the most recent (dicomnode.net.fetch, checked
against what the source announced). The decision is a job event: "prior-used" with the prior's
UID, date and how it came (data: study_uid, study_date, source, method, instances, held_before),
or "no-prior" saying why. It is made once per job; a retried job keeps it.

A source that cannot be asked or a fetch that fails is a transient cause (InputsNotReady): the
job waits in the queue, its attempt not counted, and tries again, so it never runs before its
prior has arrived or been ruled out. The prior study gets a "fetched-as-prior" event before it
is fetched, and the assembler then queues no job for it: its results would go into the old study.
"""

from __future__ import annotations

import logging
from datetime import date, datetime, timedelta

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config, ModelSettings, PriorSettings
from dicomnode.net.fetch import client_for, fetch_study
from dicomnode.net.receiver import InstanceStore
from dicomnode.net.retrieve import SourceError, StudyMatch, StudyQuery
from dicomnode.pipeline.errors import InputsNotReady
from dicomnode.store.events import EventKind, event_data, log_event, record_job_event
from dicomnode.store.index import held_instances
from dicomnode.store.tables import Event, Instance, Job

log = logging.getLogger("dicomnode.processing")

DECISIONS = (EventKind.PRIOR_USED, EventKind.NO_PRIOR)


def prior_decision(sessions: sessionmaker, job_id: int) -> Event | None:
    """The job's prior decision, once made."""
    with sessions() as session:
        return session.scalar(select(Event).where(Event.job_id == job_id, Event.kind.in_([k.value for k in DECISIONS]))
                              .order_by(Event.id).limit(1))


def _study_header(sessions: sessionmaker, study_uid: str) -> tuple[str, str, str]:
    """PatientID, StudyDate, StudyTime of a held study, from one of its spooled instances."""
    with sessions() as session:
        path = session.scalar(select(Instance.path).where(Instance.study_uid == study_uid).limit(1))
    if path is None:
        return "", "", ""
    ds = dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "StudyDate", "StudyTime"])
    return str(ds.get("PatientID", "") or ""), str(ds.get("StudyDate", "") or ""), str(ds.get("StudyTime", "") or "")


def _day(text: str) -> date | None:
    try:
        return datetime.strptime(text.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def choose_prior(matches: list[StudyMatch], study_uid: str, study_date: str, study_time: str,
                 priors: PriorSettings) -> StudyMatch | None:
    """The most recent match earlier than the study (date, then time) holding one of the modalities."""
    wanted = set(priors.modalities)
    earlier = [m for m in matches
               if m.study_uid != study_uid and m.study_date
               and (m.study_date, m.study_time) < (study_date, study_time or "999999")
               and (not wanted or wanted & set(m.modalities))]
    return max(earlier, key=lambda m: (m.study_date, m.study_time), default=None)


def settle_prior(config: Config, sessions: sessionmaker, job: Job, settings: ModelSettings) -> None:
    """Find and fetch the job's prior study, or rule it out; a job event says which (see the module)."""
    priors = settings.priors
    if priors is None or prior_decision(sessions, job.id) is not None:
        return
    source = config.fetch_source(priors.source)

    def decide(kind: EventKind, message: str, data: dict) -> None:
        record_job_event(sessions, job, kind, message, log, data={"source": source.name, **data})

    patient_id, study_date, study_time = _study_header(sessions, job.study_uid)
    day = _day(study_date)
    if not patient_id or day is None:
        missing = "PatientID" if not patient_id else f"a valid StudyDate (got {study_date!r})"
        decide(EventKind.NO_PRIOR, f"the study has no {missing} to look a prior up by", {"reason": "no-key"})
        return
    since = day - timedelta(days=priors.max_age_days)
    query = StudyQuery(patient_id=patient_id, since=since, until=day)
    try:
        client = client_for(source, config)
        matches = client.find_studies(query)
    except SourceError as exc:
        raise InputsNotReady(f"prior study not looked up: {exc}") from None
    prior = choose_prior(matches, job.study_uid, study_date, study_time, priors)
    window = f"{since.isoformat()} to {day.isoformat()}"
    if prior is None:
        modalities = "/".join(priors.modalities) or "any modality"
        decide(EventKind.NO_PRIOR,
               f"no earlier study of {modalities} on {source.name} from {window} ({len(matches)} of the patient's "
               "studies in that time, this one included)",
               {"reason": "none-found", "from": since.isoformat(), "to": day.isoformat(),
                "modalities": priors.modalities, "studies_seen": [m.study_uid for m in matches]})
        return
    try:
        announced = client.announce(prior.study_uid)
        with sessions() as session:
            held_before = held_instances(session, set(announced.wanted()))
        info = {"study_uid": prior.study_uid, "study_date": prior.study_date, "modalities": list(prior.modalities)}
        if announced.wanted() and held_before == set(announced.wanted()):
            decide(EventKind.PRIOR_USED, f"prior study {prior.study_uid} of {prior.study_date}: its "
                   f"{len(held_before)} instances were held already",
                   {**info, "method": None, "instances": len(held_before), "held_before": True})
            return
        with sessions.begin() as session:  # before it arrives: the assembler must not make it a job
            log_event(session, EventKind.FETCHED_AS_PRIOR, f"fetched as the prior of job {job.id} "
                      f"(study {job.study_uid})", study_uid=prior.study_uid,
                      data={"job_id": job.id, "for_study": job.study_uid, "source": source.name})
        fetched = fetch_study(client, announced, InstanceStore(config, sessions), sessions)
    except SourceError as exc:
        raise InputsNotReady(f"prior study {prior.study_uid} not fetched: {exc}") from None
    decide(EventKind.PRIOR_USED, f"prior study {prior.study_uid} of {prior.study_date}: {fetched.arrived} "
           f"instances by {fetched.method} in {fetched.seconds:.1f} s",
           {**info, "method": fetched.method, "instances": fetched.arrived, "held_before": False,
            "seconds": round(fetched.seconds, 3)})


def prior_of(sessions: sessionmaker, job_id: int) -> str | None:
    """The Study Instance UID of the prior the job used (None: none, or not decided yet)."""
    decision = prior_decision(sessions, job_id)
    if decision is None or decision.kind != EventKind.PRIOR_USED.value:
        return None
    return event_data(decision).get("study_uid")
