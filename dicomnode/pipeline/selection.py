"""Which series of a study fill a model's input channels, and whether the study is ready.

A study from a real scanner holds more than the model needs: non-attenuation-corrected PET,
MIPs, localizers, CTs reconstructed at several slice thicknesses, dynamic or gated PET, MR
localizers, ADC maps. `select_inputs` applies the model's input spec (config
`[models.inputs.pet]`, `[models.inputs.ct]`, `[models.inputs.NAME]`; defaults below) to
every series and gives each one a verdict: "used for channel X" or "ignored because ...".
Both the assembler (is the study ready? `applies_to`: is it one for this model?) and the
worker (which files?) and `dicomnode inspect` use it, on the same header facts.

Every channel's rule may also hold SeriesDescription patterns (`series_description`: one
must match, `exclude_series_description`: none may; case-insensitive shell globs).

PET (channel "PET"), every rule must hold:
  * Modality PT; ImageType contains ORIGINAL; SeriesType has none of REPROJECTION, DYNAMIC,
    GATED; CorrectedImage contains ATTN and DECY (DECY need not be there when DecayCorrection
    is NONE: the values are not decay-corrected and SUV decays the dose to the acquisition);
  * static: NumberOfTimeSlices, NumberOfTimeSlots and NumberOfFrames absent or 1;
  * consistent: one orientation, no duplicate slice positions, no gaps, and no more
    instances than NumberOfSlices. Fewer instances than NumberOfSlices: the series is still
    arriving ("waiting"), and the study is held back until it is complete.
  Enhanced multi-frame instances count by their frames: each frame is a slice (its position
  from the functional groups), NumberOfSlices is compared with the frames, time frames are
  counted among the frames (TemporalPositionIndex), not NumberOfFrames; an instance that is
  one part of a concatenation (ConcatenationUID) with parts missing (InConcatenationTotalNumber)
  is still arriving (for CT and named channels: a reason to ignore it until it is complete).
  Several fit: the most instances, then the latest (SeriesDate/Time, then SeriesNumber).

CT (channel "CT"):
  * Modality CT; ImageType contains AXIAL and not LOCALIZER;
  * the PET's FrameOfReferenceUID; its slices (centres +- half a slice) cover the PET's
    slice centres; one orientation, no duplicate slice positions, no gaps.
  Several fit: SliceThickness closest to the PET's, then the most instances, then the latest.
  Without a PET channel (a CT-only model) the CT rules that refer to the PET do not apply.

Named channels (e.g. "FLAIR", "T1", "T1CE", "T2"; filled as stored), each by its own rule:
  * the rule's Modality (default MR); its SeriesDescription patterns; ImageType not LOCALIZER;
    one orientation, no duplicate slice positions, no gaps;
  * the FrameOfReferenceUID of the grid channel's series (`same_frame_of_reference`);
  * a series that fits two channels' rules fills neither: the patterns must tell them apart.
  Several fit: the latest (SeriesDate/Time, then SeriesNumber: a repeated sequence replaces
  the first), then the most instances.

Series of a class no model reads (SR, SEG, SC, PDF, presentation states, RT objects; see
dicomnode.imaging.sopclasses) are never chosen: "not an input of any model", or, for the node's
own results sent back by the PACS, "a result of this node (job N)".

Header facts are dicomnode.imaging.headers' (cached per file); slice stacks are checked by
dicomnode.imaging.geometry, with the same rule and tolerance as volume building.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterable

from dicomnode.config import (
    CHANNEL_MODALITIES,
    CtInputSpec,
    InputSpec,
    ModelSettings,
    NamedInputSpec,
    PetInputSpec,
    SeriesPatterns,
    channel_modality,
)
from dicomnode.imaging.geometry import (
    GeometryError,
    SliceStack,
    position_tolerance,
    slice_stack,
)
from dicomnode.imaging.headers import SeriesFacts
from dicomnode.imaging.sopclasses import class_name


def _unreadable(series: SeriesFacts) -> str:
    sop_uid, why = series.unreadable[0]
    more = len(series.unreadable) - 1
    return f"unreadable instance {sop_uid}: {why}" + (f" (and {more} more)" if more else "")


def _geometry(series: SeriesFacts) -> tuple[SliceStack | None, str | None]:
    """The series' slices as one regular stack (dicomnode.imaging.geometry), or the reason they are not."""
    if series.unreadable:
        return None, _unreadable(series)
    if not series.instances:
        return None, "no instances"
    if any(not i.planes for i in series.instances):
        return None, "instances without ImagePositionPatient/ImageOrientationPatient"
    planes = series.planes  # every frame of an enhanced multi-frame instance is a slice
    try:
        return slice_stack([o for o, _ in planes], [p for _, p in planes]), None
    except GeometryError as exc:
        return None, str(exc)


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


