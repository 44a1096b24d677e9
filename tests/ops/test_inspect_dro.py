"""The 17 SUV reference objects (shared/data/suv_dro) through `dicomnode inspect --export`, as a
user checks a site's PET: each PET series is chosen for the PET channel and the exported
pet_suv.nii.gz gives min 0.20 / median 1.00 / max 4.00 inside the DRO's mask. DRO_3_4 is the one
not decay-corrected (DecayCorrection NONE, CorrectedImage without DECY): selection takes it, as
it keeps refusing PET that is not attenuation-corrected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from dicomnode.cli import app

from tests.imaging.test_suv_dro import DRO_ROOT, EXPECTED, FLOORED, TOLERANCE, _dro_ids

runner = CliRunner()


def _exported_suv_in_mask(folder: Path, out: Path) -> tuple[dict, np.ndarray]:
    result = runner.invoke(app, ["inspect", str(folder / "PT"), "--json", "--export", str(out)])
    report = json.loads(result.output)
    [study] = report["studies"]
    suv = sitk.ReadImage(study["exported"]["PET"])
    mask = sitk.ReadImage(str(folder / "mask" / "DRO_mask.nii.gz"))
    mask = sitk.Resample(mask, suv, sitk.Transform(), sitk.sitkNearestNeighbor, 0)  # onto the exported grid
    values = sitk.GetArrayFromImage(suv)[sitk.GetArrayFromImage(mask) > 0]
    return study, values


@pytest.mark.parametrize("dro", _dro_ids())
def test_dro_through_inspect_export(dro, tmp_path: Path):
    study, values = _exported_suv_in_mask(DRO_ROOT / dro, tmp_path / "export")
    [pet] = [s for s in study["series"] if s["modality"] == "PT"]
    assert pet["verdict"] == "used for channel PET", pet["verdict"]
    assert values.size > 0
    measured = (float(values.min()), float(np.median(values)), float(values.max()))
    for name, got, want in zip(("min", "median", "max"), measured, EXPECTED):
        if dro in FLOORED:  # stored floored to 0.01 SUVbsa: within one stored unit (0.038 SUVbw) below
            assert want - 0.04 < got <= want + TOLERANCE, f"{dro} {name}: {got:.4f} ({FLOORED[dro]})"
        else:
            assert abs(got - want) <= TOLERANCE, f"{dro} {name}: {got:.4f}, expected {want:.2f}"


def test_not_attenuation_corrected_pet_is_still_refused(tmp_path: Path):
    """DRO_3_4 with ATTN taken out of CorrectedImage: refused, and DecayCorrection NONE does not excuse it."""
    folder = tmp_path / "DRO_3_4_NAC" / "PT"
    folder.mkdir(parents=True)
    for path in sorted((DRO_ROOT / "DRO_3_4" / "PT").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.CorrectedImage = [v for v in ds.CorrectedImage if v != "ATTN"]
        ds.save_as(folder / path.name)
    shutil.copytree(DRO_ROOT / "DRO_3_4" / "mask", folder.parent / "mask")
    result = runner.invoke(app, ["inspect", str(folder), "--json"])
    [study] = json.loads(result.output)["studies"]
    [pet] = study["series"]
    assert pet["state"] == "ignored" and "lacks ATTN" in pet["verdict"] and "DECY" not in pet["verdict"]
