""""AI not performed" in a real PACS: a job whose model fails for good sends its status SR into the
study on a local Orthanc, where the reason is readable; a later successful run is told apart by
its series."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.pipeline.job import result_dir
from dicomnode.pipeline.queue import RetryPolicy, enqueue
from dicomnode.pipeline.worker import Worker
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Job, JobState
from dicomnode.testing.orthanc import LocalOrthanc, orthanc_binary

from tests.pipeline.test_not_performed import MODEL_ERROR, RaisingModel
from tests.support.dicomtools import dciodvfy_errors
from tests.support.nodeutil import REPO, node_config
from tests.support.selectionutil import index_files

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(orthanc_binary() is None, reason="Orthanc is not installed")]


def test_a_failed_job_puts_its_status_sr_into_the_study_on_orthanc(tmp_path: Path, synth_study):
    with LocalOrthanc(tmp_path / "orthanc") as orthanc:
        config = node_config(
            tmp_path, model_path=str(REPO / "models" / "demo-petct"), node="max_attempts = 1",
            extra=f'version = "test-1"\n[[destinations]]\nname = "pacs"\nae_title = "{orthanc.aet}"\n'
                  f'host = "127.0.0.1"\nport = {orthanc.dicom_port}\n',  # default outputs: SEG, SR, STATUS
        )
        sessions = make_sessionmaker(config.database_url)
        index_files(sessions, synth_study.ct_files + synth_study.pt_files)
        job_id = enqueue(sessions, synth_study.study_instance_uid, "demo-petct", RetryPolicy(max_attempts=1))
        worker = Worker(config, sessions)
        worker.models._models["demo-petct"] = RaisingModel()
        assert worker.run_one()
        with sessions() as session:
            job = session.get(Job, job_id)
        assert job.state == JobState.FAILED and MODEL_ERROR in job.error
        sent = dcmread(result_dir(config, job) / "status.dcm", stop_before_pixels=True)

        series = orthanc.wait_for_series(synth_study.study_instance_uid, "SR", timeout=30)
        assert series["MainDicomTags"]["SeriesDescription"] == "demo-petct not performed (run 1)"
        assert series["MainDicomTags"]["SeriesNumber"] == "905"
        [instance] = series["Instances"]
        tags = orthanc.instance_tags(instance)
        assert tags["SOPInstanceUID"] == sent.SOPInstanceUID
        texts = {item["ConceptNameCodeSequence"][0]["CodeMeaning"]: item.get("TextValue")
                 for item in tags["ContentSequence"]}
        assert MODEL_ERROR in texts["Reason not performed"]
        assert texts["Algorithm Name"] == "demo-petct" and "not performed" in texts["Comment"]
        stored = orthanc.download_instance(instance, tmp_path / "from-orthanc.dcm")
        assert dciodvfy_errors(stored) == []
