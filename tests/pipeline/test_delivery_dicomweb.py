"""DICOMweb destinations against a real Orthanc with its DICOMweb plugin: a job's SEG and SR
go by STOW-RS and arrive with the node's SOP Instance UIDs and content; a server that is down
gets them once when it is back; an Orthanc that asks for HTTP basic authentication refuses a
missing or wrong Authorization header (the delivery fails naming authorization) and takes the
right one from the token file after `jobs retry`, same objects."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from sqlalchemy import select
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.imaging.measures import measure_lesions
from dicomnode.imaging.suv import pet_suv_volume
from dicomnode.pipeline import delivery
from dicomnode.pipeline.job import result_dir
from dicomnode.pipeline.queue import RetryPolicy, enqueue
from dicomnode.pipeline.worker import Worker
from dicomnode.results.common import write_dicom
from dicomnode.results.seg import build_seg
from dicomnode.results.sr import build_sr
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Delivery, Event, Job, JobState, utcnow
from dicomnode.testing.orthanc import LocalOrthanc, orthanc_binary

from tests.support.nodeutil import node_config

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(orthanc_binary() is None, reason="Orthanc not installed"),
]
MODEL = dict(model_name="demo-petct", model_version="0.1.0")


@pytest.fixture(scope="module")
def results(pet, truth, tmp_path_factory):
    """A real SEG (one lesion segment) and TID 1500 SR of the synthetic study's truth."""
    folder = tmp_path_factory.mktemp("results")
    seg = build_seg(truth, pet.datasets, folds=[0], series_number=901, series_description="demo-petct lesions",
                    **MODEL)
    measures, labels = measure_lesions(truth > 0, pet_suv_volume(pet), pet.spacing)
    sr = build_sr(measures, labels, seg, pet.datasets, series_number=902, series_description="demo-petct measures",
                  **MODEL)
    return write_dicom(seg, folder / "seg.dcm"), write_dicom(sr, folder / "sr.dcm")


def _job(tmp_path: Path, results, destination: str, node: str = ""):  # noqa: ANN202
    """A queued job of the results' study whose results are written already (no model runs)."""
    config = node_config(tmp_path, node="delivery_backoff_seconds = 0\n" + node,
                         extra=f'[[destinations]]\nname = "web"\n{destination}\n')
    sessions = make_sessionmaker(config.database_url)
    study_uid = str(dcmread(results[0], stop_before_pixels=True).StudyInstanceUID)
    job_id = enqueue(sessions, study_uid, "demo-petct", RetryPolicy())
    with sessions() as session:
        out = result_dir(config, session.get(Job, job_id))
    out.mkdir(parents=True, exist_ok=True)
    for path in results:
        (out / path.name).write_bytes(path.read_bytes())
    worker = Worker(config, sessions)
    worker.models._models["demo-petct"] = object()  # results exist: make_results reuses them
    return config, sessions, job_id, worker


def _job_row(sessions, job_id) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def _events(sessions, job_id) -> list[Event]:
    with sessions() as session:
        return list(session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id)))


def _in_pacs(pacs: LocalOrthanc, study_uid: str) -> list[str]:
    """SOP Instance UIDs of the study's instances, by QIDO-RS."""
    client = DICOMwebClient(pacs.dicomweb_url, headers=_auth_headers(pacs))
    return sorted(i["00080018"]["Value"][0] for i in client.search_for_instances(study_uid))


def _auth_headers(pacs: LocalOrthanc) -> dict:
    return {"Authorization": pacs.basic_authorization(*next(iter(pacs.users.items())))} if pacs.users else {}


def test_seg_and_sr_reach_orthanc_by_stow_rs(tmp_path: Path, results, pet, truth):
    seg_path, sr_path = results
    uids = sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in results)
    with LocalOrthanc(tmp_path / "pacs", dicomweb=True) as pacs:
        config, sessions, job_id, worker = _job(tmp_path, results, f'url = "{pacs.dicomweb_url}"')
        assert worker.run_one()
        job = _job_row(sessions, job_id)
        assert job.state == JobState.SUCCEEDED, job.error
        assert [(d.destination, d.state, d.attempts) for d in delivery.of_job(sessions, job_id)] == [
            ("web", "sent", 1), ("web", "sent", 1)]
        assert _in_pacs(pacs, job.study_uid) == uids
        [seg_id] = pacs.post("/tools/lookup", str(dcmread(seg_path).SOPInstanceUID))
        stored = hd.seg.segread(pacs.download_instance(seg_id["ID"], tmp_path / "back"))
        assert stored.number_of_segments == 1
        assert stored.get_segment_description(1).segment_label == "lesion"
        pixels = stored.get_pixels_by_source_instance(
            source_sop_instance_uids=[ds.SOPInstanceUID for ds in pet.datasets], segment_numbers=[1])
        np.testing.assert_array_equal(pixels[..., 0], (truth > 0).astype(pixels.dtype))
        [sr_id] = pacs.post("/tools/lookup", str(dcmread(sr_path).SOPInstanceUID))
        assert pacs.instance_tags(sr_id["ID"])["SOPClassUID"] == dcmread(sr_path).SOPClassUID
    delivered = [e.message for e in _events(sessions, job_id) if e.kind == "delivered"]
    assert len(delivered) == 2 and all(" to web: status 0x0000, attempt 1" in m for m in delivered)
    shown = CliRunner().invoke(app, ["jobs", "show", str(job_id), "--config", str(config.source)])
    assert shown.exit_code == 0 and "web" in shown.output and "sent" in shown.output, shown.output


