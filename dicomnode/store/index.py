"""The index: which instances, series and studies the node holds, and when they arrived."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.store.events import EventKind, log_event
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
    """Index one stored instance; True when it is new. An instance the node holds already (the
    same SOP Instance UID in the same series: a sender that sends a study again after a lost
    response or an outage) is no news: its row stays, and the study's arrival time does not move,
    so a resend after a job was queued never makes a second run."""
    now = now or utcnow()
    with sessions.begin() as session:
        held = session.get(Instance, item.sop_instance_uid)
        if held is not None and (held.study_uid, held.series_uid) == (item.study_uid, item.series_uid):
            held.path = item.path
            return False
        study = session.get(Study, item.study_uid)
        if study is None:
            study = Study(study_uid=item.study_uid, first_received_at=now, last_received_at=now, instances_received=0)
            session.add(study)
            log_event(
                session,
                EventKind.STUDY_RECEIVED,
                f"first instance from {item.calling_aet}",
                study_uid=item.study_uid,
                at=now,
            )
        if item.counts_as_arrival:
            study.last_received_at = now
        study.instances_received += 1
        series = session.get(Series, item.series_uid)
        if series is None:
            session.add(
                Series(
                    series_uid=item.series_uid,
                    study_uid=item.study_uid,
                    modality=item.modality,
                    series_number=item.series_number,
                    description=item.series_description[:64],
                    last_received_at=now,
                )
            )
        else:
            series.last_received_at = now
        session.merge(
            Instance(
                sop_instance_uid=item.sop_instance_uid,
                series_uid=item.series_uid,
                study_uid=item.study_uid,
                sop_class_uid=item.sop_class_uid,
                transfer_syntax_uid=item.transfer_syntax_uid,
                path=item.path,
                calling_aet=item.calling_aet,
                received_at=now,
            )
        )
    return True


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
