"""Floods and hostile peers on a real receiver: 200 connections at once (silent ones, half a
PDU, and association requests from one AE beyond its limit) while dcmtk storescu sends a study;
then thousands of mutated data sets over real associations."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from dicomnode.imaging.headers import read_facts
from dicomnode.net.receiver import Receiver
from dicomnode.pipeline import assembler
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Event, Instance, utcnow

from tests.support.malformed import CASES, as_file, encode, send_raw, valid_pet, write_case
from tests.support.nodeutil import IndexedSessions, node_config, write_series

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed")]

TIMEOUT_S = 2.0


@pytest.fixture
def small_node(tmp_path: Path):
    config = node_config(tmp_path, node=f'allowed_calling_aets = ["FLOOD", "STORESCU", "FUZZ"]\n'
                                        f"max_associations = 8\nnetwork_timeout_seconds = {TIMEOUT_S}")
    sessions = make_sessionmaker(config.database_url)
    receiver = Receiver(config, sessions)
    receiver.start()
    yield config, IndexedSessions(sessions, receiver), receiver
    receiver.stop()


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except OSError:  # timed out: still open
        return False


def _a_associate_rq_start() -> bytes:
    """The first 10 bytes of an A-ASSOCIATE-RQ: PDU type, length, protocol version; the rest never comes."""
    return bytes([0x01, 0x00]) + (200).to_bytes(4, "big") + bytes([0x00, 0x01, 0x00, 0x00])


def test_a_flood_of_connections_leaves_room_for_a_well_behaved_sender(small_node, tmp_path: Path):
    config, sessions, receiver = small_node
    port = config.node.port
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    stalled = []
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(_a_associate_rq_start())
        stalled.append(sock)
    established, rejected, go = [], [], threading.Event()

    def flood() -> None:
        ae = AE(ae_title="FLOOD")
        ae.add_requested_context(Verification)
        go.wait()
        assoc = ae.associate("127.0.0.1", port, ae_title=config.node.ae_title)
        (established if assoc.is_established else rejected).append(assoc)

    threads = [threading.Thread(target=flood) for _ in range(50)]
    for thread in threads:
        thread.start()
    peak, sampling = [0], threading.Event()

    def sample() -> None:  # the most associations open at once, while the flood lasts
        while not sampling.wait(0.005):
            peak[0] = max(peak[0], int(receiver.counters.associations_open._value.get()))

    sampler = threading.Thread(target=sample)
    sampler.start()
    study = tmp_path / "study"
    write_series(study / "CT", generate_uid(), "CT", 32)
    go.set()  # 50 association requests from one AE, and storescu, at once
    started = time.monotonic()
    sent = subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", config.node.ae_title, "+sd", "+r", "127.0.0.1", str(port), str(study)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"},
    )
    took = time.monotonic() - started
    for thread in threads:
        thread.join(30)
    sampling.set()
    sampler.join()
    assert sent.returncode == 0, sent.stderr
    with sessions() as session:
        assert len(list(session.scalars(select(Instance)))) == 32
    limit = receiver.max_per_ae
    assert 0 < peak[0] <= limit + 1  # the flood's AE held at most its share; storescu had the rest
    # How many got in over the whole flood depends on how long it lasted (a silent admitted one is
    # dropped after the network timeout, and its slot taken by a later request): the bound is the peak.
    assert len(rejected) + len(established) == 50 and rejected and all(a.is_rejected for a in rejected)
    assert receiver.counters.associations_rejected.labels("association-limit")._value.get() == len(rejected)
    # Silent and stalled peers are dropped after the network timeout, freeing their slots.
    assert all(_closed_by_peer(s, TIMEOUT_S * 3 + 5) for s in silent + stalled)
    for assoc in established:  # an established association that says nothing is dropped too
        deadline = time.monotonic() + TIMEOUT_S * 3 + 5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not assoc.is_established
    print(f"storescu: 32 instances in {took:.1f} s beside 200 hostile connections; "
          f"{len(rejected)} flood associations rejected, {len(established)} admitted, at most {peak[0]} open at once")
    for sock in silent + stalled:
        sock.close()


def _mutations(seed: int, count: int, study_uid: str, folder: Path) -> list[tuple[Path, str]]:
    """`count` data sets: the malformed cases, then random edits of a valid PET's bytes (bytes
    flipped, a span cut out or repeated, the data set cut short, lengths changed)."""
    rng = random.Random(seed)
    files: list[tuple[Path, str]] = [(p, syntax) for p, _, syntax in (write_case(c, folder, study_uid) for c in CASES)]
    while len(files) < count:
        ds = valid_pet(study_uid, generate_uid(), rng.randrange(4))
        body = bytearray(encode(ds))
        for _ in range(rng.randint(1, 4)):
            if len(body) < 16:
                break
            kind, at = rng.randrange(5), rng.randrange(len(body))
            if kind == 0:
                body[at] ^= 1 << rng.randrange(8)
            elif kind == 1:
                del body[at:at + rng.randint(1, 64)]
            elif kind == 2:
                body[at:at] = body[at:at + rng.randint(1, 64)]
            elif kind == 3:
                body = body[:at]
            else:
                body[at:at + 2] = rng.randrange(65536).to_bytes(2, "little")
        path = folder / f"fuzz-{len(files):05d}.dcm"
        path.write_bytes(as_file(bytes(body), ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian))
        files.append((path, ExplicitVRLittleEndian))
    return files


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom says what it thinks of each broken value
def test_thousands_of_mutated_data_sets_each_get_a_status_and_only_readable_ones_are_kept(small_node, tmp_path):
    config, sessions, receiver = small_node
    study_uid = generate_uid()
    files = _mutations(seed=11, count=2000, study_uid=study_uid, folder=tmp_path / "fuzz")
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    statuses = []
    for start in range(0, len(files), 200):  # a new association per 200, as a PACS would
        statuses.extend(send_raw(config.node.port, config.node.ae_title, "FUZZ", files[start:start + 200]))
    assert len(statuses) == len(files) and None not in statuses  # every one answered
    counts = {f"0x{s:04X}": statuses.count(s) for s in sorted(set(statuses))}
    print(f"2000 fuzzed data sets: {counts}")
    assert set(statuses) <= {0x0000, 0xA900, 0xC000}
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert all(config.node.data_dir in p.parents for p in written)  # nothing outside data_dir
    with sessions() as session:
        rows = list(session.scalars(select(Instance)))
    assert len(rows) == statuses.count(0x0000)
    for row in rows:  # an acknowledged instance is one the later stages can read
        facts = read_facts(row.path)
        assert facts.sop_instance_uid == row.sop_instance_uid
    assembler.queue_ready_studies(sessions, config, now=utcnow() + timedelta(hours=1))  # every study quiet
    with sessions() as session:
        assert list(session.scalars(select(Event).where(Event.kind == "assembly-failed"))) == []
    assert receiver.listening
