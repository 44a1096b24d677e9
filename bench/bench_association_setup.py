"""What one association costs: a modality that opens an association per image (or per small
series) pays it for every instance. dcmtk storescu sends one small CT instance per run (a new
process and a new association each time: connect, negotiate the ~120 storage contexts storescu
proposes by default, one C-STORE, release) to dicomnode (`serve`, fsync + index) and to Orthanc,
alternating rounds; the median milliseconds per run of each, and their ratio.

    .venv/bin/python bench/bench_association_setup.py [--runs 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pydicom.uid import generate_uid

from bench.bench_receive import ENV
from dicomnode.config import load_config
from dicomnode.testing.node import start_node
from dicomnode.testing.orthanc import LocalOrthanc

from tests.support.nodeutil import tiny_instance, write_config


def per_association_ms(instance: Path, aec: str, port: int, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(["storescu", "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port), str(instance)], env=ENV,
                       check=True, capture_output=True)
        times.append(1000 * (time.perf_counter() - started))
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20, help="associations per receiver and round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-association-"))
    try:
        instance = work / "one.dcm"
        tiny_instance(generate_uid(), generate_uid(), 0).save_as(instance, enforce_file_format=True)
        node_ms: list[float] = []
        orthanc_ms: list[float] = []
        for round_ in range(args.rounds):
            config_path = write_config(work / f"node-{round_}")
            config = load_config(config_path)
            node = start_node(config_path, config.node.port, work / f"node-{round_}.log", extra_args=("--no-worker",))
            try:
                node_ms += per_association_ms(instance, config.node.ae_title, config.node.port, args.runs)
            finally:
                node.stop()
            with LocalOrthanc(work / f"orthanc-{round_}") as pacs:
                orthanc_ms += per_association_ms(instance, pacs.aet, pacs.dicom_port, args.runs)
            print(f"round {round_ + 1}: dicomnode {statistics.median(node_ms[-args.runs:]):.1f} ms, "
                  f"Orthanc {statistics.median(orthanc_ms[-args.runs:]):.1f} ms per association", flush=True)
        node_median, orthanc_median = statistics.median(node_ms), statistics.median(orthanc_ms)
        print(f"per association (storescu run, one instance): dicomnode {node_median:.1f} ms, Orthanc "
              f"{orthanc_median:.1f} ms; associations per second dicomnode / Orthanc "
              f"{orthanc_median / node_median:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
