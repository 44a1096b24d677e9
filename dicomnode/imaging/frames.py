"""Enhanced (and Legacy Converted Enhanced) multi-frame images as per-frame headers.

An enhanced CT, PET or MR instance keeps what a single-frame slice has at the top level in its
functional groups: the position, orientation, pixel spacing and rescale of each frame in
SharedFunctionalGroupsSequence (the same for every frame) or PerFrameFunctionalGroupsSequence
(frame by frame); a Legacy Converted one also keeps the attributes the enhanced modules have no
place for (PET's Units, DecayCorrection, CorrectedImage, RadiopharmaceuticalInformationSequence,
...) in the Unassigned Shared / Per-Frame Converted Attributes functional groups.

`frame_headers(ds)` gives one `FrameHeader` per frame: the instance's top level (without pixel
data and functional groups) with the shared, then the frame's own functional group items laid
over it, so every later stage (the slice-stack rule, the rescale, the SUV factor) reads a frame
as it reads a single-frame slice. Where the enhanced form names a thing differently the
single-frame keyword is set too:

  FrameContentSequence  FrameAcquisitionDateTime -> AcquisitionDateTime (and AcquisitionDate/Time),
                        FrameAcquisitionDuration (ms) -> ActualFrameDuration,
                        FrameReferenceDateTime kept (TemporalPositionIndex kept);
  Enhanced PET          Units from the pixel value transformation's RescaleType or the real
                        world value map's UCUM unit (Bq/ml -> BQML, {SUVbw}g/ml -> GML, ...);
                        DecayCorrection from DecayCorrected (YES: START, with the
                        DecayCorrectionDateTime as the reference; NO: NONE).

Each FrameHeader remembers its instance (`.instance`: the header without pixel data) and
`.frame_number` (1-based), so the SEG, the SR and the RT structure set can reference the frame.
A single-frame instance is its own one header (`frame_headers` returns it unchanged).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

# Functional group items whose contents are references to other objects, not this frame's attributes.
_NOT_FLATTENED = {
    "ConversionSourceAttributesSequence",
    "DerivationImageSequence",
    "ReferencedImageSequence",
}
# Functional group macros whose sequence is itself the attribute (several items), as in a single-frame image.
_KEPT_AS_SEQUENCE = {"RealWorldValueMappingSequence"}
# Top-level elements left out of each frame's header.
_NOT_COPIED = {"PixelData", "FloatPixelData", "DoubleFloatPixelData", "SharedFunctionalGroupsSequence",
               "PerFrameFunctionalGroupsSequence"}
# Units of the Enhanced PET pixel values (RescaleType, or a real world value map's UCUM code) -> PET Units.
_PET_UNITS = {"BQML": "BQML", "BQ/ML": "BQML", "GML": "GML", "{SUVBW}G/ML": "GML", "CNTS": "CNTS",
              "{COUNTS}": "CNTS", "CM2ML": "CM2ML", "{SUVBSA}CM2/ML": "CM2ML"}


class FrameHeader(Dataset):
    """One frame of an enhanced multi-frame instance as a single-frame header; `.instance` is the
    instance's header (no pixel data), `.frame_number` the frame's number in it (1-based)."""

    instance: Dataset
    frame_number: int


def is_enhanced(ds: Dataset) -> bool:
    """An instance whose frames are described by functional groups (enhanced or legacy converted)."""
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def number_of_frames(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1


def instance_header(ds: Dataset) -> Dataset:
    """`ds` without its pixel data (what the result objects reference)."""
    header = Dataset()
    header.file_meta = getattr(ds, "file_meta", Dataset())
    for element in ds:
        if element.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            header.add(element)
    return header


def frame_headers(ds: Dataset, frames: list[int] | None = None) -> list[Dataset]:
    """Each frame of `ds` (or of `frames`, 1-based) as a single-frame header (FrameHeader); a
    single-frame instance (no functional groups) is returned as it is."""
    if not is_enhanced(ds):
        return [ds]
    instance = instance_header(ds)
    top = [element for element in ds if element.keyword not in _NOT_COPIED]
    shared = _items(ds.get("SharedFunctionalGroupsSequence"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    count = number_of_frames(ds)
    headers = []
    for number in frames or range(1, count + 1):
        header = FrameHeader()
        header.file_meta = instance.file_meta
        for element in top:
            header.add(element)
        _lay_over(header, shared)
        if number - 1 < len(per_frame):
            _lay_over(header, per_frame[number - 1])
        _single_frame_names(header)
        header.instance = instance
        header.frame_number = number
        headers.append(header)
    return headers


def _items(sequence: DicomSequence | None) -> Dataset | None:
    return sequence[0] if sequence else None


def _lay_over(header: Dataset, group: Dataset | None) -> None:
    """The attributes in each functional group macro of `group` (one item each) onto `header`;
    the Unassigned Converted Attributes items likewise."""
    if group is None:
        return
    for macro in group:
        if macro.VR != "SQ" or macro.keyword in _NOT_FLATTENED or not macro.value:
            continue
        if macro.keyword in _KEPT_AS_SEQUENCE:
            header.add(macro)
            continue
        for element in macro.value[0]:
            header.add(element)


def _single_frame_names(header: Dataset) -> None:
    """Set the single-frame keyword where the enhanced form names the thing differently."""
    acquired = header.get("FrameAcquisitionDateTime")
    if acquired:
        header.AcquisitionDateTime = acquired
        text = str(acquired)
        if len(text) >= 8:
            header.AcquisitionDate = text[:8]
        if len(text) > 8:
            header.AcquisitionTime = text[8:].split("+")[0].split("-")[0]
    duration = header.get("FrameAcquisitionDuration")
    if duration is not None and "ActualFrameDuration" not in header:
        header.ActualFrameDuration = int(round(float(duration)))
    if header.get("Modality") == "PT":
        _pet_names(header)


def _pet_names(header: Dataset) -> None:
    """Enhanced PET: Units and DecayCorrection from their enhanced forms (legacy converted keep
    the PET Series attributes themselves)."""
    if not header.get("Units"):
        found = str(header.get("RescaleType") or "").strip().upper()
        if found not in _PET_UNITS:
            for item in header.get("RealWorldValueMappingSequence") or []:
                for code in item.get("MeasurementUnitsCodeSequence") or []:
                    found = str(code.get("CodeValue", "")).strip().upper()
                    if found in _PET_UNITS:
                        break
        if found in _PET_UNITS:
            header.Units = _PET_UNITS[found]
    if not header.get("DecayCorrection"):
        corrected = str(header.get("DecayCorrected") or "").strip().upper()
        if corrected == "YES":
            header.DecayCorrection = "START"
        elif corrected == "NO":
            header.DecayCorrection = "NONE"
