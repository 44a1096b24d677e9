"""The facts of a received study: its series from the index, each instance's header facts read
from its spooled file (dicomnode.imaging.headers, cached). A file that cannot be read is kept
with the reason, so its series gets the verdict "unreadable instance ...". Instances of a class
no model reads (dicomnode.imaging.sopclasses) are counted, not read; a series that is one of the
node's own results (its SOP Instance UIDs are deliveries of a job of this study) says which job.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.imaging.headers import FactsError, SeriesFacts, read_facts
from dicomnode.imaging.sopclasses import is_input
from dicomnode.store.tables import Delivery, Instance, Job, Series


def series_from_index(session: Session, study_uid: str) -> list[SeriesFacts]:
    """A received study's series, facts read from the spooled files (cached)."""
    rows = session.execute(
        select(Instance.series_uid, Instance.sop_instance_uid, Instance.path, Instance.sop_class_uid)
        .where(Instance.study_uid == study_uid)
    ).all()
    indexed = {s.series_uid: s for s in session.scalars(select(Series).where(Series.study_uid == study_uid))}
    by_series: dict[str, SeriesFacts] = {}
    results: dict[str, int] | None = None  # SOP Instance UID -> job, read once when needed
    for series_uid, sop_uid, path, sop_class in rows:
        s = by_series.get(series_uid)
        if s is None:
            row = indexed.get(series_uid)
            s = by_series[series_uid] = SeriesFacts(
                series_uid, [], last_received_at=row.last_received_at if row else None,
                indexed_modality=row.modality if row else "", indexed_number=row.series_number if row else None,
                indexed_description=row.description if row else "", indexed_sop_class=sop_class,
            )
        if not is_input(sop_class):
            s.stored_only += 1
            if results is None:
                results = _node_results(session, study_uid)
            s.node_result_of = s.node_result_of or results.get(sop_uid)
            continue
        try:
            s.instances.append(read_facts(path))
        except FactsError as exc:
            s.unreadable.append((sop_uid, str(exc)))
    return list(by_series.values())


def _node_results(session: Session, study_uid: str) -> dict[str, int]:
    """The SOP Instance UIDs of the results this node made for the study's jobs -> job id."""
    rows = session.execute(
        select(Delivery.sop_instance_uid, Delivery.job_id).join(Job, Job.id == Delivery.job_id)
        .where(Job.study_uid == study_uid)
    ).all()
    return {uid: job for uid, job in rows}
