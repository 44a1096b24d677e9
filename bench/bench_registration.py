"""Time of the comparison with a prior (issue 16) on the synthetic patient timeline, as ratios
against named peers in the same run:

- `compare(current, prior)` (SUL, liver spheres, measuring both studies, registration, matching,
  PERCIST) against `measure_lesions` of the current study alone (what every job already does);
- the registration on the 4 mm grid it uses (`REGISTRATION_SPACING_MM`) against the same
  registration on the CT's own 2.04 mm grid (the written studies' CT: 128 x 128 x 64), with
  the body-surface residual of each.

    .venv/bin/python bench/bench_registration.py [--repeats 3]

Figures are process CPU seconds (all threads), median of the repeats; the machine's load does
not change the ratios much, wall times would.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from dicomnode.imaging import registration
from dicomnode.imaging.comparison import compare
from dicomnode.imaging.measures import measure_lesions
from dicomnode.synth import petct_phantom as ph
from dicomnode.synth.timeline import timeline


def cpu(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        times.append(time.process_time() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    prior, current = timeline("mixed").timepoints(ct_grid=ph.CT_GRID)

    t_compare, _ = cpu(lambda: compare(current, prior), args.repeats)
    t_measure, _ = cpu(lambda: measure_lesions(current.labels, current.suv, current.spacing_zyx), args.repeats)
    print(f"compare {t_compare:.2f} s, measure_lesions {t_measure:.3f} s: ratio {t_compare / t_measure:.0f}")

    def register():  # noqa: ANN202
        return registration.register_ct(current.ct, current.ct_geometry, prior.ct, prior.ct_geometry)

    t_coarse, coarse = cpu(register, args.repeats)
    saved = registration.REGISTRATION_SPACING_MM
    registration.REGISTRATION_SPACING_MM = 0.0  # the CT's own grid
    try:
        t_native, native = cpu(register, args.repeats)
    finally:
        registration.REGISTRATION_SPACING_MM = saved
    print(f"registration on the {saved:g} mm grid {t_coarse:.2f} s (residual {coarse.surface_residual_mm:.2f} mm, "
          f"rotation {coarse.rotation_deg:.2f} deg), on the CT's own grid {t_native:.2f} s (residual "
          f"{native.surface_residual_mm:.2f} mm, rotation {native.rotation_deg:.2f} deg): ratio "
          f"{t_native / t_coarse:.1f}")


if __name__ == "__main__":
    main()
