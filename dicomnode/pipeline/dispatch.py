"""Delivering a job's result objects: each object to each destination as its own delivery
(dicomnode.pipeline.delivery keeps their state), sent by dicomnode.net.sender (C-STORE) or
dicomnode.net.stow (STOW-RS, a destination with a url) through dicomnode.net.outbound; an object a
destination refuses for good is replaced by the destination's fallback, sent in the same pass.

A destination with `verify` confirms what it stored (dicomnode.net.verify): "query" lists the
study (C-FIND / QIDO-RS) right after the pass; "commitment" opens a transaction, sends the
N-ACTION and waits up to verify_wait_seconds for its report, then leaves the deliveries
`confirming` until the report comes (it wakes the job) or verify_timeout_seconds pass."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config, Destination, VerifyMethod
from dicomnode.net.outbound import store_each
from dicomnode.net.retrieve import SourceError
from dicomnode.net.sender import Outcome
from dicomnode.net.verify import missing_by_query, request_commitment
from dicomnode.pipeline import delivery, notify
from dicomnode.pipeline.errors import DeliveryPending, JobError
from dicomnode.pipeline.queue import RetryPolicy
from dicomnode.results.writer import RESULT_FILES, RESULT_KINDS
from dicomnode.store import commitments
from dicomnode.store.tables import Delivery, DeliveryState, Job, utcnow

log = logging.getLogger("dicomnode.processing")  # the name it had before the split: journald filters use it


TRIES_PER_PASS = 2  # C-STORE or STOW-RS tries of one object in one delivery pass (a lost response is retried at once)


def fallback_for(
    sessions: sessionmaker, job: Job, out: Path, refused: Delivery, outcome: Outcome, destination: Destination | None,
    policy: RetryPolicy,
) -> int | None:
    """The destination refused `refused`'s SOP class for good (no presentation context for it, or
    0x0122): its fallback object (written with the results, see results_needed) is planned to it
    as a further delivery of the same job and `refused` becomes replaced. Returns the fallback
    delivery's id; None when there is no fallback (none configured, or the refused object is it)."""
    if destination is None or destination.fallback is None or not outcome.sop_class_refused:
        return None
    fallback = out / RESULT_FILES[destination.fallback]
    if Path(refused.path).name == fallback.name:
        return None
    return delivery.replace(sessions, refused.id, fallback, policy, study_uid=job.study_uid)


def deliver(config: Config, sessions: sessionmaker, job: Job, out: Path) -> str:
    """Send each destination its outputs (by default seg.dcm, then sr.dcm), each object to each
    destination as its own delivery (dicomnode.pipeline.delivery) with its own retries; an object refused
    for good is replaced by the destination's fallback, sent in the same pass. Returns a summary
    when every delivery is sent or replaced; raises DeliveryPending while some wait for their
    backoff, and JobError (not retryable: the deliveries did their retrying) naming the
    destination and the object once none is pending and one failed."""
    settings = config.model(job.model)
    policy = RetryPolicy.for_deliveries(config.node)
    destinations = {d.name: d for d in config.destinations_for(settings)}
    verifying = frozenset(d.name for d in destinations.values() if d.verify != VerifyMethod.NONE)
    for destination in destinations.values():
        files = [out / RESULT_FILES[kind] for kind in destination.outputs if kind in RESULT_KINDS]  # not STATUS
        delivery.plan(sessions, job.id, job.study_uid, files, [destination.name], policy)
    delivery.apply_reports(sessions, job.id, policy, study_uid=job.study_uid)  # reports that came meanwhile
    fallbacks = send_pass(config, sessions, job, out, destinations, delivery.due(sessions, job.id), policy)
    if fallbacks:  # planned just now: sent at once, not after a trip through the queue
        send_pass(
            config,
            sessions,
            job,
            out,
            destinations,
            [d for d in delivery.due(sessions, job.id) if d.id in fallbacks],
            policy,
        )
    for name in sorted(verifying):
        _verify(config, sessions, job, destinations[name], policy)
    notify.results_confirmed(sessions, job, verifying)  # once per destination whose objects all arrived
    summary = delivery.summary(sessions, job.id, verifying)
    if summary.pending:
        why = "; ".join(summary.waiting) or "not tried yet"
        raise DeliveryPending(f"{summary.pending} of {summary.total} deliveries pending: {why}", summary.next_due)
    if summary.failed:
        raise JobError("delivery failed: " + "; ".join(summary.failed), retryable=False)
    replaced = f"; replaced by the destination's fallback: {'; '.join(summary.replaced)}" if summary.replaced else ""
    confirmed = f" ({summary.confirmed} confirmed by the destination)" if summary.confirmed else ""
    return (f"{summary.sent + summary.confirmed} objects delivered to {len(destinations)} destinations"
            f"{confirmed}{replaced}")


