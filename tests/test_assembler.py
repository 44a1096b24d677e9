from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from dicomnode import assembler
from dicomnode.db import Event, Job, make_sessionmaker, utcnow
from dicomnode.index import ReceivedInstance, record_instance, series_of_study

from nodeutil import node_config


def _receive(sessions, study, series, sop, modality, at):
    record_instance(
        sessions,
        ReceivedInstance(study, series, sop, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", modality, 1, "", f"/x/{sop}.dcm", "SCU"),
        now=at,
    )


def _setup(tmp_path: Path):
    config = node_config(tmp_path, node="study_quiet_seconds = 60")
    return config, make_sessionmaker(config.database_url)


def test_quiet_complete_study_becomes_one_job(tmp_path: Path):
    config, sessions = _setup(tmp_path)
    t0 = utcnow() - timedelta(seconds=300)
    _receive(sessions, "1.9", "1.9.1", "1.9.1.1", "CT", t0)
    _receive(sessions, "1.9", "1.9.2", "1.9.2.1", "PT", t0)
    assert assembler.sweep(sessions, config, now=t0 + timedelta(seconds=30)) == []  # still within quiet time
    created = assembler.sweep(sessions, config, now=t0 + timedelta(seconds=61))
    assert len(created) == 1
    assert assembler.sweep(sessions, config, now=t0 + timedelta(seconds=120)) == []  # no duplicate
    with sessions() as session:
        job = session.get(Job, created[0])
        assert (job.study_uid, job.model, job.run_number) == ("1.9", "demo-petct", 1)
        assert [s.modality for s in series_of_study(session, "1.9")] == ["CT", "PT"]


def test_late_arrival_retriggers_a_new_run(tmp_path: Path):
    config, sessions = _setup(tmp_path)
    t0 = utcnow() - timedelta(seconds=300)
    _receive(sessions, "1.9", "1.9.1", "1.9.1.1", "CT", t0)
    _receive(sessions, "1.9", "1.9.2", "1.9.2.1", "PT", t0)
    [first] = assembler.sweep(sessions, config, now=t0 + timedelta(seconds=61))
    with sessions.begin() as session:
        session.get(Job, first).state = "succeeded"
    late = utcnow() + timedelta(seconds=1)
    _receive(sessions, "1.9", "1.9.2", "1.9.2.2", "PT", late)
    assert assembler.sweep(sessions, config, now=late + timedelta(seconds=10)) == []  # not quiet yet
    [second] = assembler.sweep(sessions, config, now=late + timedelta(seconds=61))
    with sessions() as session:
        assert session.get(Job, second).run_number == 2


def test_incomplete_study_is_explained_once(tmp_path: Path):
    config, sessions = _setup(tmp_path)
    t0 = utcnow() - timedelta(seconds=300)
    _receive(sessions, "1.8", "1.8.1", "1.8.1.1", "CT", t0)
    assert assembler.sweep(sessions, config, now=t0 + timedelta(seconds=61)) == []
    assert assembler.sweep(sessions, config, now=t0 + timedelta(seconds=90)) == []
    with sessions() as session:
        messages = list(session.scalars(select(Event.message).where(Event.kind == "incomplete")))
    assert messages == ["model demo-petct needs PT: not present"]
