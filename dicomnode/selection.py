"""Which series of a study fill a model's input channels, and whether the study is ready.

A PET/CT study from a real scanner holds more than one PET and one CT: non-attenuation-
corrected PET, MIPs, localizers, CTs reconstructed at several slice thicknesses, dynamic or
gated PET. `select_inputs` applies the model's input spec (config `[models.inputs.pet]`,
`[models.inputs.ct]`; defaults below) to every series and gives each one a verdict: "used
for channel X" or "ignored because ...". Both the assembler (is the study ready?) and the
worker (which files?) and `dicomnode inspect` use it, on the same header facts.

PET (channel "PET"), every rule must hold:
  * Modality PT; ImageType contains ORIGINAL; SeriesType has none of REPROJECTION, DYNAMIC,
    GATED; CorrectedImage contains ATTN and DECY;
  * static: NumberOfTimeSlices, NumberOfTimeSlots and NumberOfFrames absent or 1;
  * consistent: one orientation, no duplicate slice positions, no gaps, and no more
    instances than NumberOfSlices. Fewer instances than NumberOfSlices: the series is still
    arriving ("waiting"), and the study is held back until it is complete.
  Several fit: the most instances, then the latest (SeriesDate/Time, then SeriesNumber).

CT (channel "CT"):
  * Modality CT; ImageType contains AXIAL and not LOCALIZER;
  * the PET's FrameOfReferenceUID; its slices (centres +- half a slice) cover the PET's
    slice centres; one orientation, no duplicate slice positions, no gaps.
  Several fit: SliceThickness closest to the PET's, then the most instances, then the latest.

Header facts come from the files themselves (`pydicom.dcmread(stop_before_pixels=True)`),
cached per file (path, size, mtime): 512 synthetic files take ~0.25 s cold on 2 CPU cores,
a few ms once cached, so the assembler can re-check a held-back study every sweep.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom
import pydicom.errors

from dicomnode.config import CtInputSpec, InputSpec, PetInputSpec

# The series modality behind each kind of model channel (config: models.channels).
CHANNEL_SOURCES = {"CT": "CT", "PET": "PT"}

_POSITION_TOLERANCE_MM = 0.01  # absolute, plus 0.1 % of the slice spacing (as volumes.py)
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
    time_frames: int  # the largest of NumberOfTimeSlices, NumberOfTimeSlots, NumberOfFrames (1 if absent)
    slice_thickness: float | None
    orientation: tuple[float, ...] | None  # ImageOrientationPatient
    z: float | None  # ImagePositionPatient along the slice normal, mm


def _values(ds, keyword: str) -> tuple[str, ...]:  # noqa: ANN001
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        value = [value]
    return tuple(str(v).strip().upper() for v in value if str(v).strip())


def _int(ds, keyword: str) -> int | None:  # noqa: ANN001
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float(ds, keyword: str) -> float | None:  # noqa: ANN001
    try:
        value = ds.get(keyword)
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def facts_from_dataset(ds, path: str | Path = "") -> InstanceFacts:  # noqa: ANN001 - pydicom Dataset
    orientation = z = None
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
        ipp = [float(v) for v in ds.ImagePositionPatient]
        if len(iop) == 6 and len(ipp) == 3:
            orientation = tuple(iop)
            (a1, a2, a3), (b1, b2, b3) = iop[:3], iop[3:]
            normal = (a2 * b3 - a3 * b2, a3 * b1 - a1 * b3, a1 * b2 - a2 * b1)
            z = normal[0] * ipp[0] + normal[1] * ipp[1] + normal[2] * ipp[2]
    except (AttributeError, TypeError, ValueError):
        pass
    frames = [_int(ds, k) for k in ("NumberOfTimeSlices", "NumberOfTimeSlots", "NumberOfFrames")]
    return InstanceFacts(
        path=str(path),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        modality=str(ds.get("Modality", "") or "").strip().upper(),
        series_number=_int(ds, "SeriesNumber"),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        series_datetime=f"{ds.get('SeriesDate', '') or ''}{ds.get('SeriesTime', '') or ''}",
        image_type=_values(ds, "ImageType"),
        corrected_image=_values(ds, "CorrectedImage"),
        series_type=_values(ds, "SeriesType"),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
        number_of_slices=_int(ds, "NumberOfSlices"),
        time_frames=max([f for f in frames if f is not None] or [1]),
        slice_thickness=_float(ds, "SliceThickness"),
        orientation=orientation,
        z=z,
    )


_cache: "OrderedDict[str, tuple[int, int, InstanceFacts]]" = OrderedDict()
_cache_lock = threading.Lock()


def read_facts(path: str | Path) -> InstanceFacts:
    """One file's facts (headers only), cached while the file's size and mtime stay the same."""
    key = str(path)
    try:
        stat = os.stat(key)
    except OSError as exc:
        raise FactsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] == stat.st_size and hit[1] == stat.st_mtime_ns:
            _cache.move_to_end(key)
            return hit[2]
    try:
        ds = pydicom.dcmread(key, stop_before_pixels=True, defer_size="4 KB")
        facts = facts_from_dataset(ds, key)
    except (OSError, pydicom.errors.InvalidDicomError, ValueError, TypeError, AttributeError) as exc:
        raise FactsError(f"cannot read {path}: {exc}") from exc
    with _cache_lock:
        _cache[key] = (stat.st_size, stat.st_mtime_ns, facts)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return facts


# --- series -------------------------------------------------------------------------------


@dataclass
class SeriesFacts:
    """One series: its instances' facts (one per SOP Instance UID) and the files that could not be read."""

    series_uid: str
    instances: list[InstanceFacts]
    unreadable: list[str] = field(default_factory=list)
    last_received_at: datetime | None = None
    # From the index when a file cannot be read: what the series is called there.
    indexed_modality: str = ""
    indexed_number: int | None = None
    indexed_description: str = ""

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
        return len(self.instances) + len(self.unreadable)

    @property
    def paths(self) -> list[str]:
        return [i.path for i in self.instances]

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
        return f"{self.modality or '?'} {number}{description}, {self.count} instance{'s' if self.count != 1 else ''}"


