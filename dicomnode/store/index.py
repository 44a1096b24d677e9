"""The index: which instances, series and studies the node holds, and when they arrived."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.store.events import EventKind, log_event
from dicomnode.store.files import fsync_dir
from dicomnode.store.tables import Instance, Series, Study, utcnow


@dataclass(frozen=True)
class ReceivedInstance:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    series_number: int | None
    series_description: str
    path: str
    calling_aet: str
    # False for a class no model reads (a dose report, the node's own SEG sent back): it is indexed,
    # but the study's arrival time stays, so it never starts a job nor makes a late arrival
    counts_as_arrival: bool = True


def record_instance(sessions: sessionmaker, item: ReceivedInstance, now: datetime | None = None) -> bool:
    """Index one stored instance in its own transaction; True when it is new. An instance the node
    holds already (the same SOP Instance UID in the same series: a sender that sends a study again
    after a lost response or an outage) is no news: its row stays, and the study's arrival time does
    not move, so a resend after a job was queued never makes a second run."""
    with sessions.begin() as session:
        return add_instance(session, item, now or utcnow())


def add_instance(session: Session, item: ReceivedInstance, now: datetime) -> bool:
    """record_instance's work inside `session`'s transaction (IndexWriter puts several in one), in
    SQL statements rather than ORM objects: a lookup and two or three writes per instance, the
    receiver's largest cost once the ORM's was gone (bench/profile_receive.py)."""
    instances, studies, series = Instance.__table__, Study.__table__, Series.__table__
    held = session.execute(select(instances.c.study_uid, instances.c.series_uid)
                           .where(instances.c.sop_instance_uid == item.sop_instance_uid)).first()
    if held is not None and tuple(held) == (item.study_uid, item.series_uid):
        session.execute(update(instances).where(instances.c.sop_instance_uid == item.sop_instance_uid)
                        .values(path=item.path))
        return False
    study_values: dict = {"instances_received": studies.c.instances_received + 1}
    if item.counts_as_arrival:
        study_values["last_received_at"] = now
    study_row = update(studies).where(studies.c.study_uid == item.study_uid).values(**study_values)
    if session.execute(study_row).rowcount == 0:
        session.execute(insert(studies).values(study_uid=item.study_uid, first_received_at=now, last_received_at=now,
                                               instances_received=1))
        log_event(
            session,
            EventKind.STUDY_RECEIVED,
            f"first instance from {item.calling_aet}",
            study_uid=item.study_uid,
            at=now,
        )
    if session.execute(update(series).where(series.c.series_uid == item.series_uid)
                       .values(last_received_at=now)).rowcount == 0:
        session.execute(insert(series).values(series_uid=item.series_uid, study_uid=item.study_uid,
                                              modality=item.modality, series_number=item.series_number,
                                              description=item.series_description[:64], last_received_at=now))
    row = {"series_uid": item.series_uid, "study_uid": item.study_uid, "sop_class_uid": item.sop_class_uid,
           "transfer_syntax_uid": item.transfer_syntax_uid, "path": item.path, "calling_aet": item.calling_aet,
           "received_at": now}
    if held is None:
        session.execute(insert(instances).values(sop_instance_uid=item.sop_instance_uid, **row))
    else:  # held in another series or study: it moves, as session.merge did
        session.execute(update(instances).where(instances.c.sop_instance_uid == item.sop_instance_uid).values(**row))
    return True


class IndexWriter:
    """Group commit for the receiver: every association thread queues its instance (already fsynced
    into the spool under a temporary name and renamed) and then takes its turn as the committer:
    the committer takes all that are queued, fsyncs each spool folder they were renamed into once,
    indexes them all in one transaction and commits (one database sync for the batch); only then
    are they answered, each with record_instance's answer or its error. A thread whose instance was
    committed by another's turn returns at once. With one association a batch is one instance and
    no thread is handed anything; with several, they share the syncs and no two connections ever
    contend for SQLite's write lock. A batch that fails is indexed again one instance per
    transaction, so one bad row fails only its own instance."""

    def __init__(self, sessions: sessionmaker) -> None:
        self.sessions = sessions
        self._pending: list[tuple[ReceivedInstance, Path | None, Future]] = []
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()

    def record(self, item: ReceivedInstance, folder: Path | None = None) -> bool:
        """Index `item` (after fsyncing `folder`, where its file was renamed); record_instance's
        answer once committed, or its error."""
        done: Future = Future()
        with self._queue_lock:
            self._pending.append((item, folder, done))
        with self._commit_lock:
            if not done.done():  # no other thread's turn took it: this one commits what is queued
                with self._queue_lock:
                    batch, self._pending = self._pending, []
                try:
                    self._write(batch)
                finally:  # never leave another thread waiting for an answer
                    for _, _, waiting in batch:
                        if not waiting.done():
                            waiting.set_exception(RuntimeError("the index write was interrupted"))
        return done.result()

    def _write(self, batch: list[tuple[ReceivedInstance, Path | None, Future]]) -> None:
        try:
            for folder in dict.fromkeys(folder for _, folder, _ in batch if folder is not None):
                fsync_dir(folder)
        except OSError as exc:
            for _, _, done in batch:
                done.set_exception(exc)
            return
        now = utcnow()
        try:
            with self.sessions.begin() as session:
                answers = [add_instance(session, item, now) for item, _, _ in batch]
        except Exception:  # noqa: BLE001 - one at a time below: each instance gets its own answer
            for item, _, done in batch:
                try:
                    done.set_result(record_instance(self.sessions, item, now))
                except Exception as exc:  # noqa: BLE001 - the caller answers 0xA700
                    done.set_exception(exc)
            return
        for (_, _, done), answer in zip(batch, answers, strict=True):
            done.set_result(answer)


@dataclass(frozen=True)
class SeriesSummary:
    series_uid: str
    modality: str
    series_number: int | None
    description: str
    instances: int
    last_received_at: datetime


def series_of_study(session: Session, study_uid: str) -> list[SeriesSummary]:
    rows = session.execute(
        select(Series, func.count(Instance.sop_instance_uid))
        .join(Instance, Instance.series_uid == Series.series_uid)
        .where(Series.study_uid == study_uid)
        .group_by(Series.series_uid)
        .order_by(Series.series_number, Series.series_uid)
    ).all()
    return [
        SeriesSummary(s.series_uid, s.modality, s.series_number, s.description, n, s.last_received_at) for s, n in rows
    ]


def instance_paths(session: Session, series_uid: str) -> list[str]:
    return list(session.scalars(select(Instance.path).where(Instance.series_uid == series_uid)))


def held_instances(session: Session, sop_instance_uids: list[str] | set[str]) -> set[str]:
    """Those of `sop_instance_uids` the index holds (in batches: a study may have thousands)."""
    uids, held = list(sop_instance_uids), set()
    for start in range(0, len(uids), 500):
        held.update(session.scalars(
            select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(uids[start:start + 500]))))
    return held
