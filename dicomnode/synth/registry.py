"""Synthetic studies for the registry's stand-in models: glioma MR, CT lymph nodes, CT organs.

`write_registry_study(out_dir, kind, seed)` writes a `dicomnode.synth.registry_cases` case as the study a
scanner would send, with the distractions the node's series selection must cope with:

    glioma  MR "MR BRAIN tumour": t2_flair_tra, t1_mprage_tra, t1_mprage_tra_post_gd,
            t2_tse_tra (the four model channels) on different grids: FLAIR and T1 post
            contrast on the case's grid, T1 at 2 mm in-plane over a 160 mm field, T2 with
            4 mm slices; plus a localizer and an ep2d_diff_tra_ADC map to be skipped.
    lymph   CT "CT lymph node staging": the CT on the case's grid and a topogram (LOCALIZER).
    organs  CT "CT ABDOMEN organ volumetry": the CT on the case's grid.

Each study goes to out_dir/<SeriesDescription>/*.dcm with the truth in out_dir/truth/:
labels.nii.gz (the case's label map on its grid, which is also the grid of the FLAIR, the
T1 post contrast and the CT series) and truth.json (seed, UIDs, label names). Series on
another grid are the case's channel resampled linearly onto it; every series of a study
shares one frame of reference. Pixel data: MR as stored (uint16, no rescale), CT in HU via
RescaleIntercept -1024. Header helpers are synth.py's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid

from dicomnode.synth import registry_cases
from dicomnode.synth.petct import (
    ct_slice,
    image_dataset,
    study_dataset,
    write_labels,
    write_series,
)
from dicomnode.synth.petct_phantom import Grid

KINDS = ("glioma", "lymph", "organs")
SCAN_START = datetime(2024, 5, 6, 9, 0, 0)
MR_MAX_STORED = 4095


@dataclass(frozen=True)
class SeriesPlan:
    """One series to write: which case channel, on which grid, described how."""

    channel: str  # the case channel it shows ("FLAIR", "CT", ...), or "" for a distractor
    description: str
    number: int
    modality: str = "MR"
    grid: Grid | None = None  # None: the case's grid
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND")
    slices: int | None = None  # a distractor's number of slices (from the middle)


@dataclass
class RegistryStudy:
    root: Path
    kind: str
    seed: int
    study_instance_uid: str
    frame_of_reference_uid: str
    series: dict[str, str]  # SeriesDescription -> SeriesInstanceUID
    files: dict[str, list[Path]]  # SeriesDescription -> files
    channel_series: dict[str, str]  # case channel -> SeriesDescription of the series that shows it
    case: registry_cases.Case
    truth_labels: Path
    truth_json: Path

    @property
    def all_files(self) -> list[Path]:
        return [p for files in self.files.values() for p in files]


def _glioma_plans() -> list[SeriesPlan]:
    grid = registry_cases.GLIOMA_GRID
    t1_grid = Grid.centred((grid.shape[0], 80, 80), (grid.spacing[0], 2.0, 2.0))
    t2_grid = Grid.centred((36, *grid.shape[1:]), (4.0, *grid.spacing[1:]))
    return [
        SeriesPlan("", "localizer", 1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER", "ND"), slices=3),
        SeriesPlan("FLAIR", "t2_flair_tra", 2),
        SeriesPlan("T1", "t1_mprage_tra", 3, grid=t1_grid),
        SeriesPlan("T2", "t2_tse_tra", 4, grid=t2_grid),
        SeriesPlan("", "ep2d_diff_tra_ADC", 5, image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC"), slices=24),
        SeriesPlan("T1CE", "t1_mprage_tra_post_gd", 6),
    ]


STUDIES = {
    "glioma": (registry_cases.glioma_case, "MR BRAIN tumour", "BRAIN", _glioma_plans),
    "lymph": (registry_cases.lymph_node_case, "CT lymph node staging", "ABDOMEN", lambda: [
        SeriesPlan("", "Topogram 0.6 T20f", 1, "CT", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), slices=1),
        SeriesPlan("CT", "Abdomen 2.0 Br40 venous", 2, "CT", image_type=("ORIGINAL", "PRIMARY", "AXIAL")),
    ]),
    "organs": (registry_cases.organ_case, "CT ABDOMEN organ volumetry", "ABDOMEN", lambda: [
        SeriesPlan("CT", "Abdomen 3.0 Br40 portal venous", 2, "CT", image_type=("ORIGINAL", "PRIMARY", "AXIAL")),
    ]),
}


def write_registry_study(out_dir: Path, kind: str, seed: int = 1000, *, patient_id: str | None = None) -> RegistryStudy:
    """Write the `kind` study (glioma, lymph, organs) of phantom seed `seed` into `out_dir`."""
    if kind not in STUDIES:
        raise ValueError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
    make_case, study_description, body_part, plans = STUDIES[kind]
    out_dir = Path(out_dir)
    case = make_case(seed)
    study = study_dataset(patient_id or f"SYNTH-{kind.upper()}-{seed}", f"Synthetic^{kind.capitalize()}", SCAN_START)
    study.StudyDescription = study_description
    del study.PatientWeight, study.PatientSize  # no SUV here
    frame_of_reference_uid = generate_uid()
    series, files, channel_series = {}, {}, {}
    for plan in plans():
        uid = generate_uid()
        volume, grid = _series_volume(case, plan)
        datasets = [_slice(study, frame_of_reference_uid, uid, grid, k, plane, plan, body_part)
                    for k, plane in enumerate(volume)]
        files[plan.description] = write_series(out_dir / plan.description.replace(" ", "_"), "im", datasets)
        series[plan.description] = uid
        if plan.channel:
            channel_series[plan.channel] = plan.description
    truth_dir = out_dir / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    write_labels(case.labels, case.grid, truth_dir / "labels.nii.gz")
    truth = {"kind": kind, "seed": seed, "study_instance_uid": study.StudyInstanceUID,
             "frame_of_reference_uid": frame_of_reference_uid, "series": series, "channel_series": channel_series,
             "label_names": {str(k): v for k, v in case.label_names.items()}}
    (truth_dir / "truth.json").write_text(json.dumps(truth, indent=2))
    return RegistryStudy(out_dir, kind, seed, study.StudyInstanceUID, frame_of_reference_uid, series, files,
                         channel_series, case, truth_dir / "labels.nii.gz", truth_dir / "truth.json")


def _series_volume(case: registry_cases.Case, plan: SeriesPlan) -> tuple[np.ndarray, Grid]:
    """The series' pixels (rescaled values) and grid: the case channel, resampled when the
    series has its own grid; a distractor is the first channel's middle slices."""
    source = case.channels[plan.channel or next(iter(case.channels))]
    if not plan.channel:
        middle = case.grid.shape[0] // 2 - plan.slices // 2
        z0 = case.grid.origin[2] + middle * case.grid.spacing[0]
        grid = replace(case.grid, shape=(plan.slices, *case.grid.shape[1:]), origin=(*case.grid.origin[:2], z0))
        return source[middle:middle + plan.slices], grid
    if plan.grid is None:
        return source, case.grid
    return _resample(source, case.grid, plan.grid), plan.grid


