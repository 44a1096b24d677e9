"""[models.compare] in-process on the real demo model (no network: a node without destinations):
a baseline's job keeps its time point; the follow-up of the same patient finds it, compares with it,
and says so in its timeline and measures.json; the liver from a chained model (organs-ct) waited for
on the same study; a chained model that is not configured leaves the liver not assessed and the
comparison goes on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from dicomnode.imaging.timepoint import TIMEPOINT_FILE, TimePoint, VolumeGeometry
from dicomnode.pipeline import assembler
from dicomnode.pipeline.worker import Worker
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.events import EventKind, event_data
from dicomnode.store.tables import Event, Job, TimePointRow
from dicomnode.synth import petct_phantom as ph
from dicomnode.synth.timeline import grid_geometry

from tests.support.nodeutil import REPO, node_config
from tests.support.selectionutil import index_files
from tests.support.timeline import patient_timeline, study_date, timeline_files

MODEL = REPO / "models" / "demo-petct"
ORGANS = REPO / "models" / "organs-ct"
pytestmark = pytest.mark.skipif(not (MODEL / "plans.json").exists(), reason="demo model not built")

ORGANS_MODEL = f"""
[[models]]
name = "organs-ct"
path = "{ORGANS}"
folds = [0]
device = "cpu"
use_mirroring = false
channels = ["CT"]
"""


def _setup(tmp_path: Path, compare: str = "", more_models: str = ""):
    config = node_config(tmp_path, model_path=str(MODEL), node="study_quiet_seconds = 0\nretry_backoff_seconds = 60",
                         extra=f"[models.compare]\nmax_age_days = 365\n{compare}\n{more_models}")
    return config, make_sessionmaker(config.database_url)


def _run_all(worker: Worker) -> int:
    ran = 0
    while worker.run_one():
        ran += 1
        assert ran < 12, "the jobs keep running"
    return ran


def _events(sessions, job_id: int) -> list[Event]:
    with sessions() as session:
        return list(session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id)))


def _job(sessions, study_uid: str, model: str = "demo-petct") -> Job:
    with sessions() as session:
        return session.scalar(select(Job).where(Job.study_uid == study_uid, Job.model == model))


@pytest.fixture(scope="module")
def loaded():
    """The models loaded once for the module (as the worker keeps them)."""
    return {}


def _worker(config, sessions, loaded: dict) -> Worker:
    worker = Worker(config, sessions)
    for name in [m.name for m in config.models]:
        if name in loaded:
            worker.models._models[name] = loaded[name]
        else:
            loaded[name] = worker.models.get(name)
    return worker


@pytest.fixture(scope="module")
def timeline(tmp_path_factory):
    return patient_timeline(tmp_path_factory.mktemp("timeline"), patient_id="FOLLOW-1")


def test_the_follow_up_is_compared_with_the_baseline_the_node_processed(tmp_path, timeline, loaded):
    baseline, follow_up, _ = timeline
    config, sessions = _setup(tmp_path)
    worker = _worker(config, sessions, loaded)
    index_files(sessions, timeline_files(baseline))
    [first] = assembler.queue_ready_studies(sessions, config)
    assert _run_all(worker) == 1
    with sessions() as session:
        row = session.get(TimePointRow, first)
    assert (row.patient_id, row.study_uid, row.modalities) == ("FOLLOW-1", baseline.study_instance_uid, "CT/PT")
    kept = TimePoint.load(Path(row.path))
    assert Path(row.path).name == TIMEPOINT_FILE and kept.study_uid == baseline.study_instance_uid
    assert kept.suv.shape == kept.labels.shape == (64, 64, 64) and kept.ct.shape == (64, 128, 128)
    assert (kept.patient.weight_kg, kept.patient.height_m) == (75.0, 1.75)
    assert kept.geometry.spacing[2] == pytest.approx(3.0) and kept.ct_geometry.spacing[0] == pytest.approx(2.04)
    assert kept.labels.any() and float(kept.suv[kept.labels > 0].max()) > 3.0  # the lesions, hot
    first_kinds = [e.kind for e in _events(sessions, first)]
    assert "no-compare-prior" in first_kinds and "compared" not in first_kinds  # nothing earlier

    index_files(sessions, timeline_files(follow_up))
    [second] = assembler.queue_ready_studies(sessions, config)
    assert _run_all(worker) == 1
    events = _events(sessions, second)
    [chosen] = [e for e in events if e.kind == EventKind.COMPARE_PRIOR]
    assert event_data(chosen) == {"study_uid": baseline.study_instance_uid, "study_date": study_date(baseline),
                                  "job_id": first, "how": "already processed"}
    [compared] = [e for e in events if e.kind == EventKind.COMPARED]
    kinds = [e.kind for e in events]
    assert kinds.index("compare-prior") < kinds.index("inference-done") < kinds.index("compared")
    data = event_data(compared)
    assert data["prior_study_uid"] == baseline.study_instance_uid and data["lines"]
    # the "mixed" timeline's truth: one lesion shrinking and one unchanged (matched), one gone, one new
    statuses = sorted(row["status"] for row in data["comparison"]["lesions"])
    assert statuses == ["matched", "matched", "new", "resolved"], data["lines"]
    response = data["comparison"]["response"]  # no liver model chained here: no liver reference
    assert response["abbreviation"] == "NA" and "no liver reference" in response["reason"], data["lines"]
    job = _job(sessions, follow_up.study_instance_uid)
    measures = json.loads((config.results_dir / follow_up.study_instance_uid / f"job-{job.id}" / "measures.json")
                          .read_text())
    assert measures["comparison"] == data["comparison"] and measures["lesion_count"] >= 1
    assert job.state == "succeeded"
    # the preview: the follow-up's MIP beside its prior's (the baseline, compared with nothing, has none)
    from PIL import Image

    with Image.open(config.results_dir / follow_up.study_instance_uid / f"job-{job.id}" / "preview.png") as png:
        assert png.width > png.height  # two coronal panels side by side
    assert not (config.results_dir / baseline.study_instance_uid / f"job-{first}" / "preview.png").exists()


def test_the_liver_comes_from_the_chained_model_on_the_same_study(tmp_path, timeline, loaded):
    """demo-petct waits for organs-ct on the study (its job first in the queue), is woken when it
    ends, and keeps organs-ct's liver on its own grid (PET) in its time point. The follow-up, with
    its own organs-ct liver, gets a PERCIST category: the stand-in's ragged livers (holes, fragments)
    still hold the 3 cm sphere once regularised (imaging/liver_reference)."""
    if not (ORGANS / "label_codes.json").exists():
        pytest.skip("organs-ct not built")
    baseline, _, _ = timeline
    config, sessions = _setup(tmp_path, 'liver_from = "organs-ct"\nliver_label = "liver"', ORGANS_MODEL)
    worker = _worker(config, sessions, loaded)
    index_files(sessions, timeline_files(baseline))
    ours, theirs = assembler.queue_ready_studies(sessions, config)
    assert worker.run_one()  # demo-petct first: it waits
    with sessions() as session:
        assert session.get(Job, ours).state == "queued" and session.get(Job, ours).attempts == 0
        assert "waiting for organs-ct on this study" in session.get(Job, ours).error
    assert _run_all(worker) == 2  # organs-ct, then demo-petct woken at once (its backoff is 60 s)
    events = _events(sessions, ours)
    kinds = [e.kind for e in events]
    assert kinds.count("waiting") == 1 and "woken" in kinds
    [used] = [e for e in events if e.kind == EventKind.LABELS_FROM_MODEL]
    assert event_data(used)["job_id"] == theirs
    with sessions() as session:
        kept = TimePoint.load(Path(session.get(TimePointRow, ours).path))
        organs = config.results_dir / baseline.study_instance_uid / f"job-{theirs}" / "labels.npz"
    assert kept.liver is not None and kept.liver.shape == kept.suv.shape
    # organs-ct's liver (label 5 in its label_codes.json) sampled at the PET voxel centres, by hand
    with np.load(organs) as data:
        liver_ct = data["labels"] == 5
        ct_grid = VolumeGeometry(tuple(data["origin"]), tuple(data["spacing"][::-1]), tuple(data["direction"]))
    index = np.indices(kept.suv.shape).reshape(3, -1).T
    at = np.rint(ct_grid.point_to_index(kept.geometry.index_to_point(index))).astype(int)
    inside = np.all((at >= 0) & (at < np.array(liver_ct.shape)), axis=1)
    sampled = np.zeros(len(at), dtype=bool)
    sampled[inside] = liver_ct[tuple(at[inside].T)]
    assert sampled.any() and (sampled.reshape(kept.suv.shape) == (kept.liver > 0)).mean() > 0.995
    truth = ph.liver_mask(ph.PET_GRID)  # the baseline lies as the phantom is described (no pose)
    assert ((kept.liver > 0) & truth).sum() > 0.5 * truth.sum()  # the stand-in organ model finds most of it

    _, follow_up, written = timeline
    index_files(sessions, timeline_files(follow_up))
    ours_now, theirs_now = assembler.queue_ready_studies(sessions, config)
    assert _run_all(worker) == 3  # demo-petct waits, organs-ct, demo-petct woken
    events = _events(sessions, ours_now)
    [used] = [e for e in events if e.kind == EventKind.LABELS_FROM_MODEL]
    assert event_data(used)["job_id"] == theirs_now
    [compared] = [e for e in events if e.kind == EventKind.COMPARED]
    comparison = event_data(compared)["comparison"]
    truth_sul = ph.LIVER_SUV * comparison["current"]["uptake_factor"]  # 2.0 SUVbw x LBM/W = 1.549 SUL
    for when, study in (("prior", baseline), ("current", follow_up)):
        liver = comparison[when]["liver"]
        assert liver["assessed"], (when, liver["reason"])
        assert liver["mean"] == pytest.approx(truth_sul, rel=0.05), when
        # the sphere's centre in that study's true liver (the follow-up lies elsewhere: its pose)
        mask = written.timeline.liver_mask("before" if when == "prior" else "after").astype(bool)
        centre = np.rint(grid_geometry(ph.PET_GRID).point_to_index(np.array([liver["centre_mm"]]))[0]).astype(int)
        assert mask[tuple(centre)], when
    response = comparison["response"]  # the "mixed" timeline: a new FDG-avid lesion
    assert response["abbreviation"] == "PMD" and response["new_avid_lesions"] >= 1, event_data(compared)["lines"]


def test_a_chained_model_not_configured_leaves_the_liver_not_assessed(tmp_path, timeline, loaded):
    baseline, _, _ = timeline
    config, sessions = _setup(tmp_path, 'liver_from = "organs-ct"')
    worker = _worker(config, sessions, loaded)
    index_files(sessions, timeline_files(baseline))
    [job_id] = assembler.queue_ready_studies(sessions, config)
    assert _run_all(worker) == 1
    [missing] = [e for e in _events(sessions, job_id) if e.kind == EventKind.NO_LABELS_FROM_MODEL]
    assert missing.message == "model organs-ct is not configured"
    with sessions() as session:
        assert session.get(Job, job_id).state == "succeeded"
        assert TimePoint.load(Path(session.get(TimePointRow, job_id).path)).liver is None
