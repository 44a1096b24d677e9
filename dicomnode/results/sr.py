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

from datetime import date
from typing import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode import __version__
from dicomnode.imaging.comparison import Comparison, LesionChange, LesionValues, StudySummary
from dicomnode.imaging.lesion_match import MatchStatus
from dicomnode.imaging.measures import LesionMeasures, StudyMeasures, label_boxes
from dicomnode.imaging.percist import Category
from dicomnode.results.common import (
    MANUFACTURER,
    PRIVATE_SCHEME,
    Provenance,
    ResultError,
    check_on_source,
    contributing_equipment,
    declare_private_scheme,
    device_uid,
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
COMMENT = Code("121106", "DCM", "Comment")  # the site's disclaimer, a TEXT item of the report

# --- the comparison with a prior study (issue 16); see the module's docstring ---
SUL = Code("126405", "DCM", "SUVlbm(Janma)")  # CID 7180/218: SUV lean body mass, Janmahasatian
UNIT_SUL = Code("g/ml{SUVlbm(Janma)}", "UCUM", "Standardized Uptake Value lean body mass (Janma)")  # CID 85
STANDARD_DEVIATION = Code("386136009", "SCT", "Standard Deviation")
LIVER = Code("10200004", "SCT", "Liver")
UNIT_PERCENT = Code("%", "UCUM", "Percent")
UNIT_MM = Code("mm", "UCUM", "millimeter")
CURRENT_RESPONSE = Code("112048", "DCM", "Current Response")
RESPONSE_METHOD = Code("112021", "DCM", "Response Evaluation Method")
PROCEDURE_STUDY_UID = Code("121018", "DCM", "Procedure Study Instance UID")
STUDY_DATE = Code("111060", "DCM", "Study Date")

PERCIST = Code("PERCIST1.0", PRIVATE_SCHEME, "PERCIST 1.0")
RESPONSE_CODES = {
    Category.CMR: Code("CMR", PRIVATE_SCHEME, "Complete metabolic response"),
    Category.PMR: Code("PMR", PRIVATE_SCHEME, "Partial metabolic response"),
    Category.SMD: Code("SMD", PRIVATE_SCHEME, "Stable metabolic disease"),
    Category.PMD: Code("PMD", PRIVATE_SCHEME, "Progressive metabolic disease"),
    Category.NOT_ASSESSABLE: Code("NOTASSESSABLE", PRIVATE_SCHEME, "Not assessable"),
}
LESION_STATUS = Code("LESIONSTATUS", PRIVATE_SCHEME, "Lesion status since prior study")
STATUS_CODES = {
    MatchStatus.MATCHED: Code("PRESENTBEFORE", PRIVATE_SCHEME, "Lesion present in prior study"),
    MatchStatus.NEW: Code("NEWLESION", PRIVATE_SCHEME, "New lesion"),
    MatchStatus.RESOLVED: Code("RESOLVEDLESION", PRIVATE_SCHEME, "Resolved lesion"),
}
PEAK_CHANGE_PERCENT = Code("SULPEAKPCT", PRIVATE_SCHEME, "Percent change of SULpeak from prior")
PEAK_CHANGE = Code("SULPEAKDIFF", PRIVATE_SCHEME, "Change of SULpeak from prior")
MTV_CHANGE_PERCENT = Code("MTVPCT", PRIVATE_SCHEME, "Percent change of metabolic volume from prior")
TLG_CHANGE_PERCENT = Code("TLGPCT", PRIVATE_SCHEME, "Percent change of total lesion glycolysis from prior")
NEW_LESIONS = Code("NEWLESIONS", PRIVATE_SCHEME, "Number of new lesions")
RESOLVED_LESIONS = Code("RESOLVEDLESIONS", PRIVATE_SCHEME, "Number of resolved lesions")
MEASURABILITY = Code("MEASURABLE", PRIVATE_SCHEME, "PERCIST measurability threshold")
REGISTRATION_RESIDUAL = Code("REGRESIDUAL", PRIVATE_SCHEME, "Registration body-surface residual")

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
    comparison: Comparison | None = None,
    provenance: Provenance | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 PET Measurement Report of `measures` (see the module's docstring).

    `lesion_labels` is the label map `measure_lesions` returned, on the grid of `source` (the
    PET slices the SEG references, in slice order); `lesion_segment_numbers[k]` is the SEG
    segment of lesion k + 1 (default: segment 1 for every lesion). The source may be the CT
    (a model on the CT grid); `pet_header`, a PET slice header, then gives the radiopharmaceutical
    for the procedure reported (default: `source[0]`). `comparison` (dicomnode.imaging.comparison,
    of this study with its prior) adds the comparison's content (see the module's docstring)."""
    _check_fits(measures, lesion_labels, seg, source)
    if comparison is not None and comparison.current.lesion_count != measures.lesion_count:
        raise ResultError(f"the comparison has {comparison.current.lesion_count} current lesions, the measures "
                          f"{measures.lesion_count}: not measured alike")
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
            *algorithm_parameters(provenance),
        ],
        manufacturer=manufacturer,
    )
    source_series = hd.sr.SourceSeriesForSegmentation(str(source[0].SeriesInstanceUID))
    tracking_uids = {lesion.number: hd.UID() for lesion in measures.lesions}
    groups: list = [
        _lesion_group(lesion, seg, segment_number, source_series, algorithm, tracking_uids[lesion.number],
                      comparison)
        for lesion, segment_number in zip(measures.lesions, lesion_segment_numbers)
    ]
    groups.append(_study_group(measures, algorithm, comparison))
    if comparison is not None:
        groups += comparison_groups(comparison, algorithm, tracking_uids)

    report = hd.sr.MeasurementReport(
        observation_context=device_observation_context(manufacturer, model_name, model_version),
        procedure_reported=_procedure_reported(pet_header if pet_header is not None else source[0]),
        imaging_measurements=groups,
        title=TITLE,
    )
    sr = report_document(report, [*headers, seg], series_number=series_number, series_description=series_description,
                         model_name=model_name, model_version=model_version, manufacturer=manufacturer,
                         provenance=provenance)
    if sr.StudyInstanceUID != source[0].StudyInstanceUID:
        raise ResultError("SR study differs from the source images")
    if comparison is not None:
        declare_private_scheme(sr)
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
    provenance: Provenance | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The Comprehensive 3D SR document of a TID 1500 `report`, in a new series of the evidence's
    study: complete (everything found is reported), PRELIMINARY and UNVERIFIED (an automatic
    result nobody has verified; a release at review makes it VERIFIED, results/verification.py).
    With `provenance`: the site's disclaimer as a last Comment (DCM 121106) TEXT item of the report
    (TID 1500 is extensible), and a Contributing Equipment item for the node and the model."""
    provenance = provenance or Provenance()
    if provenance.disclaimer:
        report[0].ContentSequence.append(hd.sr.TextContentItem(
            name=COMMENT, value=provenance.disclaimer, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    sr = hd.sr.Comprehensive3DSR(
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
    sr.ContributingEquipmentSequence = [contributing_equipment(manufacturer, model_name, model_version, provenance)]
    return sr


def algorithm_parameters(provenance: Provenance | None) -> list[str]:
    """The algorithm's parameters as TID 4019 Algorithm Parameters values ("folds 0,1,2,3,4", ...)."""
    return [f"{key} {value}" for key, value in (provenance.parameters if provenance else {}).items()]


def device_observation_context(manufacturer: str, model_name: str, model_version: str) -> hd.sr.ObservationContext:
    """The node as the observer (TID 1004); one model version keeps one device UID."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(manufacturer, model_name, model_version),
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
    tracking_uid: str,
    comparison: Comparison | None = None,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    extra: list = []
    evaluations: list = []
    row = comparison.matched(lesion.number) if comparison is not None else None
    if comparison is not None and row is not None and row.current is not None:
        extra = _uptake_measurements(row.current, comparison.unit) if comparison.unit == "SUL" else []
        extra += _change_measurements(row, comparison)
        evaluations = [hd.sr.QualitativeEvaluation(LESION_STATUS, STATUS_CODES[row.status])]
    measurements = [
        hd.sr.Measurement(name=SUVBW, value=lesion.suv_max, unit=UNIT_SUVBW, derivation=MAXIMUM),
        hd.sr.Measurement(name=SUVBW, value=lesion.suv_mean, unit=UNIT_SUVBW, derivation=MEAN),
        hd.sr.Measurement(name=SUVBW, value=lesion.suv_peak, unit=UNIT_SUVBW, derivation=PEAK),
        hd.sr.Measurement(name=METABOLIC_VOLUME, value=lesion.volume_ml, unit=UNIT_ML),
        hd.sr.Measurement(name=TOTAL_LESION_GLYCOLYSIS, value=lesion.tlg_g, unit=UNIT_G),
        *extra,
    ]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=f"lesion {lesion.number}"),
        time_point_context=_time_point(comparison, "current") if comparison is not None else None,
        qualitative_evaluations=evaluations or None,
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
    measures: StudyMeasures, algorithm: hd.sr.AlgorithmIdentification, comparison: Comparison | None = None
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    extra: list = []
    if comparison is not None:
        if comparison.current.hottest is not None:
            extra.append(_uptake(comparison.current.hottest.peak, comparison.unit, PEAK))
        extra += [hd.sr.Measurement(name=NEW_LESIONS, value=len(comparison.new_lesions), unit=UNIT_NONE),
                  hd.sr.Measurement(name=RESOLVED_LESIONS, value=len(comparison.resolved_lesions), unit=UNIT_NONE)]
    measurements = [
        hd.sr.Measurement(name=NUMBER_OF_LESIONS, value=measures.lesion_count, unit=UNIT_NONE),
        hd.sr.Measurement(name=METABOLIC_VOLUME, value=measures.total_mtv_ml, unit=UNIT_ML, derivation=TOTAL),
        hd.sr.Measurement(
            name=TOTAL_LESION_GLYCOLYSIS, value=measures.total_tlg_g, unit=UNIT_G, derivation=TOTAL
        ),
        *extra,
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="all lesions"),
        time_point_context=_time_point(comparison, "current") if comparison is not None else None,
        algorithm_id=algorithm,
        measurements=measurements,
    )


# --- the comparison with the prior study --------------------------------------------------------


def comparison_groups(comparison: Comparison, algorithm: hd.sr.AlgorithmIdentification,
                      tracking_uids: dict[int, str]) -> list:
    """The TID 1501 groups of the comparison: each prior lesion (matched ones under the current
    lesion's tracking identifier and UID, resolved ones as "prior lesion M"), the prior's "all
    lesions", the liver reference of each study and the response."""
    groups: list = []
    for row in comparison.lesions:
        if row.prior is None:
            continue
        if row.status is MatchStatus.MATCHED and row.pair.current is not None:
            tracking = hd.sr.TrackingIdentifier(uid=tracking_uids[row.pair.current],
                                                identifier=f"lesion {row.pair.current}")
        else:
            tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"prior lesion {row.prior.number}")
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            time_point_context=_time_point(comparison, "prior"),
            finding_type=FINDING_TYPE,
            finding_category=FINDING_CATEGORY,
            algorithm_id=algorithm,
            measurements=[*_uptake_measurements(row.prior, comparison.unit),
                          hd.sr.Measurement(name=METABOLIC_VOLUME, value=row.prior.mtv_ml, unit=UNIT_ML),
                          hd.sr.Measurement(name=TOTAL_LESION_GLYCOLYSIS, unit=UNIT_G,
                                            value=_tlg_suvbw(row.prior, comparison.prior))],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(LESION_STATUS, STATUS_CODES[row.status])]
            if row.status is MatchStatus.RESOLVED else None,
        ))
    prior = comparison.prior
    prior_totals = [
        hd.sr.Measurement(name=NUMBER_OF_LESIONS, value=prior.lesion_count, unit=UNIT_NONE),
        hd.sr.Measurement(name=METABOLIC_VOLUME, value=prior.total_mtv_ml, unit=UNIT_ML, derivation=TOTAL),
        hd.sr.Measurement(name=TOTAL_LESION_GLYCOLYSIS, value=prior.total_tlg / _factor(prior), unit=UNIT_G,
                          derivation=TOTAL),
    ]
    if prior.hottest is not None:
        prior_totals.append(_uptake(prior.hottest.peak, comparison.unit, PEAK))
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="all lesions (prior)"),
        time_point_context=_time_point(comparison, "prior"), algorithm_id=algorithm, measurements=prior_totals))
    for when, study in (("current", comparison.current), ("prior", prior)):
        liver = study.liver
        if not liver.assessed or liver.mean is None or liver.sd is None:
            continue
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"liver reference ({when})"),
            time_point_context=_time_point(comparison, when),
            finding_sites=[hd.sr.FindingSite(LIVER)],
            algorithm_id=algorithm,
            measurements=[_uptake(liver.mean, comparison.unit, MEAN),
                          _uptake(liver.sd, comparison.unit, STANDARD_DEVIATION)],
        ))
    groups.append(_response_group(comparison, algorithm))
    return groups


