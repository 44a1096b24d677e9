"""The time [models.compare] adds to a job: the same follow-up study through the warm worker
(the demo model, CPU, no destinations) with compare off and with compare on (its baseline
processed before, so the job finds the prior, keeps its time point and compares), alternating.

Prints each run's job seconds (claim to success, inference included), the medians, their
difference and ratio, and for the compare-on runs the steps compare adds, from the job's events:
choosing the prior (started -> compare-prior), keeping the time point (measured -> timepoint-saved)
and comparing (timepoint-saved -> compared: registration, matching, PERCIST).

    .venv/bin/python bench/bench_compare.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config, load_config
from dicomnode.pipeline import assembler
from dicomnode.pipeline.queue import RetryPolicy, requeue
from dicomnode.pipeline.worker import Worker
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.index import ReceivedInstance, record_instance
from dicomnode.store.tables import Event, Job, utcnow
from dicomnode.synth.timeline import write_timeline

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "demo-petct"


def _site(folder: Path, compare: bool) -> tuple[Config, sessionmaker]:
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(f"""
[node]
data_dir = "var"
study_quiet_seconds = 0
[[models]]
name = "demo-petct"
path = "{MODEL}"
folds = [0, 1, 2, 3, 4]
device = "cpu"
use_mirroring = false
{"[models.compare]" if compare else ""}
""")
    config = load_config(folder / "config.toml")
    return config, make_sessionmaker(config.database_url)


def _index(sessions: sessionmaker, files: list[Path]) -> None:
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        record_instance(sessions, ReceivedInstance(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1",
            ds.Modality, int(ds.SeriesNumber), str(ds.get("SeriesDescription", "")), str(path), "BENCH"),
            now=utcnow().replace(year=2020))


def _files(study) -> list[Path]:  # noqa: ANN001 - a SyntheticStudy
    return sorted(study.ct_files) + sorted(study.pt_files)


def _steps(sessions: sessionmaker, job_id: int) -> dict[str, float]:
    with sessions() as session:
        at = {e.kind: e.at for e in session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id))}
    return {"prior": (at["compare-prior"] - at["started"]).total_seconds(),
            "time point": (at["timepoint-saved"] - at["measured"]).total_seconds(),
            "compare": (at["compared"] - at["timepoint-saved"]).total_seconds()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    timeline = write_timeline(work / "timeline", patient_id="BENCH-1")
    sites = {"off": _site(work / "off", False), "on": _site(work / "on", True)}
    workers = {}
    model = None
    for name, (config, sessions) in sites.items():
        workers[name] = Worker(config, sessions)
        if model is None:
            model = workers[name].models.get("demo-petct")
        workers[name].models._models["demo-petct"] = model  # loaded once, as the worker keeps it
    config, sessions = sites["on"]
    _index(sessions, _files(timeline.baseline))
    assembler.queue_ready_studies(sessions, config)
    assert workers["on"].run_one()  # the baseline: the prior the follow-up finds
    for _, sessions in sites.values():
        _index(sessions, _files(timeline.followup))
    seconds: dict[str, list[float]] = {"off": [], "on": []}
    steps: list[dict[str, float]] = []
    study = timeline.followup.study_instance_uid
    for round_ in range(args.rounds):
        for name in (("off", "on") if round_ % 2 == 0 else ("on", "off")):
            config, sessions = sites[name]
            if round_ == 0:
                [job_id] = assembler.queue_ready_studies(sessions, config)
            else:
                job_id = requeue(sessions, study, "demo-petct", RetryPolicy.for_jobs(config.node))
            started = time.perf_counter()
            assert workers[name].run_one()
            seconds[name].append(time.perf_counter() - started)
            with sessions() as session:
                assert session.get(Job, job_id).state == "succeeded", session.get(Job, job_id).error
            if name == "on":
                steps.append(_steps(sessions, job_id))
            print(f"round {round_ + 1} compare {name:>3}: {seconds[name][-1]:6.2f} s")
    off, on = statistics.median(seconds["off"]), statistics.median(seconds["on"])
    print(f"\nmedian job seconds: compare off {off:.2f}, on {on:.2f}: +{on - off:.2f} s per job ({on / off:.2f}x)")
    for key in ("prior", "time point", "compare"):
        print(f"  {key:>10}: median {statistics.median(s[key] for s in steps):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
