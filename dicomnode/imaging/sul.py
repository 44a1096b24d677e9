"""SUL: the standardized uptake value normalised to lean body mass, as PERCIST 1.0 asks.

Lean body mass (kg) by Janmahasatian et al. (Clin Pharmacokinet 2005;44:1051), from body weight
W (kg), height H (m) and sex, BMI = W / H^2:

    LBM_male   = 9270 * W / (6680 + 216 * BMI)
    LBM_female = 9270 * W / (8780 + 244 * BMI)

    SUL = SUVbw * LBM / W

(SUVbw divides by the body weight, SUL by the lean body mass, the dose and activity being the
same.) The same formula as dicomnode.imaging.suv uses to read a scanner's LBMJANMA SUV back.

`sul_factor(patient)` returns the factor LBM / W with the figures it came from, or raises
`SulError` with the reason when a premise is missing or implausible: no weight, no height, sex
neither M nor F (the formula has no third form; DICOM's "O" and an empty PatientSex are
refused), a height outside PLAUSIBLE_HEIGHT_M (a PatientSize written in cm, 175, is caught
here) or a weight outside PLAUSIBLE_WEIGHT_KG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dicomnode.imaging.timepoint import Patient

PLAUSIBLE_HEIGHT_M = (0.5, 2.5)
PLAUSIBLE_WEIGHT_KG = (2.0, 400.0)


class SulError(ValueError):
    """SUL cannot be computed; `reason` says why in words a report can carry."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SulFactor:
    factor: float  # SUL = SUVbw * factor (= LBM / W)
    lbm_kg: float
    weight_kg: float
    height_m: float
    sex: str
    formula: str = "Janmahasatian 2005"

    def as_json(self) -> dict:
        return {"factor": self.factor, "lbm_kg": self.lbm_kg, "weight_kg": self.weight_kg,
                "height_m": self.height_m, "sex": self.sex, "formula": self.formula}


def lean_body_mass_kg(weight_kg: float, height_m: float, sex: str) -> float:
    """Janmahasatian's lean body mass (kg); `sex` "M" or "F" (see the module's docstring)."""
    bmi = weight_kg / height_m**2
    if sex == "M":
        return 9270.0 * weight_kg / (6680.0 + 216.0 * bmi)
    if sex == "F":
        return 9270.0 * weight_kg / (8780.0 + 244.0 * bmi)
    raise SulError(f"patient sex {sex!r} is neither M nor F: the lean body mass formula needs one")


def sul_factor(patient: Patient) -> SulFactor:
    """LBM / W for `patient`, or SulError with the reason (see the module's docstring)."""
    weight, height, sex = patient.weight_kg, patient.height_m, (patient.sex or "").upper()
    if weight is None:
        raise SulError("no patient weight (PatientWeight)")
    if height is None:
        raise SulError("no patient height (PatientSize)")
    if sex not in ("M", "F"):
        raise SulError(f"patient sex unknown ({patient.sex or 'empty'}): the lean body mass formula "
                       "differs for men and women")
    if not (math.isfinite(height) and PLAUSIBLE_HEIGHT_M[0] <= height <= PLAUSIBLE_HEIGHT_M[1]):
        raise SulError(f"patient height {height:g} m is implausible (PatientSize is in metres; "
                       f"expected {PLAUSIBLE_HEIGHT_M[0]:g} to {PLAUSIBLE_HEIGHT_M[1]:g})")
    if not (math.isfinite(weight) and PLAUSIBLE_WEIGHT_KG[0] <= weight <= PLAUSIBLE_WEIGHT_KG[1]):
        raise SulError(f"patient weight {weight:g} kg is implausible (expected {PLAUSIBLE_WEIGHT_KG[0]:g} to "
                       f"{PLAUSIBLE_WEIGHT_KG[1]:g})")
    lbm = lean_body_mass_kg(weight, height, sex)
    if not (0 < lbm <= weight):
        raise SulError(f"lean body mass {lbm:.1f} kg from weight {weight:g} kg and height {height:g} m is "
                       "not between 0 and the body weight")
    return SulFactor(factor=lbm / weight, lbm_kg=lbm, weight_kg=weight, height_m=height, sex=sex)
