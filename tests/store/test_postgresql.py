"""The node on PostgreSQL (`[node] database_url = "postgresql+psycopg://..."`, for several GPU
workers on one queue), on a real server from Debian's postgresql package: the migrations make
the models' schema, concurrent openers upgrade once, a study goes from the receiver through the
worker to the PACS (then the admin CLI, the metrics and retention read it), and workers racing
for jobs each get a job exactly once."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pynetdicom.sop_class import Comprehensive3DSRStorage, SegmentationStorage
from sqlalchemy import func, select
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import Destination
from dicomnode.net.receiver import Receiver
from dicomnode.net.sender import store_each
from dicomnode.ops.metrics import DatabaseCollector
from dicomnode.pipeline import assembler
from dicomnode.pipeline.queue import RetryPolicy, enqueue
from dicomnode.pipeline.worker import Worker
from dicomnode.store import retention
from dicomnode.store.engine import make_engine, make_sessionmaker
from dicomnode.store.schema import current_revision, head_revision
from dicomnode.store.tables import Base, Delivery, Event, Instance, Job, Study

from tests.support.nodeutil import REPO, node_config
from tests.support.pgserver import PostgresServer, postgres_bin
from tests.support.queueutil import claim_concurrently
from tests.support.schemautil import open_at_once

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        postgres_bin() is None and not os.environ.get("CI"),
        reason="PostgreSQL not installed (make system-packages installs it)",
    ),
]


@pytest.fixture(scope="module")
def postgres():
    # Not under pytest's tmp folders: they are private to root, and the server runs as postgres.
    folder = Path(tempfile.mkdtemp(prefix="dicomnode-pg-"))
    folder.chmod(0o755)
    try:
        server = PostgresServer(folder / "cluster")
        yield server
        server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_migrations_make_exactly_the_models_schema(postgres):
    engine = make_engine(postgres.new_database())
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_processes_opening_a_new_database_at_once_upgrade_it_once(postgres):
    """The advisory lock: without it, the second process's CREATE TABLE fails on the first's tables."""
    assert open_at_once(postgres.new_database()) == [head_revision()] * 4


def test_a_study_goes_through_the_node(postgres, tmp_path: Path, small_study, scp_factory):
    """Received, indexed, queued, segmented on the demo model and delivered, all on PostgreSQL."""
    uid, ct_files, pt_files = small_study
    pacs = scp_factory([SegmentationStorage, Comprehensive3DSRStorage])
    config = node_config(
        tmp_path,
        model_path=str(REPO / "models" / "demo-petct"),
        node=f'database_url = "{postgres.new_database()}"\nstudy_quiet_seconds = 2',
        extra=f'[[destinations]]\nname = "pacs"\nae_title = "TESTSCP"\nhost = "127.0.0.1"\nport = {pacs.port}\n',
    )
    sessions = make_sessionmaker(config.database_url)
    receiver = Receiver(config, sessions)
    receiver.start()
    try:
        node = Destination(name="node", ae_title=config.node.ae_title, host="127.0.0.1", port=config.node.port)
        outcomes = store_each(node, ct_files + pt_files, "MODALITY")
    finally:
        receiver.stop()
    assert [o.status for o in outcomes] == [0x0000] * len(ct_files + pt_files)
    with sessions() as session:
        study = session.get(Study, uid)
        stored = session.scalar(select(func.count()).select_from(Instance).where(Instance.study_uid == uid))
    assert (study.instances_received, stored) == (len(ct_files) + len(pt_files),) * 2
    assert study.last_received_at.tzinfo is not None  # timestamptz, read back aware
    [job_id] = assembler.queue_ready_studies(sessions, config, now=study.last_received_at + timedelta(seconds=2.1))

    assert Worker(config, sessions).run_one()
    with sessions() as session:
        job = session.get(Job, job_id)
        deliveries = list(session.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)))
        kinds = list(session.scalars(select(Event.kind).where(Event.job_id == job_id).order_by(Event.id)))
    assert (job.study_uid, job.model, job.state, job.attempts) == (uid, "demo-petct", "succeeded", 1), job.error
    assert [(Path(d.path).name, d.state) for d in deliveries] == [("seg.dcm", "sent"), ("sr.dcm", "sent")]
    assert sorted(pacs.stored) == sorted(d.sop_instance_uid for d in deliveries)
    assert all(pacs.received[d.sop_instance_uid].StudyInstanceUID == uid for d in deliveries)
    assert kinds[0] == "queued" and kinds[-1] == "succeeded"
    assert kinds.index("started") < kinds.index("inference-done") < kinds.index("succeeded")

    # What an admin reads: the CLI's status and the metrics; then retention, 72 h after the job
    status = CliRunner().invoke(app, ["status", "--json", "--config", str(config.source)])
    report = json.loads(status.stdout)
    assert (report["queue"]["succeeded"], report["schema"], report["disk"]["database_bytes"]) == (
        1,
        head_revision(),
        None,
    )
    metrics = {m.name: m for m in DatabaseCollector(config, sessions).collect()}
    assert [s.value for s in metrics["dicomnode_jobs"].samples if s.labels == {"state": "succeeded"}] == [1]
    assert [s.value for s in metrics["dicomnode_inference_seconds"].samples if s.name.endswith("_count")] == [1]
    assert retention.purge_due(sessions, config, now=job.finished_at + timedelta(hours=73)) == [uid]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance).where(Instance.study_uid == uid)) == 0
    assert not (config.spool_dir / uid).exists() and not (config.results_dir / uid).exists()


def test_workers_racing_for_jobs_each_get_a_job_once(postgres):
    """Four workers, each with its own connections, claim until the queue is empty."""
    url = postgres.new_database()
    sessions = make_sessionmaker(url)
    queued = {enqueue(sessions, f"1.2.826.0.1.{n}", "demo-petct", RetryPolicy()) for n in range(40)}
    claimed = claim_concurrently(lambda: make_sessionmaker(url))
    assert sorted(claimed) == sorted(queued)  # every job, none twice
    with sessions() as session:
        owners = Counter(session.scalars(select(Job.lease_owner)))
        started = session.scalar(select(func.count()).select_from(Event).where(Event.kind == "started"))
        states = set(session.scalars(select(Job.state)))
    assert sum(owners.values()) == 40 and set(owners) <= {f"w{n}" for n in range(4)}
    assert (started, states) == (40, {"running"})
