"""PET stored values -> SUV body weight (SUVbw), vendor-neutral.

    SUVbw = activity concentration [Bq/ml] * body weight [g] / decayed injected dose [Bq]

`suv_bw_factor(ds)` returns the factor that multiplies one slice's rescaled pixel values
(stored value * RescaleSlope + RescaleIntercept) to give SUVbw, together with `attributes`: the
attribute values it was derived from, in the order they were used (`dicomnode inspect` shows
them). The steps follow the QIBA vendor-neutral SUV pseudo-code (FDG-PET/CT profile, appendix
G), extended to the cases of the OncoRay/IBSI SUV reference objects (shared/data/suv_dro):

1. Units (0054,1001): what one rescaled pixel unit is.
     BQML   1 Bq/ml.
     CNTS   Philips counts, with a private factor under the creator "Philips PET Private Group":
            the SUV scale factor (7053,1000) gives SUVbw directly; else the activity
            concentration scale factor (7053,1009) gives Bq/ml.
     GML    an SUV of SUV Type (0054,1006) (absent: BW). BW is used as is; LBMJAMES128 (James,
            128 for men), LBMJANMA (Janmahasatian) and IBW (Sugawara) are converted back:
            SUVbw = SUVx * PatientWeight / normalising mass, from PatientWeight, PatientSize and
            PatientSex; for PatientSex O the mean of the M and F formulas (as the OncoRay DROs
            define it). Plain LBM is refused: it does not say which James formula was used.
     CM2ML  SUVbsa [cm2/ml]: SUVbw = SUVbsa * PatientWeight [g] / Du Bois body surface area
            [cm2].
   Anything else (CPS, PROPCNTS, ...) is refused. For an SUV already (GML, CM2ML, CNTS with
   the SUV scale factor) the remaining steps are not needed.
   Private elements (Philips here, GE in step 4) are found through their private creator with
   pydicom's private block API, in whichever block the creator reserved. Where a group has no
   private creator at all (stripped, as in the OncoRay DROs) the element is read in the first
   block, (gggg,10xx), and only when Manufacturer names that vendor.
2. Body weight: PatientWeight (kg).
3. Dose: RadionuclideTotalDose of the first RadiopharmaceuticalInformationSequence item. DICOM
   says Bq, but some systems write MBq. Rule: a value of at least 1e5 is Bq (100 kBq or more),
   a value of at most 1e4 is MBq (10 GBq or less); a value in between is implausible in
   either unit for a PET injection and is refused. Half-life: RadionuclideHalfLife (s), any
   radionuclide.
4. Decay time, from the injection to the time the pixel values are decay-corrected to:
     injection: RadiopharmaceuticalStartDateTime, else RadiopharmaceuticalStartTime on the
            date of the scan (earliest acquisition, else SeriesDate); an injection time after
            the scan time is taken as the day before (injected before midnight);
     START: DecayCorrectionDateTime where the header has it (Enhanced PET, whose DecayCorrected
            YES dicomnode.imaging.frames reads as START), else
            SeriesDate/Time, unless it is after the acquisition (a post-processed series); then
            GE's private scan start (0009,100D) under "GEMS_PETD_01", else the Siemens
            back-computation AcquisitionTime + Tave - FrameReferenceTime, else the earliest
            AcquisitionDate/Time of the series;
     ADMIN: the injection itself (decay time 0; no time attribute is needed);
     NONE:  the time of mean activity within this slice's frame, AcquisitionDate/Time + Tave
            (ActualFrameDuration), since the values were not decay-corrected.
   A decay time that is negative or longer than 24 h is refused.
5. Factor: (Bq/ml per rescaled unit) * body weight [g] / (dose * 2^(-decay time / half-life)).

Every undefined case raises `SuvError` naming the attribute at fault.

A frame of an enhanced multi-frame PET is read as a slice: its header is the frame's functional
groups laid over the instance's top level (dicomnode.imaging.frames: RadiopharmaceuticalInformation-
Sequence, Units and DecayCorrection at the top or in the Unassigned Shared Converted Attributes,
the frame's FrameAcquisitionDateTime as AcquisitionDateTime, FrameAcquisitionDuration as
ActualFrameDuration), so every step above applies frame by frame.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

from dicomnode.imaging.headers import first_sentence
from dicomnode.imaging.volumes import Volume

MAX_DECAY_TIME = timedelta(hours=24)
# RadionuclideTotalDose unit rule (step 3): >= 1e5 is Bq, <= 1e4 is MBq, in between is refused.
SMALLEST_DOSE_BQ = 1e5
LARGEST_DOSE_MBQ = 1e4

PHILIPS_CREATOR = "Philips PET Private Group"
PHILIPS_SUV_SCALE = 0x00  # (7053,xx00) SUV Scale Factor: rescaled value * it = SUVbw
PHILIPS_ACTIVITY_SCALE = 0x09  # (7053,xx09) Activity Concentration Scale Factor: -> Bq/ml
GE_CREATOR = "GEMS_PETD_01"
GE_SCAN_START = 0x0D  # (0009,xx0D) PET scan_datetime


class SuvError(ValueError):
    """SUV cannot be computed: `attribute` is missing or invalid for the reason given."""

    def __init__(self, attribute: str, reason: str) -> None:
        super().__init__(f"{attribute}: {reason}")
        self.attribute = attribute
        self.reason = reason


@dataclass(frozen=True)
class SuvFactor:
    factor: float  # SUVbw per rescaled pixel unit
    attributes: dict[str, str] = field(default_factory=dict)  # what the factor was derived from


@dataclass(frozen=True)
class _PixelUnit:
    """What one rescaled pixel unit is: `scale` SUVbw (`is_suv`) or `scale` Bq/ml."""

    scale: float
    is_suv: bool


def suv_bw_factor(ds: Dataset, *, earliest_acquisition: datetime | None = None) -> SuvFactor:
    """SUVbw factor for one PET slice header.

    `earliest_acquisition` is the earliest AcquisitionDate/Time of the whole series; it dates
    an injection given by time only, and is the last resort for the scan start when
    SeriesDate/Time is after the acquisition (DecayCorrection START). It defaults to this
    slice's own acquisition time.
    """
    used: dict[str, str] = {}
    unit = _pixel_unit(ds, used)  # 1
    if unit.is_suv:
        used["Factor"] = f"{unit.scale:.6g} SUVbw per rescaled unit"
        return SuvFactor(factor=unit.scale, attributes=used)

    weight_g = _body_weight_kg(ds, used) * 1000.0  # 2
    drug = _radiopharmaceutical(ds)
    dose_bq = _dose_bq(drug, used)  # 3
    half_life_s = _half_life_s(drug, used)
    decay_s = _decay_time_s(ds, drug, earliest_acquisition, used)  # 4

    decayed_dose = dose_bq * 2.0 ** (-decay_s / half_life_s)  # 5
    used["DecayedDose"] = f"{decayed_dose:.6g} Bq"
    factor = unit.scale * weight_g / decayed_dose
    used["Factor"] = f"{factor:.6g} SUVbw per rescaled unit"
    return SuvFactor(factor=factor, attributes=used)


def pet_suv_volume(volume: Volume) -> np.ndarray:
    """SUVbw array for a PET `dicomnode.imaging.volumes.Volume` (one factor per slice header)."""
    if volume.modality != "PT":
        raise SuvError("Modality", f"{volume.modality or 'missing'} is not PT")
    if len(volume.datasets) != volume.array.shape[0]:
        raise SuvError("datasets", "the volume has no header for every slice")
    earliest = earliest_acquisition(volume.datasets)
    factors = np.array([_slice_factor(ds, earliest) for ds in volume.datasets])
    suv = np.empty(volume.array.shape, dtype=np.float32)
    scratch = np.empty(volume.array.shape[1:], dtype=np.float64)  # slice by slice: float64, then stored as float32
    for k, factor in enumerate(factors):
        np.multiply(volume.array[k], factor, out=scratch)
        suv[k] = scratch
    return suv


def earliest_acquisition(headers: Sequence[Dataset]) -> datetime | None:
    """The earliest AcquisitionDateTime (or AcquisitionDate/Time) of a PET series' slices: what
    `suv_bw_factor` takes as `earliest_acquisition`. The worker and `dicomnode inspect` both use
    it, so they compute the same factor."""
    return min((t for t in (_acquisition_time(ds) for ds in headers) if t is not None), default=None)


def series_factors(headers: Sequence[Dataset]) -> list[SuvFactor]:
    """Each slice's SUVbw factor, with the series' earliest acquisition (SuvError names what is wrong)."""
    earliest = earliest_acquisition(headers)
    return [suv_bw_factor(ds, earliest_acquisition=earliest) for ds in headers]


def _slice_factor(ds: Dataset, earliest: datetime | None) -> float:
    """One slice's factor; a header pydicom cannot read, or a factor that is not finite, is a SuvError."""
    try:
        factor = suv_bw_factor(ds, earliest_acquisition=earliest).factor
    except SuvError:
        raise
    except Exception as exc:  # noqa: BLE001 - an attribute pydicom cannot read or convert
        raise SuvError("header", f"slice {ds.get('SOPInstanceUID', '?')} cannot be read: "
                                 f"{type(exc).__name__}: {first_sentence(exc)}") from exc
    if not math.isfinite(factor):
        raise SuvError("Factor", f"{factor} for slice {ds.get('SOPInstanceUID', '?')} is not finite")
    return factor


