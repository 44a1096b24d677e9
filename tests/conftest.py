"""Shared fixtures. Fixtures of the DICOM side's synthetic data are named synth_*; `node` is a
running receiver."""

from __future__ import annotations

from pathlib import Path

import pytest
import SimpleITK as sitk
from nodeutil import node_config
from selectionutil import copy_series
from storescp import StoreSCP

from dicomnode.imaging.volumes import load_series
from dicomnode.net.receiver import Receiver
from dicomnode.store.engine import make_sessionmaker
from dicomnode.synth.petct import SyntheticStudy, write_study


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
    yield config, sessions, receiver
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
