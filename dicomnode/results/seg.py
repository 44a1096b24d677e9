"""Model output (label map on the source grid) -> DICOM Segmentation (SEG) with highdicom.

`build_seg(labels, source, ...)` encodes every non-zero voxel of `labels` as one BINARY
segment ("lesion": Morphologically Abnormal Structure / Neoplasm, SNOMED CT) produced
AUTOMATICally by an Artificial Intelligence algorithm (name, version, folds); with `segments`
(label value -> name and codes, see dicomnode.results.labelcodes) each label value becomes a segment
of its own, e.g. one per organ. The SEG gets a new series in the source study and the
source's frame of reference.

Encoding choices (highdicom 0.28):
- BINARY frames are compressed with JPEG 2000 lossless when that makes the pixel data smaller
  than bit-packed Explicit VR Little Endian (1 bit per voxel), else stored bit-packed: for
  BINARY highdicom accepts no other compressed syntax (RLE and JPEG-LS only for FRACTIONAL and
  LABELMAP). The demo study (64 slices of 64x64, 6 lesions): pixel data 32768 -> 11350 bytes,
  file 77350 -> 55942 bytes (the per-frame headers stay). A destination that accepts only
  uncompressed SEGs gets them decompressed by the sender (dicomnode.net.sender).
- Frames of enhanced multi-frame sources (dicomnode.imaging.frames): the plane positions are
  given, highdicom references each SEG frame's source frame (ReferencedFrameNumber) when the
  series is one instance; for a series split over several instances (highdicom matches within
  one only) `_reference_frames` adds the same Derivation Image items by position.
- Every source slice gets a frame, empty or not (omit_empty_frames=False): viewers cope
  better with a complete stack, and an all-negative result still yields a valid SEG with
  one described, empty segment; likewise a label the model did not find stays a described
  segment whose frames are all empty.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from dicomnode.config import LabelCode
from dicomnode.results.common import (
    MANUFACTURER,
    Provenance,
    ResultError,
    check_on_source,
    contributing_equipment,
    frame_number,
    source_instances,
    with_type2_attributes,
)
from dicomnode.results.labelcodes import LESION

# JPEG 2000 lossless when smaller than bit-packed Explicit VR Little Endian, else the latter
TRANSFER_SYNTAXES = (JPEG2000Lossless, ExplicitVRLittleEndian)
ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence


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
    manufacturer: str = MANUFACTURER,
    segments: Mapping[int, LabelCode] | None = None,
    provenance: Provenance | None = None,
) -> hd.seg.Segmentation:
    """A BINARY SEG; `labels[k]` lies on `source[k]` (same slice order). Without `segments`: one
    segment `segment_label` (lesion codes) of `labels > 0`. With `segments` (label value -> name
    and codes, dicomnode.results.labelcodes): one segment per label value, numbered 1, 2, ... in value
    order, each empty where its label is absent. `provenance`: the algorithm's further parameters
    (Algorithm Parameters beside the folds, and the Contributing Equipment item), the site's
    organization and disclaimer (Image Comments)."""
    check_on_source(labels, source)
    provenance = provenance or Provenance()
    if segments is None:  # one segment where any label is: segment number 1 is the mask itself
        segments, pixels = {1: LESION.model_copy(update={"name": segment_label})}, (labels > 0).view(np.uint8)
    else:
        pixels = _segment_numbers(labels, list(segments))
    fold_text = ",".join(str(f) for f in folds)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name,
        family=ALGORITHM_FAMILY,
        version=model_version,
        source=manufacturer,
        parameters={"folds": fold_text, **provenance.parameters},
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=code.name[:64],
            segmented_property_category=hd.sr.CodedConcept(
                code.category.value, code.category.scheme, code.category.meaning
            ),
            segmented_property_type=hd.sr.CodedConcept(code.type.value, code.type.scheme, code.type.meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=code.name[:64],
        )
        for number, code in enumerate(segments.values(), start=1)
    ]
    instances = [with_type2_attributes(ds) for ds in source_instances(source)]
    frames = None
    if any(frame_number(ds) is not None for ds in source):
        # Frames of enhanced multi-frame instances: highdicom references each frame (Derivation
        # Image / Source Image with ReferencedFrameNumber) by matching the planes' positions with
        # the frames of the first instance and of the further ones.
        frames = dict(
            plane_positions=[hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, ds.ImagePositionPatient)
                             for ds in source],
            further_source_images=instances[1:] or None,
        )
        instances = instances[:1]
    encode = dict(
        source_images=instances,
        **(frames or {}),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
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
        omit_empty_frames=False,
    )
    seg = hd.seg.Segmentation(**encode, transfer_syntax_uid=TRANSFER_SYNTAXES[0])
    if len(seg.PixelData) >= packed_size((len(descriptions) * labels.shape[0], *labels.shape[1:])):
        seg = hd.seg.Segmentation(**encode, transfer_syntax_uid=TRANSFER_SYNTAXES[1])
    if frames is not None:
        _reference_frames(seg, source)
    seg.ContributingEquipmentSequence = [contributing_equipment(
        manufacturer, model_name, model_version, Provenance(
            {"folds": fold_text, **provenance.parameters}, provenance.organization, provenance.disclaimer,
            provenance.when))]
    if provenance.disclaimer:
        seg.ImageComments = provenance.disclaimer[:10240]  # LT, General Image Module
    if seg.FrameOfReferenceUID != source[0].FrameOfReferenceUID:
        raise ResultError("SEG frame of reference differs from the source images")
    return seg


def packed_size(shape: Sequence[int]) -> int:
    """Bytes of bit-packed BINARY pixel data for a (frames, rows, columns) label map, padded even."""
    size = -(-int(np.prod(shape)) // 8)
    return size + size % 2


def _segment_numbers(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """The label map with label value values[k] as segment number k + 1; ResultError for a label
    value that has no segment."""
    present = set(np.unique(labels).tolist()) - {0}
    unknown = sorted(present - set(values))
    if unknown:
        raise ResultError(
            f"label value{'s' if len(unknown) > 1 else ''} {unknown} in the label map "
            f"ha{'ve' if len(unknown) > 1 else 's'} no segment (segments for {values})"
        )
    lookup = np.zeros(max([*values, *present]) + 1, dtype=np.uint8)
    lookup[values] = np.arange(1, len(values) + 1)
    return lookup[labels]


def _reference_frames(seg: Dataset, source: Sequence[Dataset]) -> None:
    """Give each SEG frame that highdicom left without a Derivation Image (a series split over
    several multi-frame instances: highdicom matches planes within one instance only) the source
    frame at its position, as highdicom writes it for one instance (Segmentation derivation,
    Source Image for Image Processing Operation, ReferencedFrameNumber, locations preserved)."""
    by_position = {_position_key(ds.ImagePositionPatient): ds for ds in source}
    for item in seg.PerFrameFunctionalGroupsSequence:
        if item.get("DerivationImageSequence"):
            continue
        frame = by_position.get(_position_key(item.PlanePositionSequence[0].ImagePositionPatient))
        if frame is None:
            raise ResultError("a SEG frame lies at no source frame's position")
        reference = Dataset()
        reference.ReferencedSOPClassUID = frame.SOPClassUID
        reference.ReferencedSOPInstanceUID = frame.SOPInstanceUID
        reference.ReferencedFrameNumber = frame_number(frame)
        reference.PurposeOfReferenceCodeSequence = [
            hd.sr.CodedConcept.from_code(codes.cid7202.SourceImageForImageProcessingOperation)
        ]
        reference.SpatialLocationsPreserved = "YES"
        derivation = Dataset()
        derivation.DerivationCodeSequence = [hd.sr.CodedConcept.from_code(codes.cid7203.SegmentationImageDerivation)]
        derivation.SourceImageSequence = [reference]
        item.DerivationImageSequence = [derivation]


def _position_key(position: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(float(v), 3) for v in position)
