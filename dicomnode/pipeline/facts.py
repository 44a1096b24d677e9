"""The facts of a received study: its series from the index, each instance's header facts read
from its spooled file (dicomnode.imaging.headers, cached). A file that cannot be read is kept
with the reason, so its series gets the verdict "unreadable instance ...".
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.imaging.headers import FactsError, SeriesFacts, read_facts
from dicomnode.store.tables import Instance, Series


def series_from_index(session: Session, study_uid: str) -> list[SeriesFacts]:
    """A received study's series, facts read from the spooled files (cached)."""
    rows = session.execute(
        select(Instance.series_uid, Instance.sop_instance_uid, Instance.path).where(Instance.study_uid == study_uid)
    ).all()
    indexed = {s.series_uid: s for s in session.scalars(select(Series).where(Series.study_uid == study_uid))}
    by_series: dict[str, SeriesFacts] = {}
    for series_uid, sop_uid, path in rows:
        s = by_series.get(series_uid)
        if s is None:
            row = indexed.get(series_uid)
            s = by_series[series_uid] = SeriesFacts(
                series_uid, [], last_received_at=row.last_received_at if row else None,
                indexed_modality=row.modality if row else "", indexed_number=row.series_number if row else None,
                indexed_description=row.description if row else "",
            )
        try:
            s.instances.append(read_facts(path))
        except FactsError as exc:
            s.unreadable.append((sop_uid, str(exc)))
    return list(by_series.values())
