"""The index: which instances, series and studies the node holds, and when they arrived."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.store.events import EventKind, log_event
from dicomnode.store.files import fsync_dir
from dicomnode.store.tables import Instance, Series, Study, utcnow

log = logging.getLogger("dicomnode.receiver")


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


def add_instances(session: Session, items: list[ReceivedInstance], now: datetime) -> list[bool]:
    """add_instance for each of `items` in order, in a few statements for the whole batch (one
    lookup, one write per study and per series, the instance rows together): the deferred index
    writer's batches. A batch naming one SOP Instance UID twice is indexed one by one."""
    uids = [item.sop_instance_uid for item in items]
    if len(set(uids)) != len(uids):
        return [add_instance(session, item, now) for item in items]
    instances, studies, series = Instance.__table__, Study.__table__, Series.__table__
    held: dict[str, tuple[str, str]] = {}
    for start in range(0, len(uids), 500):
        held.update((row[0], (row[1], row[2])) for row in session.execute(
            select(instances.c.sop_instance_uid, instances.c.study_uid, instances.c.series_uid)
            .where(instances.c.sop_instance_uid.in_(uids[start:start + 500]))))
    answers = [held.get(item.sop_instance_uid) != (item.study_uid, item.series_uid) for item in items]
    for item, new in zip(items, answers, strict=True):
        if not new:  # held already, in the same series: its path only
            session.execute(update(instances).where(instances.c.sop_instance_uid == item.sop_instance_uid)
                            .values(path=item.path))
    fresh = [item for item, new in zip(items, answers, strict=True) if new]
    for study_uid in dict.fromkeys(item.study_uid for item in fresh):
        mine = [item for item in fresh if item.study_uid == study_uid]
        values: dict = {"instances_received": studies.c.instances_received + len(mine)}
        if any(item.counts_as_arrival for item in mine):
            values["last_received_at"] = now
        if session.execute(update(studies).where(studies.c.study_uid == study_uid).values(**values)).rowcount == 0:
            session.execute(insert(studies).values(study_uid=study_uid, first_received_at=now, last_received_at=now,
                                                   instances_received=len(mine)))
            log_event(session, EventKind.STUDY_RECEIVED, f"first instance from {mine[0].calling_aet}",
                      study_uid=study_uid, at=now)
    for first in {item.series_uid: item for item in reversed(fresh)}.values():
        if session.execute(update(series).where(series.c.series_uid == first.series_uid)
                           .values(last_received_at=now)).rowcount == 0:
            session.execute(insert(series).values(series_uid=first.series_uid, study_uid=first.study_uid,
                                                  modality=first.modality, series_number=first.series_number,
                                                  description=first.series_description[:64], last_received_at=now))
    rows = [{"sop_instance_uid": item.sop_instance_uid, "series_uid": item.series_uid, "study_uid": item.study_uid,
             "sop_class_uid": item.sop_class_uid, "transfer_syntax_uid": item.transfer_syntax_uid, "path": item.path,
             "calling_aet": item.calling_aet, "received_at": now} for item in fresh]
    new_rows = [row for row in rows if row["sop_instance_uid"] not in held]
    if new_rows:
        session.execute(insert(instances), new_rows)
    for row in rows:
        if row["sop_instance_uid"] in held:  # held in another series or study: it moves
            session.execute(update(instances).where(instances.c.sop_instance_uid == row["sop_instance_uid"])
                            .values(**{k: v for k, v in row.items() if k != "sop_instance_uid"}))
    return answers


