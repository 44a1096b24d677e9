"""What the node reads from an instance's header, as plain data: `InstanceFacts` per instance,
`SeriesFacts` per series. Series selection, the receiver's checks and `dicomnode inspect` all
read them through `facts_from_dataset`, so they agree on what a header says.

Attributes the pipeline relies on (positions, orientation, slice counts, frames, thickness)
must be well formed: `FactsError` names the one that is not (the receiver refuses the instance
with it; a file already on disk costs its series a verdict). Attributes that only name things
(SeriesNumber, SeriesDescription, dates) are taken as missing when malformed.

Facts come from the files themselves (`pydicom.dcmread(stop_before_pixels=True)`), cached per
file (path, size, mtime), so the assembler can re-check a held-back study every sweep.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom
from pydicom.multival import MultiValue

from dicomnode.config import TAG_KEYWORDS
from dicomnode.imaging.frames import frame_headers, is_enhanced
from dicomnode.imaging.sopclasses import is_input

_CACHE_SIZE = 200_000


class FactsError(ValueError):
    """A file's header cannot be read."""


@dataclass(frozen=True)
class InstanceFacts:
    """The header facts of one instance that series selection needs."""

    path: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    series_datetime: str  # SeriesDate + SeriesTime as written; for "the latest"
    image_type: tuple[str, ...]
    corrected_image: tuple[str, ...]
    series_type: tuple[str, ...]
    frame_of_reference_uid: str
    number_of_slices: int | None
    time_frames: int  # the largest of NumberOfTimeSlices, NumberOfTimeSlots, NumberOfFrames (1 if absent);
    # enhanced multi-frame: the time frames among its frames (see _enhanced_facts), not NumberOfFrames
    slice_thickness: float | None
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (None unless both it and the position are there)
    position: tuple[float, ...] | None  # ImagePositionPatient, mm
    tags: tuple[tuple[str, str], ...] = ()  # (keyword, value) of config.TAG_KEYWORDS, for applies_to rules
    sop_class_uid: str = ""
    decay_correction: str = ""  # PET: START, ADMIN or NONE (what the pixel values are decay-corrected to)
    # Enhanced multi-frame (dicomnode.imaging.frames): each frame's ImageOrientationPatient and
    # ImagePositionPatient (empty for a single-frame instance), and (ConcatenationUID,
    # InConcatenationTotalNumber) when the instance is one part of a concatenation.
    frame_orientations: tuple[tuple[float, ...], ...] = ()
    frame_positions: tuple[tuple[float, ...], ...] = ()
    concatenation: tuple[str, int] | None = None

    @property
    def frames(self) -> int:
        """The slices this instance holds: its frames when enhanced, else 1."""
        return len(self.frame_positions) or 1

    @property
    def planes(self) -> tuple[tuple[tuple[float, ...], tuple[float, ...]], ...]:
        """(orientation, position) of each slice it holds; () when a slice has no position."""
        if self.frame_positions:
            return tuple(zip(self.frame_orientations, self.frame_positions))
        return ((self.orientation, self.position),) if self.position is not None else ()

    @property
    def z(self) -> float | None:
        """The position along the slice normal, mm."""
        if self.orientation is None or self.position is None:
            return None
        return float(np.dot(np.cross(self.orientation[:3], self.orientation[3:]), self.position))


def _values(ds, keyword: str) -> tuple[str, ...]:  # noqa: ANN001
    value = _get(ds, keyword)
    if value is None or value == "":
        return ()
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        value = [value]
    return tuple(str(v).strip().upper() for v in value if str(v).strip())


def _get(ds, keyword: str) -> object:  # noqa: ANN001
    """The attribute's value; FactsError naming it when pydicom cannot read it (an odd-length US,
    a value cut short): whatever goes wrong, it is this attribute of this instance."""
    try:
        return ds.get(keyword)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a malformed element
        raise FactsError(f"{keyword}: cannot be read: {first_sentence(exc)}") from exc


def first_sentence(exc: Exception) -> str:
    """pydicom's messages run to several sentences of advice; the first says what is wrong."""
    text = str(exc)
    return text.split(". ")[0] if ". " in text else text


def _text(ds, keyword: str) -> str:  # noqa: ANN001
    value = _get(ds, keyword)
    if isinstance(value, bytes):  # a value longer than the receiver's defer size is read back as bytes
        return value.decode("latin-1").rstrip(" \x00")
    return str(value) if value is not None else ""