def _description_mismatch(series: SeriesFacts, rule: SeriesPatterns) -> str | None:
    """How SeriesDescription fails the rule's case-insensitive globs, or None."""
    text = series.description.lower()
    if rule.series_description and not any(fnmatchcase(text, p.lower()) for p in rule.series_description):
        return f"matches none of {', '.join(rule.series_description)}"
    excluded = [p for p in rule.exclude_series_description if fnmatchcase(text, p.lower())]
    return f"matches the excluded {excluded[0]}" if excluded else None


def _description_reasons(series: SeriesFacts, rule: SeriesPatterns) -> list[str]:
    mismatch = _description_mismatch(series, rule)
    return [f'SeriesDescription "{series.description}" {mismatch}'] if mismatch else []


def _pet_reasons(series: SeriesFacts, spec: PetInputSpec) -> tuple[list[str], str | None, SliceStack | None]:
    """(reasons it cannot be used, why it must be waited for, geometry)."""
    if series.unreadable:  # the other facts would be of the readable part only
        return [_unreadable(series)], None, None
    reasons = _description_reasons(series, spec)
    reasons += _image_type_reasons(series, spec.image_type, spec.excluded_image_types)
    series_type = series.all_values("series_type")
    bad_types = sorted(series_type & {v.upper() for v in spec.excluded_series_types})
    if bad_types:
        reasons.append(f"SeriesType {_show(series, 'series_type')} is {'/'.join(bad_types)}")
    corrected = series.common_values("corrected_image")
    lacking = [v for v in spec.corrected_image if v.upper() not in corrected]
    if "DECY" in lacking and series.distinct("decay_correction") == {"NONE"}:
        lacking.remove("DECY")  # says it is not decay-corrected: SUV decays the dose to the acquisition
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
        what = "frames" if series.slices != series.count else "instances"  # enhanced multi-frame: its frames
        if series.slices > n:
            reasons.append(f"{series.slices} {what} but NumberOfSlices is {n}")
        elif series.slices < n:
            waiting = f"{series.label()} has {series.slices} of {n} {what} (NumberOfSlices): still arriving"
            if not series.unreadable:
                problem = None  # gaps are expected while instances are missing
    arriving = series.concatenation_arriving()
    if arriving and not waiting:
        waiting, problem = arriving, None
    if problem:
        reasons.append(problem)
    return reasons, waiting, geometry


