"""Helpers for the tests of several workers: small studies indexed as the receiver would, worker
processes started and killed, and waiting on the database."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from dicomnode.store.tables import Event, Job

from tests.support.selectionutil import copy_series, index_files  # noqa: F401 - index_files: for the tests

T = TypeVar("T")


def small_studies(root: Path, ct_files: list[Path], pt_files: list[Path], count: int) -> list[tuple[str, list[Path]]]:
    """`count` copies of a small study (the `small_study` fixture's files), each its own study:
    new Study, Series and SOP Instance UIDs. [(study UID, files)]."""
    studies = []
    for n in range(count):
        study_uid = generate_uid()

        def same_study(_k, ds, uid=study_uid):  # noqa: ANN001, ANN202
            ds.StudyInstanceUID = uid
            ds.AccessionNumber = f"ACC{n:03d}"

        _, ct = copy_series(ct_files, root / f"s{n:02d}" / "CT", same_study, series_number=2, description="CT")
        _, pt = copy_series(pt_files, root / f"s{n:02d}" / "PT", same_study, series_number=3, description="PET AC")
        studies.append((study_uid, ct + pt))
    return studies


def start_worker(folder: Path, *args: str) -> subprocess.Popen:
    """`dicomnode worker --config config.toml ARGS` started in `folder` (its own working directory,
    its own config file), logging to folder/worker.log."""
    with open(folder / "worker.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "dicomnode", "worker", "--config", "config.toml", *args],
                                cwd=folder, stdout=log, stderr=log)


def stop(process: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL after 60 s; the exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def wait_for(condition: Callable[[], T], timeout: float, what: str, poll: float = 0.2) -> T:
    """Wait until `condition()` is truthy (polling), return its value; AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def jobs(sessions: sessionmaker) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def job_events(sessions: sessionmaker, job_id: int) -> list[Event]:
    with sessions() as session:
        return list(session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id)))
