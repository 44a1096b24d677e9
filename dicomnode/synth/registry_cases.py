"""Synthetic cases for the registry's stand-in models: glioma MR, CT lymph nodes, CT organs.

Each case is the images a model gets (one array per channel role, on one grid) with the
label map that is the truth. The same seed always gives the same case: seeds 0..999 train
the stand-in models (scripts/make_registry_models.py), seeds >= 1000 are for tests.
Shapes are simple (ellipsoids with randomised centres, sizes and irregular borders), but
each label has its own signal and place, so a tiny nnU-Net learns them in minutes on a CPU.
Pure numpy/scipy, no DICOM: the DICOM side writes series from these arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dicomnode.synth.petct_phantom import Grid

TRAIN_SEEDS = range(0, 1000)
FIRST_TEST_SEED = 1000

GLIOMA_GRID = Grid.centred((48, 64, 64), (3.0, 2.5, 2.5))  # head: 144 x 160 x 160 mm
LYMPH_NODE_GRID = Grid.centred((48, 80, 96), (2.0, 2.0, 2.0))  # abdomen slab: 96 x 160 x 192 mm
ORGAN_GRID = Grid.centred((48, 80, 96), (3.0, 2.5, 2.5))  # abdomen: 144 x 200 x 240 mm

GLIOMA_LABELS = {1: "necrosis", 2: "oedema", 3: "enhancing_tumour"}
LYMPH_NODE_LABELS = {1: "lymph_node"}
# TotalSegmentator's names, in its order for these structures
ORGAN_LABELS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver",
                6: "stomach", 7: "aorta"}

# MR signal per tissue (arbitrary units, as stored), channels FLAIR, T1, T1CE, T2
MR_CHANNELS = ("FLAIR", "T1", "T1CE", "T2")
MR_SIGNAL = {
    "scalp": (300.0, 700.0, 700.0, 400.0),
    "skull": (50.0, 100.0, 100.0, 80.0),
    "brain": (400.0, 500.0, 500.0, 350.0),
    "csf": (80.0, 150.0, 150.0, 900.0),
    "oedema": (800.0, 380.0, 380.0, 700.0),
    "enhancing_tumour": (600.0, 420.0, 950.0, 550.0),
    "necrosis": (350.0, 200.0, 220.0, 950.0),
}

AIR_HU, FAT_HU, MUSCLE_HU, BONE_HU = -1000.0, -100.0, 50.0, 500.0
# portal-venous contrast phase
ORGAN_HU = {"spleen": 130.0, "kidney_right": 180.0, "kidney_left": 180.0, "gallbladder": 10.0,
            "liver": 100.0, "stomach": 25.0, "aorta": 220.0}


@dataclass(frozen=True)
class Case:
    """One synthetic case: channels by role (z, y, x) float32 and labels (z, y, x) uint8 on `grid`."""

    channels: dict[str, np.ndarray]
    labels: np.ndarray
    grid: Grid
    label_names: dict[int, str]


# --------------------------------------------------------------------------- geometry
class _Space:
    """Voxel-centre coordinates of a grid in mm, and smooth random fields on it."""

    def __init__(self, grid: Grid, rng: np.random.Generator) -> None:
        self.grid, self.rng = grid, rng
        z, y, x = grid.axes_mm()
        self.zz, self.yy, self.xx = np.meshgrid(z, y, x, indexing="ij")

    def radius(self, centre: Sequence[float], semi_axes: Sequence[float], angle_deg: float = 0.0) -> np.ndarray:
        """Normalised ellipsoid radius (1 on the surface), the ellipsoid turned about z."""
        (cx, cy, cz), (ax, ay, az) = centre, semi_axes
        t = np.deg2rad(angle_deg)
        dx, dy = self.xx - cx, self.yy - cy
        u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
        return np.sqrt((u / ax) ** 2 + (v / ay) ** 2 + ((self.zz - cz) / az) ** 2)

    def ellipsoid(self, centre: Sequence[float], semi_axes: Sequence[float], angle_deg: float = 0.0) -> np.ndarray:
        return self.radius(centre, semi_axes, angle_deg) <= 1.0

    def smooth_field(self, sigma_mm: float, amplitude: float) -> np.ndarray:
        """Zero-mean random field, smooth over `sigma_mm`, scaled to +-`amplitude` at its extremes."""
        field = ndimage.gaussian_filter(
            self.rng.standard_normal(self.grid.shape), [sigma_mm / s for s in self.grid.spacing])
        return (amplitude * field / max(1e-6, float(np.abs(field).max()))).astype(np.float32)

    def noise(self, sd: float) -> np.ndarray:
        return self.rng.normal(0.0, sd, self.grid.shape).astype(np.float32)


def _jitter(rng: np.random.Generator, centre: Sequence[float], mm: float) -> tuple[float, float, float]:
    return tuple(float(c + rng.uniform(-mm, mm)) for c in centre)


def _scaled(rng: np.random.Generator, semi_axes: Sequence[float], low: float = 0.85,
            high: float = 1.15) -> tuple[float, ...]:
    s = rng.uniform(low, high)
    return tuple(float(a * s * rng.uniform(0.93, 1.07)) for a in semi_axes)


# --------------------------------------------------------------------------- glioma MR
def glioma_case(seed: int) -> Case:
    """A head with a glioma: necrotic core, enhancing rim and oedema (BraTS labels 1, 2, 3).

    Channels FLAIR, T1, T1CE, T2: MR signal in arbitrary units as stored, each with its own
    scale, a smooth bias field and noise (nnU-Net z-scores MR per case).
    """
    rng = np.random.default_rng(seed)
    sp = _Space(GLIOMA_GRID, rng)
    head = sp.ellipsoid((0, 0, 0), (68, 78, 66))
    skull = sp.ellipsoid((0, 0, 0), (62, 72, 60))
    brain = sp.ellipsoid((0, 0, 0), (57, 67, 55))
    ventricles = brain & (sp.ellipsoid((-9, -5, 8), (6, 22, 10), 8) | sp.ellipsoid((9, -5, 8), (6, 22, 10), -8))

    side = rng.choice([-1.0, 1.0])
    centre = (side * rng.uniform(18, 32), rng.uniform(-30, 30), rng.uniform(-15, 20))
    shape = _scaled(rng, (1.0, 1.0, 1.0), 0.9, 1.1)
    r_mm = sp.radius(centre, shape, rng.uniform(0, 180)) + sp.smooth_field(8.0, 3.0)
    r_necrosis = rng.uniform(11, 15)
    r_enhancing = r_necrosis + rng.uniform(5, 8)
    r_oedema = r_enhancing + rng.uniform(8, 16)
    labels = np.zeros(GLIOMA_GRID.shape, dtype=np.uint8)
    labels[(r_mm <= r_oedema) & brain] = 2
    labels[(r_mm <= r_enhancing) & brain] = 3
    labels[(r_mm <= r_necrosis) & brain] = 1

    tissue = {"scalp": head & ~skull, "skull": skull & ~brain, "brain": brain, "csf": ventricles,
              "oedema": labels == 2, "enhancing_tumour": labels == 3, "necrosis": labels == 1}
    texture = sp.smooth_field(4.0, 0.06)
    channels = {}
    for c, name in enumerate(MR_CHANNELS):
        signal = np.zeros(GLIOMA_GRID.shape, dtype=np.float32)
        for part, mask in tissue.items():  # later parts overwrite earlier ones
            signal[mask] = MR_SIGNAL[part][c]
        bias = 1.0 + sp.smooth_field(60.0, 0.1)
        signal = signal * (1.0 + texture) * bias + sp.noise(12.0) * head
        channels[name] = np.clip(signal * rng.uniform(0.7, 1.4), 0, None).astype(np.float32)
    return Case(channels=channels, labels=labels, grid=GLIOMA_GRID, label_names=dict(GLIOMA_LABELS))


# --------------------------------------------------------------------------- CT helpers
def _torso(sp: _Space, semi_axes: tuple[float, float] = (105.0, 75.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                                np.ndarray]:
    """(body, subcutaneous fat, muscle wall, spine) masks of an elliptic torso along z."""
    ax, ay = semi_axes
    body = (sp.xx / ax) ** 2 + (sp.yy / ay) ** 2 <= 1.0
    inner = (sp.xx / (ax - 12)) ** 2 + (sp.yy / (ay - 12)) ** 2 <= 1.0
    cavity = (sp.xx / (ax - 22)) ** 2 + (sp.yy / (ay - 20)) ** 2 <= 1.0
    spine = (sp.xx / 15.0) ** 2 + ((sp.yy - (ay - 28)) / 14.0) ** 2 <= 1.0
    psoas = (((np.abs(sp.xx) - 32) / 14.0) ** 2 + ((sp.yy - (ay - 32)) / 14.0) ** 2 <= 1.0) & ~spine
    return body, body & ~inner, (inner & ~cavity) | psoas, spine


def _ct(sp: _Space, layers: list[tuple[np.ndarray, float]], noise_hu: float, body: np.ndarray) -> np.ndarray:
    hu = np.full(sp.grid.shape, AIR_HU, dtype=np.float32)
    for mask, value in layers:  # later layers overwrite earlier ones
        hu[mask] = value
    hu += sp.noise(noise_hu) * body
    return np.clip(np.round(hu), -1024, 3071).astype(np.float32)


# --------------------------------------------------------------------------- lymph nodes
def lymph_node_case(seed: int) -> Case:
    """A contrast-enhanced abdominal CT slab with 3 to 6 lymph nodes (label 1): enhancing
    soft-tissue ovals in fat, beside brighter vessels, muscle, bowel and bone that are not nodes."""
    rng = np.random.default_rng(seed)
    sp = _Space(LYMPH_NODE_GRID, rng)
    body, subcut, muscle, spine = _torso(sp, (88.0, 70.0))
    aorta = ((sp.xx - 12) / 10.0) ** 2 + ((sp.yy - 22) / 10.0) ** 2 <= 1.0
    cava = ((sp.xx + 18) / 11.0) ** 2 + ((sp.yy - 20) / 8.0) ** 2 <= 1.0
    bowel = sp.ellipsoid(_jitter(rng, (0, -35, 0), 8), (30, 16, 60)) & body & ~subcut
    # room in mm from each voxel to anything that is not abdominal fat
    room = ndimage.distance_transform_edt(body & ~(spine | aorta | cava | muscle | subcut | bowel),
                                          sampling=LYMPH_NODE_GRID.spacing)
    labels = np.zeros(LYMPH_NODE_GRID.shape, dtype=np.uint8)
    nodes: list[tuple[np.ndarray, float]] = []
    n_nodes, attempts = int(rng.integers(3, 7)), 0
    while len(nodes) < n_nodes and attempts < 200:
        attempts += 1
        semi = (rng.uniform(6, 10), rng.uniform(6, 10), rng.uniform(7, 12))
        index = tuple(int(rng.integers(n)) for n in LYMPH_NODE_GRID.shape)
        centre = np.array([sp.xx[index], sp.yy[index], sp.zz[index]])
        reach = max(semi) + 4.0
        if room[index] <= reach or any(np.linalg.norm(centre - c) <= reach + r for c, r in nodes):
            continue
        labels[sp.ellipsoid(tuple(centre), semi, rng.uniform(0, 180))] = 1
        nodes.append((centre, reach))

    hu = _ct(sp, [(body, FAT_HU + rng.uniform(-15, 15)), (muscle, MUSCLE_HU), (bowel, 20.0),
                  (labels > 0, rng.uniform(70, 90)), (aorta | cava, rng.uniform(160, 220)),
                  (spine, BONE_HU)], rng.uniform(6, 10), body)
    return Case(channels={"CT": hu}, labels=labels, grid=LYMPH_NODE_GRID,
                label_names=dict(LYMPH_NODE_LABELS))


# --------------------------------------------------------------------------- organs
def organ_case(seed: int) -> Case:
    """An abdominal CT (portal-venous phase) with seven organs labelled as TotalSegmentator
    names them: spleen, right and left kidney, gallbladder, liver, stomach, aorta.

    Coordinates are patient LPS: the patient's right is -x, posterior is +y.
    """
    rng = np.random.default_rng(seed)
    sp = _Space(ORGAN_GRID, rng)
    body, subcut, muscle, spine = _torso(sp)
    organs = {
        "liver": sp.ellipsoid(_jitter(rng, (-45, -5, 25), 6), _scaled(rng, (55, 55, 45)), rng.uniform(-10, 10)),
        "spleen": sp.ellipsoid(_jitter(rng, (60, 30, 35), 6), _scaled(rng, (22, 35, 40)), rng.uniform(20, 40)),
        "kidney_right": sp.ellipsoid(_jitter(rng, (-48, 40, -25), 5), _scaled(rng, (20, 24, 45)), -20),
        "kidney_left": sp.ellipsoid(_jitter(rng, (48, 40, -20), 5), _scaled(rng, (20, 24, 45)), 20),
        # in its fossa under the liver, the fundus below the liver's edge (about 35 mL)
        "gallbladder": sp.ellipsoid(_jitter(rng, (-30, -25, -5), 5), _scaled(rng, (16, 16, 32))),
        "stomach": sp.ellipsoid(_jitter(rng, (30, -30, 30), 6), _scaled(rng, (32, 24, 35)), rng.uniform(-20, 20)),
        "aorta": ((sp.xx - 12 - rng.uniform(-3, 3)) / 11.0) ** 2 + ((sp.yy - 25) / 11.0) ** 2 <= 1.0,
    }
    labels = np.zeros(ORGAN_GRID.shape, dtype=np.uint8)
    cavity = body & ~subcut & ~muscle & ~spine
    for name in ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "gallbladder", "aorta"):
        labels[organs[name] & cavity] = _value_of(name)  # later organs overwrite earlier ones
    stomach = labels == _value_of("stomach")
    gas = stomach & (sp.yy < sp.yy[stomach].min() + 8.0)  # an air pocket at the front

    organ_hu = [(labels == _value_of(name), hu + rng.uniform(-10, 10)) for name, hu in ORGAN_HU.items()]
    hu = _ct(sp, [(body, FAT_HU + rng.uniform(-15, 15)), (muscle, MUSCLE_HU), *organ_hu, (gas, -900.0),
                  (spine, BONE_HU)], rng.uniform(8, 15), body)
    return Case(channels={"CT": hu}, labels=labels, grid=ORGAN_GRID, label_names=dict(ORGAN_LABELS))


def _value_of(name: str) -> int:
    return next(v for v, n in ORGAN_LABELS.items() if n == name)
