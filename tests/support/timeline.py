"""A patient's baseline and follow-up PET/CT on different days (dicomnode.synth.timeline), for [models.compare]."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread

from dicomnode.synth.petct import SyntheticStudy
from dicomnode.synth.timeline import WrittenTimeline, timeline, write_timeline


def patient_timeline(folder: Path, *, patient_id: str = "FOLLOW-1",
                     scenario: str = "mixed") -> tuple[SyntheticStudy, SyntheticStudy, WrittenTimeline]:
    """(baseline, follow-up, the written timeline): one patient's two studies, the follow-up 84 days
    later in its own frame of reference, with the scenario's known lesion changes."""
    written = write_timeline(folder, timeline(scenario), patient_id=patient_id)
    return written.baseline, written.followup, written


def study_date(study: SyntheticStudy) -> str:
    return str(dcmread(study.pt_files[0], stop_before_pixels=True).StudyDate)


def timeline_files(study: SyntheticStudy) -> list[Path]:
    return sorted(study.ct_files) + sorted(study.pt_files)
