"""A synthetic PET/CT study with the distractor series a real scanner sends along, and a
helper that indexes files as the receiver does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from dicomnode.store.index import ReceivedInstance, record_instance
from dicomnode.store.tables import utcnow
from dicomnode.synth.petct import SyntheticStudy, write_study


def copy_series(
    files: list[Path], folder: Path, edit=None, *, series_number: int, description: str
) -> tuple[str, list[Path]]:
    """Rewrite `files` as a new series (new series and SOP UIDs) in `folder`; `edit(k, ds)` changes each."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    out = []
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        if edit is not None:
            edit(k, ds)
        target = folder / f"{k:03d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return series_uid, out


@dataclass
class DistractorStudy:
    study: SyntheticStudy
    root: Path
    uids: dict[str, str]  # name -> SeriesInstanceUID: pet, ct, nac, mip, localizer, ct_thick
    files: dict[str, list[Path]]

    def all_files(self) -> list[Path]:
        return [p for files in self.files.values() for p in files]


def distractor_study(root: Path, seed: int = 0, variant: str = "bqml") -> DistractorStudy:
    """write_study (of `variant`) plus: a non-attenuation-corrected PET (other values), a PET
    MIP, a CT localizer and a second CT with 6 mm slices (every other slice of the 3 mm CT)."""
    study = write_study(root / "study", seed=seed, variant=variant)
    uids = {"pet": study.pt_series_instance_uid, "ct": study.ct_series_instance_uid}
    files = {"pet": list(study.pt_files), "ct": list(study.ct_files)}

    def nac(_k, ds):
        ds.CorrectedImage = ["DECY", "RAN", "NORM"]
        ds.AttenuationCorrectionMethod = ""
        ds.RescaleSlope = f"{float(ds.RescaleSlope) * 0.4:.10g}"  # other values than the AC PET

    uids["nac"], files["nac"] = copy_series(study.pt_files, root / "NAC", nac, series_number=4, description="PET NAC")

    def mip(_k, ds):
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.SeriesType = ["WHOLE BODY", "REPROJECTION"]
        ds.NumberOfSlices = 8

    uids["mip"], files["mip"] = copy_series(
        study.pt_files[:8], root / "MIP", mip, series_number=5, description="PET MIP"
    )

    def localizer(_k, ds):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

    uids["localizer"], files["localizer"] = copy_series(
        study.ct_files[32:33], root / "LOC", localizer, series_number=1, description="Topogram"
    )

    def thick(k, ds):
        ds.SliceThickness = ds.SpacingBetweenSlices = "6"
        ds.InstanceNumber = k + 1

    uids["ct_thick"], files["ct_thick"] = copy_series(
        study.ct_files[::2], root / "CT6", thick, series_number=6, description="CT 6 mm"
    )
    return DistractorStudy(study, root, uids, files)


def index_files(sessions, files, at=None) -> None:  # noqa: ANN001
    """Index files as the receiver does (the receiver itself is tested on the network)."""
    at = at or utcnow().replace(year=2020)
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        record_instance(
            sessions,
            ReceivedInstance(
                ds.StudyInstanceUID,
                ds.SeriesInstanceUID,
                ds.SOPInstanceUID,
                ds.SOPClassUID,
                "1.2.840.10008.1.2.1",
                ds.Modality,
                int(ds.SeriesNumber),
                str(ds.get("SeriesDescription", "")),
                str(path),
                "TEST",
            ),
            now=at,
        )
