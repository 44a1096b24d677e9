"""Synthetic PET/CT phantom: a torso with lungs, spine, liver and hot spherical lesions.

The phantom is described in patient millimetres (DICOM LPS) and rasterised onto any axial
grid, so the same patient can be written as a CT series, a PET series, or a training case
on the model's grid. Pure numpy/scipy: used by the DICOM generator (`dicomnode synth`) and
by the script that trains the demo model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

# Torso: an elliptic cylinder along z, centred on x = y = 0.
BODY_SEMI_AXES_MM = (115.0, 85.0)  # left-right, anterior-posterior
BODY_Z_RANGE_MM = (-96.0, 96.0)
SOFT_TISSUE_HU = 40.0
AIR_HU = -1000.0
LUNG_HU = -820.0
BONE_HU = 700.0
LESION_HU = 30.0

BACKGROUND_SUV = 1.0
LUNG_SUV = 0.35
LIVER_SUV = 2.0
PET_FWHM_MM = 6.0


@dataclass(frozen=True)
class Grid:
    """An axial image grid: shape and spacing in (z, y, x), origin of voxel 0 in (x, y, z) mm."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    @classmethod
    def centred(cls, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> "Grid":
        nz, ny, nx = shape
        sz, sy, sx = spacing
        origin = (-(nx - 1) * sx / 2.0, -(ny - 1) * sy / 2.0, -(nz - 1) * sz / 2.0)
        return cls(shape=shape, spacing=spacing, origin=origin)

    def axes_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates along z, y and x in mm."""
        nz, ny, nx = self.shape
        sz, sy, sx = self.spacing
        ox, oy, oz = self.origin
        return oz + sz * np.arange(nz), oy + sy * np.arange(ny), ox + sx * np.arange(nx)


# The grids the synthetic studies are written on: PET at 4.08 mm in-plane, CT at 2.04 mm,
# both with 3 mm slices over the same 192 mm and one frame of reference.
PET_GRID = Grid.centred((64, 64, 64), (3.0, 4.08, 4.08))
CT_GRID = Grid.centred((64, 128, 128), (3.0, 2.04, 2.04))


@dataclass(frozen=True)
class Lesion:
    centre_mm: tuple[float, float, float]  # x, y, z
    radius_mm: float
    suv: float


@dataclass(frozen=True)
class Phantom:
    seed: int
    lesions: tuple[Lesion, ...] = field(default_factory=tuple)
    body_z_range_mm: tuple[float, float] = BODY_Z_RANGE_MM  # the torso's extent along z


def whole_body_phantom(seed: int, z_range_mm: tuple[float, float], n_lesions: int = 24) -> Phantom:
    """A torso over `z_range_mm` (a whole-body scan's length) with `n_lesions` non-overlapping
    lesions (radius 4-20 mm, SUV 3-15) spread along it: the whole-body bench's patient."""
    rng = np.random.default_rng(seed)
    low, high = z_range_mm
    lesions: list[Lesion] = []
    for _ in range(100 * n_lesions):
        if len(lesions) == n_lesions:
            break
        radius = float(rng.uniform(4.0, 20.0))
        x, y = float(rng.uniform(-80.0, 80.0)), float(rng.uniform(-55.0, 55.0))
        z = float(rng.uniform(low + radius + 10.0, high - radius - 10.0))
        ax, ay = BODY_SEMI_AXES_MM
        if (x / (ax - radius - 10.0)) ** 2 + (y / (ay - radius - 10.0)) ** 2 > 1.0:
            continue
        centre = (x, y, z)
        if any(np.linalg.norm(np.subtract(centre, les.centre_mm)) < radius + les.radius_mm + 12.0 for les in lesions):
            continue
        lesions.append(Lesion((x, y, z), radius, float(rng.uniform(3.0, 15.0))))
    return Phantom(seed=seed, lesions=tuple(lesions), body_z_range_mm=(float(low), float(high)))


def random_phantom(seed: int, n_lesions: int | None = None) -> Phantom:
    """A phantom with 2 to 6 non-overlapping lesions (radius 7-15 mm, SUV 4-12) inside the body."""
    rng = np.random.default_rng(seed)
    if n_lesions is None:
        n_lesions = int(rng.integers(2, 7))
    lesions: list[Lesion] = []
    attempts = 0
    while len(lesions) < n_lesions and attempts < 1000:
        attempts += 1
        radius = float(rng.uniform(7.0, 15.0))
        x = float(rng.uniform(-80.0, 80.0))
        y = float(rng.uniform(-55.0, 55.0))
        z = float(rng.uniform(BODY_Z_RANGE_MM[0] + 25.0, BODY_Z_RANGE_MM[1] - 25.0))
        ax, ay = BODY_SEMI_AXES_MM
        if (x / (ax - radius - 10.0)) ** 2 + (y / (ay - radius - 10.0)) ** 2 > 1.0:
            continue
        if any(
            np.linalg.norm(np.subtract((x, y, z), les.centre_mm)) < radius + les.radius_mm + 12.0
            for les in lesions
        ):
            continue
        lesions.append(Lesion((x, y, z), radius, float(rng.uniform(4.0, 12.0))))
    return Phantom(seed=seed, lesions=tuple(lesions))


def _ellipsoid(zz: np.ndarray, yy: np.ndarray, xx: np.ndarray, centre: Sequence[float],
               semi_axes: Sequence[float]) -> np.ndarray:
    (cx, cy, cz), (ax, ay, az) = centre, semi_axes
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 + ((zz - cz) / az) ** 2 <= 1.0


# A pose maps the scanner coordinates of voxel centres (zz, yy, xx mm) to the patient's body
# coordinates the phantom is described in: the same patient lying elsewhere on another day
# (dicomnode.synth.timeline). None: the body coordinates are the scanner's.
Pose = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _mesh(grid: Grid, pose: Pose | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z, y, x = grid.axes_mm()
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    return (zz, yy, xx) if pose is None else pose(zz, yy, xx)


def _tissue_masks(grid: Grid, pose: Pose | None = None,
                  body_z_range_mm: tuple[float, float] = BODY_Z_RANGE_MM) -> dict[str, np.ndarray]:
    zz, yy, xx = _mesh(grid, pose)
    ax, ay = BODY_SEMI_AXES_MM
    in_z = (zz >= body_z_range_mm[0]) & (zz <= body_z_range_mm[1])
    body = ((xx / ax) ** 2 + (yy / ay) ** 2 <= 1.0) & in_z
    lungs = (
        _ellipsoid(zz, yy, xx, (-50.0, -5.0, 35.0), (38.0, 50.0, 60.0))
        | _ellipsoid(zz, yy, xx, (50.0, -5.0, 35.0), (38.0, 50.0, 60.0))
    ) & body
    spine = ((xx / 14.0) ** 2 + ((yy - 55.0) / 14.0) ** 2 <= 1.0) & in_z
    liver = _ellipsoid(zz, yy, xx, (-45.0, 5.0, -45.0), (55.0, 45.0, 35.0)) & body & ~lungs
    return {"body": body, "lungs": lungs, "spine": spine, "liver": liver, "grid": (zz, yy, xx)}


def liver_mask(grid: Grid, pose: Pose | None = None) -> np.ndarray:
    """The liver (bool) on `grid`: what a CT organ model would find."""
    return _tissue_masks(grid, pose)["liver"]


def lesion_masks(phantom: Phantom, grid: Grid, pose: Pose | None = None) -> np.ndarray:
    """Label map on `grid`: 0 background, k for the k-th lesion (1-based)."""
    zz, yy, xx = _mesh(grid, pose)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    for k, les in enumerate(phantom.lesions, start=1):
        r = les.radius_mm
        labels[_ellipsoid(zz, yy, xx, les.centre_mm, (r, r, r))] = k
    return labels


def ct_hu(phantom: Phantom, grid: Grid, noise_hu: float = 15.0, pose: Pose | None = None) -> np.ndarray:
    """CT in Hounsfield units (int16) on `grid`."""
    masks = _tissue_masks(grid, pose, phantom.body_z_range_mm)
    hu = np.full(grid.shape, AIR_HU, dtype=np.float32)
    hu[masks["body"]] = SOFT_TISSUE_HU
    hu[masks["liver"]] = 60.0
    hu[masks["lungs"]] = LUNG_HU
    hu[masks["spine"]] = BONE_HU
    hu[lesion_masks(phantom, grid, pose) > 0] = LESION_HU
    rng = np.random.default_rng(phantom.seed + 1)
    hu += rng.normal(0.0, noise_hu, grid.shape).astype(np.float32) * masks["body"]
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


def pet_suv(phantom: Phantom, grid: Grid, noise_fraction: float = 0.10, pose: Pose | None = None) -> np.ndarray:
    """PET in SUVbw (float32) on `grid`: activity map, blurred to the scanner's resolution, with noise."""
    masks = _tissue_masks(grid, pose, phantom.body_z_range_mm)
    suv = np.zeros(grid.shape, dtype=np.float32)
    suv[masks["body"]] = BACKGROUND_SUV
    suv[masks["liver"]] = LIVER_SUV
    suv[masks["lungs"]] = LUNG_SUV
    suv[masks["spine"]] = 1.5
    labels = lesion_masks(phantom, grid, pose)
    for k, les in enumerate(phantom.lesions, start=1):
        suv[labels == k] = les.suv
    sigma_mm = PET_FWHM_MM / 2.3548
    suv = ndimage.gaussian_filter(suv, sigma=[sigma_mm / s for s in grid.spacing])
    rng = np.random.default_rng(phantom.seed + 2)
    suv *= 1.0 + rng.normal(0.0, noise_fraction, grid.shape).astype(np.float32)
    return np.clip(suv, 0.0, None).astype(np.float32)
