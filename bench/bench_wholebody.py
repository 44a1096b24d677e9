"""The non-inference part of a whole-body job: seconds per step from "queued" to "delivered".

A whole-body PET/CT study (CT 512 x 512 x 300 at 0.98 x 0.98 x 3 mm, PET 200 x 200 x 300 at
4 x 4 x 3 mm, 16-bit Explicit VR Little Endian, 600 files, ~180 MB: the sizes of
bench_receive.py; a torso the scan's length with 24 lesions, dicomnode.synth's phantom) is
written once and cached under $TMPDIR/dicomnode-bench/. It is indexed as the receiver indexes
it, a job is queued, and the worker runs it as `dicomnode serve` does (Worker.run_one: claim,
series selection, reading the series, SUVbw, the CT resampled onto the grid, the model, measures,
SEG / SR / RTSTRUCT / SC written, each C-STORE'd to a local Orthanc, the job marked done).

The model is a stand-in that returns the phantom's lesions as its label map (its own seconds,
near 0, are reported and left out of the total): the issue's figure is the job "minus the
model's own seconds". The step figures are those the job records in its `step-times` event
(dicomnode.pipeline.timing; `dicomnode jobs show` prints them); "total" is the wall time of
Worker.run_one less the model's seconds, so it includes what no step names (claiming, events).

Two jobs: the model on the PET grid (200 x 200 x 300: GLOW-FDG's way, the goal's case) and on
the CT grid (512 x 512 x 300: the PET resampled onto the CT, a SEG of 300 frames of 512 x 512).

    .venv/bin/python bench/bench_wholebody.py [--grids PET,CT] [--repeats 1] [--json PATH] [--profile PATH]

numpy's arrays are set up as `dicomnode worker` sets them (pipeline.worker.small_pages_for_arrays:
no transparent huge pages); NUMPY_MADVISE_HUGEPAGE=1 in the environment measures with them.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.config import load_config
from dicomnode.imaging.headers import clear_facts_cache
from dicomnode.pipeline.job import INFERENCE
from dicomnode.pipeline.queue import RetryPolicy, enqueue
from dicomnode.pipeline.worker import Worker, small_pages_for_arrays
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.events import EventKind, event_data
from dicomnode.store.index import ReceivedInstance, record_instance
from dicomnode.store.tables import Event, Job, JobState, utcnow
from dicomnode.synth import petct_phantom as ph
from dicomnode.synth.petct import _pt_slice, ct_slice, study_dataset, suv_to_bqml_factor
from dicomnode.testing.orthanc import LocalOrthanc

GOAL_S = 15.0
SLICES = 300
CT_GRID = ph.Grid.centred((SLICES, 512, 512), (3.0, 0.98, 0.98))
PET_GRID = ph.Grid.centred((SLICES, 200, 200), (3.0, 4.0, 4.0))
CACHE_VERSION = 1  # bump when the study written changes
CHUNK = 25  # slices rasterised at once (memory)
STEPS = ("select", "read", "SUV", "resample", "channels", "labels saved", "measures", "SEG", "SR", "RTSTRUCT", "SC",
         "write", "delivery")


def _chunks(grid: ph.Grid):  # noqa: ANN202 - (first slice, the chunk's grid)
    nz = grid.shape[0]
    for k0 in range(0, nz, CHUNK):
        n = min(CHUNK, nz - k0)
        ox, oy, oz = grid.origin
        yield k0, ph.Grid((n, *grid.shape[1:]), grid.spacing, (ox, oy, oz + k0 * grid.spacing[0]))


def _phantom() -> ph.Phantom:
    z0, z1 = CT_GRID.axes_mm()[0][[0, -1]]
    return ph.whole_body_phantom(7, (float(z0) + 10.0, float(z1) - 10.0), n_lesions=24)


def write_study(root: Path) -> dict:
    """The whole-body study under `root` (written once, then reused): its UIDs and files."""
    marker = root / "study.json"
    if marker.exists():
        return json.loads(marker.read_text())
    root.mkdir(parents=True, exist_ok=True)
    phantom = _phantom()
    study = study_dataset("BENCH-WB", "Bench^WholeBody")
    frame, ct_series, pt_series = generate_uid(), generate_uid(), generate_uid()
    ct_files, pt_files = [], []
    for k0, grid in _chunks(CT_GRID):
        hu = ph.ct_hu(phantom, grid)
        for k, plane in enumerate(hu):
            ds = ct_slice(study, frame, ct_series, CT_GRID, k0 + k, plane)
            ct_files.append(_write(root / "CT" / f"ct_{k0 + k:03d}.dcm", ds))
    bqml = suv_to_bqml_factor()
    for k0, grid in _chunks(PET_GRID):
        values = ph.pet_suv(phantom, grid).astype(np.float64) * bqml
        for k, plane in enumerate(values):
            ds = _pt_slice(study, frame, pt_series, PET_GRID, k0 + k, plane)
            pt_files.append(_write(root / "PT" / f"pt_{k0 + k:03d}.dcm", ds))
    labels = {name: np.concatenate([ph.lesion_masks(phantom, g) for _, g in _chunks(grid)])
              for name, grid in (("PET", PET_GRID), ("CT", CT_GRID))}
    np.savez_compressed(root / "labels.npz", **labels)
    info = {"study_uid": str(study.StudyInstanceUID), "ct": [str(p) for p in ct_files],
            "pt": [str(p) for p in pt_files], "lesions": len(phantom.lesions)}
    marker.write_text(json.dumps(info))
    return info


def _write(path: Path, ds) -> Path:  # noqa: ANN001 - a slice as dicomnode.synth.petct.write_series writes it
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dcmwrite(path, ds, enforce_file_format=True)
    return path


class FixedLabels:
    """The model's stand-in: the phantom's lesions on the job's grid as its label map."""

    channel_names = ["CT", "PET"]
    labels = {0: "background", 1: "lesion"}
    device = "cpu (stand-in: a fixed label map)"

    def __init__(self, maps: dict[tuple[int, ...], np.ndarray], model_dir: Path) -> None:
        self.maps = maps
        self.model_dir = model_dir

    def predict(self, channels: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        return self.maps[tuple(channels.shape[1:])].copy()


def index(sessions, files: list[str]) -> None:  # noqa: ANN001
    """Index the files as the receiver does (not timed: ingest is bench_receive.py's)."""
    at = utcnow().replace(year=2020)
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        record_instance(sessions, ReceivedInstance(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1",
            ds.Modality, int(ds.SeriesNumber), str(ds.get("SeriesDescription", "")), str(path), "BENCH"), now=at)


def config_file(work: Path, grid: str, pacs: LocalOrthanc) -> Path:
    (work / "model").mkdir(parents=True, exist_ok=True)
    path = work / "config.toml"
    path.write_text(f"""
[node]
ae_title = "BENCHNODE"
bind = "127.0.0.1"
port = 11199
data_dir = "var"
delivery_backoff_seconds = 0

[[destinations]]
name = "pacs"
ae_title = "{pacs.aet}"
host = "127.0.0.1"
port = {pacs.dicom_port}
outputs = ["SEG", "SR", "RTSTRUCT", "SC"]

[[models]]
name = "wholebody"
path = "model"
folds = [0]
version = "bench"
grid = "{grid}"
""")
    return path


def run_job(work: Path, grid: str, study: dict, maps: dict, pacs: LocalOrthanc,
            profile: cProfile.Profile | None) -> dict:
    """One job of the study through the worker; the step figures and the total in seconds."""
    config = load_config(config_file(work, grid, pacs))
    sessions = make_sessionmaker(config.database_url)
    index(sessions, study["ct"] + study["pt"])
    job_id = enqueue(sessions, study["study_uid"], "wholebody", RetryPolicy())
    worker = Worker(config, sessions)
    worker.models._models["wholebody"] = FixedLabels(maps, config.model("wholebody").path)
    clear_facts_cache()  # a worker meets the study's files for the first time
    started, cpu = time.perf_counter(), time.process_time()
    if profile is not None:
        profile.enable()
    ran = worker.run_one()
    if profile is not None:
        profile.disable()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    with sessions() as session:
        job = session.get(Job, job_id)
        if not ran or job.state != JobState.SUCCEEDED:
            raise RuntimeError(f"the job did not succeed: {job.state} {job.error}")
        event = session.scalars(select_event(job_id)).one()
        data = event_data(event)
    seconds, cpu_seconds = data["seconds"], data.get("cpu_seconds", {})
    model = seconds.pop(INFERENCE, 0.0)
    model_cpu = cpu_seconds.pop(INFERENCE, 0.0)
    return {"steps": seconds, "steps_cpu": cpu_seconds, "model": model, "total": wall - model,
            "cpu": cpu - model_cpu}


def select_event(job_id: int):  # noqa: ANN201
    from sqlalchemy import select

    return select(Event).where(Event.job_id == job_id, Event.kind == EventKind.STEP_TIMES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", default="PET,CT", help="the model grids to run a job on (PET, CT)")
    parser.add_argument("--repeats", type=int, default=1, help="jobs per grid (the median is printed)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dicomnode-bench",
                        help="where the whole-body study is kept between runs")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the jobs here (pstats format)")
    args = parser.parse_args(argv)
    grids = [g.strip().upper() for g in args.grids.split(",") if g.strip()]
    huge_pages = small_pages_for_arrays()  # as `dicomnode worker` starts (NUMPY_MADVISE_HUGEPAGE=1: huge pages)

    started = time.perf_counter()
    study = write_study(args.cache / f"wholebody-v{CACHE_VERSION}-{SLICES}")
    prepared = time.perf_counter() - started
    with np.load(Path(study["ct"][0]).parents[1] / "labels.npz") as data:
        maps = {tuple(data[g].shape): data[g] for g in ("PET", "CT")}
    profile = cProfile.Profile(time.process_time) if args.profile else None  # CPU time: the machine is shared
    results: dict[str, list[dict]] = {g: [] for g in grids}
    with tempfile.TemporaryDirectory(prefix="bench-wholebody-") as tmp:
        with LocalOrthanc(Path(tmp) / "pacs") as pacs:
            for repeat in range(args.repeats):
                for grid in grids:
                    results[grid].append(run_job(Path(tmp) / f"{grid}-{repeat}", grid, study, maps, pacs, profile))
    if profile is not None:
        profile.dump_stats(str(args.profile))

    medians = {g: {"steps": {s: statistics.median(r["steps"].get(s, 0.0) for r in runs)
                             for s in dict.fromkeys([*STEPS, *runs[0]["steps"]])},
                   "steps_cpu": {s: statistics.median(r["steps_cpu"].get(s, 0.0) for r in runs)
                                 for s in dict.fromkeys([*STEPS, *runs[0]["steps"]])},
                   "model": statistics.median(r["model"] for r in runs),
                   "total": statistics.median(r["total"] for r in runs),
                   "cpu": statistics.median(r["cpu"] for r in runs),
                   "totals": [round(r["total"], 2) for r in runs]}
               for g, runs in results.items()}
    size = {name: "x".join(map(str, grid.shape[::-1])) for name, grid in (("CT", CT_GRID), ("PET", PET_GRID))}
    written = "cached" if prepared < 5 else f"written in {prepared:.0f} s"
    print(f"whole-body study: CT {size['CT']}, PET {size['PET']}, {study['lesions']} lesions ({written}); "
          f"{len(os.sched_getaffinity(0))} cores, median of {args.repeats}, numpy's arrays in "
          f"{'transparent huge pages (madvise)' if huge_pages else '4 KiB pages'}\n")
    print("| step: wall s (CPU s) | " + " | ".join(f"model on the {g} grid" for g in grids) + " |")
    print("|---|" + "---|" * len(grids))

    def cell(g: str, step: str) -> str:
        return f"{medians[g]['steps'].get(step, 0.0):.2f} ({medians[g]['steps_cpu'].get(step, 0.0):.2f})"

    for step in medians[grids[0]]["steps"]:
        print(f"| {step} | " + " | ".join(cell(g, step) for g in grids) + " |")
    print("| (the model's stand-in, left out) | " + " | ".join(f"{medians[g]['model']:.2f}" for g in grids) + " |")
    print(f"| **total, queued to delivered** (goal <= {GOAL_S:g}) | "
          + " | ".join(f"**{medians[g]['total']:.2f}** ({medians[g]['cpu']:.2f})" for g in grids) + " |")
    print(f"\nload average over the run: {os.getloadavg()[0]:.1f} (wall times stretch when the 2 cores are shared)")
    for g in grids:
        verdict = "meets" if medians[g]["total"] <= GOAL_S else "misses"
        print(f"{g} grid: {medians[g]['total']:.1f} s, {verdict} the {GOAL_S:g} s goal ({medians[g]['totals']})")
    if args.json:
        args.json.write_text(json.dumps({"bench": "wholebody", "goal_s": GOAL_S, "huge_pages": huge_pages,
                                         "grids": medians}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
