"""PERCIST 1.0 arithmetic (Wahl et al., J Nucl Med 2009;50 Suppl 1:122S; O JH et al., Radiology
2016;280:576), all thresholds named here and nowhere else.

Per patient, from the two studies' figures in SUL (SUV normalised to lean body mass):

- the liver reference of each study: SULmean and SD in a 3 cm sphere in the right lobe
  (dicomnode.imaging.liver_reference);
- measurability: a study's hottest lesion is measurable when its SULpeak is at least
  MEASURABLE_LIVER_MEAN_FACTOR x liver SULmean + MEASURABLE_LIVER_SD_FACTOR x liver SD of that
  study (1.5 x mean + 2 SD);
- the target is the hottest lesion of each study (largest SULpeak; SULpeak = the mean in a
  1 cm^3 sphere around the lesion's hottest voxel, dicomnode.imaging.measures); before and now
  may be different lesions, as PERCIST defines.

Categories, decided in this order:

1. not assessable, with the reason, when a premise is missing: SUL (height or sex) in either
   study; the liver reference in either study;
2. progressive metabolic disease (PMD) by a new lesion: a lesion of the current study without a
   match in the prior whose SULpeak reaches the current study's measurability threshold (a new
   FDG-avid lesion; a new lesion below it is counted as new but does not decide);
3. not assessable when the prior's hottest lesion is not measurable (or the prior has no lesion):
   PERCIST needs a measurable target at baseline;
4. complete metabolic response (CMR): no lesion of the current study has a SULpeak above the
   current liver SULmean (every lesion back to background);
5. with the change of the target's SULpeak, delta = now - before, and delta / before:
   partial metabolic response (PMR) when it fell by at least PMR_MIN_DECREASE (30 %) and by at
   least MIN_ABSOLUTE_CHANGE_SUL (0.8 SUL);
   PMD when it rose by more than PMD_MIN_INCREASE (30 %) and by at least 0.8 SUL, or when the
   total lesion glycolysis rose by more than PMD_MIN_TLG_INCREASE (75 %) with no fall of the
   target's SULpeak;
6. otherwise stable metabolic disease (SMD).

PERCIST also asks that the two liver references agree within LIVER_AGREEMENT_FRACTION (20 %)
and LIVER_AGREEMENT_SUL (0.3 SUL); a larger difference is reported as a warning beside the
category (the scans are less comparable), it does not change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence

from dicomnode.imaging.liver_reference import LiverReference

PMR_MIN_DECREASE = 0.30  # fraction of the baseline target SULpeak
PMD_MIN_INCREASE = 0.30
MIN_ABSOLUTE_CHANGE_SUL = 0.8
MEASURABLE_LIVER_MEAN_FACTOR = 1.5
MEASURABLE_LIVER_SD_FACTOR = 2.0
PMD_MIN_TLG_INCREASE = 0.75
LIVER_AGREEMENT_FRACTION = 0.20
LIVER_AGREEMENT_SUL = 0.3


class Category(Enum):
    CMR = "complete metabolic response"
    PMR = "partial metabolic response"
    SMD = "stable metabolic disease"
    PMD = "progressive metabolic disease"
    NOT_ASSESSABLE = "not assessable"

    @property
    def abbreviation(self) -> str:
        return "NA" if self is Category.NOT_ASSESSABLE else self.name


@dataclass(frozen=True)
class StudyFigures:
    """One study's figures PERCIST reads, in SUL."""

    label: str  # "current" or "prior", for the reasons
    sul_reason: str  # why SUL could not be computed; "" when it was
    liver: LiverReference
    lesion_peaks: tuple[float, ...]  # SULpeak of every lesion
    total_tlg: float  # sum of SULmean x MTV

    @property
    def hottest_peak(self) -> float | None:
        return max(self.lesion_peaks) if self.lesion_peaks else None


@dataclass(frozen=True)
class Response:
    category: Category
    reason: str  # why this category (for NOT_ASSESSABLE: the missing premise)
    change_percent: float | None = None  # of the target SULpeak
    change_sul: float | None = None
    threshold_prior: float | None = None  # measurability threshold, SUL
    threshold_current: float | None = None
    new_avid_lesions: int = 0
    warnings: tuple[str, ...] = ()

    def as_json(self) -> dict:
        return {"category": self.category.value, "abbreviation": self.category.abbreviation, "reason": self.reason,
                "change_percent": self.change_percent, "change_sul": self.change_sul,
                "measurability_threshold_prior": self.threshold_prior,
                "measurability_threshold_current": self.threshold_current,
                "new_avid_lesions": self.new_avid_lesions, "warnings": list(self.warnings),
                "thresholds": THRESHOLDS}


THRESHOLDS = {"pmr_min_decrease_percent": 100 * PMR_MIN_DECREASE, "pmd_min_increase_percent": 100 * PMD_MIN_INCREASE,
              "min_absolute_change_sul": MIN_ABSOLUTE_CHANGE_SUL,
              "measurable": f"{MEASURABLE_LIVER_MEAN_FACTOR:g} x liver SULmean + {MEASURABLE_LIVER_SD_FACTOR:g} x SD",
              "pmd_min_tlg_increase_percent": 100 * PMD_MIN_TLG_INCREASE,
              "liver_agreement": f"{100 * LIVER_AGREEMENT_FRACTION:g} % and {LIVER_AGREEMENT_SUL:g} SUL"}


