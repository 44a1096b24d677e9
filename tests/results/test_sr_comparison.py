"""The TID 1500 SR of a follow-up with its comparison (issue 16), on the synthetic patient timeline
written as DICOM (dicomnode.synth.timeline.write_timeline): the time points read back from the
written series (as the pipeline reads them), compared, and the comparison in the SR: codes,
values, the prior's identity, tracking identifiers shared across time points, dciodvfy clean."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicomnode.imaging.comparison import compare
from dicomnode.imaging.lesion_match import MatchStatus
from dicomnode.imaging.measures import measure_lesions
from dicomnode.imaging.suv import pet_suv_volume
from dicomnode.imaging.timepoint import Patient, TimePoint, VolumeGeometry
from dicomnode.imaging.volumes import load_series
from dicomnode.results.common import write_dicom
from dicomnode.results.seg import build_seg
from dicomnode.results.sr import build_sr
from dicomnode.synth.timeline import timeline, write_timeline

from tests.support.dicomtools import dciodvfy_errors

MODEL = dict(model_name="demo-petct", model_version="0.1.0")

SUL = ("126405", "DCM")
UNIT_SUL = ("g/ml{SUVlbm(Janma)}", "UCUM")
PEAK, MEAN, SD = ("126031", "DCM"), ("373098007", "SCT"), ("386136009", "SCT")
PRIVATE = "99DCMNODE"


def key(code) -> tuple[str, str]:
    return (code.value, code.scheme_designator)


def read_timepoint(study) -> tuple:
    """(PET volume, TimePoint) from a written study, as the pipeline builds one."""
    pet, ct = load_series(study.pt_files), load_series(study.ct_files)
    ds = pet.datasets[0]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(study.truth_labels)))
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(study.root / "truth" / "liver.nii.gz")))
    return pet, TimePoint(
        study_uid=str(ds.StudyInstanceUID), study_date=str(ds.StudyDate), study_time=str(ds.StudyTime),
        patient=Patient(float(ds.PatientWeight), float(ds.PatientSize), str(ds.PatientSex)),
        suv=pet_suv_volume(pet), labels=(labels > 0).astype(np.uint8), geometry=VolumeGeometry.of_volume(pet),
        ct=ct.array, ct_geometry=VolumeGeometry.of_volume(ct), liver=liver)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return write_timeline(tmp_path_factory.mktemp("timeline"), timeline("mixed"))


@pytest.fixture(scope="module")
def case(written, tmp_path_factory):
    _, prior = read_timepoint(written.baseline)
    pet, current = read_timepoint(written.followup)
    comparison = compare(current, prior)
    measures, labels = measure_lesions(current.labels, current.suv, pet.spacing)
    seg = build_seg(current.labels, pet.datasets, folds=[0], series_number=901, series_description="lesions", **MODEL)
    sr = build_sr(measures, labels, seg, pet.datasets, series_number=902, series_description="measurements",
                  comparison=comparison, **MODEL)
    path = write_dicom(sr, tmp_path_factory.mktemp("sr") / "sr.dcm")
    return comparison, measures, path


@pytest.fixture(scope="module")
def report(case):
    _, _, path = case
    sr = hd.sr.srread(path)
    return sr, hd.sr.MeasurementReport.from_sequence(sr.content)


@pytest.mark.e2e  # dciodvfy is a subprocess
def test_sr_with_comparison_passes_dciodvfy(case):
    assert dciodvfy_errors(case[2]) == []


def test_comparison_from_written_studies(case, written):
    comparison, measures, _ = case
    assert comparison.response.category.value == "progressive metabolic disease"  # the new lesion
    assert comparison.prior.study_uid == written.baseline.study_instance_uid
    assert comparison.registration.surface_residual_mm < 2.0
    assert [r.status for r in comparison.lesions].count(MatchStatus.MATCHED) == 2
    assert comparison.current.lesion_count == measures.lesion_count == 3


def test_private_scheme_declared(report):
    sr, _ = report
    schemes = {item.CodingSchemeDesignator: item for item in sr.CodingSchemeIdentificationSequence}
    assert schemes[PRIVATE].CodingSchemeName == "dicomnode private codes"


def test_current_lesions_carry_sul_status_and_changes(report, case):
    comparison, measures, _ = case
    _, measurement_report = report
    groups = measurement_report.get_volumetric_roi_measurement_groups()
    assert len(groups) == measures.lesion_count
    for group in groups:
        number = int(group.tracking_identifier.split()[-1])
        row = comparison.matched(number)
        values = {(key(m.name), key(m.derivation) if m.derivation else None): m for m in group.get_measurements()}
        assert values[SUL, PEAK].value == pytest.approx(row.current.peak)
        assert key(values[SUL, PEAK].unit) == UNIT_SUL
        (status,) = [e for e in group.get_qualitative_evaluations() if key(e.name) == ("LESIONSTATUS", PRIVATE)]
        expected = {"matched": "PRESENTBEFORE", "new": "NEWLESION"}[row.status.value]
        assert key(status.value) == (expected, PRIVATE)
        if row.status is MatchStatus.MATCHED:
            assert values[("SULPEAKPCT", PRIVATE), None].value == pytest.approx(row.peak_change_percent)
            assert key(values[("SULPEAKPCT", PRIVATE), None].unit) == ("%", "UCUM")
            assert values[("MTVPCT", PRIVATE), None].value == pytest.approx(row.mtv_change_percent)


def _groups_by_identifier(sr) -> dict[str, list[pydicom.Dataset]]:
    """Every measurement group container (item of the Imaging Measurements container) by tracking identifier."""
    (measurements,) = [item for item in sr.ContentSequence
                       if item.ConceptNameCodeSequence[0].CodeValue == "126010"]  # Imaging Measurements
    found: dict[str, list] = {}
    for group in measurements.ContentSequence:
        identifier = [i.TextValue for i in group.ContentSequence
                      if i.ConceptNameCodeSequence[0].CodeValue == "112039"]  # Tracking Identifier
        found.setdefault(identifier[0], []).append(group)
    return found


def _items(group, code_value):
    return [i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code_value]


def test_prior_lesions_share_the_tracking_uid_and_carry_the_prior_time_point(report, case):
    comparison, _, _ = case
    sr, _ = report
    groups = _groups_by_identifier(sr)
    for row in comparison.lesions:
        if row.status is MatchStatus.MATCHED:
            current, prior = groups[f"lesion {row.pair.current}"]
            uids = [_items(g, "112040")[0].UID for g in (current, prior)]  # Tracking Unique Identifier
            assert uids[0] == uids[1]
            time_point = [i.TextValue for i in _items(prior, "C2348792")]
            assert time_point == ["prior study 2024-03-15"]
            peak = [i for i in _items(prior, "126405")
                    if i.ContentSequence[0].ConceptCodeSequence[0].CodeValue == "126031"]
            assert float(peak[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(row.prior.peak, rel=1e-6)
        elif row.status is MatchStatus.RESOLVED:
            (prior,) = groups[f"prior lesion {row.prior.number}"]
            (status,) = [i for i in prior.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "LESIONSTATUS"]
            assert status.ConceptCodeSequence[0].CodeValue == "RESOLVEDLESION"


def test_response_group(report, case):
    comparison, _, _ = case
    sr, _ = report
    (group,) = _groups_by_identifier(sr)["response"]
    (response,) = _items(group, "112048")  # Current Response
    code = response.ConceptCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "PMD", PRIVATE, "Progressive metabolic disease")
    (method,) = _items(group, "112021")
    assert method.ConceptCodeSequence[0].CodeValue == "PERCIST1.0"
    (uid,) = _items(group, "121018")
    assert uid.UID == comparison.prior.study_uid
    (date,) = _items(group, "111060")
    assert date.Date == comparison.prior.study_date == "20240315"
    (comment,) = _items(group, "121106")
    assert "new FDG-avid lesion" in comment.TextValue
    (new,) = _items(group, "NEWLESIONS")
    assert float(new.MeasuredValueSequence[0].NumericValue) == 1


def test_liver_reference_groups(report, case):
    comparison, _, _ = case
    sr, _ = report
    groups = _groups_by_identifier(sr)
    for when, study in (("current", comparison.current), ("prior", comparison.prior)):
        (group,) = groups[f"liver reference ({when})"]
        (site,) = _items(group, "363698007")  # Finding Site
        assert site.ConceptCodeSequence[0].CodeValue == "10200004"  # Liver
        values = {i.ContentSequence[0].ConceptCodeSequence[0].CodeValue: float(i.MeasuredValueSequence[0].NumericValue)
                  for i in _items(group, "126405")}
        assert values["373098007"] == pytest.approx(study.liver.mean, rel=1e-6)
        assert values["386136009"] == pytest.approx(study.liver.sd, rel=1e-6)


def test_without_comparison_nothing_changes(case, written):
    """The SR without a comparison has no private codes and no time point context."""
    pet = load_series(written.followup.pt_files)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(written.followup.truth_labels))) > 0
    measures, lesion_labels = measure_lesions(labels, pet_suv_volume(pet), pet.spacing)
    seg = build_seg(labels.astype(np.uint8), pet.datasets, folds=[0], series_number=901, series_description="l",
                    **MODEL)
    sr = build_sr(measures, lesion_labels, seg, pet.datasets, series_number=902, series_description="m", **MODEL)
    assert all(item.CodingSchemeDesignator != PRIVATE for item in sr.get("CodingSchemeIdentificationSequence", []))
    assert "C2348792" not in str(sr)


# --- the side-by-side secondary capture and preview ----------------------------------------------


@pytest.fixture(scope="module")
def side_by_side(case, written, tmp_path_factory):
    from dicomnode.results.preview import PriorView
    from dicomnode.results.sc import build_sc

    comparison, measures, _ = case
    pet = load_series(written.followup.pt_files)
    before = load_series(written.baseline.pt_files)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(written.followup.truth_labels))) > 0
    labels_before = sitk.GetArrayFromImage(sitk.ReadImage(str(written.baseline.truth_labels))) > 0
    suv = pet_suv_volume(pet)
    _, numbered = measure_lesions(labels, suv, pet.spacing)
    prior = PriorView(pet_suv_volume(before), labels_before.astype(np.uint8), before.spacing,
                      str(before.datasets[0].StudyDate))
    sc = build_sc(suv, numbered, measures, pet.datasets, pet.spacing, series_number=904, series_description="MIP",
                  prior=prior, comparison=comparison, **MODEL)
    path = tmp_path_factory.mktemp("sc") / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    plain = build_sc(suv, numbered, measures, pet.datasets, pet.spacing, series_number=904,
                     series_description="MIP", **MODEL)
    return path, plain


@pytest.mark.e2e  # dciodvfy is a subprocess
def test_side_by_side_capture_passes_dciodvfy(side_by_side):
    assert dciodvfy_errors(side_by_side[0]) == []


def test_side_by_side_capture_shows_both_studies_and_every_course(side_by_side):
    from dicomnode.imaging.lesion_match import MatchStatus as S
    from dicomnode.results.preview import STATUS_COLOURS

    path, plain = side_by_side
    image = pydicom.dcmread(path).pixel_array
    assert image.shape[1] > 2 * plain.pixel_array.shape[1] * 0.9  # two panels wide
    half = image.shape[1] // 2
    colours = dict(STATUS_COLOURS)

    def has(part, colour):
        return bool(np.all(part == np.asarray(colour, np.uint8), axis=-1).any())

    left, right = image[:, :half], image[:, half:]
    assert has(left, colours[S.MATCHED]) and has(right, colours[S.MATCHED])
    assert has(right, colours[S.NEW]) and not has(left, colours[S.NEW])  # the new lesion: now only
    assert has(left, colours[S.RESOLVED]) and not has(right, colours[S.RESOLVED])  # the resolved one: before only


def test_preview_png_side_by_side(case, written, tmp_path):
    from PIL import Image

    from dicomnode.results.preview import PriorView, mip_png

    comparison, _, _ = case
    pet, before = load_series(written.followup.pt_files), load_series(written.baseline.pt_files)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(written.followup.truth_labels)))
    single = mip_png(pet_suv_volume(pet), labels, pet.spacing, tmp_path / "one.png")
    both = mip_png(pet_suv_volume(pet), labels, pet.spacing, tmp_path / "two.png",
                   prior=PriorView(pet_suv_volume(before), None, before.spacing, "20240315"), comparison=comparison,
                   current_date="20240607")
    assert Image.open(both).size[0] > 2 * Image.open(single).size[0] * 0.9
