"""[models.priors]: before a job's model runs, the patient's most recent earlier study of the
configured modality within max_age_days is found on the source (Orthanc) and fetched; the job's
timeline says which prior it used, or why there is none; the prior itself gets no job."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from dicomnode.config import load_config
from dicomnode.net.fetch import client_for, fetch_study
from dicomnode.net.receiver import InstanceStore
from dicomnode.pipeline.assembler import queue_ready_studies
from dicomnode.pipeline.errors import InputsNotReady
from dicomnode.pipeline.priors import prior_of, settle_prior
from dicomnode.pipeline.queue import RetryPolicy, enqueue
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.events import EventKind, event_data
from dicomnode.store.tables import Event, Instance, Job, utcnow
from dicomnode.testing.orthanc import LocalOrthanc, orthanc_binary
from dicomnode.testing.ports import free_port

from tests.support.fetching import sources_toml, stamped_study, study_files
from tests.support.nodeutil import write_config

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(orthanc_binary() is None, reason="Debian package orthanc not installed")]

PRIORS = """
[models.priors]
source = "pacs"
max_age_days = 365
modalities = ["PT"]
"""


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """The patient's studies: the current one (2024-06-01), a PET/CT prior (2024-02-01), a CT-only
    study in between (not a PET prior), a PET/CT study too old (2022-01-01); another patient's."""
    work = tmp_path_factory.mktemp("priors")
    studies = {
        "current": stamped_study(work / "current", seed=11, study_date="20240601"),
        "prior": stamped_study(work / "prior", seed=12, study_date="20240201"),
        "ct-only": stamped_study(work / "ct", seed=13, study_date="20240501", modalities=("CT",)),
        "too-old": stamped_study(work / "old", seed=14, study_date="20220101", modalities=("CT", "PT")),
        "alone": stamped_study(work / "alone", seed=15, patient_id="FETCH-2", study_date="20240601"),
    }
    with LocalOrthanc(work / "orthanc") as orthanc:
        for study in studies.values():
            orthanc.upload(study_files(study))
        yield orthanc, studies


def _node(tmp_path, orthanc, retrieve="C-GET", port=None):
    sources = sources_toml(orthanc, retrieve=retrieve)
    if port is not None:
        sources = sources.replace(f"port = {orthanc.dicom_port}", f"port = {port}")
    config = load_config(write_config(tmp_path, extra=PRIORS + sources))
    orthanc.add_modality("node", config.node.ae_title, "127.0.0.1", config.node.port)  # Orthanc answers known AEs
    return config, make_sessionmaker(config.database_url)


def _job_for(config, sessions, study) -> Job:
    """The study as the node holds it (fetched by C-GET), with a queued job."""
    client = client_for(config.fetch_source("pacs"), config)
    fetch_study(client, client.announce(study.study_instance_uid), InstanceStore(config, sessions), sessions)
    job_id = enqueue(sessions, study.study_instance_uid, "demo-petct", RetryPolicy.for_jobs(config.node), "test")
    with sessions() as session:
        return session.get(Job, job_id)


def _decisions(sessions, job_id):
    with sessions() as session:
        return list(session.scalars(select(Event).where(
            Event.job_id == job_id, Event.kind.in_([EventKind.PRIOR_USED.value, EventKind.NO_PRIOR.value]))))


def test_the_most_recent_earlier_pet_study_is_fetched_and_recorded(tmp_path, pacs):
    orthanc, studies = pacs
    config, sessions = _node(tmp_path, orthanc)
    job = _job_for(config, sessions, studies["current"])
    settle_prior(config, sessions, job, config.model("demo-petct"))
    prior = studies["prior"].study_instance_uid
    assert prior_of(sessions, job.id) == prior
    [decision] = _decisions(sessions, job.id)
    data = event_data(decision)
    assert (data["study_date"], data["method"], data["instances"], data["source"]) == ("20240201", "C-GET", 128, "pacs")
    with sessions() as session:
        held = set(session.scalars(select(Instance.study_uid)))
        assert session.scalar(select(Event.id).where(Event.study_uid == prior,
                                                     Event.kind == EventKind.FETCHED_AS_PRIOR.value)) is not None
    assert held == {studies["current"].study_instance_uid, prior}  # not the CT-only, not the too old
    settle_prior(config, sessions, job, config.model("demo-petct"))  # decided once: a retried job keeps it
    assert len(_decisions(sessions, job.id)) == 1
    queue_ready_studies(sessions, config, now=utcnow() + timedelta(seconds=60))
    with sessions() as session:
        assert list(session.scalars(select(Job.id).where(Job.study_uid == prior))) == []  # the prior gets no job


def test_no_prior_is_recorded_with_the_reason(tmp_path, pacs):
    orthanc, studies = pacs
    config, sessions = _node(tmp_path, orthanc)
    job = _job_for(config, sessions, studies["alone"])
    settle_prior(config, sessions, job, config.model("demo-petct"))
    assert prior_of(sessions, job.id) is None
    [decision] = _decisions(sessions, job.id)
    assert decision.kind == EventKind.NO_PRIOR.value
    assert "no earlier study of PT on pacs from 2023-06-02 to 2024-06-01" in decision.message
    assert event_data(decision)["reason"] == "none-found"


def test_a_source_that_does_not_answer_makes_the_job_wait(tmp_path, pacs):
    orthanc, studies = pacs
    config, sessions = _node(tmp_path, orthanc)
    job = _job_for(config, sessions, studies["current"])
    down, _ = _node(tmp_path / "down", orthanc, port=free_port())  # nothing listens there
    with pytest.raises(InputsNotReady, match="prior study not looked up: pacs: association .* not established"):
        settle_prior(down.model_copy(update={"node": config.node}), sessions, job, down.model("demo-petct"))
    assert _decisions(sessions, job.id) == []  # not ruled out: the job waits and asks again
