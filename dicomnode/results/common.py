"""What every result object shares: its one error, the check that an array lies on the
source images, the source headers as the writers need them, and the durable DICOM write."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from dicomnode.store.files import write_durably

PIXEL_DATA = 0x7FE00010
MANUFACTURER = "dicomnode"  # Manufacturer of every result object (and the SR's observer device)


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
