"""What every result object shares: its one error, the check that an array lies on the
source images, the source headers as the writers need them, and the durable DICOM write."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicomnode import __version__
from dicomnode.store.files import write_durably

PIXEL_DATA = 0x7FE00010
MANUFACTURER = "dicomnode"  # Manufacturer of every result object (and the SR's observer device)
# Purpose of Reference of the Contributing Equipment item (CID 7005 Contributing Equipment Purposes
# of Reference): CID 7005 has no concept for an AI or an algorithm; a device that processed the
# source images into this object is "Processing Equipment".
PROCESSING_EQUIPMENT = codes.cid7005.ProcessingEquipment  # (109102, DCM, "Processing Equipment")


@dataclass(frozen=True)
class Provenance:
    """What a result object says of the algorithm that made it beyond its name and version (IHE
    AIR, README "AI Results content"): its parameters as written into the SEG's algorithm
    identification, the SR's TID 4019 and the Contributing Equipment item (folds, mirroring, tile
    step, the weights' fingerprint), the site's organization, a disclaimer the site wants on
    every SEG and SR ("" none), and when the processing ended."""

    parameters: Mapping[str, str] = field(default_factory=dict)
    organization: str = ""
    disclaimer: str = ""
    when: datetime | None = None


def dicom_datetime(when: datetime) -> str:
    """A DT value in UTC with its offset, e.g. 20261201193000.123456+0000."""
    return when.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S.%f+0000")


def device_uid(manufacturer: str, model_name: str, model_version: str) -> str:
    """The UID of the node running one model version: the SR's observer device and the
    Contributing Equipment item's Device UID (one model version keeps one UID)."""
    return generate_uid(entropy_srcs=["dicomnode", manufacturer, model_name, model_version])


def contributing_equipment(manufacturer: str, model_name: str, model_version: str,
                           provenance: Provenance | None = None) -> Dataset:
    """One Contributing Equipment Sequence item (SOP Common Module) for the node and the model
    that processed the source images: purpose Processing Equipment (DCM 109102), the model as
    the model name, its version and the node's as software versions, when, and the algorithm's
    parameters in words."""
    provenance = provenance or Provenance()
    purpose = Dataset()
    purpose.CodeValue = PROCESSING_EQUIPMENT.value
    purpose.CodingSchemeDesignator = PROCESSING_EQUIPMENT.scheme_designator
    purpose.CodeMeaning = PROCESSING_EQUIPMENT.meaning
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.Manufacturer = manufacturer
    if provenance.organization:
        item.InstitutionName = provenance.organization[:64]
    item.ManufacturerModelName = model_name[:64]
    item.SoftwareVersions = [model_version[:64], f"dicomnode {__version__}"[:64]]
    # no Device UID (0018,1002): dciodvfy (dicom3tools) does not know it in this sequence and would
    # call the object a Standard Extended SOP Class; the SR's observer context carries that UID
    item.ContributionDateTime = dicom_datetime(provenance.when or datetime.now(timezone.utc))
    parameters = "; ".join(f"{key} {value}" for key, value in provenance.parameters.items())
    item.ContributionDescription = (f"AI segmentation by nnU-Net model {model_name} version {model_version}"
                                    + (f"; {parameters}" if parameters else ""))[:1024]  # ST
    return item


class ResultError(ValueError):
    """A result object cannot be built from what it was given (a label map, measures, a SEG and
    the source images that do not fit together); the message says why."""


# Type 2 attributes highdicom copies from the first source image: absent ones break SEG creation.
_TYPE2_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def source_grid_problem(shape: tuple[int, ...], source: Sequence[Dataset], what: str = "labels") -> str | None:
    """Why an array of `shape` (z, y, x) cannot lie on `source` (one series' slices, in order),
    or None when it can: the shared check of every object drawn on the source images."""
    if not source:
        return "no source images"
    if len(shape) != 3:
        return f"{what} must be (z, y, x), got shape {shape}"
    first = source[0]
    expected = (len(source), int(first.Rows), int(first.Columns))
    if tuple(shape) != expected:
        return f"{what} shape {tuple(shape)} does not match the source grid {expected}"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(keyword, "")) for ds in source}
        if len(values) != 1 or "" in values:
            return f"source images need one common {keyword}, got {sorted(values)}"
    return None


def check_on_source(array: np.ndarray, source: Sequence[Dataset], what: str = "labels") -> None:
    """ResultError unless `array` lies on `source` (source_grid_problem)."""
    problem = source_grid_problem(np.shape(array), source, what)
    if problem:
        raise ResultError(problem)


def with_type2_attributes(ds: Dataset) -> Dataset:
    """A header-only copy of `ds` with missing Type 2 attributes added empty (highdicom copies
    them from the source into the SEG and the SR, and refuses a source without them)."""
    # the elements as read (raw until used, so nothing is decoded), every one but the pixel data
    copy = Dataset({tag: ds.get_item(tag) for tag in ds.keys() if tag != PIXEL_DATA})
    copy.file_meta = getattr(ds, "file_meta", Dataset())
    for keyword in _TYPE2_FROM_SOURCE:
        if keyword not in copy:
            setattr(copy, keyword, "")
    return copy


def source_instances(source: Sequence[Dataset]) -> list[Dataset]:
    """The instances `source`'s slices come from, each once, in slice order of first use: the
    slices themselves for single-frame images, the multi-frame instance of each frame for an
    enhanced one (dicomnode.imaging.frames.FrameHeader's `.instance`)."""
    seen: dict[object, Dataset] = {}
    for ds in source:
        instance = ds.instance if frame_number(ds) is not None else None
        if instance is None:
            seen.setdefault(id(ds), ds)
        else:
            seen.setdefault(str(instance.SOPInstanceUID), instance)
    return list(seen.values())


def frame_number(ds: Dataset) -> int | None:
    """The frame number of a slice that is a frame of a multi-frame instance, else None."""
    return getattr(ds, "frame_number", None) if hasattr(ds, "instance") else None


def write_dicom(ds: Dataset, path: Path | str) -> Path:
    """Write a result object as a DICOM file, durably (dicomnode.store.files): a crash or a full
    disk leaves the whole file or none, never a truncated object to send."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_durably(
        path, lambda fh: ds.save_as(fh, enforce_file_format=True), path.with_name(f".{path.name}.partial")
    )


PRIVATE_SCHEME = "99DCMNODE"  # the node's private coding scheme (the status SR, the comparison)


def declare_private_scheme(sr: Dataset) -> None:
    """Name the node's private coding scheme in CodingSchemeIdentificationSequence."""
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "dicomnode private codes"
    scheme.CodingSchemeResponsibleOrganization = "dicomnode"
    known = [item for item in sr.get("CodingSchemeIdentificationSequence", [])
             if item.CodingSchemeDesignator != PRIVATE_SCHEME]
    sr.CodingSchemeIdentificationSequence = [*known, scheme]
