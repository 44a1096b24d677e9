"""The prior study's CT registered onto the current study's CT (SimpleITK), and what maps through it.

Two studies of one patient on different days have different frames of reference: the patient
lies elsewhere on the table. `register_ct(current_ct, current_geometry, prior_ct, prior_geometry)`
finds the transform that maps a point of the current study's space to the same anatomy in the
prior's (ITK's convention: fixed = current, moving = prior), in two stages:

1. rigid: Euler3DTransform, initialised by the centres of mass (moments) of the two body masks
   (CT > BODY_HU); Mattes mutual information (MI_BINS bins, SAMPLING_FRACTION of the voxels,
   random with a fixed seed), regular step gradient descent, three resolutions (shrink 4, 2, 1;
   smoothing 2, 1, 0 voxels);
2. affine: AffineTransform started from the rigid result, the same metric on fewer samples
   (AFFINE_SAMPLING_FRACTION), two resolutions (shrink 2, 1), AFFINE_ITERATIONS steps at most;
   kept only when its metric, evaluated on the rigid stage's samples at full resolution, is
   better (lower) than the rigid transform's. Two CTs of one body usually differ by a rigid
   motion only, so the rigid result is usually kept.

CT values are clamped to CT_CLAMP_HU first (metal and air beyond it add nothing), and both CTs
are put on a grid of REGISTRATION_SPACING_MM (cubic voxels, Gaussian-smoothed before, so no
aliasing) when theirs is finer: a clinical CT of 512 x 512 x 300 voxels becomes about 3 million
voxels, and the registration's time no longer depends on the scanner's matrix. The residual is
measured on that grid too.

The residual is recorded two ways: the final metric value (Mattes MI, lower is better, negative)
and the body-surface residual: the mean distance (mm) from the prior's body surface, mapped into
the current space, to the current body surface, over the slices both studies cover (surfaces in
plane, per slice, so the field of view's ends do not count as surface). A good registration of
two CTs of one body gives about a voxel or less.

PET shares its study's frame of reference with the CT, so `to_current` maps the prior's SUV
(linear) and lesion labels (nearest neighbour) onto the current PET grid through the same
transform, and `points_to_current` maps points (lesion centroids) through its inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from dicomnode.imaging.timepoint import VolumeGeometry

BODY_HU = -500.0
REGISTRATION_SPACING_MM = 4.0
CT_CLAMP_HU = (-1000.0, 1500.0)
MI_BINS = 32
SAMPLING_FRACTION = 0.25
SAMPLING_SEED = 20240315
RIGID_SHRINK, RIGID_SMOOTH = (4, 2, 1), (2.0, 1.0, 0.0)
AFFINE_SHRINK, AFFINE_SMOOTH = (2, 1), (1.0, 0.0)
RIGID_ITERATIONS = 200
AFFINE_ITERATIONS = 40  # a refinement of the rigid result: it converges in few steps or not at all
AFFINE_SAMPLING_FRACTION = 0.1


class RegistrationError(RuntimeError):
    """The registration could not run or gave no usable transform; the message says why."""


@dataclass(frozen=True)
class Registration:
    transform: sitk.Transform  # current (fixed) point -> prior (moving) point
    stage: str  # "affine" or "rigid": which stage's transform is kept
    rigid_metric: float
    affine_metric: float | None
    surface_residual_mm: float | None  # mean body-surface distance after registration
    surface_residual_before_mm: float | None  # the same without registration (identity), for scale
    rotation_deg: float  # of the rigid stage
    translation_mm: tuple[float, float, float]  # of the rigid stage

    @property
    def final_metric(self) -> float:
        return self.affine_metric if self.stage == "affine" and self.affine_metric is not None else self.rigid_metric

    def as_json(self) -> dict:
        return {"method": f"SimpleITK rigid (Euler3D) then affine, Mattes MI; kept: {self.stage}",
                "stage": self.stage, "rigid_metric": self.rigid_metric, "affine_metric": self.affine_metric,
                "final_metric": self.final_metric, "surface_residual_mm": self.surface_residual_mm,
                "surface_residual_before_mm": self.surface_residual_before_mm,
                "rotation_deg": self.rotation_deg, "translation_mm": list(self.translation_mm),
                "parameters": list(self.transform.GetParameters())}

    def to_current(self, prior_array: np.ndarray, prior_geometry: VolumeGeometry, current_geometry: VolumeGeometry,
                   current_shape: tuple[int, int, int], *, labels: bool = False, default: float = 0.0) -> np.ndarray:
        """`prior_array` (on `prior_geometry`) resampled onto the current grid: nearest neighbour for
        labels (kept integer), linear otherwise; outside the prior's field of view `default`."""
        return resample(prior_array, prior_geometry, current_geometry, current_shape, self.transform,
                        labels=labels, default=default)

    def points_to_current(self, points_xyz: np.ndarray) -> np.ndarray:
        """(n, 3) LPS points of the prior's space -> the current space."""
        inverse = self.transform.GetInverse()
        return np.array([inverse.TransformPoint(tuple(float(v) for v in p)) for p in np.asarray(points_xyz)],
                        dtype=np.float64).reshape(-1, 3)

    def points_to_prior(self, points_xyz: np.ndarray) -> np.ndarray:
        return np.array([self.transform.TransformPoint(tuple(float(v) for v in p)) for p in np.asarray(points_xyz)],
                        dtype=np.float64).reshape(-1, 3)