def numbers(ds, keyword: str, count: int | None = 1) -> list[float] | None:  # noqa: ANN001
    """A numeric attribute's values (None when absent or empty); FactsError naming the attribute
    when it is present but not `count` finite numbers (any count for None)."""
    value = _get(ds, keyword)
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        floats = [float(v) for v in items]
    except (TypeError, ValueError):
        raise FactsError(f"{keyword}: {_shown(value)} is not {'a number' if count == 1 else 'numbers'}") from None
    if count is not None and len(floats) != count:
        raise FactsError(f"{keyword}: {_shown(value)} has {len(floats)} values, not {count}")
    if not all(np.isfinite(floats)):
        raise FactsError(f"{keyword}: {_shown(value)} is not finite")
    return floats


def _shown(value: object) -> str:
    text = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple, MultiValue)) else str(value)
    return repr(text[:40])


def _int(ds, keyword: str) -> int | None:  # noqa: ANN001
    """An integer attribute series selection relies on; FactsError when present but malformed."""
    found = numbers(ds, keyword)
    if found is None:
        return None
    if found[0] != int(found[0]):
        raise FactsError(f"{keyword}: {found[0]:g} is not a whole number")
    return int(found[0])


def _informative_int(ds, keyword: str) -> int | None:  # noqa: ANN001
    """An integer attribute that only names things (SeriesNumber): None when absent or malformed."""
    try:
        return _int(ds, keyword)
    except FactsError:
        return None


