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
nnU-Net included, as the worker pays them once) is counted in its total. Prints a table, with
the voxels where the node's label map differs from nnUNetv2_predict's (it must be 0; not timed),
and the throughput ratio; with `--runs N` the whole comparison N times (the model loaded afresh
each run), each run's ratio and their median; `--json PATH` writes the figures (keys: studies,
runs: [{node_s, node_load_s, cli_s, ratio, voxels_differing}], ratio_median).

    .venv/bin/python bench/bench_models.py [--studies 5] [--runs 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
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


def node_seconds(studies: list[Path], settings: ModelSettings) -> tuple[float, list[float], list]:
    """(load seconds, seconds per study, label maps) through the worker's path with a warm model."""
    from inference import SegmentationModel

    started = time.perf_counter()
    model = SegmentationModel(MODEL_DIR, folds=settings.folds, device="cpu", use_mirroring=False,
                              cpu_fold_per_core=settings.cpu_fold_per_core)
    load = time.perf_counter() - started
    per_study, labels = [], []
    for study in studies:
        started = time.perf_counter()
        selection = inspect_path(study, settings).studies[0].selection
        inputs = assemble_inputs({c: selection.paths(c) for c in selection.chosen}, ["CT", "PET"], "PET")
        labels.append(model.predict(inputs.channels, inputs.spacing))
        per_study.append(time.perf_counter() - started)
    return load, per_study, labels


def cli_seconds(studies: list[Path], settings: ModelSettings, work: Path) -> tuple[list[float], list]:
    """Seconds per study of nnUNetv2_predict, and the label maps it wrote."""
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
        started = time.perf_counter()
        subprocess.run([str(BIN / "nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d", DATASET,
                        "-c", "3d_fullres", "-p", "nnUNetResEncUNetLPlans", "-tr", "nnUNetTrainer",
                        "-f", *FOLDS, "--disable_tta", "-device", "cpu", "-npp", "1", "-nps", "1"],
                       check=True, capture_output=True, env=env, timeout=900)
        per_study.append(time.perf_counter() - started)
        labels.append(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "study.nii.gz"))))
    return per_study, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--runs", type=int, default=1, help="the whole comparison this many times")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    settings = ModelSettings(name="demo-petct", path=MODEL_DIR, folds=[int(f) for f in FOLDS], use_mirroring=False)
    print(f"demo-petct, {len(FOLDS)} folds, no mirroring, CPU ({len(os.sched_getaffinity(0))} cores), "
          f"{args.studies} studies, {args.runs} run(s)\n", flush=True)
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
    ratios = [r["ratio"] for r in runs]
    print(f"warm queue / nnUNetv2_predict throughput: {', '.join(f'{r:.2f}x' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}x (load average {os.getloadavg()[0]:.1f})")
    if args.json:
        args.json.write_text(json.dumps({"bench": "models", "studies": args.studies, "runs": runs,
                                         "ratio_median": statistics.median(ratios)}, indent=2))
    return 0


def report(run: int, load: float, node: list[float], cli: list[float], differing: list[int]) -> dict:
    print(f"run {run + 1}\n| study | node, warm (s) | nnUNetv2_predict (s) | voxels differing |\n|---|---|---|---|")
    for k, (a, b, d) in enumerate(zip(node, cli, differing)):
        print(f"| {k} | {a:.1f} | {b:.1f} | {d} |")
    node_total, cli_total = load + sum(node), sum(cli)
    print(f"| all, node incl. one model load ({load:.1f} s) | {node_total:.1f} | {cli_total:.1f} "
          f"| {sum(differing)} |\n")
    print(f"throughput: node {60 * len(node) / node_total:.2f} studies/min, nnUNetv2_predict "
          f"{60 * len(cli) / cli_total:.2f} studies/min; ratio {cli_total / node_total:.2f}x "
          f"(median per study {statistics.median(node):.1f} s vs {statistics.median(cli):.1f} s)\n", flush=True)
    return {"node_s": [round(s, 2) for s in node], "node_load_s": round(load, 2), "cli_s": [round(s, 2) for s in cli],
            "ratio": round(cli_total / node_total, 3), "voxels_differing": differing}


if __name__ == "__main__":
    sys.exit(main())
