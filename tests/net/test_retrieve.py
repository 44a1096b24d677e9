"""Query/retrieve against Orthanc as the PACS: C-FIND by study UID and accession number, C-MOVE
to the node's receiver and C-GET on the fetching association, QIDO-RS + WADO-RS with an
Authorization header; and the retrieves that must fail: a study gone between find and move
(nothing delivered), an instance gone (fewer than announced), a move sent to the wrong port
(the PACS says success, nothing arrives)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import load_config
from dicomnode.net.fetch import FetchError, SourceError, StudyQuery, client_for, fetch_study
from dicomnode.net.receiver import InstanceStore, Receiver
from dicomnode.pipeline.assembler import queue_ready_studies
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.events import EventKind, event_data
from dicomnode.store.tables import Event, Instance, Job, utcnow
from dicomnode.testing.orthanc import LocalOrthanc, orthanc_binary

from tests.support.fetching import sources_toml, stamped_study, study_files
from tests.support.nodeutil import write_config
from tests.support.storescp import StoreSCP

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(orthanc_binary() is None, reason="Debian package orthanc not installed")]

ACCESSION = "ACC-4711"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc with DICOMweb, holding one synthetic study (128 instances) with an accession number."""
    work = tmp_path_factory.mktemp("pacs")
    study = stamped_study(work / "study", seed=3, accession=ACCESSION)
    with LocalOrthanc(work / "orthanc", dicomweb=True) as orthanc:
        orthanc.upload(study_files(study))
        yield orthanc, study


def _node(tmp_path: Path, pacs: LocalOrthanc, retrieve: str, extra: str = ""):
    config = load_config(write_config(tmp_path, node=f'allowed_calling_aets = ["{pacs.aet}"]',
                                      extra=sources_toml(pacs, retrieve=retrieve) + extra))
    return config, make_sessionmaker(config.database_url)


def _held(sessions, study_uid: str) -> dict[str, str]:
    with sessions() as session:
        return dict(session.execute(select(Instance.sop_instance_uid, Instance.calling_aet)
                                    .where(Instance.study_uid == study_uid)).all())


def _sop_uids(study) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study_files(study)}


def _queued(config, sessions, study_uid: str) -> list[Job]:
    """Assemble as the node's sweep does (quiet now) and return the study's jobs: fetched instances
    become a job as pushed ones do."""
    queue_ready_studies(sessions, config, now=utcnow() + timedelta(seconds=config.node.study_quiet_seconds + 1))
    with sessions() as session:
        return list(session.scalars(select(Job).where(Job.study_uid == study_uid)))


def test_find_by_accession_then_c_move_to_the_running_receiver(tmp_path, pacs):
    orthanc, study = pacs
    config, sessions = _node(tmp_path, orthanc, "C-MOVE")
    orthanc.add_modality("node", config.node.ae_title, "127.0.0.1", config.node.port)
    receiver = Receiver(config, sessions)
    receiver.start()
    try:
        client = client_for(config.fetch_source("pacs"), config)
        [match] = client.find_studies(StudyQuery(accession=ACCESSION))
        assert match.study_uid == study.study_instance_uid
        assert (match.patient_id, match.study_date, match.instances) == ("FETCH-1", "20240601", 128)
        assert set(match.modalities) == {"CT", "PT"}
        announced = client.announce(match.study_uid)
        assert set(announced.instances) == _sop_uids(study)
        seen = []
        fetched = fetch_study(client, announced, InstanceStore(config, sessions), sessions,
                              progress=lambda done, total: seen.append((done, total)))
    finally:
        receiver.stop()
    assert (fetched.method, fetched.announced, fetched.arrived) == ("C-MOVE", 128, 128)
    held = _held(sessions, study.study_instance_uid)
    assert set(held) == _sop_uids(study) and set(held.values()) == {orthanc.aet}  # stored by the receiver: a push
    assert seen and seen[-1][1] == 128
    [job] = _queued(config, sessions, study.study_instance_uid)
    assert job.model == "demo-petct"
    with sessions() as session:
        [event] = session.scalars(select(Event).where(Event.study_uid == study.study_instance_uid,
                                                      Event.kind == EventKind.FETCHED.value))
    assert event_data(event)["arrived"] == 128 and event_data(event)["method"] == "C-MOVE"