def _ct_reasons(
    series: SeriesFacts, spec: CtInputSpec, pet: SeriesFacts | None, pet_geometry: SliceStack | None
) -> tuple[list[str], SliceStack | None]:
    if series.unreadable:
        return [_unreadable(series)], None
    reasons = _description_reasons(series, spec) + _image_type_reasons(
        series, spec.image_type, spec.excluded_image_types
    )
    geometry, problem = _geometry(series)
    problem = series.concatenation_arriving() or problem
    if problem:
        reasons.append(problem)
    if pet is not None and spec.same_frame_of_reference:
        reasons.extend(_frame_of_reference_reasons(series, pet, "PET"))
    if spec.cover_pet and geometry is not None and pet_geometry is not None:
        spacing = geometry.spacing or series.slice_thickness or 0.0
        half = spacing / 2.0 + position_tolerance(spacing)
        if geometry.z_min - half > pet_geometry.z_min or geometry.z_max + half < pet_geometry.z_max:
            reasons.append(
                f"z range {geometry.z_min:.1f} to {geometry.z_max:.1f} mm does not cover the PET's "
                f"{pet_geometry.z_min:.1f} to {pet_geometry.z_max:.1f} mm"
            )
    return reasons, geometry


def _named_reasons(series: SeriesFacts, rule: NamedInputSpec) -> tuple[str | None, list[str]]:
    """(how SeriesDescription fails the rule or None, the other reasons it cannot fill the channel)."""
    if series.unreadable:
        return None, [_unreadable(series)]
    reasons = _image_type_reasons(series, rule.image_type, rule.excluded_image_types)
    _, problem = _geometry(series)
    problem = series.concatenation_arriving() or problem
    return _description_mismatch(series, rule), reasons + ([problem] if problem else [])


def _misses(series: SeriesFacts, missed: dict[str, tuple[str | None, list[str]]]) -> list[str]:
    """Why a series fills none of the named channels of its modality; said once where they agree."""
    other = list(dict.fromkeys(r for _, reasons in missed.values() for r in reasons))
    if all(mismatch for mismatch, _ in missed.values()):
        each = "; ".join(f"{c}: {mismatch}" for c, (mismatch, _) in missed.items())
        return [f'SeriesDescription "{series.description}" fits no channel ({each})', *other]
    return [f"for channel {c}: {', '.join(([m] if m else []) + reasons)}" for c, (m, reasons) in missed.items()]


def _frame_of_reference_reasons(series: SeriesFacts, reference: SeriesFacts, channel: str) -> list[str]:
    ours, theirs = series.distinct("frame_of_reference_uid"), reference.distinct("frame_of_reference_uid")
    if len(ours) != 1 or ours != theirs or "" in ours:
        return [f"FrameOfReferenceUID {'/'.join(sorted(ours)) or 'missing'} is not the {channel}'s"]
    return []


def _show(series: SeriesFacts, attribute: str) -> str:
    values = series.distinct(attribute)
    if len(values) == 1:
        (value,) = values
        return "\\".join(value) if value else "(missing)"
    return "mixed"


def _none_fits(channel: str, candidates: list[SeriesFacts], reasons: dict[str, list[str]]) -> str:
    why = "; ".join(f"{s.label()}: {', '.join(reasons[s.series_uid])}" for s in candidates)
    return f"no {channel} series fits the model's {channel} input spec ({why})"


@dataclass
class _Choosing:
    """What select_inputs has found so far."""

    reasons: dict[str, list[str]]  # series uid -> why it is not used
    chosen: dict[str, SeriesFacts] = field(default_factory=dict)
    waiting_reason: dict[str, str] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def select_inputs(
    series: list[SeriesFacts], channels: Iterable[str], spec: InputSpec | None = None, grid: str | None = None
) -> Selection:
    """Give every series a verdict and choose one series per channel: "PET", "CT" and named
    channels (`spec`'s [models.inputs.NAME]); `grid` (default: PET if a channel, else the
    first) is the channel whose frame of reference the named channels must share."""
    spec = spec or InputSpec()
    channels = list(dict.fromkeys(channels))
    state = _Choosing({s.series_uid: [] for s in series})  # every series, inputs or not
    wanted = {channel_modality(c, spec) for c in channels}
    everything, series = series, [s for s in series if s.is_input]
    for s in everything:
        if not s.is_input:
            state.reasons[s.series_uid].append(_not_an_input(s))
        elif s.modality not in wanted:
            state.reasons[s.series_uid].append(
                f"modality {s.modality or '(missing)'} is not an input of the model (channels {', '.join(channels)})"
            )
    pet_ref, pet_geometry = _choose_pet(series, spec.pet, state) if "PET" in channels else (None, None)
    if "CT" in channels:
        _choose_ct(series, spec.ct, pet_ref if "PET" in state.chosen else None, pet_geometry, state)
    named = [c for c in channels if c not in CHANNEL_MODALITIES]
    if named:
        grid = grid or ("PET" if "PET" in channels else channels[0])
        _choose_named(series, named, spec, grid, state)
    return Selection(
        verdicts=_verdicts(everything, state), chosen=state.chosen, waiting=state.waiting, missing=state.missing
    )


