"""Synthetic PET/CT study generator: writes a phantom as DICOM CT + PET series plus ground truth.

Layout written by `write_study(out_dir, seed)`:

    out_dir/CT/ct_000.dcm ...     CT Image Storage, 64 slices on phantom.CT_GRID (HU via rescale)
    out_dir/PT/pt_000.dcm ...     PET Image Storage, 64 slices on phantom.PET_GRID (BQML, per-slice slope)
    out_dir/truth/lesions.nii.gz  lesion labels on the PET grid (0 background, k = k-th lesion)
    out_dir/truth/truth.json      UIDs, seed and lesions (centre mm, radius mm, SUV)

Both series share one StudyInstanceUID and one FrameOfReferenceUID. UIDs are random
(pydicom.uid.generate_uid), not derived from the seed: writing the same seed twice must not
produce two different studies with colliding UIDs in a PACS. The pixel content is a pure
function of the seed.

PET pixel values are stored as Bq/ml such that SUVbw = Bq/ml * weight_g / decayed_dose
reproduces `phantom.pet_suv(...)`, with the dose decayed from injection to SeriesTime
(DecayCorrection START).

`variant` writes the PET series as other scanners do; every variant's stored values give the
same SUVbw through `dicomnode.imaging.suv`:

    "bqml"             the above (Units BQML, DecayCorrection START, dose in Bq).
    "ge-private-time"  Manufacturer GE; a post-processed series: SeriesDate/Time 25 min after
                       the acquisition started, one AcquisitionTime per bed (16 slices, 3 min
                       each), the true scan start in GE's private (0009,100D) under
                       "GEMS_PETD_01" (the values are decay-corrected to it).
    "philips-cnts"     Manufacturer Philips; Units CNTS (arbitrary counts), the SUV scale factor
                       (7053,1000) and the activity concentration scale factor (7053,1009)
                       under "Philips PET Private Group".
    "admin-mbq"        DecayCorrection ADMIN (values decay-corrected to the injection: Bq/ml
                       * weight_g / dose), RadionuclideTotalDose in MBq (300).
    "midnight"         injected 23:30 the day before, scanned 00:30: only
                       RadiopharmaceuticalStartTime, no RadiopharmaceuticalStartDateTime.

The header helpers (study_dataset, image_dataset, ct_slice, write_series, write_labels) also
write the registry models' MR and CT studies (dicomnode/synth/registry.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)

from dicomnode.synth import petct_phantom as ph

# Acquisition scenario: F-18 FDG, 300 MBq, 75 kg, PET started 60 min after injection.
INJECTION = datetime(2024, 3, 15, 8, 10, 0)
UPTAKE = timedelta(minutes=60)
CT_START = INJECTION + UPTAKE - timedelta(minutes=5)
PET_START = INJECTION + UPTAKE
INJECTED_DOSE_BQ = 300e6
F18_HALF_LIFE_S = 6586.2
PATIENT_WEIGHT_KG = 75.0
PET_FRAME_DURATION_MS = 180_000
PET_MAX_STORED = 32767  # int16 stored values, per-slice slope maps the slice maximum here
CT_RESCALE_INTERCEPT = -1024.0

VARIANTS = ("bqml", "ge-private-time", "philips-cnts", "admin-mbq", "midnight")
MIDNIGHT_INJECTION = datetime(2024, 3, 14, 23, 30, 0)  # "midnight": the scan is after midnight
GE_SERIES_DELAY = timedelta(minutes=25)  # "ge-private-time": SeriesTime after the acquisition
GE_SLICES_PER_BED = 16
PHILIPS_BQML_PER_COUNT = 0.8  # "philips-cnts": Bq/ml per rescaled count


@dataclass(frozen=True)
class _Times:
    injection: datetime
    ct_start: datetime
    pet_start: datetime


def _times(variant: str) -> _Times:
    injection = MIDNIGHT_INJECTION if variant == "midnight" else INJECTION
    return _Times(injection, injection + UPTAKE - timedelta(minutes=5), injection + UPTAKE)


@dataclass
class SyntheticStudy:
    root: Path
    ct_dir: Path
    pt_dir: Path
    ct_files: list[Path]
    pt_files: list[Path]
    truth_labels: Path
    truth_json: Path
    study_instance_uid: str
    frame_of_reference_uid: str
    ct_series_instance_uid: str
    pt_series_instance_uid: str
    phantom: ph.Phantom
    variant: str = "bqml"


def suv_to_bqml_factor() -> float:
    """Bq/ml per SUVbw unit for the synthetic acquisition (the inverse of the SUVbw factor)."""
    decay_s = (PET_START - INJECTION).total_seconds()
    decayed_dose = INJECTED_DOSE_BQ * 2.0 ** (-decay_s / F18_HALF_LIFE_S)
    return decayed_dose / (PATIENT_WEIGHT_KG * 1000.0)


def write_study(
    out_dir: Path,
    seed: int = 0,
    *,
    patient_id: str = "SYNTH-0001",
    patient_name: str = "Synthetic^PetCt",
    n_lesions: int | None = None,
    variant: str = "bqml",
) -> SyntheticStudy:
    """Write the study; `variant` (see the module docstring) says how the PET is stored."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: one of {', '.join(VARIANTS)}")
    phantom = ph.random_phantom(seed, n_lesions=n_lesions)
    return write_phantom(out_dir, phantom, patient_id=patient_id, patient_name=patient_name, variant=variant)


