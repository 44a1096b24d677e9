"""Query/retrieve from a DICOM source (`[[sources]]` with ae_title, host, port): C-FIND to find
studies and to list what a study holds, then C-MOVE or C-GET (Study Root information model).

C-MOVE names the node's own AE title as the move destination: the PACS opens an association to
the node's receiver, which stores each instance as a push. C-GET brings the instances back on
the fetching process's own association; each C-STORE sub-operation goes through the same
`InstanceStore` as the receiver's (check, spool, index).

pynetdicom allows 128 presentation contexts in an association. A C-GET proposes one context
for the Get information model and one per storage SOP class that the study's IMAGE-level
C-FIND reported (SOPClassUID) and the node stores (dicomnode.imaging.sopclasses.STORAGE_CLASSES, inputs first);
when the PACS does not report SOP classes, the node's storage classes themselves, at most 127.
Instances of other classes are not asked for: the fetch reports them as not taken.

What a study holds is what C-FIND announces at IMAGE level (SOP Instance UIDs), and a
retrieve is judged against it (dicomnode.net.fetch): a PACS that answers success but sent
nothing, or fewer instances than it announced, has failed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date

from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomnode.config import RetrieveMethod, Source
from dicomnode.imaging.sopclasses import INPUT_CLASSES, STORAGE_CLASSES
from dicomnode.net.receiver import STORED_ONLY_SYNTAXES, TRANSFER_SYNTAXES, InstanceStore
from dicomnode.net.scu import responses_to_the_caller
from dicomnode.net.status import SUCCESS
from dicomnode.net.tls import NODELAY_HANDLER, client_tls_args

log = logging.getLogger("dicomnode.retrieve")

PENDING = {0xFF00, 0xFF01}
MAX_CONTEXTS = 128  # pynetdicom's limit for one association
# The query/retrieve contexts proposed (Study Root, SCU role, pynetdicom's default transfer syntaxes);
# a C-GET adds `get_storage_contexts` with the SCP role for each.
FIND_CONTEXT = build_context(StudyRootQueryRetrieveInformationModelFind)
MOVE_CONTEXT = build_context(StudyRootQueryRetrieveInformationModelMove)
GET_CONTEXT = build_context(StudyRootQueryRetrieveInformationModelGet)


def get_storage_contexts(classes: list[str]) -> list:
    """The storage contexts a C-GET proposes for `classes` (at most MAX_CONTEXTS - 1 of them, in
    order), as the receiver takes them: inputs in the decodable syntaxes, the rest as stored."""
    return [build_context(c, TRANSFER_SYNTAXES if c in INPUT_CLASSES else STORED_ONLY_SYNTAXES)
            for c in classes[: MAX_CONTEXTS - 1]]


class SourceError(Exception):
    """A source could not be queried or did not retrieve; the message says which and why."""


@dataclass(frozen=True)
class StudyQuery:
    """What `dicomnode fetch` (or a prior lookup) asks for; the unset keys match anything."""

    study_uid: str | None = None
    accession: str | None = None
    patient_id: str | None = None
    since: date | None = None  # StudyDate from (inclusive)
    until: date | None = None  # StudyDate to (inclusive)

    @property
    def date_range(self) -> str:
        if self.since is None and self.until is None:
            return ""
        since, until = (d.strftime("%Y%m%d") if d else "" for d in (self.since, self.until))
        return f"{since}-{until}"

    def describe(self) -> str:
        parts = [f"{k} {v}" for k, v in (("study", self.study_uid), ("accession", self.accession),
                                         ("patient", self.patient_id)) if v]
        if self.date_range:
            parts.append(f"dates {self.date_range}")
        return ", ".join(parts) or "every study"


@dataclass(frozen=True)
class StudyMatch:
    """One study a query found."""

    study_uid: str
    patient_id: str = ""
    study_date: str = ""  # YYYYMMDD as the source gave it
    study_time: str = ""
    accession: str = ""
    description: str = ""
    modalities: tuple[str, ...] = ()
    instances: int | None = None  # NumberOfStudyRelatedInstances, when the source says
    issuer: str = ""  # IssuerOfPatientID, when the source says: the domain the PatientID belongs to


@dataclass(frozen=True)
class Announced:
    """What the source says a study holds: SOP Instance UID -> SOP Class UID ("" where not said)."""

    study_uid: str
    instances: dict[str, str]

    def wanted(self) -> dict[str, str]:
        """Those the node stores (their SOP class is one of the receiver's, or not said)."""
        accepted = {str(c) for c in STORAGE_CLASSES}
        return {uid: cls for uid, cls in self.instances.items() if not cls or cls in accepted}

    def not_taken(self) -> dict[str, str]:
        wanted = self.wanted()
        return {uid: cls for uid, cls in self.instances.items() if uid not in wanted}


@dataclass
class Retrieved:
    """What a retrieve did, as the source and this process saw it."""

    method: str  # "C-MOVE", "C-GET", "WADO-RS"
    status: int | None = None  # the final response's status (DIMSE); None: none came
    completed: int | None = None  # the source's sub-operation counts, when it gave them
    failed: int | None = None
    warning: int | None = None
    stored: set[str] = field(default_factory=set)  # stored by this process (C-GET, WADO-RS)
    refused: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> why this process refused it
    stores_here: bool = True  # False for C-MOVE: the node's receiver stores, the index tells what arrived
    problem: str | None = None  # the retrieve broke off (association lost, HTTP error): why


Progress = Callable[[int, int], None]  # (done, total) as instances arrive


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value) if value is not None else ""


