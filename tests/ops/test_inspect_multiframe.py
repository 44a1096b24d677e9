"""`dicomnode inspect --export` on enhanced multi-frame series (the synthetic study converted by
highdicom.legacy): the same verdicts, SUV factor and exported volumes as the single-frame study."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from typer.testing import CliRunner

from dicomnode.cli import app

from tests.support.multiframe import convert_series

runner = CliRunner()


def _inspect(folder: Path, out: Path) -> dict:
    result = runner.invoke(app, ["inspect", str(folder), "--json", "--export", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_export_of_multiframe_study_equals_single_frame(synth_study, tmp_path: Path):
    single_folder = tmp_path / "single"
    shutil.copytree(synth_study.pt_dir, single_folder / "PT")
    shutil.copytree(synth_study.ct_dir, single_folder / "CT")
    multi_folder = tmp_path / "multi"
    convert_series(synth_study.pt_files, multi_folder)
    convert_series(synth_study.ct_files, multi_folder)
    single = _inspect(single_folder, tmp_path / "out-single")
    multi = _inspect(multi_folder, tmp_path / "out-multi")
    [s], [m] = single["studies"], multi["studies"]
    assert m["ready"] and m["chosen"] == s["chosen"]
    assert {v["verdict"] for v in m["series"]} == {"used for channel PET", "used for channel CT"}
    assert m["suv"] == s["suv"]  # the factor and every attribute it was derived from
    for name in ("pet_suv.nii.gz", "ct_hu.nii.gz"):
        a = sitk.ReadImage(str(tmp_path / "out-single" / name))
        b = sitk.ReadImage(str(tmp_path / "out-multi" / name))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(b), sitk.GetArrayFromImage(a))
        assert (b.GetSpacing(), b.GetOrigin(), b.GetDirection()) == (a.GetSpacing(), a.GetOrigin(), a.GetDirection())
