"""DICOM checking helpers shared by the tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def dciodvfy_output(path: Path | str) -> str:
    """Everything dciodvfy (dicom3tools) says of one file; skips the test without dciodvfy."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    return result.stdout + result.stderr


def dciodvfy_errors(path: Path | str) -> list[str]:
    """The "Error - ..." lines dciodvfy (dicom3tools) reports for one file; warnings are ignored.

    Skips the calling test when dciodvfy is not installed.
    """
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    result = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60
    )
    lines = (result.stdout + result.stderr).splitlines()
    return [line.strip() for line in lines if line.strip().startswith("Error")]
