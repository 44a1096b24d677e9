"""A follow-up PET/CT compared with its prior (issue 16): `compare(current, prior)` -> Comparison.

Steps, each in its own module:

1. SUL of each study (dicomnode.imaging.sul: Janmahasatian lean body mass); without it the
   values are given in SUVbw and the category is not assessable.
2. The liver reference of each study (dicomnode.imaging.liver_reference), in the uptake's unit.
3. Lesions of each study measured on its own grid (dicomnode.imaging.measures: connected
   components numbered by SUVmax, SULpeak = the 1 cm^3 local peak, MTV, TLG = SULmean x MTV),
   so the current lesion numbers are the SR's.
4. The prior CT registered onto the current CT (dicomnode.imaging.registration); the prior's
   numbered lesions mapped onto the current PET grid (nearest neighbour) and their centroids
   into the current space; without a CT in either study, scanner coordinates are taken as they
   are and the comparison says so.
5. Lesions matched (dicomnode.imaging.lesion_match): matched, new, resolved.
6. PERCIST 1.0 (dicomnode.imaging.percist).

`Comparison.as_json()` is what events, `jobs show` and measures.json carry; `lines()` a plain
text table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date

import numpy as np
from scipy import ndimage

from dicomnode.imaging.lesion_match import LesionPair, MatchStatus, match_lesions
from dicomnode.imaging.liver_reference import LiverReference, liver_reference, not_assessed
from dicomnode.imaging.measures import LesionMeasures, StudyMeasures, measure_lesions
from dicomnode.imaging.percist import Response, StudyFigures, categorise
from dicomnode.imaging.registration import Registration, RegistrationError, identity_registration, register_ct
from dicomnode.imaging.sul import SulError, SulFactor, sul_factor
from dicomnode.imaging.timepoint import TimePoint


@dataclass(frozen=True)
class LesionValues:
    """One lesion of one study, in the comparison's uptake unit."""

    number: int
    peak: float  # SULpeak (SUVpeak when no SUL)
    max: float
    mean: float
    mtv_ml: float
    tlg: float  # mean x MTV
    centroid_mm: tuple[float, float, float]  # in the current study's space (the prior's mapped)

    @classmethod
    def of(cls, lesion: LesionMeasures, centroid: np.ndarray) -> "LesionValues":
        return cls(lesion.number, lesion.suv_peak, lesion.suv_max, lesion.suv_mean, lesion.volume_ml, lesion.tlg_g,
                   tuple(float(v) for v in centroid))

    def as_json(self) -> dict:
        return {"number": self.number, "peak": self.peak, "max": self.max, "mean": self.mean, "mtv_ml": self.mtv_ml,
                "tlg": self.tlg, "centroid_mm": list(self.centroid_mm)}


@dataclass(frozen=True)
class LesionChange:
    """A row of the matching table: a matched pair, a new lesion or a resolved one."""

    pair: LesionPair
    current: LesionValues | None
    prior: LesionValues | None

    @property
    def status(self) -> MatchStatus:
        return self.pair.status

    @property
    def peak_change_percent(self) -> float | None:
        return _percent(self.prior.peak, self.current.peak) if self.current and self.prior else None

    @property
    def mtv_change_percent(self) -> float | None:
        return _percent(self.prior.mtv_ml, self.current.mtv_ml) if self.current and self.prior else None

    @property
    def tlg_change_percent(self) -> float | None:
        return _percent(self.prior.tlg, self.current.tlg) if self.current and self.prior else None

    def as_json(self) -> dict:
        return {**self.pair.as_json(), "current_values": self.current.as_json() if self.current else None,
                "prior_values": self.prior.as_json() if self.prior else None,
                "peak_change_percent": self.peak_change_percent, "mtv_change_percent": self.mtv_change_percent,
                "tlg_change_percent": self.tlg_change_percent}