def values_of(ds: Dataset, keyword: str) -> tuple[str, ...]:
    """A multi-valued attribute's values ("" and absent: none)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.split("\\") if v)
    return tuple(str(v) for v in value)


class DimseSource:
    """C-FIND / C-MOVE / C-GET against one `[[sources]]` entry, calling as `calling_aet`."""

    def __init__(self, source: Source, calling_aet: str, move_destination: str | None = None) -> None:
        self.source = source
        self.calling_aet = calling_aet
        self.move_destination = source.move_destination or move_destination or calling_aet

    @property
    def method(self) -> str:
        return str(self.source.retrieve)

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_aet)
        timeout = self.source.timeout_seconds
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = ae.connection_timeout = timeout
        return ae

    @contextmanager
    def _association(self, ae: AE, **kwargs) -> Iterator:  # noqa: ANN003 - pynetdicom's associate() arguments
        src = self.source
        handlers = [NODELAY_HANDLER, *kwargs.pop("evt_handlers", [])]
        assoc = ae.associate(src.host, src.port, ae_title=src.ae_title, evt_handlers=handlers,
                             tls_args=client_tls_args(src), **kwargs)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "not established"
            raise SourceError(f"{src.name}: association with {src.ae_title}@{src.host}:{src.port} {why}")
        try:
            yield responses_to_the_caller(assoc)
        finally:
            if assoc.is_established:
                assoc.release()

    def _find(self, assoc, identifier: Dataset) -> list[Dataset]:  # noqa: ANN001 - a pynetdicom Association
        found = []
        for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            if not status:
                raise SourceError(f"{self.source.name}: C-FIND got no response (association aborted or timed out; "
                                  f"does {self.source.ae_title} answer queries from {self.calling_aet}?)")
            code = int(status.Status)
            if code in PENDING:
                if answer is None:  # a match pynetdicom could not decode: never announce less than there is
                    raise SourceError(f"{self.source.name}: a C-FIND match (status 0x{code:04X}) could not be read")
                found.append(answer)
            elif code != SUCCESS:
                raise SourceError(f"{self.source.name}: C-FIND failed with status 0x{code:04X}")
        return found

    def find_studies(self, query: StudyQuery) -> list[StudyMatch]:
        """C-FIND at STUDY level."""
        ae = self._ae()
        ae.add_requested_context(FIND_CONTEXT.abstract_syntax, FIND_CONTEXT.transfer_syntax)
        identifier = _identifier(
            "STUDY", StudyInstanceUID=query.study_uid or "", AccessionNumber=query.accession or "",
            PatientID=query.patient_id or "", StudyDate=query.date_range, StudyTime="", StudyDescription="",
            ModalitiesInStudy="", NumberOfStudyRelatedInstances="", IssuerOfPatientID="",
        )
        with self._association(ae) as assoc:
            answers = self._find(assoc, identifier)
        matches = []
        for ds in answers:
            uid = _text(ds, "StudyInstanceUID")
            if not uid:
                continue
            modalities = values_of(ds, "ModalitiesInStudy")
            count = ds.get("NumberOfStudyRelatedInstances")
            matches.append(StudyMatch(uid, _text(ds, "PatientID"), _text(ds, "StudyDate"), _text(ds, "StudyTime"),
                                      _text(ds, "AccessionNumber"), _text(ds, "StudyDescription"), modalities,
                                      int(count) if count not in (None, "") else None,
                                      _text(ds, "IssuerOfPatientID")))
        return matches

    def announce(self, study_uid: str) -> Announced:
        """C-FIND at SERIES level, then at IMAGE level per series: every instance and its SOP class."""
        ae = self._ae()
        ae.add_requested_context(FIND_CONTEXT.abstract_syntax, FIND_CONTEXT.transfer_syntax)
        instances: dict[str, str] = {}
        with self._association(ae) as assoc:
            series = [_text(ds, "SeriesInstanceUID") for ds in
                      self._find(assoc, _identifier("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=""))]
            for series_uid in filter(None, series):
                for ds in self._find(assoc, _identifier("IMAGE", StudyInstanceUID=study_uid,
                                                        SeriesInstanceUID=series_uid, SOPInstanceUID="",
                                                        SOPClassUID="")):
                    if _text(ds, "SOPInstanceUID"):
                        instances[_text(ds, "SOPInstanceUID")] = _text(ds, "SOPClassUID")
        return Announced(study_uid, instances)

    def retrieve(self, announced: Announced, store: InstanceStore | None,
                 progress: Progress | None = None) -> Retrieved:
        if self.source.retrieve == RetrieveMethod.C_GET:
            if store is None:
                raise ValueError("C-GET stores in this process: it needs an InstanceStore")
            return self._get(announced, store, progress)
        return self._move(announced, progress)

    def _responses(self, responses, retrieved: Retrieved, total: int,  # noqa: ANN001 - pynetdicom's generator
                   progress: Progress | None, counted_here: bool) -> None:
        """Read C-MOVE / C-GET responses into `retrieved` (pending ones move the progress bar)."""
        for status, _identifier_ in responses:
            if not status:
                retrieved.problem = "no response (association lost or timed out)"
                return
            code = int(status.Status)
            counts = [status.get(k) for k in ("NumberOfCompletedSuboperations", "NumberOfFailedSuboperations",
                                              "NumberOfWarningSuboperations")]
            if code in PENDING:
                if progress is not None and not counted_here and counts[0] is not None:
                    progress(sum(int(c or 0) for c in counts), total)
                continue
            retrieved.status = code
            retrieved.completed, retrieved.failed, retrieved.warning = (int(c) if c is not None else None
                                                                         for c in counts)
            return

    def _move(self, announced: Announced, progress: Progress | None) -> Retrieved:
        ae = self._ae()
        ae.add_requested_context(MOVE_CONTEXT.abstract_syntax, MOVE_CONTEXT.transfer_syntax)
        retrieved = Retrieved(RetrieveMethod.C_MOVE.value, stores_here=False)
        identifier = _identifier("STUDY", StudyInstanceUID=announced.study_uid)
        with self._association(ae) as assoc:
            responses = assoc.send_c_move(identifier, self.move_destination,
                                          StudyRootQueryRetrieveInformationModelMove)
            self._responses(responses, retrieved, len(announced.wanted()), progress, counted_here=False)
        return retrieved

    def _get(self, announced: Announced, store: InstanceStore, progress: Progress | None) -> Retrieved:
        ae = self._ae()
        ae.add_requested_context(GET_CONTEXT.abstract_syntax, GET_CONTEXT.transfer_syntax)
        reported = sorted({cls for cls in announced.wanted().values() if cls})
        classes = reported or [str(c) for c in STORAGE_CLASSES]
        contexts = get_storage_contexts(classes)
        for context in contexts:
            ae.add_requested_context(context.abstract_syntax, context.transfer_syntax)
        roles = [build_role(context.abstract_syntax, scp_role=True) for context in contexts]
        retrieved = Retrieved(RetrieveMethod.C_GET.value)
        total = len(announced.wanted())
        lock = threading.Lock()
        calling = self.source.ae_title or self.source.name

        def on_store(event) -> int:  # noqa: ANN001 - pynetdicom C-STORE event, on our own association
            stored = store.store_event(event, calling)
            uid = str(event.request.AffectedSOPInstanceUID or "")
            with lock:
                if stored.status == SUCCESS:
                    retrieved.stored.add(stored.sop_instance_uid)
                else:
                    retrieved.refused[uid] = f"refused with 0x{stored.status:04X}"
                done = len(retrieved.stored) + len(retrieved.refused)
            if progress is not None:
                progress(done, total)
            return stored.status

        identifier = _identifier("STUDY", StudyInstanceUID=announced.study_uid)
        with self._association(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
            responses = assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
            self._responses(responses, retrieved, total, progress, counted_here=True)
        return retrieved