# --- step 1: Units ------------------------------------------------------------------------


def _pixel_unit(ds: Dataset, used: dict[str, str]) -> _PixelUnit:
    units = _text(ds, "Units")
    used["Units"] = units
    if units == "BQML":
        return _PixelUnit(scale=1.0, is_suv=False)
    if units == "CNTS":
        return _philips_counts(ds, used)
    if units == "GML":
        suv_type = _text(ds, "SUVType") or "BW"
        used["SUVType"] = suv_type if "SUVType" in ds else "BW (absent: BW by definition)"
        if suv_type == "BW":
            return _PixelUnit(scale=1.0, is_suv=True)
        if suv_type not in ("LBMJAMES128", "LBMJANMA", "IBW"):  # SUVbsa is CM2ML, not GML
            raise SuvError("SUVType", f"{suv_type} cannot be converted to BW with Units GML")
        return _PixelUnit(scale=_back_to_body_weight(ds, suv_type, used), is_suv=True)
    if units == "CM2ML":
        suv_type = _text(ds, "SUVType") or "BSA"
        used["SUVType"] = suv_type if "SUVType" in ds else "BSA (implied by Units CM2ML)"
        if suv_type != "BSA":
            raise SuvError("SUVType", f"{suv_type} does not match Units CM2ML (BSA)")
        return _PixelUnit(scale=_back_to_body_weight(ds, "BSA", used), is_suv=True)
    raise SuvError("Units", f"{units or 'missing'} is not convertible to SUVbw")


