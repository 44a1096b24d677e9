"""IHE AI Results (AIR) content of the SEG and the SR (README "AI Results content"): the algorithm's
identity and parameters in the SEG's algorithm identification, the SR's TID 4019 and a
Contributing Equipment item (Processing Equipment, DCM 109102), the device observer, the site's
disclaimer; and an SR made VERIFIED at review (results/verification.py). Each read back, and
dciodvfy-clean."""

from __future__ import annotations

from datetime import datetime, timezone

import highdicom as hd
import pydicom
import pytest

from dicomnode.imaging.measures import measure_lesions
from dicomnode.imaging.suv import pet_suv_volume
from dicomnode.results.common import Provenance, device_uid, write_dicom
from dicomnode.results.seg import build_seg
from dicomnode.results.sr import build_sr
from dicomnode.results.verification import verify_sr

from tests.support.dicomtools import dciodvfy_errors, dciodvfy_output

MODEL = dict(model_name="demo-petct", model_version="1.2.0")
PARAMETERS = {"mirroring": "off", "tile_step_size": "0.5", "weights": "sha256:0123456789ab"}
DISCLAIMER = "Not for diagnostic use without review by a physician"
PROVENANCE = Provenance(PARAMETERS, "St Elsewhere Hospital", DISCLAIMER, datetime(2026, 12, 1, 12, tzinfo=timezone.utc))
SR_PROVENANCE = Provenance({"folds": "0,1,2,3,4", **PARAMETERS}, PROVENANCE.organization, DISCLAIMER, PROVENANCE.when)


@pytest.fixture(scope="module")
def seg_path(pet, truth, tmp_path_factory):
    seg = build_seg(truth, pet.datasets, folds=[0, 1, 2, 3, 4], series_number=901, series_description="lesions",
                    provenance=PROVENANCE, **MODEL)
    return write_dicom(seg, tmp_path_factory.mktemp("air") / "seg.dcm")


@pytest.fixture(scope="module")
def sr_path(seg_path, pet, truth):
    measures, labels = measure_lesions(truth > 0, pet_suv_volume(pet), pet.spacing)
    sr = build_sr(measures, labels, pydicom.dcmread(seg_path), pet.datasets, series_number=902,
                  series_description="measurements", provenance=SR_PROVENANCE, **MODEL)
    return write_dicom(sr, seg_path.with_name("sr.dcm"))


def _contributing(ds):
    (item,) = ds.ContributingEquipmentSequence
    return item


def test_seg_names_the_algorithm_its_parameters_and_the_processing_equipment(seg_path):
    seg = pydicom.dcmread(seg_path)
    (algorithm,) = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
    assert algorithm.AlgorithmName == "demo-petct" and algorithm.AlgorithmVersion == "1.2.0"
    assert (algorithm.AlgorithmFamilyCodeSequence[0].CodeValue,
            algorithm.AlgorithmFamilyCodeSequence[0].CodingSchemeDesignator) == ("123110", "DCM")  # AI, CID 7162
    parameters = str(algorithm.AlgorithmParameters)
    for text in ("folds=0,1,2,3,4", "mirroring=off", "tile_step_size=0.5", "weights=sha256:0123456789ab"):
        assert text in parameters
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    item = _contributing(seg)
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "109102", "DCM", "Processing Equipment")
    assert item.Manufacturer == "dicomnode" and item.ManufacturerModelName == "demo-petct"
    assert item.SoftwareVersions[0] == "1.2.0" and str(item.SoftwareVersions[1]).startswith("dicomnode ")
    assert item.InstitutionName == "St Elsewhere Hospital"
    assert "DeviceUID" not in item  # dciodvfy does not know it there (README): the SR's observer UID
    assert item.ContributionDateTime == "20261201120000.000000+0000"
    assert "weights sha256:0123456789ab" in item.ContributionDescription
    assert "folds 0,1,2,3,4" in item.ContributionDescription
    assert seg.ImageComments == DISCLAIMER


