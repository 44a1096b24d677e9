"""Shared fixtures. Fixtures of the DICOM side's synthetic data are named synth_*."""

from __future__ import annotations

import pytest

from dicomnode.synth import SyntheticStudy, write_study


@pytest.fixture(scope="session")
def synth_study(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStudy:
    """One synthetic PET/CT study (seed 0), written once per test session. Treat as read-only."""
    return write_study(tmp_path_factory.mktemp("synth") / "study", seed=0)