def _verify(config: Config, sessions: sessionmaker, job: Job, destination: Destination, policy: RetryPolicy) -> None:
    """Ask `destination` to confirm the deliveries it stored in this pass (or an earlier one that
    ended before it asked): by a query at once, or by a storage commitment request."""
    items = delivery.sent_to(sessions, job.id, destination.name)
    if not items:
        return
    timeout = config.node.network_timeout_seconds
    if destination.verify == VerifyMethod.QUERY:
        try:
            missing = missing_by_query(destination, config.node.ae_title, job.study_uid,
                                       [d.sop_instance_uid for d in items], timeout)
        except SourceError as exc:
            for item in items:
                delivery.unconfirmed(sessions, item.id, f"not confirmed by query: {exc}", policy,
                                     study_uid=job.study_uid)
            return
        how = "C-FIND" if not destination.is_dicomweb else "QIDO-RS"
        for item in items:
            if item.sop_instance_uid in missing:
                state = delivery.unconfirmed(sessions, item.id, f"not found on {destination.name} by {how} after it "
                                             "was stored (missing)", policy, study_uid=job.study_uid)
            else:
                state = delivery.confirm(sessions, item.id, f"found on {destination.name} by {how}",
                                         study_uid=job.study_uid)
            log.info("job %d: %s: %s", job.id, delivery.describe(item), state)
        return
    transaction_uid = generate_uid(prefix=None)  # 2.25.<a UUID>: unique without an org root
    delivery.commitment_requested(sessions, job.id, destination.name, transaction_uid, [d.id for d in items],
                                  utcnow() + timedelta(seconds=destination.verify_timeout_seconds),
                                  study_uid=job.study_uid)

    def on_report(report: commitments.Report) -> None:  # on the request's own association
        commitments.record_report(sessions, report, destination.ae_title)

    def reported() -> bool:
        with sessions() as session:
            return bool(commitments.reports(session, {transaction_uid}))

    error = request_commitment(destination, config.node.ae_title, transaction_uid,
                               [(d.sop_class_uid, d.sop_instance_uid) for d in items], timeout=timeout,
                               on_report=on_report, reported=reported, wait=destination.verify_wait_seconds)
    if error is not None:
        log.warning("job %d: %s", job.id, error)
        for item in items:
            delivery.unconfirmed(sessions, item.id, error, policy, study_uid=job.study_uid)
        return
    delivery.apply_reports(sessions, job.id, policy, study_uid=job.study_uid)


def send_pass(
    config: Config,
    sessions: sessionmaker,
    job: Job,
    out: Path,
    destinations: dict[str, Destination],
    items: list[Delivery],
    policy: RetryPolicy,
    with_fallbacks: bool = True,
) -> set[int]:
    """One pass over due deliveries, destination by destination: send, record each outcome, plan
    fallbacks for objects refused for good (unless not `with_fallbacks`: the status SR has none).
    Returns the fallback deliveries planned."""
    by_destination: dict[str, list[Delivery]] = {}
    for item in items:
        by_destination.setdefault(item.destination, []).append(item)
    fallbacks = set()
    for name, batch in by_destination.items():
        destination = destinations.get(name)
        outcomes = _store(config, destination, name, batch)
        for item in batch:
            outcome = outcomes[item.id]
            state = delivery.record(sessions, item.id, outcome, policy, study_uid=job.study_uid)
            log.info(
                "job %d: %s: %s", job.id, delivery.describe(item), state if outcome.ok else f"{state}, {outcome.error}"
            )
            planned = (
                fallback_for(sessions, job, out, item, outcome, destination, policy)
                if state == DeliveryState.FAILED and with_fallbacks
                else None
            )
            if planned is not None:
                fallbacks.add(planned)
    return fallbacks


def _tries_this_pass(item: Delivery) -> int:
    """C-STORE tries of one object in this pass: TRIES_PER_PASS, fewer when its attempts run out."""
    if item.max_attempts is None:
        return TRIES_PER_PASS
    return max(min(TRIES_PER_PASS, item.max_attempts - item.attempts), 1)


def _store(config: Config, destination: Destination | None, name: str, items: list[Delivery]) -> dict[int, Outcome]:
    """C-STORE the deliveries' files to one destination; an outcome per delivery id."""
    outcomes: dict[int, Outcome] = {}
    sendable = []
    for item in items:
        path = Path(item.path)
        if destination is None:
            outcomes[item.id] = Outcome(
                path,
                item.sop_instance_uid,
                item.sop_class_uid,
                0,
                None,
                f"destination {name} is no longer configured",
                permanent=True,
            )
        elif not path.is_file():
            outcomes[item.id] = Outcome(
                path, item.sop_instance_uid, item.sop_class_uid, 0, None, f"result file {path} is gone", permanent=True
            )
        else:
            sendable.append(item)
    if sendable:
        tries = {Path(i.path): _tries_this_pass(i) for i in sendable}
        sent = store_each(
            destination,
            list(tries),
            config.node.ae_title,
            timeout=config.node.network_timeout_seconds,
            tries_per_instance=tries,
        )
        outcomes.update({item.id: outcome for item, outcome in zip(sendable, sent)})
    return outcomes
