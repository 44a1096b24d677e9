"""Shared fixtures. Fixtures of the DICOM side's synthetic data are named synth_*; `node` is a
running receiver.

A test that starts a server (anything that listens on a socket) or a subprocess must be marked
`e2e`, so that `pytest -m "not e2e"` is a fast subset that starts nothing: an unmarked test
(or a fixture set up for it) that tries fails, naming the mark."""

from __future__ import annotations

import multiprocessing.process
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import SimpleITK as sitk

from dicomnode.imaging.volumes import load_series
from dicomnode.net.receiver import Receiver
from dicomnode.store.engine import make_sessionmaker
from dicomnode.synth.petct import SyntheticStudy, write_study

from tests.support.nodeutil import IndexedSessions, node_config
from tests.support.selectionutil import copy_series
from tests.support.storescp import StoreSCP

_LIBRARY_LOOKUP = {"ldconfig", "gcc", "cc", "ld", "objdump", "hostname", "uname"}  # libraries ask at first import


@contextmanager
def _nothing_started(item: pytest.Item) -> Iterator[None]:
    """Listening on a socket or starting a process is an error inside this block, unless `item` is e2e."""
    if item.get_closest_marker("e2e") is not None:
        yield
        return

    def refuse(what: str):  # noqa: ANN202
        def refused(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
            raise RuntimeError(f"{item.nodeid} {what}: mark it @pytest.mark.e2e (tests/conftest.py)")
        return refused

    popen = subprocess.Popen.__init__

    def popen_unless_library_lookup(self, args, *rest, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        program = Path(str(args[0] if isinstance(args, (list, tuple)) else str(args).split()[0])).name
        if program in _LIBRARY_LOOKUP:  # run by libraries as they are first imported, not by the test
            return popen(self, args, *rest, **kwargs)
        refuse(f"starts a subprocess ({program})")()

    patched = [(socket.socket, "listen", refuse("listens on a socket (a server)")),
               (subprocess.Popen, "__init__", popen_unless_library_lookup),
               (multiprocessing.process.BaseProcess, "start", refuse("starts a process"))]
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patched]  # None: inherited
    for owner, name, replacement in patched:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in saved:
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _nothing_started(item):  # fixtures of every scope this test sets up first
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _nothing_started(item):
        yield


@pytest.fixture(scope="session")
def synth_study(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStudy:
    """One synthetic PET/CT study (seed 0), written once per test session. Treat as read-only."""
    return write_study(tmp_path_factory.mktemp("synth") / "study", seed=0)


@pytest.fixture(scope="session")
def small_study(tmp_path_factory, synth_study):
    """16 slices of the synthetic PET and the CT slices at the same positions (one study, one
    frame of reference): complete and consistent, and quick to send. (study UID, CT files, PET files)"""
    root = tmp_path_factory.mktemp("small")

    def pet(_k, ds):
        ds.NumberOfSlices = 16

    _, ct_files = copy_series(synth_study.ct_files[24:40], root / "CT", series_number=2, description="CT")
    _, pt_files = copy_series(synth_study.pt_files[24:40], root / "PT", pet, series_number=3, description="PET AC")
    return synth_study.study_instance_uid, ct_files, pt_files


@pytest.fixture(scope="module")
def pet(synth_study):
    """The synthetic study's PET series as a Volume (one per test module: some tests edit headers)."""
    return load_series(synth_study.pt_files)


@pytest.fixture(scope="module")
def truth(synth_study):
    """The synthetic study's lesion labels on the PET grid."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(synth_study.truth_labels)))


@pytest.fixture
def node(tmp_path: Path):
    """A running Receiver on a free loopback port that allows GOODSCU and STORESCU."""
    config = node_config(tmp_path, node='allowed_calling_aets = ["GOODSCU", "STORESCU"]')
    sessions = make_sessionmaker(config.database_url)
    receiver = Receiver(config, sessions)
    receiver.start()
    yield config, IndexedSessions(sessions, receiver), receiver
    receiver.stop()


@pytest.fixture
def scp_factory():
    """make(sop_classes, ...) starts a StoreSCP on a free loopback port; all are closed after the test."""
    servers = []

    def make(*args, **kwargs) -> StoreSCP:  # noqa: ANN002, ANN003
        servers.append(StoreSCP(*args, **kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()