@dataclass(frozen=True)
class StudySummary:
    study_uid: str
    study_date: str
    sul: SulFactor | None
    sul_reason: str
    liver: LiverReference
    lesion_count: int
    total_mtv_ml: float
    total_tlg: float
    hottest: LesionValues | None
    uptake_factor: float = 1.0  # the comparison's uptake values = SUVbw x this (LBM/W for SUL, else 1)

    def as_json(self) -> dict:
        return {"study_uid": self.study_uid, "study_date": self.study_date, "uptake_factor": self.uptake_factor,
                "sul": self.sul.as_json() if self.sul else None, "sul_reason": self.sul_reason,
                "liver": self.liver.as_json(), "lesion_count": self.lesion_count, "total_mtv_ml": self.total_mtv_ml,
                "total_tlg": self.total_tlg, "hottest": self.hottest.as_json() if self.hottest else None}


@dataclass(frozen=True)
class Comparison:
    current: StudySummary
    prior: StudySummary
    unit: str  # "SUL" or "SUVbw": the unit of every uptake value
    days_between: int | None
    registration: Registration
    registration_note: str  # "" or why the registration was not done
    lesions: tuple[LesionChange, ...]
    response: Response
    notes: tuple[str, ...] = field(default=())

    # --- per patient ---
    @property
    def new_lesions(self) -> tuple[LesionChange, ...]:
        return tuple(row for row in self.lesions if row.status is MatchStatus.NEW)

    @property
    def resolved_lesions(self) -> tuple[LesionChange, ...]:
        return tuple(row for row in self.lesions if row.status is MatchStatus.RESOLVED)

    @property
    def matched_lesions(self) -> tuple[LesionChange, ...]:
        return tuple(row for row in self.lesions if row.status is MatchStatus.MATCHED)

    @property
    def lesion_count_change(self) -> int:
        return self.current.lesion_count - self.prior.lesion_count

    @property
    def hottest_change(self) -> float | None:
        before, now = self.prior.hottest, self.current.hottest
        if before is None:
            return None
        return (now.peak if now else 0.0) - before.peak

    @property
    def hottest_change_percent(self) -> float | None:
        before, now = self.prior.hottest, self.current.hottest
        return _percent(before.peak, now.peak if now else 0.0) if before else None

    @property
    def mtv_change_percent(self) -> float | None:
        return _percent(self.prior.total_mtv_ml, self.current.total_mtv_ml)

    @property
    def tlg_change_percent(self) -> float | None:
        return _percent(self.prior.total_tlg, self.current.total_tlg)

    def matched(self, current_number: int) -> LesionChange | None:
        for row in self.lesions:
            if row.pair.current == current_number:
                return row
        return None

    def as_json(self) -> dict:
        return {
            "current": self.current.as_json(),
            "prior": self.prior.as_json(),
            "unit": self.unit,
            "days_between": self.days_between,
            "response": self.response.as_json(),
            "hottest_peak_now": self.current.hottest.peak if self.current.hottest else None,
            "hottest_peak_before": self.prior.hottest.peak if self.prior.hottest else None,
            "hottest_lesion_now": self.current.hottest.number if self.current.hottest else None,
            "hottest_lesion_before": self.prior.hottest.number if self.prior.hottest else None,
            "hottest_change": self.hottest_change,
            "hottest_change_percent": self.hottest_change_percent,
            "total_mtv_change_ml": self.current.total_mtv_ml - self.prior.total_mtv_ml,
            "total_mtv_change_percent": self.mtv_change_percent,
            "total_tlg_change": self.current.total_tlg - self.prior.total_tlg,
            "total_tlg_change_percent": self.tlg_change_percent,
            "lesion_count_change": self.lesion_count_change,
            "new_lesions": len(self.new_lesions),
            "resolved_lesions": len(self.resolved_lesions),
            "registration": {**self.registration.as_json(), "note": self.registration_note},
            "lesions": [row.as_json() for row in self.lesions],
            "notes": list(self.notes),
        }

    def lines(self) -> list[str]:
        u = self.unit
        cur, pri = self.current, self.prior
        out = [
            f"compared with prior study {pri.study_uid} of {_date(pri.study_date)}"
            + (f" ({self.days_between} days earlier)" if self.days_between is not None else ""),
            f"PERCIST 1.0: {self.response.category.value} - {self.response.reason}",
        ]
        out += [f"  warning: {w}" for w in self.response.warnings]
        for label, study in (("now", cur), ("before", pri)):
            sul = (f"LBM {study.sul.lbm_kg:.1f} kg (factor {study.sul.factor:.3f})" if study.sul
                   else f"no SUL: {study.sul_reason}")
            liver = (f"liver {u}mean {study.liver.mean:.2f} SD {study.liver.sd:.2f}" if study.liver.assessed
                     else f"liver not assessed: {study.liver.reason}")
            out.append(f"  {label:<6} {sul}; {liver}")
        before, now = pri.hottest, cur.hottest
        hottest = (f"hottest {u}peak {_num(before.peak if before else None)} (lesion "
                   f"{before.number if before else '-'}) -> {_num(now.peak if now else None)} "
                   f"(lesion {now.number if now else '-'})")
        if self.hottest_change is not None:
            hottest += f": {self.hottest_change:+.2f} {u}, {_pct(self.hottest_change_percent)}"
        out.append("  " + hottest)
        out.append(f"  lesions {pri.lesion_count} -> {cur.lesion_count} ({len(self.new_lesions)} new, "
                   f"{len(self.resolved_lesions)} resolved); MTV {pri.total_mtv_ml:.1f} -> {cur.total_mtv_ml:.1f} ml "
                   f"({_pct(self.mtv_change_percent)}); TLG {pri.total_tlg:.1f} -> {cur.total_tlg:.1f} "
                   f"({_pct(self.tlg_change_percent)})")
        reg = self.registration
        if reg.stage == "none":
            out.append(f"  registration: none ({self.registration_note})")
        else:
            out.append(f"  registration: {reg.stage}, rotation {reg.rotation_deg:.1f} deg, translation "
                       f"{math.hypot(*reg.translation_mm):.1f} mm, metric {reg.final_metric:.3f}, body-surface "
                       f"residual {_num(reg.surface_residual_mm, 1)} mm (unregistered "
                       f"{_num(reg.surface_residual_before_mm, 1)} mm)")
        out.append(f"  {'now':>4} {'before':>6}  {'status':<8} {u + 'peak':>15} {'MTV ml':>15} {'TLG':>15}")
        for row in self.lesions:
            c, p = row.current, row.prior
            out.append(f"  {c.number if c else '-':>4} {p.number if p else '-':>6}  {row.status.value:<8} "
                       f"{_pair(p and p.peak, c and c.peak):>15} {_pair(p and p.mtv_ml, c and c.mtv_ml, 1):>15} "
                       f"{_pair(p and p.tlg, c and c.tlg, 1):>15}")
        out += [f"  note: {n}" for n in self.notes]
        return out


