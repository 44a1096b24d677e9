"""The node's tables: the index (studies, series, instances), the queue (jobs, deliveries,
events) and the node's running components, with the states a job and a delivery go through.
Called "tables" rather than "models": a model is an nnU-Net model here. The schema is made and
kept up to date by the migrations (dicomnode.store.schema); dicomnode.store.engine opens it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum

from sqlalchemy import (
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from dicomnode.config import Priority


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Timestamp(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite hands them back naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime stored")
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class JobState(StrEnum):
    """A job's state (dicomnode.pipeline.queue draws the machine); stored as its value."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # [[models]] review = true: results built, nothing sent until a reader releases (then queued
    # again to deliver) or rejects them (dicomnode.pipeline.review)
    AWAITING_REVIEW = "awaiting-review"
    REJECTED = "rejected"  # rejected at review: no results sent, only the "not performed" status SR


class DeliveryState(StrEnum):
    """A delivery's state (dicomnode.pipeline.delivery draws the machine); stored as its value."""

    PENDING = "pending"
    SENT = "sent"  # stored by the destination (its C-STORE / STOW-RS answer); final unless it verifies
    CONFIRMING = "confirming"  # verify = "commitment": a storage commitment requested, its report awaited
    CONFIRMED = "confirmed"  # verified: committed by the destination's report, or found by C-FIND / QIDO-RS
    FAILED = "failed"
    REPLACED = "replaced"  # refused for good; the destination's fallback object was sent instead
    CANCELLED = "cancelled"  # its job was cancelled


class NotifyState(StrEnum):
    """A notification to one target (dicomnode.pipeline.notify draws the machine); stored as its value."""

    PENDING = "pending"  # to send, from not_before
    SENDING = "sending"  # claimed by a sender until lease_until (a sender that died: pending again after it)
    SENT = "sent"  # the target took it (webhook: 2xx; hl7: ACK with MSA-1 AA)
    FAILED = "failed"  # given up: refused for good, or max_attempts tries failed


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_received_at: Mapped[datetime] = mapped_column(Timestamp)
    last_received_at: Mapped[datetime] = mapped_column(Timestamp)
    instances_received: Mapped[int] = mapped_column(Integer, default=0)


class Series(Base):
    __tablename__ = "series"
    series_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), index=True)
    modality: Mapped[str] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    description: Mapped[str] = mapped_column(String(64), default="")
    last_received_at: Mapped[datetime] = mapped_column(Timestamp)


class Instance(Base):
    __tablename__ = "instances"
    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_uid: Mapped[str] = mapped_column(ForeignKey("series.series_uid"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    calling_aet: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(Timestamp)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)  # a JobState
    # a config.Priority: urgent jobs are claimed first, low ones only within [node] low_priority_hours
    priority: Mapped[str] = mapped_column(String(8), default=Priority.NORMAL.value,
                                          server_default=Priority.NORMAL.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    run_number: Mapped[int] = mapped_column(Integer, default=1)  # 1 for a study's first job, 2 after a re-trigger...
    not_before: Mapped[datetime] = mapped_column(Timestamp)  # retry backoff
    give_up_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)  # transient waits end here
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    started_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    # review = true: who released or rejected the results, and when (the released SR's Verifying Observer)
    reviewed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reviewed_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    # [models.compare]: a compute-only job, queued by job N to have this study as its comparison
    # prior: it runs the model and keeps its time point, and delivers nothing into this (older) study
    prior_of_job: Mapped[int | None] = mapped_column(Integer, nullable=True)

    __table_args__ = (Index("ix_jobs_claim", "state", "not_before"),)


class TimePointRow(Base):
    """[models.compare]: a time point a job kept (timepoint.npz in its result folder) and the
    patient, date and modalities it is of, by which a later study of the patient finds its prior."""

    __tablename__ = "timepoints"
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer: Mapped[str] = mapped_column(String(64), default="")  # IssuerOfPatientID, "" when not given
    study_date: Mapped[str] = mapped_column(String(8))  # YYYYMMDD
    study_time: Mapped[str] = mapped_column(String(16), default="")
    modalities: Mapped[str] = mapped_column(String(64), default="")  # the study's input modalities, "CT/PT"
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp)

    __table_args__ = (Index("ix_timepoints_patient", "patient_id", "model"),)


