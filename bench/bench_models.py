"""Throughput of the warm worker against nnU-Net's own CLI on the same five studies.

Five synthetic PET/CT studies (dicomnode.synth, seeds 0..4) are segmented with the demo model
(models/demo-petct, 5 folds, no mirroring, CPU) two ways:

* node: the worker's path for each study, with the model loaded once (the worker's
  ModelCache, `[[models]]` defaults: on the CPU the folds one per core, inference/model.py):
  series selection, volumes, SUVbw, CT onto the PET grid, then prediction;
* nnU-Net CLI: `nnUNetv2_predict` once per study on the NIfTI files `dicomnode inspect
  --export` writes for it (the node's exact inputs), as a site running nnU-Net per study
  would: each call starts Python, loads the 5 folds and predicts.

The time to write the NIfTIs is not counted for the CLI. The node's load (imports of torch and
nnU-Net included, as the worker pays them once) is counted in its total; only the first run pays
the imports, later runs of `--runs N` find them done in this process and pay the model's load alone
(the steady state of a warm queue), so the first run's ratio is the one with a worker's start-up.
Both sides are timed in wall seconds and in CPU seconds (the node: this process's, all its threads; the CLI: its
process's, from getrusage of the children), the same steps on both: the wall ratio swings with
whatever else runs on the machine (a 2-core box shared with other work), the CPU ratio much less.
Prints a table, with the voxels where the node's label map differs from nnUNetv2_predict's (it
must be 0; not timed), and the throughput ratios; with `--runs N` the whole comparison N times
(the model loaded afresh each run), each run's ratios and their medians; `--json PATH` writes the
figures (keys: studies, runs: [{node_s, node_load_s, cli_s, ratio, node_cpu_s, node_load_cpu_s,
cli_cpu_s, cpu_ratio, voxels_differing}], ratio_median, cpu_ratio_median).

    .venv/bin/python bench/bench_models.py [--studies 5] [--runs 3] [--json PATH] [--no-cpu-fold-per-core]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dicomnode.config import ModelSettings
from dicomnode.ops.inspect import export_inputs, inspect_path
from dicomnode.pipeline.inputs import assemble_inputs
from dicomnode.synth.petct import write_study

REPO = Path(__file__).resolve().parents[1]

MODEL_DIR = REPO / "models" / "demo-petct"
DATASET = "Dataset900_DemoPetCt"  # the results layout nnUNetv2_predict wants, linked to the model
RESULTS_NAME = "nnUNetTrainer__nnUNetResEncUNetLPlans__3d_fullres"
FOLDS = ["0", "1", "2", "3", "4"]
BIN = Path(sys.executable).parent


def node_seconds(studies: list[Path], settings: ModelSettings) -> tuple[tuple, list[tuple], list]:
    """((load wall, CPU seconds), (wall, CPU seconds) per study, label maps) through the worker's
    path with a warm model."""
    from inference import SegmentationModel

    started, cpu = time.perf_counter(), time.process_time()
    model = SegmentationModel(MODEL_DIR, folds=settings.folds, device="cpu", use_mirroring=False,
                              cpu_fold_per_core=settings.cpu_fold_per_core)
    load = (time.perf_counter() - started, time.process_time() - cpu)
    per_study, labels = [], []
    for study in studies:
        started, cpu = time.perf_counter(), time.process_time()
        selection = inspect_path(study, settings).studies[0].selection
        inputs = assemble_inputs({c: selection.paths(c) for c in selection.chosen}, ["CT", "PET"], "PET")
        labels.append(model.predict(inputs.channels, inputs.spacing))
        per_study.append((time.perf_counter() - started, time.process_time() - cpu))
    return load, per_study, labels


def cli_seconds(studies: list[Path], settings: ModelSettings, work: Path) -> tuple[list[tuple], list]:
    """(wall, CPU seconds) per study of nnUNetv2_predict, and the label maps it wrote."""
    import SimpleITK as sitk

    results = work / "nnUNet_results"
    (results / DATASET).mkdir(parents=True)
    (results / DATASET / RESULTS_NAME).symlink_to(MODEL_DIR)
    env = {**os.environ, "nnUNet_results": str(results), "nnUNet_raw": str(work), "nnUNet_preprocessed": str(work),
           "nnUNet_compile": "f"}
    per_study, labels = [], []
    for k, study in enumerate(studies):
        images, out = work / f"images{k}", work / f"predicted{k}"
        export = export_inputs(inspect_path(study, settings).studies[0], settings, work / f"export{k}")
        images.mkdir()
        shutil.copy(export["CT"], images / "study_0000.nii.gz")
        shutil.copy(export["PET"], images / "study_0001.nii.gz")
        started, cpu = time.perf_counter(), _children_cpu()
        subprocess.run([str(BIN / "nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d", DATASET,
                        "-c", "3d_fullres", "-p", "nnUNetResEncUNetLPlans", "-tr", "nnUNetTrainer",
                        "-f", *FOLDS, "--disable_tta", "-device", "cpu", "-npp", "1", "-nps", "1"],
                       check=True, capture_output=True, env=env, timeout=900)
        per_study.append((time.perf_counter() - started, _children_cpu() - cpu))
        labels.append(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "study.nii.gz"))))
    return per_study, labels


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--runs", type=int, default=1, help="the whole comparison this many times")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--no-cpu-fold-per-core", action="store_true",
                        help="the node's folds one after the other on all cores, as nnU-Net's loop runs them "
                             "(cpu_fold_per_core = false)")
    args = parser.parse_args(argv)
    settings = ModelSettings(name="demo-petct", path=MODEL_DIR, folds=[int(f) for f in FOLDS], use_mirroring=False,
                             cpu_fold_per_core=not args.no_cpu_fold_per_core)
    print(f"demo-petct, {len(FOLDS)} folds, no mirroring, CPU ({len(os.sched_getaffinity(0))} cores), "
          f"{args.studies} studies, {args.runs} run(s), node's folds "
          f"{'one per core' if settings.cpu_fold_per_core else 'one after the other'}\n", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        studies = [write_study(Path(tmp) / f"study{seed}", seed=seed).root for seed in range(args.studies)]
        for run in range(args.runs):
            work = Path(tmp) / f"run{run}"
            work.mkdir()
            load, node, node_labels = node_seconds(studies, settings)
            cli, cli_labels = cli_seconds(studies, settings, work)
            differing = [int((a != b).sum()) for a, b in zip(node_labels, cli_labels)]
            runs.append(report(run, load, node, cli, differing))
    ratios, cpu_ratios = [r["ratio"] for r in runs], [r["cpu_ratio"] for r in runs]
    print(f"warm queue / nnUNetv2_predict throughput: {', '.join(f'{r:.2f}x' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}x; in CPU seconds {', '.join(f'{r:.2f}x' for r in cpu_ratios)}; "
          f"median {statistics.median(cpu_ratios):.2f}x (load average {os.getloadavg()[0]:.1f})")
    if args.json:
        args.json.write_text(json.dumps({"bench": "models", "studies": args.studies, "runs": runs,
                                         "ratio_median": statistics.median(ratios),
                                         "cpu_ratio_median": statistics.median(cpu_ratios)}, indent=2))
    return 0


def report(run: int, load: tuple, node: list[tuple], cli: list[tuple], differing: list[int]) -> dict:
    print(f"run {run + 1}\n| study | node, warm (s) | nnUNetv2_predict (s) | node CPU (s) | nnUNetv2_predict CPU (s) "
          "| voxels differing |\n|---|---|---|---|---|---|")
    for k, ((a, a_cpu), (b, b_cpu), d) in enumerate(zip(node, cli, differing)):
        print(f"| {k} | {a:.1f} | {b:.1f} | {a_cpu:.1f} | {b_cpu:.1f} | {d} |")
    node_total, cli_total = load[0] + sum(w for w, _ in node), sum(w for w, _ in cli)
    node_cpu, cli_cpu = load[1] + sum(c for _, c in node), sum(c for _, c in cli)
    print(f"| all, node incl. one model load ({load[0]:.1f} s, {load[1]:.1f} s CPU) | {node_total:.1f} | "
          f"{cli_total:.1f} | {node_cpu:.1f} | {cli_cpu:.1f} | {sum(differing)} |\n")
    print(f"throughput: node {60 * len(node) / node_total:.2f} studies/min, nnUNetv2_predict "
          f"{60 * len(cli) / cli_total:.2f} studies/min; ratio {cli_total / node_total:.2f}x "
          f"(median per study {statistics.median(w for w, _ in node):.1f} s vs "
          f"{statistics.median(w for w, _ in cli):.1f} s); in CPU seconds {cli_cpu / node_cpu:.2f}x\n", flush=True)
    return {"node_s": [round(w, 2) for w, _ in node], "node_load_s": round(load[0], 2),
            "cli_s": [round(w, 2) for w, _ in cli], "ratio": round(cli_total / node_total, 3),
            "node_cpu_s": [round(c, 2) for _, c in node], "node_load_cpu_s": round(load[1], 2),
            "cli_cpu_s": [round(c, 2) for _, c in cli], "cpu_ratio": round(cli_cpu / node_cpu, 3),
            "voxels_differing": differing}

if __name__ == "__main__":
    sys.exit(main())
