"""Synthetic studies for the registry models: valid DICOM (dciodvfy), the series a scanner
would send (grids, descriptions, one frame of reference), and the phantom's truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import dcmread
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.imaging.volumes import load_series
from dicomnode.synth.registry import KINDS, write_registry_study

from tests.support.dicomtools import dciodvfy_errors


@pytest.fixture(scope="module", params=KINDS)
def study(request, tmp_path_factory):
    return write_registry_study(tmp_path_factory.mktemp(request.param), request.param, seed=1000)


@pytest.mark.e2e
def test_every_series_is_valid_dicom(study):
    for description, files in study.files.items():
        for path in (files[0], files[-1]):
            assert dciodvfy_errors(path) == [], (description, path)


def test_one_study_one_frame_of_reference(study):
    headers = [dcmread(p, stop_before_pixels=True) for p in study.all_files]
    assert {h.StudyInstanceUID for h in headers} == {study.study_instance_uid}
    assert {h.FrameOfReferenceUID for h in headers} == {study.frame_of_reference_uid}
    assert {h.SeriesDescription: h.SeriesInstanceUID for h in headers} == study.series


def test_channel_series_hold_the_case(study):
    """A series on the case's grid holds the case's channel (MR rounded to stored integers)."""
    for channel, description in study.channel_series.items():
        volume = load_series(study.files[description])
        if volume.shape == study.case.grid.shape:
            np.testing.assert_array_equal(volume.array, np.round(study.case.channels[channel]).clip(None, 4095))
            assert volume.spacing == pytest.approx(study.case.grid.spacing)


def test_truth(study):
    labels = sitk.ReadImage(str(study.truth_labels))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), study.case.labels)
    truth = json.loads(study.truth_json.read_text())
    assert truth["series"] == study.series and truth["seed"] == 1000
    assert {int(k): v for k, v in truth["label_names"].items()} == study.case.label_names


def test_glioma_grids(tmp_path):
    glioma = write_registry_study(tmp_path, "glioma", seed=1001)
    shapes = {d: load_series(f).shape for d, f in glioma.files.items() if glioma.channel_series.get("T1") == d
              or glioma.channel_series.get("T2") == d}
    assert shapes == {"t1_mprage_tra": (48, 80, 80), "t2_tse_tra": (36, 64, 64)}
    t2 = dcmread(glioma.files["t2_tse_tra"][0], stop_before_pixels=True)
    assert float(t2.SliceThickness) == 4.0 and t2.Modality == "MR"
    post = dcmread(glioma.files["t1_mprage_tra_post_gd"][0], stop_before_pixels=True)
    assert post.ContrastBolusAgent == "Gadobutrol"
    adc = dcmread(glioma.files["ep2d_diff_tra_ADC"][0], stop_before_pixels=True)
    assert list(adc.ImageType)[:1] == ["DERIVED"]


def test_cli_kind(tmp_path):
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "s"), "--kind", "lymph", "--seed", "1002"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s" / "truth" / "truth.json").read_text())["kind"] == "lymph"
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "t"), "--kind", "brain"])
    assert bad.exit_code == 2 and "unknown kind 'brain'" in bad.output
