"""Model output (label map on the source grid) -> DICOM Segmentation (SEG) with highdicom.

`build_seg(labels, source, ...)` encodes every non-zero voxel of `labels` as one BINARY
segment ("lesion": Morphologically Abnormal Structure / Neoplasm, SNOMED CT) produced
AUTOMATICally by an Artificial Intelligence algorithm (name, version, folds). The SEG gets a
new series in the source study and the source's frame of reference.

Encoding choices (highdicom 0.28):
- BINARY frames are bit-packed and uncompressed (Explicit VR Little Endian): highdicom refuses
  RLE Lossless for BINARY (only FRACTIONAL/LABELMAP may use RLE), and bit-packing already
  stores 1 bit per voxel (64 PET slices of 64x64 -> 32 KiB).
- Every source slice gets a frame, empty or not (omit_empty_frames=False): viewers cope
  better with a complete stack, and an all-negative result still yields a valid SEG with
  one described, empty segment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

# Type 2 attributes highdicom copies from the first source image: absent ones break SEG creation.
_TYPE2_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


class SegError(ValueError):
    """The label map and the source images do not fit together."""


def build_seg(
    labels: np.ndarray,
    source: Sequence[Dataset],
    *,
    model_name: str,
    model_version: str,
    folds: list[int],
    series_number: int,
    series_description: str,
    segment_label: str = "lesion",
    manufacturer: str = "dicomnode",
) -> hd.seg.Segmentation:
    """A BINARY SEG of `labels > 0`; `labels[k]` lies on `source[k]` (same slice order)."""
    _check_fits(labels, source)
    fold_text = ",".join(str(f) for f in folds)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=model_version,
        source=manufacturer,
        parameters={"folds": fold_text},
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=hd.UID(),
        tracking_id=segment_label,
    )
    seg = hd.seg.Segmentation(
        source_images=[_with_type2_attributes(ds) for ds in source],
        pixel_array=(labels > 0).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=model_name,
        software_versions=model_version,
        device_serial_number="0",
        series_description=series_description,
        content_description=f"{model_name} {model_version} folds {fold_text}"[:64],  # LO
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,
    )
    if seg.FrameOfReferenceUID != source[0].FrameOfReferenceUID:
        raise SegError("SEG frame of reference differs from the source images")
    return seg


def write_seg(seg: hd.seg.Segmentation, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path, enforce_file_format=True)
    return path


def _check_fits(labels: np.ndarray, source: Sequence[Dataset]) -> None:
    if not source:
        raise SegError("no source images")
    if labels.ndim != 3:
        raise SegError(f"labels must be (z, y, x), got shape {labels.shape}")
    first = source[0]
    expected = (len(source), int(first.Rows), int(first.Columns))
    if labels.shape != expected:
        raise SegError(f"labels shape {labels.shape} does not match the source grid {expected}")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(keyword, "")) for ds in source}
        if len(values) != 1 or "" in values:
            raise SegError(f"source images need one common {keyword}, got {sorted(values)}")


def _with_type2_attributes(ds: Dataset) -> Dataset:
    """A header-only copy of `ds` with missing Type 2 attributes added empty."""
    copy = Dataset()
    copy.file_meta = getattr(ds, "file_meta", Dataset())
    for element in ds:
        if element.keyword != "PixelData":
            copy.add(element)
    for keyword in _TYPE2_FROM_SOURCE:
        if keyword not in copy:
            setattr(copy, keyword, "")
    return copy