def _response_group(comparison: Comparison, algorithm: hd.sr.AlgorithmIdentification) -> list:
    response = comparison.response
    measurements = []
    if response.change_percent is not None:
        measurements.append(hd.sr.Measurement(name=PEAK_CHANGE_PERCENT, value=response.change_percent,
                                              unit=UNIT_PERCENT))
    if response.change_sul is not None:
        measurements.append(hd.sr.Measurement(name=PEAK_CHANGE, value=response.change_sul,
                                              unit=_uptake_unit(comparison.unit)))
    if comparison.mtv_change_percent is not None:
        measurements.append(hd.sr.Measurement(name=MTV_CHANGE_PERCENT, value=comparison.mtv_change_percent,
                                              unit=UNIT_PERCENT))
    tlg_before = comparison.prior.total_tlg / _factor(comparison.prior)
    if tlg_before > 0:
        tlg_now = comparison.current.total_tlg / _factor(comparison.current)
        measurements.append(hd.sr.Measurement(name=TLG_CHANGE_PERCENT, value=100.0 * (tlg_now - tlg_before) /
                                              tlg_before, unit=UNIT_PERCENT))
    measurements += [hd.sr.Measurement(name=NEW_LESIONS, value=len(comparison.new_lesions), unit=UNIT_NONE),
                     hd.sr.Measurement(name=RESOLVED_LESIONS, value=len(comparison.resolved_lesions), unit=UNIT_NONE)]
    if response.threshold_prior is not None:
        measurements.append(hd.sr.Measurement(name=MEASURABILITY, value=response.threshold_prior,
                                              unit=_uptake_unit(comparison.unit)))
    if comparison.registration.surface_residual_mm is not None:
        measurements.append(hd.sr.Measurement(name=REGISTRATION_RESIDUAL, unit=UNIT_MM,
                                              value=comparison.registration.surface_residual_mm))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="response"),
        time_point_context=_time_point(comparison, "current"),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(CURRENT_RESPONSE, RESPONSE_CODES[response.category]),
                                 hd.sr.QualitativeEvaluation(RESPONSE_METHOD, PERCIST)],
    )
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    container = group[0]
    container.ContentSequence.extend([
        hd.sr.UIDRefContentItem(PROCEDURE_STUDY_UID, comparison.prior.study_uid, relationship_type=contains),
        *([hd.sr.DateContentItem(STUDY_DATE, _as_date(comparison.prior.study_date), relationship_type=contains)]
          if _as_date(comparison.prior.study_date) else []),
        hd.sr.TextContentItem(COMMENT, comparison_sentence(comparison), relationship_type=contains),
    ])
    return group


