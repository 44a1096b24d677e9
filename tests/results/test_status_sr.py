"""The "not performed" status SR: its codes and words, dciodvfy-clean, read back by pydicom and highdicom."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread

from dicomnode.results.common import ResultError, write_dicom
from dicomnode.results.status_sr import build_status_sr

from tests.support.dicomtools import dciodvfy_errors

REASON = "PatientWeight: missing or empty in PET series 1.2.3 (needed for SUVbw)"


def _items(ds) -> dict[tuple[str, str], object]:
    out = {}
    for item in ds.ContentSequence:
        name = item.ConceptNameCodeSequence[0]
        value = {"TEXT": lambda i: i.TextValue, "DATETIME": lambda i: i.DateTime,
                 "CODE": lambda i: (i.ConceptCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodingSchemeDesignator)
                 }.get(item.ValueType, lambda i: None)(item)
        out[(name.CodeValue, name.CodingSchemeDesignator)] = value
    return out


def _written(tmp_path: Path, synth_study):
    evidence = [dcmread(synth_study.pt_files[0], stop_before_pixels=True),
                dcmread(synth_study.ct_files[0], stop_before_pixels=True)]
    when = datetime(2024, 3, 15, 10, 30, tzinfo=timezone.utc)
    sr = build_status_sr(evidence, model_name="demo-petct", model_version="2.1", run=2, reason=REASON, when=when,
                         series_number=915, series_description="demo-petct not performed (run 2)")
    return evidence, sr, write_dicom(sr, tmp_path / "status.dcm")


@pytest.mark.e2e  # dciodvfy is a subprocess
def test_status_sr_passes_dciodvfy(tmp_path: Path, synth_study):
    _, _, path = _written(tmp_path, synth_study)
    assert dciodvfy_errors(path) == []


def test_status_sr_says_which_model_did_not_run_and_why(tmp_path: Path, synth_study):
    evidence, sr, path = _written(tmp_path, synth_study)

    ds = dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert ds.Modality == "SR" and ds.SeriesNumber == 915
    assert ds.SeriesDescription == "demo-petct not performed (run 2)"
    assert ds.StudyInstanceUID == synth_study.study_instance_uid and ds.PatientID == evidence[0].PatientID
    assert ds.SeriesInstanceUID not in {e.SeriesInstanceUID for e in evidence}
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "NOTPERFORMED", "99DCMNODE", "AI processing not performed")
    assert [s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence].count("99DCMNODE") == 1
    assert ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "UNVERIFIED"
    items = _items(ds)
    assert items[("111017", "DCM")] == ("111245", "DCM")  # No algorithms succeeded; without findings
    assert items[("111001", "DCM")] == "demo-petct" and items[("111003", "DCM")] == "2.1"
    assert items[("REASON", "99DCMNODE")] == REASON
    comment = items[("121106", "DCM")]
    assert "demo-petct" in comment and "not performed" in comment and "(run 2)" in comment and REASON in comment
    assert items[("111702", "DCM")].startswith("20240315103000")
    assert not [i for i in ds.ContentSequence if i.ValueType == "NUM"]  # no measurements
    observer = [i for i in ds.ContentSequence if i.RelationshipType == "HAS OBS CONTEXT"]
    assert observer[0].ConceptNameCodeSequence[0].CodeValue == "121005"  # Observer Type
    assert observer[0].ConceptCodeSequence[0].CodeValue == "121007"  # Device
    assert "demo-petct 2.1" in [i.get("TextValue") for i in observer]  # the device's model name
    assert {e.ReferencedSeriesSequence[0].SeriesInstanceUID for e in ds.CurrentRequestedProcedureEvidenceSequence} <= {
        e.SeriesInstanceUID for e in evidence}

    read = hd.sr.srread(path)
    assert read.SOPInstanceUID == sr.SOPInstanceUID
    texts = [i.value for i in read.content[0].ContentSequence if i.value_type == hd.sr.ValueTypeValues.TEXT]
    assert REASON in texts


def test_given_uids_are_kept_and_a_foreign_study_is_refused(synth_study):
    evidence = [dcmread(synth_study.pt_files[0], stop_before_pixels=True)]
    sr = build_status_sr(evidence, model_name="m", model_version="1", run=1, reason="r",
                         when=datetime.now(timezone.utc), series_number=905, series_description="m not performed",
                         sop_instance_uid="1.2.3.4", series_instance_uid="1.2.3.5")
    assert (sr.SOPInstanceUID, sr.SeriesInstanceUID) == ("1.2.3.4", "1.2.3.5")
    other = dcmread(synth_study.pt_files[0], stop_before_pixels=True)
    other.StudyInstanceUID = "1.2.3.9"
    with pytest.raises(ResultError, match="2 studies"):
        build_status_sr([evidence[0], other], model_name="m", model_version="1", run=1, reason="r",
                        when=datetime.now(timezone.utc), series_number=905, series_description="x")
    with pytest.raises(ResultError, match="at least one instance"):
        build_status_sr([], model_name="m", model_version="1", run=1, reason="r",
                        when=datetime.now(timezone.utc), series_number=905, series_description="x")
