"""Receive throughput on whole-body-sized studies: instances per second into dicomnode (checked,
fsynced into the spool, indexed before 0x0000), beside Orthanc and dcmtk storescp on the same
files, all sent by dcmtk storescu on loopback with TCP_NODELAY=1, over one association (one
study) and over four concurrent associations (four studies, one storescu each).

    .venv/bin/python bench/bench_receive.py [--repeats 3] [--slices 300]

A study is a CT of 512 x 512 x `slices` and a PET of 200 x 200 x `slices` (16-bit, Explicit VR
Little Endian): 300 slices is about 181 MB and 600 instances. Each repeat starts every receiver
afresh with empty storage, in a rotating order, so the three are measured interleaved under the
same load (the machine may be shared: read the medians and the ratios, not one run). Each
receiver's peak resident memory (VmHWM, and the largest VmRSS sampled every 50 ms) is reported.
dicomnode and Orthanc both make an instance durable before answering (Orthanc 1.10 fsyncs each
file: SyncStorageArea is on by default); storescp (with --fork: one process per association) writes
without fsync, an upper bound.

"disk floor" is no receiver: the same files read and written durably the way the node's spool
writes them (dicomnode.store.files: a temporary file, fsync, rename, the folder fsynced), one
thread per study, no network and no parsing. It is what this disk allows any receiver that makes
each instance durable before answering, and it moves with the disk's sync latency (on a shared
VM, from about 1 to 3 ms per instance between runs): read the receivers against it in the same
repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from dicomnode.store.files import fsync_dir, write_durably
from dicomnode.synth.petct import _pt_slice, ct_slice, study_dataset, write_series
from dicomnode.synth.petct_phantom import Grid
from dicomnode.testing.node import start_node
from dicomnode.testing.orthanc import LocalOrthanc
from dicomnode.testing.ports import free_port

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TCP_NODELAY": "1"}


def write_whole_body(out: Path, seed: int, slices: int) -> int:
    """One PET/CT study of whole-body size under `out`; its instance count."""
    rng = np.random.default_rng(seed)
    study = study_dataset(f"BENCH-{seed}", "Bench^WholeBody")
    frame = generate_uid()
    ct_grid = Grid.centred((slices, 512, 512), (3.0, 0.98, 0.98))
    pt_grid = Grid.centred((slices, 200, 200), (3.0, 4.0, 4.0))
    ct_plane = rng.integers(-1000, 1500, (512, 512)).astype(np.int32)
    pt_plane = rng.uniform(0, 20000, (200, 200))
    ct_series, pt_series = generate_uid(), generate_uid()
    write_series(out / "CT", "ct", [ct_slice(study, frame, ct_series, ct_grid, k, ct_plane) for k in range(slices)])
    write_series(out / "PT", "pt", [_pt_slice(study, frame, pt_series, pt_grid, k, pt_plane) for k in range(slices)])
    return 2 * slices


def storescu(folder: Path, aec: str, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        ["storescu", "-aet", "BENCH", "-aec", aec, "+sd", "+r", "+sp", "*.dcm", "127.0.0.1", str(port), str(folder)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def send(folders: list[Path], peer) -> float:  # noqa: ANN001 - a receiver below
    """Seconds for `peer` to take each folder on its own association, all at once. The page cache's
    dirty data is written out first (os.sync): what writing the studies, or the receiver before
    (storescp does not fsync), left to write would otherwise slow the fsyncs of whichever runs next."""
    os.sync()
    if isinstance(peer, DiskFloor):
        return peer.write(folders)
    return send_storescu(folders, peer.aet, peer.port)


def send_storescu(folders: list[Path], aec: str, port: int) -> float:
    """Seconds to send each folder on its own association, all at once."""
    started = time.perf_counter()
    senders = [storescu(folder, aec, port) for folder in folders]
    for sender in senders:
        _, err = sender.communicate(timeout=1200)
        if sender.returncode != 0 or b"E: " in err:
            raise RuntimeError(f"storescu to {aec} failed: {err.decode(errors='replace')[-2000:]}")
    return time.perf_counter() - started


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(port)


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssWatch:
    """The largest VmRSS of a process and its children together (storescp --fork's, the node's
    receiving processes), sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kb, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _pids(self) -> list[int]:
        try:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            children = []
        return [self.pid, *map(int, children)]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, sum(_status_kb(pid, "VmRSS") for pid in self._pids()))
            self._stop.wait(0.05)

    def stop(self) -> float:
        """Peak MB: the sampled peak or the kernel's high-water mark of the main process."""
        self._stop.set()
        self._thread.join()
        return max(self.peak_kb, _status_kb(self.pid, "VmHWM")) / 1024