def compare(current: TimePoint, prior: TimePoint, *, liver_label_present: bool | None = None,
            connectivity: int = 18, min_volume_ml: float = 0.0) -> Comparison:
    """The follow-up `current` compared with `prior` (see the module's docstring).

    `liver_label_present`: whether a liver model was chained (None: judge by the time points'
    liver masks); it only words the reason when a liver mask is missing. `connectivity` and
    `min_volume_ml` as the model's measures use them, so lesion numbers agree with the SR's."""
    sul_now, reason_now = _sul(current)
    sul_before, reason_before = _sul(prior)
    use_sul = sul_now is not None and sul_before is not None
    unit = "SUL" if use_sul else "SUVbw"
    factor_now = sul_now.factor if use_sul and sul_now else 1.0
    factor_before = sul_before.factor if use_sul and sul_before else 1.0
    uptake_now = np.asarray(current.suv, dtype=np.float32) * np.float32(factor_now)
    uptake_before = np.asarray(prior.suv, dtype=np.float32) * np.float32(factor_before)

    liver_now = _liver(uptake_now, current, liver_label_present)
    liver_before = _liver(uptake_before, prior, liver_label_present)

    measures_now, labels_now = measure_lesions(current.labels, uptake_now, current.spacing_zyx,
                                               connectivity=connectivity, min_volume_ml=min_volume_ml)
    measures_before, labels_before = measure_lesions(prior.labels, uptake_before, prior.spacing_zyx,
                                                     connectivity=connectivity, min_volume_ml=min_volume_ml)

    registration_note = ""
    if current.ct is not None and prior.ct is not None and current.ct_geometry and prior.ct_geometry:
        try:
            registration = register_ct(current.ct, current.ct_geometry, prior.ct, prior.ct_geometry)
        except RegistrationError as exc:
            registration, registration_note = identity_registration(), f"{exc}; lesions matched in scanner coordinates"
    else:
        missing = "the current study" if current.ct is None else "the prior study"
        registration = identity_registration()
        registration_note = f"no CT in {missing}; lesions matched in scanner coordinates"

    centroids_now = _centroids(labels_now, measures_now.lesion_count, current)
    centroids_before_own = _centroids(labels_before, measures_before.lesion_count, prior)
    centroids_before = (registration.points_to_current(centroids_before_own) if len(centroids_before_own)
                        else centroids_before_own)
    mapped_before = registration.to_current(labels_before, prior.geometry, current.geometry, current.suv.shape,
                                            labels=True)
    pairs = match_lesions(labels_now, mapped_before, centroids_now, centroids_before)

    values_now = {les.number: LesionValues.of(les, centroids_now[les.number - 1]) for les in measures_now.lesions}
    values_before = {les.number: LesionValues.of(les, centroids_before[les.number - 1])
                     for les in measures_before.lesions}
    rows = tuple(LesionChange(pair, values_now.get(pair.current or 0), values_before.get(pair.prior or 0))
                 for pair in pairs)

    summary_now = _summary(current, sul_now, reason_now, liver_now, measures_now, values_now, factor_now)
    summary_before = _summary(prior, sul_before, reason_before, liver_before, measures_before, values_before,
                              factor_before)
    response = categorise(
        StudyFigures("prior", reason_before, liver_before, tuple(les.suv_peak for les in measures_before.lesions),
                     measures_before.total_tlg_g),
        StudyFigures("current", reason_now, liver_now, tuple(les.suv_peak for les in measures_now.lesions),
                     measures_now.total_tlg_g),
        [row.current.peak for row in rows if row.status is MatchStatus.NEW and row.current is not None],
    )
    notes: list[str] = []
    if not use_sul:
        notes.append("uptake values in SUVbw: SUL needs height and sex in both studies")
    return Comparison(current=summary_now, prior=summary_before, unit=unit,
                      days_between=_days(prior.study_date, current.study_date), registration=registration,
                      registration_note=registration_note, lesions=rows, response=response, notes=tuple(notes))


