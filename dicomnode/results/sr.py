"""Lesion measures -> DICOM Comprehensive 3D SR, TID 1500 Measurement Report (highdicom).

`build_sr(measures, lesion_labels, seg, source, ...)` writes what `dicomnode.imaging.measures`
measured into a structured report that goes into the source study next to the SEG:

- Document title: "PET Measurement Report" (DCM 126003, CID 7021 Measurement Report Document
  Titles). Procedure reported (CID 100): "PET/CT FDG imaging of whole body" (SCT 443271005)
  when the source's radiopharmaceutical is FDG, else "PET whole body" (LN 44139-4).
- Observer context: a device (TID 1004): the node (name "dicomnode"), its manufacturer and
  the model ("<model name> <model version>"); the device UID is derived from these, so one
  model version keeps one UID.
- One TID 1411 Volumetric ROI Measurements group per lesion, in lesion number order:
  tracking identifier "lesion N" + a new tracking UID; the ROI is the SEG's lesion segment
  (Referenced Segment: SEG SOP instance, segment number, source series = the series the SEG
  references: the PET's, or the CT's for a model on the CT grid);
  finding category Morphologically Abnormal Structure and finding type Neoplasm (SCT, the
  SEG's segment codes); algorithm identification (TID 4019): the model, its version, and how
  lesions were measured; measurements (TID 300):
    SUVbw (DCM 126401) with derivation Maximum (SCT 56851009), Mean (SCT 373098007) and
        Peak Value Within ROI (DCM 126031), unit g/ml{SUVbw} (UCUM);
    Metabolic Volume (DCM 126032), ml; Total Lesion Glycolysis (DCM 126033), g.
- One TID 1501 Measurement Group (no image region) for the study: tracking identifier
  "all lesions", Number of lesions (SCT 246206008, unit UCUM "1"), Metabolic Volume and Total
  Lesion Glycolysis with derivation Total (SCT 255619001). An all-negative study still has
  this group (count 0), which also satisfies highdicom's rule that a Measurement Report holds
  at least one measurement group.
- Evidence (CurrentRequestedProcedureEvidenceSequence): the SEG and every source slice.

The SEG holds ONE segment for all lesions (dicomnode.results.seg), so every lesion group references
segment 1 and the lesion is told apart by its tracking identifier ("lesion N" is the lesion
number of `dicomnode.imaging.measures`: components of the segment, ordered by SUVmax). A SEG with one
segment per lesion can be referenced per lesion with `lesion_segment_numbers`.

Not used: `ReferencedSegment.from_segmentation` (highdicom 0.28 looks for the Segment
Identification Sequence per frame; a single-segment SEG has it in the shared functional
groups, so it fails); the reference is built from the SEG's UIDs and the PET series instead.
"""

from __future__ import annotations

from typing import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from dicomnode import __version__
from dicomnode.imaging.measures import LesionMeasures, StudyMeasures
from dicomnode.results.common import (
    MANUFACTURER,
    ResultError,
    check_on_source,
    source_instances,
    with_type2_attributes,
)

TITLE = Code("126003", "DCM", "PET Measurement Report")
PROCEDURE_FDG_PET_CT = Code("443271005", "SCT", "PET/CT FDG imaging of whole body")
PROCEDURE_PET = Code("44139-4", "LN", "PET whole body")

SUVBW = Code("126401", "DCM", "SUVbw")
MAXIMUM = Code("56851009", "SCT", "Maximum")
MEAN = Code("373098007", "SCT", "Mean")
PEAK = Code("126031", "DCM", "Peak Value Within ROI")
TOTAL = Code("255619001", "SCT", "Total")
METABOLIC_VOLUME = Code("126032", "DCM", "Metabolic Volume")
TOTAL_LESION_GLYCOLYSIS = Code("126033", "DCM", "Total Lesion Glycolysis")
NUMBER_OF_LESIONS = Code("246206008", "SCT", "Number of lesions")

UNIT_SUVBW = Code("g/ml{SUVbw}", "UCUM", "Standardized Uptake Value body weight")
UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_G = Code("g", "UCUM", "gram")
UNIT_NONE = Code("1", "UCUM", "no units")

FINDING_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure  # as the SEG's segment
FINDING_TYPE = codes.SCT.Neoplasm

TRANSFER_SYNTAX = ExplicitVRLittleEndian  # of the SR documents (this one and dicomnode.results.segment_sr)

