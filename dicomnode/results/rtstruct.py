"""Lesion label map -> DICOM RT Structure Set (RTSTRUCT), for radiotherapy planning systems.

`build_rtstruct(lesion_labels, source, ...)` writes one ROI per lesion ("lesion N": the lesion
numbers of `dicomnode.imaging.measures`, the SR's tracking identifiers) into a new series of the
source study, on the source's frame of reference:

- Contours: per lesion and per source slice, the outlines of the lesion's pixels
  (`skimage.measure.find_contours` at level 0.5 on the slice's mask, padded by one pixel so
  that lesions touching the edge close), CLOSED_PLANAR, in patient coordinates (mm) from
  ImagePositionPatient, ImageOrientationPatient and PixelSpacing. The outline runs halfway
  between the lesion's pixel centres and their neighbours outside; a hole in a lesion is a
  further contour inside it (receivers combine contours of one slice even-odd). Each contour
  references its slice (ContourImageSequence).
- ROIs: ROIGenerationAlgorithm AUTOMATIC with the model named in ROIGenerationDescription;
  RTROIInterpretedType GTV (a gross tumour volume proposal, as RT systems file automatic
  lesion contours; ROIInterpreter empty: no person reviewed it).
- The structure set references every source slice (RTReferencedStudySequence /
  RTReferencedSeriesSequence / ContourImageSequence).

An RT Structure Set needs at least one ROI, so an all-negative result gets one ROI "no
lesions" without contours and without an interpreted type, as its SEG gets an empty segment:
the RT system shows that the study was processed and nothing was found.

highdicom has no RTSTRUCT, so this is pydicom; the IOD is checked by dciodvfy in the tests.
"""

from __future__ import annotations

from datetime import datetime
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid
from skimage.measure import find_contours

from dicomnode.imaging.measures import label_boxes
from dicomnode.results.common import MANUFACTURER, check_on_source, frame_number
from dicomnode.results.preview import PALETTE

# Detached Study Management (retired, but what RTReferencedStudySequence items carry by convention).
STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
NO_LESIONS = "no lesions"
TRANSFER_SYNTAX = ExplicitVRLittleEndian
DEFAULT_CHARACTER_SET = "ISO_IR 100"  # when the source images name none
_PATIENT_AND_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                      "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def build_rtstruct(
    lesion_labels: np.ndarray,
    source: Sequence[Dataset],
    *,
    model_name: str,
    model_version: str,
    series_number: int,
    series_description: str,
    manufacturer: str = MANUFACTURER,
) -> Dataset:
    """An RT Structure Set with one ROI per lesion; `lesion_labels[k]` lies on `source[k]`
    (0 background, n = lesion n)."""
    check_on_source(lesion_labels, source, "lesion labels")
    labels = np.asarray(lesion_labels)
    # each lesion's bounding box (searched within the lesions' box; the contours are traced inside it)
    boxes = {n: box for n, box in enumerate(label_boxes(labels), start=1) if box is not None}
    lesions = sorted(boxes)
    ds = _header(source[0], series_number, series_description, manufacturer, model_name, model_version)
    frame_of_reference = ds.FrameOfReferenceUID
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame(source, frame_of_reference)]
    description = f"{model_name} {model_version}"[:64]
    if lesions:
        ds.StructureSetROISequence = [_roi(n, f"lesion {n}", frame_of_reference, description) for n in lesions]
        ds.ROIContourSequence = [_roi_contours(n, _contours(labels, n, boxes[n], source)) for n in lesions]
        ds.RTROIObservationsSequence = [_observation(n, "GTV") for n in lesions]
    else:  # all negative: one empty ROI
        ds.StructureSetROISequence = [_roi(1, NO_LESIONS, frame_of_reference, description)]
        ds.ROIContourSequence = [_roi_contours(1, [])]
        ds.RTROIObservationsSequence = [_observation(1, "")]
    return ds


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """The closed outlines of a 2-D mask as (n, 2) arrays of (row, column) pixel positions,
    first point not repeated at the end."""
    padded = np.pad(mask.astype(np.float32), 1)
    return [contour[:-1] - 1.0 for contour in find_contours(padded, 0.5)]


def to_patient(points_rc: np.ndarray, ds: Dataset) -> np.ndarray:
    """(row, column) pixel positions on slice `ds` -> (n, 3) patient coordinates in mm."""
    origin = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    along_row, along_column = orientation[:3], orientation[3:]
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    rows, columns = points_rc[:, :1], points_rc[:, 1:]
    return origin + columns * column_spacing * along_row + rows * row_spacing * along_column


def _header(first: Dataset, series_number: int, series_description: str, manufacturer: str,
            model_name: str, model_version: str) -> Dataset:
    now = datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = TRANSFER_SYNTAX
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", DEFAULT_CHARACTER_SET)
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for keyword in _PATIENT_AND_STUDY:
        setattr(ds, keyword, first.get(keyword, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model_name[:64]
    ds.SoftwareVersions = model_version[:64]
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "lesions"
    ds.StructureSetName = f"{model_name} lesions"[:64]
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    return ds


def _image_reference(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    frame = frame_number(ds)
    if frame is not None:  # a frame of an enhanced multi-frame image
        item.ReferencedFrameNumber = frame
    return item


def _referenced_frame(source: Sequence[Dataset], frame_of_reference: str) -> Dataset:
    series = Dataset()
    series.SeriesInstanceUID = source[0].SeriesInstanceUID
    series.ContourImageSequence = [_image_reference(ds) for ds in source]
    study = Dataset()
    study.ReferencedSOPClassUID = STUDY_COMPONENT_SOP_CLASS
    study.ReferencedSOPInstanceUID = source[0].StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = frame_of_reference
    frame.RTReferencedStudySequence = [study]
    return frame


def _roi(number: int, name: str, frame_of_reference: str, description: str) -> Dataset:
    roi = Dataset()
    roi.ROINumber = number
    roi.ReferencedFrameOfReferenceUID = frame_of_reference
    roi.ROIName = name
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = description
    return roi


def _roi_contours(number: int, contours: list[Dataset]) -> Dataset:
    item = Dataset()
    item.ReferencedROINumber = number
    item.ROIDisplayColor = list(PALETTE[(number - 1) % len(PALETTE)])
    if contours:
        item.ContourSequence = DicomSequence(contours)
    return item


def _contours(labels: np.ndarray, number: int, box: tuple[slice, slice, slice],
              source: Sequence[Dataset]) -> list[Dataset]:
    """The CLOSED_PLANAR contours of lesion `number` (its bounding `box` in `labels`), slice by
    slice, each referencing its slice. Traced on the box (the lesion's pixels with a border of
    background around them, as on the whole slice), then moved to the slice's pixel positions."""
    zs, rows, columns = box
    mask = labels[box] == number
    offset = np.array([rows.start, columns.start], dtype=np.float64)
    contours = []
    for j in np.flatnonzero(mask.any(axis=(1, 2))):
        k = zs.start + int(j)
        for points in slice_contours(mask[j]):
            points = points + offset
            contour = Dataset()
            contour.ContourNumber = len(contours) + 1
            contour.ContourImageSequence = [_image_reference(source[k])]
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [f"{v:.3f}" for v in to_patient(points, source[k]).ravel()]
            contours.append(contour)
    return contours


def _observation(number: int, interpreted_type: str) -> Dataset:
    item = Dataset()
    item.ObservationNumber = number
    item.ReferencedROINumber = number
    item.RTROIInterpretedType = interpreted_type
    item.ROIInterpreter = ""
    return item
