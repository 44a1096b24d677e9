"""Proof of delivery against Orthanc (a Storage Commitment SCP): the worker in-process (results
already in the job's folder, no model runs) sends the SEG and SR, then asks Orthanc to confirm.

- verify = "commitment": Orthanc answers the N-ACTION and sends its report on a new association
  to the node's receiver (it knows the node as a modality); the deliveries are `confirmed` in
  the same pass. An instance Orthanc deletes between the store and the commitment (a Lua
  OnStoredInstance callback deletes the SR the first time it is stored) is reported failed
  (0x0112, no such object instance), sent again with the same SOP Instance UID, then committed.
- verify = "query": C-FIND at IMAGE level (DIMSE) or QIDO-RS (DICOMweb): confirmed when found.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom.sop_class import Comprehensive3DSRStorage, SegmentationStorage
from sqlalchemy import select
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.net.receiver import Receiver
from dicomnode.pipeline import delivery, dispatch
from dicomnode.pipeline.job import result_dir
from dicomnode.pipeline.queue import RetryPolicy, enqueue
from dicomnode.pipeline.worker import Worker
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.events import EventKind
from dicomnode.store.tables import Commitment, DeliveryState, Event, Job, JobState
from dicomnode.synth.petct import write_study
from dicomnode.testing.node import start_node
from dicomnode.testing.orthanc import LocalOrthanc
from dicomnode.testing.ports import free_port

from tests.support.e2e import DEMO_MODEL, REPO, write_node_config
from tests.support.nodeutil import node_config, tiny_instance

pytestmark = pytest.mark.e2e
SEG_TIMEOUT = 300

DELETE_FIRST_SR = """
deleted = false
function OnStoredInstance(instanceId, tags, metadata, origin)
  if not deleted and tags['SOPClassUID'] == '1.2.840.10008.5.1.4.1.1.88.34' then
    deleted = true
    RestApiDelete('/instances/' .. instanceId)
  end
