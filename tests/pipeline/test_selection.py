"""Series selection: the right PET and CT among a scanner's distractor series, a verdict for
every series, and a study held back while its PET is still arriving."""

from __future__ import annotations

import dataclasses
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import InputSpec, PetInputSpec
from dicomnode.imaging.headers import group_series, read_facts, series_from_paths
from dicomnode.pipeline import assembler
from dicomnode.pipeline.selection import select_inputs
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Event, Job, utcnow

from tests.support.nodeutil import node_config
from tests.support.selectionutil import distractor_study, index_files


@pytest.fixture(scope="module")
def scanner_study(tmp_path_factory):
    return distractor_study(tmp_path_factory.mktemp("selection"))


def _by_uid(selection):
    return {v.series_uid: v for v in selection.verdicts}


def test_right_series_are_chosen_with_a_verdict_for_each(scanner_study):
    studies, unreadable = series_from_paths(scanner_study.all_files())
    assert unreadable == [] and list(studies) == [scanner_study.study.study_instance_uid]
    selection = select_inputs(studies[scanner_study.study.study_instance_uid], ["CT", "PET"])
    assert selection.ready
    uids = scanner_study.uids
    assert selection.chosen["PET"].series_uid == uids["pet"]
    assert selection.chosen["CT"].series_uid == uids["ct"]
    verdicts = _by_uid(selection)
    assert len(verdicts) == 6
    assert verdicts[uids["pet"]].text == "used for channel PET"
    assert verdicts[uids["ct"]].text == "used for channel CT"
    assert (
        verdicts[uids["nac"]].state == "ignored"
        and "CorrectedImage DECY\\RAN\\NORM lacks ATTN" in verdicts[uids["nac"]].text
    )
    mip = verdicts[uids["mip"]].text
    assert "ImageType DERIVED\\SECONDARY lacks ORIGINAL" in mip and "REPROJECTION" in mip
    assert "LOCALIZER" in verdicts[uids["localizer"]].text and "lacks AXIAL" in verdicts[uids["localizer"]].text
    thick = verdicts[uids["ct_thick"]].text
    assert thick.startswith("ignored because CT #2") and "SliceThickness closest to the PET's 3 mm" in thick
    # The order of the files does not matter.
    again = select_inputs(
        series_from_paths(reversed(scanner_study.all_files()))[0][scanner_study.study.study_instance_uid], ["CT", "PET"]
    )
    assert {c: s.series_uid for c, s in again.chosen.items()} == {"PET": uids["pet"], "CT": uids["ct"]}


def test_thinner_ct_is_not_preferred_when_the_pet_is_thick(scanner_study):
    """The rule is the thickness closest to the PET's, not the thinnest."""
    studies, _ = series_from_paths(scanner_study.all_files())
    series = studies[scanner_study.study.study_instance_uid]
    for s in series:
        if s.series_uid == scanner_study.uids["pet"]:
            s.instances = [dataclasses.replace(i, slice_thickness=5.0) for i in s.instances]
    selection = select_inputs(series, ["CT", "PET"])
    assert selection.chosen["CT"].series_uid == scanner_study.uids["ct_thick"]


def _facts(scanner_study, name):
    return [read_facts(p) for p in scanner_study.files[name]]


def test_pet_rules_dynamic_duplicates_and_too_many(scanner_study):
    pet = _facts(scanner_study, "pet")
    ct = _facts(scanner_study, "ct")
    dynamic = [dataclasses.replace(i, series_type=("DYNAMIC", "IMAGE"), time_frames=4) for i in pet]
    selection = select_inputs(group_series(dynamic + ct), ["CT", "PET"])
    [verdict] = [v for v in selection.verdicts if v.modality == "PT"]
    assert "DYNAMIC" in verdict.text and "not static: 4" in verdict.text
    assert not selection.ready and selection.missing[0].startswith(
        "no PET series fits the model's PET input spec (PT #3"
    )
    duplicate = pet[:-1] + [dataclasses.replace(pet[-1], position=pet[0].position)]
    selection = select_inputs(group_series(duplicate + ct), ["CT", "PET"])
    assert "1 duplicate slice position(s)" in selection.verdicts[-1].text
    extra = pet + [
        dataclasses.replace(
            pet[-1], sop_instance_uid="1.2.3.4", position=(*pet[-1].position[:2], pet[-1].position[2] + 3.0)
        )
    ]
    selection = select_inputs(group_series(extra + ct), ["CT", "PET"])
    assert "65 instances but NumberOfSlices is 64" in selection.verdicts[-1].text
    # A spec without the static rule takes the dynamic series (config [models.inputs.pet]).
    spec = InputSpec(pet=PetInputSpec(static_only=False, excluded_series_types=["REPROJECTION"]))
    assert select_inputs(group_series(dynamic + ct), ["CT", "PET"], spec).ready