def comparison_sentence(comparison: Comparison) -> str:
    """The comparison in one paragraph for the reader (the response group's Comment)."""
    response = comparison.response
    text = (f"Compared with the prior study of {_as_date(comparison.prior.study_date) or comparison.prior.study_date}"
            f" (Study Instance UID {comparison.prior.study_uid}): PERCIST 1.0 {response.category.value}: "
            f"{response.reason}.")
    text += "".join(f" Warning: {w}." for w in response.warnings)
    text += "".join(f" Note: {n}." for n in comparison.notes)
    if comparison.registration_note:
        text += f" Registration: {comparison.registration_note}."
    return text[:10240]


def _time_point(comparison: Comparison, when: str) -> hd.sr.TimePointContext:
    study = comparison.current if when == "current" else comparison.prior
    date = _as_date(study.study_date)
    return hd.sr.TimePointContext(
        time_point=f"{when} study {date.isoformat() if date else study.study_date}"[:64],
        time_point_order=2 if when == "current" else 1,
        subject_time_point_identifier=study.study_date or None,
    )


def _uptake_unit(unit: str) -> Code:
    return UNIT_SUL if unit == "SUL" else UNIT_SUVBW


def _uptake(value: float, unit: str, derivation: Code) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=SUL if unit == "SUL" else SUVBW, value=value, unit=_uptake_unit(unit),
                             derivation=derivation)