def test_sr_device_observer_algorithm_and_disclaimer(sr_path):
    sr = hd.sr.srread(sr_path)
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    device = report.get_observer_contexts(observer_type=pydicom.sr.codedict.codes.DCM.Device)
    assert device, "no device observer context"
    observer_uid = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121012"]
    assert observer_uid and observer_uid[0].UID == device_uid("dicomnode", "demo-petct", "1.2.0")
    group = report.get_volumetric_roi_measurement_groups()[0]
    tid4019: dict[str, list[str]] = {}  # TEXT items under the lesion group: code value -> values

    def walk(items):
        for item in items:
            if item.ValueType == "TEXT":
                tid4019.setdefault(item.ConceptNameCodeSequence[0].CodeValue, []).append(item.TextValue)
            walk(item.get("ContentSequence", []))

    walk(group[0].ContentSequence)
    assert tid4019["111001"] == ["demo-petct"] and tid4019["111003"] == ["1.2.0"]
    assert {"folds 0,1,2,3,4", "mirroring off", "tile_step_size 0.5", "weights sha256:0123456789ab"} <= set(
        tid4019["111002"])
    comments = [i.TextValue for i in sr.ContentSequence if i.ValueType == "TEXT"
                and i.ConceptNameCodeSequence[0].CodeValue == "121106"]
    assert comments == [DISCLAIMER]
    item = _contributing(sr)
    assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert item.ManufacturerModelName == "demo-petct" and item.SoftwareVersions[0] == "1.2.0"
    assert sr.VerificationFlag == "UNVERIFIED" and sr.PreliminaryFlag == "PRELIMINARY"


def test_without_provenance_nothing_site_specific(pet, truth, tmp_path):
    seg = build_seg(truth, pet.datasets, folds=[0], series_number=901, series_description="lesions", **MODEL)
    assert "ImageComments" not in seg
    assert "InstitutionName" not in _contributing(seg)
    assert _contributing(seg).PurposeOfReferenceCodeSequence[0].CodeValue == "109102"


def test_verified_sr_keeps_its_uid_and_content(sr_path, tmp_path):
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_path.read_bytes())
    before = pydicom.dcmread(path)
    when = datetime(2026, 12, 1, 19, 30, 5, tzinfo=timezone.utc)
    assert verify_sr(path, "Curie^Marie", "St Elsewhere Hospital", when)
    assert not verify_sr(path, "Someone^Else", "", when)  # once: the second call changes nothing
    after = pydicom.dcmread(path)
    assert after.SOPInstanceUID == before.SOPInstanceUID and after.SeriesInstanceUID == before.SeriesInstanceUID
    assert after.ContentSequence == before.ContentSequence
    assert (after.VerificationFlag, after.CompletionFlag, after.PreliminaryFlag) == ("VERIFIED", "COMPLETE", "FINAL")
    (observer,) = after.VerifyingObserverSequence
    assert str(observer.VerifyingObserverName) == "Curie^Marie"
    assert observer.VerifyingOrganization == "St Elsewhere Hospital"
    assert observer.VerificationDateTime == "20261201193005.000000+0000"
    assert observer.VerifyingObserverIdentificationCodeSequence == []


@pytest.mark.e2e
def test_air_objects_pass_dciodvfy(seg_path, sr_path, tmp_path):
    verified = tmp_path / "verified.dcm"
    verified.write_bytes(sr_path.read_bytes())
    verify_sr(verified, "Curie^Marie", "", datetime.now(timezone.utc))
    for path in (seg_path, sr_path, verified):
        assert dciodvfy_errors(path) == [], path
        assert "Standard Extended" not in dciodvfy_output(path), path  # nothing outside the standard IOD
    assert pydicom.dcmread(verified).VerifyingObserverSequence[0].VerifyingOrganization == "unspecified"
