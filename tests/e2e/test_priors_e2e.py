"""[models.priors] in a running node: Orthanc sends the patient's follow-up PET/CT; before the
model runs, the worker finds the earlier PET/CT on Orthanc by C-FIND and fetches it by C-MOVE
into the node's own receiver; the job's timeline names the prior, every instance of the prior
is held, the prior gets no job of its own, and the follow-up's SEG arrives as usual."""

from __future__ import annotations

import json

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Instance, Job
from dicomnode.testing.node import start_node
from dicomnode.testing.orthanc import LocalOrthanc, orthanc_binary
from dicomnode.testing.ports import free_port

from tests.support.e2e import DEMO_MODEL, REPO, write_node_config
from tests.support.fetching import sources_toml, stamped_study, study_files

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(orthanc_binary() is None, reason="Debian package orthanc not installed"),
    pytest.mark.skipif(not (REPO / "models" / "demo-petct" / "plans.json").exists(), reason="demo model not built"),
]

PRIORS = """
[models.priors]
source = "pacs"
max_age_days = 365
modalities = ["PT"]
"""


def test_the_prior_is_fetched_by_c_move_before_the_follow_up_runs(tmp_path):
    current = stamped_study(tmp_path / "current", seed=21, patient_id="PRIOR-E2E", study_date="20240601")
    prior = stamped_study(tmp_path / "prior", seed=22, patient_id="PRIOR-E2E", study_date="20240201")
    port = free_port()
    with LocalOrthanc(tmp_path / "orthanc", modalities={"dicomnode": ("DICOMNODE", "127.0.0.1", port)}) as pacs:
        pacs.upload(study_files(prior) + study_files(current))
        config = write_node_config(tmp_path, pacs, port, models=DEMO_MODEL + PRIORS + sources_toml(pacs))
        node = start_node(config, port, tmp_path / "node.log")
        try:
            pacs.store_to_modality("dicomnode", [pacs.find_study(current.study_instance_uid)])
            pacs.wait_for_series(current.study_instance_uid, "SEG", timeout=300)
            jobs = json.loads(node.cli("jobs", "list", "--json").stdout)
            [job] = [j for j in jobs if j["study"] == current.study_instance_uid]
            timeline = json.loads(node.cli("jobs", "show", str(job["id"]), "--json").stdout)["timeline"]
        finally:
            code = node.stop()
            print((tmp_path / "node.log").read_text()[-3000:])
        assert code == 0
        assert pacs.series_of_study(prior.study_instance_uid) and not [  # nothing written into the prior
            s for s in pacs.series_of_study(prior.study_instance_uid) if s["MainDicomTags"]["Modality"] == "SEG"]
    kinds = [e["event"] for e in timeline]
    assert "prior-used" in kinds and kinds.index("prior-used") < kinds.index("inference-done"), kinds
    [used] = [e for e in timeline if e["event"] == "prior-used"]
    assert prior.study_instance_uid in used["message"] and "C-MOVE" in used["message"], used
    sessions = make_sessionmaker(f"sqlite:///{tmp_path / 'var' / 'dicomnode.db'}")
    with sessions() as session:
        held = set(session.scalars(select(Instance.sop_instance_uid)
                                   .where(Instance.study_uid == prior.study_instance_uid)))
        prior_jobs = list(session.scalars(select(Job).where(Job.study_uid == prior.study_instance_uid)))
    assert held == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study_files(prior)}
    assert len(held) == 128 and prior_jobs == []