class Delivery(Base):
    """One result object (a file of the job's result folder) to one destination: its own state
    and retries. pending --sent--> sent; pending --attempts used up / refused for good--> failed;
    with the destination's verify: sent --> confirming --> confirmed, or pending again (dicomnode.pipeline.delivery).
    The file stays on disk and keeps its SOP Instance UID however often it is sent."""

    __tablename__ = "deliveries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)  # a DeliveryState
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # C-STORE requests (or association tries) so far
    max_attempts: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: bounded by give_up_at alone
    not_before: Mapped[datetime] = mapped_column(Timestamp)  # retry backoff
    give_up_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)  # no tries after this
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    updated_at: Mapped[datetime] = mapped_column(Timestamp)
    sent_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    # verify = "commitment": the storage commitment transaction it is in, and when its report is due
    transaction_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    confirm_by: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    confirmed_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)

    __table_args__ = (UniqueConstraint("job_id", "destination", "sop_instance_uid", name="uq_deliveries_object"),)


class Commitment(Base):
    """A storage commitment request (N-ACTION, push model) the worker sent to a destination, and
    the report (N-EVENT-REPORT) the destination sent back, on the same association or a new one
    to the receiver: whichever process got it writes it here, by Transaction UID, for the worker."""

    __tablename__ = "commitments"
    transaction_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[int] = mapped_column(Integer, index=True)
    destination: Mapped[str] = mapped_column(String(64))
    requested_at: Mapped[datetime] = mapped_column(Timestamp)
    reported_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    reported_by: Mapped[str | None] = mapped_column(String(16), nullable=True)  # the calling AE of the report
    committed: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: SOP Instance UIDs committed
    failed: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: SOP Instance UID -> Failure Reason


class Event(Base):
    """Every state change of a study or job, in order: the timeline the CLI shows."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(Timestamp, index=True)
    study_uid: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    job_id: Mapped[int | None] = mapped_column(Integer, index=True, nullable=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)  # an events.EventKind
    message: Mapped[str] = mapped_column(Text, default="")  # for people
    data: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: what other modules read (events.event_data)


class Notification(Base):
    """Something to tell the `[[notify]]` targets (a job succeeded or failed, a delivery failed for
    good, results confirmed...), written in the same transaction as the state change it tells:
    the outbox. The sender routes it once to the targets that want its kind (NotificationSend)."""

    __tablename__ = "notifications"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))  # a config.NotifyEvent
    job_id: Mapped[int | None] = mapped_column(Integer, index=True, nullable=True)
    study_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    state: Mapped[str] = mapped_column(String(16), default="")  # the job's (or the delivery's) state then
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    key: Mapped[str | None] = mapped_column(String(128), nullable=True)  # once per (kind, job, key) when given
    data: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: the destination, the object...
    routed_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True, index=True)

    __table_args__ = (UniqueConstraint("kind", "job_id", "key", name="uq_notifications_once"),)


class NotificationSend(Base):
    """One notification to one target: its own state (a NotifyState), tries and backoff. The body is
    built at the first try and kept, so every try sends the same message."""

    __tablename__ = "notification_sends"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    notification_id: Mapped[int] = mapped_column(ForeignKey("notifications.id"), index=True)
    target: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime] = mapped_column(Timestamp)
    lease_until: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    body: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    updated_at: Mapped[datetime] = mapped_column(Timestamp)
    sent_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)

    __table_args__ = (UniqueConstraint("notification_id", "target", name="uq_notification_sends_target"),)


class Component(Base):
    """A running part of the node (the receiver, a worker) and when it last said it was alive:
    what `dicomnode status` reads, as the CLI reads only the database. One row per process."""

    __tablename__ = "components"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(32))  # receiver, worker
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(Timestamp)
    last_seen_at: Mapped[datetime] = mapped_column(Timestamp)
    detail: Mapped[str] = mapped_column(Text, default="{}")  # JSON: the listening address, the models loaded...

    __table_args__ = (UniqueConstraint("name", "host", "pid", name="uq_components_process"),)