_FDG_CODES = {("35321007", "SCT"), ("C-B1031", "SRT")}


def build_sr(
    measures: StudyMeasures,
    lesion_labels: np.ndarray,
    seg: hd.seg.Segmentation | Dataset,
    source: Sequence[Dataset],
    *,
    model_name: str,
    model_version: str,
    series_number: int,
    series_description: str,
    manufacturer: str = MANUFACTURER,
    lesion_segment_numbers: Sequence[int] | None = None,
    pet_header: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 PET Measurement Report of `measures` (see the module's docstring).

    `lesion_labels` is the label map `measure_lesions` returned, on the grid of `source` (the
    PET slices the SEG references, in slice order); `lesion_segment_numbers[k]` is the SEG
    segment of lesion k + 1 (default: segment 1 for every lesion). The source may be the CT
    (a model on the CT grid); `pet_header`, a PET slice header, then gives the radiopharmaceutical
    for the procedure reported (default: `source[0]`)."""
    _check_fits(measures, lesion_labels, seg, source)
    if lesion_segment_numbers is None:
        lesion_segment_numbers = [1] * measures.lesion_count
    if len(lesion_segment_numbers) != measures.lesion_count:
        raise ResultError(
            f"{len(lesion_segment_numbers)} segment numbers for {measures.lesion_count} lesions"
        )
    known_segments = {int(item.SegmentNumber) for item in seg.SegmentSequence}
    unknown = sorted(set(int(n) for n in lesion_segment_numbers) - known_segments)
    if unknown:
        raise ResultError(f"segment number(s) {unknown} not in the SEG (it has {sorted(known_segments)})")

    headers = [with_type2_attributes(ds) for ds in source_instances(source)]  # a multi-frame instance once
    algorithm = hd.sr.AlgorithmIdentification(
        name=model_name,
        version=model_version,
        parameters=[
            f"lesions: {measures.connectivity}-connected components of the segment"
            + (f", at least {measures.min_volume_ml:g} ml" if measures.min_volume_ml > 0 else ""),
            "SUVpeak: mean SUVbw within 6.2035 mm (1 ml sphere) of the SUVmax voxel",
            f"measured by dicomnode {__version__}",
        ],
        manufacturer=manufacturer,
    )
    source_series = hd.sr.SourceSeriesForSegmentation(str(source[0].SeriesInstanceUID))
    groups: list = [
        _lesion_group(lesion, seg, segment_number, source_series, algorithm)
        for lesion, segment_number in zip(measures.lesions, lesion_segment_numbers)
    ]
    groups.append(_study_group(measures, algorithm))

    report = hd.sr.MeasurementReport(
        observation_context=device_observation_context(manufacturer, model_name, model_version),
        procedure_reported=_procedure_reported(pet_header if pet_header is not None else source[0]),
        imaging_measurements=groups,
        title=TITLE,
    )
    sr = report_document(report, [*headers, seg], series_number=series_number, series_description=series_description,
                         model_name=model_name, model_version=model_version, manufacturer=manufacturer)
    if sr.StudyInstanceUID != source[0].StudyInstanceUID:
        raise ResultError("SR study differs from the source images")
    return sr


def report_document(
    report: hd.sr.MeasurementReport,
    evidence: Sequence[Dataset],
    *,
    series_number: int,
    series_description: str,
    model_name: str,
    model_version: str,
    manufacturer: str,
) -> hd.sr.Comprehensive3DSR:
    """The Comprehensive 3D SR document of a TID 1500 `report`, in a new series of the evidence's
    study: complete (everything found is reported), PRELIMINARY and UNVERIFIED (an automatic
    result nobody has verified)."""
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description,
        manufacturer_model_name=model_name,
        software_versions=model_version,
        device_serial_number="0",
        transfer_syntax_uid=TRANSFER_SYNTAX,
    )


def device_observation_context(manufacturer: str, model_name: str, model_version: str) -> hd.sr.ObservationContext:
    """The node as the observer (TID 1004); one model version keeps one device UID."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["dicomnode", manufacturer, model_name, model_version]),
        name="dicomnode",
        manufacturer_name=manufacturer,
        model_name=f"{model_name} {model_version}",
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                      observer_identifying_attributes=device)
    )


# --- content ------------------------------------------------------------------------------