def _philips_counts(ds: Dataset, used: dict[str, str]) -> _PixelUnit:
    """Units CNTS: Philips private SUV scale factor, else activity concentration scale factor."""
    suv_scale = _private_value(ds, 0x7053, PHILIPS_CREATOR, PHILIPS_SUV_SCALE, "PHILIPS")
    if suv_scale is not None:
        value, where = suv_scale
        scale = _private_positive(value, where)
        used["Philips SUV scale factor"] = f"{scale:g} from {where}"
        return _PixelUnit(scale=scale, is_suv=True)
    activity_scale = _private_value(ds, 0x7053, PHILIPS_CREATOR, PHILIPS_ACTIVITY_SCALE, "PHILIPS")
    if activity_scale is not None:
        value, where = activity_scale
        scale = _private_positive(value, where)
        used["Philips activity concentration scale factor"] = f"{scale:g} Bq/ml from {where}"
        return _PixelUnit(scale=scale, is_suv=False)
    raise SuvError(
        "Units",
        f"CNTS without a Philips SUV scale factor (7053,1000) or activity concentration scale "
        f"factor (7053,1009) under {PHILIPS_CREATOR!r}",
    )


def _back_to_body_weight(ds: Dataset, suv_type: str, used: dict[str, str]) -> float:
    """SUVbw per SUV of `suv_type`: body weight [g] / the normalising mass [g] or area [cm2]."""
    weight_kg = _body_weight_kg(ds, used)
    height_m = _positive(ds, "PatientSize")
    if not 0.3 <= height_m <= 2.6:
        raise SuvError("PatientSize", f"{height_m:g} is not a plausible height in m")
    used["PatientSize"] = f"{height_m:g} m"
    formula, by_sex = _BODY_SIZE[suv_type]
    if by_sex:
        sex = _text(ds, "PatientSex")
        if sex not in ("M", "F", "O"):
            raise SuvError("PatientSex", f"{sex or 'missing'} is not M, F or O ({suv_type})")
        sexes = ("M", "F") if sex == "O" else (sex,)  # other: the mean of the two formulas
        size = sum(formula(weight_kg, height_m, s) for s in sexes) / len(sexes)
        used["PatientSex"] = sex + (" (mean of the M and F formulas)" if sex == "O" else "")
    else:
        size = formula(weight_kg, height_m, "")
    if not math.isfinite(size) or size <= 0:
        raise SuvError("PatientSize", f"{suv_type} from weight and size is not positive: {size:g}")
    if suv_type == "BSA":
        normaliser, unit = size * 1e4, "cm2"  # m2 -> cm2 (Units CM2ML)
    else:
        normaliser, unit = size * 1000.0, "g"  # kg -> g
    used[f"{suv_type} normaliser"] = f"{normaliser:.6g} {unit}"
    return weight_kg * 1000.0 / normaliser


