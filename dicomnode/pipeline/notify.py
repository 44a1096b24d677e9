"""Notifications: `[[notify]]` webhooks (a JSON POST per event) and RIS (an HL7 v2.5.1 ORU^R01 over
MLLP when results are confirmed) told about jobs, through a persistent outbox.

    the pipeline --enqueue (in the transaction of the state change it tells)--> notifications
    the sender (`send_due`, every second in `dicomnode serve`'s scheduler):
        route: each new notification --> one notification_sends row per target that wants its kind
        pending --claimed (lease)--> sending --the target took it--> sent          (event notified)
                                        |--failed try, tries left--> pending after the backoff
                                        +--refused for good, or max_attempts tries--> failed
                                                                   (event notify-failed each failed try)
        sending whose lease ran out (the sender died mid-try) --> claimed again

`enqueue` is the one hook: `enqueue(session, NotifyEvent.X, job, reason=..., ...)`, callable from
anywhere in the pipeline with the session of the transaction that changes the state, so the
notification exists exactly when the change does: written once per event, and never lost or sent
twice by a restart (a try whose answer was lost is sent again with the same body: the webhook's
Idempotency-Key header, the ORU's message control ID). Nothing here raises into the pipeline and
nothing waits on a target: a target that is down or slow never holds up or fails a job or a
delivery; its failures are events of the job, in `dicomnode status` and in /metrics.

Hooks: queue.succeed (job-succeeded), queue.fail / wait / held_back (job-failed, and not-performed
when the job had no results), delivery.record / _unconfirm failed for good (delivery-failed),
dispatch.deliver (results-confirmed, once per job and destination, when every result object there
is confirmed, or sent where the destination does not verify). The review gate calls
`enqueue(session, NotifyEvent.HELD_FOR_REVIEW, job, ...)` when it holds a job's results.

Payload: see `payload` and the README (schema "dicomnode-notification/1"). No patient details
unless the target's include_patient; the accession number only with include_accession.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Config, NotifyEvent, NotifyTarget, NotifyType
from dicomnode.net import hl7v2, webhook
from dicomnode.net.webhook import Told
from dicomnode.store.events import EventKind, log_event
from dicomnode.store.tables import (
    Delivery,
    DeliveryState,
    Event,
    Instance,
    Job,
    Notification,
    NotificationSend,
    NotifyState,
    utcnow,
)

log = logging.getLogger("dicomnode.notify")

SCHEMA = "dicomnode-notification/1"
POLL_SECONDS = 1.0  # how often `serve` looks for notifications to send
MAX_PARALLEL_TARGETS = 8  # targets served side by side in one pass
STATUS_FILE = "status.dcm"  # the "not performed" status SR (dicomnode.results.writer.RESULT_FILES[STATUS])
PATIENT_TAGS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber")


# ---------------------------------------------------------------- the hook


def enqueue(session: Session, kind: NotifyEvent, job: Job, *, reason: str | None = None, state: str | None = None,
            key: str | None = None, data: dict | None = None, now: datetime | None = None) -> bool:
    """Add a notification of `kind` about `job` to `session` (written with the caller's transaction).
    `state`: the job's (default) or the delivery's state it tells; `key`: once per (kind, job, key)
    (a second call with the same key adds nothing); `data`: the destination, the object... Returns
    whether one was added."""
    kind = NotifyEvent(kind)
    if key is not None and session.scalar(select(Notification.id).where(
            Notification.kind == kind.value, Notification.job_id == job.id, Notification.key == key)) is not None:
        return False
    session.add(Notification(kind=kind.value, job_id=job.id, study_uid=job.study_uid, created_at=now or utcnow(),
                             state=str(state if state is not None else job.state), reason=reason, key=key,
                             data=json.dumps(data) if data else None))
    return True


def job_failed(session: Session, job: Job, now: datetime | None = None) -> None:
    """A job failed for good: job-failed, and not-performed when it never had results to deliver."""
    enqueue(session, NotifyEvent.JOB_FAILED, job, reason=job.error, now=now)
    had_results = any(not path.endswith(STATUS_FILE) for path in session.scalars(
        select(Delivery.path).where(Delivery.job_id == job.id)))
    if not had_results:
        enqueue(session, NotifyEvent.NOT_PERFORMED, job, reason=job.error, now=now)


def delivery_failed(session: Session, delivery: Delivery, now: datetime | None = None) -> None:
    """A result object failed for good to reach its destination."""
    job = session.get(Job, delivery.job_id)
    if job is None:
        return
    enqueue(session, NotifyEvent.DELIVERY_FAILED, job, reason=delivery.last_error, state=DeliveryState.FAILED,
            data={"destination": delivery.destination, "object": Path(delivery.path).name,
                  "sop_instance_uid": delivery.sop_instance_uid}, now=now)


def results_confirmed(sessions: sessionmaker, job: Job, verifying: frozenset[str]) -> list[str]:
    """Once per destination: every result object of `job` there is confirmed (or, where the
    destination does not verify, sent; a fallback that replaced a refused object counts as it).
    Returns the destinations told now."""
    told = []
    with sessions.begin() as session:
        rows = [d for d in session.scalars(select(Delivery).where(Delivery.job_id == job.id))
                if not d.path.endswith(STATUS_FILE)]
        by_destination: dict[str, list[Delivery]] = {}
        for d in rows:
            by_destination.setdefault(d.destination, []).append(d)
        for name, items in sorted(by_destination.items()):
            done = DeliveryState.CONFIRMED if name in verifying else DeliveryState.SENT
            live = [d for d in items if d.state != DeliveryState.REPLACED]
            if not live or any(d.state != done for d in live):
                continue
            if enqueue(session, NotifyEvent.RESULTS_CONFIRMED, job, state=done, key=name,
                       data={"destination": name, "objects": len(live), "verified": name in verifying}):
                told.append(name)
    return told


# ---------------------------------------------------------------- the sender


def route(config: Config, sessions: sessionmaker, now: datetime | None = None) -> int:
    """Give each new notification one send row per target that wants its kind; returns how many rows."""
    now = now or utcnow()
    added = 0
    with sessions.begin() as session:
        new = list(session.scalars(select(Notification).where(Notification.routed_at.is_(None))
                                   .order_by(Notification.id).limit(500)))
        for notification in new:
            data = json.loads(notification.data) if notification.data else {}
            for target in config.notify:
                if not wants(target, NotifyEvent(notification.kind), data.get("destination")):
                    continue
                session.add(NotificationSend(notification_id=notification.id, target=target.name,
                                             state=NotifyState.PENDING, attempts=0, not_before=notification.created_at,
                                             created_at=now, updated_at=now))
                added += 1
            notification.routed_at = now
    return added


def wants(target: NotifyTarget, kind: NotifyEvent, destination: str | None) -> bool:
    if kind not in target.wanted:
        return False
    return target.destinations is None or destination is None or destination in target.destinations


def send_due(config: Config, sessions: sessionmaker, now: datetime | None = None, limit: int = 100) -> int:
    """Route new notifications, then send those due, one try each (at most `limit` per target).
    Targets are served side by side, each in its own thread and its own sends one after the other,
    so a target that hangs (up to its timeout_seconds per try) holds up no other target; a target
    whose try failed is left for the rest of this pass (its other sends wait for the next one,
    their tries not counted). Returns how many were tried. Never raises: a problem is logged and
    the next pass tries again."""
    try:
        route(config, sessions, now)
        with sessions() as session:
            names = sorted(set(session.scalars(select(NotificationSend.target).where(_due(now or utcnow())))))
    except Exception:  # noqa: BLE001 - a database hiccup: the next pass tries again
        log.exception("notification pass failed; will try again")
        return 0
    if not names:
        return 0
    targets = {t.name: t for t in config.notify}
    if len(names) == 1:
        return _send_to(config, sessions, names[0], targets.get(names[0]), now, limit)
    with ThreadPoolExecutor(max_workers=min(len(names), MAX_PARALLEL_TARGETS), thread_name_prefix="notify") as pool:
        return sum(pool.map(lambda name: _send_to(config, sessions, name, targets.get(name), now, limit), names))


def _send_to(config: Config, sessions: sessionmaker, name: str, target: NotifyTarget | None, now: datetime | None,
             limit: int) -> int:
    """One target's due sends, oldest first, until one fails (or `limit`)."""
    tried = 0
    try:
        while tried < limit:
            claimed = _claim(sessions, name, target, now)
            if claimed is None:
                break
            tried += 1
            if _try(config, sessions, claimed, target, now) != NotifyState.SENT:
                break
    except Exception:  # noqa: BLE001 - a database hiccup: the next pass tries again
        log.exception("notification pass to %s failed; will try again", name)
    return tried


def _due(moment: datetime):  # noqa: ANN202 - an SQL condition
    """Sends to try now: pending from not_before, or sending with its lease run out (a sender died)."""
    return or_((NotificationSend.state == NotifyState.PENDING) & (NotificationSend.not_before <= moment),
               (NotificationSend.state == NotifyState.SENDING) & (NotificationSend.lease_until < moment))


def _claim(sessions: sessionmaker, name: str, target: NotifyTarget | None,
           now: datetime | None) -> NotificationSend | None:
    """The target's oldest due send, taken with a compare-and-set so two senders never try the same
    one at once."""
    lease = timedelta(seconds=2 * (target.timeout_seconds if target else 10.0) + 30)
    while True:
        moment = now or utcnow()
        with sessions.begin() as session:
            due = _due(moment) & (NotificationSend.target == name)
            row = session.scalar(select(NotificationSend).where(due).order_by(NotificationSend.not_before,
                                                                               NotificationSend.id).limit(1))
            if row is None:
                return None
            taken = session.execute(
                update(NotificationSend).where(NotificationSend.id == row.id, due)
                .values(state=NotifyState.SENDING, lease_until=moment + lease, updated_at=moment)
                .execution_options(synchronize_session=False)).rowcount
            if taken == 1:
                return session.get(NotificationSend, row.id, populate_existing=True)


def _try(config: Config, sessions: sessionmaker, send: NotificationSend, target: NotifyTarget | None,
         now: datetime | None) -> str:
    """One try of `send`; returns its new state."""
    with sessions() as session:
        notification = session.get(Notification, send.notification_id)
        job = session.get(Job, notification.job_id) if notification.job_id is not None else None
    if target is None:
        return _record(sessions, send.id, Told(False, f"notify target {send.target} is no longer configured", True),
                       None, notification, now)
    body = send.body
    try:
        if body is None:
            body = build_body(config, sessions, notification, job, target, send.id)
            with sessions.begin() as session:
                session.get(NotificationSend, send.id).body = body
        if target.type == NotifyType.HL7:
            import hl7  # noqa: PLC0415 - only for a RIS target

            told = hl7v2.send_oru(target, hl7.parse(body))
        else:
            told = webhook.post_json(target, body, notification.id)
    except Exception as exc:  # noqa: BLE001 - a bug or an unreadable file: a failed try, with the reason
        log.exception("notification %d to %s", notification.id, target.name)
        told = Told(False, f"{type(exc).__name__}: {exc}")
    return _record(sessions, send.id, told, target, notification, now)


def _record(sessions: sessionmaker, send_id: int, told: Told, target: NotifyTarget | None,
            notification: Notification, now: datetime | None = None) -> str:
    now = now or utcnow()
    with sessions.begin() as session:
        send = session.get(NotificationSend, send_id)
        send.attempts += 1
        send.updated_at, send.lease_until = now, None
        tally = f"attempt {send.attempts}" + (f" of {target.max_attempts}" if target else "")
        what = f"{notification.kind} to {send.target}" + (f" ({target.type})" if target else "")
        data = {"target": send.target, "event": notification.kind, "attempts": send.attempts}
        if told.ok:
            send.state, send.sent_at, send.last_error = NotifyState.SENT, now, None
            log_event(session, EventKind.NOTIFIED, f"{what}: {told.detail}, {tally}", study_uid=notification.study_uid,
                      job_id=notification.job_id, at=now, data=data)
            log.info("notification %d: %s: %s", notification.id, what, told.detail)
            return send.state
        send.last_error = told.detail
        if told.permanent or target is None or send.attempts >= target.max_attempts:
            send.state = NotifyState.FAILED
            why = "refused for good" if told.permanent or target is None else "no attempts left"
            message = f"{what}: {told.detail}; {why}, given up ({tally})"
        else:
            send.state = NotifyState.PENDING
            send.not_before = now + _delay(target, send.attempts)
            message = f"{what}: {told.detail}; {tally}, next try after {send.not_before:%H:%M:%S} UTC"
        log_event(session, EventKind.NOTIFY_FAILED, message, study_uid=notification.study_uid,
                  job_id=notification.job_id, at=now, data={**data, "given_up": send.state == NotifyState.FAILED})
        log.warning("notification %d: %s", notification.id, message)
        return send.state


def _delay(target: NotifyTarget, attempts: int) -> timedelta:
    seconds = target.backoff_seconds * 2 ** min(max(attempts - 1, 0), 30)
    return timedelta(seconds=min(seconds, target.backoff_max_seconds))


# ---------------------------------------------------------------- what is said


def build_body(config: Config, sessions: sessionmaker, notification: Notification, job: Job | None,
               target: NotifyTarget, send_id: int) -> str:
    """The body sent to `target`, built once: the JSON payload, or the ORU^R01's text."""
    said = payload(config, sessions, notification, job, target)
    if target.type == NotifyType.WEBHOOK:
        return json.dumps(said, indent=2)
    return str(hl7v2.build_oru(oru_report(said, notification, job, send_id), target, utcnow()))


def payload(config: Config, sessions: sessionmaker, notification: Notification, job: Job | None,
            target: NotifyTarget) -> dict:
    """The notification as JSON (schema "dicomnode-notification/1", see the README)."""
    data = json.loads(notification.data) if notification.data else {}
    settings = next((m for m in config.models if job is not None and m.name == job.model), None)
    said: dict = {
        "schema": SCHEMA,
        "notification_id": notification.id,
        "event": notification.kind,
        "time": _iso(notification.created_at),
        "node": config.node.ae_title,
        "job_id": notification.job_id,
        "model": job.model if job else None,
        "model_version": settings.version if settings else None,
        "run": job.run_number if job else None,
        "state": notification.state,
        "reason": notification.reason,
        "study_instance_uid": notification.study_uid,
    }
    header = _study_header(sessions, notification.study_uid) if (target.include_accession
                                                                  or target.include_patient) else {}
    if target.include_accession:
        said["accession_number"] = header.get("AccessionNumber", "")
    if target.include_patient:
        said["patient"] = {"id": header.get("PatientID", ""), "name": header.get("PatientName", ""),
                           "birth_date": header.get("PatientBirthDate", ""), "sex": header.get("PatientSex", "")}
    for name in ("destination", "object", "sop_instance_uid", "verified"):
        if name in data:
            said[name] = data[name]
    said["results"] = _results(config, job) if job is not None else None
    said.update(_counts(sessions, notification.job_id))
    return said


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _results(config: Config, job: Job) -> dict | None:
    """The job's measures (measures.json in its result folder): lesion count and totals for a model
    with a PET channel, each segment's volume otherwise; None when it has none."""
    path = config.job_folder(job.study_uid, job.id) / "measures.json"
    try:
        measures = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(measures, dict):
        lesions = measures.get("lesions") or []
        return {"lesion_count": measures.get("lesion_count"),
                "total_mtv_ml": _round(measures.get("total_mtv_ml")),
                "total_tlg_g": _round(measures.get("total_tlg_g")),
                "max_suv": _round(max((lesion["suv_max"] for lesion in lesions), default=None))}
    return {"segments": [{"name": m.get("name"), "volume_ml": _round(m.get("volume_ml")),
                          "components": m.get("components")} for m in measures]}


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 2)