def group_series(facts: Iterable[InstanceFacts]) -> list[SeriesFacts]:
    """Instances -> series (a SOP Instance UID seen twice counts once)."""
    by_series: dict[str, dict[str, InstanceFacts]] = {}
    for f in facts:
        by_series.setdefault(f.series_uid, {}).setdefault(f.sop_instance_uid, f)
    return [SeriesFacts(uid, list(instances.values())) for uid, instances in by_series.items()]


@dataclass(frozen=True)
class Geometry:
    z_min: float
    z_max: float
    spacing: float | None  # None for one slice


def _geometry(series: SeriesFacts) -> tuple[Geometry | None, str | None]:
    """The series' slice positions as one regular stack, or the reason they are not."""
    if series.unreadable:
        return None, f"{len(series.unreadable)} file(s) cannot be read"
    if not series.instances:
        return None, "no instances"
    if any(i.z is None for i in series.instances):
        return None, "instances without ImagePositionPatient/ImageOrientationPatient"
    orientations = np.array([i.orientation for i in series.instances])
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        return None, "mixed ImageOrientationPatient"
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    if abs(abs(normal[2]) - 1.0) > 1e-3:
        return None, "not axial (ImageOrientationPatient " + "\\".join(f"{v:g}" for v in orientations[0]) + ")"
    z = np.sort(np.array([i.z for i in series.instances]))
    if len(z) == 1:
        return Geometry(float(z[0]), float(z[0]), None), None
    steps = np.diff(z)
    duplicates = int((steps < _POSITION_TOLERANCE_MM).sum())
    if duplicates:
        return None, f"{duplicates} duplicate slice position(s)"
    spacing = float(np.median(steps))
    irregular = np.abs(steps - spacing) > _POSITION_TOLERANCE_MM + 1e-3 * spacing
    if irregular.any():
        k = int(np.argmax(irregular))
        missing = round(steps[k] / spacing) - 1
        what = f"{missing} slice(s) missing" if missing >= 1 else "irregular spacing"
        return None, f"gap in slice positions between z = {z[k]:.1f} and {z[k + 1]:.1f} mm ({what})"
    return Geometry(float(z[0]), float(z[-1]), spacing), None


# --- verdicts -----------------------------------------------------------------------------

USED, IGNORED, WAITING = "used", "ignored", "waiting"


@dataclass(frozen=True)
class Verdict:
    series_uid: str
    modality: str
    series_number: int | None
    description: str
    instances: int
    state: str  # used, ignored, waiting
    channel: str | None  # the channel it fills (used) or would fill (waiting)
    reasons: tuple[str, ...] = ()
    label: str = ""

    @property
    def text(self) -> str:
        if self.state == USED:
            return f"used for channel {self.channel}"
        if self.state == WAITING:
            return f"waiting for channel {self.channel}: " + "; ".join(self.reasons)
        return "ignored because " + "; ".join(self.reasons)

    @property
    def message(self) -> str:
        return f"{self.label}: {self.text} [{self.series_uid}]"

    def as_dict(self) -> dict:
        return {"series_uid": self.series_uid, "modality": self.modality, "series_number": self.series_number,
                "description": self.description, "instances": self.instances, "state": self.state,
                "channel": self.channel, "reasons": list(self.reasons), "verdict": self.text}


