"""A full disk, for real: data_dir on a tmpfs of a few MB (mounted by the test, as root), the
disk watermark off so the disk really fills. Every instance is acknowledged and intact, or
refused with 0xA700; nothing partial stays; the database stays consistent; the node keeps
serving; once space comes back a resend completes the study. (An acknowledged instance is one
fsynced into the spool; its index row follows, and on a full disk it may wait until there is
room for the database to grow: the index is checked once space is back.) On the results side a full disk
fails the attempt with its reason, nothing truncated is written or sent, and once space is
back the SEG and SR arrive, whole."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Comprehensive3DSRStorage, CTImageStorage, SegmentationStorage, Verification
from sqlalchemy import select
from sqlalchemy.engine import make_url

from dicomnode.config import load_config
from dicomnode.net.receiver import Receiver
from dicomnode.net.scu import responses_to_the_caller
from dicomnode.pipeline import assembler
from dicomnode.pipeline.worker import Worker
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Event, Instance, Job, utcnow

from tests.support.nodeutil import REPO, IndexedSessions, tiny_instance, write_config
from tests.support.selectionutil import index_files
from tests.support.smalldisk import fill, grow, small_filesystem

pytestmark = pytest.mark.e2e  # mounts a file system, runs a receiver

MODEL = REPO / "models" / "demo-petct"


def _send_all(port: int, called: str, datasets: list) -> list[int | None]:
    """C-STORE each data set, a new association whenever one is rejected or aborted."""
    statuses: list[int | None] = []
    pending = list(datasets)
    while pending:
        ae = AE(ae_title="GOODSCU")
        ae.add_requested_context(CTImageStorage)
        assoc = responses_to_the_caller(ae.associate("127.0.0.1", port, ae_title=called))
        if not assoc.is_established:
            statuses.append(None)  # rejected (disk low): this instance counts as refused
            pending.pop(0)
            continue
        while pending and assoc.is_established:
            status = assoc.send_c_store(pending.pop(0))
            statuses.append(int(status.Status) if status and "Status" in status else None)
        if assoc.is_established:
            assoc.release()
    return statuses


def test_instances_on_a_full_disk_are_acknowledged_whole_or_refused_and_a_resend_completes(tmp_path: Path):
    with small_filesystem(tmp_path / "disk", 3) as disk:
        config_path = write_config(tmp_path, node=f'data_dir = "{disk}"\nmin_free_percent = 0\nmin_free_gb = 0\n'
                                                  'allowed_calling_aets = ["GOODSCU"]')
        config = load_config(config_path)
        sessions = make_sessionmaker(config.database_url)
        receiver = Receiver(config, sessions)
        receiver.start()
        try:
            study, series = generate_uid(), generate_uid()
            sent = [tiny_instance(study, series, i, rows=160) for i in range(80)]  # 51 kB each: 4 MB in all
            statuses = _send_all(config.node.port, config.node.ae_title, sent)
            acked = [ds for ds, s in zip(sent, statuses) if s == 0x0000]
            refused = [ds for ds, s in zip(sent, statuses) if s != 0x0000]
            assert set(statuses) <= {0x0000, 0xA700, None}, statuses
            assert acked and refused, f"the disk did not fill: {statuses}"
            _check_spool(receiver, acked)  # the index may wait for room (the spool file is the record)
            with sessions() as session:
                indexed_meanwhile = set(session.scalars(select(Instance.sop_instance_uid)))
            assert indexed_meanwhile <= {str(ds.SOPInstanceUID) for ds in acked}
            print(f"full disk: {len(acked)} acknowledged and intact, {len(refused)} refused "
                  f"({statuses.count(0xA700)} with 0xA700, {statuses.count(None)} associations rejected)")
            assert _echo(config)  # still serving
            grow(disk, 64)  # space comes back
            assert _send_all(config.node.port, config.node.ae_title, refused) == [0x0000] * len(refused)
            _check_spool_and_index(config, IndexedSessions(sessions, receiver), sent)
        finally:
            receiver.stop()


def _check_spool(receiver: Receiver, expected: list) -> None:
    """The spool holds the expected instances' files, whole, and nothing else (no temporary file)."""
    paths = {receiver.spool.path_for(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)): ds
             for ds in expected}
    assert sorted(p for p in receiver.config.spool_dir.rglob("*") if p.is_file()) == sorted(paths)
    for path, ds in paths.items():
        assert dcmread(path).PixelData == ds.PixelData


