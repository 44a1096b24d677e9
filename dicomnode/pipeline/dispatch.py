"""Delivering a job's result objects: each object to each destination as its own delivery
(dicomnode.pipeline.delivery keeps their state), sent by dicomnode.net.sender (C-STORE) or
dicomnode.net.stow (STOW-RS, a destination with a url) through dicomnode.net.outbound; an object a
destination refuses for good is replaced by the destination's fallback, sent in the same pass."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config, Destination
from dicomnode.net.outbound import store_each
from dicomnode.net.sender import Outcome
from dicomnode.pipeline import delivery
from dicomnode.pipeline.errors import DeliveryPending, JobError
from dicomnode.pipeline.queue import RetryPolicy
from dicomnode.results.writer import RESULT_FILES
from dicomnode.store.tables import Delivery, DeliveryState, Job

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
    for destination in destinations.values():
        files = [out / RESULT_FILES[kind] for kind in destination.outputs]
        delivery.plan(sessions, job.id, job.study_uid, files, [destination.name], policy)
    fallbacks = _send(config, sessions, job, out, destinations, delivery.due(sessions, job.id), policy)
    if fallbacks:  # planned just now: sent at once, not after a trip through the queue
        _send(
            config,
            sessions,
            job,
            out,
            destinations,
            [d for d in delivery.due(sessions, job.id) if d.id in fallbacks],
            policy,
        )
    summary = delivery.summary(sessions, job.id)
    if summary.pending:
        why = "; ".join(summary.waiting) or "not tried yet"
        raise DeliveryPending(f"{summary.pending} of {summary.total} deliveries pending: {why}", summary.next_due)
    if summary.failed:
        raise JobError("delivery failed: " + "; ".join(summary.failed), retryable=False)
    replaced = f"; replaced by the destination's fallback: {'; '.join(summary.replaced)}" if summary.replaced else ""
    return f"{summary.sent} objects delivered to {len(destinations)} destinations{replaced}"


def _send(
    config: Config,
    sessions: sessionmaker,
    job: Job,
    out: Path,
    destinations: dict[str, Destination],
    items: list[Delivery],
    policy: RetryPolicy,
) -> set[int]:
    """One pass over due deliveries, destination by destination: send, record each outcome, plan
    fallbacks for objects refused for good. Returns the fallback deliveries planned."""
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
                if state == DeliveryState.FAILED
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
