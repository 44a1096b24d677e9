"""Prometheus metrics of the node, served by `dicomnode serve` at /metrics when `[node]
metrics_port` is set (bound to `metrics_bind`, 127.0.0.1 by default).

The node runs in two processes (the receiver in `serve`, the models in the worker child), so
whatever the worker does is read from the database at scrape time: jobs by state, studies
completed, failed delivery tries and inference seconds (from the data of the jobs' events). The receiver
counts in its own process: instances stored or refused, associations rejected. Free disk
space is measured at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from sqlalchemy import distinct, func, select
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config
from dicomnode.net.receiver import ReceiverCounters
from dicomnode.pipeline import notify
from dicomnode.store import diskspace
from dicomnode.store.events import EventKind, event_data
from dicomnode.store.tables import Delivery, DeliveryState, Event, Job, JobState


class DatabaseCollector(Collector):
    """Metrics computed from the database and the disk at each scrape."""

    def __init__(self, config: Config, sessions: sessionmaker) -> None:
        self.config = config
        self.sessions = sessions

    def collect(self):  # noqa: ANN201 - metric families
        with self.sessions() as session:
            by_state = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            completed = session.scalar(
                select(func.count(distinct(Job.study_uid))).where(Job.state == JobState.SUCCEEDED)
            )
            failures = session.scalar(
                select(func.count()).select_from(Event).where(Event.kind == EventKind.DELIVERY_FAILED)
            )
            deliveries = dict(session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
            unconfirmed = session.scalar(
                select(func.count()).select_from(Event).where(Event.kind == EventKind.UNCONFIRMED)
            )
            notifications = notify.counts_by_state(session)
            notify_failures = notify.failed_tries(session)
            inference = [
                event_data(data)["seconds"]
                for data in session.scalars(
                    select(Event.data).where(Event.kind == EventKind.INFERENCE_DONE, Event.data.is_not(None))
                )
            ]
        jobs = GaugeMetricFamily("dicomnode_jobs", "Jobs by state", labels=["state"])
        for state in dict.fromkeys([*JobState, *by_state]):
            jobs.add_metric([state], by_state.get(state, 0))
        yield jobs
        yield CounterMetricFamily("dicomnode_studies_completed", "Studies with a succeeded job", value=completed)
        yield CounterMetricFamily(
            "dicomnode_delivery_failures", "Failed C-STORE tries of result objects", value=failures
        )
        states = GaugeMetricFamily(
            "dicomnode_deliveries",
            "Result object deliveries by state: sent (stored, no confirmation asked), confirming, confirmed "
            "(committed or found by the destination), pending, failed, ...",
            labels=["state"],
        )
        for state in dict.fromkeys([*DeliveryState, *deliveries]):
            states.add_metric([state], deliveries.get(state, 0))
        yield states
        yield CounterMetricFamily(
            "dicomnode_delivery_confirmation_failures",
            "Result objects a destination did not confirm (not committed, not found, no report in time)",
            value=unconfirmed,
        )
        told = GaugeMetricFamily("dicomnode_notifications", "Notifications to [[notify]] targets by state: "
                                 "pending, sending, sent, failed (given up)", labels=["state"])
        for state, count in notifications.items():
            told.add_metric([state], count)
        yield told
        yield CounterMetricFamily(
            "dicomnode_notification_failures",
            "Failed tries to tell a [[notify]] target (webhook or RIS): no answer, an error, a refusal",
            value=notify_failures,
        )
        yield SummaryMetricFamily(
            "dicomnode_inference_seconds",
            "Model inference time of each job run",
            count_value=len(inference),
            sum_value=sum(inference),
        )
        space = diskspace.measure(self.config.node.data_dir, self.config.node)
        yield GaugeMetricFamily(
            "dicomnode_disk_free_bytes", "Free space of the data folder's file system", value=space.free_bytes
        )
        yield GaugeMetricFamily(
            "dicomnode_disk_free_limit_bytes", "Free space below which instances are refused", value=space.limit_bytes
        )


class Metrics:
    """The registry `serve` exposes: the receiver's counters and the database collector."""

    def __init__(self, config: Config, sessions: sessionmaker) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.receiver = ReceiverCounters(self.registry)
        self.registry.register(DatabaseCollector(config, sessions))
        self._server = None

    def start(self) -> int | None:
        """Serve /metrics when configured; return the port, or None when metrics are off."""
        port = self.config.node.metrics_port
        if port is None:
            return None
        self._server, _thread = start_http_server(port, self.config.node.metrics_bind, registry=self.registry)
        return self._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
