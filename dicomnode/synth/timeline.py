"""A synthetic patient timeline: a baseline PET/CT and a follow-up of the same patient on another
day, lying elsewhere in the scanner, with known lesion changes (issue 16's tests and demo).

The patient is the torso phantom of petct_phantom (liver at LIVER_SUV SUVbw: LIVER_SUV x LBM/W
in SUL) with lesions that follow a course (`LesionCourse`: size and SUVbw before and after, None
where the lesion is absent). The baseline lies in the scanner as the phantom is described; the
follow-up `days_later` days after is rotated by `rotation_deg` (about x, y, z in that order, in
degrees) and shifted by `translation_mm` (LPS x, y, z): scanner = R . body + t. Each study has
its own frame of reference.

Scenarios (`SCENARIOS`), every lesion centre in body mm:

    "mixed"        the issue's: one lesion shrinking to half its SUV and half its volume, one
                   disappearing, one unchanged, one new  -> PMD (a new FDG-avid lesion)
    "response"     shrinking + disappearing + unchanged    -> PMR (hottest before: the
                   shrinking lesion; hottest now: the unchanged one, a different lesion)
    "progression"  the hottest lesion's SUV rises by 60 %, the others unchanged -> PMD by SULpeak
    "stable"       every lesion unchanged                  -> SMD
    "complete"     every lesion gone                       -> CMR

`Timeline.timepoints()` gives (prior, current) TimePoints directly (the truth lesion masks as
the model's masks, the truth liver as the organ model's), for unit tests; `write_timeline(out)`
writes the two studies as DICOM (dicomnode.synth.petct.write_phantom) for the pipeline's tests
and the demo, with a timeline.json of the truth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from dicomnode.imaging.timepoint import Patient, TimePoint, VolumeGeometry
from dicomnode.synth import petct
from dicomnode.synth import petct_phantom as ph

DAYS_BETWEEN = 84  # 12 weeks: a usual restaging interval
ROTATION_DEG = (2.0, 1.0, 4.0)  # about x, y, z
TRANSLATION_MM = (20.0, -15.0, 12.0)
PATIENT = Patient(weight_kg=petct.PATIENT_WEIGHT_KG, height_m=1.75, sex="M")


@dataclass(frozen=True)
class LesionCourse:
    name: str
    centre_mm: tuple[float, float, float]  # body x, y, z
    before: tuple[float, float] | None  # (radius mm, SUVbw) at baseline; None: absent
    after: tuple[float, float] | None  # at follow-up

    def as_json(self) -> dict:
        return {"name": self.name, "centre_mm": list(self.centre_mm), "before": self.before, "after": self.after}


_HALF_VOLUME = 0.5 ** (1.0 / 3.0)  # radius factor for half the volume
SHRINKING = LesionCourse("shrinking", (40.0, 30.0, -50.0), (13.0, 10.0), (13.0 * _HALF_VOLUME, 5.0))
RESOLVED = LesionCourse("resolved", (-10.0, -50.0, 55.0), (10.0, 8.0), None)
UNCHANGED = LesionCourse("unchanged", (60.0, 40.0, -10.0), (11.0, 6.0), (11.0, 6.0))
NEW = LesionCourse("new", (-20.0, -40.0, 10.0), None, (10.0, 7.0))

SCENARIOS: dict[str, tuple[LesionCourse, ...]] = {
    "mixed": (SHRINKING, RESOLVED, UNCHANGED, NEW),
    "response": (SHRINKING, RESOLVED, UNCHANGED),
    "progression": (LesionCourse("rising", SHRINKING.centre_mm, (13.0, 10.0), (13.0, 16.0)),
                    LesionCourse("steady", RESOLVED.centre_mm, (10.0, 8.0), (10.0, 8.0)), UNCHANGED),
    "stable": (LesionCourse("steady large", SHRINKING.centre_mm, (13.0, 10.0), (13.0, 10.0)),
               LesionCourse("steady", RESOLVED.centre_mm, (10.0, 8.0), (10.0, 8.0)), UNCHANGED),
    "complete": (LesionCourse("resolved large", SHRINKING.centre_mm, (13.0, 10.0), None), RESOLVED,
                 LesionCourse("resolved small", UNCHANGED.centre_mm, (11.0, 6.0), None)),
}


def rotation_matrix(rotation_deg: tuple[float, float, float]) -> np.ndarray:
    """R = Rz . Ry . Rx (rotation about x first), angles in degrees."""
    ax, ay, az = np.radians(rotation_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Timeline:
    scenario: str
    courses: tuple[LesionCourse, ...]
    patient: Patient
    seed: int = 0
    days_later: int = DAYS_BETWEEN
    rotation_deg: tuple[float, float, float] = ROTATION_DEG
    translation_mm: tuple[float, float, float] = TRANSLATION_MM
    dates: tuple[str, str] = field(default=("", ""))

    # --- the two phantoms and where the patient lies ---
    def phantom(self, when: str) -> ph.Phantom:
        """The baseline ("before") or follow-up ("after") phantom, lesions in course order (absent left out)."""
        lesions = []
        for course in self.courses:
            state = course.before if when == "before" else course.after
            if state is not None:
                lesions.append(ph.Lesion(course.centre_mm, state[0], state[1]))
        return ph.Phantom(seed=self.seed if when == "before" else self.seed + 100, lesions=tuple(lesions))

    def present(self, when: str) -> tuple[LesionCourse, ...]:
        """The courses whose lesion is present then, in the phantom's lesion order."""
        return tuple(c for c in self.courses if (c.before if when == "before" else c.after) is not None)

    def pose(self, when: str) -> ph.Pose | None:
        if when == "before":
            return None
        rotation = rotation_matrix(self.rotation_deg)
        t = np.asarray(self.translation_mm)

        def to_body(zz: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            scanner = np.stack([xx - t[0], yy - t[1], zz - t[2]], axis=-1)
            body = scanner @ rotation  # R^T (scanner - t), row vectors
            return body[..., 2], body[..., 1], body[..., 0]

        return to_body

    def liver_mask(self, when: str, grid: ph.Grid = ph.PET_GRID) -> np.ndarray:
        """The truth liver (uint8) on `grid` in that study's scanner coordinates."""
        return ph.liver_mask(grid, self.pose(when)).astype(np.uint8)

    def scanner_point(self, body_xyz: tuple[float, float, float], when: str) -> np.ndarray:
        """Where a body point lies in that study's scanner coordinates (LPS mm)."""
        point = np.asarray(body_xyz, dtype=np.float64)
        if when == "before":
            return point
        return rotation_matrix(self.rotation_deg) @ point + np.asarray(self.translation_mm)

    # --- direct construction for unit tests ---
    def timepoints(self, *, ct_grid: ph.Grid = ph.PET_GRID, liver: bool = True, ct: bool = True,
                   patient: Patient | None = None, prior_patient: Patient | None = None) -> tuple[TimePoint, TimePoint]:
        """(prior, current): the truth lesion masks stand for the model's, the truth liver for
        the organ model's. `ct_grid`: the CT's grid (the PET's by default: fast registration);
        `ct` False: no CT (nothing to register), `liver` False: no liver mask."""
        made = []
        for when, who in (("before", prior_patient or patient or self.patient), ("after", patient or self.patient)):
            phantom, pose = self.phantom(when), self.pose(when)
            grid = ph.PET_GRID
            made.append(TimePoint(
                study_uid=generate_uid(entropy_srcs=["timeline", self.scenario, str(self.seed), when]),
                study_date=self.study_date(when),
                study_time="090500",
                patient=who,
                suv=ph.pet_suv(phantom, grid, pose=pose),
                labels=(ph.lesion_masks(phantom, grid, pose) > 0).astype(np.uint8),
                geometry=grid_geometry(grid),
                ct=ph.ct_hu(phantom, ct_grid, pose=pose).astype(np.float32) if ct else None,
                ct_geometry=grid_geometry(ct_grid) if ct else None,
                liver=self.liver_mask(when) if liver else None,
            ))
        return made[0], made[1]

    def study_date(self, when: str) -> str:
        base = petct.CT_START
        if when == "after":
            base = base + timedelta(days=self.days_later)
        return base.strftime("%Y%m%d")

    def as_json(self) -> dict:
        return {"scenario": self.scenario, "courses": [c.as_json() for c in self.courses],
                "patient": self.patient.as_json(), "seed": self.seed, "days_later": self.days_later,
                "rotation_deg": list(self.rotation_deg), "translation_mm": list(self.translation_mm),
                "liver_suv": ph.LIVER_SUV}


def timeline(scenario: str = "mixed", *, patient: Patient = PATIENT, seed: int = 0,
             rotation_deg: tuple[float, float, float] = ROTATION_DEG,
             translation_mm: tuple[float, float, float] = TRANSLATION_MM, days_later: int = DAYS_BETWEEN) -> Timeline:
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}: one of {', '.join(SCENARIOS)}")
    return Timeline(scenario, SCENARIOS[scenario], patient, seed, days_later, tuple(rotation_deg),
                    tuple(translation_mm))


