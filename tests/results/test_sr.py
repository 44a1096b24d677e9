"""TID 1500 PET Measurement Report (Comprehensive 3D SR) from the synthetic study's lesion truth:
valid, and its numbers, codes and references read back."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicomnode.imaging.measures import measure_lesions
from dicomnode.imaging.suv import pet_suv_volume
from dicomnode.imaging.volumes import load_series
from dicomnode.results.common import ResultError, write_dicom
from dicomnode.results.seg import build_seg
from dicomnode.results.sr import build_sr

from tests.support.dicomtools import dciodvfy_errors

MODEL = dict(model_name="demo-petct", model_version="0.1.0")
SR_ARGS = dict(MODEL, series_number=902, series_description="demo-petct measurements")

# (value, scheme) of the codes the report must use
SUVBW = ("126401", "DCM")
MAXIMUM, MEAN, PEAK, TOTAL = ("56851009", "SCT"), ("373098007", "SCT"), ("126031", "DCM"), ("255619001", "SCT")
METABOLIC_VOLUME, TLG = ("126032", "DCM"), ("126033", "DCM")
NUMBER_OF_LESIONS = ("246206008", "SCT")


def key(code) -> tuple[str, str]:
    return (code.value, code.scheme_designator)


@pytest.fixture(scope="module")
def seg(pet, truth):
    return build_seg(truth, pet.datasets, folds=[0, 1, 2, 3, 4], series_number=901,
                     series_description="demo-petct lesions", **MODEL)


@pytest.fixture(scope="module")
def measured(pet, truth):
    return measure_lesions(truth > 0, pet_suv_volume(pet), pet.spacing)


@pytest.fixture(scope="module")
def sr_path(measured, seg, pet, tmp_path_factory):
    measures, labels = measured
    return write_dicom(
        build_sr(measures, labels, seg, pet.datasets, **SR_ARGS), tmp_path_factory.mktemp("sr") / "sr.dcm"
    )


@pytest.fixture(scope="module")
def report(sr_path):
    sr = hd.sr.srread(sr_path)
    return sr, hd.sr.MeasurementReport.from_sequence(sr.content)


def measurements_by_key(group) -> dict:
    """{(name, derivation or None): Measurement}; each combination appears once."""
    found = {}
    for m in group.get_measurements():
        k = (key(m.name), key(m.derivation) if m.derivation is not None else None)
        assert k not in found, k
        found[k] = m
    return found


@pytest.mark.e2e
def test_sr_passes_dciodvfy(sr_path):
    assert dciodvfy_errors(sr_path) == []


def test_document(report, synth_study, seg, pet):
    sr, _ = report
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == synth_study.study_instance_uid
    assert sr.SeriesInstanceUID not in (synth_study.pt_series_instance_uid, seg.SeriesInstanceUID)
    assert sr.SeriesNumber == 902 and sr.SeriesDescription == "demo-petct measurements"
    assert sr.Modality == "SR" and sr.PatientID == pet.datasets[0].PatientID
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    title = sr.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "126003",
        "DCM",
        "PET Measurement Report",
    )
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_evidence_is_the_seg_and_the_pet_slices(report, seg, pet, synth_study):
    sr, _ = report
    (study_item,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert study_item.StudyInstanceUID == synth_study.study_instance_uid
    referenced = {
        series.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence}
        for series in study_item.ReferencedSeriesSequence
    }
    assert referenced == {
        seg.SeriesInstanceUID: {seg.SOPInstanceUID},
        synth_study.pt_series_instance_uid: {ds.SOPInstanceUID for ds in pet.datasets},
    }


def test_observer_is_the_device(report):
    _, measurement_report = report
    (context,) = measurement_report.get_observer_contexts()
    device = context.observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes)
    assert device.name == "dicomnode" and device.manufacturer_name == "dicomnode"
    assert device.model_name == "demo-petct 0.1.0"


def test_one_group_per_lesion_with_its_measures(report, measured, seg, synth_study):
    measures, _ = measured
    _, measurement_report = report
    groups = measurement_report.get_volumetric_roi_measurement_groups()
    assert measures.lesion_count == len(synth_study.phantom.lesions) == len(groups) > 0
    assert len({g.tracking_uid for g in groups}) == len(groups)
    for lesion, group in zip(measures.lesions, groups):
        assert group.tracking_identifier == f"lesion {lesion.number}"
        assert key(group.finding_type) == ("108369006", "SCT")
        assert group.reference_type == hd.sr.CodedConcept("121191", "DCM", "Referenced Segment")
        segment_item = group.referenced_segment[0]
        assert segment_item.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert segment_item.referenced_sop_class_uid == seg.SOPClassUID
        assert segment_item.referenced_segment_numbers == [1]
        values = measurements_by_key(group)
        assert set(values) == {(SUVBW, MAXIMUM), (SUVBW, MEAN), (SUVBW, PEAK), (METABOLIC_VOLUME, None), (TLG, None)}
        assert values[SUVBW, MAXIMUM].value == lesion.suv_max
        assert values[SUVBW, MEAN].value == lesion.suv_mean
        assert values[SUVBW, PEAK].value == lesion.suv_peak
        assert values[METABOLIC_VOLUME, None].value == lesion.volume_ml
        assert values[TLG, None].value == lesion.tlg_g
        for k in ((SUVBW, MAXIMUM), (SUVBW, MEAN), (SUVBW, PEAK)):
            assert key(values[k].unit) == ("g/ml{SUVbw}", "UCUM")
        assert key(values[METABOLIC_VOLUME, None].unit) == ("ml", "UCUM")
        assert key(values[TLG, None].unit) == ("g", "UCUM")


def test_source_series_of_the_referenced_segment(sr_path, synth_study):
    ds = pydicom.dcmread(sr_path)
    imaging = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"][0]
    lesion_group = imaging.ContentSequence[0]
    (series_item,) = [
        i for i in lesion_group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121232"
    ]  # Source Series For Segmentation
    assert series_item.UID == synth_study.pt_series_instance_uid


def test_study_totals(report, measured):
    measures, _ = measured
    _, measurement_report = report
    (group,) = measurement_report.get_image_measurement_groups()
    assert group.tracking_identifier == "all lesions"
    values = measurements_by_key(group)
    assert set(values) == {(NUMBER_OF_LESIONS, None), (METABOLIC_VOLUME, TOTAL), (TLG, TOTAL)}
    assert values[NUMBER_OF_LESIONS, None].value == measures.lesion_count
    assert values[METABOLIC_VOLUME, TOTAL].value == pytest.approx(measures.total_mtv_ml, rel=1e-12)
    assert values[TLG, TOTAL].value == pytest.approx(measures.total_tlg_g, rel=1e-12)
    assert measures.total_mtv_ml == pytest.approx(sum(les.volume_ml for les in measures.lesions))
    assert key(values[NUMBER_OF_LESIONS, None].unit) == ("1", "UCUM")


def test_measures_match_the_phantom(measured, synth_study, pet):
    """A sanity check on the inputs: the hottest lesion's SUVmax is near the phantom's lesion SUV."""
    measures, labels = measured
    hottest = max(les.suv for les in synth_study.phantom.lesions)
    assert 0.5 * hottest < measures.lesions[0].suv_max <= 1.5 * hottest
    assert labels.shape == pet.shape and labels.max() == measures.lesion_count


@pytest.mark.e2e
def test_empty_study_gives_a_valid_report(pet, seg, tmp_path):
    empty = np.zeros(pet.shape, dtype=np.uint8)
    measures, labels = measure_lesions(empty, pet_suv_volume(pet), pet.spacing)
    path = write_dicom(build_sr(measures, labels, seg, pet.datasets, **SR_ARGS), tmp_path / "empty.dcm")
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    measurement_report = hd.sr.MeasurementReport.from_sequence(sr.content)
    assert measurement_report.get_volumetric_roi_measurement_groups() == []
    (group,) = measurement_report.get_image_measurement_groups()
    values = measurements_by_key(group)
    assert values[NUMBER_OF_LESIONS, None].value == 0
    assert values[METABOLIC_VOLUME, TOTAL].value == 0 and values[TLG, TOTAL].value == 0
    assert seg.SOPInstanceUID in {uid for _, _, uid, _ in sr.get_evidence()}


def test_sources_without_accession_number(measured, seg, pet):
    sources = [pydicom.Dataset(ds) for ds in pet.datasets]
    for ds in sources:
        del ds.AccessionNumber
    measures, labels = measured
    sr = build_sr(measures, labels, seg, sources, **SR_ARGS)
    assert sr.AccessionNumber == ""
    assert all("AccessionNumber" not in ds for ds in sources)


def test_labels_must_fit(measured, seg, pet):
    measures, labels = measured
    with pytest.raises(ResultError, match="does not match the source grid"):
        build_sr(measures, labels[:-1], seg, pet.datasets, **SR_ARGS)
    shifted = np.where(labels == 1, 0, labels)  # lesion 1 missing from the label map
    with pytest.raises(ResultError, match="lesion 1"):
        build_sr(measures, shifted, seg, pet.datasets, **SR_ARGS)


def test_seg_must_reference_the_source_series(measured, seg, synth_study):
    measures, labels = measured
    ct = load_series(synth_study.ct_files)
    with pytest.raises(ResultError, match="does not reference the source series"):
        build_sr(measures, labels, seg, ct.datasets, **SR_ARGS)


def test_unknown_segment_number_is_refused(measured, seg, pet):
    measures, labels = measured
    with pytest.raises(ResultError, match="not in the SEG"):
        build_sr(measures, labels, seg, pet.datasets, lesion_segment_numbers=[2] * measures.lesion_count, **SR_ARGS)
