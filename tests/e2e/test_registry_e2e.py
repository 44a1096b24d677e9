"""End to end, one node for the registry's three stand-in models: dcmtk storescu sends a glioma
MR study, a CT lymph node study and a CT organ study to a running node configured with all
three models; `[models.applies_to]` routes each study to its model (and to no other), the
worker runs it, and Orthanc receives a multi-label SEG (segment codes as configured, Dice per
label against the phantom's truth) and a TID 1500 SR of the segment volumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from dicomnode.synth.registry import write_registry_study
from dicomnode.testing.node import dice, start_node
from dicomnode.testing.orthanc import LocalOrthanc, orthanc_binary
from dicomnode.testing.ports import free_port

from tests.support.dicomtools import dciodvfy_errors
from tests.support.e2e import write_node_config

REPO = Path(__file__).resolve().parents[2]
MODELS = {"glioma-mr": REPO / "models" / "glioma-mr", "lymph-ct": REPO / "models" / "lymph-ct",
          "organs-ct": REPO / "models" / "organs-ct"}
STUDIES = {"glioma": "glioma-mr", "lymph": "lymph-ct", "organs": "organs-ct"}  # study kind -> the model it gets
GRID_SERIES = {"glioma": "t1_mprage_tra_post_gd", "lymph": "Abdomen 2.0 Br40 venous",
               "organs": "Abdomen 3.0 Br40 portal venous"}
MIN_DICE = 0.6
SEG_TIMEOUT = 400

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(orthanc_binary() is None, reason="Debian package orthanc not installed"),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed"),
]
BUILT = {name for name, folder in MODELS.items() if any(folder.rglob("checkpoint_final.pth"))}
KINDS = [kind for kind, model in STUDIES.items() if model in BUILT]  # studies whose model is in the repo


def _needs_model(kind: str):  # noqa: ANN202
    return pytest.param(
        kind,
        marks=pytest.mark.skipif(
            STUDIES[kind] not in BUILT, reason=f"models/{STUDIES[kind]} not built (make registry-models)"
        ),
    )


GLIOMA_CODES = {  # config inline codes: the glioma-mr folder has no label_codes.json
    1: ("necrosis", "6574001", "Necrosis"),
    2: ("oedema", "79654002", "Edema"),
    3: ("enhancing_tumour", "108369006", "Neoplasm"),
}


def _folds(model_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.removeprefix("fold_")) for p in model_dir.rglob("fold_*/checkpoint_final.pth"))


def _ct_model(name: str, common: str, study_descriptions: list[str]) -> str:
    """A CT-only `[[models]]` entry applying to studies with these StudyDescription patterns."""
    return f"""
[[models]]
name = "{name}"
path = "{MODELS[name]}"
folds = {_folds(MODELS[name])}
{common}
channels = ["CT"]
[models.applies_to]
tags = {{ StudyDescription = {json.dumps(study_descriptions)} }}
"""


def _config(folder: Path, pacs: LocalOrthanc, port: int) -> Path:
    glioma_codes = "\n".join(
        f'[models.label_codes.{v}]\nname = "{name}"\ncategory = ["49755003", "SCT", "Morphologically Abnormal '
        f'Structure"]\n'
        f'type = ["{code}", "SCT", "{meaning}"]'
        for v, (name, code, meaning) in GLIOMA_CODES.items()
    )
    common = 'device = "cpu"\nuse_mirroring = false'
    models = {
        "glioma-mr": f"""
