"""`make bench`: every CPU bench in one run, then one table of the figures and ratios that matter.

Each bench runs as its own process (its output shown as it goes) with `--json PATH`, and the table
is read from those files:

JSON keys read, per bench:

* bench_receive.py: `one_association_inst_per_s` and `four_associations_inst_per_s`, each
  {"dicomnode", "orthanc", "storescp", "disk floor": instances/s, the median of the runs}; `peak_rss_mb`
  {receiver: MB, the largest of the runs};
* bench_wholebody.py: `grids` {"PET", "CT": {"total": wall s, "cpu": CPU s, "steps": {step: s}}},
  `goal_s`;
* bench_models.py: `ratio_median`, `runs` [{"ratio", ...}];
* bench_stow.py: `stow_over_cstore`, `median_ms` {"STOW-RS", "C-STORE"};
* bench_fetch.py: `median_s` {"node C-MOVE", "node C-GET", "Orthanc C-MOVE"}.

A bench that fails, or writes no JSON (an older bench_receive.py without `--json`), leaves its
rows as "-" with the reason; the others still run. bench_gpu_glow.py needs a GPU and is not run
here (its `--smoke` is).

    .venv/bin/python bench/summary.py [--only wholebody,models] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# name -> (script, arguments for a full run, arguments for --quick)
BENCHES = {
    "receive": ("bench_receive.py", [], ["--repeats", "1"]),
    "wholebody": ("bench_wholebody.py", ["--repeats", "3"], ["--repeats", "1", "--grids", "PET"]),
    "models": ("bench_models.py", ["--runs", "3"], ["--runs", "1"]),
    "stow": ("bench_stow.py", [], ["--runs", "5"]),
    "fetch": ("bench_fetch.py", [], ["--repeats", "1"]),
}


def run_bench(name: str, quick: bool, out: Path) -> tuple[dict | None, str]:
    """Run one bench with --json; (its figures, a note: how long, or why there are none)."""
    script, full, short = BENCHES[name]
    path = out / f"{name}.json"
    command = [sys.executable, str(BENCH / script), *(short if quick else full), "--json", str(path)]
    print(f"\n===== {script} {' '.join(command[2:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "TCP_NODELAY": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return None, f"{script} exited {done.returncode}"
    if not path.exists():
        return None, f"{script} wrote no JSON"
    return json.loads(path.read_text()), f"{seconds:.0f} s"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def rows(results: dict[str, dict | None]) -> list[tuple[str, str, str]]:
    """(figure, value, goal) rows of the table."""
    out: list[tuple[str, str, str]] = []
    receive = results.get("receive") or {}
    one, four = receive.get("one_association_inst_per_s") or {}, receive.get("four_associations_inst_per_s") or {}
    rss = receive.get("peak_rss_mb") or {}
    out += [
        ("ingest, 1 association: dicomnode / Orthanc (inst/s)",
         _ratio(one.get("dicomnode"), one.get("orthanc")) + _figures(one), ">= 1.2x"),
        (f"ingest, 4 associations: dicomnode ({receive.get('receive_processes', 1)} receiving processes) / Orthanc "
         "(inst/s)", _ratio(four.get("dicomnode"), four.get("orthanc")) + _figures(four), ">= 1.2x"),
        ("ingest, 4 associations: dicomnode / storescp (inst/s)",
         _ratio(four.get("dicomnode"), four.get("storescp")), ">= 0.5x"),
        ("receiver peak RSS (MB)", f"{rss['dicomnode']:.0f}" if rss.get("dicomnode") else "-", "<= 300"),
        ("ingest, disk floor (the same files fsynced alone), 1 / 4 associations (inst/s)",
         f"{one['disk floor']:.0f} / {four['disk floor']:.0f}" if one.get("disk floor") and four.get("disk floor")
         else "-", "-"),
    ]
    wholebody = results.get("wholebody") or {}
    for grid, figures in (wholebody.get("grids") or {}).items():
        steps = figures.get("steps", {})
        biggest = sorted(steps.items(), key=lambda item: -item[1])[:4]
        out.append((f"whole-body job besides the model, model on the {grid} grid: wall s (CPU s)",
                    f"{figures['total']:.1f} ({figures['cpu']:.1f}); most: "
                    + ", ".join(f"{step} {s:.1f}" for step, s in biggest),
                    f"<= {wholebody.get('goal_s', 15):g} s"))
    if not wholebody:
        out.append(("whole-body job besides the model (s)", "-", "<= 15 s"))
    models = results.get("models") or {}
    out.append(("CPU warm queue / nnUNetv2_predict (throughput, 5 demo studies)",
                f"{models['ratio_median']:.2f}x (runs " + ", ".join(f"{r['ratio']:.2f}" for r in models["runs"]) + ")"
                if models else "-", ">= 3x"))
    stow = results.get("stow") or {}
    out.append(("one SEG: STOW-RS / C-STORE time", f"{stow['stow_over_cstore']:.2f}" if stow else "-", "-"))
    fetch = (results.get("fetch") or {}).get("median_s") or {}
    orthanc = fetch.get("Orthanc C-MOVE")
    for way in ("node C-MOVE", "node C-GET"):
        out.append((f"fetch 600 instances: {way} speed / Orthanc-to-Orthanc C-MOVE",
                    _ratio(orthanc, fetch.get(way)), "-"))
    return out


def _figures(by_receiver: dict) -> str:
    if not by_receiver:
        return ""
    return " (" + ", ".join(f"{name} {value:.0f}" for name, value in by_receiver.items()) + ")"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated, of {', '.join(BENCHES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a check that everything runs")
    parser.add_argument("--json", type=Path, help="also write every bench's figures here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benches {unknown}: choose from {', '.join(BENCHES)}")
    results: dict[str, dict | None] = {}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-summary-") as tmp:
        for name in names:
            results[name], notes[name] = run_bench(name, args.quick, Path(tmp))
    print(f"\n===== summary ({', '.join(f'{n}: {note}' for n, note in notes.items())}; "
          f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f})\n")
    print("| figure | value | goal |\n|---|---|---|")
    for figure, value, goal in rows(results):
        print(f"| {figure} | {value} | {goal} |")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "notes": notes}, indent=2))
    return 0 if all(results.get(n) is not None for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
