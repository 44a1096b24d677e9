"""DICOM series -> 3-D volume in patient coordinates, and resampling between grids.

`load_series(paths)` reads every file with pydicom, checks that the slices form one regular
axial stack (dicomnode.imaging.geometry: the rule series selection applies too), orders them
by position along the slice normal and applies the per-slice RescaleSlope/Intercept. The
headers stay with the volume (`datasets`, in the same slice order as `array`) so SUV
conversion and SEG creation can use them. One pydicom pass reads headers and pixels (the
headers are needed anyway); SimpleITK is used for resampling.

Enhanced and Legacy Converted Enhanced multi-frame instances (one or several per series) are
read frame by frame: each frame's header is its functional groups laid over the instance's top
level (dicomnode.imaging.frames), and its pixels come from highdicom (`highdicom.Image`: frame
decoding and the frame's pixel value transformation, RescaleSlope/Intercept or a modality LUT).
Frames and single-frame slices then meet the same stack rule, and `datasets` holds one header
per frame (a FrameHeader: `.instance` and `.frame_number` say where it came from).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomnode.imaging.frames import frame_headers, is_enhanced
from dicomnode.imaging.geometry import GeometryError, slice_stack
from dicomnode.imaging.headers import first_sentence

CT_PADDING_HU = -1024.0


class VolumeError(ValueError):
    """The files do not form one regular 3-D volume; the message says why."""


@dataclass
class Volume:
    array: np.ndarray  # (z, y, x) float32, rescaled values (HU, Bq/ml, ...)
    spacing: tuple[float, float, float]  # (z, y, x) mm
    origin: tuple[float, float, float]  # (x, y, z) mm of voxel 0, patient LPS
    direction: tuple[float, ...]  # 9 values, row-major, columns = x, y, z axes (SimpleITK)
    datasets: list[Dataset] = field(default_factory=list)  # source headers, same slice order
    series_instance_uid: str = ""
    frame_of_reference_uid: str = ""
    modality: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing(tuple(float(s) for s in reversed(self.spacing)))
        image.SetOrigin(tuple(float(o) for o in self.origin))
        image.SetDirection(tuple(float(d) for d in self.direction))
        return image

    def with_sitk(self, image: sitk.Image, out: np.ndarray | None = None) -> "Volume":
        """This volume's identity (modality, UIDs) with the pixels and geometry of `image`; the
        pixels copied into `out` (float32, the image's (z, y, x) shape) when given.

        `datasets` is left empty: the source headers do not describe the slices of another grid.
        """
        if out is None:
            array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
        else:
            view = sitk.GetArrayViewFromImage(image)
            if out.shape != view.shape or out.dtype != np.float32:
                raise ValueError(f"out is a {out.dtype} array of shape {out.shape}, not float32 {view.shape}")
            np.copyto(out, view, casting="same_kind")
            array = out
        return replace(
            self,
            array=array,
            spacing=tuple(float(s) for s in reversed(image.GetSpacing())),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
            datasets=[],
        )


Allocate = Callable[[tuple[int, int, int]], np.ndarray]  # (z, y, x) -> an empty float32 array of that shape


def load_series(paths: Iterable[Path | str], allocate: Allocate | None = None) -> Volume:
    """One series' files (any order) -> Volume; VolumeError says why they do not form one (a
    malformed header too: whatever pydicom raises for it becomes a VolumeError naming it).
    `allocate(shape)` gives the float32 array the slices are read into (e.g. a channel of the
    model's input, so that the volume is not copied there); a new one by default."""
    datasets, planes = [], []
    for path in paths:
        ds = _read(path)
        if is_enhanced(ds):
            headers = frame_headers(ds)
            datasets.extend(headers)
            planes.extend(_enhanced_planes(ds, headers))
        else:
            datasets.append(ds)
            planes.append(None)
    try:
        return _volume(datasets, planes, allocate)
    except VolumeError:
        raise
    except Exception as exc:  # noqa: BLE001 - an attribute pydicom cannot read or convert
        raise VolumeError(
            f"malformed header in series {datasets[0].get('SeriesInstanceUID', '?') if datasets else '?'}: "
            f"{type(exc).__name__}: {first_sentence(exc)}"
        ) from exc


def _volume(datasets: list[Dataset], planes: list | None = None, allocate: Allocate | None = None) -> Volume:
    """`planes[k]`: the rescaled plane of `datasets[k]` when already decoded (a frame), None to
    decode it from the dataset (a single-frame slice); `allocate` as load_series'."""
    planes = planes or [None] * len(datasets)
    if not datasets:
        raise VolumeError("no files given")
    _check_same_series(datasets)
    try:
        stack = slice_stack(
            [[float(v) for v in ds.ImageOrientationPatient] for ds in datasets],
            [[float(v) for v in ds.ImagePositionPatient] for ds in datasets],
        )
    except GeometryError as exc:
        raise VolumeError(f"series {datasets[0].get('SeriesInstanceUID', '?')}: {exc}") from None
    datasets[:] = [datasets[i] for i in stack.order]
    planes = [planes[i] for i in stack.order]
    row, col, normal = stack.row, stack.col, stack.normal
    slice_spacing = stack.spacing or _single_slice_spacing(datasets[0])

    first = datasets[0]
    shape = (len(datasets), int(first.Rows), int(first.Columns))
    array = np.empty(shape, dtype=np.float32) if allocate is None else allocate(shape)
    if array.shape != shape or array.dtype != np.float32:
        raise ValueError(f"allocate gave a {array.dtype} array of shape {array.shape}, not float32 {shape}")
    scratch = np.empty(array.shape[1:], dtype=np.float64)  # one slice's float64 rescale, reused
    for k, (ds, plane) in enumerate(zip(datasets, planes)):
        array[k] = _rescaled_plane(ds, scratch) if plane is None else plane
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    direction = tuple(float(v) for v in np.column_stack([row, col, normal]).ravel())
    return Volume(
        array=array,
        spacing=(slice_spacing, row_spacing, col_spacing),
        origin=tuple(float(v) for v in first.ImagePositionPatient),
        direction=direction,
        datasets=datasets,
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        modality=str(first.get("Modality", "")),
    )


def resample_to(volume: Volume, reference: Volume, default_value: float, out: np.ndarray | None = None) -> Volume:
    """`volume` linearly interpolated onto `reference`'s grid (e.g. CT onto the PET grid); its
    values written into `out` (float32 of the reference's shape, e.g. a channel of the model's
    input) when given. Only the reference's geometry is handed to SimpleITK, not its voxels."""
    if (
        volume.frame_of_reference_uid
        and reference.frame_of_reference_uid
        and volume.frame_of_reference_uid != reference.frame_of_reference_uid
    ):
        raise VolumeError(
            "cannot resample across frames of reference: "
            f"{volume.frame_of_reference_uid} vs {reference.frame_of_reference_uid}"
        )
    resample = sitk.ResampleImageFilter()  # what sitk.Resample(image, reference image, ...) sets from it
    resample.SetSize([int(n) for n in reversed(reference.shape)])
    resample.SetOutputSpacing(tuple(float(s) for s in reversed(reference.spacing)))
    resample.SetOutputOrigin(tuple(float(o) for o in reference.origin))
    resample.SetOutputDirection(tuple(float(d) for d in reference.direction))
    resample.SetTransform(sitk.Transform())
    resample.SetInterpolator(sitk.sitkLinear)
    resample.SetDefaultPixelValue(float(default_value))
    resample.SetOutputPixelType(sitk.sitkFloat32)
    return volume.with_sitk(resample.Execute(volume.to_sitk()), out)


# --- checks -------------------------------------------------------------------------------


def _read(path: Path | str) -> Dataset:
    try:
        return pydicom.dcmread(str(path))
    except Exception as exc:  # noqa: BLE001 - OSError, InvalidDicomError and whatever a damaged file raises
        raise VolumeError(f"cannot read {path}: {exc}") from exc


def _check_same_series(datasets: list[Dataset]) -> None:
    def distinct(keyword: str) -> set:
        return {str(ds.get(keyword, "")) for ds in datasets}

    for keyword in ("SeriesInstanceUID", "Rows", "Columns", "PixelSpacing"):
        values = distinct(keyword)
        if len(values) > 1:
            raise VolumeError(f"mixed {keyword} in one series: {sorted(values)}")
    for ds in datasets:
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise VolumeError(f"slice {ds.get('SOPInstanceUID', '?')} has no position/orientation")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1 and not hasattr(ds, "frame_number"):
            raise VolumeError("multi-frame images without functional groups (not enhanced) are not supported")


def _single_slice_spacing(ds: Dataset) -> float:
    return float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)


