"""Notifications at the database and message level (the network side, a real HTTP receiver and a
real MLLP listener, is tests/e2e/test_notify_e2e.py): the outbox is written with the state change
it tells and routed once per target; the JSON payload carries no patient details and no accession
number unless the target opts in; the ORU^R01 parses, with PID only when allowed; ACKs are read by
MSA-1; failed tries back off and are given up with an event, visible in status and metrics."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import hl7
import pytest
from pydicom.uid import generate_uid
from pynetdicom.sop_class import Comprehensive3DSRStorage, SegmentationStorage
from sqlalchemy import select
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import ConfigError, NotifyEvent
from dicomnode.net import hl7v2
from dicomnode.net.sender import Outcome
from dicomnode.net.webhook import Told
from dicomnode.ops.metrics import DatabaseCollector
from dicomnode.ops.status import node_status
from dicomnode.pipeline import delivery, notify, review
from dicomnode.pipeline.queue import RetryPolicy, claim, enqueue, fail, succeed
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.events import EventKind
from dicomnode.store.tables import (
    DeliveryState,
    Event,
    Job,
    Notification,
    NotificationSend,
    NotifyState,
    utcnow,
)

from tests.support.nodeutil import node_config, tiny_instance
from tests.support.selectionutil import index_files

LEASE = timedelta(seconds=60)
POLICY = RetryPolicy(max_attempts=None, backoff_seconds=10, give_up_after=timedelta(hours=1))
PATIENT_ID, PATIENT_NAME, ACCESSION = "PAT-4711", "Doe^Jane", "ACC-0815"

TARGETS = """
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104

[[notify]]
name = "hook"
url = "http://127.0.0.1:9/hook"
max_attempts = 3
backoff_seconds = 5

[[notify]]
name = "hook-phi"
url = "http://127.0.0.1:9/phi"
include_patient = true
include_accession = true
events = ["job-succeeded", "not-performed"]