def _choose_pet(
    series: list[SeriesFacts], spec: PetInputSpec, state: _Choosing
) -> tuple[SeriesFacts | None, SliceStack | None]:
    """The PET (first: the CT is matched to it); returns it (or the one still arriving) and its geometry."""
    pets = [s for s in series if s.modality == "PT"]
    geometry: dict[str, SliceStack | None] = {}
    fitting: list[SeriesFacts] = []
    growing: list[SeriesFacts] = []
    for s in pets:
        why, wait, geometry[s.series_uid] = _pet_reasons(s, spec)
        state.reasons[s.series_uid].extend(why)
        if not why and wait:
            state.waiting_reason[s.series_uid] = wait
            growing.append(s)
        elif not why:
            fitting.append(s)
    state.waiting.extend(state.waiting_reason[s.series_uid] for s in growing)
    if fitting:
        fitting.sort(key=lambda s: (s.count, s.latest_key), reverse=True)
        state.chosen["PET"] = best = fitting[0]
        for other in fitting[1:]:
            state.reasons[other.series_uid].append(
                f"{best.label()} is preferred (rule: most instances, then the latest)"
            )
        return best, geometry[best.series_uid]
    if growing:
        return max(growing, key=lambda s: (s.count, s.latest_key)), None
    state.missing.append(_none_fits("PET", pets, state.reasons) if pets else "no PET series in the study")
    return None, None


def _choose_ct(
    series: list[SeriesFacts],
    spec: CtInputSpec,
    pet: SeriesFacts | None,
    pet_geometry: SliceStack | None,
    state: _Choosing,
) -> None:
    cts = [s for s in series if s.modality == "CT"]
    fitting = []
    for s in cts:
        why, _ = _ct_reasons(s, spec, pet, pet_geometry)
        state.reasons[s.series_uid].extend(why)
        if not why:
            fitting.append(s)
    if not fitting:
        state.missing.append(_none_fits("CT", cts, state.reasons) if cts else "no CT series in the study")
        return
    pet_thickness = pet.slice_thickness if pet is not None else None

    def rank(s: SeriesFacts) -> tuple:
        thickness = s.slice_thickness
        distance = (
            abs(thickness - pet_thickness) if thickness is not None and pet_thickness is not None else float("inf")
        )
        return (-distance, s.count, s.latest_key)

    fitting.sort(key=rank, reverse=True)
    state.chosen["CT"] = best = fitting[0]
    rule = (
        f"SliceThickness closest to the PET's {pet_thickness:g} mm, then most instances, then the latest"
        if pet_thickness is not None
        else "most instances, then the latest"
    )
    for other in fitting[1:]:
        state.reasons[other.series_uid].append(f"{best.label()} is preferred (rule: {rule})")


