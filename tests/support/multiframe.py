"""Single-frame series -> Legacy Converted Enhanced multi-frame instances, by highdicom.legacy
(a converter no one here wrote), for the multi-frame tests."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
from highdicom.legacy import (
    LegacyConvertedEnhancedCTImage,
    LegacyConvertedEnhancedMRImage,
    LegacyConvertedEnhancedPETImage,
)

CONVERTERS = {"CT": LegacyConvertedEnhancedCTImage, "PT": LegacyConvertedEnhancedPETImage,
              "MR": LegacyConvertedEnhancedMRImage}


def convert_series(files: list[Path], out: Path, *, parts: int = 1, concatenation: bool = False,
                   drop: int | None = None) -> list[Path]:
    """The series of `files` as `parts` Legacy Converted Enhanced instances (slices split by
    position, in order along z), written to `out`; `concatenation`: the parts are one
    concatenation (ConcatenationUID, InConcatenationNumber / TotalNumber); `drop`: the slice (index
    along z) left out, a frame missing."""
    datasets = sorted((pydicom.dcmread(p) for p in files), key=lambda ds: float(ds.ImagePositionPatient[2]))
    if drop is not None:
        del datasets[drop]
    first = datasets[0]
    converter = CONVERTERS[first.Modality]
    size = -(-len(datasets) // parts)
    concatenation_uid, source_uid = hd.UID(), hd.UID()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k in range(parts):
        chunk = datasets[k * size:(k + 1) * size]
        image = converter(chunk, series_instance_uid=first.SeriesInstanceUID, series_number=first.SeriesNumber,
                          sop_instance_uid=hd.UID(), instance_number=k + 1)
        if concatenation:
            image.ConcatenationUID = concatenation_uid
            image.SOPInstanceUIDOfConcatenationSource = source_uid
            image.InConcatenationNumber = k + 1
            image.InConcatenationTotalNumber = parts
            image.ConcatenationFrameOffsetNumber = k * size
        path = out / f"{first.Modality}-{k + 1}.dcm"
        image.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
