"""The database under load: operators read (status, job lists, metrics scrapes, 20 a second, and
an export of the whole event log) while four senders store studies at once: no instance is
refused, nothing says "database is locked". On PostgreSQL, a restart of the database server in
the middle of an ingest: what arrives while it is down is refused with 0xA700 (never
acknowledged), and the node reconnects by itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, insert, select

from dicomnode.config import load_config
from dicomnode.ops.history import list_jobs, list_studies
from dicomnode.ops.status import node_status
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Event, Instance, utcnow
from dicomnode.testing.node import start_node
from dicomnode.testing.ports import free_port

from tests.support.nodeutil import tiny_instance, write_config, write_series
from tests.support.pgserver import PostgresServer, postgres_bin

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed")]

EVENTS = 150_000  # the event log a node has after months of work


class Readers(threading.Thread):
    """What operators and Prometheus do, `rate` times a second in turn: status, jobs list,
    studies list, a /metrics scrape; every error kept."""

    def __init__(self, sessions, config, metrics_url: str, rate: float = 20.0) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self.sessions, self.config, self.metrics_url, self.period = sessions, config, metrics_url, 1.0 / rate
        self.calls, self.errors, self.stop = 0, [], threading.Event()
        self.seconds = 0.0

    def run(self) -> None:
        began = time.monotonic()
        reads = [lambda: node_status(self.sessions, self.config), lambda: list_jobs(self.sessions),
                 lambda: list_studies(self.sessions, since=utcnow() - timedelta(hours=1)),
                 lambda: urllib.request.urlopen(self.metrics_url, timeout=10).read()]
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                reads[self.calls % len(reads)]()
            except Exception as exc:  # noqa: BLE001 - every kind is a finding
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self.calls += 1
            self.stop.wait(max(self.period - (time.monotonic() - started), 0))
        self.seconds = time.monotonic() - began


def _wait_for_metrics(url: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_readers_during_a_four_study_ingest_cause_no_refusal_and_no_lock(tmp_path: Path):
    metrics_port = free_port()
    config_path = write_config(tmp_path, node=f'allowed_calling_aets = ["STORESCU"]\nmetrics_port = {metrics_port}\n'
                                              "study_quiet_seconds = 600")
    config = load_config(config_path)
    writer = make_sessionmaker(config.database_url)
    now = utcnow()
    with writer.begin() as session:  # a long event log, for the export
        session.execute(insert(Event), [{"at": now, "study_uid": f"1.2.{i // 50}", "kind": "delivered",
                                         "message": f"seg.dcm to pacs: status 0x0000, attempt {i % 3 + 1}"}
                                        for i in range(EVENTS)])
    studies = []
    for k in range(4):
        study, root = generate_uid(), tmp_path / f"study-{k}"
        write_series(root / "CT", study, "CT", 40)
        write_series(root / "PT", study, "PT", 40)
        studies.append(root)
    node = start_node(config_path, config.node.port, tmp_path / "node.log", extra_args=("--no-worker",))
    readers = Readers(make_sessionmaker(config.database_url), config, f"http://127.0.0.1:{metrics_port}/metrics")
    try:
        _wait_for_metrics(readers.metrics_url)  # it opens after the DICOM port start_node waits for
        readers.start()
        started = time.monotonic()
        export = subprocess.Popen([sys.executable, "-m", "dicomnode", "events", "--config", str(config_path)],
                                  stdout=open(tmp_path / "events.jsonl", "wb"), stderr=subprocess.PIPE)
        senders = [subprocess.Popen(["storescu", "-aet", "STORESCU", "-aec", config.node.ae_title, "+sd", "+r",
                                     "127.0.0.1", str(config.node.port), str(root)],
                                    stderr=subprocess.PIPE, env={**os.environ, "TCP_NODELAY": "1"})
                   for root in studies]
        results = [s.wait(300) for s in senders]
        ingest = time.monotonic() - started
        exported = export.wait(300)
        readers.stop.set()
        readers.join(30)
    finally:
        node.stop()
    log = (tmp_path / "node.log").read_text()
    assert results == [0, 0, 0, 0], [s.stderr.read() for s in senders]
    assert exported == 0, export.stderr.read()
    with writer() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 4 * 80
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) >= EVENTS
    assert readers.errors == [] and readers.calls >= 20 * ingest * 0.5, (readers.calls, ingest)
    assert "database is locked" not in log and "0xA700" not in log and "refused" not in log
    print(f"4 x 80 instances in {ingest:.1f} s beside {readers.calls} reads ({readers.calls / readers.seconds:.0f}/s) "
          f"and an export of {len(lines)} events: 0 refused, 0 locked")


# ---------------------------------------------------------------- PostgreSQL restarted mid-ingest


@pytest.fixture
def postgres():
    if postgres_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (make system-packages installs it)")
        pytest.skip("PostgreSQL not installed (make system-packages installs it)")
    folder = Path(tempfile.mkdtemp(prefix="dicomnode-pg-"))  # not under pytest's root-only tmp folders
    folder.chmod(0o755)
    try:
        server = PostgresServer(folder / "cluster")
        yield server
        server.stop(fast=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _store(port: int, called: str, ds) -> int | None:  # noqa: ANN001
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    status = assoc.send_c_store(ds)
    assoc.release()
    return int(status.Status) if status and "Status" in status else None


def test_a_database_restart_mid_ingest_loses_nothing_acknowledged_and_the_node_reconnects(tmp_path: Path, postgres):
    url = postgres.new_database()
    config_path = write_config(tmp_path, node=f'database_url = "{url}"\nallowed_calling_aets = ["STORESCU"]\n'
                                              "study_quiet_seconds = 600")
    config = load_config(config_path)
    node = start_node(config_path, config.node.port, tmp_path / "node.log", extra_args=("--no-worker",))
    study, series = generate_uid(), generate_uid()
    sent: list[tuple[str, float, int | None]] = []  # (SOP UID, when, status)
    try:
        def send_for(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                ds = tiny_instance(study, series, len(sent))
                status = _store(config.node.port, config.node.ae_title, ds)
                sent.append((str(ds.SOPInstanceUID), time.monotonic(), status))
                time.sleep(0.05)

        send_for(3)
        postgres.stop(fast=True)
        down_at = time.monotonic()
        send_for(4)
        postgres.start()
        up_at = time.monotonic()
        send_for(8)
        assert node.process.poll() is None, "the node died with its database"
    finally:
        node.stop()
    before = [s for _, t, s in sent if t < down_at]
    during = [s for _, t, s in sent if down_at + 0.5 < t < up_at]
    after = [s for _, t, s in sent if t > up_at + 4]  # the node reconnects by itself within a few seconds
    assert set(before) == {0x0000} and set(after) == {0x0000}, (before, after)
    # acknowledged: the spool file is the durable record (fsynced before 0x0000); the index row is
    # written by the index writer once the database is back (or from the spool at the next start)
    assert during and set(during) == {0x0000}, during
    acked = {uid for uid, _, s in sent if s == 0x0000}
    with make_sessionmaker(url)() as session:
        indexed = set(session.scalars(select(Instance.sop_instance_uid)))
    assert indexed == acked  # nothing acknowledged lost, nothing refused indexed
    files = {p.stem for p in config.spool_dir.rglob("*.dcm")}
    assert files == acked  # a refused instance leaves no file
    print(f"PostgreSQL down {up_at - down_at:.1f} s: {len(during)} instances acknowledged meanwhile, "
          f"{len(acked)} acknowledged in all, all indexed")
