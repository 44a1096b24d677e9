"""The PERCIST 1.0 liver reference: mean and SD of uptake in a 3 cm sphere in the right liver lobe.

The mask is regularised first (`regularise_liver`), because organ models give livers with holes,
notches and loose fragments at the edges (TotalSegmentator's included; the repository's stand-in
organ model gives the synthetic timeline's baseline liver in 211 pieces on the CT). On the PET
grid: a morphological closing with a ball of LIVER_CLOSING_RADIUS_MM (gaps and notches up to
about twice that wide are bridged; the array is padded first so the closing does not erode at
the array's edge), then every enclosed hole filled (3-D), then the largest 26-connected
component kept (fragments dropped); scipy.ndimage throughout. A mask that is already solid and
convex comes out unchanged. The sphere is sampled on the regularised mask: a hole the model left
inside the liver is liver here.

Placement rule (the node's, written down because PERCIST leaves it to the reader's hand): the
right lobe is taken as the patient's right half of the regularised mask: the voxels whose LPS x
is at most the mask's median x. The sphere's
centre is the voxel of that half that lies deepest inside it (largest Euclidean distance, in mm,
to the nearest voxel outside the half; ties: the most cranial, then the most right), so the
sphere of LIVER_SPHERE_DIAMETER_MM lies fully inside the right half, away from the hilum and the
left lobe. The centre must be at least the sphere's radius from the half's boundary, otherwise
the reference is not assessed and the reason says how deep the deepest point was. The sphere is the
voxels whose centres lie within the radius of the centre; mean and SD (sample, n - 1) of the
given uptake (SUL for PERCIST) over them.

Without a liver mask, or with an empty one, the reference is not assessed, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dicomnode.imaging.timepoint import VolumeGeometry

LIVER_SPHERE_DIAMETER_MM = 30.0
LIVER_CLOSING_RADIUS_MM = 5.0  # the closing's ball: about one PET voxel and a bit


@dataclass(frozen=True)
class LiverReference:
    assessed: bool
    reason: str = ""  # why not assessed
    mean: float | None = None  # in the uptake's unit (SUL)
    sd: float | None = None
    voxels: int = 0
    centre_mm: tuple[float, float, float] | None = None  # LPS x, y, z
    depth_mm: float | None = None  # the centre's distance to the mask's boundary

    def as_json(self) -> dict:
        return {"assessed": self.assessed, "reason": self.reason, "mean": self.mean, "sd": self.sd,
                "voxels": self.voxels, "centre_mm": list(self.centre_mm) if self.centre_mm else None,
                "depth_mm": self.depth_mm, "sphere_diameter_mm": LIVER_SPHERE_DIAMETER_MM}


def not_assessed(reason: str) -> LiverReference:
    return LiverReference(assessed=False, reason=reason)


def liver_reference(uptake: np.ndarray, liver: np.ndarray | None, geometry: VolumeGeometry) -> LiverReference:
    """The reference sphere's mean and SD of `uptake` (z, y, x) inside `liver` (same grid)."""
    if liver is None:
        return not_assessed("no liver mask (no organ model chained for the liver)")
    mask = np.asarray(liver) != 0
    if not mask.any():
        return not_assessed("the liver mask is empty")
    mask = regularise_liver(mask, geometry.spacing_zyx)
    spacing = geometry.spacing_zyx
    index = np.argwhere(mask)
    x_mm = geometry.index_to_point(index)[:, 0]
    right = x_mm <= np.median(x_mm)  # LPS: +x is the patient's left
    candidates = index[right]
    half = np.zeros_like(mask)
    half[tuple(candidates.T)] = True
    depth = ndimage.distance_transform_edt(np.pad(half, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    depths = depth[tuple(candidates.T)]
    radius = LIVER_SPHERE_DIAMETER_MM / 2.0
    deepest = float(depths.max())
    if deepest < radius:
        return not_assessed(f"no room for a {LIVER_SPHERE_DIAMETER_MM:g} mm sphere in the right liver lobe (its "
                            f"deepest point is {deepest:.1f} mm from the boundary of the mask, regularised)")
    points = geometry.index_to_point(candidates)
    # deepest first, then most cranial (largest z), then most right (smallest x)
    order = np.lexsort((points[:, 0], -points[:, 2], -depths))
    centre = candidates[order[0]]
    sphere = _sphere(mask.shape, centre, spacing, radius) & half
    values = np.asarray(uptake, dtype=np.float64)[sphere]
    centre_mm = tuple(float(v) for v in geometry.index_to_point(centre[None, :])[0])
    return LiverReference(assessed=True, mean=float(values.mean()), sd=float(values.std(ddof=1)),
                          voxels=int(values.size), centre_mm=centre_mm, depth_mm=float(depth[tuple(centre)]))


def regularise_liver(mask: np.ndarray, spacing_zyx: tuple[float, float, float],
                     closing_radius_mm: float = LIVER_CLOSING_RADIUS_MM) -> np.ndarray:
    """The liver mask (bool, z y x) closed with a ball of `closing_radius_mm`, its holes filled and
    its largest 26-connected component kept (see the module)."""
    mask = np.asarray(mask, dtype=bool)
    ball = _ball(closing_radius_mm, spacing_zyx)
    pad = max(ball.shape)
    padded = ndimage.binary_closing(np.pad(mask, pad), structure=ball)
    mask = ndimage.binary_fill_holes(padded[pad:-pad, pad:-pad, pad:-pad] | mask)
    components, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        mask = components == int(np.argmax(sizes))
    return mask


def _ball(radius_mm: float, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """The voxels (z y x) whose centres lie within `radius_mm` of the middle one."""
    reach = [int(radius_mm // s) for s in spacing_zyx]
    grids = np.ogrid[tuple(slice(-k, k + 1) for k in reach)]
    return sum((g * s) ** 2 for g, s in zip(grids, spacing_zyx)) <= radius_mm**2 * (1 + 1e-12)


def _sphere(shape: tuple[int, ...], centre: np.ndarray, spacing: tuple[float, float, float],
            radius: float) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    distance2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing))
    return distance2 <= radius**2 * (1 + 1e-12)