def _counts(sessions: sessionmaker, job_id: int | None) -> dict:
    """Result objects of the job by outcome (the status SR left out), over every destination."""
    with sessions() as session:
        states = [state for path, state in session.execute(
            select(Delivery.path, Delivery.state).where(Delivery.job_id == job_id)) if not path.endswith(STATUS_FILE)]
    return {"objects_sent": sum(s in (DeliveryState.SENT, DeliveryState.CONFIRMED) for s in states),
            "objects_confirmed": sum(s == DeliveryState.CONFIRMED for s in states),
            "objects_failed": sum(s == DeliveryState.FAILED for s in states)}


def _study_header(sessions: sessionmaker, study_uid: str | None) -> dict[str, str]:
    """Patient and accession attributes of the study, from its first readable spooled instance."""
    with sessions() as session:
        paths = list(session.scalars(select(Instance.path).where(Instance.study_uid == study_uid)
                                     .order_by(Instance.received_at).limit(5)))
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=list(PATIENT_TAGS))
        except (OSError, InvalidDicomError):
            continue
        return {name: str(ds.get(name, "") or "") for name in PATIENT_TAGS}
    return {}


def oru_report(said: dict, notification: Notification, job: Job | None, send_id: int) -> hl7v2.ResultReport:
    """The ORU^R01's content from the payload (what it may say is what the payload says)."""
    results = said.get("results") or {}
    measures: list[hl7v2.Measure] = []
    if "lesion_count" in results:
        measures.append(hl7v2.Measure(("246206008", "SCT", "Number of lesions"), int(results["lesion_count"] or 0)))
        if results.get("total_mtv_ml") is not None:
            measures.append(hl7v2.Measure(("126032", "DCM", "Metabolic Volume"), results["total_mtv_ml"],
                                          ("ml", "UCUM", "milliliter")))
        if results.get("total_tlg_g") is not None:
            measures.append(hl7v2.Measure(("126033", "DCM", "Total Lesion Glycolysis"), results["total_tlg_g"],
                                          ("g", "UCUM", "gram")))
    for segment in results.get("segments", []):
        measures.append(hl7v2.Measure(("118565006", "SCT", "Volume"), segment["volume_ml"] or 0.0,
                                      ("ml", "UCUM", "milliliter"), str(segment["name"])))
    patient = said.get("patient")
    return hl7v2.ResultReport(
        control_id=f"DN{notification.id}-{send_id}",
        study_uid=said["study_instance_uid"] or "",
        model=said["model"] or "",
        model_version=said.get("model_version"),
        made_at=_made_at(job) or notification.created_at,
        confirmed_at=notification.created_at,
        text=summary_line(said),
        pet="lesion_count" in results,
        accession_number=said.get("accession_number") or None,
        patient=hl7v2.Patient(**{k: patient[k] for k in ("id", "name", "birth_date", "sex")}) if patient else None,
        measures=tuple(measures),
    )


