"""Receive throughput: instances per second into dicomnode (fsync + index per instance),
beside Orthanc and dcmtk storescp on the same files, all sent by dcmtk storescu over one
association on loopback with TCP_NODELAY=1.

    .venv/bin/python bench/bench_receive.py [--studies 3] [--repeats 3]

Prints a table and each peer's ratio to dicomnode. dicomnode and Orthanc both make an
instance durable before answering; storescp writes without fsync (an upper bound).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from dicomnode.synth.petct import write_study
from dicomnode.testing.node import start_node
from dicomnode.testing.orthanc import LocalOrthanc
from dicomnode.testing.ports import free_port

REPO = Path(__file__).resolve().parents[1]

ENV = {**os.environ, "TCP_NODELAY": "1"}


def storescu(folder: Path, aec: str, port: int) -> float:
    started = time.perf_counter()
    subprocess.run(
        ["storescu", "-aet", "BENCH", "-aec", aec, "+sd", "+r", "+sp", "*.dcm", "127.0.0.1", str(port), str(folder)],
        check=True,
        env=ENV,
        capture_output=True,
        timeout=600,
    )
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    files = work / "files"
    for seed in range(args.studies):
        write_study(files / f"s{seed}", seed=100 + seed)
    count = len(list(files.rglob("*.dcm")))
    size_mb = sum(p.stat().st_size for p in files.rglob("*.dcm")) / 1e6
    print(f"{count} instances ({size_mb:.1f} MB): {args.studies} synthetic PET/CT studies; {args.repeats} runs each\n")
    results: dict[str, list[float]] = {}

    port = free_port()
    (work / "node").mkdir()
    config = work / "node" / "config.toml"
    config.write_text(
        f'[node]\nae_title = "DICOMNODE"\nbind = "127.0.0.1"\nport = {port}\ndata_dir = "var"\n'
        f'study_quiet_seconds = 3600\n[[models]]\nname = "m"\npath = "{REPO / "models" / "demo-petct"}"\n'
    )
    node = start_node(config, port, work / "node" / "node.log", extra_args=("--no-worker",))
    try:
        results["dicomnode (fsync + SQLite FULL)"] = [
            count / storescu(files, "DICOMNODE", port) for _ in range(args.repeats)
        ]
    finally:
        node.stop()

    with LocalOrthanc(work / "orthanc") as pacs:
        results["Orthanc"] = [count / storescu(files, pacs.aet, pacs.dicom_port) for _ in range(args.repeats)]

    port = free_port()
    out = work / "storescp"
    out.mkdir()
    scp = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        results["dcmtk storescp (no fsync)"] = [count / storescu(files, "STORESCP", port) for _ in range(args.repeats)]
    finally:
        scp.terminate()
        scp.wait()

    ours = statistics.median(results["dicomnode (fsync + SQLite FULL)"])
    print(f"{'receiver':34} {'median inst/s':>14} {'runs':>24} {'ratio to dicomnode':>20}")
    for name, rates in results.items():
        median = statistics.median(rates)
        print(f"{name:34} {median:14.1f} {' '.join(f'{r:.0f}' for r in rates):>24} {median / ours:20.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
