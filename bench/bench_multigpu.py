"""Several GPUs on one workstation: the warm queue with 1 and N workers, and one worker with its
folds in parallel on the N devices ([[models]] fold_parallel).

Runs as it is on a machine with N GPUs (torch.cuda.device_count()); on the CPU `--smoke` runs a
tiny version (two "cpu" devices, two studies) to show that it works. Synthetic PET/CT studies
(dicomnode.synth) are indexed into a fresh node (SQLite, no destination: results are written to
the data folder) for each setting, real `dicomnode worker` processes claim them, each with its
`--device`:

* 1 worker (cuda:0), folds one after the other;
* N workers (cuda:0 ... cuda:N-1), folds one after the other: throughput;
* 1 worker with fold_parallel: one study's folds spread over the N devices: latency.

Each setting first runs one warm-up study per worker (the model loaded), then times a queue of
`--studies` studies queued at once: seconds per study (wall time / studies, the workers'
1-second poll included) and the median model seconds per study (the `inference-done` events),
and the ratio against 1 worker.

    .venv/bin/python bench/bench_multigpu.py [--studies 8] [--model models/demo-petct] [--folds 0 1 2 3 4]
    .venv/bin/python bench/bench_multigpu.py --devices cuda:0 cuda:0   # two workers on one GPU
    .venv/bin/python bench/bench_multigpu.py --smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from dicomnode.config import load_config
from dicomnode.pipeline import assembler
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.events import EventKind, event_data
from dicomnode.store.index import ReceivedInstance, record_instance
from dicomnode.store.tables import Component, Event, Job, JobState, utcnow
from dicomnode.synth.petct import write_study

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Setting:
    label: str
    workers: list[str]  # one worker process per device
    fold_devices: list[str]  # [[workers]] devices in the config: where fold_parallel spreads the folds
    fold_parallel: bool


@dataclass
class Result:
    setting: Setting
    seconds_per_study: float
    model_seconds: float  # median of the inference-done events of the timed studies
    devices: list[str]  # where the timed studies' models ran (inference-done)


def index_study(sessions, folder: Path) -> None:  # noqa: ANN001
    """Index a study's files as the receiver would, arrived long ago (quiet at once)."""
    for path in sorted(folder.rglob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        record_instance(sessions, ReceivedInstance(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1",
            ds.Modality, int(ds.SeriesNumber), str(ds.get("SeriesDescription", "")), str(path), "BENCH"),
            now=utcnow().replace(year=2020))


def wait(condition, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.2)


def run_setting(setting: Setting, studies: list[Path], warmups: list[Path], model: Path, folds: list[int],
                work: Path, timeout: float) -> Result:
    work.mkdir(parents=True)
    workers = "".join(f'[[workers]]\ndevice = "{d}"\nname = "fold-{i}"\n' for i, d in enumerate(setting.fold_devices))
    (work / "config.toml").write_text(f"""[node]
data_dir = "var"
study_quiet_seconds = 0
lease_seconds = 3600
retention_hours = 0

[[models]]
name = "bench"
path = "{model}"
folds = {json.dumps(folds)}
use_mirroring = false
fold_parallel = {str(setting.fold_parallel).lower()}
{workers}""")
    config = load_config(work / "config.toml")
    sessions = make_sessionmaker(config.database_url)
    names = [f"w{i}" for i in range(len(setting.workers))]
    processes = []
    with open(work / "workers.log", "wb") as log:
        for name, device in zip(names, setting.workers):
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "dicomnode", "worker", "--config", str(work / "config.toml"),
                 "--device", device, "--name", name], stdout=log, stderr=log))

    def details() -> list[dict]:
        with sessions() as session:
            return [json.loads(c.detail) for c in session.scalars(select(Component).where(Component.name == "worker"))]

    def all_done() -> bool:
        with sessions() as session:
            states = list(session.scalars(select(Job.state)))
        if JobState.FAILED in states:
            raise RuntimeError(f"a job failed; see {work / 'workers.log'}")
        return all(s == JobState.SUCCEEDED for s in states)

    try:
        wait(lambda: {d.get("name") for d in details()} >= set(names), timeout, "every worker waiting for jobs")
        for study in warmups[:len(names)]:  # one per worker: each loads the model
            index_study(sessions, study)
        assembler.queue_ready_studies(sessions, config)
        wait(all_done, timeout, "the warm-up studies")
        cold = [d["name"] for d in details() if "bench" not in d.get("models", [])]
        if cold:
            print(f"  note: worker(s) {cold} took no warm-up study; they load the model in the timed part")
        with sessions() as session:
            before = session.scalar(select(Job.id).order_by(Job.id.desc()).limit(1))
        for study in studies:
            index_study(sessions, study)
        started = time.perf_counter()
        assembler.queue_ready_studies(sessions, config)
        wait(all_done, timeout * len(studies), "the timed studies")
        wall = time.perf_counter() - started
        with sessions() as session:
            done = [event_data(e) for e in session.scalars(select(Event).where(
                Event.kind == EventKind.INFERENCE_DONE, Event.job_id > before))]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(60)
    return Result(setting, wall / len(studies), statistics.median(d["seconds"] for d in done),
                  sorted({d["device"] for d in done}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help='tiny run on the CPU: two "cpu" devices, two studies')
    parser.add_argument("--studies", type=int, default=8, help="timed studies per setting")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "demo-petct")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a study")
    parser.add_argument("--devices", nargs="+", help='instead of every GPU found: e.g. "cuda:0 cuda:0" (two '
                        "workers sharing one GPU) or \"cuda:1 cuda:2\"")
    args = parser.parse_args(argv)

    if args.smoke:
        devices, count = args.devices or ["cpu", "cpu"], 2
    elif args.devices:
        devices, count = args.devices, args.studies
    else:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0:
            print("no CUDA GPU visible to torch: run with --smoke on the CPU")
            return 2
        devices, count = [f"cuda:{i}" for i in range(gpus)], args.studies
        print(f"{gpus} GPU(s): " + ", ".join(torch.cuda.get_device_name(i) for i in range(gpus)))
    n = len(devices)
    settings = [
        Setting("1 worker", devices[:1], [], False),
        Setting(f"{n} workers", devices, [], False),
        Setting(f"1 worker, folds on {n} devices", devices[:1], devices, True),
    ]
    work = Path(tempfile.mkdtemp(prefix="bench-multigpu-"))
    try:
        print(f"writing {count + n} synthetic studies ...", flush=True)
        studies = [write_study(work / "studies" / f"s{k}", seed=k).root for k in range(count + n)]
        results = []
        for k, setting in enumerate(settings):
            print(f"{setting.label} ({', '.join(setting.workers)}) ...", flush=True)
            results.append(run_setting(setting, studies[n:], studies[:n], args.model.resolve(), args.folds,
                                       work / f"setting{k}", args.timeout))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = results[0]
    print(f"\nwarm queue, {count} studies per setting, model {args.model.name} (folds {args.folds}), "
          f"{'smoke run on the CPU' if args.smoke else f'{n} GPU(s)'}")
    print(f"{'setting':<34} {'s/study':>8} {'model s':>8} {'throughput x':>13} {'model x':>8}  ran on")
    for r in results:
        print(f"{r.setting.label:<34} {r.seconds_per_study:8.2f} {r.model_seconds:8.2f} "
              f"{base.seconds_per_study / r.seconds_per_study:13.2f} {base.model_seconds / r.model_seconds:8.2f}"
              f"  {', '.join(r.devices)}")
    throughput = base.seconds_per_study / results[1].seconds_per_study
    print(f"\n{n} workers / 1 worker, studies per second: {throughput:.2f}x; "
          f"one study's model time with folds on {n} devices / on 1: "
          f"{base.model_seconds / results[2].model_seconds:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