def _rescaled_plane(ds: Dataset, out: np.ndarray | None = None) -> np.ndarray:
    """The slice's stored values * RescaleSlope + RescaleIntercept in float64 (in `out` when given:
    a reused buffer of the slice's shape); the caller stores it as float32."""
    try:
        stored = _native_plane(ds)
        if stored is None:
            stored = ds.pixel_array
    except Exception as exc:  # missing or undecodable pixel data: pydicom raises various types
        raise VolumeError(f"cannot decode the pixels of {ds.get('SOPInstanceUID', '?')}: {exc}") from exc
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if out is None or out.shape != stored.shape:
        out = np.empty(stored.shape, dtype=np.float64)
    # stored values are integers: the rescaled plane is finite everywhere when it is at both extremes
    # (a linear map is monotonic), which saves a pass over every voxel
    with np.errstate(over="ignore", invalid="ignore"):
        extremes = np.array([stored.min(), stored.max()], dtype=np.float64) * slope + intercept
        finite = bool(np.isfinite(extremes).all()) if np.issubdtype(stored.dtype, np.integer) else None
        np.multiply(stored, slope, out=out, casting="unsafe")
        out += intercept
    if finite is None:  # floating-point pixel data: each value checked
        finite = bool(np.isfinite(out).all())
    plane = out
    if not finite:
        raise VolumeError(
            f"slice {ds.get('SOPInstanceUID', '?')} of series {ds.get('SeriesInstanceUID', '?')}: "
            f"RescaleSlope {slope:g} / RescaleIntercept {intercept:g} and the pixel values give NaN or "
            "infinite values"
        )
    if ds.get("Modality") == "CT" and "PixelPaddingValue" in ds:
        plane[_padding_mask(ds, stored)] = CT_PADDING_HU
    return plane