[[notify]]
name = "ris"
type = "hl7"
host = "127.0.0.1"
port = 2575
include_accession = true
receiving_application = "RIS"
"""


@pytest.fixture
def config(tmp_path: Path):
    return node_config(tmp_path, extra=TARGETS)


@pytest.fixture
def sessions(config):
    return make_sessionmaker(config.database_url)


@pytest.fixture
def study(sessions, tmp_path: Path) -> str:
    """A study in the index whose instance carries a patient and an accession number."""
    study_uid = generate_uid()
    ds = tiny_instance(study_uid, generate_uid(), 0)
    ds.PatientID, ds.PatientName, ds.AccessionNumber = PATIENT_ID, PATIENT_NAME, ACCESSION
    ds.PatientBirthDate, ds.PatientSex = "19600102", "F"
    path = tmp_path / "in" / "ct.dcm"
    path.parent.mkdir()
    ds.save_as(path, enforce_file_format=True)
    index_files(sessions, [path])
    return study_uid


def _result(folder: Path, name: str, sop_class: str, study_uid: str) -> Path:
    ds = tiny_instance(study_uid, generate_uid(), 0)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)
    return folder / name


def _succeeded_job(config, sessions, study_uid: str) -> int:
    """A job whose SEG and SR were sent to 'pacs' (verify none), with measures.json, succeeded."""
    job_id = enqueue(sessions, study_uid, "demo-petct", RetryPolicy())
    claim(sessions, "w1", LEASE)
    out = config.job_folder(study_uid, job_id)
    files = [_result(out, "seg.dcm", SegmentationStorage, study_uid),
             _result(out, "sr.dcm", Comprehensive3DSRStorage, study_uid)]
    (out / "measures.json").write_text(json.dumps({
        "lesion_count": 2, "total_mtv_ml": 12.3456, "total_tlg_g": 45.678, "connectivity": 18,
        "lesions": [{"number": 1, "suv_max": 9.87}, {"number": 2, "suv_max": 4.5}]}))
    delivery.plan(sessions, job_id, study_uid, files, ["pacs"], POLICY)
    for item in delivery.of_job(sessions, job_id):
        delivery.record(sessions, item.id, Outcome(Path(item.path), item.sop_instance_uid, item.sop_class_uid, 1, 0),
                        POLICY)
    with sessions() as session:
        job = session.get(Job, job_id)
    assert notify.results_confirmed(sessions, job, frozenset()) == ["pacs"]
    assert notify.results_confirmed(sessions, job, frozenset()) == []  # once per job and destination
    assert succeed(sessions, job_id, "w1", "2 objects delivered to 1 destinations")
    return job_id


def _notifications(sessions) -> list[Notification]:
    with sessions() as session:
        return list(session.scalars(select(Notification).order_by(Notification.id)))


def _sends(sessions) -> dict[tuple[str, str], NotificationSend]:
    with sessions() as session:
        rows = session.execute(select(NotificationSend, Notification.kind)
                               .join(Notification, Notification.id == NotificationSend.notification_id))
        return {(kind, send.target): send for send, kind in rows}


def test_the_outbox_is_written_with_the_state_change_and_routed_once_per_target(config, sessions, study):
    job_id = _succeeded_job(config, sessions, study)
    assert [(n.kind, n.job_id, n.state) for n in _notifications(sessions)] == [
        ("results-confirmed", job_id, "sent"), ("job-succeeded", job_id, "succeeded")]
    assert notify.route(config, sessions) == 4
    assert notify.route(config, sessions) == 0  # routed once: a restart adds nothing
    assert sorted(_sends(sessions)) == [("job-succeeded", "hook"), ("job-succeeded", "hook-phi"),
                                        ("results-confirmed", "hook"), ("results-confirmed", "ris")]
    assert all(s.state == NotifyState.PENDING for s in _sends(sessions).values())


def test_the_payload_carries_no_patient_details_unless_the_target_opts_in(config, sessions, study):
    job_id = _succeeded_job(config, sessions, study)
    [confirmed, succeeded] = _notifications(sessions)
    with sessions() as session:
        job = session.get(Job, job_id)
    hook, phi = config.notify[0], config.notify[1]
    said = notify.payload(config, sessions, succeeded, job, hook)
    assert said == {
        "schema": "dicomnode-notification/1", "notification_id": succeeded.id, "event": "job-succeeded",
        "time": said["time"], "node": "TESTNODE", "job_id": job_id, "model": "demo-petct", "model_version": None,
        "run": 1, "state": "succeeded", "reason": "2 objects delivered to 1 destinations",
        "study_instance_uid": study,
        "results": {"lesion_count": 2, "total_mtv_ml": 12.35, "total_tlg_g": 45.68, "max_suv": 9.87},
        "objects_sent": 2, "objects_confirmed": 0, "objects_failed": 0,
    }
    text = json.dumps(said)
    for detail in (PATIENT_ID, "Doe", ACCESSION, "19600102"):
        assert detail not in text
    opted = notify.payload(config, sessions, succeeded, job, phi)
    assert opted["accession_number"] == ACCESSION
    assert opted["patient"] == {"id": PATIENT_ID, "name": PATIENT_NAME, "birth_date": "19600102", "sex": "F"}
    about = notify.payload(config, sessions, confirmed, job, hook)
    assert (about["event"], about["state"], about["destination"], about["verified"]) == (
        "results-confirmed", "sent", "pacs", False)


def test_the_oru_parses_with_the_results_and_pid_only_when_allowed(config, sessions, study):
    job_id = _succeeded_job(config, sessions, study)
    [confirmed, _succeeded] = _notifications(sessions)
    with sessions() as session:
        job = session.get(Job, job_id)
    ris = config.notify[2]
    body = notify.build_body(config, sessions, confirmed, job, ris, send_id=7)
    message = hl7.parse(body)
    assert str(message.segment("MSH")(9)) == "ORU^R01^ORU_R01" and str(message.segment("MSH")(12)) == "2.5.1"
    assert str(message.segment("MSH")(3)) == "DICOMNODE" and str(message.segment("MSH")(5)) == "RIS"
    assert str(message.segment("MSH")(10)) == f"DN{confirmed.id}-7"
    with pytest.raises(KeyError):
        message.segment("PID")  # include_patient is off
    assert PATIENT_ID not in body and "Doe" not in body
    assert message["ORC.F3"] == ACCESSION and message["OBR.F3"] == ACCESSION  # include_accession is on
    assert message["OBR.F4.R1.C1"] == "demo-petct" and message["OBR.F25"] == "F"
    obx = {seg(3)(1)(2).__str__(): seg for seg in message.segments("OBX")}
    assert str(obx["Study Instance UID"](5)) == study
    assert str(obx["Number of lesions"](5)) == "2" and str(obx["Number of lesions"](2)) == "NM"
    assert str(obx["Metabolic Volume"](5)) == "12.35" and message.unescape(str(obx["Metabolic Volume"](6))) == \
        "ml^milliliter^UCUM"
    assert str(obx["Total Lesion Glycolysis"](5)) == "45.68"
    assert "2 lesion(s), total MTV 12.35 ml" in str(obx["Comment"](5))
    assert all(str(seg(11)) == "F" for seg in message.segments("OBX"))

    with_patient = ris.model_copy(update={"include_patient": True, "include_accession": False})
    message = hl7.parse(notify.build_body(config, sessions, confirmed, job, with_patient, send_id=8))
    assert message["PID.F3"] == PATIENT_ID and message["PID.F5.R1.C1"] == "Doe"
    assert message["PID.F5.R1.C2"] == "Jane" and message["PID.F7"] == "19600102"
    assert message["ORC.F3"] == "" and ACCESSION not in str(message)


def test_acks_are_read_by_msa_1_and_the_control_id():
    sent = hl7.parse("MSH|^~\\&|DICOMNODE||RIS||20261201120000||ORU^R01^ORU_R01|DN1-1|P|2.5.1\r")
    assert hl7v2.read_ack(sent.create_ack("AA", message_id="A1"), "DN1-1") == Told(True, "ACK AA (message DN1-1)")
    for code in ("AE", "AR"):
        told = hl7v2.read_ack(sent.create_ack(code, message_id="A2"), "DN1-1")
        assert not told.ok and told.error.startswith(f"ACK {code}")
    other = hl7v2.read_ack(sent.create_ack("AA", message_id="A3"), "DN9-9")
    assert not other.ok and "not ours" in other.error


def test_a_job_failed_without_results_is_also_not_performed(config, sessions, study):
    job_id = enqueue(sessions, study, "demo-petct", RetryPolicy(max_attempts=1))
    claim(sessions, "w1", LEASE)
    assert fail(sessions, job_id, "w1", "PET Units 'PROPCPS' cannot be converted to SUV",
                RetryPolicy(max_attempts=1)) == "failed"
    kinds = [(n.kind, n.state, n.reason) for n in _notifications(sessions)]
    assert kinds == [("job-failed", "failed", "PET Units 'PROPCPS' cannot be converted to SUV"),
                     ("not-performed", "failed", "PET Units 'PROPCPS' cannot be converted to SUV")]
    notify.route(config, sessions)
    assert sorted(_sends(sessions)) == [("job-failed", "hook"), ("not-performed", "hook-phi")]


def test_a_delivery_failed_for_good_is_told_with_the_object_and_the_job_failure(config, sessions, study, tmp_path):
    job_id = enqueue(sessions, study, "demo-petct", RetryPolicy(max_attempts=1))
    claim(sessions, "w1", LEASE)
    seg = _result(tmp_path / "out", "seg.dcm", SegmentationStorage, study)
    delivery.plan(sessions, job_id, study, [seg], ["pacs"], POLICY)
    [item] = delivery.of_job(sessions, job_id)
    refused = Outcome(seg, item.sop_instance_uid, item.sop_class_uid, 1, 0x0122, "SOP class not supported",
                      permanent=True)
    assert delivery.record(sessions, item.id, refused, POLICY) == DeliveryState.FAILED
    fail(sessions, job_id, "w1", "delivery failed: seg.dcm", RetryPolicy(max_attempts=1), retryable=False)
    [failed, job_failed] = _notifications(sessions)
    assert (failed.kind, failed.state, json.loads(failed.data)) == (
        "delivery-failed", "failed", {"destination": "pacs", "object": "seg.dcm",
                                      "sop_instance_uid": item.sop_instance_uid})
    assert job_failed.kind == "job-failed"  # it had results: not "not performed"


def test_failed_tries_back_off_then_give_up_with_an_event_in_status_and_metrics(config, sessions, study):
    job_id = _succeeded_job(config, sessions, study)
    notify.route(config, sessions)
    send = _sends(sessions)[("job-succeeded", "hook")]
    [_, succeeded] = _notifications(sessions)
    hook = config.notify[0]
    now = utcnow()
    down = Told(False, "http://127.0.0.1:9/hook not reached: ConnectionError: refused")
    assert notify._record(sessions, send.id, down, hook, succeeded, now) == NotifyState.PENDING
    assert _sends(sessions)[("job-succeeded", "hook")].not_before == now + timedelta(seconds=5)
    assert notify._record(sessions, send.id, down, hook, succeeded, now) == NotifyState.PENDING
    assert _sends(sessions)[("job-succeeded", "hook")].not_before == now + timedelta(seconds=10)  # doubled
    assert notify._record(sessions, send.id, down, hook, succeeded, now) == NotifyState.FAILED  # max_attempts 3
    with sessions() as session:
        events = list(session.scalars(select(Event).where(Event.job_id == job_id,
                                                          Event.kind == EventKind.NOTIFY_FAILED).order_by(Event.id)))
        job = session.get(Job, job_id)
    assert len(events) == 3 and "given up (attempt 3 of 3)" in events[-1].message
    assert json.loads(events[-1].data)["given_up"] is True
    assert job.state == "succeeded"  # the job is untouched
    status = node_status(sessions, config)
    assert status.notifications["failed"] == 1 and status.notifications["pending"] == 3
    [given_up] = status.notifications_given_up
    assert (given_up.job_id, given_up.event, given_up.target, given_up.attempts) == (job_id, "job-succeeded", "hook", 3)
    assert any(e.kind == EventKind.NOTIFY_FAILED for e in status.last_errors)
    metrics = {m.name: m for m in DatabaseCollector(config, sessions).collect()}
    assert [s.value for s in metrics["dicomnode_notification_failures"].samples if s.name.endswith("_total")] == [3]
    by_state = {s.labels["state"]: s.value for s in metrics["dicomnode_notifications"].samples}
    assert by_state == {"pending": 3, "sending": 0, "sent": 0, "failed": 1}
    text = CliRunner().invoke(app, ["status", "--config", str(config.source)], env={"COLUMNS": "200"}).output
    assert "notifications: pending 3, sending 0, sent 0, failed 1" in text
    assert f"notification given up: job-succeeded of job {job_id} to hook after 3 tries" in text
    as_json = json.loads(CliRunner().invoke(app, ["status", "--json", "--config", str(config.source)]).output)
    assert as_json["notifications"]["failed"] == 1 and as_json["notifications_given_up"][0]["target"] == "hook"


def test_a_refusal_for_good_is_not_tried_again(config, sessions, study):
    _succeeded_job(config, sessions, study)
    notify.route(config, sessions)
    send = _sends(sessions)[("job-succeeded", "hook")]
    [_, succeeded] = _notifications(sessions)
    told = Told(False, "http://127.0.0.1:9/hook answered HTTP 404 Not Found", permanent=True)
    assert notify._record(sessions, send.id, told, config.notify[0], succeeded) == NotifyState.FAILED


def test_config_checks_the_targets(tmp_path: Path):
    def load(text: str):
        folder = tmp_path / str(abs(hash(text)))
        folder.mkdir()
        return node_config(folder, extra=text)

    with pytest.raises(ConfigError, match="a webhook needs url"):
        load('[[notify]]\nname = "x"\n')
    with pytest.raises(ConfigError, match="needs host and port"):
        load('[[notify]]\nname = "x"\ntype = "hl7"\nhost = "ris"\n')
    with pytest.raises(ConfigError, match="events can only be"):
        load('[[notify]]\nname = "x"\ntype = "hl7"\nhost = "ris"\nport = 2575\nevents = ["job-failed"]\n')
    with pytest.raises(ConfigError, match="Authorization header goes in authorization_file"):
        load('[[notify]]\nname = "x"\nurl = "http://h/x"\nheaders = { Authorization = "Bearer x" }\n')
    with pytest.raises(ConfigError, match="unknown destination"):
        load('[[notify]]\nname = "x"\nurl = "http://h/x"\ndestinations = ["nowhere"]\n')
    with pytest.raises(ConfigError, match="unknown key"):
        load('[[notify]]\nname = "x"\nurl = "http://h/x"\nretries = 3\n')
    config = load('[[notify]]\nname = "x"\nurl = "https://h/x"\nauthorization_file = "token"\n'
                  '[[notify]]\nname = "r"\ntype = "hl7"\nhost = "ris"\nport = 2575\n')
    assert config.notify[0].authorization_file == config.source.parent / "token"
    assert config.notify[0].wanted == [NotifyEvent.JOB_SUCCEEDED, NotifyEvent.JOB_FAILED, NotifyEvent.HELD_FOR_REVIEW,
                                       NotifyEvent.DELIVERY_FAILED, NotifyEvent.RESULTS_CONFIRMED]
    assert config.notify[1].wanted == [NotifyEvent.RESULTS_CONFIRMED]


def test_the_review_gate_tells_held_and_rejected_jobs(config, sessions, study):
    job_id = enqueue(sessions, study, "demo-petct", RetryPolicy())
    job = claim(sessions, "w1", timedelta(minutes=10))
    assert job is not None and job.id == job_id
    assert review.hold(sessions, job_id, "w1", "results held for review: 3 lesions")
    [held] = _notifications(sessions)
    assert (held.kind, held.state, held.reason) == ("held-for-review", "awaiting-review",
                                                    "results held for review: 3 lesions")
    notify.route(config, sessions)
    assert sorted(_sends(sessions)) == [("held-for-review", "hook")]  # the default events; not the ORU, not hook-phi
    with sessions() as session:
        job = session.get(Job, job_id)
    said = notify.payload(config, sessions, held, job, config.notify[0])
    assert (said["event"], said["state"], said["results"]) == ("held-for-review", "awaiting-review", None)
    review.reject(sessions, job_id, "Dr Who", "motion artefact")
    rejected = _notifications(sessions)[-1]
    assert (rejected.kind, rejected.state) == ("job-failed", "rejected")
    assert rejected.reason == "results rejected at review by Dr Who: motion artefact"