def write_phantom(
    out_dir: Path,
    phantom: ph.Phantom,
    *,
    patient_id: str = "SYNTH-0001",
    patient_name: str = "Synthetic^PetCt",
    variant: str = "bqml",
    days_later: int = 0,
    pose: ph.Pose | None = None,
    patient_sex: str = "O",
    patient_size_m: float | None = 1.75,
    study_description: str = "PET/CT synthetic phantom",
) -> SyntheticStudy:
    """Write `phantom` as a CT and a PET series of one new study (write_study's layout).

    For a patient timeline (dicomnode.synth.timeline): `days_later` moves every date and time
    by that many days, `pose` puts the patient elsewhere in the scanner (petct_phantom.Pose), and
    PatientSex / PatientSize are as given (None: no PatientSize)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: one of {', '.join(VARIANTS)}")
    out_dir = Path(out_dir)
    shift = timedelta(days=days_later)
    base = _times(variant)
    times = _Times(base.injection + shift, base.ct_start + shift, base.pet_start + shift)
    seed = phantom.seed
    study = study_dataset(patient_id, patient_name, times.ct_start)
    study.PatientSex = patient_sex
    if patient_size_m is None:
        del study.PatientSize
    else:
        study.PatientSize = f"{patient_size_m:g}"
    study.StudyDescription = study_description
    frame_of_reference_uid = generate_uid()

    ct_series_uid = generate_uid()
    ct_files = write_series(
        out_dir / "CT",
        "ct",
        [
            ct_slice(study, frame_of_reference_uid, ct_series_uid, ph.CT_GRID, k, plane, times.ct_start)
            for k, plane in enumerate(ph.ct_hu(phantom, ph.CT_GRID, pose=pose))
        ],
    )

    pt_series_uid = generate_uid()
    values = ph.pet_suv(phantom, ph.PET_GRID, pose=pose).astype(np.float64) * _rescaled_per_suv(variant)
    pt_files = write_series(
        out_dir / "PT",
        "pt",
        [
            _pt_slice(study, frame_of_reference_uid, pt_series_uid, ph.PET_GRID, k, plane, variant, times)
            for k, plane in enumerate(values)
        ],
    )

    truth_dir = out_dir / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    truth_labels = truth_dir / "lesions.nii.gz"
    write_labels(ph.lesion_masks(phantom, ph.PET_GRID, pose), ph.PET_GRID, truth_labels)
    truth_json = truth_dir / "truth.json"
    truth_json.write_text(
        json.dumps(
            {
                "seed": seed,
                "variant": variant,
                "patient_id": patient_id,
                "study_instance_uid": study.StudyInstanceUID,
                "frame_of_reference_uid": frame_of_reference_uid,
                "ct_series_instance_uid": ct_series_uid,
                "pt_series_instance_uid": pt_series_uid,
                "labels_grid": "PT",
                "lesions": [
                    {
                        "label": k,
                        "centre_mm": list(les.centre_mm),
                        "radius_mm": les.radius_mm,
                        "suv": les.suv,
                    }
                    for k, les in enumerate(phantom.lesions, start=1)
                ],
            },
            indent=2,
        )
    )
    return SyntheticStudy(
        root=out_dir,
        ct_dir=out_dir / "CT",
        pt_dir=out_dir / "PT",
        ct_files=ct_files,
        pt_files=pt_files,
        truth_labels=truth_labels,
        truth_json=truth_json,
        study_instance_uid=study.StudyInstanceUID,
        frame_of_reference_uid=frame_of_reference_uid,
        ct_series_instance_uid=ct_series_uid,
        pt_series_instance_uid=pt_series_uid,
        phantom=phantom,
        variant=variant,
    )


def _rescaled_per_suv(variant: str) -> float:
    """Rescaled PET pixel units per SUVbw for a variant."""
    if variant == "admin-mbq":  # decay-corrected to the injection: the whole dose counts
        return INJECTED_DOSE_BQ / (PATIENT_WEIGHT_KG * 1000.0)
    if variant == "philips-cnts":
        return suv_to_bqml_factor() / PHILIPS_BQML_PER_COUNT
    return suv_to_bqml_factor()  # the same 60 min uptake in every other variant


# --- headers ----------------------------------------------------------------------------


def _da(value: datetime) -> str:
    return value.strftime("%Y%m%d")


def _tm(value: datetime) -> str:
    return value.strftime("%H%M%S")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def study_dataset(patient_id: str, patient_name: str, ct_start: datetime = CT_START) -> Dataset:
    """Patient, General Study and Patient Study attributes shared by every image of the study."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.PatientAge = "064Y"
    ds.PatientWeight = f"{PATIENT_WEIGHT_KG:.1f}"
    ds.PatientSize = "1.75"
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = _da(ct_start)
    ds.StudyTime = _tm(ct_start)
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "PET/CT synthetic phantom"
    return ds