def identity_registration() -> Registration:
    """No registration (one study has no CT): scanner coordinates taken as they are."""
    return Registration(transform=sitk.AffineTransform(3), stage="none", rigid_metric=float("nan"),
                        affine_metric=None, surface_residual_mm=None, surface_residual_before_mm=None,
                        rotation_deg=0.0, translation_mm=(0.0, 0.0, 0.0))


def resample(array: np.ndarray, geometry: VolumeGeometry, target: VolumeGeometry, shape: tuple[int, int, int],
             transform: sitk.Transform, *, labels: bool = False, default: float = 0.0) -> np.ndarray:
    values = np.asarray(array)
    image = geometry.image(values.astype(np.float32) if not labels else values.astype(np.int32))
    reference = target.image(np.zeros(shape, dtype=np.uint8))
    out = sitk.Resample(image, reference, transform, sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
                        float(default), sitk.sitkInt32 if labels else sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def register_ct(current_ct: np.ndarray, current_geometry: VolumeGeometry, prior_ct: np.ndarray,
                prior_geometry: VolumeGeometry) -> Registration:
    """The prior CT registered onto the current CT (see the module's docstring)."""
    current_ct, current_geometry = coarse(current_ct, current_geometry)
    prior_ct, prior_geometry = coarse(prior_ct, prior_geometry)
    fixed = current_geometry.image(np.clip(np.asarray(current_ct, dtype=np.float32), *CT_CLAMP_HU))
    moving = prior_geometry.image(np.clip(np.asarray(prior_ct, dtype=np.float32), *CT_CLAMP_HU))
    fixed_body = current_geometry.image((np.asarray(current_ct) > BODY_HU).astype(np.float32))
    moving_body = prior_geometry.image((np.asarray(prior_ct) > BODY_HU).astype(np.float32))
    if not sitk.GetArrayViewFromImage(fixed_body).any() or not sitk.GetArrayViewFromImage(moving_body).any():
        raise RegistrationError(f"no body (CT above {BODY_HU:g} HU) in one of the CTs")

    euler = sitk.Euler3DTransform()
    try:
        initial = sitk.CenteredTransformInitializer(fixed_body, moving_body, euler,
                                                    sitk.CenteredTransformInitializerFilter.MOMENTS)
        euler = sitk.Euler3DTransform(initial)
        rigid_metric = _run(fixed, moving, euler, RIGID_SHRINK, RIGID_SMOOTH, learning_rate=2.0,
                            iterations=RIGID_ITERATIONS, sampling=SAMPLING_FRACTION)
        affine = sitk.AffineTransform(3)
        affine.SetCenter(euler.GetCenter())
        affine.SetMatrix(euler.GetMatrix())
        affine.SetTranslation(euler.GetTranslation())
        affine_metric = _run(fixed, moving, affine, AFFINE_SHRINK, AFFINE_SMOOTH, learning_rate=0.5,
                             iterations=AFFINE_ITERATIONS, sampling=AFFINE_SAMPLING_FRACTION)
        if affine_metric < rigid_metric:  # judged on the same samples as the rigid result
            rigid_metric = _metric(fixed, moving, _as_affine(euler))
            affine_metric = _metric(fixed, moving, affine)
    except RuntimeError as exc:  # SimpleITK raises RuntimeError for whatever went wrong inside ITK
        raise RegistrationError(f"registration failed: {str(exc).strip().splitlines()[-1]}") from exc
    kept, stage = (affine, "affine") if affine_metric < rigid_metric else (_as_affine(euler), "rigid")
    matrix = np.asarray(euler.GetMatrix()).reshape(3, 3)
    angle = float(np.degrees(np.arccos(np.clip((np.trace(matrix) - 1.0) / 2.0, -1.0, 1.0))))
    return Registration(
        transform=kept,
        stage=stage,
        rigid_metric=float(rigid_metric),
        affine_metric=float(affine_metric),
        surface_residual_mm=surface_residual_mm(current_ct, current_geometry, prior_ct, prior_geometry, kept),
        surface_residual_before_mm=surface_residual_mm(current_ct, current_geometry, prior_ct, prior_geometry,
                                                       sitk.AffineTransform(3)),
        rotation_deg=angle,
        translation_mm=tuple(float(v) for v in euler.GetTranslation()),
    )


def coarse(ct: np.ndarray, geometry: VolumeGeometry) -> tuple[np.ndarray, VolumeGeometry]:
    """`ct` on a grid of REGISTRATION_SPACING_MM when its own is finer (same origin and direction,
    Gaussian smoothing of sigma half the new spacing first); as it is otherwise."""
    if min(geometry.spacing) >= REGISTRATION_SPACING_MM * 0.99:
        return np.asarray(ct), geometry
    image = geometry.image(np.asarray(ct, dtype=np.float32))
    # ITK wants every sigma > 0; an axis already coarse enough gets a negligible one
    image = sitk.SmoothingRecursiveGaussian(image, [max(1e-2, max(0.0, REGISTRATION_SPACING_MM ** 2 - s ** 2) ** 0.5
                                                        / 2.0) for s in geometry.spacing])
    new_spacing = tuple(max(s, REGISTRATION_SPACING_MM) for s in geometry.spacing)
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), geometry.spacing, new_spacing)]
    target = VolumeGeometry(geometry.origin, new_spacing, geometry.direction)
    reference = sitk.Image(size, sitk.sitkUInt8)
    reference.SetOrigin(target.origin)
    reference.SetSpacing(target.spacing)
    reference.SetDirection(target.direction)
    out = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, float(CT_CLAMP_HU[0]), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out), target