def _uptake_measurements(values: LesionValues, unit: str) -> list:
    return [_uptake(values.max, unit, MAXIMUM), _uptake(values.mean, unit, MEAN), _uptake(values.peak, unit, PEAK)]


def _change_measurements(row: LesionChange, comparison: Comparison) -> list:
    if row.status is not MatchStatus.MATCHED or row.prior is None or row.current is None:
        return []
    out = []
    if row.peak_change_percent is not None:
        out.append(hd.sr.Measurement(name=PEAK_CHANGE_PERCENT, value=row.peak_change_percent, unit=UNIT_PERCENT))
    out.append(hd.sr.Measurement(name=PEAK_CHANGE, value=row.current.peak - row.prior.peak,
                                 unit=_uptake_unit(comparison.unit)))
    if row.mtv_change_percent is not None:
        out.append(hd.sr.Measurement(name=MTV_CHANGE_PERCENT, value=row.mtv_change_percent, unit=UNIT_PERCENT))
    before = _tlg_suvbw(row.prior, comparison.prior)
    if before > 0:
        now = _tlg_suvbw(row.current, comparison.current)
        out.append(hd.sr.Measurement(name=TLG_CHANGE_PERCENT, value=100.0 * (now - before) / before,
                                     unit=UNIT_PERCENT))
    return out


def _factor(study: StudySummary) -> float:
    """SUL per SUVbw of the comparison's values (1 when they are SUVbw)."""
    return study.uptake_factor


def _tlg_suvbw(values: LesionValues, study: StudySummary) -> float:
    """TLG as the SR's lesion groups give it: SUVbw mean x MTV (g)."""
    return values.tlg / _factor(study)


def _as_date(value: str) -> date | None:
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    except (ValueError, IndexError, TypeError):
        return None


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
    """Voxels of each label 1..count: counted inside each label's bounding box (the boxes searched
    within the lesions' box, nothing copied: a whole-body CT grid is 78 M voxels)."""
    if not np.issubdtype(labels.dtype, np.integer):
        return np.bincount(labels.ravel().astype(np.int64), minlength=count + 1)[1:].tolist()
    boxes = label_boxes(labels, max_label=count)
    return [int(np.count_nonzero(labels[box] == n)) if box is not None else 0 for n, box in enumerate(boxes, start=1)]
