"""Fetch time: one 600-instance study (synthetic PET/CT instances, 10 series) from a local
Orthanc, retrieved by the node by C-MOVE (to a running `dicomnode serve --no-worker`) and by
C-GET (`dicomnode.net.fetch` in this process), beside a second Orthanc C-MOVE-ing the same
study from the first (REST /modalities/{name}/move, synchronous). Loopback, TCP_NODELAY=1; the
node makes each instance durable (fsync of file and folder, SQLite commit) before answering.

    .venv/bin/python bench/bench_fetch.py [--instances 600] [--repeats 3]

Each figure is the wall time from the request to the last instance held (the node's times
include the C-FIND of the study's instances, as `dicomnode fetch` does); median of the repeats,
each into an empty node or Orthanc.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from dicomnode.config import load_config
from dicomnode.net.fetch import client_for, fetch_study
from dicomnode.net.receiver import InstanceStore
from dicomnode.store.engine import make_sessionmaker
from dicomnode.synth.petct import write_study
from dicomnode.testing.node import start_node
from dicomnode.testing.orthanc import LocalOrthanc
from dicomnode.testing.ports import free_port

REPO = Path(__file__).resolve().parents[1]
os.environ["TCP_NODELAY"] = "1"


def make_study(folder: Path, count: int) -> tuple[str, list[Path]]:
    """`count` instances of one study: the synthetic study's 128 slices again in new series."""
    template = write_study(folder / "template", seed=1)
    sources = sorted(template.ct_dir.glob("*.dcm")) + sorted(template.pt_dir.glob("*.dcm"))
    study_uid, out, files = generate_uid(), folder / "study", []
    out.mkdir(parents=True)
    series: dict[tuple[int, str], str] = {}
    for i in range(count):
        ds = dcmread(sources[i % len(sources)])
        key = (i // len(sources), str(ds.SeriesInstanceUID))
        ds.SeriesInstanceUID = series.setdefault(key, generate_uid())
        ds.SeriesNumber = len(series)
        ds.StudyInstanceUID, ds.SOPInstanceUID = study_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out / f"{i:04d}.dcm"
        ds.save_as(path)
        files.append(path)
    return study_uid, files


def node_config(folder: Path, pacs: LocalOrthanc, retrieve: str) -> Path:
    folder.mkdir(parents=True)
    path = folder / "config.toml"
    path.write_text(f"""
[node]
ae_title = "DICOMNODE"
bind = "127.0.0.1"
port = {free_port()}
data_dir = "var"
allowed_calling_aets = ["{pacs.aet}"]
study_quiet_seconds = 3600
min_free_percent = 0
min_free_gb = 0

[[sources]]
name = "pacs"
ae_title = "{pacs.aet}"
host = "127.0.0.1"
port = {pacs.dicom_port}
retrieve = "{retrieve}"

[[models]]
name = "demo-petct"
path = "{REPO / 'models' / 'demo-petct'}"
""")
    return path


def node_fetch(folder: Path, pacs: LocalOrthanc, study_uid: str, retrieve: str) -> float:
    config = load_config(node_config(folder, pacs, retrieve))
    pacs.add_modality("node", config.node.ae_title, "127.0.0.1", config.node.port)
    node = start_node(config.source, config.node.port, folder / "node.log", extra_args=("--no-worker",)) \
        if retrieve == "C-MOVE" else None
    try:
        sessions = make_sessionmaker(config.database_url)
        client = client_for(config.fetch_source("pacs"), config)
        started = time.perf_counter()
        fetched = fetch_study(client, client.announce(study_uid), InstanceStore(config, sessions), sessions)
        seconds = time.perf_counter() - started
    finally:
        if node is not None:
            node.stop()
    print(f"  node {retrieve}: {fetched.arrived} of {fetched.announced} announced instances in {seconds:.2f} s")
    return seconds


def orthanc_fetch(folder: Path, pacs: LocalOrthanc, study_uid: str, count: int) -> float:
    with LocalOrthanc(folder, aet="ORTHANCB", modalities={"pacs": (pacs.aet, "127.0.0.1", pacs.dicom_port)}) as b:
        pacs.add_modality("orthancb", b.aet, "127.0.0.1", b.dicom_port)
        started = time.perf_counter()
        b.post("/modalities/pacs/move", {"Level": "Study", "Resources": [{"StudyInstanceUID": study_uid}],
                                         "TargetAet": b.aet, "Synchronous": True}, timeout=600)
        seconds = time.perf_counter() - started
        held = b.get("/statistics")["CountInstances"]
    if held != count:
        raise RuntimeError(f"Orthanc B holds {held} instances, not {count}")
    print(f"  Orthanc -> Orthanc C-MOVE: {held} instances in {seconds:.2f} s")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here (bench/summary.py reads it)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    try:
        study_uid, files = make_study(work, args.instances)
        with LocalOrthanc(work / "pacs") as pacs:
            pacs.upload(files)
            times: dict[str, list[float]] = {"node C-MOVE": [], "node C-GET": [], "Orthanc C-MOVE": []}
            for run in range(args.repeats):
                print(f"run {run + 1}")
                times["node C-MOVE"].append(node_fetch(work / f"move-{run}", pacs, study_uid, "C-MOVE"))
                times["node C-GET"].append(node_fetch(work / f"get-{run}", pacs, study_uid, "C-GET"))
                times["Orthanc C-MOVE"].append(orthanc_fetch(work / f"orthanc-{run}", pacs, study_uid,
                                                             args.instances))
        print(f"\n{args.instances} instances, median of {args.repeats}:")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:16s} {median:6.2f} s  ({args.instances / median:5.0f} instances/s; runs "
                  f"{', '.join(f'{v:.2f}' for v in values)})")
        if args.json:
            args.json.write_text(json.dumps({"bench": "fetch", "instances": args.instances, "repeats": args.repeats,
                                             "median_s": {name: statistics.median(v) for name, v in times.items()}}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