def facts_from_dataset(ds, path: str | Path = "") -> InstanceFacts:  # noqa: ANN001 - pydicom Dataset
    """The facts series selection needs. FactsError names the attribute when one it relies on is
    present but malformed (not a number, the wrong count of values, unreadable bytes); only
    attributes that merely name things (SeriesNumber, SeriesDescription, dates) are then taken as
    missing. The receiver refuses an instance this raises for (0xC000), so what it acknowledges
    the assembler and the worker can read."""
    # Enhanced images a model reads: their frames' geometry. A multi-frame object no model reads
    # (a SEG sent back, a whole-slide image) is only named: it need not describe its frames so.
    enhanced = _enhanced_facts(ds) if is_enhanced(ds) and is_input(_text(ds, "SOPClassUID")) else None
    top = ds
    if enhanced is not None:  # the other facts as the first frame's header has them
        ds = frame_headers(ds, [1])[0]
    iop = numbers(ds, "ImageOrientationPatient", 6)
    ipp = numbers(ds, "ImagePositionPatient", 3)
    located = iop is not None and ipp is not None
    frames = [_int(ds, k) for k in ("NumberOfTimeSlices", "NumberOfTimeSlots")]
    # NumberOfFrames counts time frames only where frames are not described one by one; an
    # enhanced instance's frames are mostly slices: its time frames are counted from its frames.
    frames.append(enhanced[3] if enhanced is not None else _int(ds, "NumberOfFrames"))
    thickness = numbers(ds, "SliceThickness")
    try:
        description = _text(ds, "SeriesDescription")
        series_datetime = f"{_get(ds, 'SeriesDate') or ''}{_get(ds, 'SeriesTime') or ''}"
        tags = tuple((k, _text(ds, k)) for k in TAG_KEYWORDS)
    except FactsError:
        description, series_datetime, tags = "", "", ()
    return InstanceFacts(
        path=str(path),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        modality=_text(ds, "Modality").strip().upper(),
        series_number=_informative_int(ds, "SeriesNumber"),
        series_description=description,
        series_datetime=series_datetime,
        image_type=_values(ds, "ImageType"),
        corrected_image=_values(ds, "CorrectedImage"),
        series_type=_values(ds, "SeriesType"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        number_of_slices=_int(ds, "NumberOfSlices"),
        time_frames=max([f for f in frames if f is not None] or [1]),
        slice_thickness=thickness[0] if thickness else None,
        orientation=tuple(iop) if located else None,
        position=tuple(ipp) if located else None,
        tags=tags,
        sop_class_uid=_text(ds, "SOPClassUID"),
        decay_correction=_text(ds, "DecayCorrection").strip().upper(),
        frame_orientations=enhanced[0] if enhanced is not None else (),
        frame_positions=enhanced[1] if enhanced is not None else (),
        concatenation=enhanced[2] if enhanced is not None else _concatenation(top),
    )


def _enhanced_facts(ds) -> tuple:  # noqa: ANN001 - pydicom Dataset
    """(each frame's orientation, each frame's position, the concatenation, the time frames) of
    an enhanced multi-frame instance, read from its functional groups (Plane Orientation / Plane
    Position, Frame Content); FactsError names the frame whose geometry is missing or malformed.
    Time frames: the distinct TemporalPositionIndex values, else how often every position
    repeats when each repeats equally (a dynamic series without temporal indices); 1 otherwise."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    count = _int(ds, "NumberOfFrames") or 1
    if per_frame and len(per_frame) != count:
        raise FactsError(f"PerFrameFunctionalGroupsSequence: {len(per_frame)} items for NumberOfFrames {count}")
    orientations, positions, temporal = [], [], set()
    for k in range(count):
        frame = per_frame[k] if per_frame else None
        iop = _macro_numbers(frame, shared, "PlaneOrientationSequence", "ImageOrientationPatient", 6, k)
        ipp = _macro_numbers(frame, shared, "PlanePositionSequence", "ImagePositionPatient", 3, k)
        if iop is None or ipp is None:
            raise FactsError(f"frame {k + 1}: no PlaneOrientationSequence/PlanePositionSequence")
        orientations.append(tuple(iop))
        positions.append(tuple(ipp))
        content = frame.get("FrameContentSequence") if frame is not None else None
        index = content[0].get("TemporalPositionIndex") if content else None
        if index is not None:
            temporal.add(int(index))
    repeats = set(Counter(tuple(round(v, 2) for v in p) for p in positions).values())
    time_frames = len(temporal) if len(temporal) > 1 else (repeats.pop() if len(repeats) == 1 else 1)
    return tuple(orientations), tuple(positions), _concatenation(ds), time_frames


def _macro_numbers(frame, shared, macro: str, keyword: str, count: int, k: int) -> list[float] | None:  # noqa: ANN001
    for group in (frame, shared):
        items = group.get(macro) if group is not None else None
        if items:
            try:
                return numbers(items[0], keyword, count)
            except FactsError as exc:
                raise FactsError(f"frame {k + 1}: {exc}") from None
    return None


def _concatenation(ds) -> tuple[str, int] | None:  # noqa: ANN001 - pydicom Dataset
    """(ConcatenationUID, InConcatenationTotalNumber) of one part of a concatenation, else None."""
    uid = _text(ds, "ConcatenationUID")
    total = _int(ds, "InConcatenationTotalNumber")
    return (uid, total) if uid and total else None


_cache: "OrderedDict[str, tuple[int, int, InstanceFacts]]" = OrderedDict()
_cache_lock = threading.Lock()


def clear_facts_cache() -> None:
    """Forget the facts read so far (a worker meeting a study for the first time: the benches)."""
    with _cache_lock:
        _cache.clear()


def read_facts(path: str | Path) -> InstanceFacts:
    """One file's facts (headers only), cached while the file's size and mtime stay the same."""
    key = str(path)
    try:
        stat = os.stat(key)
    except OSError as exc:
        raise FactsError(f"cannot be opened: {exc.strerror or exc}") from exc
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] == stat.st_size and hit[1] == stat.st_mtime_ns:
            _cache.move_to_end(key)
            return hit[2]
    try:
        ds = pydicom.dcmread(key, stop_before_pixels=True, defer_size="4 KB")
        facts = facts_from_dataset(ds, key)
    except FactsError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises, it is that file's problem
        raise FactsError(f"not readable as DICOM: {first_sentence(exc)}") from exc
    with _cache_lock:
        _cache[key] = (stat.st_size, stat.st_mtime_ns, facts)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return facts


# --- series -------------------------------------------------------------------------------


@dataclass
class SeriesFacts:
    """One series: its instances' facts (one per SOP Instance UID) and the instances whose files
    could not be read, (SOP Instance UID, why)."""

    series_uid: str
    instances: list[InstanceFacts]
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    last_received_at: datetime | None = None
    # From the index when a file cannot be read: what the series is called there.
    indexed_modality: str = ""
    indexed_number: int | None = None
    indexed_description: str = ""
    indexed_sop_class: str = ""
    # Instances of a class no model reads (dicomnode.imaging.sopclasses): counted, their files not read
    stored_only: int = 0
    node_result_of: int | None = None  # the job whose result this series is (sent back to the node)

    @property
    def sop_class_uid(self) -> str:
        return self.first.sop_class_uid if self.first else self.indexed_sop_class

    @property
    def is_input(self) -> bool:
        """False for a series of a class no model reads (SR, SEG, SC, PDF, ...): never selected."""
        return is_input(self.sop_class_uid)

    @property
    def first(self) -> InstanceFacts | None:
        return self.instances[0] if self.instances else None

    @property
    def modality(self) -> str:
        return self.first.modality if self.first else self.indexed_modality

    @property
    def series_number(self) -> int | None:
        return self.first.series_number if self.first else self.indexed_number

    @property
    def description(self) -> str:
        return self.first.series_description if self.first else self.indexed_description

    @property
    def count(self) -> int:
        return len(self.instances) + len(self.unreadable) + self.stored_only

    @property
    def paths(self) -> list[str]:
        return [i.path for i in self.instances]

    @property
    def slices(self) -> int:
        """The slices the readable instances hold: their frames for enhanced multi-frame ones."""
        return sum(i.frames for i in self.instances)

    @property
    def planes(self) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
        """(orientation, position) of every slice of every instance (each frame of a multi-frame one)."""
        return [plane for i in self.instances for plane in i.planes]

    def concatenation_arriving(self) -> str | None:
        """Why a concatenation (one enhanced image split over several instances) is incomplete, or None."""
        parts: dict[str, tuple[int, set[str]]] = {}
        for i in self.instances:
            if i.concatenation is not None:
                uid, total = i.concatenation
                parts.setdefault(uid, (total, set()))[1].add(i.sop_instance_uid)
        for uid, (total, present) in parts.items():
            if len(present) < total:
                return (f"{self.label()} has {len(present)} of {total} instances of concatenation {uid} "
                        "(InConcatenationTotalNumber): still arriving")
        return None

    def all_values(self, attribute: str) -> set[str]:
        """Values of a multi-valued attribute present in any instance."""
        return set().union(*(getattr(i, attribute) for i in self.instances)) if self.instances else set()

    def common_values(self, attribute: str) -> set[str]:
        """Values of a multi-valued attribute present in every instance."""
        sets = [set(getattr(i, attribute)) for i in self.instances]
        return set.intersection(*sets) if sets else set()

    def distinct(self, attribute: str) -> set:
        return {getattr(i, attribute) for i in self.instances}

    @property
    def slice_thickness(self) -> float | None:
        values = [i.slice_thickness for i in self.instances if i.slice_thickness is not None]
        return float(np.median(values)) if values else None

    @property
    def latest_key(self) -> tuple:
        return (self.first.series_datetime if self.first else "", self.series_number or 0,
                self.last_received_at.timestamp() if self.last_received_at else 0.0, self.series_uid)

    def label(self) -> str:
        number = f"#{self.series_number}" if self.series_number is not None else "#-"
        description = f' "{self.description}"' if self.description else ""
        frames = f" ({self.slices} frames)" if any(i.frame_positions for i in self.instances) else ""
        return (f"{self.modality or '?'} {number}{description}, {self.count} instance{'s' if self.count != 1 else ''}"
                f"{frames}")


def group_series(facts: Iterable[InstanceFacts]) -> list[SeriesFacts]:
    """Instances -> series (a SOP Instance UID seen twice counts once)."""
    by_series: dict[str, dict[str, InstanceFacts]] = {}
    for f in facts:
        by_series.setdefault(f.series_uid, {}).setdefault(f.sop_instance_uid, f)
    return [SeriesFacts(uid, list(instances.values())) for uid, instances in by_series.items()]


def series_from_paths(paths: Iterable[str | Path]) -> tuple[dict[str, list[SeriesFacts]], list[str]]:
    """Files -> {study uid: series}, and the files that are not readable DICOM."""
    facts, unreadable = [], []
    for path in paths:
        try:
            facts.append(read_facts(path))
        except FactsError:
            unreadable.append(str(path))
    studies: dict[str, list[InstanceFacts]] = {}
    for f in facts:
        studies.setdefault(f.study_uid, []).append(f)
    return {uid: group_series(items) for uid, items in studies.items()}, unreadable