class Node:
    name = "dicomnode"
    aet = "DICOMNODE"
    receive_processes = 2  # [node] receive_processes (--receive-processes)

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        work.mkdir(parents=True)
        config = work / "config.toml"
        config.write_text(
            f'[node]\nae_title = "DICOMNODE"\nbind = "127.0.0.1"\nport = {self.port}\ndata_dir = "var"\n'
            f'study_quiet_seconds = 3600\nreceive_processes = {self.receive_processes}\n'
            f'[[models]]\nname = "m"\npath = "{REPO / "models" / "demo-petct"}"\n')
        self.node = start_node(config, self.port, work / "node.log", extra_args=("--no-worker",))
        self.pid = self.node.process.pid
        deadline = time.monotonic() + 60
        while (work / "node.log").read_text().count("receiving process ready") < self.receive_processes - 1:
            if time.monotonic() > deadline:
                raise TimeoutError("the node's receiving processes did not start in 60 s")
            time.sleep(0.1)

    def stop(self) -> None:
        self.node.stop()


class Orthanc:
    name = "Orthanc"

    def __init__(self, work: Path) -> None:
        self.pacs = LocalOrthanc(work)
        self.pacs.__enter__()
        self.aet, self.port, self.pid = self.pacs.aet, self.pacs.dicom_port, self.pacs._proc.pid

    def stop(self) -> None:
        self.pacs.__exit__(None, None, None)


