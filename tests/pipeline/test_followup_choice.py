"""Which earlier time point a follow-up takes as its prior ([models.compare], no source): the most
recent earlier study of the same PatientID and issuer, with every wanted modality, within the window,
of the same model, whose job succeeded (or has not ended: then it is waited for); the decision is
made once; a study without PatientID has none, and says why."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import update

from dicomnode.net.retrieve import StudyMatch
from dicomnode.pipeline.errors import InputsNotReady
from dicomnode.pipeline.followup import StudyKey, latest_earlier, settle_compare_prior
from dicomnode.pipeline.queue import RetryPolicy, enqueue
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.events import EventKind, event_data
from dicomnode.store.index import ReceivedInstance, record_instance
from dicomnode.store.tables import Event, Job, JobState, TimePointRow, utcnow

from tests.support.nodeutil import node_config, tiny_instance

POLICY = RetryPolicy(max_attempts=3)


def _study(config, sessions, patient_id: str, issuer: str, study_date: str) -> str:
    """A held study of one CT and one PET instance with this patient, issuer and date."""
    study_uid = generate_uid()
    for modality in ("CT", "PT"):
        ds = tiny_instance(study_uid, generate_uid(), 0, modality)
        ds.PatientID, ds.StudyDate, ds.StudyTime = patient_id, study_date, "090000"
        if issuer:
            ds.IssuerOfPatientID = issuer
        path = config.spool_dir / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        record_instance(sessions, ReceivedInstance(study_uid, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                                   ds.SOPClassUID, "1.2.840.10008.1.2.1", modality, 1, "", str(path),
                                                   "TEST"))
    return study_uid


def _kept(config, sessions, study_date: str, *, patient_id="P1", issuer="A", modalities="CT/PT",
          model="demo-petct", state=JobState.SUCCEEDED) -> int:
    """A job of another study that kept a time point with these facts, ended in `state`."""
    study_uid = generate_uid()
    job_id = enqueue(sessions, study_uid, model, POLICY)
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(state=state))
    path = config.results_dir / study_uid / f"job-{job_id}" / "timepoint.npz"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK")
    with sessions.begin() as session:
        session.add(TimePointRow(job_id=job_id, study_uid=study_uid, model=model, patient_id=patient_id, issuer=issuer,
                                 study_date=study_date, study_time="090000", modalities=modalities, path=str(path),
                                 created_at=utcnow()))
    return job_id


@pytest.fixture
def site(tmp_path: Path):
    config = node_config(tmp_path, extra="[models.compare]\nmax_age_days = 365\n")
    return config, make_sessionmaker(config.database_url)


def _decisions(sessions, job_id: int) -> list[Event]:
    with sessions() as session:
        return list(session.query(Event).filter(Event.job_id == job_id, Event.kind.in_(
            [EventKind.COMPARE_PRIOR.value, EventKind.NO_COMPARE_PRIOR.value])))


def test_the_most_recent_fitting_time_point_is_the_prior(site):
    config, sessions = site
    settings = config.model("demo-petct")
    current = _study(config, sessions, "P1", "A", "20240601")
    fitting = _kept(config, sessions, "20240301")
    _kept(config, sessions, "20240201")  # fits, older
    _kept(config, sessions, "20240501", modalities="CT")  # no PET
    _kept(config, sessions, "20240515", issuer="B")  # another issuer's patient P1
    _kept(config, sessions, "20230101")  # outside the 365 days
    _kept(config, sessions, "20240520", state=JobState.FAILED)  # its job failed (not in delivering alone): not taken
    _kept(config, sessions, "20240701")  # later than the study
    _kept(config, sessions, "20240525", model="other-model")
    _kept(config, sessions, "20240528", patient_id="P2")
    [job_id] = [enqueue(sessions, current, "demo-petct", POLICY)]
    with sessions() as session:
        job = session.get(Job, job_id)
    prior = settle_compare_prior(config, sessions, job, settings)
    assert (prior.job_id, prior.how, prior.reason) == (fitting, "already processed", "")
    assert prior.timepoint is not None and prior.timepoint.name == "timepoint.npz"
    [decision] = _decisions(sessions, job_id)
    assert event_data(decision)["job_id"] == fitting
    _kept(config, sessions, "20240530")  # a later one now: the decision is made once
    assert settle_compare_prior(config, sessions, job, settings).job_id == fitting
    assert len(_decisions(sessions, job_id)) == 1


def test_a_prior_still_being_processed_is_waited_for(site):
    config, sessions = site
    current = _study(config, sessions, "P1", "A", "20240601")
    running = _kept(config, sessions, "20240301", state=JobState.RUNNING)
    job_id = enqueue(sessions, current, "demo-petct", POLICY)
    with sessions() as session:
        job = session.get(Job, job_id)
    with pytest.raises(InputsNotReady, match=f"to be processed first \\(job {running}, running\\)"):
        settle_compare_prior(config, sessions, job, config.model("demo-petct"))
    [decision] = _decisions(sessions, job_id)
    assert event_data(decision)["how"] == "being processed"
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == running).values(state=JobState.FAILED, error="delivery failed"))
    prior = settle_compare_prior(config, sessions, job, config.model("demo-petct"))
    assert prior.job_id == running and prior.timepoint is not None  # the model ran: its time point is good


def test_no_patient_id_no_prior_and_the_reason(site):
    config, sessions = site
    current = _study(config, sessions, "", "", "20240601")
    _kept(config, sessions, "20240301", patient_id="")
    job_id = enqueue(sessions, current, "demo-petct", POLICY)
    with sessions() as session:
        job = session.get(Job, job_id)
    assert settle_compare_prior(config, sessions, job, config.model("demo-petct")) is None
    [decision] = _decisions(sessions, job_id)
    assert decision.kind == "no-compare-prior" and event_data(decision)["reason"] == "no-key"
    assert decision.message == "the study has no PatientID to look a prior up by"


def test_on_the_source_the_latest_earlier_study_of_the_same_issuer_is_the_prior():
    key = StudyKey("P1", "HOSP-A", "20240607", "101500", frozenset({"PT", "CT"}))
    wanted = {"PT", "CT"}
    matches = [
        StudyMatch("1.1", "P1", "20240315", "090000", modalities=("CT", "PT"), issuer="HOSP-A"),
        StudyMatch("1.2", "P1", "20240501", "090000", modalities=("CT", "PT"), issuer="HOSP-B"),  # another patient
        StudyMatch("1.3", "P1", "20240520", "090000", modalities=("CT",), issuer="HOSP-A"),  # no PET
        StudyMatch("1.4", "P1", "20240610", "090000", modalities=("CT", "PT"), issuer="HOSP-A"),  # later
        StudyMatch("1.5", "P1", "20240607", "101500", modalities=("CT", "PT"), issuer="HOSP-A"),  # this study
    ]
    assert latest_earlier(matches, "1.5", key, wanted).study_uid == "1.1"
    unsaid = [*matches, StudyMatch("1.6", "P1", "20240401", "090000", modalities=("CT", "PT"))]  # issuer not said
    assert latest_earlier(unsaid, "1.5", key, wanted).study_uid == "1.6"
    assert latest_earlier(matches[1:], "1.5", key, wanted) is None
