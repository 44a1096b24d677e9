"""The review gate on real parts: Orthanc sends two studies to a running node whose model has
review = true; the node builds the results and sends nothing (the studies in Orthanc hold only
their images), also across a restart of the node; `dicomnode review release` makes the running
node deliver the SEG and a VERIFIED SR (the reader as Verifying Observer), `review reject` makes it
deliver only the "not performed" status SR with the reason and the reader. The released SR and
the status SR, as Orthanc stores them, pass dciodvfy (its output is printed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.synth.petct import write_study
from dicomnode.testing.node import RunningNode, start_node
from dicomnode.testing.orthanc import LocalOrthanc, orthanc_binary
from dicomnode.testing.ports import free_port

from tests.support.dicomtools import dciodvfy_errors
from tests.support.e2e import REPO, write_node_config

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(orthanc_binary() is None, reason="Debian package orthanc not installed"),
    pytest.mark.skipif(not (REPO / "models" / "demo-petct" / "plans.json").exists(), reason="demo model not built"),
]
READER = "Curie^Marie"
REVIEW_MODEL = f"""
[[models]]
name = "demo-petct"
path = "{REPO / 'models' / 'demo-petct'}"
folds = [0]
use_mirroring = false
version = "demo-1"
review = true
"""
NODE = 'organization = "St Elsewhere Hospital"\nresult_disclaimer = "Not for diagnostic use without review"\n'


def _cli(node: RunningNode, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicomnode", *args, "--config", str(node.config_path)],
                          capture_output=True, text=True, timeout=60)


def _awaiting(node: RunningNode, studies: set[str], timeout: float = 300) -> dict[str, int]:
    """Study UID -> job id, once every one of `studies` has a job awaiting review."""
    deadline = time.monotonic() + timeout
    while True:
        rows = json.loads(node.cli("review", "list", "--json").stdout)
        held = {r["study"]: r["id"] for r in rows if r["study"] in studies}
        if set(held) == studies:
            return held
        if time.monotonic() > deadline:
            jobs = node.cli("jobs", "list", "--wide").stdout
            raise TimeoutError(f"not held for review within {timeout} s: {studies - set(held)}\n{jobs}")
        time.sleep(0.5)


def _modalities(pacs: LocalOrthanc, study_uid: str) -> list[str]:
    return sorted(s["MainDicomTags"]["Modality"] for s in pacs.series_of_study(study_uid))


def _dciodvfy(path: Path) -> str:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    return (result.stdout + result.stderr).strip()


def test_held_results_reach_orthanc_only_when_released(tmp_path: Path):
    node_port = free_port()
    pacs = LocalOrthanc(tmp_path / "orthanc", modalities={"dicomnode": ("DICOMNODE", "127.0.0.1", node_port)})
    pacs.start()
    config = write_node_config(tmp_path, pacs, node_port, models=REVIEW_MODEL, node=NODE)
    node = start_node(config, node_port, tmp_path / "node.log")
    try:
        released_study, rejected_study = (write_study(tmp_path / f"study-{seed}", seed=seed) for seed in (7, 8))
        for study in (released_study, rejected_study):
            pacs.upload(sorted(study.ct_dir.glob("*.dcm")) + sorted(study.pt_dir.glob("*.dcm")))
            pacs.store_to_modality("dicomnode", [pacs.find_study(study.study_instance_uid)])
        uids = {released_study.study_instance_uid, rejected_study.study_instance_uid}
        held = _awaiting(node, uids)

        # held across a restart: the state is in the database
        assert node.stop() == 0
        node = start_node(config, node_port, tmp_path / "node.log")
        assert _awaiting(node, uids, timeout=30) == held
        for uid in uids:  # nothing sent: the studies hold their images only
            assert _modalities(pacs, uid) == ["CT", "PT"]
        refused = _cli(node, "review", "release", "999", "--by", READER)
        assert refused.returncode == 1 and "no job 999" in refused.stdout

        # release: the running node delivers the SEG and the VERIFIED SR, the UIDs as built
        job_id = held[released_study.study_instance_uid]
        shown = json.loads(node.cli("review", "show", str(job_id), "--json").stdout)
        built = {f["kind"]: f["sop_instance_uid"] for f in shown["files"]}
        assert shown["preview"] and Path(shown["preview"]).exists()
        node.cli("review", "release", str(job_id), "--by", READER)
        sr_series = pacs.wait_for_series(released_study.study_instance_uid, "SR", timeout=120)
        seg_series = pacs.wait_for_series(released_study.study_instance_uid, "SEG", timeout=30)
        [sr_instance], [seg_instance] = sr_series["Instances"], seg_series["Instances"]
        sr_path = pacs.download_instance(sr_instance, tmp_path / "released-sr.dcm")
        sr = dcmread(sr_path)
        assert {"SR": str(sr.SOPInstanceUID), "SEG": pacs.instance_tags(seg_instance)["SOPInstanceUID"]} == built
        assert (sr.VerificationFlag, sr.CompletionFlag, sr.PreliminaryFlag) == ("VERIFIED", "COMPLETE", "FINAL")
        (observer,) = sr.VerifyingObserverSequence
        assert str(observer.VerifyingObserverName) == READER
        assert observer.VerifyingOrganization == "St Elsewhere Hospital"
        print(f"dciodvfy of the released SR:\n{_dciodvfy(sr_path)}")
        assert dciodvfy_errors(sr_path) == []

        # reject: only the status SR, with the reason and the reader; no SEG, no measurement SR
        job_id = held[rejected_study.study_instance_uid]
        node.cli("review", "reject", str(job_id), "--by", READER, "--reason", "uptake in the bladder, not a lesion")
        status_series = pacs.wait_for_series(rejected_study.study_instance_uid, "SR", timeout=60)
        assert status_series["MainDicomTags"]["SeriesDescription"] == "demo-petct not performed (run 1)"
        [status_instance] = status_series["Instances"]
        status_path = pacs.download_instance(status_instance, tmp_path / "rejected-status-sr.dcm")
        texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.get("TextValue")
                 for item in dcmread(status_path).ContentSequence}
        assert texts["Reason not performed"] == (
            f"results rejected at review by {READER}: uptake in the bladder, not a lesion")
        print(f"dciodvfy of the rejected study's status SR:\n{_dciodvfy(status_path)}")
        assert dciodvfy_errors(status_path) == []
        assert _modalities(pacs, rejected_study.study_instance_uid) == ["CT", "PT", "SR"]

        again = _cli(node, "review", "release", str(job_id), "--by", READER)
        assert again.returncode == 1 and "rejected by" in again.stdout
        timeline = json.loads(node.cli("jobs", "show", str(job_id), "--json").stdout)["timeline"]
        kinds = [event["event"] for event in timeline]
        assert kinds.index("held-for-review") < kinds.index("review-rejected") < kinds.index("status-written")
        timeline = json.loads(node.cli("jobs", "show", str(held[released_study.study_instance_uid]),
                                       "--json").stdout)["timeline"]
        kinds = [event["event"] for event in timeline]
        assert kinds.index("held-for-review") < kinds.index("review-released") < kinds.index("delivered")
        assert kinds[-1] == "succeeded"
    finally:
        code = node.stop()
        print((tmp_path / "node.log").read_text()[-3000:])
        pacs.stop()
    assert code == 0