def _lesion_group(
    lesion: LesionMeasures,
    seg: Dataset,
    segment_number: int,
    source_series: hd.sr.SourceSeriesForSegmentation,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    measurements = [
        hd.sr.Measurement(name=SUVBW, value=lesion.suv_max, unit=UNIT_SUVBW, derivation=MAXIMUM),
        hd.sr.Measurement(name=SUVBW, value=lesion.suv_mean, unit=UNIT_SUVBW, derivation=MEAN),
        hd.sr.Measurement(name=SUVBW, value=lesion.suv_peak, unit=UNIT_SUVBW, derivation=PEAK),
        hd.sr.Measurement(name=METABOLIC_VOLUME, value=lesion.volume_ml, unit=UNIT_ML),
        hd.sr.Measurement(name=TOTAL_LESION_GLYCOLYSIS, value=lesion.tlg_g, unit=UNIT_G),
    ]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"lesion {lesion.number}"),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=int(segment_number),
            source_series=source_series,
        ),
        finding_category=FINDING_CATEGORY,
        finding_type=FINDING_TYPE,
        algorithm_id=algorithm,
        measurements=measurements,
    )


def _study_group(
    measures: StudyMeasures, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    measurements = [
        hd.sr.Measurement(name=NUMBER_OF_LESIONS, value=measures.lesion_count, unit=UNIT_NONE),
        hd.sr.Measurement(name=METABOLIC_VOLUME, value=measures.total_mtv_ml, unit=UNIT_ML, derivation=TOTAL),
        hd.sr.Measurement(
            name=TOTAL_LESION_GLYCOLYSIS, value=measures.total_tlg_g, unit=UNIT_G, derivation=TOTAL
        ),
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="all lesions"),
        algorithm_id=algorithm,
        measurements=measurements,
    )


def _procedure_reported(ds: Dataset) -> Code:
    for drug in ds.get("RadiopharmaceuticalInformationSequence", []):
        for code in drug.get("RadiopharmaceuticalCodeSequence", []):
            if (str(code.get("CodeValue", "")), str(code.get("CodingSchemeDesignator", ""))) in _FDG_CODES:
                return PROCEDURE_FDG_PET_CT
        text = str(drug.get("Radiopharmaceutical", "")).lower()
        if "fdg" in text or "fluorodeoxyglucose" in text:
            return PROCEDURE_FDG_PET_CT
    return PROCEDURE_PET


# --- checks -------------------------------------------------------------------------------


def _check_fits(
    measures: StudyMeasures, lesion_labels: np.ndarray, seg: Dataset, source: Sequence[Dataset]
) -> None:
    if not source:
        raise ResultError("no source images")
    if str(seg.StudyInstanceUID) != str(source[0].StudyInstanceUID):
        raise ResultError("the SEG belongs to another study than the source images")
    referenced = {str(s.SeriesInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])}
    if str(source[0].SeriesInstanceUID) not in referenced:
        raise ResultError(f"the SEG does not reference the source series (it references {sorted(referenced)})")
    labels = np.asarray(lesion_labels)
    check_on_source(labels, source, "lesion labels")
    if measures.lesion_count != len(measures.lesions):
        raise ResultError(f"lesion_count {measures.lesion_count} but {len(measures.lesions)} lesions")
    if [les.number for les in measures.lesions] != list(range(1, measures.lesion_count + 1)):
        raise ResultError("lesions must be numbered 1..N in order")
    if labels.size and (labels.min() < 0 or labels.max() > measures.lesion_count):
        raise ResultError(f"lesion labels outside 0..{measures.lesion_count}")
    for lesion, voxels in zip(measures.lesions, _voxels_per_label(labels, measures.lesion_count)):
        if voxels != lesion.voxels:
            raise ResultError(
                f"lesion {lesion.number}: {lesion.voxels} voxels measured, "
                f"{voxels} in the label map"
            )


def _voxels_per_label(labels: np.ndarray, count: int) -> list[int]:
    """Voxels of each label 1..count: counted inside each label's bounding box (one pass over the
    volume to find the boxes, none to copy it: a whole-body CT grid is 78 M voxels)."""
    if not np.issubdtype(labels.dtype, np.integer):
        return np.bincount(labels.ravel().astype(np.int64), minlength=count + 1)[1:].tolist()
    boxes = ndimage.find_objects(labels, max_label=count)
    return [int(np.count_nonzero(labels[box] == n)) if box is not None else 0 for n, box in enumerate(boxes, start=1)]