@dataclass
class Selection:
    verdicts: list[Verdict]
    chosen: dict[str, SeriesFacts]  # channel name -> series
    waiting: list[str]  # why the study must wait: series still arriving
    missing: list[str]  # channels that no series can fill, with the reason

    @property
    def ready(self) -> bool:
        return not self.waiting and not self.missing

    @property
    def problem(self) -> str:
        return "; ".join(self.waiting + self.missing)

    def paths(self, channel: str) -> list[Path]:
        return [Path(p) for p in self.chosen[channel].paths]


def _image_type_reasons(series: SeriesFacts, required: list[str], excluded: list[str]) -> list[str]:
    reasons = []
    lacking = [v for v in required if v.upper() not in series.common_values("image_type")]
    if lacking:
        reasons.append(f"ImageType {_show(series, 'image_type')} lacks {'/'.join(lacking)}")
    present = sorted(series.all_values("image_type") & {v.upper() for v in excluded})
    if present:
        reasons.append(f"ImageType is {'/'.join(present)}")
    return reasons


def _pet_reasons(series: SeriesFacts, spec: PetInputSpec) -> tuple[list[str], str | None, Geometry | None]:
    """(reasons it cannot be used, why it must be waited for, geometry)."""
    reasons = _image_type_reasons(series, spec.image_type, spec.excluded_image_types)
    series_type = series.all_values("series_type")
    bad_types = sorted(series_type & {v.upper() for v in spec.excluded_series_types})
    if bad_types:
        reasons.append(f"SeriesType {_show(series, 'series_type')} is {'/'.join(bad_types)}")
    corrected = series.common_values("corrected_image")
    lacking = [v for v in spec.corrected_image if v.upper() not in corrected]
    if lacking:
        reasons.append(f"CorrectedImage {_show(series, 'corrected_image')} lacks {'/'.join(lacking)}")
    if spec.static_only:
        frames = max(series.distinct("time_frames") or {1})
        if frames > 1:
            reasons.append(f"not static: {frames} time slices/slots/frames")
    waiting = None
    geometry, problem = _geometry(series)
    expected = {n for n in series.distinct("number_of_slices") if n}
    if len(expected) > 1:
        reasons.append(f"mixed NumberOfSlices {sorted(expected)}")
    elif expected:
        (n,) = expected
        if series.count > n:
            reasons.append(f"{series.count} instances but NumberOfSlices is {n}")
        elif series.count < n:
            waiting = f"{series.label()} has {series.count} of {n} instances (NumberOfSlices): still arriving"
            if not series.unreadable:
                problem = None  # gaps are expected while instances are missing
    if problem:
        reasons.append(problem)
    return reasons, waiting, geometry


def _ct_reasons(series: SeriesFacts, spec: CtInputSpec, pet: SeriesFacts | None,
                pet_geometry: Geometry | None) -> tuple[list[str], Geometry | None]:
    reasons = _image_type_reasons(series, spec.image_type, spec.excluded_image_types)
    geometry, problem = _geometry(series)
    if problem:
        reasons.append(problem)
    if pet is not None and spec.same_frame_of_reference:
        pet_for = pet.distinct("frame_of_reference_uid")
        ct_for = series.distinct("frame_of_reference_uid")
        if len(ct_for) != 1 or ct_for != pet_for or "" in ct_for:
            reasons.append(f"FrameOfReferenceUID {'/'.join(sorted(ct_for)) or 'missing'} is not the PET's")
    if spec.cover_pet and geometry is not None and pet_geometry is not None:
        half = (geometry.spacing or series.slice_thickness or 0.0) / 2.0 + _POSITION_TOLERANCE_MM
        if geometry.z_min - half > pet_geometry.z_min or geometry.z_max + half < pet_geometry.z_max:
            reasons.append(
                f"z range {geometry.z_min:.1f} to {geometry.z_max:.1f} mm does not cover the PET's "
                f"{pet_geometry.z_min:.1f} to {pet_geometry.z_max:.1f} mm"
            )
    return reasons, geometry


def _show(series: SeriesFacts, attribute: str) -> str:
    values = series.distinct(attribute)
    if len(values) == 1:
        (value,) = values
        return "\\".join(value) if value else "(missing)"
    return "mixed"


def _none_fits(channel: str, candidates: list[SeriesFacts], reasons: dict[str, list[str]]) -> str:
    why = "; ".join(f"{s.label()}: {', '.join(reasons[s.series_uid])}" for s in candidates)
    return f"no {channel} series fits the model's {channel} input spec ({why})"


