"""Fetching a study from a `[[sources]]` entry, DICOM (dicomnode.net.retrieve) or DICOMweb
(dicomnode.net.dicomweb), and judging the retrieve against what the source announced.

A retrieve has failed, whatever status the source gave, when an announced instance of a SOP
class the node stores did not arrive: for C-GET and WADO-RS, stored by this process; for
C-MOVE, held by the index once the source's final response came (the receiver acknowledges
an instance only once it is indexed, and the source answers the C-MOVE only after its last
C-STORE sub-operation). A C-MOVE whose source counts fewer completed sub-operations than the
instances it announced has failed too, even when the node held them all before (the source
delivered nothing, whatever it says).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config, Source
from dicomnode.net.dicomweb import DicomwebSource
from dicomnode.net.receiver import InstanceStore
from dicomnode.net.retrieve import Announced, DimseSource, Progress, SourceError, StudyMatch, StudyQuery
from dicomnode.store.events import EventKind, log_event
from dicomnode.store.index import held_instances

log = logging.getLogger("dicomnode.retrieve")

__all__ = ["Announced", "FetchError", "Fetched", "SourceError", "StudyMatch", "StudyQuery", "client_for",
           "fetch_study"]


class FetchError(SourceError):
    """A retrieve that did not bring what the source announced; the message says what is missing."""


@dataclass(frozen=True)
class Fetched:
    source: str
    study_uid: str
    method: str
    announced: int  # instances the source announced
    arrived: int  # of those the node stores, how many it holds now
    not_taken: int  # announced instances of SOP classes the node does not store
    seconds: float

    def describe(self) -> str:
        skipped = f" ({self.not_taken} of SOP classes the node does not store left out)" if self.not_taken else ""
        return (f"study {self.study_uid}: {self.arrived} instances by {self.method} from {self.source} "
                f"in {self.seconds:.1f} s{skipped}")

    def as_dict(self) -> dict:
        return {"source": self.source, "study_uid": self.study_uid, "method": self.method,
                "announced": self.announced, "arrived": self.arrived, "not_taken": self.not_taken,
                "seconds": round(self.seconds, 3)}


def client_for(source: Source, config: Config) -> DimseSource | DicomwebSource:
    """The client for `source`; a C-MOVE names the node's own AE title as its destination."""
    if source.is_dicomweb:
        return DicomwebSource(source)
    return DimseSource(source, config.node.ae_title, move_destination=config.node.ae_title)


INDEX_LAG_SECONDS = 10.0  # how long a C-MOVE's acknowledged instances may take to appear in the index


def _indexed(sessions: sessionmaker, wanted: set[str]) -> set[str]:
    """Those of `wanted` the index holds, once all are or INDEX_LAG_SECONDS have passed: the
    receiver (another process) writes an instance's row just after acknowledging it."""
    deadline = time.monotonic() + INDEX_LAG_SECONDS
    while True:
        with sessions() as session:
            held = held_instances(session, wanted)
        if held >= wanted or time.monotonic() > deadline:
            return held
        time.sleep(0.05)


def fetch_study(client: DimseSource | DicomwebSource, announced: Announced, store: InstanceStore,
                sessions: sessionmaker, progress: Progress | None = None) -> Fetched:
    """Retrieve the study `announced` describes (see `announce`) and check that it all arrived;
    FetchError says what did not. The study gets a "fetched" event."""
    name = client.source.name
    wanted = announced.wanted()
    if not wanted:
        what = "no instances" if not announced.instances else "only instances of SOP classes the node does not store"
        raise FetchError(f"{name}: study {announced.study_uid}: the source announced {what}: nothing to fetch")
    started = time.monotonic()
    retrieved = client.retrieve(announced, store, progress)
    seconds = time.monotonic() - started
    if retrieved.stores_here:
        arrived = set(wanted) & retrieved.stored
    else:  # C-MOVE: the node's receiver stored them; it indexes each a moment after acknowledging it
        arrived = _indexed(sessions, set(wanted))
    missing = [uid for uid in wanted if uid not in arrived]
    if retrieved.status is None:
        said = "gave no final response"
    elif retrieved.status == 0x0000:
        said = "reported success"
    else:
        said = f"answered 0x{retrieved.status:04X}"
    counts = ""
    if retrieved.completed is not None:
        counts = (f" ({retrieved.completed} completed, {retrieved.failed or 0} failed, "
                  f"{retrieved.warning or 0} warning sub-operations)")
    problems = [retrieved.problem] if retrieved.problem else []
    if missing:
        refused = [f"{uid} {retrieved.refused[uid]}" for uid in missing if uid in retrieved.refused][:3]
        problems.append(
            f"{retrieved.method} {said}{counts} but {len(arrived)} of the {len(wanted)} announced instances "
            f"arrived ({len(missing)} missing, e.g. {missing[0]}"
            + (f"; refused by the node: {', '.join(refused)}" if refused else "") + ")")
    elif not retrieved.stores_here and retrieved.completed is not None and retrieved.completed < len(wanted):
        problems.append(f"{retrieved.method} {said}{counts} for {len(wanted)} announced instances: the source "
                        "did not send them all (those the node holds were held before)")
    if problems:
        message = f"{name}: study {announced.study_uid}: " + "; ".join(problems)
        log.error("fetch failed: %s", message)
        raise FetchError(message)
    fetched = Fetched(name, announced.study_uid, retrieved.method, len(announced.instances), len(arrived),
                      len(announced.not_taken()), seconds)
    with sessions.begin() as session:
        log_event(session, EventKind.FETCHED, f"{fetched.arrived} instances by {fetched.method} from {name}",
                  study_uid=announced.study_uid, data=fetched.as_dict())
    log.info("fetched %s", fetched.describe())
    return fetched
