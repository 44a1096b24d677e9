"""A lever measured for issue 15, not kept: several receiver processes on one port (SO_REUSEPORT,
the kernel spreads new connections over them), to take the receiver past one Python process's
GIL when several associations arrive at once.

N Receivers (dicomnode.net.receiver, deferred index, one SQLite index) are forked, each binding the
same port with SO_REUSEPORT; `associations` dcmtk storescu processes then each send one
whole-body-sized study at once. Instances per second, for 1..N processes, interleaved over the
repeats; the median of each.

    .venv/bin/python bench/receive_processes.py [--processes 2] [--associations 4] [--slices 100] [--repeats 3]

On the 2-core development machine it did not pay (see the README's ingest notes): the senders and
the receivers share the two cores, and a second process adds a second set of threads polling.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pynetdicom.transport

from bench.bench_receive import ENV, write_whole_body
from dicomnode.net.receiver import Receiver
from dicomnode.store.engine import make_sessionmaker

_bind = pynetdicom.transport.AssociationServer.server_bind


def _bind_shared(server: pynetdicom.transport.AssociationServer) -> None:
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    _bind(server)


def _receive(config, ready, stop) -> None:  # noqa: ANN001 - a Config, two multiprocessing Events
    pynetdicom.transport.AssociationServer.server_bind = _bind_shared
    receiver = Receiver(config, make_sessionmaker(config.database_url), deferred_index=True)
    receiver.start()
    ready.set()
    stop.wait()
    receiver.stop()


def one_run(work: Path, processes: int, studies: list[Path], total: int) -> float:
    from tests.support.nodeutil import node_config

    node = work / f"node-{processes}-{time.monotonic_ns()}"
    config = node_config(node)
    config.node.data_dir.mkdir(parents=True)
    make_sessionmaker(config.database_url)  # the schema, before the receivers start
    context = multiprocessing.get_context("fork")
    stop, receivers = context.Event(), []
    try:
        for _ in range(processes):
            ready = context.Event()
            receiver = context.Process(target=_receive, args=(config, ready, stop))
            receiver.start()
            receivers.append(receiver)
            if not ready.wait(60):
                raise RuntimeError("a receiver did not start in 60 s")
        started = time.perf_counter()
        senders = [subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", config.node.ae_title, "+sd", "+r", "+sp",
                                     "*.dcm", "127.0.0.1", str(config.node.port), str(study)],
                                    env=ENV, stderr=subprocess.PIPE) for study in studies]
        for sender in senders:
            _, err = sender.communicate()
            if sender.returncode != 0 or b"E: " in err:
                raise RuntimeError(err.decode(errors="replace"))
        return total / (time.perf_counter() - started)
    finally:
        stop.set()
        for receiver in receivers:
            receiver.join(60)
        shutil.rmtree(node, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=2, help="measure 1 .. this many receiver processes")
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="receive-processes-"))
    try:
        studies = [work / "files" / f"s{i}" for i in range(args.associations)]
        total = sum(write_whole_body(study, 400 + i, args.slices) for i, study in enumerate(studies))
        rates: dict[int, list[float]] = {n: [] for n in range(1, args.processes + 1)}
        for repeat in range(args.repeats):
            for n in rates:
                rates[n].append(one_run(work, n, studies, total))
                print(f"repeat {repeat + 1}: {n} process(es), {args.associations} associations: "
                      f"{rates[n][-1]:.1f} inst/s", flush=True)
        for n, values in rates.items():
            print(f"{n} receiver process(es): median {statistics.median(values):.1f} inst/s "
                  f"({', '.join(f'{v:.1f}' for v in values)}); "
                  f"{statistics.median(values) / statistics.median(rates[1]):.2f}x one process")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
