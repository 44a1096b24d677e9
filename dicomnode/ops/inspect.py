"""`dicomnode inspect`: what the node would do with a folder of DICOM files, without a node.

For every study in the folder: each series and its verdict (dicomnode.pipeline.selection's rules,
with the model's input spec), whether the node would queue a job or hold the study back,
the SUVbw factor of the chosen PET with the attributes it came from, and warnings.
`export_inputs` writes the model's input volumes as the worker builds them
(dicomnode.pipeline.inputs.assemble_inputs): `pet_suv.nii.gz` and `ct_hu.nii.gz` on the model's grid (config
`grid`: the PET's by default, or the CT's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from dicomnode.config import ModelSettings
from dicomnode.imaging.frames import frame_headers
from dicomnode.imaging.headers import series_from_paths
from dicomnode.imaging.suv import SuvError, series_factors
from dicomnode.pipeline.selection import Selection, select_inputs

EXPORT_NAMES = {"PET": "pet_suv.nii.gz", "CT": "ct_hu.nii.gz"}


@dataclass
class StudyReport:
    study_uid: str
    selection: Selection
    suv: dict | None = None  # {"factor": float, "attributes": {...}}
    warnings: list[str] = field(default_factory=list)
    exported: dict[str, str] = field(default_factory=dict)  # channel -> file

    @property
    def ready(self) -> bool:
        return self.selection.ready

    def as_dict(self) -> dict:
        return {
            "study_uid": self.study_uid,
            "ready": self.ready,
            "node_would": "queue a job" if self.ready else "hold the study back",
            "chosen": {c: s.series_uid for c, s in self.selection.chosen.items()},
            "waiting": list(self.selection.waiting),
            "missing": list(self.selection.missing),
            "series": [v.as_dict() for v in self.selection.verdicts],
            "suv": self.suv,
            "warnings": list(self.warnings),
            "exported": dict(self.exported),
        }


@dataclass
class Report:
    path: str
    model: str
    channels: list[str]
    files: int
    studies: list[StudyReport]
    warnings: list[str] = field(default_factory=list)
    grid: str = "PET"  # the series whose grid the model's inputs are on

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "model": self.model,
            "channels": self.channels,
            "grid": self.grid,
            "files": self.files,
            "studies": [s.as_dict() for s in self.studies],
            "warnings": list(self.warnings),
        }


def dicom_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


def inspect_path(path: Path, model: ModelSettings) -> Report:
    files = dicom_files(path)
    studies, unreadable = series_from_paths(files)
    warnings = []
    if unreadable:
        names = [str(Path(u).relative_to(path)) if path.is_dir() else u for u in unreadable]
        shown = ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
        warnings.append(f"{len(unreadable)} file(s) skipped, not readable as DICOM: {shown}")
    if not studies:
        warnings.append("no DICOM instances found")
    if len(studies) > 1:
        warnings.append(f"{len(studies)} studies in the folder: the node processes each on its own")
    reports = []
    for study_uid, series in sorted(studies.items()):
        selection = select_inputs(series, model.channels, model.inputs, model.grid)
        report = StudyReport(study_uid, selection)
        report.warnings.extend(f"the node would wait: {w}" for w in selection.waiting)
        report.warnings.extend(f"the node would hold the study back: {m}" for m in selection.missing)
        if "PET" in selection.chosen:
            report.suv, problem = suv_summary(selection.paths("PET"))
            if problem:
                report.warnings.append(problem)
        reports.append(report)
    return Report(str(path), model.name, list(model.channels), len(files), reports, warnings, grid=model.grid)


def suv_summary(pet_files: list[Path]) -> tuple[dict | None, str | None]:
    """The SUVbw factor of the PET series' first slice (along z) and the attributes it used,
    computed as the worker computes it (dicomnode.imaging.suv.series_factors); each frame of an
    enhanced multi-frame PET is a slice (dicomnode.imaging.frames)."""
    headers = [frame for p in pet_files for frame in frame_headers(pydicom.dcmread(str(p), stop_before_pixels=True))]
    headers.sort(key=lambda ds: float(ds.ImagePositionPatient[2]) if "ImagePositionPatient" in ds else 0.0)
    try:
        factors = series_factors(headers)
    except SuvError as exc:
        return None, f"SUVbw cannot be computed: {exc}"
    first = factors[0]
    summary = {"factor": first.factor, "attributes": dict(first.attributes)}
    values = [f.factor for f in factors]
    if max(values) > min(values) * (1 + 1e-9):
        summary["factor_range"] = [min(values), max(values)]
    return summary, None


def export_inputs(report: StudyReport, model: ModelSettings, out: Path) -> dict[str, str]:
    """Write the channels the model would receive (those the study can fill) as NIfTI on the
    model's grid (PET or CT, config `grid`); the PET SUV is written even for a CT-only model."""
    import SimpleITK as sitk

    from dicomnode.pipeline.inputs import assemble_inputs

    selection = report.selection
    channels = [c for c in dict.fromkeys(model.channels) if c in selection.chosen]
    if "PET" not in selection.chosen:
        raise ValueError("nothing to export: no usable PET series (the SUV is needed on every grid)")
    if model.grid == "CT" and "CT" not in selection.chosen:
        raise ValueError("nothing to export: the model's grid is the CT's (grid = \"CT\") and no CT series is usable")
    if "PET" not in channels:
        channels.append("PET")
    inputs = assemble_inputs({c: selection.paths(c) for c in selection.chosen}, channels, model.grid)
    reference = inputs.grid.to_sitk()
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for channel, array in zip(channels, inputs.channels):
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(reference)
        target = out / EXPORT_NAMES[channel]
        sitk.WriteImage(image, str(target), useCompression=True)
        written[channel] = str(target)
    report.exported.update(written)
    return written