class StoreScp:
    name = "storescp"
    aet = "STORESCP"

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        work.mkdir(parents=True)
        self.process = subprocess.Popen(["storescp", "--fork", "-aet", self.aet, "-od", str(work), str(self.port)],
                                        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.process.pid
        wait_port(self.port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


class DiskFloor:
    """No receiver: each study's files written durably under `work` as the node's spool writes
    them, one thread per study (see the module's docstring)."""

    name = "disk floor"

    def __init__(self, work: Path) -> None:
        self.work = work
        work.mkdir(parents=True)
        self.pid = os.getpid()  # its memory is this process's: not reported

    def write(self, folders: list[Path]) -> float:
        def one_study(index: int, folder: Path) -> None:
            for path in sorted(folder.rglob("*.dcm")):
                series = self.work / f"study{index}" / path.parent.name
                if not series.is_dir():
                    series.mkdir(parents=True)
                    fsync_dir(series.parent)
                data = path.read_bytes()
                write_durably(series / path.name, lambda fh, data=data: fh.write(data), series / f".{path.name}")

        started = time.perf_counter()
        with ThreadPoolExecutor(len(folders)) as pool:
            list(pool.map(one_study, range(len(folders)), folders))
        return time.perf_counter() - started

    def stop(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--only", nargs="*", default=["dicomnode", "Orthanc", "storescp", "disk floor"])
    parser.add_argument("--json", type=Path, help="also write the figures here (bench/summary.py reads them)")
    parser.add_argument("--receive-processes", type=int, default=Node.receive_processes,
                        help="the node's [node] receive_processes")
    args = parser.parse_args()
    Node.receive_processes = args.receive_processes
    work = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    files = work / "files"
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        counts = list(pool.map(lambda seed: write_whole_body(files / f"s{seed}", seed, args.slices), range(5)))
    size_mb = sum(p.stat().st_size for p in (files / "s0").rglob("*.dcm")) / 1e6
    print(f"one study: {counts[0]} instances, {size_mb:.0f} MB (CT 512x512x{args.slices}, PET 200x200x{args.slices});"
          f" written in {time.perf_counter() - started:.0f} s; {args.repeats} repeats, receivers interleaved; "
          f"the node with {args.receive_processes} receiving process(es)\n",
          flush=True)
    peers = [peer for peer in (Node, Orthanc, StoreScp, DiskFloor) if peer.name in args.only]
    one: dict[str, list[float]] = {p.name: [] for p in peers}
    four: dict[str, list[float]] = {p.name: [] for p in peers}
    rss: dict[str, list[float]] = {p.name: [] for p in peers}
    try:
        for repeat in range(args.repeats):
            order = peers[repeat % len(peers):] + peers[:repeat % len(peers)]
            for peer_class in order:
                peer = peer_class(work / f"{peer_class.name}-{repeat}")
                watch = RssWatch(peer.pid)
                try:
                    one[peer.name].append(counts[0] / send([files / "s0"], peer))
                    four[peer.name].append(sum(counts[1:]) / send([files / f"s{i}" for i in range(1, 5)], peer))
                finally:
                    rss[peer.name].append(watch.stop() if peer_class is not DiskFloor else 0.0)
                    peer.stop()
                    shutil.rmtree(work / f"{peer_class.name}-{repeat}", ignore_errors=True)
                peak = f"{rss[peer.name][-1]:6.0f} MB" if peer_class is not DiskFloor else "     -"
                print(f"repeat {repeat + 1} {peer.name:10} 1 assoc {one[peer.name][-1]:7.1f} inst/s   4 assoc "
                      f"{four[peer.name][-1]:7.1f} inst/s   peak RSS {peak}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def ratio(results: dict[str, list[float]], base: str, of: str = "dicomnode") -> float | None:
        if base not in results or of not in results:
            return None
        return statistics.median(n / b for n, b in zip(results[of], results[base], strict=True))

    print(f"\n{'receiver':10} {'1 assoc median':>15} {'runs':>18} {'4 assoc median':>15} {'runs':>18} "
          f"{'peak RSS MB':>12}")
    for name in one:
        peak = f"{max(rss[name]):12.0f}" if name != DiskFloor.name else f"{'-':>12}"
        print(f"{name:10} {statistics.median(one[name]):15.1f} {' '.join(f'{r:.0f}' for r in one[name]):>18} "
              f"{statistics.median(four[name]):15.1f} {' '.join(f'{r:.0f}' for r in four[name]):>18} {peak}")
    # the goals (issue 15.1), each ratio the median of the per-repeat ratios
    rows = [("1 association, dicomnode / Orthanc", ratio(one, "Orthanc"), 1.2, "x"),
            ("4 associations, dicomnode / Orthanc", ratio(four, "Orthanc"), 1.2, "x"),
            ("1 association, dicomnode / storescp", ratio(one, "storescp"), None, "x"),
            ("4 associations, dicomnode / storescp", ratio(four, "storescp"), 0.5, "x"),
            ("1 association, dicomnode / disk floor", ratio(one, "disk floor"), None, "x"),
            ("4 associations, dicomnode / disk floor", ratio(four, "disk floor"), None, "x"),
            ("1 association, Orthanc / disk floor", ratio(one, "disk floor", "Orthanc"), None, "x"),
            ("4 associations, Orthanc / disk floor", ratio(four, "disk floor", "Orthanc"), None, "x"),
            ("dicomnode peak RSS, MB (at most)", max(rss["dicomnode"]) if "dicomnode" in rss else None, 300, "")]
    print(f"\n{'ingest':40} {'measured':>9} {'goal':>7} {'met':>4}")
    for label, value, goal, unit in rows:
        if value is None:
            continue
        if goal is None:  # no goal: said for comparison
            print(f"{label:40} {value:8.2f}{unit or ' '} {'-':>7} {'-':>4}")
            continue
        met = value <= goal if label.startswith("dicomnode peak") else value >= goal
        print(f"{label:40} {value:8.2f}{unit or ' '} {goal:6g}{unit or ' '} {'yes' if met else 'no':>4}")
    if args.json:
        args.json.write_text(json.dumps({
            "one_association_inst_per_s": {name.lower(): statistics.median(v) for name, v in one.items()},
            "four_associations_inst_per_s": {name.lower(): statistics.median(v) for name, v in four.items()},
            "peak_rss_mb": {name.lower(): max(v) for name, v in rss.items() if name != DiskFloor.name},
            "ratios": {label: value for label, value, _, _ in rows if value is not None},
            "repeats": args.repeats, "slices": args.slices, "receive_processes": args.receive_processes}, indent=2))


if __name__ == "__main__":
    main()