def _check_spool_and_index(config, sessions, expected: list) -> None:  # noqa: ANN001
    """Every expected instance is indexed, its file whole; no other file, no temporary file."""
    with sessions() as session:
        rows = {r.sop_instance_uid: r for r in session.scalars(select(Instance))}
    assert set(rows) == {str(ds.SOPInstanceUID) for ds in expected}
    for ds in expected:
        stored = dcmread(rows[str(ds.SOPInstanceUID)].path)
        assert stored.PixelData == ds.PixelData
    files = sorted(p for p in config.spool_dir.rglob("*") if p.is_file())
    assert sorted(Path(r.path) for r in rows.values()) == files  # nothing partial, nothing unindexed
    database = make_url(config.database_url).database
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def _echo(config) -> bool:  # noqa: ANN001
    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", config.node.port, ae_title=config.node.ae_title)
    ok = assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.release()
    return ok


@pytest.mark.skipif(not (MODEL / "plans.json").exists(), reason="demo model not built")
def test_a_full_disk_while_results_are_written_fails_the_attempt_and_sends_nothing_truncated(
    tmp_path: Path, small_study, scp_factory
):
    from inference import SegmentationModel

    scp = scp_factory([SegmentationStorage, Comprehensive3DSRStorage])
    study_uid, ct_files, pt_files = small_study
    with small_filesystem(tmp_path / "disk", 8) as disk:
        config_path = write_config(
            tmp_path, model_path=str(MODEL),
            node=f'data_dir = "{disk}"\ndatabase_url = "sqlite:///{tmp_path / "node.db"}"\nstudy_quiet_seconds = 0\n'
                 "retry_backoff_seconds = 0\nmin_free_percent = 0\nmin_free_gb = 0",
            extra=f'\n[[destinations]]\nname = "pacs"\nae_title = "TESTSCP"\nhost = "127.0.0.1"\nport = {scp.port}\n',
        )
        config = load_config(config_path)
        sessions = make_sessionmaker(config.database_url)
        index_files(sessions, ct_files + pt_files)
        [job_id] = assembler.queue_ready_studies(sessions, config)
        worker = Worker(config, sessions)
        worker.models._models["demo-petct"] = SegmentationModel(MODEL, folds=(0,), device="cpu", use_mirroring=False)
        ballast = fill(disk, leave_bytes=0)  # the results disk is full
        assert worker.run_one()
        with sessions() as session:
            job = session.get(Job, job_id)
            kinds = [e.kind for e in session.scalars(select(Event).where(Event.job_id == job_id))]
        assert job.state == "queued" and "cannot write the result objects" in job.error
        assert "No space left on device" in job.error and "retry-scheduled" in kinds
        out = disk / "results" / study_uid / f"job-{job_id}"
        leftovers = sorted(p.name for p in out.rglob("*")) if out.exists() else []
        assert not [n for n in leftovers if n.endswith(".dcm") or n.endswith(".partial")], leftovers
        assert scp.requests == []  # nothing sent
        ballast.unlink()  # space comes back
        with sessions.begin() as session:
            session.get(Job, job_id).not_before = utcnow()
        assert worker.run_one()
        with sessions() as session:
            job = session.get(Job, job_id)
        assert job.state == "succeeded", job.error
        seg, sr = dcmread(out / "seg.dcm"), dcmread(out / "sr.dcm")
        assert scp.stored == [seg.SOPInstanceUID, sr.SOPInstanceUID]
        received = scp.received[seg.SOPInstanceUID]
        assert received.NumberOfFrames == seg.NumberOfFrames and np.array_equal(received.pixel_array, seg.pixel_array)