def test_a_server_down_gets_the_results_once_when_back(tmp_path: Path, results):
    uids = sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in results)
    pacs = LocalOrthanc(tmp_path / "pacs", dicomweb=True)  # its port chosen now, started later
    config, sessions, job_id, worker = _job(tmp_path, results, f'url = "{pacs.dicomweb_url}"',
                                            node="delivery_backoff_seconds = 1\ndelivery_backoff_max_seconds = 2")
    try:
        for _ in range(2):
            with sessions.begin() as session:  # run as soon as due (the backoff measured, not slept out)
                session.get(Job, job_id).not_before = utcnow()
                for row in session.scalars(select(Delivery).where(Delivery.job_id == job_id)):
                    row.not_before = utcnow()
            assert worker.run_one()
            job = _job_row(sessions, job_id)
            assert job.state == JobState.QUEUED and "cannot connect" in job.error, job.error
        rows = delivery.of_job(sessions, job_id)
        assert [(d.state, d.attempts) for d in rows] == [("pending", 2), ("pending", 2)]
        assert all(f"STOW-RS to {pacs.dicomweb_url}: cannot connect" in d.last_error for d in rows)
        pacs.start()
        with sessions.begin() as session:
            session.get(Job, job_id).not_before = utcnow()
            for row in session.scalars(select(Delivery).where(Delivery.job_id == job_id)):
                row.not_before = utcnow()
        assert worker.run_one()
        job = _job_row(sessions, job_id)
        assert job.state == JobState.SUCCEEDED, job.error
        assert [(d.state, d.attempts, d.sop_instance_uid) for d in delivery.of_job(sessions, job_id)] == [
            ("sent", 3, r.sop_instance_uid) for r in rows]
        assert _in_pacs(pacs, job.study_uid) == uids and len(pacs.get("/instances")) == 2  # one copy each
        assert not worker.run_one()  # nothing left to send
    finally:
        pacs.stop()


def test_authorization_header_from_env_and_file(tmp_path: Path, results, monkeypatch):
    with LocalOrthanc(tmp_path / "pacs", dicomweb=True, users={"node": "s3cret-pw"}) as pacs:
        right = pacs.basic_authorization("node", "s3cret-pw")
        by_env = f'url = "{pacs.dicomweb_url}"\nauthorization_env = "DICOMNODE_TEST_PACS_AUTH"'
        study_uid = str(dcmread(results[0], stop_before_pixels=True).StudyInstanceUID)
        # no header at all: 401, for good, the reason names authorization
        config, sessions, job_id, worker = _job(tmp_path / "none", results, f'url = "{pacs.dicomweb_url}"')
        assert worker.run_one()
        job = _job_row(sessions, job_id)
        assert job.state == JobState.FAILED
        assert "HTTP 401 Unauthorized: authorization refused by the server (no authorization configured" in job.error
        # a wrong header from the environment: the same, naming the variable, never the value
        monkeypatch.setenv("DICOMNODE_TEST_PACS_AUTH", pacs.basic_authorization("node", "wrong-pw"))
        config, sessions, job_id, worker = _job(tmp_path / "env", results,
                                                by_env)
        assert worker.run_one()
        job = _job_row(sessions, job_id)
        assert job.state == JobState.FAILED, job.error
        assert "authorization refused by the server (authorization_env DICOMNODE_TEST_PACS_AUTH)" in job.error
        texts = [job.error, *(e.message for e in _events(sessions, job_id))]
        assert not any("wrong-pw" in t or "Basic " in t for t in texts)
        assert _in_pacs(pacs, study_uid) == []
        # the right one from the environment: delivered
        monkeypatch.setenv("DICOMNODE_TEST_PACS_AUTH", right)
        config, sessions, job_id, worker = _job(tmp_path / "env-right", results,
                                                by_env)
        assert worker.run_one()
        assert _job_row(sessions, job_id).state == JobState.SUCCEEDED
        pacs.delete(f"/studies/{pacs.find_study(study_uid)}")
        # a token file with a stale token: fails; the file put right, `jobs retry` sends the same objects
        token = tmp_path / "file" / "pacs.token"
        token.parent.mkdir()
        token.write_text(pacs.basic_authorization("node", "old-pw") + "\n")
        config, sessions, job_id, worker = _job(tmp_path / "file", results,
                                                f'url = "{pacs.dicomweb_url}"\nauthorization_file = "pacs.token"')
        assert worker.run_one()
        job = _job_row(sessions, job_id)
        assert job.state == JobState.FAILED and f"(authorization_file {token})" in job.error, job.error
        status = CliRunner().invoke(app, ["status", "--config", str(config.source)])
        assert "web" in status.output and "authorization refused" in " ".join(status.output.split()), status.output
        token.write_text(right + "\n")
        retried = CliRunner().invoke(app, ["jobs", "retry", str(job_id), "--config", str(config.source)])
        assert retried.exit_code == 0, retried.output
        assert worker.run_one()
        assert _job_row(sessions, job_id).state == JobState.SUCCEEDED
        assert _in_pacs(pacs, study_uid) == sorted(str(dcmread(p).SOPInstanceUID) for p in results)
        assert [d.state for d in delivery.of_job(sessions, job_id)] == ["sent", "sent"]


