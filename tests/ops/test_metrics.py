"""The Prometheus endpoint of a running `dicomnode serve`: scraped over HTTP after real
associations and with jobs and deliveries in its database."""

import shutil
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicomnode.config import load_config
from dicomnode.net.scu import responses_to_the_caller
from dicomnode.net.sender import Outcome
from dicomnode.pipeline import delivery
from dicomnode.pipeline.queue import RetryPolicy, claim, enqueue
from dicomnode.store.engine import make_sessionmaker
from dicomnode.testing.node import start_node
from dicomnode.testing.ports import free_port

from tests.support.nodeutil import tiny_instance, write_config, write_series

pytestmark = pytest.mark.e2e  # starts servers or subprocesses (tests/conftest.py)


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _associate(port: int, calling: str):
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    return responses_to_the_caller(ae.associate("127.0.0.1", port, ae_title="TESTNODE"))


def test_metrics_count_instances_rejections_jobs_and_disk(tmp_path: Path):
    metrics_port = free_port()
    config_path = write_config(tmp_path, node=f'allowed_calling_aets = ["GOODSCU"]\nmetrics_port = {metrics_port}')
    config = load_config(config_path)
    node = start_node(config_path, config.node.port, tmp_path / "node.log", extra_args=("--no-worker",))
    try:
        assoc = _associate(config.node.port, "GOODSCU")
        study, series = generate_uid(), generate_uid()
        assert [assoc.send_c_store(tiny_instance(study, series, i)).Status for i in range(3)] == [0, 0, 0]
        assoc.release()
        assert _associate(config.node.port, "INTRUDER").is_rejected

        sessions = make_sessionmaker(config.database_url)
        policy = RetryPolicy()
        first = enqueue(sessions, study, "demo-petct", policy)
        enqueue(sessions, generate_uid(), "demo-petct", policy)
        assert claim(sessions, "test", timedelta(minutes=5)).id == first
        [result] = write_series(tmp_path / "result", study, "CT", 1)
        delivery.plan(sessions, first, study, [result], ["pacs"], policy)
        [item] = delivery.of_job(sessions, first)
        delivery.record(
            sessions,
            item.id,
            Outcome(result, item.sop_instance_uid, item.sop_class_uid, 1, 0xA700, "status 0xA700"),
            policy,
            study_uid=study,
        )

        samples = _scrape(metrics_port)
        free = shutil.disk_usage(config.node.data_dir).free
    finally:
        assert node.stop() == 0
    assert samples[("dicomnode_instances_received_total", ())] == 3
    assert samples[("dicomnode_associations_rejected_total", (("reason", "calling-ae-title"),))] == 1
    jobs = {labels[0][1]: value for (name, labels), value in samples.items() if name == "dicomnode_jobs"}
    assert jobs == {"queued": 1, "running": 1, "succeeded": 0, "failed": 0} | {
        k: 0 for k in jobs if k not in ("queued", "running", "succeeded", "failed")
    }
    assert samples[("dicomnode_delivery_failures_total", ())] == 1
    assert samples[("dicomnode_studies_completed_total", ())] == 0
    assert samples[("dicomnode_inference_seconds_count", ())] == 0
    assert abs(samples[("dicomnode_disk_free_bytes", ())] - free) < 1e9
    assert samples[("dicomnode_disk_free_limit_bytes", ())] >= 5e9