def _lbm_james128(weight_kg: float, height_m: float, sex: str) -> float:
    """Lean body mass (kg), James 1976 with 128 for men (QIBA appendix H)."""
    ratio = weight_kg / (height_m * 100.0)
    if sex == "M":
        return 1.10 * weight_kg - 128.0 * ratio**2
    return 1.07 * weight_kg - 148.0 * ratio**2


def _lbm_janmahasatian(weight_kg: float, height_m: float, sex: str) -> float:
    """Lean body mass (kg), Janmahasatian 2005."""
    bmi = weight_kg / height_m**2
    if sex == "M":
        return 9270.0 * weight_kg / (6680.0 + 216.0 * bmi)
    return 9270.0 * weight_kg / (8780.0 + 244.0 * bmi)


def _ibw_sugawara(weight_kg: float, height_m: float, sex: str) -> float:
    """Ideal body weight (kg), Sugawara 1999."""
    height_cm = height_m * 100.0
    if sex == "M":
        return 48.0 + 1.06 * (height_cm - 152.0)
    return 45.5 + 0.91 * (height_cm - 152.0)


def _bsa_du_bois(weight_kg: float, height_m: float, sex: str) -> float:
    """Body surface area (m2), Du Bois 1916."""
    return 0.007184 * weight_kg**0.425 * (height_m * 100.0) ** 0.725


# SUV Type -> (normaliser formula, depends on PatientSex). Plain "LBM" is not here: it does not
# say which James variant (120 or 128 for men) the scanner used.
_BODY_SIZE = {
    "LBMJAMES128": (_lbm_james128, True),
    "LBMJANMA": (_lbm_janmahasatian, True),
    "IBW": (_ibw_sugawara, True),
    "BSA": (_bsa_du_bois, False),
}


# --- steps 2 and 3: body weight, dose, half-life --------------------------------------------


def _body_weight_kg(ds: Dataset, used: dict[str, str]) -> float:
    weight_kg = _positive(ds, "PatientWeight")
    used["PatientWeight"] = f"{weight_kg:g} kg"
    return weight_kg


def _radiopharmaceutical(ds: Dataset) -> Dataset:
    items = ds.get("RadiopharmaceuticalInformationSequence")
    if not items:
        raise SuvError("RadiopharmaceuticalInformationSequence", "missing or empty")
    return items[0]


def _dose_bq(drug: Dataset, used: dict[str, str]) -> float:
    dose = _positive(drug, "RadionuclideTotalDose")
    if dose >= SMALLEST_DOSE_BQ:
        used["RadionuclideTotalDose"] = f"{dose:g} Bq"
        return dose
    if dose <= LARGEST_DOSE_MBQ:
        used["RadionuclideTotalDose"] = f"{dose:g} (read as MBq)"
        return dose * 1e6
    raise SuvError(
        "RadionuclideTotalDose",
        f"{dose:g} is implausible both in Bq (< 100 kBq) and in MBq (> 10 GBq)",
    )


def _half_life_s(drug: Dataset, used: dict[str, str]) -> float:
    half_life_s = _positive(drug, "RadionuclideHalfLife")
    used["RadionuclideHalfLife"] = f"{half_life_s:g} s"
    return half_life_s


# --- step 4: decay time ---------------------------------------------------------------------


def _decay_time_s(
    ds: Dataset, drug: Dataset, earliest_acquisition: datetime | None, used: dict[str, str]
) -> float:
    """Seconds from the injection to the time the pixel values are decay-corrected to."""
    decay_correction = _text(ds, "DecayCorrection")
    used["DecayCorrection"] = decay_correction
    if decay_correction == "ADMIN":  # corrected to the injection: the dose does not decay
        used["DecayTime"] = "0 s"
        return 0.0
    if decay_correction not in ("START", "NONE"):
        raise SuvError(
            "DecayCorrection", f"{decay_correction or 'missing'} is not START, ADMIN or NONE"
        )
    injection, injection_attribute = _injection_time(ds, drug, earliest_acquisition, used)
    reference = _decay_reference_time(ds, decay_correction, earliest_acquisition, used)
    decay_time = reference - injection
    if decay_time < timedelta(0) or decay_time > MAX_DECAY_TIME:
        what = ("negative: the injection is after the decay reference time" if decay_time < timedelta(0)
                else "longer than 24 h")
        raise SuvError(
            injection_attribute,
            f"decay time {decay_time.total_seconds() / 3600.0:+.2f} h is {what} "
            f"(injection {injection.isoformat()}, reference {reference.isoformat()}; "
            "refused when negative or longer than 24 h)",
        )
    used["DecayTime"] = f"{decay_time.total_seconds():g} s"
    return decay_time.total_seconds()


