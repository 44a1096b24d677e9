"""[models.compare] in a running node beside Orthanc: (a) the baseline is sent, then the follow-up:
the follow-up's SR in Orthanc holds the comparison with the baseline (its Study Instance UID, the
category); (b) the node never saw the baseline: it is in Orthanc only, the follow-up is sent, the
node finds the baseline by C-FIND, fetches it by C-MOVE, processes it compute-only (nothing is
written into the baseline study) and the follow-up's SR holds the comparison. No liver model: the
category is "not assessable", coded so in the SR."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicomnode.imaging.percist import Category
from dicomnode.results.sr import RESPONSE_CODES
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Job
from dicomnode.testing.node import start_node
from dicomnode.testing.orthanc import LocalOrthanc, orthanc_binary
from dicomnode.testing.ports import free_port

from tests.support.dicomtools import dciodvfy_errors
from tests.support.e2e import DEMO_MODEL, REPO, write_node_config
from tests.support.fetching import sources_toml
from tests.support.timeline import patient_timeline, timeline_files

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(orthanc_binary() is None, reason="Debian package orthanc not installed"),
    pytest.mark.skipif(not (REPO / "models" / "demo-petct" / "plans.json").exists(), reason="demo model not built"),
]

COMPARE = """
[models.compare]
max_age_days = 365
modalities = ["PT", "CT"]
"""


def _modalities(pacs: LocalOrthanc, study_uid: str) -> list[str]:
    return sorted(s["MainDicomTags"]["Modality"] for s in pacs.series_of_study(study_uid))


def _items(ds, concept: str) -> list:  # noqa: ANN001 - an SR data set
    """The content items of the SR's tree named by the DCM code `concept` (ConceptNameCodeSequence)."""
    found = []
    for item in ds.get("ContentSequence", []):
        names = item.get("ConceptNameCodeSequence", [])
        if names and names[0].CodeValue == concept:
            found.append(item)
        found += _items(item, concept)
    return found


def _follow_up_sr(pacs: LocalOrthanc, node, study_uid: str, folder: Path) -> tuple:  # noqa: ANN001
    """The follow-up's SR from Orthanc, and the job's timeline and comparison lines from `jobs show`."""
    sr_series = pacs.wait_for_series(study_uid, "SR", timeout=1200)
    sr = dcmread(pacs.download_instance(sr_series["Instances"][0], folder / "sr.dcm"))
    jobs = json.loads(node.cli("jobs", "list", "--json").stdout)
    [job] = [j for j in jobs if j["study"] == study_uid and j["model"] == "demo-petct"]
    shown = json.loads(node.cli("jobs", "show", str(job["id"]), "--json").stdout)
    text = node.cli("jobs", "show", str(job["id"])).stdout
    return sr, shown, text


def _check_comparison(sr, shown: dict, text: str, baseline_uid: str, folder: Path) -> Category:  # noqa: ANN001
    """The timeline, `jobs show`'s lines and the SR agree: the prior is the baseline, the lesions are
    matched as the "mixed" timeline changed them, and the SR codes the comparison's category (returned)."""
    kinds = [e["event"] for e in shown["timeline"]]
    assert "compare-prior" in kinds and "compared" in kinds, kinds
    assert kinds.index("compare-prior") < kinds.index("inference-done") < kinds.index("compared")
    lines = shown["comparison"]
    assert lines and lines[0].startswith(f"compared with prior study {baseline_uid}")
    assert all(line.strip() in text for line in lines[:2]), text
    assert {item.UID for item in _items(sr, "121018")} == {baseline_uid}  # Procedure Study Instance UID
    compared = [e for e in shown["timeline"] if e["event"] == "compared"]
    category = next(c for c in Category if lines[1].startswith(f"PERCIST 1.0: {c.value} - "))
    [response] = _items(sr, "112048")  # Current Response
    coded = response.ConceptCodeSequence[0]
    assert (coded.CodeValue, coded.CodeMeaning) == (RESPONSE_CODES[category].value,
                                                   RESPONSE_CODES[category].meaning), lines
    table = [line.split()[2] for line in lines if line.split()[2:3] in (["matched"], ["new"], ["resolved"])]
    assert sorted(table) == ["matched", "matched", "new", "resolved"], lines  # shrinking + unchanged, new, gone
    assert len(compared) == 1 and dciodvfy_errors(folder / "sr.dcm") == []
    return category


