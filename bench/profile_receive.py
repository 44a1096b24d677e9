"""Where the receiver's time goes per instance: an in-process Receiver is sent whole-body-sized
studies by dcmtk storescu (one association, or several at once) and the time spent in each step
of dicomnode.net.receiver.InstanceStore is summed (wall time per call, over all threads), beside
the time the sender saw. With --cprofile, a cProfile of every thread (threading.setprofile) is
printed too.

    .venv/bin/python bench/profile_receive.py [--associations 1] [--slices 100] [--cprofile] [--sync-index]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import dicomnode.net.receiver as receiver_module
import dicomnode.store.index as index_module
import dicomnode.store.spool as spool_module
from bench.bench_receive import ENV, write_whole_body
from dicomnode.store.engine import make_sessionmaker

TIMES: dict[str, list[float]] = defaultdict(list)
CPU: dict[str, list[float]] = defaultdict(list)  # the calling thread's CPU time
LOCK = threading.Lock()


def timed(name: str, function):  # noqa: ANN001, ANN201
    @functools.wraps(function)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            with LOCK:
                TIMES[name].append(time.perf_counter() - started)
                CPU[name].append(time.thread_time() - cpu)
    return wrapper


def instrument() -> None:
    for module, names in ((receiver_module, ("check_instance", "record_instance", "decode")),
                          (spool_module, ("write_durably", "fsync_dir")),
                          (index_module, ())):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, timed(name, getattr(module, name)))
    for cls, names in ((receiver_module.InstanceStore, ("store_event", "store_received", "store", "commit")),
                       (receiver_module.Receiver, ("handle_store",)),
                       (getattr(index_module, "IndexWriter", None), ("record", "_write", "_index_batch"))):
        for name in names if cls is not None else ():
            if hasattr(cls, name):
                setattr(cls, name, timed(f"{cls.__name__}.{name}", getattr(cls, name)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--associations", type=int, default=1)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--sync-index", action="store_true",
                        help="index before acknowledging (as before the deferred index writer), to compare")
    args = parser.parse_args()
    from tests.support.nodeutil import node_config

    work = Path(tempfile.mkdtemp(prefix="profile-receive-"))
    try:
        counts = [write_whole_body(work / "files" / f"s{i}", 200 + i, args.slices) for i in range(args.associations)]
        config = node_config(work / "node")
        config.node.data_dir.mkdir(parents=True)
        instrument()
        sessions = make_sessionmaker(config.database_url)
        receiver = receiver_module.Receiver(config, sessions, deferred_index=not args.sync_index)
        profiles: list[cProfile.Profile] = []
        if args.cprofile:
            def start_profile(*_args):  # noqa: ANN002, ANN202
                profile = cProfile.Profile()
                profiles.append(profile)
                sys.setprofile(None)
                profile.enable()
            threading.setprofile(start_profile)
        receiver.start()
        started, cpu = time.perf_counter(), time.process_time()
        senders = [subprocess.Popen(
            ["storescu", "-aet", "PROF", "-aec", config.node.ae_title, "+sd", "+r", "+sp", "*.dcm", "127.0.0.1",
             str(config.node.port), str(work / "files" / f"s{i}")], env=ENV, stderr=subprocess.PIPE)
            for i in range(args.associations)]
        for sender in senders:
            _, err = sender.communicate()
            assert sender.returncode == 0 and b"E: " not in err, err
        wall = time.perf_counter() - started
        receiver.store.index.flush(120)  # CPU: the deferred index writer's rows included
        cpu = time.process_time() - cpu
        receiver.stop()  # the deferred index writer's last rows too
        threading.setprofile(None)
        total = sum(counts)
        print(f"{total} instances on {args.associations} association(s): {wall:.2f} s, {total / wall:.1f} inst/s, "
              f"{1000 * wall / total:.2f} ms per instance (wall); "
              f"receiver CPU {1000 * cpu / total:.2f} ms per instance")
        print(f"{'step':28} {'calls':>6} {'ms/call':>8} {'ms/inst (sum over threads)':>28} {'CPU ms/inst':>12}")
        for name, values in sorted(TIMES.items(), key=lambda item: -sum(item[1])):
            print(f"{name:28} {len(values):6d} {1000 * sum(values) / len(values):8.2f} "
                  f"{1000 * sum(values) / total:28.2f} {1000 * sum(CPU[name]) / total:12.2f}")
        if profiles:
            for profile in profiles:
                profile.disable()
            stats = pstats.Stats(profiles[0])
            for profile in profiles[1:]:
                stats.add(profile)
            stats.sort_stats("tottime").print_stats(25)
            stats.sort_stats("cumulative").print_stats(
                r"(receiver|validation|index|spool|files|dul|dimse|dsutils|service_class|session|filereader)\.py")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