def test_echo_of_a_dicomweb_destination(tmp_path: Path):
    with LocalOrthanc(tmp_path / "pacs", dicomweb=True, users={"node": "pw"}) as pacs:
        config = node_config(tmp_path, extra=f'[[destinations]]\nname = "web"\nurl = "{pacs.dicomweb_url}"\n')
        refused = CliRunner().invoke(app, ["echo", "web", "--config", str(config.source)])
        assert refused.exit_code == 1 and "HTTP 401" in refused.output and "authorization" in refused.output
        (tmp_path / "t").write_text(pacs.basic_authorization("node", "pw"))
        config = node_config(tmp_path / "ok", extra=f'[[destinations]]\nname = "web"\nurl = "{pacs.dicomweb_url}"\n'
                                                   f'authorization_file = "{tmp_path / "t"}"\n')
        answered = CliRunner().invoke(app, ["echo", "web", "--config", str(config.source)])
        assert answered.exit_code == 0 and "web: QIDO-RS HTTP 200 OK" in answered.output, answered.output



def test_https_destination_and_source_checked_against_the_configured_ca(tmp_path: Path, results):
    """DICOMweb over https (a trustme CA; TLS terminated in front of Orthanc, as nginx does at a
    site): the SEG and SR go by STOW-RS to the destination whose tls names that CA, and come back
    by QIDO-RS/WADO-RS from a source configured the same way; a destination that trusts another
    CA, or only the system's, fails the handshake, transient, and nothing is stored."""
    import trustme

    from dicomnode.config import Source
    from dicomnode.net.fetch import client_for, fetch_study
    from dicomnode.net.receiver import InstanceStore
    from dicomnode.net.retrieve import SourceError

    from tests.support.tlsproxy import TlsProxy

    ca, other_ca = trustme.CA(), trustme.CA()
    server_pem, ca_pem, other_pem = tmp_path / "server.pem", tmp_path / "ca.pem", tmp_path / "other-ca.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    ca.cert_pem.write_to_path(str(ca_pem))
    other_ca.cert_pem.write_to_path(str(other_pem))
    uids = sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in results)
    with LocalOrthanc(tmp_path / "pacs", dicomweb=True) as pacs, TlsProxy(server_pem, pacs.http_port) as proxy:
        url = f"https://127.0.0.1:{proxy.port}/dicom-web"
        for name, ca_file in (("wrong-ca", other_pem), ("system-ca", None)):
            tls = f'\ntls = {{ ca_certificates = "{ca_file}" }}' if ca_file else ""
            _, sessions, job_id, worker = _job(tmp_path / name, results, f'url = "{url}"{tls}')
            assert worker.run_one()
            job = _job_row(sessions, job_id)
            assert job.state == JobState.QUEUED and "TLS handshake failed: unable to get local issuer" in job.error
        assert pacs.get("/instances") == []
        right = f'url = "{url}"\ntls = {{ ca_certificates = "{ca_pem}" }}'
        config, sessions, job_id, worker = _job(tmp_path / "right-ca", results, right)
        assert worker.run_one()
        job = _job_row(sessions, job_id)
        assert job.state == JobState.SUCCEEDED, job.error
        assert len(pacs.get("/instances")) == 2
        with pytest.raises(SourceError, match="certificate verify failed"):
            client_for(Source(name="web", url=url), config).announce(job.study_uid)
        client = client_for(Source(name="web", url=url, tls={"ca_certificates": ca_pem}), config)
        announced = client.announce(job.study_uid)
        assert sorted(announced.instances) == uids
        fetch_config = node_config(tmp_path / "fetcher")
        fetch_sessions = make_sessionmaker(fetch_config.database_url)
        fetched = fetch_study(client, announced, InstanceStore(fetch_config, fetch_sessions), fetch_sessions)
    assert (fetched.method, fetched.arrived) == ("WADO-RS", 2)
    spooled = sorted(fetch_config.spool_dir.rglob("*.dcm"))
    assert sorted(str(dcmread(p).SOPInstanceUID) for p in spooled) == uids
