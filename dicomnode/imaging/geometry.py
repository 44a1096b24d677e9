"""One rule for a stack of single-frame slices, used both by series selection (on header
facts, to give a series its verdict) and by volume building (on the datasets it reads), with
one tolerance, so a series selection accepts is one the worker can build:

  * one ImageOrientationPatient for every slice (within 1e-4);
  * axial and axis-aligned: rows along x, columns along y, the normal along z (either sign);
  * no two slices at the same position along the normal, and a regular spacing: every step
    within 0.01 mm plus 0.1 % of the median step (a larger step is a gap: slices missing).

Slices are ordered by their position along the normal, never by InstanceNumber.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ORIENTATION_TOLERANCE = 1e-4
POSITION_TOLERANCE_MM = 0.01  # absolute, plus 0.1 % of the slice spacing


class GeometryError(ValueError):
    """The slices do not form one regular axial stack; the message says why."""


def position_tolerance(spacing: float) -> float:
    """How far a slice step may be from the spacing (and how close two positions count as one)."""
    return POSITION_TOLERANCE_MM + 1e-3 * spacing


@dataclass(frozen=True)
class SliceStack:
    row: tuple[float, float, float]  # unit vectors, rounded to the axes
    col: tuple[float, float, float]
    normal: tuple[float, float, float]
    order: tuple[int, ...]  # indices of the input slices, by position along the normal
    positions: tuple[float, ...]  # positions along the normal in that order, mm
    spacing: float | None  # None for a single slice

    @property
    def z_min(self) -> float:
        return self.positions[0]

    @property
    def z_max(self) -> float:
        return self.positions[-1]


def slice_stack(orientations: Sequence[Sequence[float]], positions: Sequence[Sequence[float]]) -> SliceStack:
    """The slices (ImageOrientationPatient, ImagePositionPatient of each) as one stack; GeometryError says
    why they are not one."""
    if len(orientations) == 0:
        raise GeometryError("no slices")
    o = np.asarray(orientations, dtype=float)
    p = np.asarray(positions, dtype=float)
    if np.abs(o - o[0]).max() > ORIENTATION_TOLERANCE:
        raise GeometryError("mixed ImageOrientationPatient")
    row, col = o[0, :3], o[0, 3:]
    normal = np.cross(row, col)
    axis_aligned = all(np.abs(np.abs(v) - np.eye(3)[axis]).max() < ORIENTATION_TOLERANCE
                       for v, axis in ((row, 0), (col, 1), (normal, 2)))
    if not axis_aligned:
        raise GeometryError("not axial (ImageOrientationPatient " + "\\".join(f"{v:g}" for v in o[0]) + ")")
    row, col, normal = np.round(row), np.round(col), np.round(normal)
    along = p @ normal
    order = np.argsort(along, kind="stable")
    z = along[order]
    spacing = None
    if len(z) > 1:
        steps = np.diff(z)
        duplicate = steps < POSITION_TOLERANCE_MM
        if duplicate.any():
            k = int(np.argmax(duplicate))
            raise GeometryError(f"{int(duplicate.sum())} duplicate slice position(s) (z = {z[k]:.2f} mm)")
        spacing = float(np.median(steps))
        irregular = np.abs(steps - spacing) > position_tolerance(spacing)
        if irregular.any():
            k = int(np.argmax(irregular))
            missing = round(steps[k] / spacing) - 1
            what = f"{missing} slice(s) missing" if missing >= 1 else "irregular spacing"
            raise GeometryError(f"gap in slice positions between z = {z[k]:.2f} and {z[k + 1]:.2f} mm: step "
                                f"{steps[k]:.2f} mm, expected {spacing:.2f} mm ({what})")
    return SliceStack(tuple(row), tuple(col), tuple(normal), tuple(int(i) for i in order), tuple(float(v) for v in z),
                      spacing)
