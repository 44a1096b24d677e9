"""Per-destination outputs and the fallback, through the worker in-process on the synthetic
study (indexed as received) with pynetdicom Storage SCPs on loopback as destinations.

The job's result folder starts with the label map an earlier attempt saved after inference
(the synthetic truth as labels.npz): everything after the model runs for real (series
selection, SUV, measures, SEG / SR / RTSTRUCT / SC, deliveries), without the model's minutes
on CPU; inference into results is tested in test_worker.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from sqlalchemy import select

from dicomnode.pipeline import delivery
from dicomnode.pipeline.job import LABELS_FILE, result_dir
from dicomnode.pipeline.queue import RetryPolicy, enqueue, retry
from dicomnode.pipeline.worker import Worker
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Event, Job, JobState

from tests.support.dicomtools import dciodvfy_errors
from tests.support.nodeutil import REPO, node_config
from tests.support.selectionutil import index_files
from tests.support.storescp import StoreSCP

ALL = [SegmentationStorage, Comprehensive3DSRStorage, RTStructureSetStorage, SecondaryCaptureImageStorage]


def _destination(name: str, scp: StoreSCP, settings: str = "") -> str:
    return (
        f'[[destinations]]\nname = "{name}"\nae_title = "TESTSCP"\nhost = "127.0.0.1"\nport = {scp.port}\n{settings}\n'
    )


def _run_job(tmp_path: Path, synth_study, truth, destinations: str):
    """A job for the synthetic study whose model output an earlier attempt saved; run it once."""
    config = node_config(
        tmp_path,
        model_path=str(REPO / "models" / "demo-petct"),
        node="delivery_backoff_seconds = 0",
        extra='version = "test"\n' + destinations,
    )
    sessions = make_sessionmaker(config.database_url)
    index_files(sessions, synth_study.ct_files + synth_study.pt_files)
    job_id = enqueue(sessions, synth_study.study_instance_uid, "demo-petct", RetryPolicy())
    with sessions() as session:
        out = result_dir(config, session.get(Job, job_id))
    out.mkdir(parents=True)
    np.savez_compressed(out / LABELS_FILE, labels=truth.astype(np.uint8))
    worker = Worker(config, sessions)
    worker.models._models["demo-petct"] = object()  # labels saved: the model is never called
    assert worker.run_one()
    with sessions() as session:
        job = session.get(Job, job_id)
        events = [
            (e.kind, e.message) for e in session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id))
        ]
    return job, out, events, sessions


def _uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.mark.e2e
def test_each_destination_gets_its_outputs(tmp_path: Path, synth_study, truth, scp_factory):
    pacs, rt, viewer = scp_factory(ALL), scp_factory(ALL), scp_factory(ALL)
    job, out, events, sessions = _run_job(
        tmp_path,
        synth_study,
        truth,
        _destination("pacs", pacs)
        + _destination("rt", rt, 'outputs = ["RTSTRUCT"]')
        + _destination("viewer", viewer, 'outputs = ["SC", "SR"]'),
    )
    assert job.state == JobState.SUCCEEDED, job.error
    files = {name: out / name for name in ("seg.dcm", "sr.dcm", "rtstruct.dcm", "sc.dcm")}
    assert pacs.stored == [_uid(files["seg.dcm"]), _uid(files["sr.dcm"])]
    assert rt.stored == [_uid(files["rtstruct.dcm"])]
    assert viewer.stored == [_uid(files["sc.dcm"]), _uid(files["sr.dcm"])]
    for path in files.values():
        assert dciodvfy_errors(path) == [], path.name
    rtstruct = rt.received[_uid(files["rtstruct.dcm"])]
    assert [r.ROIName for r in rtstruct.StructureSetROISequence] == [f"lesion {n}" for n in range(1, 7)]
    assert ("labels-reused" in [kind for kind, _ in events]) and "inference-done" not in [kind for kind, _ in events]
    assert [(d.destination, Path(d.path).name, d.state) for d in delivery.of_job(sessions, job.id)] == [
        ("pacs", "seg.dcm", "sent"),
        ("pacs", "sr.dcm", "sent"),
        ("rt", "rtstruct.dcm", "sent"),
        ("viewer", "sc.dcm", "sent"),
        ("viewer", "sr.dcm", "sent"),
    ]


@pytest.mark.e2e
def test_only_the_objects_some_destination_needs_are_built(tmp_path: Path, synth_study, truth, scp_factory):
    pacs = scp_factory(ALL)
    job, out, _, _ = _run_job(tmp_path, synth_study, truth, _destination("pacs", pacs))
    assert job.state == JobState.SUCCEEDED, job.error
    assert sorted(p.name for p in out.iterdir()) == [LABELS_FILE, "measures.json", "seg.dcm", "sr.dcm"]


@pytest.mark.e2e
def test_seg_refused_sends_the_fallback_instead(tmp_path: Path, synth_study, truth, scp_factory):
    """A PACS without Segmentation Storage: the SEG's delivery fails for good with that reason and
    is replaced; the secondary capture arrives in the same pass; the job succeeds saying so."""
    pacs = scp_factory([Comprehensive3DSRStorage, SecondaryCaptureImageStorage])
    job, out, events, sessions = _run_job(tmp_path, synth_study, truth, _destination("pacs", pacs, 'fallback = "SC"'))
    assert job.state == JobState.SUCCEEDED, job.error
    assert pacs.stored == [_uid(out / "sr.dcm"), _uid(out / "sc.dcm")]
    rows = delivery.of_job(sessions, job.id)
    assert [(Path(d.path).name, d.state, d.attempts) for d in rows] == [
        ("seg.dcm", "replaced", 1),
        ("sr.dcm", "sent", 1),
        ("sc.dcm", "sent", 1),
    ]
    assert "SOP class rejected" in rows[0].last_error and "Segmentation Storage" in rows[0].last_error
    kinds = [kind for kind, _ in events]
    assert kinds.count("delivery-failed") == 1 and kinds.index("delivery-failed") < kinds.index("fallback-planned")
    [(_, succeeded)] = [e for e in events if e[0] == "succeeded"]
    assert "2 objects delivered" in succeeded and "replaced by the destination's fallback" in succeeded
    assert "seg.dcm" in succeeded and "SOP class rejected" in succeeded


@pytest.mark.e2e
def test_fallback_refused_too_fails_the_job(tmp_path: Path, synth_study, truth, scp_factory):
    pacs = scp_factory([Comprehensive3DSRStorage])
    job, out, _, sessions = _run_job(tmp_path, synth_study, truth, _destination("pacs", pacs, 'fallback = "SC"'))
    assert job.state == JobState.FAILED and "sc.dcm" in job.error and "Secondary Capture" in job.error
    assert [(Path(d.path).name, d.state) for d in delivery.of_job(sessions, job.id)] == [
        ("seg.dcm", "replaced"),
        ("sr.dcm", "sent"),
        ("sc.dcm", "failed"),
    ]


@pytest.mark.e2e
def test_fallback_added_later_is_built_from_the_saved_labels(tmp_path: Path, synth_study, truth, scp_factory):
    """The job failed (no Segmentation Storage, no fallback); the operator adds `fallback = "SC"`
    and retries: only the SC is built (no inference, the SEG keeps its UID), and sent instead."""
    pacs = scp_factory([Comprehensive3DSRStorage, SecondaryCaptureImageStorage])
    job, out, _, sessions = _run_job(tmp_path, synth_study, truth, _destination("pacs", pacs))
    assert job.state == JobState.FAILED and "Segmentation Storage" in job.error
    seg_uid, sr_uid = _uid(out / "seg.dcm"), _uid(out / "sr.dcm")
    config = node_config(
        tmp_path,
        model_path=str(REPO / "models" / "demo-petct"),
        node="delivery_backoff_seconds = 0",
        extra='version = "test"\n' + _destination("pacs", pacs, 'fallback = "SC"'),
    )
    assert retry(sessions, job.id)
    worker = Worker(config, sessions)
    worker.models._models["demo-petct"] = object()
    assert worker.run_one()
    with sessions() as session:
        job = session.get(Job, job.id)
        written = session.scalars(
            select(Event.message).where(Event.job_id == job.id, Event.kind == "results-written")
        ).all()
    assert job.state == JobState.SUCCEEDED, job.error
    assert (_uid(out / "seg.dcm"), _uid(out / "sr.dcm")) == (seg_uid, sr_uid)
    assert written[-1].startswith("SC ") and "SEG" not in written[-1]
    assert pacs.stored == [sr_uid, _uid(out / "sc.dcm")]


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            'outputs = ["SEG", "PDF"]',
            "key 'destinations[0].outputs[1]': Input should be 'SEG', 'SR', 'RTSTRUCT', 'SC' or 'STATUS'",
        ),
        ("outputs = []", "outputs must name at least one of SEG, SR, RTSTRUCT, SC"),
        ('outputs = ["SC"]\nfallback = "SC"', "fallback SC is already one of the outputs"),
        ('fallback = "SEG"', "key 'destinations[0].fallback': Input should be 'SC' or 'RTSTRUCT'"),
    ],
)
def test_outputs_and_fallback_are_checked_at_start(tmp_path: Path, settings: str, message: str):
    from dicomnode.config import ConfigError

    with pytest.raises(ConfigError) as refused:
        node_config(
            tmp_path,
            extra=f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n{settings}\n',
        )
    assert message in str(refused.value)
