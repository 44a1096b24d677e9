"""Notifications on the wire: a real HTTP receiver and a real HL7 MLLP listener (python-hl7's
server) on loopback, a job whose SEG and SR go to a local Orthanc (the worker in-process, results
already in the job's folder: no model runs).

- The webhook gets a JSON POST per event (results confirmed, job succeeded) without patient details;
  the RIS gets an ORU^R01 that parses, answers AE first (a failed try) and AA to the same message
  sent again (the same control ID), which is then sent.
- Targets that are down (a closed port) or hang (a listener that never answers: timeout) never
  hold up the job: it succeeds and the SEG is in Orthanc before any notification was tried; the
  notifications are tried, and given up with events.
- Through a running node (`dicomnode serve`, the demo model): its scheduler's loop posts
  job-succeeded with the lesion count the SR holds.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom.sop_class import Comprehensive3DSRStorage, SegmentationStorage
from sqlalchemy import select

from dicomnode.pipeline import notify
from dicomnode.pipeline.queue import RetryPolicy, claim, enqueue, succeed
from dicomnode.pipeline.worker import Worker
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.events import EventKind, event_data
from dicomnode.store.tables import Event, Job, JobState, Notification, NotificationSend, NotifyState
from dicomnode.testing.orthanc import LocalOrthanc, orthanc_binary
from dicomnode.testing.ports import free_port

from tests.support.listeners import HttpReceiver, MllpListener, SilentListener, until
from tests.support.nodeutil import node_config, tiny_instance
from tests.support.selectionutil import index_files

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(orthanc_binary() is None, reason="Orthanc is not installed")]

PATIENT_ID, ACCESSION = "PAT-4711", "ACC-0815"


def _site(tmp_path: Path, pacs: LocalOrthanc, node_port: int, targets: str, verify: str = "query"):
    """A node config with Orthanc as destination and `targets`; a study in the index (with a patient
    and an accession number) and a queued job whose SEG and SR are already in its result folder."""
    config = node_config(
        tmp_path,
        node=f'ae_title = "DICOMNODE"\nport = {node_port}\ndelivery_backoff_seconds = 0',
        extra=f'[[destinations]]\nname = "pacs"\nae_title = "{pacs.aet}"\nhost = "127.0.0.1"\n'
              f'port = {pacs.dicom_port}\nverify = "{verify}"\n{targets}',
    )
    sessions = make_sessionmaker(config.database_url)
    study_uid = generate_uid()
    source = tiny_instance(study_uid, generate_uid(), 0)
    source.PatientID, source.AccessionNumber = PATIENT_ID, ACCESSION
    (tmp_path / "in").mkdir()
    source.save_as(tmp_path / "in" / "ct.dcm", enforce_file_format=True)
    index_files(sessions, [tmp_path / "in" / "ct.dcm"])
    job_id = enqueue(sessions, study_uid, "demo-petct", RetryPolicy())
    out = config.job_folder(study_uid, job_id)
    out.mkdir(parents=True)
    for name, sop_class in (("seg.dcm", SegmentationStorage), ("sr.dcm", Comprehensive3DSRStorage)):
        ds = tiny_instance(study_uid, generate_uid(), 0)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.PatientID, ds.AccessionNumber = PATIENT_ID, ACCESSION
        ds.save_as(out / name, enforce_file_format=True)
    (out / "measures.json").write_text(json.dumps({"lesion_count": 3, "total_mtv_ml": 21.5, "total_tlg_g": 88.25,
                                                   "connectivity": 18, "lesions": [{"suv_max": 11.2}]}))
    worker = Worker(config, sessions)
    worker.models._models["demo-petct"] = object()  # results exist: make_results reuses them, no model runs
    return config, sessions, job_id, worker, study_uid, dcmread(out / "seg.dcm").SOPInstanceUID


def _sends(sessions) -> dict[tuple[str, str], NotificationSend]:
    with sessions() as session:
        rows = session.execute(select(NotificationSend, Notification.kind)
                               .join(Notification, Notification.id == NotificationSend.notification_id))
        return {(kind, send.target): send for send, kind in rows}


def _events(sessions, job_id: int, kind: EventKind) -> list[Event]:
    with sessions() as session:
        return list(session.scalars(select(Event).where(Event.job_id == job_id, Event.kind == kind)
                                    .order_by(Event.id)))


def _held(pacs: LocalOrthanc, study_uid: str) -> set[str]:
    found = pacs.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                                       "Expand": True})
    return {item["MainDicomTags"]["SOPInstanceUID"] for item in found}


def test_a_webhook_and_a_ris_are_told_and_the_ris_ack_is_checked(tmp_path: Path):
    node_port = free_port()
    with (LocalOrthanc(tmp_path / "pacs", modalities={"node": ("DICOMNODE", "127.0.0.1", node_port)}) as pacs,
          HttpReceiver() as hook, MllpListener(codes=("AE", "AA")) as ris):
        token = tmp_path / "hook-token"
        token.write_text("Bearer s3cret\n")
        targets = (f'[[notify]]\nname = "hook"\nurl = "{hook.url}/dicomnode"\nauthorization_file = "{token}"\n'
                   'headers = { X-Site = "test" }\n'
                   f'[[notify]]\nname = "ris"\ntype = "hl7"\nhost = "127.0.0.1"\nport = {ris.port}\n'
                   'include_accession = true\nreceiving_application = "RIS"\nbackoff_seconds = 0\n')
        config, sessions, job_id, worker, study_uid, seg_uid = _site(tmp_path, pacs, node_port, targets)
        assert worker.run_one()
        with sessions() as session:
            assert session.get(Job, job_id).state == JobState.SUCCEEDED
        assert seg_uid in _held(pacs, study_uid)

        until(lambda: len(hook.got) >= 2 and len(ris.got) >= 2, 60, "two POSTs and two ORU^R01 tries",
              step=lambda: notify.send_due(config, sessions))
        by_event = {body["event"]: (path, headers, body) for path, headers, body in hook.got}
        assert sorted(by_event) == ["job-succeeded", "results-confirmed"]
        path, headers, body = by_event["job-succeeded"]
        assert path == "/dicomnode" and headers["Authorization"] == "Bearer s3cret" and headers["X-Site"] == "test"
        assert headers["Idempotency-Key"] == f"dicomnode-{body['notification_id']}-hook"
        assert (body["job_id"], body["state"], body["study_instance_uid"], body["node"]) == (
            job_id, "succeeded", study_uid, "DICOMNODE")
        assert body["results"] == {"lesion_count": 3, "total_mtv_ml": 21.5, "total_tlg_g": 88.25, "max_suv": 11.2}
        assert (body["objects_sent"], body["objects_confirmed"]) == (2, 2)
        confirmed = by_event["results-confirmed"][2]
        assert (confirmed["state"], confirmed["destination"], confirmed["verified"]) == ("confirmed", "pacs", True)
        for _path, _headers, said in hook.got:
            assert "patient" not in said and "accession_number" not in said
            assert PATIENT_ID not in json.dumps(said) and ACCESSION not in json.dumps(said)

        first, second = ris.got
        print("ORU^R01 as received by the MLLP listener:\n" + ris.raw[1].replace("\r", "\n"))
        assert str(first) == str(second)  # the same message (control ID) sent again after the AE
        assert str(second.segment("MSH")(9)) == "ORU^R01^ORU_R01" and str(second.segment("MSH")(12)) == "2.5.1"
        with pytest.raises(KeyError):
            second.segment("PID")  # include_patient is off
        assert PATIENT_ID not in ris.raw[1]
        assert second["ORC.F3"] == ACCESSION and second["OBR.F3"] == ACCESSION
        obx = {str(seg(3)(1)(2)): str(seg(5)) for seg in second.segments("OBX")}
        assert obx["Study Instance UID"] == study_uid and obx["Number of lesions"] == "3"
        assert obx["Metabolic Volume"] == "21.50" and obx["Total Lesion Glycolysis"] == "88.25"
        assert "confirmed by pacs" in obx["Comment"]

        sends = _sends(sessions)
        assert (sends[("results-confirmed", "ris")].state, sends[("results-confirmed", "ris")].attempts) == (
            NotifyState.SENT, 2)
        assert [s.state for k, s in sends.items() if k[1] == "hook"] == [NotifyState.SENT] * 2
        [tried] = _events(sessions, job_id, EventKind.NOTIFY_FAILED)
        assert "ACK AE" in tried.message and event_data(tried)["given_up"] is False
        told = [e.message for e in _events(sessions, job_id, EventKind.NOTIFIED)]
        assert sorted(m.split(":")[0] for m in told) == ["job-succeeded to hook (webhook)",
                                                         "results-confirmed to hook (webhook)",
                                                         "results-confirmed to ris (hl7)"]
        assert notify.send_due(config, sessions) == 0  # sent once: nothing left to send


def test_targets_down_or_silent_never_hold_up_the_job_and_are_given_up(tmp_path: Path):
    node_port, closed = free_port(), free_port()
    with (LocalOrthanc(tmp_path / "pacs", modalities={"node": ("DICOMNODE", "127.0.0.1", node_port)}) as pacs,
          SilentListener() as silent_http, SilentListener() as silent_ris):
        settings = "timeout_seconds = 1\nmax_attempts = 2\nbackoff_seconds = 0\n"
        targets = (f'[[notify]]\nname = "down"\nurl = "http://127.0.0.1:{closed}/hook"\n{settings}'
                   f'[[notify]]\nname = "slow"\nurl = "http://127.0.0.1:{silent_http.port}/hook"\n{settings}'
                   f'[[notify]]\nname = "ris"\ntype = "hl7"\nhost = "127.0.0.1"\nport = {silent_ris.port}\n{settings}')
        config, sessions, job_id, worker, study_uid, seg_uid = _site(tmp_path, pacs, node_port, targets,
                                                                      verify="none")
        started = time.monotonic()
        assert worker.run_one()
        took = time.monotonic() - started
        with sessions() as session:
            assert session.get(Job, job_id).state == JobState.SUCCEEDED
        assert seg_uid in _held(pacs, study_uid)  # the SEG arrived
        notify.route(config, sessions)
        assert {s.attempts for s in _sends(sessions).values()} == {0}  # the job did not wait for any of them

        until(lambda: all(s.state == NotifyState.FAILED for s in _sends(sessions).values()), 60,
              "every notification given up", step=lambda: notify.send_due(config, sessions))
        sends = _sends(sessions)
        assert sorted(sends) == [("job-succeeded", "down"), ("job-succeeded", "slow"), ("results-confirmed", "down"),
                                 ("results-confirmed", "ris"), ("results-confirmed", "slow")]
        assert {s.attempts for s in sends.values()} == {2}
        assert "not reached" in sends[("job-succeeded", "down")].last_error
        assert "within 1 s (timeout_seconds)" in sends[("job-succeeded", "slow")].last_error
        assert "no ACK from" in sends[("results-confirmed", "ris")].last_error
        assert silent_ris.wait_for(2, 5)  # the RIS was really tried twice
        given_up = [e for e in _events(sessions, job_id, EventKind.NOTIFY_FAILED) if event_data(e)["given_up"]]
        assert len(given_up) == 5 and all("given up" in e.message for e in given_up)
        with sessions() as session:
            assert session.get(Job, job_id).state == JobState.SUCCEEDED  # still
        print(f"job with three dead targets ran in {took:.2f} s")


def test_a_hanging_target_holds_up_no_other_target(tmp_path: Path):
    """Targets are served side by side: three notifications reach a working webhook while the
    first try to a target that never answers is still waiting for its timeout (5 s), though that
    target's sends come first in the queue; the hanging target's other sends wait for the next pass
    (no try counted)."""
    with SilentListener() as silent, HttpReceiver() as hook:
        config = node_config(tmp_path, extra=(
            f'[[notify]]\nname = "a-hanging"\nurl = "http://127.0.0.1:{silent.port}/x"\ntimeout_seconds = 5\n'
            f'max_attempts = 1\n[[notify]]\nname = "hook"\nurl = "{hook.url}/x"\n'))
        sessions = make_sessionmaker(config.database_url)
        jobs = []
        for _ in range(3):
            jobs.append(enqueue(sessions, generate_uid(), "demo-petct", RetryPolicy()))
            claim(sessions, "w1", timedelta(seconds=60))
            assert succeed(sessions, jobs[-1], "w1", "done")
        started = time.monotonic()
        passing = threading.Thread(target=notify.send_due, args=(config, sessions))
        passing.start()
        try:
            assert hook.wait_for(3, 4.5), f"the webhook got {len(hook.got)} of 3 while the other target hung"
            took = time.monotonic() - started
        finally:
            passing.join(30)
        assert sorted(body["job_id"] for _path, _headers, body in hook.got) == jobs
        with sessions() as session:
            hanging = sorted((s.state, s.attempts) for s in session.scalars(
                select(NotificationSend).where(NotificationSend.target == "a-hanging")))
        assert hanging == [(NotifyState.FAILED, 1), (NotifyState.PENDING, 0), (NotifyState.PENDING, 0)]
        assert silent.wait_for(1, 5)
        print(f"three notifications to a working webhook in {took:.2f} s beside a target that hangs 5 s")


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "models" / "demo-petct" / "plans.json").exists(),
                    reason="demo model not built")
def test_a_running_node_posts_job_succeeded_with_the_lesion_count(tmp_path: Path, synth_study):
    """`dicomnode serve` with a webhook: the scheduler's loop sends; the payload's lesion count is
    the one the job measured."""
    from dicomnode.testing.node import start_node  # noqa: PLC0415

    from tests.support.e2e import DEMO_MODEL, write_node_config  # noqa: PLC0415

    with HttpReceiver() as hook:
        node_port = free_port()
        pacs = LocalOrthanc(tmp_path / "orthanc", modalities={"dicomnode": ("DICOMNODE", "127.0.0.1", node_port)})
        pacs.start()
        try:
            config_path = write_node_config(tmp_path, pacs, node_port, models=DEMO_MODEL + (
                f'\n[[notify]]\nname = "hook"\nurl = "{hook.url}/n"\nevents = ["job-succeeded"]\n'))
            node = start_node(config_path, node_port, tmp_path / "node.log")
            try:
                pacs.upload(list(synth_study.ct_files) + list(synth_study.pt_files))
                pacs.store_to_modality("dicomnode", [pacs.find_study(synth_study.study_instance_uid)])
                assert hook.wait_for(1, 600), (tmp_path / "node.log").read_text()[-3000:]
            finally:
                assert node.stop() == 0
        finally:
            pacs.stop()
    [(_path, _headers, body)] = hook.got
    measured = json.loads(next((tmp_path / "var" / "results").rglob("measures.json")).read_text())
    assert body["event"] == "job-succeeded" and body["study_instance_uid"] == synth_study.study_instance_uid
    assert body["results"]["lesion_count"] == measured["lesion_count"] > 0
    assert "patient" not in body
    print("webhook payload from a running node:\n" + json.dumps(body, indent=2))