def _as_affine(euler: sitk.Euler3DTransform) -> sitk.AffineTransform:
    affine = sitk.AffineTransform(3)
    affine.SetCenter(euler.GetCenter())
    affine.SetMatrix(euler.GetMatrix())
    affine.SetTranslation(euler.GetTranslation())
    return affine


def _run(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, shrink: tuple[int, ...],
         smooth: tuple[float, ...], learning_rate: float, iterations: int, sampling: float) -> float:
    method = _method(sampling)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=1e-4,
                                                    numberOfIterations=iterations, relaxationFactor=0.5,
                                                    gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel(list(smooth))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    return float(method.GetMetricValue())


def _method(sampling: float) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=MI_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, SAMPLING_SEED)
    method.SetInterpolator(sitk.sitkLinear)
    return method


def _metric(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """The metric of `transform` at full resolution, on the rigid stage's samples."""
    method = _method(SAMPLING_FRACTION)
    method.SetMovingInitialTransform(transform)
    return float(method.MetricEvaluate(fixed, moving))


def surface_residual_mm(current_ct: np.ndarray, current_geometry: VolumeGeometry, prior_ct: np.ndarray,
                        prior_geometry: VolumeGeometry, transform: sitk.Transform) -> float | None:
    """Mean distance (mm) from the prior's body surface mapped by `transform` to the current's,
    in-plane surfaces over the slices both cover (see the module's docstring); None without overlap."""
    shape = np.shape(current_ct)
    fixed_body = np.asarray(current_ct) > BODY_HU
    moved = resample((np.asarray(prior_ct) > BODY_HU).astype(np.uint8), prior_geometry, current_geometry, shape,
                     transform, labels=True) > 0
    covered = resample(np.ones(np.shape(prior_ct), np.uint8), prior_geometry, current_geometry, shape, transform,
                       labels=True) > 0
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    covered = ndimage.binary_erosion(covered, structure=np.ones((3, 3, 3), bool), border_value=0)
    fixed_surface = fixed_body & ~ndimage.binary_erosion(fixed_body, structure=in_plane, border_value=1)
    moved_surface = moved & ~ndimage.binary_erosion(moved, structure=in_plane, border_value=1) & covered
    if not fixed_surface.any() or not moved_surface.any():
        return None
    distance = ndimage.distance_transform_edt(~fixed_surface, sampling=current_geometry.spacing_zyx)
    return float(distance[moved_surface].mean())