def _injection_time(
    ds: Dataset, drug: Dataset, earliest_acquisition: datetime | None, used: dict[str, str]
) -> tuple[datetime, str]:
    """The injection time and the attribute it was read from."""
    start = drug.get("RadiopharmaceuticalStartDateTime")
    if start:
        try:
            injection = _parse_dt(start)
        except ValueError:
            raise SuvError("RadiopharmaceuticalStartDateTime", f"invalid DT {start!r}") from None
        used["InjectionDateTime"] = injection.isoformat()
        return injection, "RadiopharmaceuticalStartDateTime"
    time_only = drug.get("RadiopharmaceuticalStartTime")
    if not time_only:
        raise SuvError(
            "RadiopharmaceuticalStartTime",
            "neither RadiopharmaceuticalStartDateTime nor RadiopharmaceuticalStartTime present",
        )
    scan = earliest_acquisition or _acquisition_time(ds) or _series_time(ds)
    try:
        injection = datetime.combine(scan.date(), TM(time_only))
    except ValueError:
        raise SuvError("RadiopharmaceuticalStartTime", f"invalid TM {time_only!r}") from None
    if injection > scan:  # injected before midnight, scanned after it
        injection -= timedelta(days=1)
    used["InjectionDateTime"] = injection.isoformat()
    used["InjectionDate"] = f"StartTime only, dated by the scan at {scan.isoformat()}"
    return injection, "RadiopharmaceuticalStartTime"


def _decay_reference_time(
    ds: Dataset, decay_correction: str, earliest_acquisition: datetime | None, used: dict[str, str]
) -> datetime:
    """The time the pixel values are decay-corrected to (START or NONE)."""
    if decay_correction == "START" and ds.get("DecayCorrectionDateTime"):  # Enhanced PET says it outright
        try:
            reference, source = _parse_dt(ds.DecayCorrectionDateTime), "DecayCorrectionDateTime"
        except ValueError:
            raise SuvError("DecayCorrectionDateTime", f"invalid DT {ds.DecayCorrectionDateTime!r}") from None
    elif decay_correction == "START":
        reference, source = _scan_start(ds, earliest_acquisition)
    else:  # NONE: mean activity during the frame, Tave after the frame started
        offset_s = _mean_activity_offset_s(ds)
        reference = _required_acquisition_time(ds) + timedelta(seconds=offset_s)
        source = f"AcquisitionDate/Time + Tave {offset_s:.6g} s of ActualFrameDuration"
    used["DecayReferenceDateTime"] = reference.isoformat()
    used["DecayReferenceFrom"] = source
    return reference


def _scan_start(ds: Dataset, earliest_acquisition: datetime | None) -> tuple[datetime, str]:
    """DecayCorrection START: SeriesDate/Time, unless a later post-processing overwrote it."""
    series = _series_time(ds)
    acquisition = earliest_acquisition or _acquisition_time(ds)
    if acquisition is None or series <= acquisition:
        return series, "SeriesDate/SeriesTime"
    ge_start = _private_value(ds, 0x0009, GE_CREATOR, GE_SCAN_START, "GE")
    if ge_start is not None:
        value, where = ge_start
        try:
            return _parse_dt(_as_text(value)), f"GE scan start {where} (series after acquisition)"
        except ValueError:
            raise SuvError(where, f"invalid DT {value!r}") from None
    frame_reference_ms = _optional_float(ds, "FrameReferenceTime")
    if frame_reference_ms > 0 and _optional_float(ds, "ActualFrameDuration") > 0:
        offset_s = _mean_activity_offset_s(ds) - frame_reference_ms / 1000.0
        return (
            _required_acquisition_time(ds) + timedelta(seconds=offset_s),
            "AcquisitionDate/Time + Tave - FrameReferenceTime (series after acquisition)",
        )
    return acquisition, "earliest AcquisitionDate/Time (series after acquisition)"


