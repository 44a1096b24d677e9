"""Studies to fetch: synthetic PET/CT studies restamped with a patient, date and accession number,
and a node config beside a local Orthanc with [[sources]] entries pointing at it."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from dicomnode.synth.petct import SyntheticStudy, write_study
from dicomnode.testing.orthanc import LocalOrthanc


def study_files(study: SyntheticStudy) -> list[Path]:
    return sorted(study.ct_dir.glob("*.dcm")) + sorted(study.pt_dir.glob("*.dcm"))


def stamped_study(folder: Path, seed: int, *, patient_id: str = "FETCH-1", study_date: str = "20240601",
                  accession: str = "", modalities: tuple[str, ...] = ("CT", "PT")) -> SyntheticStudy:
    """A synthetic study (64 CT + 64 PET instances) with this patient, date and accession number;
    `modalities=("CT",)` drops the PET series. A fresh Study Instance UID either way."""
    study = write_study(folder, seed=seed, patient_id=patient_id)
    study_uid = generate_uid()
    if "PT" not in modalities:
        for path in study.pt_dir.glob("*.dcm"):
            path.unlink()
    for path in study_files(study):
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.StudyDate, ds.AccessionNumber = study_uid, study_date, accession
        ds.save_as(path)
    study.study_instance_uid = study_uid
    return study


def sources_toml(pacs: LocalOrthanc, *, retrieve: str = "C-MOVE", name: str = "pacs") -> str:
    return f"""
[[sources]]
name = "{name}"
ae_title = "{pacs.aet}"
host = "127.0.0.1"
port = {pacs.dicom_port}
retrieve = "{retrieve}"
timeout_seconds = 30
"""