end
"""


def _result_file(folder: Path, name: str, sop_class: str, study_uid: str) -> Path:
    ds = tiny_instance(study_uid, generate_uid(), 0)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)
    return folder / name


def _node(tmp_path: Path, pacs_port: int | None, node_port: int, verify: str, url: str | None = None):
    where = f'url = "{url}"' if url else f'ae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {pacs_port}'
    config = node_config(
        tmp_path,
        node=f'ae_title = "DICOMNODE"\nport = {node_port}\ndelivery_backoff_seconds = 0\n'
             'allowed_calling_aets = ["ORTHANC"]',
        extra=f'[[destinations]]\nname = "pacs"\n{where}\nverify = "{verify}"\nverify_wait_seconds = 20\n',
    )
    sessions = make_sessionmaker(config.database_url)
    study_uid = generate_uid()
    job_id = enqueue(sessions, study_uid, "demo-petct", RetryPolicy())
    with sessions() as session:
        out = result_dir(config, session.get(Job, job_id))
    files = [_result_file(out, "seg.dcm", SegmentationStorage, study_uid),
             _result_file(out, "sr.dcm", Comprehensive3DSRStorage, study_uid)]
    worker = Worker(config, sessions)
    worker.models._models["demo-petct"] = object()  # results exist: make_results reuses them, no model runs
    return config, sessions, job_id, worker, [str(dcmread(f).SOPInstanceUID) for f in files], study_uid


def _events(sessions, job_id: int) -> list[Event]:
    with sessions() as session:
        return list(session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id)))


def _job(sessions, job_id: int) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def _held(pacs: LocalOrthanc, study_uid: str) -> set[str]:
    found = pacs.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                                       "Expand": True})
    return {item["MainDicomTags"]["SOPInstanceUID"] for item in found}


def _ask_after_the_delete(monkeypatch, name: str, pacs: LocalOrthanc, study_uid: str,  # noqa: ANN001
                          deleted_uid: str) -> None:
    """The node's first commitment request or query (dispatch.`name`) waits until Orthanc's Lua
    script has deleted `deleted_uid`: Orthanc runs OnStoredInstance after its C-STORE answer."""
    real, asked = getattr(dispatch, name), []

    def after_the_delete(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if not asked:
            _until(lambda: deleted_uid not in _held(pacs, study_uid), 30, "Orthanc's Lua script deleted the SR")
        asked.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, name, after_the_delete)


def test_commitment_report_on_a_new_association_confirms_both_objects(tmp_path: Path):
    node_port = free_port()
    with LocalOrthanc(tmp_path / "pacs", modalities={"node": ("DICOMNODE", "127.0.0.1", node_port)}) as pacs:
        config, sessions, job_id, worker, uids, study_uid = _node(tmp_path, pacs.dicom_port, node_port, "commitment")
        receiver = Receiver(config, sessions)
        receiver.start()
        try:
            assert worker.run_one()
        finally:
            receiver.stop()
        job = _job(sessions, job_id)
        assert job.state == JobState.SUCCEEDED, job.error
        rows = delivery.of_job(sessions, job_id)
        assert [(d.sop_instance_uid, d.state, d.attempts) for d in rows] == [
            (uids[0], DeliveryState.CONFIRMED, 1), (uids[1], DeliveryState.CONFIRMED, 1)]
        assert all(d.confirmed_at >= d.sent_at for d in rows)
        with sessions() as session:
            [commitment] = session.scalars(select(Commitment)).all()
        assert commitment.reported_by == "ORTHANC" and commitment.transaction_uid == rows[0].transaction_uid
        kinds = [e.kind for e in _events(sessions, job_id)]
        assert kinds.count(EventKind.COMMITMENT_REQUESTED) == 1 and kinds.count(EventKind.COMMITMENT_REPORTED) == 1
        assert kinds.count(EventKind.CONFIRMED) == 2 and kinds[-1] == EventKind.SUCCEEDED
        assert "2 objects delivered to 1 destinations (2 confirmed by the destination)" in _events(
            sessions, job_id)[-1].message
        assert _held(pacs, study_uid) == set(uids)
        shown = CliRunner().invoke(app, ["jobs", "show", str(job_id), "--json", "--config", str(config.source)])
        assert shown.exit_code == 0, shown.output
        assert [(d["state"], d["confirmed_at"] is not None) for d in json.loads(shown.output)["deliveries"]] == [
            ("confirmed", True), ("confirmed", True)]


def test_an_instance_deleted_before_the_commitment_is_reported_missing_and_sent_again(tmp_path: Path, monkeypatch):
    node_port = free_port()
    lua = tmp_path / "delete-first-sr.lua"
    lua.write_text(DELETE_FIRST_SR)
    with LocalOrthanc(tmp_path / "pacs", modalities={"node": ("DICOMNODE", "127.0.0.1", node_port)},
                      config_overrides={"LuaScripts": [str(lua)]}) as pacs:
        config, sessions, job_id, worker, uids, study_uid = _node(tmp_path, pacs.dicom_port, node_port, "commitment")
        _ask_after_the_delete(monkeypatch, "request_commitment", pacs, study_uid, uids[1])
        receiver = Receiver(config, sessions)
        receiver.start()
        try:
            assert worker.run_one()  # both stored, the SR deleted by Orthanc, the commitment reports it missing
            job = _job(sessions, job_id)
            assert job.state == JobState.QUEUED, job.error
            seg, sr = delivery.of_job(sessions, job_id)
            assert (seg.state, sr.state) == (DeliveryState.CONFIRMED, DeliveryState.PENDING)
            assert "0x0112 (no such object instance)" in sr.last_error and sr.attempts == 1
            [unconfirmed] = [e for e in _events(sessions, job_id) if e.kind == EventKind.UNCONFIRMED]
            assert uids[1] in unconfirmed.message and "sent again (same SOP Instance UID)" in unconfirmed.message
            assert _held(pacs, study_uid) == {uids[0]}
            assert worker.run_one()  # backoff 0: the SR again, same UID, then committed
        finally:
            receiver.stop()
        job = _job(sessions, job_id)
        assert job.state == JobState.SUCCEEDED, job.error
        seg, sr = delivery.of_job(sessions, job_id)
        assert (seg.state, seg.attempts) == (DeliveryState.CONFIRMED, 1)
        assert (sr.state, sr.attempts, sr.sop_instance_uid) == (DeliveryState.CONFIRMED, 2, uids[1])
        assert _held(pacs, study_uid) == set(uids)
        with sessions() as session:
            assert len(session.scalars(select(Commitment)).all()) == 2


@pytest.mark.parametrize("dicomweb", [False, True], ids=["c-find", "qido-rs"])
def test_query_confirms_what_the_destination_lists(tmp_path: Path, dicomweb: bool):
    node_port = free_port()  # Orthanc answers C-FIND from the modalities it knows only
    with LocalOrthanc(tmp_path / "pacs", dicomweb=dicomweb,
                      modalities={"node": ("DICOMNODE", "127.0.0.1", node_port)}) as pacs:
        config, sessions, job_id, worker, uids, study_uid = _node(
            tmp_path, pacs.dicom_port, node_port, "query", url=pacs.dicomweb_url if dicomweb else None)
        assert worker.run_one()
        job = _job(sessions, job_id)
        assert job.state == JobState.SUCCEEDED, job.error
        rows = delivery.of_job(sessions, job_id)
        assert [(d.sop_instance_uid, d.state) for d in rows] == [(u, DeliveryState.CONFIRMED) for u in uids]
        how = "QIDO-RS" if dicomweb else "C-FIND"
        assert [e.message.endswith(f"found on pacs by {how}") for e in _events(sessions, job_id)
                if e.kind == EventKind.CONFIRMED] == [True, True]


def test_query_finds_an_instance_missing_and_it_is_sent_again(tmp_path: Path, monkeypatch):
    lua = tmp_path / "delete-first-sr.lua"
    lua.write_text(DELETE_FIRST_SR)
    node_port = free_port()
    with LocalOrthanc(tmp_path / "pacs", config_overrides={"LuaScripts": [str(lua)]},
                      modalities={"node": ("DICOMNODE", "127.0.0.1", node_port)}) as pacs:
        config, sessions, job_id, worker, uids, study_uid = _node(tmp_path, pacs.dicom_port, node_port, "query")
        _ask_after_the_delete(monkeypatch, "missing_by_query", pacs, study_uid, uids[1])
        assert worker.run_one()
        seg, sr = delivery.of_job(sessions, job_id)
        assert (seg.state, sr.state) == (DeliveryState.CONFIRMED, DeliveryState.PENDING), sr.last_error
        assert "missing" in sr.last_error
        assert worker.run_one()
        assert _job(sessions, job_id).state == JobState.SUCCEEDED
        assert [d.state for d in delivery.of_job(sessions, job_id)] == [DeliveryState.CONFIRMED] * 2
        assert _held(pacs, study_uid) == set(uids)


def _until(condition, timeout: float, what: str):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)  # polling a condition, not a fixed wait
    raise AssertionError(f"not within {timeout} s: {what}")


@pytest.mark.skipif(not (REPO / "models" / "demo-petct" / "plans.json").exists(), reason="demo model not built")
def test_demo_study_through_a_running_node_confirmed_by_storage_commitment(tmp_path: Path):
    """The figure for the note: Orthanc sends the demo study to a running node (demo model); the
    SEG and SR are stored back and committed; time from the last instance received to confirmed."""
    node_port = free_port()
    with LocalOrthanc(tmp_path / "pacs", modalities={"node": ("DICOMNODE", "127.0.0.1", node_port)}) as pacs:
        config = write_node_config(tmp_path, pacs, node_port,
                                   models='verify = "commitment"\n' + DEMO_MODEL)
        node = start_node(config, node_port, tmp_path / "node.log")
        try:
            study = write_study(tmp_path / "study", seed=7)
            pacs.upload(sorted(study.ct_dir.glob("*.dcm")) + sorted(study.pt_dir.glob("*.dcm")))
            pacs.store_to_modality("node", [pacs.find_study(study.study_instance_uid)])

            def succeeded() -> dict | None:
                jobs = json.loads(node.cli("jobs", "list", "--json").stdout)
                done = [j for j in jobs if j["study"] == study.study_instance_uid and j["state"] in ("succeeded",
                                                                                                      "failed")]
                return done[0] if done else None

            job = _until(succeeded, SEG_TIMEOUT, "the job finished")
            assert job["state"] == "succeeded", job
            shown = json.loads(node.cli("jobs", "show", str(job["id"]), "--json").stdout)
            status = node.cli("status")
        finally:
            code = node.stop()
        assert code == 0, (tmp_path / "node.log").read_text()[-3000:]
        assert [d["state"] for d in shown["deliveries"]] == ["confirmed", "confirmed"], shown["deliveries"]
        assert _held(pacs, study.study_instance_uid) >= {d["sop_instance_uid"] for d in shown["deliveries"]}
        assert "confirmed 2" in status.stdout, status.stdout
        steps = {s["event"]: datetime.fromisoformat(s["at"]) for s in shown["timeline"]}
        last = steps["last-instance"]
        sent = max(datetime.fromisoformat(d["sent_at"]) for d in shown["deliveries"])
        confirmed = max(datetime.fromisoformat(d["confirmed_at"]) for d in shown["deliveries"])
        print(f"demo study, verify = commitment: last instance received -> last object sent "
              f"{(sent - last).total_seconds():.2f} s, -> confirmed {(confirmed - last).total_seconds():.2f} s "
              f"(commitment round trip {(confirmed - sent).total_seconds():.2f} s; study_quiet_seconds 2 and the "
              "model load included)")
        assert confirmed >= sent >= last
