"""The receiver's group commit (dicomnode.store.index.IndexWriter): instances recorded from many
threads at once are all indexed, each answered as record_instance would answer it, and a batch
that fails costs only the instance that failed it."""

import threading
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode.store import index as index_module
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.index import IndexWriter, ReceivedInstance
from dicomnode.store.tables import Event, Instance, Series, Study


def _item(study: str, series: str, sop: str, path: str = "/spool/x.dcm") -> ReceivedInstance:
    return ReceivedInstance(study, series, sop, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "CT", 1, "CT",
                            path, "TEST")


def test_many_threads_are_indexed_with_their_answers(tmp_path: Path):
    sessions = make_sessionmaker(f"sqlite:///{tmp_path / 'db.sqlite'}")
    writer = IndexWriter(sessions)
    study, series = generate_uid(), generate_uid()
    items = [_item(study, series, generate_uid()) for _ in range(40)]
    answers: dict[str, list[bool]] = {}
    start = threading.Barrier(8)

    def send(chunk: list[ReceivedInstance]) -> None:
        start.wait()
        for item in chunk:
            answers.setdefault(item.sop_instance_uid, []).append(writer.record(item, tmp_path))
            answers[item.sop_instance_uid].append(writer.record(item, tmp_path))  # a resend: no news

    threads = [threading.Thread(target=send, args=(items[k::8],)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == {item.sop_instance_uid: [True, False] for item in items}
    with sessions() as session:
        assert set(session.scalars(select(Instance.sop_instance_uid))) == {i.sop_instance_uid for i in items}
        assert session.get(Study, study).instances_received == 40
        assert session.get(Series, series).modality == "CT"
        assert len(session.scalars(select(Event).where(Event.study_uid == study)).all()) == 1


def test_a_failing_instance_fails_alone(tmp_path: Path, monkeypatch):
    sessions = make_sessionmaker(f"sqlite:///{tmp_path / 'db.sqlite'}")
    writer = IndexWriter(sessions)
    study, series = generate_uid(), generate_uid()
    bad_uid = generate_uid()
    real = index_module.add_instance

    def refuse_one(session, item, now):  # noqa: ANN001, ANN202
        if item.sop_instance_uid == bad_uid:
            raise RuntimeError("database refused it")
        return real(session, item, now)

    monkeypatch.setattr(index_module, "add_instance", refuse_one)
    good = [_item(study, series, generate_uid()) for _ in range(3)]
    gate = threading.Event()
    held = threading.Thread(target=lambda: writer.record(good[0]))  # the writer starts on it
    outcomes: dict[str, object] = {}

    def record(item: ReceivedInstance) -> None:
        gate.wait()
        try:
            outcomes[item.sop_instance_uid] = writer.record(item)
        except RuntimeError as exc:
            outcomes[item.sop_instance_uid] = str(exc)

    others = [threading.Thread(target=record, args=(item,)) for item in [*good[1:], _item(study, series, bad_uid)]]
    for thread in others:
        thread.start()
    held.start()
    gate.set()
    for thread in [held, *others]:
        thread.join()
    assert outcomes == {good[1].sop_instance_uid: True, good[2].sop_instance_uid: True,
                        bad_uid: "database refused it"}
    with sessions() as session:
        assert set(session.scalars(select(Instance.sop_instance_uid))) == {i.sop_instance_uid for i in good}


def _state(sessions) -> tuple:  # noqa: ANN001
    """The index as rows, times left out (they differ between two writers)."""
    with sessions() as session:
        return (sorted((i.sop_instance_uid, i.series_uid, i.study_uid, i.path)
                       for i in session.scalars(select(Instance))),
                sorted((s.series_uid, s.study_uid, s.modality) for s in session.scalars(select(Series))),
                sorted((s.study_uid, s.instances_received) for s in session.scalars(select(Study))),
                sorted((e.study_uid, e.kind, e.message) for e in session.scalars(select(Event))))


def test_the_deferred_writer_indexes_what_one_at_a_time_indexing_would(tmp_path: Path):
    """The receiver's writer (deferred): answered once the folder is fsynced, rows written in
    batches by its thread (add_instances); the index ends as record_instance one by one leaves it,
    resends, an instance moved to another series and a UID twice in one batch included."""
    deferred_db = make_sessionmaker(f"sqlite:///{tmp_path / 'deferred.sqlite'}")
    one_by_one = make_sessionmaker(f"sqlite:///{tmp_path / 'one.sqlite'}")
    writer = IndexWriter(deferred_db, deferred=True)
    studies = [(generate_uid(), generate_uid(), generate_uid()) for _ in range(3)]  # study, series, another series
    items = [_item(study, series, generate_uid(), f"/spool/{k}.dcm")
             for k in range(30) for study, series, _ in [studies[k % 3]]]
    resent = [_item(i.study_uid, i.series_uid, i.sop_instance_uid, "/spool/again.dcm") for i in items[:5]]
    moved = [_item(studies[0][0], studies[0][2], items[0].sop_instance_uid, "/spool/moved.dcm")]
    sequence = items + resent + moved + items[10:12]
    start = threading.Barrier(4)

    def send(chunk: list[ReceivedInstance]) -> None:
        start.wait()
        for item in chunk:
            assert writer.record(item, tmp_path) is None

    threads = [threading.Thread(target=send, args=(items[k::4],)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with writer._rows_changed:  # noqa: SLF001 - the rest in one batch: a resend, a move, a UID twice
        writer._rows.extend(resent + moved + items[10:12])  # noqa: SLF001
        writer._rows_changed.notify_all()  # noqa: SLF001
    assert writer.flush(30)
    writer.close()
    for item in sequence:
        index_module.record_instance(one_by_one, item)
    assert _state(deferred_db) == _state(one_by_one)
    with deferred_db() as session:
        assert session.get(Study, studies[0][0]).instances_received == 11  # 10, and the move
        assert session.get(Instance, items[0].sop_instance_uid).series_uid == studies[0][2]
