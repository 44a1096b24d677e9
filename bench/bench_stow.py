"""Delivery time of one SEG to one Orthanc: STOW-RS (dicomnode.net.stow, what a DICOMweb
destination gets) beside C-STORE (dicomnode.net.sender) of the same file, on loopback with
TCP_NODELAY=1. Each send is timed as the pipeline makes it: from reading the file to the
answer, over a fresh HTTP connection or association; the instance is deleted from Orthanc
between runs, so every run stores it anew. Runs alternate between the two transports.

    .venv/bin/python bench/bench_stow.py [--runs 15] [--seed 0]

Prints the median and the spread (min..max) of each, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from dicomnode.config import Destination
from dicomnode.imaging.volumes import load_series
from dicomnode.net import sender, stow
from dicomnode.results.common import write_dicom
from dicomnode.results.seg import build_seg
from dicomnode.synth.petct import write_study
from dicomnode.testing.orthanc import LocalOrthanc

os.environ.setdefault("TCP_NODELAY", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here (bench/summary.py reads it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-stow-") as tmp:
        work = Path(tmp)
        study = write_study(work / "study", seed=args.seed)
        pet = load_series(study.pt_files)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(study.truth_labels)))
        seg = write_dicom(build_seg(truth, pet.datasets, model_name="demo-petct", model_version="0.1.0", folds=[0],
                                    series_number=901, series_description="lesions"), work / "seg.dcm")
        with LocalOrthanc(work / "pacs", dicomweb=True) as pacs:
            transports = {
                "STOW-RS": lambda: stow.store_each(Destination(name="web", url=pacs.dicomweb_url), [seg], timeout=30),
                "C-STORE": lambda: sender.store_each(
                    Destination(name="pacs", ae_title=pacs.aet, host=pacs.host, port=pacs.dicom_port), [seg],
                    "BENCH", timeout=30),
            }
            times: dict[str, list[float]] = {name: [] for name in transports}
            for run in range(args.runs + 1):  # run 0 warms both up and is not counted
                for name, send in transports.items():
                    started = time.perf_counter()
                    [outcome] = send()
                    elapsed = time.perf_counter() - started
                    if not outcome.ok:
                        raise SystemExit(f"{name}: {outcome.error}")
                    if run:
                        times[name].append(elapsed)
                    for instance in pacs.get("/instances"):
                        pacs.delete(f"/instances/{instance}")
        size = seg.stat().st_size
    print(f"one SEG ({size / 1024:.1f} kB, JPEG 2000 lossless frames) to Orthanc on loopback, {args.runs} runs each")
    print(f"{'transport':10} {'median ms':>10} {'min..max ms':>16}")
    for name, values in times.items():
        print(f"{name:10} {statistics.median(values) * 1000:10.1f} {min(values) * 1000:7.1f}..{max(values) * 1000:.1f}")
    ratio = statistics.median(times["STOW-RS"]) / statistics.median(times["C-STORE"])
    print(f"STOW-RS / C-STORE: {ratio:.2f}")
    if args.json:
        medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
        args.json.write_text(json.dumps({"bench": "stow", "runs": args.runs, "stow_over_cstore": ratio,
                                         "median_ms": medians}))


if __name__ == "__main__":
    main()