class IndexWriter:
    """Group commit for the receiver: every association thread queues its instance (already fsynced
    into the spool under a temporary name and renamed) and then takes its turn as the committer:
    the committer takes all that are queued, fsyncs each spool folder they were renamed into once,
    indexes them all in one transaction and commits (one database sync for the batch); only then
    are they answered, each with record_instance's answer or its error. A thread whose instance was
    committed by another's turn returns at once. With one association a batch is one instance and
    no thread is handed anything; with several, they share the syncs and no two connections ever
    contend for SQLite's write lock. A batch that fails is indexed again one instance per
    transaction, so one bad row fails only its own instance.

    `deferred` (the receiver's): the instance is answered once its folder is fsynced (the file is
    then durable under its final name), and its row is written by a thread of this writer, in
    batches of what came meanwhile (add_instances), a moment later. Whatever was acknowledged and
    is not indexed when the process dies is indexed at the next start from the spool alone
    (dicomnode.net.recovery). `record` then answers None; `flush` waits for the rows.

    `forward` (a receiving process's, dicomnode.net.receive_processes): deferred, and each row is
    given to `forward` (sent to serve's writer, which `take_rows` them) instead of this writer's
    thread; an error there fails that row's instance."""

    RETRY_SECONDS = 1.0  # a batch the database refused is tried again after this (doubling, at most 30 s)
    GATHER_SECONDS = 0.05  # deferred: rows gathered this long before a batch (they are durable already)

    def __init__(self, sessions: sessionmaker, deferred: bool = False,
                 forward: Callable[[list[ReceivedInstance]], None] | None = None) -> None:
        self.sessions = sessions
        self.deferred = deferred or forward is not None
        self._forward = forward
        self._pending: list[tuple[ReceivedInstance, Path | None, Future]] = []
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._rows: list[ReceivedInstance] = []  # deferred: acknowledged, not yet indexed
        self._rows_changed = threading.Condition()
        self._writing = 0  # rows taken by the thread and not yet committed
        self._thread: threading.Thread | None = None
        self._closing = False

    def record(self, item: ReceivedInstance, folder: Path | None = None) -> bool | None:
        """Index `item` (after fsyncing `folder`, where its file was renamed); record_instance's
        answer once committed, or its error (deferred: None once the folder is fsynced)."""
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
        if self._forward is not None:  # one row at a time: each instance answered by its own row's fate
            for item, _, done in batch:
                try:
                    self._forward([item])
                except Exception as exc:  # noqa: BLE001 - not indexed, nor to be: the caller answers 0xA700
                    done.set_exception(exc)
                else:
                    done.set_result(None)
            return
        if self.deferred:
            self.take_rows([item for item, _, _ in batch])
            for _, _, done in batch:
                done.set_result(None)
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

    # -- deferred: the index thread -----------------------------------------------------------
    def take_rows(self, items: list[ReceivedInstance]) -> None:
        """Rows of acknowledged instances, for this writer's thread to index (in its next batch)."""
        with self._rows_changed:
            self._rows.extend(items)
            if self._thread is None:
                self._closing = False
                self._thread = threading.Thread(target=self._index_rows, name="index-writer", daemon=True)
                self._thread.start()
            self._rows_changed.notify_all()

    def _index_rows(self) -> None:
        delay = self.RETRY_SECONDS
        while True:
            with self._rows_changed:
                while not self._rows and not self._closing:
                    self._rows_changed.wait()
                closing = self._closing
            if not closing:  # one transaction for what comes meanwhile: a row alone costs as much as a batch
                time.sleep(self.GATHER_SECONDS)
            with self._rows_changed:
                if not self._rows:
                    self._thread = None
                    self._rows_changed.notify_all()
                    return
                batch, self._rows = self._rows[:1000], self._rows[1000:]
                self._writing = len(batch)
            failed = self._index_batch(batch)
            with self._rows_changed:
                self._writing = 0
                if failed:
                    self._rows[:0] = failed
                self._rows_changed.notify_all()
                if failed and not self._closing:
                    self._rows_changed.wait(delay)
                    delay = min(2 * delay, 30.0)
                elif failed:  # closing: what is left is indexed at the next start
                    log.error("%d acknowledged instances not indexed at stop; the next start indexes them "
                              "from the spool", len(self._rows))
                    self._rows = []
                else:
                    delay = self.RETRY_SECONDS

    def _index_batch(self, batch: list[ReceivedInstance]) -> list[ReceivedInstance]:
        """Index `batch`; those that could not be (to be tried again)."""
        now = utcnow()
        try:
            with self.sessions.begin() as session:
                add_instances(session, batch, now)
            return []
        except Exception:  # noqa: BLE001 - one at a time: a bad row fails alone
            failed = []
            for item in batch:
                try:
                    record_instance(self.sessions, item, now)
                except Exception as exc:  # noqa: BLE001 - the database refused: tried again later
                    log.error("could not index instance %s of study %s (acknowledged, in the spool): %s; "
                              "trying again", item.sop_instance_uid, item.study_uid, exc)
                    failed.append(item)
            return failed

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row handed over is committed (or given up at close); False on timeout."""
        with self._rows_changed:
            return self._rows_changed.wait_for(lambda: not self._rows and not self._writing, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Index what is queued (trying once more what fails), then stop the thread."""
        with self._rows_changed:
            self._closing = True
            self._rows_changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)


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
