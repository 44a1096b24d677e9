"""PET stored values -> SUV body weight (SUVbw).

    SUVbw = activity concentration [Bq/ml] * body weight [g] / decayed injected dose [Bq]

`suv_bw_factor(ds)` returns the factor that multiplies one slice's rescaled pixel values
(after RescaleSlope/Intercept) to give SUVbw, together with the attribute values it used, so
the result can be logged and audited. The steps follow the vendor-neutral (QIBA) algorithm:

1. Units: only BQML is converted for now (GML, CM2ML, Philips CNTS raise SuvError).
2. Body weight from PatientWeight (kg).
3. Dose (RadionuclideTotalDose, Bq) and half-life from the first
   RadiopharmaceuticalInformationSequence item; injection time from
   RadiopharmaceuticalStartDateTime, else SeriesDate + RadiopharmaceuticalStartTime (an
   injection "after" the scan on the same date is taken as the previous day: before midnight).
4. Decay of the dose between injection and the time the image is decay-corrected to:
     START: SeriesDate/Time, unless it is after the acquisition (the series was
            post-processed); then GE's private scan start, else the Siemens back-computation
            from FrameReferenceTime, else the earliest AcquisitionDate/Time of the series;
     ADMIN: the injection itself (no decay);
     NONE:  the time of mean activity within this slice's frame: AcquisitionDate/Time +
            Tave(ActualFrameDuration), since the values were not decay-corrected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

MAX_DECAY_TIME = timedelta(hours=24)
# A RadionuclideTotalDose below this cannot be in Bq (100 kBq); such values are MBq in practice.
_SMALLEST_DOSE_BQ = 1e5


class SuvError(ValueError):
    """SUV cannot be computed: `attribute` is missing or invalid for the reason given."""

    def __init__(self, attribute: str, reason: str):
        super().__init__(f"{attribute}: {reason}")
        self.attribute = attribute
        self.reason = reason


@dataclass(frozen=True)
class SuvFactor:
    factor: float  # SUVbw per rescaled pixel unit
    attributes: dict[str, str] = field(default_factory=dict)  # what the factor was derived from


def suv_bw_factor(ds: Dataset, *, earliest_acquisition: datetime | None = None) -> SuvFactor:
    """SUVbw factor for one PET slice header.

    `earliest_acquisition` is the earliest AcquisitionDate/Time of the whole series; it is
    only needed when SeriesDate/Time is after the acquisition (DecayCorrection START) and
    defaults to this slice's own acquisition time.
    """
    used: dict[str, str] = {}
    units = _text(ds, "Units")
    used["Units"] = units
    if units != "BQML":
        raise SuvError("Units", f"{units or 'missing'} is not convertible to SUVbw yet (BQML only)")

    weight_kg = _positive(ds, "PatientWeight")
    used["PatientWeight"] = f"{weight_kg:g} kg"

    drug = _radiopharmaceutical(ds)
    dose_bq = _dose_bq(drug, used)
    half_life_s = _positive(drug, "RadionuclideHalfLife")
    used["RadionuclideHalfLife"] = f"{half_life_s:g} s"
    injection, injection_attribute = _injection_time(ds, drug)
    used["InjectionDateTime"] = injection.isoformat()

    decay_correction = _text(ds, "DecayCorrection")
    used["DecayCorrection"] = decay_correction
    reference = _decay_reference_time(ds, decay_correction, injection, earliest_acquisition)
    used["DecayReferenceDateTime"] = reference.isoformat()

    decay_time = reference - injection
    if decay_time < timedelta(0) or decay_time > MAX_DECAY_TIME:
        raise SuvError(
            injection_attribute,
            f"decay time {decay_time} from injection {injection} to {reference} "
            "is negative or longer than 24 h",
        )
    decayed_dose = dose_bq * 2.0 ** (-decay_time.total_seconds() / half_life_s)
    used["DecayTime"] = f"{decay_time.total_seconds():g} s"
    used["DecayedDose"] = f"{decayed_dose:.6g} Bq"
    return SuvFactor(factor=weight_kg * 1000.0 / decayed_dose, attributes=used)


def pet_suv_volume(volume) -> np.ndarray:
    """SUVbw array for a PET `dicomnode.volumes.Volume` (one factor per slice header)."""
    if volume.modality != "PT":
        raise SuvError("Modality", f"{volume.modality or 'missing'} is not PT")
    if len(volume.datasets) != volume.array.shape[0]:
        raise SuvError("datasets", "the volume has no header for every slice")
    earliest = min(
        (t for t in (_acquisition_time(ds) for ds in volume.datasets) if t is not None),
        default=None,
    )
    factors = np.array(
        [suv_bw_factor(ds, earliest_acquisition=earliest).factor for ds in volume.datasets]
    )
    return (volume.array * factors[:, None, None]).astype(np.float32)


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


def _radiopharmaceutical(ds: Dataset) -> Dataset:
    items = ds.get("RadiopharmaceuticalInformationSequence")
    if not items:
        raise SuvError("RadiopharmaceuticalInformationSequence", "missing or empty")
    return items[0]


def _dose_bq(drug: Dataset, used: dict[str, str]) -> float:
    dose = _positive(drug, "RadionuclideTotalDose")
    if dose < _SMALLEST_DOSE_BQ:
        used["RadionuclideTotalDose"] = f"{dose:g} (read as MBq)"
        return dose * 1e6
    used["RadionuclideTotalDose"] = f"{dose:g} Bq"
    return dose


def _date_time(date_value, time_value) -> datetime | None:
    """DA + TM -> naive datetime, None when either is missing."""
    if not date_value or not time_value:
        return None
    return datetime.combine(DA(date_value), TM(time_value))


def _parse_dt(value) -> datetime:
    """DT -> naive datetime (a timezone offset is dropped: all times of a study share one)."""
    return DT(value).replace(tzinfo=None)


def _injection_time(ds: Dataset, drug: Dataset) -> tuple[datetime, str]:
    """The injection time and the attribute it was read from."""
    start = drug.get("RadiopharmaceuticalStartDateTime")
    if start:
        try:
            return _parse_dt(start), "RadiopharmaceuticalStartDateTime"
        except ValueError:
            raise SuvError("RadiopharmaceuticalStartDateTime", f"invalid DT {start!r}") from None
    time_only = drug.get("RadiopharmaceuticalStartTime")
    if not time_only:
        raise SuvError(
            "RadiopharmaceuticalStartTime",
            "neither RadiopharmaceuticalStartDateTime nor RadiopharmaceuticalStartTime present",
        )
    series = _series_time(ds)
    try:
        injection = datetime.combine(series.date(), TM(time_only))
    except ValueError:
        raise SuvError("RadiopharmaceuticalStartTime", f"invalid TM {time_only!r}") from None
    if injection > series:  # injected before midnight, scanned after it
        injection -= timedelta(days=1)
    return injection, "RadiopharmaceuticalStartTime"


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


def _decay_reference_time(
    ds: Dataset, decay_correction: str, injection: datetime, earliest_acquisition: datetime | None
) -> datetime:
    """The time the pixel values are decay-corrected to (the dose is decayed to the same time)."""
    if decay_correction == "ADMIN":
        return injection
    if decay_correction == "START":
        return _scan_start(ds, earliest_acquisition)
    if decay_correction == "NONE":
        # Not decay-corrected: the values are the mean activity during the frame, which
        # occurred Tave after the frame started.
        return _required_acquisition_time(ds) + timedelta(seconds=_mean_activity_offset_s(ds))
    raise SuvError("DecayCorrection", f"{decay_correction or 'missing'} is not START, ADMIN or NONE")


def _scan_start(ds: Dataset, earliest_acquisition: datetime | None) -> datetime:
    """DecayCorrection START: SeriesDate/Time, unless a later post-processing overwrote it.

    When the series time is after the acquisition, use in turn: GE's private scan start
    (0009,100D), the Siemens back-computation AcquisitionTime - FrameReferenceTime + Tave,
    or the earliest AcquisitionDate/Time of the series.
    """
    series = _series_time(ds)
    acquisition = earliest_acquisition or _acquisition_time(ds)
    if acquisition is None or series <= acquisition:
        return series
    ge_start = _ge_private_scan_start(ds)
    if ge_start is not None:
        return ge_start
    frame_reference_ms = float(ds.get("FrameReferenceTime") or 0)
    if frame_reference_ms > 0 and float(ds.get("ActualFrameDuration") or 0) > 0:
        offset_s = _mean_activity_offset_s(ds) - frame_reference_ms / 1000.0
        return _required_acquisition_time(ds) + timedelta(seconds=offset_s)
    return acquisition


def _ge_private_scan_start(ds: Dataset) -> datetime | None:
    creator = ds.get((0x0009, 0x0010))
    if creator is None or str(creator.value).strip() != "GEMS_PETD_01":
        return None
    element = ds.get((0x0009, 0x100D))
    if element is None or not element.value:
        return None
    value = element.value
    try:
        return _parse_dt(value.decode() if isinstance(value, bytes) else str(value))
    except ValueError:
        raise SuvError("(0009,100D) GE scan start", f"invalid DT {value!r}") from None


def _mean_activity_offset_s(ds: Dataset) -> float:
    """Tave: seconds from the frame start to the time of mean activity during the frame."""
    duration_s = _positive(ds, "ActualFrameDuration") / 1000.0
    half_life_s = _positive(_radiopharmaceutical(ds), "RadionuclideHalfLife")
    decay_during_frame = math.log(2.0) / half_life_s * duration_s
    return half_life_s / math.log(2.0) * math.log(
        decay_during_frame / (1.0 - math.exp(-decay_during_frame))
    )


def _required_acquisition_time(ds: Dataset) -> datetime:
    acquisition = _acquisition_time(ds)
    if acquisition is None:
        raise SuvError("AcquisitionTime", "missing, needed to place the frame in time")
    return acquisition