def test_ct_rules_gap_frame_of_reference_and_coverage(scanner_study):
    pet = _facts(scanner_study, "pet")
    ct = _facts(scanner_study, "ct")
    gap = ct[:20] + ct[21:]
    selection = select_inputs(group_series(pet + gap), ["CT", "PET"])
    ct_verdict = next(v for v in selection.verdicts if v.modality == "CT")
    assert "gap in slice positions" in ct_verdict.text and "1 slice(s) missing" in ct_verdict.text
    assert selection.missing[0].startswith("no CT series fits the model's CT input spec (CT #2")
    other_frame = [dataclasses.replace(i, frame_of_reference_uid="1.2.3") for i in ct]
    selection = select_inputs(group_series(pet + other_frame), ["CT", "PET"])
    assert "FrameOfReferenceUID 1.2.3 is not the PET's" in selection.verdicts[0].text
    short = ct[4:]
    selection = select_inputs(group_series(pet + short), ["CT", "PET"])
    assert "does not cover the PET's" in selection.verdicts[0].text
    # A PET-only model ignores every CT.
    selection = select_inputs(group_series(pet + ct), ["PET"])
    assert selection.ready and list(selection.chosen) == ["PET"]
    assert "modality CT is not an input of the model" in selection.verdicts[0].text


def test_deciding_a_study_of_500_instances_is_fast(scanner_study):
    files = scanner_study.all_files()
    paths = (files * (500 // len(files) + 1))[:500]
    started = time.perf_counter()
    studies, _ = series_from_paths(paths)  # cached: the same files were read by earlier tests
    select_inputs(studies[scanner_study.study.study_instance_uid], ["CT", "PET"])
    assert time.perf_counter() - started < 1.0


def test_pet_still_arriving_holds_the_job_back_then_runs(tmp_path: Path, scanner_study):
    config = node_config(tmp_path, node="study_quiet_seconds = 60")
    sessions = make_sessionmaker(config.database_url)
    t0 = utcnow() - timedelta(seconds=600)
    pet = scanner_study.files["pet"]
    early = [p for files in scanner_study.files.values() for p in files if p not in pet[50:]]
    index_files(sessions, early, at=t0)
    assert assembler.queue_ready_studies(sessions, config, now=t0 + timedelta(seconds=61)) == []
    assert assembler.queue_ready_studies(sessions, config, now=t0 + timedelta(seconds=90)) == []
    with sessions() as session:
        messages = list(session.scalars(select(Event.message).where(Event.kind == "incomplete")))
    assert len(messages) == 1  # said once
    assert (
        'PT #3 "PET AC synthetic", 50 instances has 50 of 64 instances (NumberOfSlices): still arriving' in messages[0]
    )

    t1 = t0 + timedelta(seconds=120)
    index_files(sessions, pet[50:], at=t1)
    assert assembler.queue_ready_studies(sessions, config, now=t1 + timedelta(seconds=30)) == []  # not quiet yet
    [job_id] = assembler.queue_ready_studies(sessions, config, now=t1 + timedelta(seconds=61))
    with sessions() as session:
        verdicts = list(
            session.scalars(select(Event.message).where(Event.job_id == job_id, Event.kind == "series-verdict"))
        )
        assert session.get(Job, job_id).run_number == 1
    assert len(verdicts) == 6
    assert any(scanner_study.uids["pet"] in m and "used for channel PET" in m for m in verdicts)
    assert any(scanner_study.uids["nac"] in m and "lacks ATTN" in m for m in verdicts)

    shown = CliRunner().invoke(app, ["jobs", "show", str(job_id), "--config", str(config.source), "--json"])
    assert shown.exit_code == 0, shown.output
    assert sum(1 for e in __import__("json").loads(shown.output)["timeline"] if e["event"] == "series-verdict") == 6


def test_input_spec_in_config(tmp_path: Path):
    from dicomnode.config import ConfigError, load_config

    from tests.support.nodeutil import write_config

    path = write_config(tmp_path, extra='[models.inputs.pet]\nstatic_only = false\ncorrected_image = ["ATTN"]\n')
    model = load_config(path).models[0]
    assert model.inputs.pet.static_only is False and model.inputs.pet.corrected_image == ["ATTN"]
    assert model.inputs.ct.excluded_image_types == ["LOCALIZER"]  # defaults kept
    path = write_config(tmp_path, extra="[models.inputs.pet]\nstatc_only = false\n")
    with pytest.raises(ConfigError, match=r"unknown key 'models\[0\]\.inputs\.pet\.statc_only'"):
        load_config(path)