def test_c_get_by_study_uid_stores_on_the_fetching_association(tmp_path, pacs):
    orthanc, study = pacs
    config, sessions = _node(tmp_path, orthanc, "C-GET")  # no receiver running: nothing but the C-GET's association
    orthanc.add_modality("node", config.node.ae_title, "127.0.0.1", config.node.port)  # Orthanc answers known AEs
    client = client_for(config.fetch_source("pacs"), config)
    [match] = client.find_studies(StudyQuery(study_uid=study.study_instance_uid))
    seen = []
    fetched = fetch_study(client, client.announce(match.study_uid), InstanceStore(config, sessions), sessions,
                          progress=lambda done, total: seen.append(done))
    assert (fetched.method, fetched.arrived) == ("C-GET", 128)
    assert seen[-1] == 128 and seen == sorted(seen)
    held = _held(sessions, study.study_instance_uid)
    assert set(held) == _sop_uids(study) and set(held.values()) == {orthanc.aet}
    spooled = sorted((config.spool_dir / study.study_instance_uid).glob("*/*.dcm"))
    assert len(spooled) == 128
    assert {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in spooled} == _sop_uids(study)
    assert len(_queued(config, sessions, study.study_instance_uid)) == 1


def test_fetch_command_by_accession_with_c_get(tmp_path, pacs):
    orthanc, study = pacs
    config, sessions = _node(tmp_path, orthanc, "C-GET")
    orthanc.add_modality("node", config.node.ae_title, "127.0.0.1", config.node.port)
    result = CliRunner().invoke(app, ["fetch", "--source", "pacs", "--accession", ACCESSION,
                                      "--config", str(config.source)])
    assert result.exit_code == 0, result.output
    assert "128 instances by C-GET" in result.output and "1 of 1 studies fetched" in result.output
    assert set(_held(sessions, study.study_instance_uid)) == _sop_uids(study)
    nothing = CliRunner().invoke(app, ["fetch", "--source", "pacs", "--accession", "NO-SUCH",
                                       "--config", str(config.source)])
    assert nothing.exit_code == 1 and "no study matches accession NO-SUCH" in nothing.output


@pytest.mark.parametrize("retrieve", ["C-MOVE", "C-GET"])
def test_a_study_gone_between_find_and_retrieve_is_a_failure(tmp_path, retrieve):
    """The PACS answers the retrieve without error, but nothing arrives: the fetch fails saying so."""
    study = stamped_study(tmp_path / "study", seed=4, accession="GONE")
    with LocalOrthanc(tmp_path / "orthanc") as orthanc:
        config, sessions = _node(tmp_path, orthanc, retrieve)
        orthanc.add_modality("node", config.node.ae_title, "127.0.0.1", config.node.port)
        orthanc.upload(study_files(study))
        receiver = Receiver(config, sessions)
        receiver.start()
        try:
            client = client_for(config.fetch_source("pacs"), config)
            announced = client.announce(study.study_instance_uid)
            assert len(announced.instances) == 128
            orthanc.delete(f"/studies/{orthanc.find_study(study.study_instance_uid)}")
            with pytest.raises(FetchError, match=f"{retrieve} .* but 0 of the 128 announced instances arrived"):
                fetch_study(client, announced, InstanceStore(config, sessions), sessions)
        finally:
            receiver.stop()
    assert _held(sessions, study.study_instance_uid) == {}


@pytest.mark.parametrize("retrieve", ["C-MOVE", "C-GET"])
def test_fewer_instances_than_announced_is_a_failure(tmp_path, retrieve):
    study = stamped_study(tmp_path / "study", seed=5)
    with LocalOrthanc(tmp_path / "orthanc") as orthanc:
        config, sessions = _node(tmp_path, orthanc, retrieve)
        orthanc.add_modality("node", config.node.ae_title, "127.0.0.1", config.node.port)
        ids = orthanc.upload(study_files(study))
        receiver = Receiver(config, sessions)
        receiver.start()
        try:
            client = client_for(config.fetch_source("pacs"), config)
            announced = client.announce(study.study_instance_uid)
            gone = orthanc.instance_tags(ids[10])["SOPInstanceUID"]
            orthanc.delete(f"/instances/{ids[10]}")
            with pytest.raises(FetchError, match=f"127 of the 128 announced instances arrived .*{gone}"):
                fetch_study(client, announced, InstanceStore(config, sessions), sessions)
        finally:
            receiver.stop()
    assert len(_held(sessions, study.study_instance_uid)) == 127


