"""Vendor variants of the synthetic PET (GE private scan start, Philips CNTS, ADMIN decay
correction with the dose in MBq, an injection before midnight): among a scanner's distractor
series `dicomnode inspect` chooses the right PET and CT, names the SUV path it took, and the
exported SUV reproduces the generator's within 1 %. Every variant stays dciodvfy-clean."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.imaging.suv import pet_suv_volume
from dicomnode.imaging.volumes import load_series
from dicomnode.synth import petct_phantom as ph
from dicomnode.synth.petct import VARIANTS, write_study

from tests.support.dicomtools import dciodvfy_errors
from tests.support.selectionutil import distractor_study

# What the SUV attributes must say for each variant: (attribute, expected part of its value).
EXPECTED_PATH = {
    "bqml": [("Units", "BQML"), ("DecayReferenceFrom", "SeriesDate/SeriesTime"), ("RadionuclideTotalDose", "3e+08 Bq")],
    "ge-private-time": [
        ("Units", "BQML"),
        ("DecayReferenceFrom", "GE scan start (0009,100D) of 'GEMS_PETD_01'"),
        ("DecayReferenceDateTime", "2024-03-15T09:10:00"),
    ],
    "philips-cnts": [
        ("Units", "CNTS"),
        ("Philips SUV scale factor", "from (7053,1000) of 'Philips PET Private Group'"),
    ],
    "admin-mbq": [("DecayCorrection", "ADMIN"), ("DecayTime", "0 s"), ("RadionuclideTotalDose", "300 (read as MBq)")],
    "midnight": [
        ("InjectionDateTime", "2024-03-14T23:30:00"),
        ("InjectionDate", "StartTime only, dated by the scan at 2024-03-15T00:30:00"),
        ("DecayTime", "3600 s"),
    ],
}


@pytest.mark.e2e
@pytest.mark.parametrize("variant", VARIANTS)
def test_inspect_chooses_the_right_series_and_reproduces_the_suv(variant, tmp_path: Path):
    scanner = distractor_study(tmp_path / "in", seed=3, variant=variant)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["inspect", str(scanner.root), "--json", "--export", str(out)])
    assert result.exit_code == 0, result.output
    [study] = json.loads(result.output)["studies"]
    assert study["chosen"] == {"PET": scanner.uids["pet"], "CT": scanner.uids["ct"]}
    states = {s["series_uid"]: s["state"] for s in study["series"]}
    assert all(states[scanner.uids[name]] == "ignored" for name in ("nac", "mip", "localizer", "ct_thick"))
    attributes = study["suv"]["attributes"]
    for attribute, expected in EXPECTED_PATH[variant]:
        assert expected in attributes.get(attribute, ""), (attribute, attributes)
    assert "factor_range" not in study["suv"]  # one factor for the whole series

    suv = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "pet_suv.nii.gz")))
    truth = ph.pet_suv(scanner.study.phantom, ph.PET_GRID)
    np.testing.assert_allclose(suv, truth, rtol=0.01, atol=1e-4 * truth.max())

    for path in (scanner.study.pt_files[0], scanner.study.pt_files[40], scanner.study.ct_files[10]):
        assert dciodvfy_errors(path) == [], path


def test_ge_private_start_is_what_makes_the_suv_right(tmp_path: Path):
    """Without (0009,100D) the per-bed AcquisitionTimes would be taken: later beds off by > 1 %."""
    study = write_study(tmp_path / "ge", seed=1, variant="ge-private-time")
    volume = load_series(study.pt_files)
    truth = ph.pet_suv(study.phantom, ph.PET_GRID)
    right = pet_suv_volume(volume)
    np.testing.assert_allclose(right, truth, rtol=0.01, atol=1e-4 * truth.max())
    for ds in volume.datasets:
        del ds[ds.private_block(0x0009, "GEMS_PETD_01").get_tag(0x0D)]
        del ds[0x0009, 0x0010]
    stripped = pet_suv_volume(volume)
    body = truth > 0.5
    assert np.median(np.abs(stripped[-1][body[-1]] / right[-1][body[-1]] - 1.0)) > 0.02


def test_unknown_variant_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown variant 'siemens'"):
        write_study(tmp_path, variant="siemens")


def test_variant_headers(tmp_path: Path):
    philips = pydicom.dcmread(write_study(tmp_path / "p", variant="philips-cnts").pt_files[0])
    assert philips.Units == "CNTS" and philips.Manufacturer.startswith("Philips")
    midnight = pydicom.dcmread(write_study(tmp_path / "m", variant="midnight").pt_files[0])
    drug = midnight.RadiopharmaceuticalInformationSequence[0]
    assert "RadiopharmaceuticalStartDateTime" not in drug and drug.RadiopharmaceuticalStartTime == "233000"
    assert midnight.SeriesDate == "20240315" and midnight.SeriesTime == "003000"
