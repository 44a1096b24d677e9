"""Study completeness in time, on a real receiver: a study sent in two associations with a
pause shorter than study_quiet_seconds gives exactly one job. (A late series re-triggers a
new run: tests/test_assembler.py and tests/test_grids.py.)"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, PositronEmissionTomographyImageStorage
from sqlalchemy import func, select

from dicomnode.net.receiver import Receiver
from dicomnode.net.scu import responses_to_the_caller
from dicomnode.pipeline import assembler
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Event, Job, Study, utcnow

from tests.support.nodeutil import IndexedSessions, node_config

pytestmark = pytest.mark.e2e  # starts servers or subprocesses (tests/conftest.py)

QUIET_S = 2.0
PAUSE_S = 1.0  # between the associations: shorter than the quiet time


@pytest.fixture
def node(tmp_path: Path):
    config = node_config(tmp_path, node=f"study_quiet_seconds = {QUIET_S}")
    sessions = make_sessionmaker(config.database_url)
    receiver = Receiver(config, sessions)
    receiver.start()
    yield config, IndexedSessions(sessions, receiver)
    receiver.stop()


def _send(config, files: list[Path]) -> None:
    """One association carrying `files`."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(PositronEmissionTomographyImageStorage)
    assoc = responses_to_the_caller(ae.associate("127.0.0.1", config.node.port, ae_title=config.node.ae_title))
    assert assoc.is_established
    try:
        for path in files:
            assert assoc.send_c_store(dcmread(path)).Status == 0x0000
    finally:
        assoc.release()


def _last_received(sessions, study_uid):
    with sessions() as session:
        return session.scalar(select(Study.last_received_at).where(Study.study_uid == study_uid))


def _jobs(sessions, study_uid) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).where(Job.study_uid == study_uid)))


def test_two_associations_within_the_quiet_time_make_one_job(node, small_study):
    config, sessions = node
    uid, ct_files, pt_files = small_study
    _send(config, ct_files)
    ct_done = _last_received(sessions, uid)
    # not quiet; no PET either
    assert assembler.queue_ready_studies(sessions, config, now=ct_done + timedelta(seconds=0.5)) == []
    time.sleep(PAUSE_S)
    _send(config, pt_files)
    pet_done = _last_received(sessions, uid)
    assert pet_done - ct_done >= timedelta(seconds=PAUSE_S)
    # The quiet time counts from the last instance of the second association.
    assert assembler.queue_ready_studies(sessions, config, now=pet_done + timedelta(seconds=QUIET_S - 0.5)) == []
    [job_id] = assembler.queue_ready_studies(sessions, config, now=pet_done + timedelta(seconds=QUIET_S + 0.1))
    assert assembler.queue_ready_studies(sessions, config, now=pet_done + timedelta(seconds=QUIET_S + 30)) == []
    [job] = _jobs(sessions, uid)
    assert job.id == job_id and job.run_number == 1
    with sessions() as session:
        verdicts = list(
            session.scalars(select(Event.message).where(Event.job_id == job_id, Event.kind == "series-verdict"))
        )
    assert sorted(v.split(": ")[1].split(" [")[0] for v in verdicts) == ["used for channel CT", "used for channel PET"]


def test_a_sweeper_running_throughout_queues_one_job(node, small_study):
    """As the service runs it: a sweep every 0.25 s at the real time while both associations arrive."""
    config, sessions = node
    uid, ct_files, pt_files = small_study
    created: list[int] = []
    stop = threading.Event()

    def sweeper():
        while not stop.is_set():
            created.extend(assembler.queue_ready_studies(sessions, config))
            stop.wait(0.25)

    thread = threading.Thread(target=sweeper, daemon=True)
    thread.start()
    try:
        _send(config, ct_files)
        time.sleep(PAUSE_S)
        assert created == []
        _send(config, pt_files)
        assert created == []
        deadline = time.monotonic() + QUIET_S + 30.0  # generous: a loaded CI machine stalls
        while not created and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # further sweeps must not queue a second job
    finally:
        stop.set()
        thread.join(5)
    assert len(created) == 1
    assert [j.id for j in _jobs(sessions, uid)] == created
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1
    assert utcnow() - _last_received(sessions, uid) >= timedelta(seconds=QUIET_S)
