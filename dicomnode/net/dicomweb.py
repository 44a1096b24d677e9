"""A DICOMweb source (`[[sources]] url = ".../dicom-web"`): QIDO-RS to find studies and list
what a study holds, WADO-RS to retrieve it, with dicomweb-client.

Each instance is asked for in the syntax the server holds it in (transfer-syntax=*), and
encoded again in that syntax (which must be one the receiver accepts for its class) and stored through the receiver's
`InstanceStore`, as if a C-STORE request had brought it from the AE "named" the source
(its `name`, at most 16 characters, is the calling AE title recorded in the index).
"""

from __future__ import annotations

import logging
import ssl

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import encode

from dicomnode.config import Source
from dicomnode.imaging.sopclasses import INPUT_CLASSES
from dicomnode.net.receiver import STORED_ONLY_SYNTAXES, TRANSFER_SYNTAXES, InstanceStore
from dicomnode.net.retrieve import (
    Announced,
    Progress,
    Retrieved,
    SourceError,
    StudyMatch,
    StudyQuery,
    values_of,
)
from dicomnode.net.status import CANNOT_UNDERSTAND, SUCCESS
from dicomnode.net.web import AuthorizationUnavailable, authorization, session_for

log = logging.getLogger("dicomnode.retrieve")

_STUDY_FIELDS = ["StudyInstanceUID", "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
                 "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "IssuerOfPatientID"]


class DicomwebSource:
    """QIDO-RS / WADO-RS against one `[[sources]]` entry with a `url`."""

    method = "WADO-RS"

    def __init__(self, source: Source) -> None:
        self.source = source
        try:  # the same Authorization header and https checks as a STOW-RS destination's
            session = session_for(source, authorization(source))
        except (AuthorizationUnavailable, OSError, ssl.SSLError) as exc:
            why = exc if isinstance(exc, AuthorizationUnavailable) else f"TLS settings: {exc}"
            raise SourceError(f"{source.name}: {why}") from None
        self.client = DICOMwebClient(source.url.rstrip("/"), session=session, timeout=source.timeout_seconds)
        self.client.set_http_retry_params(retry=False)

    def _call(self, what: str, function, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        try:
            return function(*args, **kwargs)
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            raise SourceError(f"{self.source.name}: {what} failed: HTTP {code} from {self.source.url}") from None
        except requests.RequestException as exc:
            raise SourceError(f"{self.source.name}: {what} failed: {type(exc).__name__}: {exc}") from None

    def find_studies(self, query: StudyQuery) -> list[StudyMatch]:
        filters = {k: v for k, v in (("StudyInstanceUID", query.study_uid), ("AccessionNumber", query.accession),
                                     ("PatientID", query.patient_id), ("StudyDate", query.date_range)) if v}
        answers = self._call("QIDO-RS study search", self.client.search_for_studies, search_filters=filters,
                             fields=_STUDY_FIELDS, get_remaining=True)
        matches = []
        for item in answers or []:
            ds = Dataset.from_json(item)
            uid = str(ds.get("StudyInstanceUID", ""))
            if not uid:
                continue
            count = ds.get("NumberOfStudyRelatedInstances")
            matches.append(StudyMatch(
                uid, str(ds.get("PatientID", "")), str(ds.get("StudyDate", "")), str(ds.get("StudyTime", "")),
                str(ds.get("AccessionNumber", "")), str(ds.get("StudyDescription", "")),
                values_of(ds, "ModalitiesInStudy"), int(count) if count not in (None, "") else None,
                str(ds.get("IssuerOfPatientID", ""))))
        return matches

    def announce(self, study_uid: str) -> Announced:
        answers = self._call("QIDO-RS instance search", self.client.search_for_instances,
                             study_instance_uid=study_uid, fields=["SOPClassUID"], get_remaining=True)
        instances = {}
        for item in answers or []:
            ds = Dataset.from_json(item)
            if ds.get("SOPInstanceUID"):
                instances[str(ds.SOPInstanceUID)] = str(ds.get("SOPClassUID", ""))
        return Announced(study_uid, instances)

    def retrieve(self, announced: Announced, store: InstanceStore | None,
                 progress: Progress | None = None) -> Retrieved:
        if store is None:
            raise ValueError("WADO-RS stores in this process: it needs an InstanceStore")
        retrieved = Retrieved(self.method)
        wanted = announced.wanted()
        calling = self.source.name[:16]
        try:
            # "*": each instance in the syntax the server holds it in (a server asked for Explicit VR
            # Little Endian must transcode, and a JPEG 2000 SEG it cannot decode fails the whole retrieve)
            for ds in self.client.iter_study(announced.study_uid, media_types=(("application/dicom", "*"),)):
                uid = str(ds.get("SOPInstanceUID", ""))
                if uid not in wanted:  # not announced, or of a class the node does not store
                    continue
                status = self._store(ds, uid, wanted[uid], store, calling)
                if status == SUCCESS:
                    retrieved.stored.add(uid)
                else:
                    retrieved.refused[uid] = f"refused with 0x{status:04X}"
                if progress is not None:
                    progress(len(retrieved.stored) + len(retrieved.refused), len(wanted))
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            retrieved.problem = f"WADO-RS study retrieve failed: HTTP {code}"
        except requests.RequestException as exc:
            retrieved.problem = f"WADO-RS study retrieve failed: {type(exc).__name__}: {exc}"
        retrieved.status = SUCCESS if retrieved.problem is None else None
        return retrieved

    def _store(self, ds: Dataset, uid: str, announced_class: str, store: InstanceStore, calling: str) -> int:
        meta = getattr(ds, "file_meta", None)
        syntax = UID(str(meta.TransferSyntaxUID)) if meta is not None and "TransferSyntaxUID" in meta else None
        sop_class = announced_class or str(ds.get("SOPClassUID", ""))
        accepted = TRANSFER_SYNTAXES if sop_class in INPUT_CLASSES else STORED_ONLY_SYNTAXES  # as the receiver
        if syntax is None or syntax not in accepted:
            log.warning("refused instance %s from %s: transfer syntax %s is not one the node accepts (0xC000)",
                        uid, calling, syntax.name if syntax else "(none)")
            return CANNOT_UNDERSTAND
        try:
            body = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on a malformed data set
            log.warning("refused instance %s from %s: cannot be encoded: %s (0xC000)", uid, calling, exc)
            return CANNOT_UNDERSTAND
        if body is None:
            return CANNOT_UNDERSTAND
        return store.store_encoded(body, syntax, sop_class, uid, calling).status