# --- helpers --------------------------------------------------------------------------------


def _sul(timepoint: TimePoint) -> tuple[SulFactor | None, str]:
    try:
        return sul_factor(timepoint.patient), ""
    except SulError as exc:
        return None, exc.reason


def _liver(uptake: np.ndarray, timepoint: TimePoint, liver_label_present: bool | None) -> LiverReference:
    if timepoint.liver is None:
        if liver_label_present:
            return not_assessed("the liver model's label map was not available for this study")
        return not_assessed("no liver mask: no organ model is chained for the liver ([models.compare] liver_from)")
    return liver_reference(uptake, timepoint.liver, timepoint.geometry)


def _centroids(labels: np.ndarray, n: int, timepoint: TimePoint) -> np.ndarray:
    if n == 0:
        return np.zeros((0, 3))
    index = np.asarray(ndimage.center_of_mass(np.ones(labels.shape), labels, list(range(1, n + 1))))
    return timepoint.geometry.index_to_point(index.reshape(-1, 3))


def _summary(timepoint: TimePoint, sul: SulFactor | None, reason: str, liver: LiverReference,
             measures: StudyMeasures, values: dict[int, LesionValues], factor: float) -> StudySummary:
    hottest = max(values.values(), key=lambda v: v.peak) if values else None
    return StudySummary(timepoint.study_uid, timepoint.study_date, sul, reason, liver, measures.lesion_count,
                        measures.total_mtv_ml, measures.total_tlg_g, hottest, float(factor))


def _percent(before: float, now: float) -> float | None:
    return 100.0 * (now - before) / before if before > 0 else None


def _days(before: str, now: str) -> int | None:
    try:
        a = date(int(before[:4]), int(before[4:6]), int(before[6:8]))
        b = date(int(now[:4]), int(now[4:6]), int(now[6:8]))
    except (ValueError, IndexError):
        return None
    return (b - a).days


def _date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else value or "?"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0f} %"


def _pair(before: float | None, now: float | None, digits: int = 2) -> str:
    return f"{_num(before, digits)} -> {_num(now, digits)}"
