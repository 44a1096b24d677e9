"""Segment volumes -> DICOM Comprehensive 3D SR, TID 1500 Measurement Report, for models
without a PET channel (organs, lymph nodes, glioma sub-regions).

`build_segment_sr(measures, seg, source, ...)` reports what `dicomnode.imaging.measures.measure_segments`
measured, next to the multi-label SEG (dicomnode.results.seg with `segments`):

- Document title: "Imaging Measurement Report" (DCM 126000, CID 7021). Procedure reported
  (CID 100) from the source's modality: "CT unspecified body region" (LN 25045-6), "MRI
  unspecified body region" (LN 25056-3), else "Imaging procedure" (SCT 363679005).
- Observer context: the node as a device, as in dicomnode.sr.
- One TID 1411 Volumetric ROI Measurements group per segment, in segment number order:
  tracking identifier = the segment's name + a new tracking UID; the ROI is that SEG segment;
  finding category and type are the segment's codes; one measurement: Volume (SCT 118565006,
  CID 7472), unit ml (UCUM). A label the model did not find is reported with Volume 0 ml,
  as its SEG segment is present and empty (the node's all-negative policy: a result always
  says what was looked for).
- Evidence: the SEG and every source slice.

The number of connected components per label (e.g. lymph nodes) goes to measures.json only:
DICOM has no concept for "number of parts of a segment" that a viewer would show correctly
("Number of lesions", SCT 246206008, would mislabel organs).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicomnode.config import LabelCode
from dicomnode.imaging.measures import SegmentMeasures
from dicomnode.results.common import MANUFACTURER, Provenance, ResultError, source_instances, with_type2_attributes
from dicomnode.results.sr import UNIT_ML, algorithm_parameters, device_observation_context, report_document

TITLE = codes.DCM.ImagingMeasurementReport
VOLUME = codes.SCT.Volume
PROCEDURES = {"CT": codes.cid100.CTUnspecifiedBodyRegion, "MR": codes.cid100.MRIUnspecifiedBodyRegion}
IMAGING_PROCEDURE = codes.cid100.ImagingProcedure


def build_segment_sr(
    measures: Sequence[SegmentMeasures],
    seg: hd.seg.Segmentation | Dataset,
    source: Sequence[Dataset],
    *,
    segment_codes: Mapping[int, LabelCode],
    model_name: str,
    model_version: str,
    series_number: int,
    series_description: str,
    manufacturer: str = MANUFACTURER,
    provenance: Provenance | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report of one Volume per SEG segment; `measures[k]` is segment k + 1 of `seg`
    (build_seg numbers `segment_codes` 1, 2, ... in label value order)."""
    _check_fits(measures, seg, source, segment_codes)
    algorithm = hd.sr.AlgorithmIdentification(
        name=model_name, version=model_version, manufacturer=manufacturer,
        parameters=["Volume: voxels of the segment x voxel volume on the source grid",
                    *algorithm_parameters(provenance)],
    )
    source_series = hd.sr.SourceSeriesForSegmentation(str(source[0].SeriesInstanceUID))
    groups = [
        _segment_group(m, number, segment_codes[m.label], seg, source_series, algorithm)
        for number, m in enumerate(measures, start=1)
    ]
    report = hd.sr.MeasurementReport(
        observation_context=device_observation_context(manufacturer, model_name, model_version),
        procedure_reported=PROCEDURES.get(str(source[0].get("Modality", "")), IMAGING_PROCEDURE),
        imaging_measurements=groups,
        title=TITLE,
    )
    evidence = [*(with_type2_attributes(ds) for ds in source_instances(source)), seg]
    return report_document(report, evidence, series_number=series_number,
                           series_description=series_description, model_name=model_name, model_version=model_version,
                           manufacturer=manufacturer, provenance=provenance)


def _segment_group(
    measure: SegmentMeasures,
    segment_number: int,
    code: LabelCode,
    seg: Dataset,
    source_series: hd.sr.SourceSeriesForSegmentation,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=measure.name[:64]),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=segment_number,
            source_series=source_series,
        ),
        finding_category=Code(code.category.value, code.category.scheme, code.category.meaning),
        finding_type=Code(code.type.value, code.type.scheme, code.type.meaning),
        algorithm_id=algorithm,
        measurements=[hd.sr.Measurement(name=VOLUME, value=measure.volume_ml, unit=UNIT_ML)],
    )


def _check_fits(measures: Sequence[SegmentMeasures], seg: Dataset, source: Sequence[Dataset],
                segment_codes: Mapping[int, LabelCode]) -> None:
    if not source:
        raise ResultError("no source images")
    if str(seg.StudyInstanceUID) != str(source[0].StudyInstanceUID):
        raise ResultError("the SEG belongs to another study than the source images")
    labels = [str(item.SegmentLabel) for item in seg.SegmentSequence]
    names = [segment_codes[m.label].name[:64] if m.label in segment_codes else f"label {m.label} (no code)"
             for m in measures]
    if labels != names:
        raise ResultError(f"the measures' segments {names} are not the SEG's {labels}")