def _choose_named(series: list[SeriesFacts], names: list[str], spec: InputSpec, grid: str, state: _Choosing) -> None:
    """Named channels (MR and other "as stored" series) by their [models.inputs.NAME] rules.
    The grid channel's series gives the frame of reference (a named grid channel comes first)."""
    reference = state.chosen.get(grid)
    fits: dict[str, list[str]] = {}
    for s in series:
        missed = {}
        for c in names:
            rule = spec.named(c)
            if s.modality == rule.modality:
                mismatch, why = _named_reasons(s, rule)
                if mismatch or why:
                    missed[c] = (mismatch, why)
                else:
                    fits.setdefault(s.series_uid, []).append(c)
        if missed and s.series_uid not in fits:
            state.reasons[s.series_uid].extend(_misses(s, missed))
    for uid, matched in fits.items():
        if len(matched) > 1:
            state.reasons[uid].append(
                f"fits channels {' and '.join(matched)}: their series_description patterns must tell them apart"
            )
    for c in sorted(names, key=lambda c: c != grid):
        rule = spec.named(c)
        candidates = [s for s in series if fits.get(s.series_uid) == [c]]
        if reference is not None and rule.same_frame_of_reference:
            elsewhere = {s.series_uid: _frame_of_reference_reasons(s, reference, f"{grid} series") for s in candidates}
            for uid, why in elsewhere.items():
                state.reasons[uid].extend(why)
            candidates = [s for s in candidates if not elsewhere[s.series_uid]]
        if not candidates:
            of_modality = [s for s in series if s.modality == rule.modality]
            state.missing.append(
                _none_fits(c, of_modality, state.reasons)
                if of_modality
                else f"no {rule.modality} series in the study for channel {c}"
            )
            continue
        candidates.sort(key=lambda s: (s.latest_key, s.count), reverse=True)
        state.chosen[c] = best = candidates[0]
        reference = reference or best
        for other in candidates[1:]:
            state.reasons[other.series_uid].append(
                f"{best.label()} is preferred for channel {c} (rule: the latest, then the most instances)"
            )


def _not_an_input(series: SeriesFacts) -> str:
    what = class_name(series.sop_class_uid)
    if series.node_result_of is not None:
        return f"a result of this node (job {series.node_result_of}, {what}) sent back: not an input of any model"
    return f"not an input of any model: {what} is stored, not read"


def _verdicts(series: list[SeriesFacts], state: _Choosing) -> list[Verdict]:
    used = {s.series_uid: channel for channel, s in state.chosen.items()}
    verdicts = []
    for s in sorted(series, key=lambda s: (s.series_number is None, s.series_number or 0, s.series_uid)):
        if s.series_uid in used:
            verdict_state, channel, why = USED, used[s.series_uid], ()
        elif s.series_uid in state.waiting_reason and not state.reasons[s.series_uid]:
            verdict_state, channel, why = WAITING, "PET", (state.waiting_reason[s.series_uid],)
        else:
            verdict_state, channel, why = IGNORED, None, tuple(state.reasons[s.series_uid]) or ("not chosen",)
        verdicts.append(
            Verdict(
                s.series_uid,
                s.modality,
                s.series_number,
                s.description,
                s.count,
                verdict_state,
                channel,
                why,
                s.label(),
            )
        )
    return verdicts


def applies_to(series: list[SeriesFacts], settings: ModelSettings) -> str | None:
    """None when the model applies to the study of `series` (config [models.applies_to]), else why not."""
    present = {s.modality for s in series if s.is_input}
    rule = settings.applies_to
    if rule.modalities is not None:
        lacking = [m for m in rule.modalities if m not in present]
        if lacking:
            return (
                f"model {settings.name} applies to studies with {', '.join(rule.modalities)}: no {', '.join(lacking)}"
            )
    elif not present & set(settings.required_modalities):
        return f"model {settings.name} takes {', '.join(settings.required_modalities)}: none in the study"
    for keyword, patterns in rule.tags.items():
        values = {dict(i.tags).get(keyword, "") for s in series for i in s.instances[:1]}
        if not any(fnmatchcase(v.lower(), p.lower()) for v in values for p in patterns):
            shown = ", ".join(f'"{v}"' for v in sorted(values)) or "(none)"
            return f"model {settings.name} applies to {keyword} {' or '.join(patterns)}: the study has {shown}"
    return None