def measurability_threshold(liver: LiverReference) -> float:
    """The SULpeak a target must reach: 1.5 x liver SULmean + 2 x SD."""
    if not liver.assessed or liver.mean is None or liver.sd is None:
        raise ValueError("no liver reference")
    return MEASURABLE_LIVER_MEAN_FACTOR * liver.mean + MEASURABLE_LIVER_SD_FACTOR * liver.sd


def categorise(prior: StudyFigures, current: StudyFigures, new_lesion_peaks: Sequence[float]) -> Response:
    """The PERCIST 1.0 category of `current` against `prior` (see the module's docstring);
    `new_lesion_peaks`: SULpeak of each current lesion that matched no prior lesion."""
    for study in (current, prior):
        if study.sul_reason:
            return Response(Category.NOT_ASSESSABLE, f"no SUL for the {study.label} study: {study.sul_reason}")
    for study in (current, prior):
        if not study.liver.assessed:
            return Response(Category.NOT_ASSESSABLE,
                            f"no liver reference for the {study.label} study: {study.liver.reason}")
    threshold_prior = measurability_threshold(prior.liver)
    threshold_current = measurability_threshold(current.liver)
    warnings = _liver_agreement(prior.liver, current.liver)
    figures = dict(threshold_prior=threshold_prior, threshold_current=threshold_current, warnings=warnings)
    avid = [peak for peak in new_lesion_peaks if peak >= threshold_current]
    before, now = prior.hottest_peak, current.hottest_peak
    change_sul = change_percent = None
    if before is not None:
        change_sul = (now or 0.0) - before
        change_percent = 100.0 * change_sul / before if before > 0 else None
    figures.update(change_sul=change_sul, change_percent=change_percent, new_avid_lesions=len(avid))
    if avid:
        return Response(Category.PMD, f"{len(avid)} new FDG-avid lesion(s) (SULpeak {max(avid):.2f} >= "
                                      f"{threshold_current:.2f}, the current measurability threshold)", **figures)
    if before is None:
        return Response(Category.NOT_ASSESSABLE, "no lesion in the prior study: no measurable target at baseline",
                        **figures)
    if before < threshold_prior:
        return Response(Category.NOT_ASSESSABLE, f"the prior's hottest lesion is not measurable (SULpeak "
                                                 f"{before:.2f} < {threshold_prior:.2f} = "
                                                 f"{MEASURABLE_LIVER_MEAN_FACTOR:g} x liver SULmean + "
                                                 f"{MEASURABLE_LIVER_SD_FACTOR:g} SD)", **figures)
    liver_now = current.liver.mean or 0.0
    if now is None or now <= liver_now:
        what = "no lesion now" if now is None else f"hottest SULpeak {now:.2f} <= liver SULmean {liver_now:.2f}"
        return Response(Category.CMR, f"{what}; no new lesion", **figures)
    assert change_sul is not None and change_percent is not None
    fall = -change_percent / 100.0
    if fall >= PMR_MIN_DECREASE and -change_sul >= MIN_ABSOLUTE_CHANGE_SUL:
        return Response(Category.PMR, f"target SULpeak {before:.2f} -> {now:.2f} ({change_percent:+.1f} %, "
                                      f"{change_sul:+.2f} SUL)", **figures)
    if change_percent / 100.0 > PMD_MIN_INCREASE and change_sul >= MIN_ABSOLUTE_CHANGE_SUL:
        return Response(Category.PMD, f"target SULpeak {before:.2f} -> {now:.2f} ({change_percent:+.1f} %, "
                                      f"{change_sul:+.2f} SUL)", **figures)
    if prior.total_tlg > 0 and change_sul >= 0 and (current.total_tlg / prior.total_tlg - 1.0) > PMD_MIN_TLG_INCREASE:
        return Response(Category.PMD, f"total lesion glycolysis {prior.total_tlg:.1f} -> {current.total_tlg:.1f} "
                                      f"(+{100 * (current.total_tlg / prior.total_tlg - 1):.0f} %) with no fall of "
                                      "the target SULpeak", **figures)
    return Response(Category.SMD, f"target SULpeak {before:.2f} -> {now:.2f} ({change_percent:+.1f} %, "
                                  f"{change_sul:+.2f} SUL): within the response and progression thresholds",
                    **figures)


def _liver_agreement(prior: LiverReference, current: LiverReference) -> tuple[str, ...]:
    assert prior.mean is not None and current.mean is not None
    difference = current.mean - prior.mean
    if abs(difference) > LIVER_AGREEMENT_SUL or abs(difference) > LIVER_AGREEMENT_FRACTION * prior.mean:
        return (f"liver SULmean {prior.mean:.2f} -> {current.mean:.2f} differs by more than PERCIST's "
                f"{100 * LIVER_AGREEMENT_FRACTION:g} % / {LIVER_AGREEMENT_SUL:g} SUL: the scans are less comparable",)
    return ()
