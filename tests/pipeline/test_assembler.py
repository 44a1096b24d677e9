from datetime import timedelta
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode.pipeline import assembler
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.index import ReceivedInstance, record_instance, series_of_study
from dicomnode.store.tables import Event, Job, Study, utcnow

from tests.support.nodeutil import node_config, selectable_instance, tiny_instance


def _tiny_series(
    folder: Path, study: str, series: str, modality: str, frame_of_reference: str, count: int = 4
) -> list[Path]:
    """Tiny CT or PET instances with the headers series selection looks at."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        ds = selectable_instance(study, series, i, modality, frame_of_reference, count)
        path = folder / f"{series}-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _receive(sessions, paths, at):
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        record_instance(
            sessions,
            ReceivedInstance(
                ds.StudyInstanceUID,
                ds.SeriesInstanceUID,
                ds.SOPInstanceUID,
                ds.SOPClassUID,
                "1.2.840.10008.1.2.1",
                ds.Modality,
                int(ds.SeriesNumber),
                "",
                str(path),
                "SCU",
            ),
            now=at,
        )


def _setup(tmp_path: Path):
    config = node_config(tmp_path, node="study_quiet_seconds = 60")
    return config, make_sessionmaker(config.database_url)


def test_quiet_complete_study_becomes_one_job(tmp_path: Path):
    config, sessions = _setup(tmp_path)
    t0 = utcnow() - timedelta(seconds=300)
    frame = generate_uid()
    _receive(sessions, _tiny_series(tmp_path / "in", "1.9", "1.9.1", "CT", frame), t0)
    _receive(sessions, _tiny_series(tmp_path / "in", "1.9", "1.9.2", "PT", frame), t0)
    # still within quiet time
    assert assembler.queue_ready_studies(sessions, config, now=t0 + timedelta(seconds=30)) == []
    created = assembler.queue_ready_studies(sessions, config, now=t0 + timedelta(seconds=61))
    assert len(created) == 1
    assert assembler.queue_ready_studies(sessions, config, now=t0 + timedelta(seconds=120)) == []  # no duplicate
    with sessions() as session:
        job = session.get(Job, created[0])
        assert (job.study_uid, job.model, job.run_number) == ("1.9", "demo-petct", 1)
        assert [s.modality for s in series_of_study(session, "1.9")] == ["CT", "PT"]
        verdicts = list(
            session.scalars(select(Event.message).where(Event.job_id == job.id, Event.kind == "series-verdict"))
        )
    assert [v.split(" [")[0] for v in verdicts] == [
        "CT #1, 4 instances: used for channel CT",
        "PT #2, 4 instances: used for channel PET",
    ]


def test_late_arrival_retriggers_a_new_run(tmp_path: Path):
    config, sessions = _setup(tmp_path)
    t0 = utcnow() - timedelta(seconds=300)
    frame = generate_uid()
    _receive(sessions, _tiny_series(tmp_path / "in", "1.9", "1.9.1", "CT", frame), t0)
    _receive(sessions, _tiny_series(tmp_path / "in", "1.9", "1.9.2", "PT", frame), t0)
    [first] = assembler.queue_ready_studies(sessions, config, now=t0 + timedelta(seconds=61))
    with sessions.begin() as session:
        session.get(Job, first).state = "succeeded"
    late = utcnow() + timedelta(seconds=1)
    _receive(sessions, _tiny_series(tmp_path / "in", "1.9", "1.9.3", "CT", frame), late)  # a second CT
    assert assembler.queue_ready_studies(sessions, config, now=late + timedelta(seconds=10)) == []  # not quiet yet
    [second] = assembler.queue_ready_studies(sessions, config, now=late + timedelta(seconds=61))
    with sessions() as session:
        assert session.get(Job, second).run_number == 2


def test_incomplete_study_is_explained_once(tmp_path: Path):
    config, sessions = _setup(tmp_path)
    t0 = utcnow() - timedelta(seconds=300)
    _receive(sessions, _tiny_series(tmp_path / "in", "1.8", "1.8.1", "CT", generate_uid()), t0)
    assert assembler.queue_ready_studies(sessions, config, now=t0 + timedelta(seconds=61)) == []
    assert assembler.queue_ready_studies(sessions, config, now=t0 + timedelta(seconds=90)) == []
    with sessions() as session:
        messages = list(session.scalars(select(Event.message).where(Event.kind == "incomplete")))
    assert messages == ["model demo-petct needs PT: not present"]


def test_inconsistent_late_instance_holds_the_new_run_back(tmp_path: Path):
    """A PET instance beyond NumberOfSlices makes the PET unusable: no run 2, and the reason is said."""
    config, sessions = _setup(tmp_path)
    t0 = utcnow() - timedelta(seconds=300)
    frame = generate_uid()
    _receive(sessions, _tiny_series(tmp_path / "in", "1.7", "1.7.1", "CT", frame), t0)
    pet = _tiny_series(tmp_path / "in", "1.7", "1.7.2", "PT", frame)
    _receive(sessions, pet, t0)
    [first] = assembler.queue_ready_studies(sessions, config, now=t0 + timedelta(seconds=61))
    with sessions.begin() as session:
        session.get(Job, first).state = "succeeded"
    extra = tiny_instance("1.7", "1.7.2", 9, "PT")
    extra.FrameOfReferenceUID = frame
    extra.save_as(tmp_path / "extra.dcm", enforce_file_format=True)
    late = utcnow() + timedelta(seconds=1)
    _receive(sessions, [tmp_path / "extra.dcm"], late)
    assert assembler.queue_ready_studies(sessions, config, now=late + timedelta(seconds=61)) == []
    with sessions() as session:
        [message] = session.scalars(select(Event.message).where(Event.kind == "incomplete"))
    assert message.startswith("model demo-petct: no PET series fits the model's PET input spec (PT #2, 5 instances: ")
    assert "5 instances but NumberOfSlices is 4" in message


def test_a_study_sent_again_after_its_job_makes_no_second_run(tmp_path: Path):
    """A sender that sends the whole study again (a response it lost, an outage it recovered
    from) sends nothing new: the study is not a candidate again, no run 2, no second SEG."""
    config, sessions = _setup(tmp_path)
    t0 = utcnow() - timedelta(seconds=300)
    frame = generate_uid()
    files = _tiny_series(tmp_path / "in", "1.6", "1.6.1", "CT", frame) + _tiny_series(
        tmp_path / "in", "1.6", "1.6.2", "PT", frame
    )
    _receive(sessions, files, t0)
    [first] = assembler.queue_ready_studies(sessions, config, now=t0 + timedelta(seconds=61))
    resent = utcnow()
    _receive(sessions, files, resent)  # every instance again, after the job was queued
    assert assembler.queue_ready_studies(sessions, config, now=resent + timedelta(seconds=61)) == []
    with sessions() as session:
        study = session.get(Study, "1.6")
        assert study.instances_received == len(files) and study.last_received_at < resent
        assert [j.run_number for j in session.scalars(select(Job))] == [1]


def _stored_only(folder: Path, study: str, sop_class: str, modality: str, sop_uid: str | None = None) -> Path:
    """One instance of a class no model reads (a dose report, the node's own SEG sent back)."""
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid or generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.Modality, ds.SeriesNumber = modality, 99
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.save_as(path, enforce_file_format=True)
    return path


def _receive_stored_only(sessions, path: Path, at) -> None:
    ds = pydicom.dcmread(path)
    record_instance(sessions, ReceivedInstance(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1",
        ds.Modality, 99, "", str(path), "PACS", counts_as_arrival=False), now=at)


def test_objects_no_model_reads_and_the_nodes_own_results_never_start_a_job(tmp_path: Path):
    """A dose report and the node's own SEG, routed back by the PACS after the job, are indexed but
    start no run; the next run (a real late CT) names them in its verdicts."""
    from dicomnode.store.tables import Delivery, DeliveryState

    config, sessions = _setup(tmp_path)
    t0 = utcnow() - timedelta(seconds=1000)
    frame = generate_uid()
    _receive(sessions, _tiny_series(tmp_path / "in", "1.7", "1.7.1", "CT", frame), t0)
    _receive(sessions, _tiny_series(tmp_path / "in", "1.7", "1.7.2", "PT", frame), t0)
    [first] = assembler.queue_ready_studies(sessions, config, now=t0 + timedelta(seconds=61))
    seg_uid = generate_uid()
    with sessions.begin() as session:  # the job ran; its SEG, as delivery planned and sent it
        session.get(Job, first).state = "succeeded"
        session.add(Delivery(job_id=first, destination="pacs", path="seg.dcm", sop_instance_uid=seg_uid,
                             sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4", state=DeliveryState.SENT,
                             not_before=t0, created_at=t0, updated_at=t0))
    at = utcnow() + timedelta(seconds=1)  # after the job: were it an arrival, it would make a new run
    _receive_stored_only(sessions, _stored_only(tmp_path / "back", "1.7", "1.2.840.10008.5.1.4.1.1.66.4", "SEG",
                                                seg_uid), at)
    _receive_stored_only(sessions, _stored_only(tmp_path / "back", "1.7", "1.2.840.10008.5.1.4.1.1.88.67", "SR"), at)
    with sessions() as session:
        study = session.get(Study, "1.7")
        assert study.last_received_at == t0 and study.instances_received == 10
    assert assembler.queue_ready_studies(sessions, config, now=at + timedelta(seconds=300)) == []
    late = _tiny_series(tmp_path / "late", "1.7", "1.7.1", "CT", frame, count=5)[4:]
    _receive(sessions, late, at + timedelta(seconds=300))  # a real late arrival: the fifth CT slice
    [second] = assembler.queue_ready_studies(sessions, config, now=at + timedelta(seconds=400))
    with sessions() as session:
        verdicts = list(session.scalars(
            select(Event.message).where(Event.job_id == second, Event.kind == "series-verdict")))
    assert len(verdicts) == 4
    assert any(f"a result of this node (job {first}, Segmentation Storage) sent back: not an input of any model"
               in v for v in verdicts)
    assert any("not an input of any model: X-Ray Radiation Dose SR Storage is stored, not read" in v for v in verdicts)


def test_two_sweeps_at_once_queue_one_job(tmp_path: Path, monkeypatch):
    """The scheduler's sweep and the start-up sweep may overlap on a slow start (the soak found a
    study with two run-1 jobs, two SEGs): both paused where a sweep has decided that a study needs
    a job and not yet queued it; only one may get there."""
    import threading

    config, sessions = _setup(tmp_path)
    t0 = utcnow() - timedelta(seconds=300)
    frame = generate_uid()
    _receive(sessions, _tiny_series(tmp_path / "in", "1.8", "1.8.1", "CT", frame), t0)
    _receive(sessions, _tiny_series(tmp_path / "in", "1.8", "1.8.2", "PT", frame), t0)
    both_deciding = threading.Barrier(2)
    select_inputs = assembler.select_inputs

    def decide_together(*args, **kwargs):
        try:  # wait (at most 2 s) for the other sweep to reach the same point
            both_deciding.wait(timeout=2)
        except threading.BrokenBarrierError:
            pass
        return select_inputs(*args, **kwargs)

    monkeypatch.setattr(assembler, "select_inputs", decide_together)
    created: list[list[int]] = []
    sweeps = [threading.Thread(target=lambda: created.append(assembler.queue_ready_studies(sessions, config)))
              for _ in range(2)]
    for sweep in sweeps:
        sweep.start()
    for sweep in sweeps:
        sweep.join(30)
    with sessions() as session:
        jobs = list(session.scalars(select(Job).where(Job.study_uid == "1.8")))
    assert len(jobs) == 1 and sorted(len(c) for c in created) == [0, 1]