def grid_geometry(grid: ph.Grid) -> VolumeGeometry:
    return VolumeGeometry(origin=grid.origin, spacing=tuple(reversed(grid.spacing)))


@dataclass(frozen=True)
class WrittenTimeline:
    timeline: Timeline
    baseline: petct.SyntheticStudy
    followup: petct.SyntheticStudy
    truth_json: Path


def write_timeline(out_dir: Path, tl: Timeline | None = None, *, patient_id: str = "SYNTH-TIMELINE-1",
                   patient_name: str = "Synthetic^Timeline", variant: str = "bqml") -> WrittenTimeline:
    """Both studies as DICOM under out_dir/baseline and out_dir/followup (petct.write_phantom's
    layout each: CT/, PT/, truth/ with lesions.nii.gz and liver.nii.gz, the truth liver a CT organ
    model would find, both on the PET grid), same PatientID, the follow-up `days_later` days later in its
    own frame of reference, and out_dir/timeline.json (the courses, the pose, the UIDs)."""
    tl = tl or timeline()
    out_dir = Path(out_dir)
    sex = tl.patient.sex or "O"
    studies = []
    for when, folder, days in (("before", "baseline", 0), ("after", "followup", tl.days_later)):
        studies.append(petct.write_phantom(
            out_dir / folder, tl.phantom(when), patient_id=patient_id, patient_name=patient_name, variant=variant,
            days_later=days, pose=tl.pose(when), patient_sex=sex, patient_size_m=tl.patient.height_m,
            study_description=f"PET/CT synthetic timeline ({folder})"))
        petct.write_labels(tl.liver_mask(when), ph.PET_GRID, out_dir / folder / "truth" / "liver.nii.gz")
    truth = {**tl.as_json(), "baseline_study_uid": studies[0].study_instance_uid,
             "followup_study_uid": studies[1].study_instance_uid,
             "lesions_after_scanner_mm": {c.name: list(tl.scanner_point(c.centre_mm, "after"))
                                          for c in tl.present("after")}}
    truth_json = out_dir / "timeline.json"
    truth_json.write_text(json.dumps(truth, indent=2))
    return WrittenTimeline(tl, studies[0], studies[1], truth_json)
