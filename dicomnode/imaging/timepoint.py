"""What one processed PET/CT study leaves behind for a later comparison (issue 16): a TimePoint.

A TimePoint holds the patient's body size (for SUL), the PET in SUVbw with the model's lesion
mask on the same grid (the model grid, normally the PET's), the CT on its own grid (to register
a later study's CT to this one) and, when an organ model was chained, a liver mask on the PET
grid (for the PERCIST liver reference). `dicomnode.imaging.comparison.compare(current, prior)`
compares two of them.

Arrays are numpy (z, y, x); geometry follows ITK/DICOM LPS: `origin` is the (x, y, z) mm of
voxel (0, 0, 0), `spacing` (x, y, z) mm, `direction` the 3x3 direction cosines row-major (ITK's
GetDirection()).

`save(path)` writes one .npz (numpy's zip of arrays, compressed) with a JSON header inside
(key "header": identity, patient, geometries, the format version), durably: temp file, fsync,
rename (dicomnode.store.files.write_durably). `load(path)` reads it back without pickle.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dicomnode.store.files import write_durably

TIMEPOINT_FILE = "timepoint.npz"  # the job's result folder keeps one
FORMAT_VERSION = 1

IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


class TimePointError(ValueError):
    """A TimePoint file or its arrays are not what they must be; the message says what."""


@dataclass(frozen=True)
class VolumeGeometry:
    """Where a (z, y, x) array lies in patient space (LPS)."""

    origin: tuple[float, float, float]  # x, y, z mm of voxel (0, 0, 0)
    spacing: tuple[float, float, float]  # x, y, z mm
    direction: tuple[float, ...] = IDENTITY_DIRECTION  # 9 floats, row-major, ITK convention

    def __post_init__(self) -> None:
        origin = tuple(float(v) for v in self.origin)
        spacing = tuple(float(v) for v in self.spacing)
        direction = tuple(float(v) for v in self.direction)
        if len(origin) != 3 or not all(math.isfinite(v) for v in origin):
            raise TimePointError(f"origin must be three finite numbers, got {self.origin!r}")
        if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
            raise TimePointError(f"spacing must be three positive numbers, got {self.spacing!r}")
        if len(direction) != 9:
            raise TimePointError(f"direction must be 9 numbers, got {len(direction)}")
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "direction", direction)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @classmethod
    def of_image(cls, image: sitk.Image) -> "VolumeGeometry":
        return cls(tuple(image.GetOrigin()), tuple(image.GetSpacing()), tuple(image.GetDirection()))

    @classmethod
    def of_volume(cls, volume: object) -> "VolumeGeometry":
        """Of a dicomnode.imaging.volumes.Volume (spacing (z, y, x), origin (x, y, z))."""
        spacing_zyx = volume.spacing  # type: ignore[attr-defined]
        return cls(tuple(volume.origin), tuple(reversed(spacing_zyx)), tuple(volume.direction))  # type: ignore

    def image(self, array: np.ndarray) -> sitk.Image:
        """`array` (z, y, x) as a SimpleITK image with this geometry."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image

    def index_to_point(self, index_zyx: np.ndarray) -> np.ndarray:
        """(n, 3) continuous voxel indices (z, y, x) -> (n, 3) LPS points (x, y, z) mm."""
        ijk = np.asarray(index_zyx, dtype=np.float64)[:, ::-1]  # (x, y, z) index order
        direction = np.asarray(self.direction).reshape(3, 3)
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing)) @ direction.T

    def point_to_index(self, points_xyz: np.ndarray) -> np.ndarray:
        """(n, 3) LPS points -> (n, 3) continuous voxel indices (z, y, x)."""
        direction = np.asarray(self.direction).reshape(3, 3)
        ijk = (np.asarray(points_xyz, dtype=np.float64) - np.asarray(self.origin)) @ direction / np.asarray(
            self.spacing)
        return ijk[:, ::-1]

    def as_json(self) -> dict:
        return {"origin": list(self.origin), "spacing": list(self.spacing), "direction": list(self.direction)}

    @classmethod
    def from_json(cls, data: dict) -> "VolumeGeometry":
        return cls(tuple(data["origin"]), tuple(data["spacing"]), tuple(data["direction"]))


