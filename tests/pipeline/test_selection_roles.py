"""Series selection per channel role: four MR series by SeriesDescription patterns among a
localizer and an ADC map, CT-only studies, and which models a study applies to."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dicomnode.config import ModelSettings, load_config
from dicomnode.imaging.headers import series_from_paths
from dicomnode.pipeline.selection import applies_to, select_inputs
from dicomnode.synth.registry import write_registry_study

from tests.support.nodeutil import write_config
from tests.test_config import MR_MODEL


@pytest.fixture(scope="module")
def glioma(tmp_path_factory):
    return write_registry_study(tmp_path_factory.mktemp("glioma"), "glioma", seed=1000)


@pytest.fixture(scope="module")
def lymph(tmp_path_factory):
    return write_registry_study(tmp_path_factory.mktemp("lymph"), "lymph", seed=1000)


@pytest.fixture(scope="module")
def mr_model(tmp_path_factory) -> ModelSettings:
    return load_config(write_config(tmp_path_factory.mktemp("config"), extra=MR_MODEL)).models[0]


def _series(study):
    studies, unreadable = series_from_paths(study.all_files)
    assert unreadable == [] and list(studies) == [study.study_instance_uid]
    return studies[study.study_instance_uid]


def _verdicts(selection):
    return {v.description: v for v in selection.verdicts}


def test_mr_channels_by_series_description(glioma, mr_model):
    selection = select_inputs(_series(glioma), mr_model.channels, mr_model.inputs, mr_model.grid)
    assert selection.ready, selection.problem
    chosen = {c: s.series_uid for c, s in selection.chosen.items()}
    assert chosen == {c: glioma.series[glioma.channel_series[c]] for c in ("FLAIR", "T1", "T1CE", "T2")}
    verdicts = _verdicts(selection)
    assert verdicts["t1_mprage_tra_post_gd"].text == "used for channel T1CE"  # not T1: "*post*" is excluded there
    adc = verdicts["ep2d_diff_tra_ADC"]
    assert adc.state == "ignored"
    assert adc.text == (
        'ignored because SeriesDescription "ep2d_diff_tra_ADC" fits no channel (FLAIR: matches none '
        "of *flair*; T1: matches none of *t1*; T1CE: matches none of *t1*post*; T2: matches none of *t2*)"
    )
    localizer = verdicts["localizer"]
    assert localizer.state == "ignored" and "ImageType is LOCALIZER" in localizer.text


def test_patterns_that_overlap_are_reported(glioma, mr_model):
    """A T1 pattern that also takes the post-contrast series: neither channel silently gets it."""
    t1 = mr_model.inputs.named("T1").model_copy(update={"exclude_series_description": []})
    inputs = mr_model.inputs.model_copy(update={"T1": t1})
    selection = select_inputs(_series(glioma), mr_model.channels, inputs, mr_model.grid)
    post = _verdicts(selection)["t1_mprage_tra_post_gd"]
    assert post.state == "ignored" and "fits channels T1 and T1CE" in post.text
    assert not selection.ready and any(m.startswith("no T1CE series fits") for m in selection.missing)
    assert selection.chosen["T1"].description == "t1_mprage_tra"


def test_other_frame_of_reference_is_skipped(glioma, mr_model):
    series = _series(glioma)
    t2 = next(s for s in series if s.description == "t2_tse_tra")
    t2.instances = [dataclasses.replace(i, frame_of_reference_uid="1.2.3.4") for i in t2.instances]
    selection = select_inputs(series, mr_model.channels, mr_model.inputs, mr_model.grid)
    assert "T2" not in selection.chosen and not selection.ready
    assert "FrameOfReferenceUID 1.2.3.4 is not the T1CE series's" in _verdicts(selection)["t2_tse_tra"].text


def test_missing_slice_is_a_gap(glioma, mr_model):
    series = _series(glioma)
    flair = next(s for s in series if s.description == "t2_flair_tra")
    flair.instances = sorted(flair.instances, key=lambda i: i.z)[:20] + sorted(flair.instances, key=lambda i: i.z)[21:]
    selection = select_inputs(series, mr_model.channels, mr_model.inputs, mr_model.grid)
    assert "FLAIR" not in selection.chosen
    text = _verdicts(selection)["t2_flair_tra"].text  # why not FLAIR, and why it is no other channel
    assert text.startswith("ignored because for channel FLAIR: gap in slice positions between z = ")
    assert "for channel T2: matches the excluded *flair*, gap in slice positions" in text
    assert "1 slice(s) missing" in selection.problem


def test_ct_only_study(lymph):
    selection = select_inputs(_series(lymph), ["CT"])
    assert selection.ready and selection.chosen["CT"].series_uid == lymph.series["Abdomen 2.0 Br40 venous"]
    topogram = _verdicts(selection)["Topogram 0.6 T20f"]
    assert topogram.state == "ignored" and "ImageType is LOCALIZER" in topogram.text
    # A PET/CT model on the same study: no PET, said so.
    petct = select_inputs(_series(lymph), ["CT", "PET"])
    assert not petct.ready and petct.missing == ["no PET series in the study"]


def test_applies_to_rules(glioma, lymph, mr_model, tmp_path: Path):
    assert applies_to(_series(glioma), mr_model) is None
    # The MR model does not apply to a CT study: no MR at all.
    assert "takes MR: none in the study" in applies_to(_series(lymph), mr_model)
    staging = load_config(
        write_config(
            tmp_path,
            extra='channels = ["CT"]\n[models.applies_to]\n'
            'modalities = ["CT"]\ntags = { StudyDescription = ["*staging*"] }',
        )
    ).models[0]
    assert applies_to(_series(lymph), staging) is None
    assert applies_to(_series(glioma), staging) == "model demo-petct applies to studies with CT: no CT"
    abdomen = staging.model_copy(
        update={
            "applies_to": staging.applies_to.model_copy(
                update={"tags": {"StudyDescription": ["*volumetry*"], "BodyPartExamined": ["abdomen"]}}
            )
        }
    )
    assert applies_to(_series(lymph), abdomen) == (
        'model demo-petct applies to StudyDescription *volumetry*: the study has "CT lymph node staging"'
    )