def select_inputs(series: list[SeriesFacts], channels: Iterable[str], spec: InputSpec | None = None) -> Selection:
    """Give every series a verdict and choose one series per channel ("CT", "PET")."""
    spec = spec or InputSpec()
    channels = list(dict.fromkeys(channels))
    reasons: dict[str, list[str]] = {s.series_uid: [] for s in series}
    waiting_reason: dict[str, str] = {}
    chosen: dict[str, SeriesFacts] = {}
    waiting: list[str] = []
    missing: list[str] = []
    wanted = {CHANNEL_SOURCES[c] for c in channels}
    for s in series:
        if s.modality not in wanted:
            reasons[s.series_uid].append(
                f"modality {s.modality or '(missing)'} is not an input of the model (channels {', '.join(channels)})"
            )

    # PET first: the CT is matched to it.
    pets = [s for s in series if s.modality == "PT"]
    pet_geometry: dict[str, Geometry | None] = {}
    pet_ref: SeriesFacts | None = None
    if "PET" in channels:
        fitting: list[SeriesFacts] = []
        growing: list[SeriesFacts] = []
        for s in pets:
            why, wait, geometry = _pet_reasons(s, spec.pet)
            reasons[s.series_uid].extend(why)
            pet_geometry[s.series_uid] = geometry
            if not why and wait:
                waiting_reason[s.series_uid] = wait
                growing.append(s)
            elif not why:
                fitting.append(s)
        if growing:
            waiting.extend(waiting_reason[s.series_uid] for s in growing)
        if fitting:
            fitting.sort(key=lambda s: (s.count, s.latest_key), reverse=True)
            chosen["PET"] = pet_ref = fitting[0]
            for other in fitting[1:]:
                reasons[other.series_uid].append(
                    f"{pet_ref.label()} is preferred (rule: most instances, then the latest)"
                )
        elif growing:
            pet_ref = max(growing, key=lambda s: (s.count, s.latest_key))
        else:
            missing.append(_none_fits("PET", pets, reasons) if pets else "no PET series in the study")

    if "CT" in channels:
        cts = [s for s in series if s.modality == "CT"]
        fitting = []
        ref_geometry = pet_geometry.get(pet_ref.series_uid) if pet_ref is not None and "PET" in chosen else None
        for s in cts:
            why, _ = _ct_reasons(s, spec.ct, pet_ref, ref_geometry)
            reasons[s.series_uid].extend(why)
            if not why:
                fitting.append(s)
        if fitting:
            pet_thickness = pet_ref.slice_thickness if pet_ref is not None else None

            def rank(s: SeriesFacts) -> tuple:
                thickness = s.slice_thickness
                distance = abs(thickness - pet_thickness) if thickness is not None and pet_thickness is not None else float("inf")
                return (-distance, s.count, s.latest_key)

            fitting.sort(key=rank, reverse=True)
            chosen["CT"] = best = fitting[0]
            for other in fitting[1:]:
                reasons[other.series_uid].append(
                    f"{best.label()} is preferred (rule: SliceThickness closest to the PET's"
                    f"{f' {pet_thickness:g} mm' if pet_thickness is not None else ''}, then most instances, then the latest)"
                )
        else:
            missing.append(_none_fits("CT", cts, reasons) if cts else "no CT series in the study")

    used = {s.series_uid: channel for channel, s in chosen.items()}
    verdicts = []
    for s in sorted(series, key=lambda s: (s.series_number is None, s.series_number or 0, s.series_uid)):
        if s.series_uid in used:
            state, channel, why = USED, used[s.series_uid], ()
        elif s.series_uid in waiting_reason and not reasons[s.series_uid]:
            state, channel, why = WAITING, "PET", (waiting_reason[s.series_uid],)
        else:
            state, channel, why = IGNORED, None, tuple(reasons[s.series_uid]) or ("not chosen",)
        verdicts.append(Verdict(s.series_uid, s.modality, s.series_number, s.description, s.count, state, channel, why, s.label()))
    return Selection(verdicts=verdicts, chosen=chosen, waiting=waiting, missing=missing)


# --- sources of facts ---------------------------------------------------------------------


def series_from_index(session, study_uid: str) -> list[SeriesFacts]:  # noqa: ANN001 - sqlalchemy Session
    """A received study's series, facts read from the spooled files (cached)."""
    from sqlalchemy import select

    from dicomnode.db import Instance, Series

    rows = session.execute(
        select(Instance.series_uid, Instance.sop_instance_uid, Instance.path).where(Instance.study_uid == study_uid)
    ).all()
    indexed = {s.series_uid: s for s in session.scalars(select(Series).where(Series.study_uid == study_uid))}
    by_series: dict[str, SeriesFacts] = {}
    for series_uid, _sop, path in rows:
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
        except FactsError:
            s.unreadable.append(path)
    return list(by_series.values())


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