@dataclass(frozen=True)
class Patient:
    """The body size SUL needs; None / "" where the header did not say."""

    weight_kg: float | None
    height_m: float | None
    sex: str  # "M", "F" or "" (unknown)

    @classmethod
    def of_header(cls, ds: object) -> "Patient":
        """From a PET header: PatientWeight (kg), PatientSize (m), PatientSex (M or F; anything
        else, O included, is unknown ""); a missing, empty or unreadable value is None."""
        sex = str(getattr(ds, "PatientSex", "") or "").strip().upper()
        return cls(_positive_or_none(ds, "PatientWeight"), _positive_or_none(ds, "PatientSize"),
                   sex if sex in ("M", "F") else "")

    def as_json(self) -> dict:
        return {"weight_kg": self.weight_kg, "height_m": self.height_m, "sex": self.sex}

    @classmethod
    def from_json(cls, data: dict) -> "Patient":
        return cls(data.get("weight_kg"), data.get("height_m"), data.get("sex") or "")


@dataclass(frozen=True)
class TimePoint:
    """What one processed study leaves for a later comparison (see the module's docstring)."""

    study_uid: str
    study_date: str  # YYYYMMDD
    study_time: str
    patient: Patient
    suv: np.ndarray  # SUVbw on the grid of `labels` (the model grid: PET)
    labels: np.ndarray  # the model's lesion mask (0/1) on the same grid
    geometry: VolumeGeometry  # of suv / labels
    ct: np.ndarray | None  # CT HU on the CT's own grid (for registration)
    ct_geometry: VolumeGeometry | None
    liver: np.ndarray | None = None  # a liver mask on the suv grid, from a chained organ model

    def __post_init__(self) -> None:
        suv = np.asarray(self.suv)
        if suv.ndim != 3:
            raise TimePointError(f"suv must be (z, y, x), got shape {suv.shape}")
        if np.shape(self.labels) != suv.shape:
            raise TimePointError(f"labels shape {np.shape(self.labels)} differs from the suv's {suv.shape}")
        if self.liver is not None and np.shape(self.liver) != suv.shape:
            raise TimePointError(f"liver mask shape {np.shape(self.liver)} differs from the suv's {suv.shape}")
        if (self.ct is None) != (self.ct_geometry is None):
            raise TimePointError("ct and ct_geometry come together")
        if self.ct is not None and np.ndim(self.ct) != 3:
            raise TimePointError(f"ct must be (z, y, x), got shape {np.shape(self.ct)}")

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return self.geometry.spacing_zyx

    def header(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "study_uid": self.study_uid,
            "study_date": self.study_date,
            "study_time": self.study_time,
            "patient": self.patient.as_json(),
            "geometry": self.geometry.as_json(),
            "ct_geometry": self.ct_geometry.as_json() if self.ct_geometry is not None else None,
        }

    def save(self, path: Path) -> None:
        """One .npz with the header inside, written atomically and durably."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "header": np.array(json.dumps(self.header())),
            "suv": np.asarray(self.suv, dtype=np.float32),
            "labels": np.asarray(self.labels, dtype=np.uint8),
        }
        if self.ct is not None:
            arrays["ct"] = np.asarray(self.ct, dtype=np.int16 if _integral(self.ct) else np.float32)
        if self.liver is not None:
            arrays["liver"] = np.asarray(self.liver, dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        write_durably(path, lambda fh: fh.write(buffer.getvalue()), path.with_name(f".{path.name}.tmp"))

    @classmethod
    def load(cls, path: Path) -> "TimePoint":
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                arrays = {key: data[key] for key in data.files if key != "header"}
        except (OSError, ValueError, KeyError) as exc:
            raise TimePointError(f"cannot read time point {path}: {exc}") from exc
        if header.get("format") != FORMAT_VERSION:
            raise TimePointError(f"{path}: time point format {header.get('format')!r}, this node reads "
                                 f"{FORMAT_VERSION}")
        ct_geometry = header.get("ct_geometry")
        return cls(
            study_uid=header["study_uid"],
            study_date=header["study_date"],
            study_time=header.get("study_time", ""),
            patient=Patient.from_json(header["patient"]),
            suv=arrays["suv"],
            labels=arrays["labels"],
            geometry=VolumeGeometry.from_json(header["geometry"]),
            ct=arrays["ct"].astype(np.float32) if "ct" in arrays else None,
            ct_geometry=VolumeGeometry.from_json(ct_geometry) if ct_geometry else None,
            liver=arrays.get("liver"),
        )


def _positive_or_none(ds: object, keyword: str) -> float | None:
    try:
        value = float(getattr(ds, keyword, None) or 0.0)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _integral(array: np.ndarray) -> bool:
    """Whether `array` holds whole numbers in int16's range (CT HU), so it is stored as int16."""
    values = np.asarray(array)
    if values.size == 0:
        return True
    if np.issubdtype(values.dtype, np.integer):
        return bool(values.min() >= -32768 and values.max() <= 32767)
    return bool(np.isfinite(values).all() and np.all(values == np.round(values))
                and values.min() >= -32768 and values.max() <= 32767)
