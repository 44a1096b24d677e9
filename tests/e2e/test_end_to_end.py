"""End to end on real parts: Orthanc sends a synthetic PET/CT study to a running node (and
dcmtk storescu sends a second one); the node runs the real 5-fold nnU-Net ensemble and
C-STOREs a SEG back into the same study in Orthanc."""

import json
import os
import shutil
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import dcmread
from pydicom.uid import generate_uid
from scipy import ndimage
from sqlalchemy import func, select

from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.index import ReceivedInstance, record_instance
from dicomnode.store.spool import Spool
from dicomnode.store.tables import Event
from dicomnode.synth.petct import write_study
from dicomnode.synth.petct_phantom import PET_GRID, pet_suv
from dicomnode.testing.node import dice, seg_on_source_grid
from dicomnode.testing.orthanc import LocalOrthanc, orthanc_binary

from tests.support.dicomtools import dciodvfy_errors
from tests.support.e2e import REPO, running_site
from tests.support.malformed import CASES, send_raw, valid_pet, write_case

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(orthanc_binary() is None, reason="Debian package orthanc not installed"),
    pytest.mark.skipif(not (REPO / "models" / "demo-petct" / "plans.json").exists(), reason="demo model not built"),
]
SEG_TIMEOUT = 300


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Orthanc and a node that know each other, both on free loopback ports."""
    with running_site(tmp_path_factory.mktemp("site")) as running:
        yield running


def _check_seg(pacs: LocalOrthanc, study, work: Path, timeout: float = SEG_TIMEOUT):
    series = pacs.wait_for_series(study.study_instance_uid, "SEG", timeout=timeout)
    [instance] = series["Instances"]
    seg_path = pacs.download_instance(instance, work / f"seg-{study.phantom.seed}.dcm")
    seg = dcmread(seg_path)
    pet_files = sorted(study.pt_dir.glob("*.dcm"))
    assert seg.StudyInstanceUID == study.study_instance_uid
    assert seg.SeriesInstanceUID not in (study.ct_series_instance_uid, study.pt_series_instance_uid)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.pt_series_instance_uid
    assert seg.FrameOfReferenceUID == dcmread(pet_files[0]).FrameOfReferenceUID
    assert dciodvfy_errors(seg_path) == []
    mask = seg_on_source_grid(seg_path, pet_files)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(study.truth_labels)))
    score = dice(mask, truth > 0)
    found = sum(bool(mask[truth == k].any()) for k in range(1, int(truth.max()) + 1))
    print(f"seed {study.phantom.seed}: Dice {score:.3f}, lesions found {found}/{int(truth.max())}")
    assert score > 0.5

    [sr_instance] = pacs.wait_for_series(study.study_instance_uid, "SR", timeout=30)["Instances"]
    sr_path = pacs.download_instance(sr_instance, work / f"sr-{study.phantom.seed}.dcm")
    assert dciodvfy_errors(sr_path) == []
    sr = hd.sr.srread(sr_path)
    assert sr.StudyInstanceUID == study.study_instance_uid
    evidence = {
        item.ReferencedSOPInstanceUID
        for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence
    lesion_groups = hd.sr.MeasurementReport.from_sequence(sr.content).get_volumetric_roi_measurement_groups()
    components, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 2))  # 18-connectivity
    assert len(lesion_groups) == count
    _check_suv_max(lesion_groups, components, count, study)
    return seg


def _check_suv_max(lesion_groups, components: np.ndarray, count: int, study) -> None:
    """The SR's SUVmax of each lesion is the maximum of the generator's true SUV inside that lesion of
    the SEG. The node computes SUV from the stored PET (integers and a slope per slice), so within 1%.
    Lesions are matched by SUVmax order: the SR numbers them by SUVmax, and sorting both sides keeps
    two lesions of nearly equal SUVmax comparable whichever way round they come."""
    true_suv = pet_suv(study.phantom, PET_GRID)  # on the PET grid, slices by increasing z, as the mask
    assert components.shape == true_suv.shape
    truth_max = sorted((float(true_suv[components == k].max()) for k in range(1, count + 1)), reverse=True)
    reported = []
    for group in lesion_groups:
        [suv_max] = [
            m.value
            for m in group.get_measurements()
            if (m.name.value, m.name.scheme_designator) == ("126401", "DCM")
            and m.derivation is not None
            and (m.derivation.value, m.derivation.scheme_designator) == ("56851009", "SCT")
        ]
        reported.append(float(suv_max))
    assert reported == sorted(reported, reverse=True)  # lesion 1 is the hottest
    print(
        f"seed {study.phantom.seed}: SUVmax per lesion, SR {[round(v, 2) for v in reported]}, truth "
        f"{[round(v, 2) for v in truth_max]}"
    )
    assert np.allclose(reported, truth_max, rtol=0.01), (reported, truth_max)


def test_orthanc_sends_study_and_gets_seg_back(site):
    pacs, node, work = site
    study = write_study(work / "study-orthanc", seed=7)
    pacs.upload(sorted(study.ct_dir.glob("*.dcm")) + sorted(study.pt_dir.glob("*.dcm")))
    orthanc_study = pacs.find_study(study.study_instance_uid)
    started = time.monotonic()
    pacs.store_to_modality("dicomnode", [orthanc_study])  # synchronous: returns after the last C-STORE
    sent = time.monotonic()
    _check_seg(pacs, study, work)
    print(
        f"Orthanc -> node: 128 instances in {sent - started:.1f} s; last instance to SEG in Orthanc: "
        f"{time.monotonic() - sent:.1f} s (2 s study_quiet_seconds and the first model load included)"
    )
    jobs = json.loads(node.cli("jobs", "list", "--json").stdout)
    [job] = [j for j in jobs if j["study"] == study.study_instance_uid]
    assert job["state"] == "succeeded"
    timeline = json.loads(node.cli("jobs", "show", str(job["id"]), "--json").stdout)["timeline"]
    kinds = [event["event"] for event in timeline]
    for kind in (
        "study-received",
        "queued",
        "started",
        "inputs-built",
        "inference-done",
        "results-written",
        "delivered",
        "succeeded",
    ):
        assert kind in kinds, kinds


def test_the_pacs_forwarding_the_study_with_its_results_makes_no_second_run(site):
    """A PACS routes whole studies: after the SEG and SR are in Orthanc, it sends the study back
    to the node, results and all. Every instance is taken (before, the SEG and SR were refused at
    negotiation and Orthanc's store job failed); the CT and PET are no news, the SEG and SR are
    the node's own results; no second job, at any sweep after the study's quiet time."""
    from dicomnode.store.tables import Component, Instance, Job

    pacs, node, work = site
    study = write_study(work / "study-forwarded", seed=17)
    pacs.upload(sorted(study.ct_dir.glob("*.dcm")) + sorted(study.pt_dir.glob("*.dcm")))
    orthanc_study = pacs.find_study(study.study_instance_uid)
    pacs.store_to_modality("dicomnode", [orthanc_study])
    _check_seg(pacs, study, work)
    results = {s["MainDicomTags"]["Modality"]: s for s in pacs.series_of_study(study.study_instance_uid)
               if s["MainDicomTags"]["Modality"] in ("SEG", "SR")}
    assert set(results) == {"SEG", "SR"}
    summary = pacs.store_to_modality("dicomnode", [orthanc_study])  # the whole study, results included
    assert summary["FailedInstancesCount"] == 0 and summary["InstancesCount"] == 130, summary
    sessions = make_sessionmaker(f"sqlite:///{work / 'var' / 'dicomnode.db'}")
    result_uids = {pacs.instance_tags(i)["SOPInstanceUID"] for s in results.values() for i in s["Instances"]}
    deadline = time.monotonic() + 30  # the index rows follow the acknowledgements (the receiver's deferred writer)
    while True:
        with sessions() as session:
            held = {row.sop_instance_uid: row for row in session.scalars(
                select(Instance).where(Instance.study_uid == study.study_instance_uid))}
        if len(held) >= 130 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert result_uids <= set(held) and len(held) == 130
    arrived = max(held[uid].received_at for uid in result_uids)
    deadline, swept_after = time.monotonic() + 60, arrived + timedelta(seconds=2.0 + 2 * 0.5 + 1.0)
    while time.monotonic() < deadline:  # sweeps past the quiet time after the results came back
        with sessions() as session:
            seen = session.scalar(select(func.max(Component.last_seen_at)).where(Component.name == "receiver"))
        if seen is not None and seen > swept_after:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("no sweep after the results came back")
    with sessions() as session:
        jobs = list(session.scalars(select(Job).where(Job.study_uid == study.study_instance_uid)))
    assert [(j.run_number, j.state) for j in jobs] == [(1, "succeeded")]
    assert {held[uid].calling_aet for uid in result_uids} == {pacs.aet}


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed")
def test_storescu_sends_study_straight_to_node(site):
    pacs, node, work = site
    study = write_study(work / "study-storescu", seed=11)
    result = subprocess.run(
        [
            "storescu",
            "-aet",
            "STORESCU",
            "-aec",
            "DICOMNODE",
            "+sd",
            "+r",
            "+sp",
            "*.dcm",
            "127.0.0.1",
            str(node.port),
            str(study.root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert result.returncode == 0, result.stderr
    _check_seg(pacs, study, work)


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed")
def test_malformed_instances_never_stop_a_valid_study(site):
    """The fuzz's cases go to the running node, each answered with its status; an unreadable
    instance that an older version acknowledged lies in the spool and the index; then a valid
    study is sent and gets its SEG, and the poisoned study is held back saying why."""
    pacs, node, work = site
    poisoned = generate_uid()
    files = [write_case(case, work / "fuzz", poisoned) for case in CASES]
    statuses = send_raw(node.port, "DICOMNODE", "STORESCU", [(path, syntax) for path, _, syntax in files])
    assert [s in case.expect for s, case in zip(statuses, CASES)] == [True] * len(CASES), statuses

    [odd] = [case for case in CASES if case.name == "odd-length-us-number-of-slices"]
    for modality in ("CT", "PT"):  # a CT and a PET series, the PET instance unreadable
        ds = valid_pet(poisoned, generate_uid())
        if modality == "CT":
            ds.Modality, ds.SOPClassUID = "CT", "1.2.840.10008.5.1.4.1.1.2"
        data, _ = odd.make(ds)
        path = Spool(work / "var" / "spool").write(poisoned, ds.SeriesInstanceUID, ds.SOPInstanceUID, data)
        record_instance(
            make_sessionmaker(f"sqlite:///{work / 'var' / 'dicomnode.db'}"),
            ReceivedInstance(
                poisoned,
                ds.SeriesInstanceUID,
                ds.SOPInstanceUID,
                ds.SOPClassUID,
                "1.2.840.10008.1.2.1",
                modality,
                None,
                "",
                str(path),
                "OLDNODE",
            ),
        )

    study = write_study(work / "study-after-fuzz", seed=13)
    result = subprocess.run(
        [
            "storescu",
            "-aet",
            "STORESCU",
            "-aec",
            "DICOMNODE",
            "+sd",
            "+r",
            "+sp",
            "*.dcm",
            "127.0.0.1",
            str(node.port),
            str(study.root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert result.returncode == 0, result.stderr
    _check_seg(pacs, study, work)
    sessions = make_sessionmaker(f"sqlite:///{work / 'var' / 'dicomnode.db'}")
    with sessions() as session:
        said = list(
            session.scalars(select(Event.message).where(Event.study_uid == poisoned, Event.kind == "incomplete"))
        )
    assert len(said) == 1 and "unreadable instance" in said[0] and "NumberOfSlices: cannot be read" in said[0], said