def _made_at(job: Job | None) -> datetime | None:
    return job.started_at if job is not None else None


def summary_line(said: dict) -> str:
    """One line of plain words: what the model found and where the results are."""
    results = said.get("results") or {}
    if "lesion_count" in results:
        found = f"{results['lesion_count']} lesion(s)"
        if results.get("total_mtv_ml") is not None:
            found += f", total MTV {results['total_mtv_ml']:.2f} ml, total TLG {results['total_tlg_g']:.2f} g"
    elif results.get("segments"):
        found = ", ".join(f"{s['name']} {s['volume_ml']:.2f} ml" for s in results["segments"])
    else:
        found = "no measures"
    where = ""
    if said.get("destination"):
        how = "confirmed by" if said.get("verified") else "sent to"
        where = f"; {said.get('objects_sent', 0)} object(s) {how} {said['destination']}"
    return f"AI model {said.get('model')} (job {said.get('job_id')}, run {said.get('run')}): {found}{where}. " \
           "Not for diagnosis without review."


# ---------------------------------------------------------------- for status and metrics


def counts_by_state(session: Session) -> dict[str, int]:
    """Notification sends by state, every state."""
    found = dict(session.execute(select(NotificationSend.state, func.count()).group_by(NotificationSend.state)).all())
    return {state.value: found.get(state.value, 0) for state in NotifyState}


def failed_tries(session: Session) -> int:
    """Failed tries to tell a target (events notify-failed), since the database began."""
    return session.scalar(select(func.count()).select_from(Event).where(Event.kind == EventKind.NOTIFY_FAILED)) or 0