def _resample(array: np.ndarray, grid: Grid, target: Grid) -> np.ndarray:
    def image(values: np.ndarray, g: Grid) -> sitk.Image:
        result = sitk.GetImageFromArray(values.astype(np.float32))
        result.SetSpacing(tuple(float(s) for s in reversed(g.spacing)))
        result.SetOrigin(tuple(float(o) for o in g.origin))
        return result

    reference = image(np.zeros(target.shape, np.float32), target)
    resampled = sitk.Resample(image(array, grid), reference, sitk.Transform(), sitk.sitkLinear, float(array.min()))
    return sitk.GetArrayFromImage(resampled)


def _slice(study: Dataset, frame_of_reference_uid: str, uid: str, grid: Grid, k: int, plane: np.ndarray,
           plan: SeriesPlan, body_part: str) -> Dataset:
    if plan.modality == "CT":
        ds = ct_slice(study, frame_of_reference_uid, uid, grid, k, plane, SCAN_START)
    else:
        ds = _mr_slice(study, frame_of_reference_uid, uid, grid, k, plane, plan)
    ds.SeriesNumber = plan.number
    ds.SeriesDescription = plan.description
    ds.ImageType = list(plan.image_type)
    ds.BodyPartExamined = body_part
    if "LOCALIZER" in plan.image_type and "RescaleType" in ds:
        del ds.RescaleType  # not HU on a CT localizer
    series_time = SCAN_START + timedelta(minutes=4 * plan.number)
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series_time.strftime("%H%M%S")
    return ds


# Acquisition parameters per MR series: (ScanningSequence, SequenceVariant, TR ms, TE ms, TI ms or None)
_MR_SEQUENCES = {
    "t2_flair_tra": ("SE\\IR", "SK\\SP\\MP", 9000.0, 81.0, 2500.0),
    "t1_mprage_tra": ("GR\\IR", "SK\\SP\\MP", 2300.0, 2.3, 900.0),
    "t1_mprage_tra_post_gd": ("GR\\IR", "SK\\SP\\MP", 2300.0, 2.3, 900.0),
    "t2_tse_tra": ("SE", "SK\\SP", 6000.0, 100.0, None),
    "localizer": ("GR", "SP", 8.6, 4.0, None),
    "ep2d_diff_tra_ADC": ("EP", "SK\\SP", 5000.0, 70.0, None),
}


def _mr_slice(study: Dataset, frame_of_reference_uid: str, uid: str, grid: Grid, k: int, plane: np.ndarray,
              plan: SeriesPlan) -> Dataset:
    ds = image_dataset(study, frame_of_reference_uid, uid, grid, k, plane)
    ds.SOPClassUID = MRImageStorage
    ds.Modality = "MR"
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = SCAN_START.strftime("%Y%m%d")
    ds.AcquisitionNumber = 1
    sequence, variant, tr, te, ti = _MR_SEQUENCES[plan.description]
    ds.ScanningSequence = sequence.split("\\")
    ds.SequenceVariant = variant.split("\\")
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D" if "mprage" in plan.description else "2D"
    ds.RepetitionTime = f"{tr:g}"
    ds.EchoTime = f"{te:g}"
    if ti is not None:
        ds.InversionTime = f"{ti:g}"
    ds.EchoTrainLength = 1
    ds.MagneticFieldStrength = "3"
    ds.ImagingFrequency = "123.2"
    ds.ImagedNucleus = "1H"
    if plan.description.endswith("_gd"):
        ds.ContrastBolusAgent = "Gadobutrol"
        ds.ContrastBolusRoute = "IV"
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.round(plane).clip(0, MR_MAX_STORED).astype(np.uint16).tobytes()
    return ds