def test_c_move_to_the_wrong_port_is_a_failure_though_the_pacs_reports_success(tmp_path, pacs):
    """Orthanc knows the node's AE title at another SCP's port: its sub-operations succeed there,
    the C-MOVE reports success, and nothing reaches the node."""
    orthanc, study = pacs
    config, sessions = _node(tmp_path, orthanc, "C-MOVE")
    from pydicom.uid import CTImageStorage, PositronEmissionTomographyImageStorage

    elsewhere = StoreSCP([CTImageStorage, PositronEmissionTomographyImageStorage])
    try:
        orthanc.add_modality("node", config.node.ae_title, "127.0.0.1", elsewhere.port)
        client = client_for(config.fetch_source("pacs"), config)
        announced = client.announce(study.study_instance_uid)
        with pytest.raises(FetchError, match=r"C-MOVE reported success \(128 completed, 0 failed, 0 warning "
                                             r"sub-operations\) but 0 of the 128 announced instances arrived"):
            fetch_study(client, announced, InstanceStore(config, sessions), sessions)
    finally:
        elsewhere.close()
    assert len(elsewhere.stored) == 128 and _held(sessions, study.study_instance_uid) == {}


def test_dicomweb_source_with_authorization_from_the_environment(tmp_path, monkeypatch):
    study = stamped_study(tmp_path / "study", seed=6, accession="WEB-1")
    with LocalOrthanc(tmp_path / "orthanc", dicomweb=True, users={"node": "s3cret"}) as orthanc:
        orthanc.upload(study_files(study))
        extra = f"""
[[sources]]
name = "web"
url = "{orthanc.dicomweb_url}"
authorization_env = "PACS_AUTH"
"""
        config = load_config(write_config(tmp_path, extra=extra))
        sessions = make_sessionmaker(config.database_url)
        source = config.fetch_source("web")
        monkeypatch.delenv("PACS_AUTH", raising=False)
        with pytest.raises(SourceError, match="authorization_env PACS_AUTH: not set in the node.s environment"):
            client_for(source, config)
        monkeypatch.setenv("PACS_AUTH", "Basic bm9kZTp3cm9uZw==")  # node:wrong
        with pytest.raises(SourceError, match="HTTP 401"):
            client_for(source, config).find_studies(StudyQuery(accession="WEB-1"))
        monkeypatch.setenv("PACS_AUTH", orthanc.basic_authorization("node", "s3cret"))
        client = client_for(source, config)
        [match] = client.find_studies(StudyQuery(accession="WEB-1"))
        assert match.study_uid == study.study_instance_uid and set(match.modalities) == {"CT", "PT"}
        announced = client.announce(match.study_uid)
        assert set(announced.instances) == _sop_uids(study)
        fetched = fetch_study(client, announced, InstanceStore(config, sessions), sessions)
    assert (fetched.method, fetched.arrived) == ("WADO-RS", 128)
    held = _held(sessions, study.study_instance_uid)
    assert set(held) == _sop_uids(study) and set(held.values()) == {"web"}
    spooled = sorted((config.spool_dir / study.study_instance_uid).glob("*/*.dcm"))
    original = {str(d.SOPInstanceUID): d for d in (dcmread(p) for p in study_files(study))}
    for path in spooled[:5] + spooled[-5:]:  # the pixel data as the PACS holds it
        ds = dcmread(path)
        assert ds.PixelData == original[str(ds.SOPInstanceUID)].PixelData
    assert len(spooled) == 128
    assert len(_queued(config, sessions, study.study_instance_uid)) == 1
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 128
