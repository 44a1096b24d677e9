"""The two packages' boundary: `inference` is the model side without DICOM libraries;
`dicomnode` is the DICOM side and never imports torch at module level."""

import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dicomnode

pytestmark = pytest.mark.e2e  # starts servers or subprocesses (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)


def _runtime_modules() -> list[str]:
    """Every module of dicomnode, subpackages walked (not the migrations: Alembic runs them)."""
    return [m.name for m in pkgutil.walk_packages(dicomnode.__path__, "dicomnode.")
            if not m.name.endswith("__main__") and ".migrations" not in m.name]


def test_dicomnode_modules_do_not_import_torch():
    modules = _runtime_modules()
    assert "dicomnode.net.receiver" in modules and "dicomnode.pipeline.worker" in modules
    assert "dicomnode.pipeline.model_cache" in modules  # the module that loads models imports torch only when asked
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + (
        "heavy = [m for m in ('torch', 'nnunetv2', 'inference') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = _fresh_python(code)
    assert result.returncode == 0, result.stderr


def test_the_receiver_process_stays_small():
    """`dicomnode serve` (the receiver, the sweeps) loads no image or result library: no highdicom,
    SimpleITK or scipy (about 130 MB more; the soak saw the receiver double to 250 MB when the
    assembler imported the status SR's and the priors' modules). Those load in the worker."""
    code = ("import sys, resource\nimport dicomnode.service\n"
            "heavy = [m for m in ('highdicom', 'SimpleITK', 'scipy', 'torch') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = _fresh_python(code)
    assert result.returncode == 0, result.stderr


def test_inference_does_not_import_dicom_libraries():
    result = _fresh_python(
        "import sys, inference, inference.model\n"
        "bad = [m for m in ('pydicom', 'pynetdicom', 'highdicom', 'dicomnode') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    assert result.returncode == 0, result.stderr


def test_import_linter_contract():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is a test dependency"
    result = subprocess.run([lint], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout
    assert "layers along the data flow" in result.stdout