[[models]]
name = "glioma-mr"
path = "{MODELS["glioma-mr"]}"
folds = {_folds(MODELS["glioma-mr"])}
{common}
channels = ["FLAIR", "T1", "T1CE", "T2"]
grid = "T1CE"
[models.inputs.FLAIR]
series_description = ["*flair*"]
[models.inputs.T1]
series_description = ["t1*"]
exclude_series_description = ["*post*", "*+c*", "*gd*"]
[models.inputs.T1CE]
series_description = ["t1*post*", "t1*+c*", "t1*gd*"]
[models.inputs.T2]
series_description = ["t2*"]
exclude_series_description = ["*flair*"]
[models.applies_to]
modalities = ["MR"]
tags = {{ StudyDescription = ["*brain*", "*head*"] }}
{glioma_codes}
""",
        "lymph-ct": _ct_model("lymph-ct", common, ["*staging*"]),
        "organs-ct": _ct_model("organs-ct", common, ["*volumetry*", "*organ*"]),
    }
    return write_node_config(
        folder, pacs, port, node="max_attempts = 1", models="".join(models[name] for name in sorted(BUILT))
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Orthanc, a node with the three models, and the three studies sent with storescu."""
    work = tmp_path_factory.mktemp("registry")
    studies = {kind: write_registry_study(work / kind, kind, seed=1000) for kind in KINDS}
    port = free_port()
    pacs = LocalOrthanc(work / "orthanc")
    pacs.start()
    node = None
    try:
        node = start_node(_config(work, pacs, port), port, work / "node.log")
        for study in studies.values():
            sent = subprocess.run(
                [
                    "storescu",
                    "-aet",
                    "STORESCU",
                    "-aec",
                    "DICOMNODE",
                    "+sd",
                    "+r",
                    "+sp",
                    "*.dcm",
                    "127.0.0.1",
                    str(port),
                    str(study.root),
                ],
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
            assert sent.returncode == 0, sent.stderr
        yield pacs, node, work, studies
    finally:
        if node is not None:
            code = node.stop()
            print((work / "node.log").read_text()[-6000:])
            assert code == 0, f"node exited with {code} on SIGTERM"
        pacs.stop()


def _download(pacs: LocalOrthanc, node, study, modality: str, work: Path) -> Path:
    """The study's `modality` object from Orthanc; fails at once, with the job's error, when the
    study's job has failed instead of waiting out the timeout."""
    deadline = time.monotonic() + SEG_TIMEOUT
    while True:
        try:
            [instance] = pacs.wait_for_series(study.study_instance_uid, modality, timeout=5)["Instances"]
            return pacs.download_instance(instance, work / f"{study.kind}-{modality}.dcm")
        except TimeoutError:
            try:
                jobs = json.loads(node.cli("jobs", "list", "--study", study.study_instance_uid, "--json").stdout)
            except subprocess.TimeoutExpired:  # the CLI stalled on a loaded machine: poll on until the deadline
                jobs = []
            failed = [f"{j['model']}: {j['error']}" for j in jobs if j["state"] == "failed"]
            if failed or time.monotonic() > deadline:
                pytest.fail(f"{study.kind}: no {modality} in Orthanc; jobs {failed or jobs}")


def _expected_codes(kind: str) -> dict[int, tuple[str, str, str]]:
    """Label value -> (segment label, type code value, category code value), as configured."""
    if kind == "glioma":
        return {v: (name, code, "49755003") for v, (name, code, _) in GLIOMA_CODES.items()}
    if kind == "lymph":  # a binary model without label_codes.json: the lesion codes, named as dataset.json names it
        return {1: ("lymph_node", "108369006", "49755003")}
    table = json.loads((MODELS["organs-ct"] / "label_codes.json").read_text())
    return {int(v): (c["name"], c["type"][0], c["category"][0]) for v, c in table.items()}


@pytest.mark.parametrize("kind", [_needs_model(kind) for kind in STUDIES])
def test_study_gets_a_multilabel_seg_from_its_model(run, kind):
    pacs, node, work, studies = run
    study = studies[kind]
    seg_path = _download(pacs, node, study, "SEG", work)
    assert dciodvfy_errors(seg_path) == []
    seg = hd.seg.segread(seg_path)
    grid_files = study.files[GRID_SERIES[kind]]
    assert seg.StudyInstanceUID == study.study_instance_uid and seg.FrameOfReferenceUID == study.frame_of_reference_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series[GRID_SERIES[kind]]
    position = sorted(BUILT).index(STUDIES[kind])  # models are configured in this order
    assert seg.SeriesNumber == 901 + 1000 * position  # run 1 of the model: no clash with another model's

    expected = _expected_codes(kind)
    assert len(seg.SegmentSequence) == len(expected)
    for number, (value, (name, type_code, category_code)) in enumerate(sorted(expected.items()), start=1):
        item = seg.get_segment_description(number)
        assert (item.segment_label, item.segmented_property_type.value, item.segmented_property_category.value) == (
            name,
            type_code,
            category_code,
        )

    sources = sorted(
        (dcmread(p, stop_before_pixels=True) for p in grid_files), key=lambda d: float(d.ImagePositionPatient[2])
    )
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in sources], assert_missing_frames_are_empty=True
    )
    scores = {
        expected[v][0]: dice(pixels[..., n - 1], study.case.labels == v)
        for n, v in enumerate(sorted(expected), start=1)
    }
    print(f"{kind}: Dice per label {', '.join(f'{k} {s:.3f}' for k, s in scores.items())}")
    assert min(scores.values()) > MIN_DICE, scores

    sr_path = _download(pacs, node, study, "SR", work)
    assert dciodvfy_errors(sr_path) == []
    assert dcmread(sr_path, stop_before_pixels=True).SeriesNumber == 902 + 1000 * position
    groups = hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()
    voxel_ml = (
        float(
            np.prod(
                [
                    float(v)
                    for v in (
                        *sources[0].PixelSpacing,
                        sources[1].ImagePositionPatient[2] - sources[0].ImagePositionPatient[2],
                    )
                ]
            )
        )
        / 1000.0
    )
    for number, group in enumerate(groups, start=1):
        [volume] = [m for m in group.get_measurements() if m.name.value == "118565006"]
        assert volume.value == pytest.approx(pixels[..., number - 1].sum() * voxel_ml, rel=1e-4)


def test_each_study_went_to_its_model_only(run):
    pacs, node, work, studies = run
    for study in studies.values():  # the SEGs have arrived once the parametrised test ran; wait anyway
        pacs.wait_for_series(study.study_instance_uid, "SEG", timeout=SEG_TIMEOUT)
    jobs = json.loads(node.cli("jobs", "list", "--json").stdout)
    routed = {(j["study"], j["model"]) for j in jobs}
    assert routed == {(studies[kind].study_instance_uid, model) for kind, model in STUDIES.items() if kind in KINDS}
    assert all(j["state"] == "succeeded" for j in jobs), jobs