_NATIVE_LITTLE_ENDIAN = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})


def _native_plane(ds: Dataset) -> np.ndarray | None:
    """The stored values of an uncompressed little-endian single-frame grey slice, read straight from
    its Pixel Data bytes (what `ds.pixel_array` gives for it with pydicom's default options: no
    masking of unused high bits, the sign from PixelRepresentation), without pydicom's decoder
    set-up, which costs more than the copy on a 512 x 512 slice. None for anything else (compressed,
    big endian, colour, several frames, 1-bit, short data): pixel_array decodes those."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax not in _NATIVE_LITTLE_ENDIAN or "PixelData" not in ds:
        return None
    bits = ds.get("BitsAllocated")
    if bits not in (8, 16, 32) or ds.get("SamplesPerPixel", 1) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return None
    signed = ds.get("PixelRepresentation", 0) == 1
    rows, columns = int(ds.Rows), int(ds.Columns)
    data = ds.PixelData
    if not isinstance(data, bytes) or len(data) < rows * columns * bits // 8:
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    return np.frombuffer(data, dtype=dtype, count=rows * columns).reshape(rows, columns)


def _enhanced_planes(ds: Dataset, headers: list[Dataset]) -> list[np.ndarray]:
    """The rescaled planes of an enhanced multi-frame instance, frame by frame (highdicom decodes
    the frames and applies each frame's pixel value transformation)."""
    uid = ds.get("SOPInstanceUID", "?")
    try:
        image = hd.Image.from_dataset(ds, copy=False)
        numbers = [h.frame_number for h in headers]
        frames = image.get_frames(numbers, apply_real_world_transform=False, apply_modality_transform=True,
                                  apply_voi_transform=False, apply_presentation_lut=False,
                                  apply_palette_color_lut=False, apply_icc_profile=False, dtype=np.float64)
        stored = (image.get_stored_frames(numbers) if ds.get("Modality") == "CT" and "PixelPaddingValue" in ds
                  else None)
    except Exception as exc:  # noqa: BLE001 - missing, undecodable or inconsistent pixel data / transforms
        raise VolumeError(f"cannot decode the frames of {uid}: {type(exc).__name__}: {first_sentence(exc)}") from exc
    planes = []
    for k, header in enumerate(headers):
        plane = np.asarray(frames[k], dtype=np.float64)
        if not np.isfinite(plane).all():
            raise VolumeError(
                f"frame {header.frame_number} of {uid} (series {ds.get('SeriesInstanceUID', '?')}): its pixel "
                "value transformation (RescaleSlope / RescaleIntercept) and the pixel values give NaN or "
                "infinite values"
            )
        if stored is not None:
            plane[_padding_mask(ds, stored[k])] = CT_PADDING_HU
        planes.append(plane.astype(np.float32))
    return planes


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    padding = int(ds.PixelPaddingValue)
    if "PixelPaddingRangeLimit" in ds:
        low, high = sorted((padding, int(ds.PixelPaddingRangeLimit)))
        return (stored >= low) & (stored <= high)
    return stored == padding