def _mean_activity_offset_s(ds: Dataset) -> float:
    """Tave: seconds from the frame start to the time of mean activity during the frame."""
    duration_s = _positive(ds, "ActualFrameDuration") / 1000.0
    half_life_s = _positive(_radiopharmaceutical(ds), "RadionuclideHalfLife")
    decay_during_frame = math.log(2.0) / half_life_s * duration_s
    return half_life_s / math.log(2.0) * math.log(
        decay_during_frame / (1.0 - math.exp(-decay_during_frame))
    )


# --- attribute readers ------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip().upper()


def _positive(ds: Dataset, keyword: str) -> float:
    try:
        value = ds.get(keyword)  # a malformed DS read from a file already fails here
        number = None if value is None or value == "" else float(value)
    except (TypeError, ValueError) as exc:
        raise SuvError(keyword, f"not a number: {exc}") from None
    if number is None:
        raise SuvError(keyword, "missing or empty")
    if not math.isfinite(number) or number <= 0:
        raise SuvError(keyword, f"must be positive, got {value}")
    return number


def _optional_float(ds: Dataset, keyword: str) -> float:
    try:
        return float(ds.get(keyword) or 0)
    except (TypeError, ValueError):
        raise SuvError(keyword, f"not a number: {ds.get(keyword)!r}") from None


def _private_value(
    ds: Dataset, group: int, creator: str, offset: int, vendor: str
) -> tuple[object, str] | None:
    """(value, where it was found) of private element `offset` in `creator`'s block, or None.

    The block is located through its private creator (pydicom's private block API), wherever
    the creator reserved it. Files whose private creators were stripped (the OncoRay DROs, some
    anonymisers) keep the element in the first block, (gggg,10xx); it is read there only when
    the group has no private creator at all and Manufacturer names `vendor`.
    """
    try:
        block = ds.private_block(group, creator)
    except KeyError:
        block = None
    if block is not None:
        if offset not in block:
            return None
        tag = block.get_tag(offset)
        return ds[tag].value, f"({group:04X},{tag.element:04X}) of {creator!r}"
    has_creator = any(tag.group == group and 0x10 <= tag.element <= 0xFF for tag in ds.keys())
    manufacturer = _text(ds, "Manufacturer")
    if has_creator or not re.search(rf"\b{vendor}\b", manufacturer):
        return None
    element = ds.get((group, 0x1000 | offset))
    if element is None or element.value in (None, "", b""):
        return None
    where = f"({group:04X},{0x1000 | offset:04X}) without creator, Manufacturer {manufacturer}"
    return element.value, where


def _private_positive(value: object, where: str) -> float:
    try:
        number = float(_as_text(value))
    except (TypeError, ValueError):
        raise SuvError(where, f"not a number: {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise SuvError(where, f"must be positive, got {value!r}")
    return number


def _as_text(value: object) -> str:
    """A private value read as UN (bytes) or with its VR (str, DS, DT) -> text."""
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace").strip("\x00 ")
    return str(value).strip()


def _date_time(date_value: object, time_value: object) -> datetime | None:
    """DA + TM -> naive datetime, None when either is missing."""
    if not date_value or not time_value:
        return None
    return datetime.combine(DA(date_value), TM(time_value))


def _parse_dt(value: object) -> datetime:
    """DT -> naive datetime (a timezone offset is dropped: all times of a study share one)."""
    return DT(value).replace(tzinfo=None)


def _series_time(ds: Dataset) -> datetime:
    try:
        series = _date_time(ds.get("SeriesDate"), ds.get("SeriesTime"))
    except ValueError:
        series = None
    if series is None:
        keyword = "SeriesDate" if not ds.get("SeriesDate") else "SeriesTime"
        raise SuvError(keyword, "missing or invalid")
    return series


def _acquisition_time(ds: Dataset) -> datetime | None:
    try:
        if ds.get("AcquisitionDateTime"):
            return _parse_dt(ds.AcquisitionDateTime)
        return _date_time(ds.get("AcquisitionDate"), ds.get("AcquisitionTime"))
    except ValueError:
        raise SuvError("AcquisitionTime", "invalid AcquisitionDate/Time or AcquisitionDateTime") from None


def _required_acquisition_time(ds: Dataset) -> datetime:
    acquisition = _acquisition_time(ds)
    if acquisition is None:
        raise SuvError("AcquisitionTime", "missing, needed to place the frame in time")
    return acquisition
