"""A patient's baseline and follow-up PET/CT on different days, for [models.compare]."""

from __future__ import annotations

from pathlib import Path

from dicomnode.synth.petct import SyntheticStudy

from tests.support.fetching import stamped_study, study_files


def patient_timeline(folder: Path, *, patient_id: str = "FOLLOW-1", baseline_date: str = "20240201",
                     follow_up_date: str = "20240601") -> tuple[SyntheticStudy, SyntheticStudy]:
    """(baseline, follow-up): two synthetic studies of one patient, each with its own Study Instance UID and date."""
    baseline = stamped_study(folder / "baseline", seed=31, patient_id=patient_id, study_date=baseline_date)
    follow_up = stamped_study(folder / "follow-up", seed=32, patient_id=patient_id, study_date=follow_up_date)
    baseline.study_date, follow_up.study_date = baseline_date, follow_up_date
    return baseline, follow_up


def timeline_files(study: SyntheticStudy) -> list[Path]:
    return study_files(study)