def image_dataset(
    study: Dataset,
    frame_of_reference_uid: str,
    series_uid: str,
    grid: ph.Grid,
    k: int,
    plane: np.ndarray,
) -> Dataset:
    """Everything common to CT and PET slices: series, frame of reference, equipment, plane, pixels."""
    ds = Dataset()
    ds.update(study)
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.Manufacturer = "dicomnode"
    ds.ManufacturerModelName = "synthetic phantom"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "dicomnode.synth"
    ds.InstanceNumber = k + 1

    sz, sy, sx = grid.spacing
    ox, oy, oz = grid.origin
    z = oz + k * sz
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [f"{ox:.4f}", f"{oy:.4f}", f"{z:.4f}"]
    ds.SliceLocation = f"{z:.4f}"
    ds.PixelSpacing = [f"{sy:g}", f"{sx:g}"]  # row spacing (y), column spacing (x)
    ds.SliceThickness = f"{sz:g}"
    ds.SpacingBetweenSlices = f"{sz:g}"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = plane.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    return ds


def ct_slice(study: Dataset, frame_of_reference_uid: str, series_uid: str, grid: ph.Grid, k: int, hu: np.ndarray,
             ct_start: datetime = CT_START) -> Dataset:
    ds = image_dataset(study, frame_of_reference_uid, series_uid, grid, k, hu)
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.SeriesNumber = 2
    ds.SeriesDescription = "CT synthetic"
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = _da(ct_start)
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = _tm(ct_start)
    ds.AcquisitionNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.KVP = "120"
    ds.XRayTubeCurrent = 100
    ds.ConvolutionKernel = "STANDARD"
    ds.BodyPartExamined = "CHEST"
    ds.RescaleIntercept = f"{CT_RESCALE_INTERCEPT:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    stored = hu.astype(np.int32) - int(CT_RESCALE_INTERCEPT)  # HU -1024..3071 -> 0..4095
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.PixelData = stored.astype(np.uint16).tobytes()
    return ds


