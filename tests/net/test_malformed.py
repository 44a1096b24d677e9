"""Malformed instances: the receiver refuses what the later stages could not read, with a status
and a reason; one that is on disk all the same (acknowledged by an older version, damaged later)
costs only its own series a verdict, never the sweep and never another study."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode.pipeline import assembler
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.index import ReceivedInstance, record_instance
from dicomnode.store.tables import Event, Instance, Job, Series, utcnow

from tests.support.malformed import CASES, SUCCESS, send_raw, valid_pet, write_case
from tests.support.nodeutil import node_config, tiny_instance

pytestmark = pytest.mark.e2e  # starts servers or subprocesses (tests/conftest.py)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_malformed_instance_gets_a_status_and_only_a_whole_one_is_kept(node, tmp_path: Path, case, caplog):
    config, sessions, receiver = node
    path, sop_uid, syntax = write_case(case, tmp_path / "cases", generate_uid())
    with caplog.at_level(logging.WARNING, logger="dicomnode.receiver"):
        [status] = send_raw(receiver.port, "TESTNODE", "GOODSCU", [(path, syntax)])
    assert status in case.expect, f"{case.name}: 0x{status:04X}" if status is not None else "no response"
    spooled = [p for p in config.spool_dir.rglob("*") if p.is_file()] if config.spool_dir.exists() else []
    with sessions() as session:
        rows = list(session.scalars(select(Instance)))
    if status == SUCCESS:
        [row] = rows
        assert row.sop_instance_uid == sop_uid
        assert [Path(row.path)] == spooled
        assert pydicom.dcmread(row.path).SOPInstanceUID == sop_uid
    else:
        assert rows == [] and spooled == []
        [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"refused instance {sop_uid}")]
        assert case.reason in line and f"(0x{status:04X})" in line


def test_a_series_number_that_is_no_number_is_recorded_as_missing(node, tmp_path: Path):
    config, sessions, receiver = node
    [case] = [c for c in CASES if c.name == "series-number-not-a-number"]
    path, sop_uid, syntax = write_case(case, tmp_path / "cases", generate_uid())
    assert send_raw(receiver.port, "TESTNODE", "GOODSCU", [(path, syntax)]) == [SUCCESS]
    with sessions() as session:
        [series] = session.scalars(select(Series))
    assert series.series_number is None and series.modality == "PT"


# --- an unreadable file already on disk ----------------------------------------------------------


def _index(sessions, paths: list[Path], at) -> None:  # noqa: ANN001
    """Index files as the receiver does (headers read leniently: these may be the broken ones)."""
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=16)
        record_instance(sessions, ReceivedInstance(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1",
            ds.Modality, 1, "", str(path), "SCU"), now=at)


def _pet_ct(folder: Path, study: str, frame: str, count: int = 4) -> list[Path]:
    paths = []
    for modality, series in (("CT", generate_uid()), ("PT", generate_uid())):
        for i in range(count):
            ds = valid_pet(study, series, i, count) if modality == "PT" else tiny_instance(study, series, i, "CT")
            ds.FrameOfReferenceUID = frame
            if modality == "CT":
                ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            folder.mkdir(parents=True, exist_ok=True)
            paths.append(folder / f"{modality}-{i}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _odd_length_pet(folder: Path, study: str, series: str, index: int) -> Path:
    """A PET instance whose NumberOfSlices (US) has 3 bytes, as the fuzz's poison pill had."""
    [case] = [c for c in CASES if c.name == "odd-length-us-number-of-slices"]
    ds = valid_pet(study, series, index)
    data, _ = case.make(ds)
    path = folder / f"odd-{index}.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_an_unreadable_instance_costs_only_its_series_a_verdict(tmp_path: Path):
    config = node_config(tmp_path, node="study_quiet_seconds = 60")
    sessions = make_sessionmaker(config.database_url)
    t0 = utcnow() - timedelta(seconds=300)
    frame = generate_uid()
    # Study "poisoned": its only PET has the unreadable instance; study "valid" comes after it.
    poisoned, valid, mixed = generate_uid(), generate_uid(), generate_uid()
    poisoned_files = _pet_ct(tmp_path / "poisoned", poisoned, frame)
    pet_series = pydicom.dcmread(poisoned_files[-1]).SeriesInstanceUID
    bad = _odd_length_pet(tmp_path / "poisoned", poisoned, pet_series, 9)
    _index(sessions, [*poisoned_files, bad], t0)
    _index(sessions, _pet_ct(tmp_path / "valid", valid, frame), t0)
    # Study "mixed": a good PET/CT and a second PET series made only of an unreadable instance.
    junk_series = generate_uid()
    _index(
        sessions,
        [*_pet_ct(tmp_path / "mixed", mixed, frame), _odd_length_pet(tmp_path / "junk", mixed, junk_series, 0)],
        t0,
    )

    created = assembler.queue_ready_studies(sessions, config, now=t0 + timedelta(seconds=61))

    with sessions() as session:
        queued = {session.get(Job, j).study_uid for j in created}
        assert queued == {valid, mixed}
        [incomplete] = session.scalars(
            select(Event.message).where(Event.study_uid == poisoned, Event.kind == "incomplete")
        )
        [mixed_job] = session.scalars(select(Job.id).where(Job.study_uid == mixed))
        verdicts = list(
            session.scalars(select(Event.message).where(Event.job_id == mixed_job, Event.kind == "series-verdict"))
        )
    bad_uid = pydicom.dcmread(bad, stop_before_pixels=True, defer_size=16).SOPInstanceUID
    assert f"unreadable instance {bad_uid}: NumberOfSlices: cannot be read" in incomplete, incomplete
    [junk_verdict] = [v for v in verdicts if junk_series in v]
    assert "ignored because unreadable instance" in junk_verdict and "NumberOfSlices" in junk_verdict, junk_verdict
    assert any("used for channel PET" in v for v in verdicts)


def test_a_study_that_cannot_be_checked_does_not_stop_the_others(tmp_path: Path, monkeypatch, caplog):
    """Whatever goes wrong with one study (here a database read that fails) is said once for that
    study, and the studies after it in the same sweep are queued."""
    config = node_config(tmp_path, node="study_quiet_seconds = 60")
    sessions = make_sessionmaker(config.database_url)
    t0 = utcnow() - timedelta(seconds=300)
    frame = generate_uid()
    broken, valid = generate_uid(), generate_uid()
    _index(sessions, _pet_ct(tmp_path / "broken", broken, frame), t0)
    _index(sessions, _pet_ct(tmp_path / "valid", valid, frame), t0 + timedelta(seconds=1))
    real = assembler.series_from_index

    def failing(session, study_uid):  # noqa: ANN001, ANN202
        if study_uid == broken:
            raise RuntimeError("disk I/O error")
        return real(session, study_uid)

    monkeypatch.setattr(assembler, "series_from_index", failing)
    with caplog.at_level(logging.ERROR, logger="dicomnode.assembler"):
        [first] = assembler.queue_ready_studies(sessions, config, now=t0 + timedelta(seconds=61))
        assert assembler.queue_ready_studies(sessions, config, now=t0 + timedelta(seconds=62)) == []
    with sessions() as session:
        assert session.get(Job, first).study_uid == valid
        events = list(
            session.scalars(select(Event.message).where(Event.study_uid == broken, Event.kind == "assembly-failed"))
        )
    assert events == ["could not be checked for completeness: RuntimeError: disk I/O error"]
    assert sum("disk I/O error" in r.getMessage() for r in caplog.records) == 1  # said once, not every sweep
