"""An SR released at review, made VERIFIED (PS3.3 C.17.2 SR Document General Module).

The node writes its SRs UNVERIFIED and PRELIMINARY (an automatic result nobody has looked at).
A reader's release (dicomnode.pipeline.review) turns the written file into a verified one:
VerificationFlag VERIFIED with one Verifying Observer Sequence item (the reader's name, the
site's organization ([node] organization; "unspecified" when not set: it is Type 1), the time
of release, an empty identification code sequence: the node
knows no code for its readers), CompletionFlag COMPLETE and PreliminaryFlag FINAL. The content
tree, the UIDs and everything else stay as built, so the SR still references the SEG that is
sent with it.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.results.common import dicom_datetime, write_dicom

UNSPECIFIED = "unspecified"  # Verifying Organization (Type 1) when [node] organization is not set


def verify(ds: Dataset, observer_name: str, organization: str, when: datetime) -> Dataset:
    """`ds` (an SR document) made VERIFIED by `observer_name` at `when`, in place; returned."""
    observer = Dataset()
    observer.VerifyingObserverName = observer_name
    observer.VerifyingObserverIdentificationCodeSequence = []  # Type 2: no code for the reader
    observer.VerifyingOrganization = organization or UNSPECIFIED  # Type 1
    observer.VerificationDateTime = dicom_datetime(when)
    ds.VerifyingObserverSequence = [observer]
    ds.VerificationFlag = "VERIFIED"
    ds.CompletionFlag = "COMPLETE"
    ds.PreliminaryFlag = "FINAL"
    return ds


def verify_sr(path: Path, observer_name: str, organization: str, when: datetime) -> bool:
    """Make the SR file at `path` VERIFIED (durably: the whole file or the old one); False when
    it already is (a second attempt after a crash rewrites nothing)."""
    ds = dcmread(path)
    if str(ds.get("VerificationFlag", "")) == "VERIFIED":
        return False
    write_dicom(verify(ds, observer_name, organization, when), path)
    return True