def test_the_follow_up_sent_after_the_baseline_is_compared_with_it(tmp_path):
    """The baseline the node processed is the prior ("already processed"). No liver model here (the
    chain, with organs-ct, is tested in tests/pipeline/test_followup.py; here it would double the
    inferences): the category is "not assessable", coded so in the SR."""
    baseline, follow_up, _ = patient_timeline(tmp_path / "studies", patient_id="COMPARE-A")
    port = free_port()
    with LocalOrthanc(tmp_path / "orthanc", modalities={"dicomnode": ("DICOMNODE", "127.0.0.1", port)}) as pacs:
        pacs.upload(timeline_files(baseline) + timeline_files(follow_up))
        config = write_node_config(tmp_path, pacs, port, quiet_seconds=5, models=DEMO_MODEL + COMPARE)
        node = start_node(config, port, tmp_path / "node.log")
        try:
            pacs.store_to_modality("dicomnode", [pacs.find_study(baseline.study_instance_uid)])
            pacs.wait_for_series(baseline.study_instance_uid, "SR", timeout=1200)
            pacs.store_to_modality("dicomnode", [pacs.find_study(follow_up.study_instance_uid)])
            sr, shown, text = _follow_up_sr(pacs, node, follow_up.study_instance_uid, tmp_path)
        finally:
            code = node.stop()
            print((tmp_path / "node.log").read_text()[-3000:])
        assert code == 0
    assert _check_comparison(sr, shown, text, baseline.study_instance_uid, tmp_path) == Category.NOT_ASSESSABLE
    [chosen] = [e for e in shown["timeline"] if e["event"] == "compare-prior"]
    assert baseline.study_instance_uid in chosen["message"] and "already processed" in chosen["message"]


def test_a_prior_the_node_never_saw_is_fetched_by_c_move_and_processed_first(tmp_path):
    baseline, follow_up, _ = patient_timeline(tmp_path / "studies", patient_id="COMPARE-B")
    port = free_port()
    with LocalOrthanc(tmp_path / "orthanc", modalities={"dicomnode": ("DICOMNODE", "127.0.0.1", port)}) as pacs:
        pacs.upload(timeline_files(baseline) + timeline_files(follow_up))
        config = write_node_config(tmp_path, pacs, port,
                                   models=DEMO_MODEL + COMPARE + 'source = "pacs"\n' + sources_toml(pacs))
        node = start_node(config, port, tmp_path / "node.log")
        try:
            pacs.store_to_modality("dicomnode", [pacs.find_study(follow_up.study_instance_uid)])
            sr, shown, text = _follow_up_sr(pacs, node, follow_up.study_instance_uid, tmp_path)
            baseline_series = _modalities(pacs, baseline.study_instance_uid)
        finally:
            code = node.stop()
            print((tmp_path / "node.log").read_text()[-3000:])
        assert code == 0
    assert baseline_series == ["CT", "PT"]  # nothing delivered into the baseline study
    # no liver model here: PERCIST has no liver reference, the comparison says so and goes on
    assert _check_comparison(sr, shown, text, baseline.study_instance_uid, tmp_path) == Category.NOT_ASSESSABLE
    assert "no liver mask" in shown["comparison"][1]
    [chosen] = [e for e in shown["timeline"] if e["event"] == "compare-prior"]
    assert "fetched, processed first" in chosen["message"] and "C-MOVE" in chosen["message"], chosen
    kinds = [e["event"] for e in shown["timeline"]]
    assert "waiting" in kinds  # it waited for the prior's job (woken early, or after its backoff)
    sessions = make_sessionmaker(f"sqlite:///{tmp_path / 'var' / 'dicomnode.db'}")
    with sessions() as session:
        [prior_job] = session.scalars(select(Job).where(Job.study_uid == baseline.study_instance_uid))
        [ours] = session.scalars(select(Job).where(Job.study_uid == follow_up.study_instance_uid))
    assert (prior_job.state, prior_job.prior_of_job) == ("succeeded", ours.id)
    out = tmp_path / "var" / "results" / baseline.study_instance_uid / f"job-{prior_job.id}"
    assert sorted(p.name for p in out.iterdir()) == ["labels.npz", "measures.json", "timepoint.npz"]