def _pt_slice(study: Dataset, frame_of_reference_uid: str, series_uid: str, grid: ph.Grid, k: int, values: np.ndarray,
              variant: str = "bqml", times: _Times | None = None) -> Dataset:
    """One PET slice; `values` are the rescaled pixel values (Bq/ml, or counts for philips-cnts)."""
    times = times or _times(variant)
    ds = image_dataset(study, frame_of_reference_uid, series_uid, grid, k, values)
    ds.SOPClassUID = PositronEmissionTomographyImageStorage
    ds.Modality = "PT"
    ds.SeriesNumber = 3
    ds.SeriesDescription = "PET AC synthetic"
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = _da(times.pet_start)
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = _tm(times.pet_start)
    ds.AcquisitionNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BodyPartExamined = "CHEST"

    # PET Series module
    ds.Units = "BQML"
    ds.CountsSource = "EMISSION"
    ds.SeriesType = ["WHOLE BODY", "IMAGE"]
    ds.NumberOfSlices = grid.shape[0]
    ds.CorrectedImage = ["ATTN", "DECY", "SCAT", "DTIM", "RAN", "NORM"]
    ds.DecayCorrection = "START"
    ds.RandomsCorrectionMethod = "DLYD"
    ds.AttenuationCorrectionMethod = "CT"
    ds.ScatterCorrectionMethod = "model based"
    ds.ReconstructionMethod = "OSEM"
    ds.CollimatorType = "NONE"

    # PET Isotope module
    drug = Dataset()
    drug.Radiopharmaceutical = "Fluorodeoxyglucose"
    drug.RadiopharmaceuticalRoute = "Intravenous"
    drug.RadiopharmaceuticalStartTime = _tm(times.injection)
    if variant != "midnight":  # the midnight variant dates the injection by time only
        drug.RadiopharmaceuticalStartDateTime = times.injection.strftime("%Y%m%d%H%M%S")
    drug.RadionuclideTotalDose = f"{INJECTED_DOSE_BQ / 1e6:g}" if variant == "admin-mbq" else f"{INJECTED_DOSE_BQ:.1f}"
    drug.RadionuclideHalfLife = f"{F18_HALF_LIFE_S}"
    drug.RadionuclidePositronFraction = "0.9673"
    drug.RadionuclideCodeSequence = [_code("77004003", "SCT", "^18^Fluorine")]
    drug.RadiopharmaceuticalCodeSequence = [_code("35321007", "SCT", "Fluorodeoxyglucose F^18^")]
    ds.RadiopharmaceuticalInformationSequence = [drug]

    # NM/PET Patient Orientation module: recumbent, supine, head first (replaces PatientPosition)
    del ds.PatientPosition
    orientation = _code("102538003", "SCT", "recumbent")
    orientation.PatientOrientationModifierCodeSequence = [_code("40199007", "SCT", "supine")]
    ds.PatientOrientationCodeSequence = [orientation]
    ds.PatientGantryRelationshipCodeSequence = [_code("102540008", "SCT", "headfirst")]

    # PET Image module: one static frame per bed, decay-corrected to the series start.
    frame_s = PET_FRAME_DURATION_MS / 1000.0
    decay_constant = math.log(2.0) / F18_HALF_LIFE_S
    lt = decay_constant * frame_s
    ds.ActualFrameDuration = PET_FRAME_DURATION_MS
    ds.FrameReferenceTime = f"{1000.0 * math.log(lt / (1.0 - math.exp(-lt))) / decay_constant:.3f}"
    ds.DecayFactor = f"{lt / (1.0 - math.exp(-lt)):.6f}"
    ds.DoseCalibrationFactor = "1.0"
    ds.ImageIndex = k + 1
    _apply_variant(ds, k, variant, times, decay_constant)

    slope = float(values.max()) / PET_MAX_STORED if values.max() > 0 else 1.0
    slope = float(f"{slope:.10g}")  # exactly what the DS string will carry
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = f"{slope:.10g}"
    ds.PixelRepresentation = 1
    ds.PixelData = np.round(values / slope).clip(0, PET_MAX_STORED).astype(np.int16).tobytes()
    return ds


def _apply_variant(ds: Dataset, k: int, variant: str, times: _Times, decay_constant: float) -> None:
    """What a vendor variant changes in one PET slice header (see the module docstring)."""
    if variant == "ge-private-time":
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        bed_start = times.pet_start + (k // GE_SLICES_PER_BED) * timedelta(milliseconds=PET_FRAME_DURATION_MS)
        ds.AcquisitionDate, ds.AcquisitionTime = _da(bed_start), _tm(bed_start)
        processed = times.pet_start + GE_SERIES_DELAY
        ds.SeriesDate = ds.ContentDate = _da(processed)
        ds.SeriesTime = ds.ContentTime = _tm(processed)
        block = ds.private_block(0x0009, "GEMS_PETD_01", create=True)
        block.add_new(0x0D, "DT", times.pet_start.strftime("%Y%m%d%H%M%S.00"))  # PET scan_datetime
    elif variant == "philips-cnts":
        ds.Manufacturer = "Philips Medical Systems"
        ds.Units = "CNTS"
        block = ds.private_block(0x7053, "Philips PET Private Group", create=True)
        block.add_new(0x00, "DS", f"{PHILIPS_BQML_PER_COUNT / suv_to_bqml_factor():.10g}")  # SUV scale factor
        block.add_new(0x09, "DS", f"{PHILIPS_BQML_PER_COUNT:.10g}")  # activity concentration scale factor
    elif variant == "admin-mbq":
        ds.DecayCorrection = "ADMIN"
        uptake_s = (times.pet_start - times.injection).total_seconds()
        ds.DecayFactor = f"{float(ds.DecayFactor) * math.exp(decay_constant * uptake_s):.6f}"


def write_series(series_dir: Path, prefix: str, datasets: list[Dataset]) -> list[Path]:
    series_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(datasets):
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = series_dir / f"{prefix}_{k:03d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def write_labels(labels: np.ndarray, grid: ph.Grid, path: Path) -> None:
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in reversed(grid.spacing)))  # (x, y, z)
    image.SetOrigin(tuple(float(o) for o in grid.origin))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path), useCompression=True)
