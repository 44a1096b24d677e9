"""The result objects of one job, built together: which a job needs, their files and series
numbers, and the builders called in order (the SR references the SEG, built in the same call
or read back from the job's folder).

Everything comes in as arguments (the findings, the source images, the model's identity), so
this module knows nothing of jobs, queues or databases.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from highdicom.seg import segread
from pydicom.dataset import Dataset

from dicomnode.config import Config, ModelSettings, OutputKind
from dicomnode.imaging.comparison import Comparison
from dicomnode.results.common import Provenance
from dicomnode.results.preview import PriorView
from dicomnode.results.rtstruct import build_rtstruct
from dicomnode.results.sc import build_sc
from dicomnode.results.seg import build_seg
from dicomnode.results.segment_sr import build_segment_sr
from dicomnode.results.sr import build_sr

# Each result object's file in the job's result folder, in the order they are built and sent.
# STATUS, the "not performed" SR (results/status_sr.py), is written only by a job that ends without
# results (dicomnode.pipeline.notperformed), never by build_results.
RESULT_FILES = {OutputKind.SEG: "seg.dcm", OutputKind.SR: "sr.dcm", OutputKind.RTSTRUCT: "rtstruct.dcm",
                OutputKind.SC: "sc.dcm", OutputKind.STATUS: "status.dcm"}
RESULT_SERIES_OFFSET = {OutputKind.SEG: 1, OutputKind.SR: 2, OutputKind.RTSTRUCT: 3, OutputKind.SC: 4,
                        OutputKind.STATUS: 5}
RESULT_KINDS = (OutputKind.SEG, OutputKind.SR, OutputKind.RTSTRUCT, OutputKind.SC)  # what a job with results sends
# SeriesDescription of each result object (at most 64 characters): of a model with a PET channel
# (lesions), and of one without (one segment per label: SEG and SR only).
LESION_SERIES_DESCRIPTIONS = {OutputKind.SEG: "{model} lesions (run {run})",
                              OutputKind.SR: "{model} PET measurements (run {run})",
                              OutputKind.RTSTRUCT: "{model} lesion contours (run {run})",
                              OutputKind.SC: "{model} PET MIP (run {run})"}
SEGMENT_SERIES_DESCRIPTIONS = {OutputKind.SEG: "{model} segments (run {run})",
                               OutputKind.SR: "{model} volumes (run {run})"}


def results_needed(config: Config, settings: ModelSettings) -> list[OutputKind]:
    """The result objects a job writes: the SEG and the SR always (kept on disk even for a node
    without destinations), an RTSTRUCT or SC when a destination has it as an output or fallback."""
    kinds = {OutputKind.SEG, OutputKind.SR}
    for destination in config.destinations_for(settings):
        kinds.update(destination.outputs)
        kinds.update([destination.fallback] if destination.fallback else [])
    return [kind for kind in RESULT_KINDS if kind in kinds]


def result_series_number(kind: OutputKind, run: int, model_position: int) -> int:
    """SeriesNumber of a result object: 900 + 1000 per model before it in the config + 10 per
    earlier run + 1 SEG / 2 SR / 3 RTSTRUCT / 4 SC / 5 the "not performed" status SR, so run 1 of
    the first model gives 901..905, run 2 911..915, the second model 1901..; no two results of a
    study share a number until a model's 100th run."""
    return 900 + 1000 * model_position + 10 * (run - 1) + RESULT_SERIES_OFFSET[kind]


@dataclass(frozen=True)
class Findings:
    """What the result objects report. A model with a PET channel: its lesions (connected
    components of the mask) with their SUV measures (`measures`: measures.StudyMeasures, `labels`:
    lesion n = n, `segments` None: one lesion segment). A model without one: each label of its
    label map as a segment with its codes (`measures`: measures.SegmentMeasures per label,
    `labels`: the model's label map, `segments`: label value -> labelcodes' LabelCode)."""

    measures: object
    labels: np.ndarray
    segments: dict | None = None

    def as_json(self) -> object:
        return asdict(self.measures) if self.segments is None else [asdict(m) for m in self.measures]


@dataclass(frozen=True)
class Source:
    """The images the results are drawn on: the grid series' headers in slice order (what the
    SEG and the SR reference), the PET in SUVbw on that grid and its first header (None for a
    model without PET), and the grid's (z, y, x) spacing in mm."""

    datasets: Sequence[Dataset]
    spacing: tuple[float, float, float]
    suv: np.ndarray | None = None
    pet_header: Dataset | None = None


@dataclass(frozen=True)
class Algorithm:
    """Who made the results: the model's name and version (SEG algorithm identification, SR
    device), its folds and the run of the study; how it ran (test-time mirroring, the sliding
    window's tile step) and a fingerprint of its weights, where known; the site's organization and
    disclaimer (config [node] organization, result_disclaimer)."""

    name: str
    version: str
    folds: tuple[int, ...]
    run: int
    mirroring: bool | None = None
    tile_step_size: float | None = None
    weights: str | None = None
    organization: str = ""
    disclaimer: str = ""

    def provenance(self) -> Provenance:
        """The result objects' algorithm parameters (besides the folds, which the SEG names
        itself), organization and disclaimer."""
        parameters = {}
        if self.mirroring is not None:
            parameters["mirroring"] = "on" if self.mirroring else "off"
        if self.tile_step_size is not None:
            parameters["tile_step_size"] = f"{self.tile_step_size:g}"
        if self.weights:
            parameters["weights"] = self.weights
        return Provenance(parameters, self.organization, self.disclaimer, datetime.now(timezone.utc))


def build_results(kinds: Sequence[OutputKind], out: Path, findings: Findings, source: Source, algorithm: Algorithm,
                  numbers: dict[OutputKind, int], comparison: Comparison | None = None,
                  prior: PriorView | None = None) -> Iterator[tuple[OutputKind, Dataset]]:
    """Build `kinds` in RESULT_FILES order, yielding (kind, dataset); the SR references the SEG,
    built here or read back from `out`. The RTSTRUCT and the SC (PET MIP) are of PET lesions only
    (config refuses them for a model without a PET channel). `comparison` ([models.compare]): the
    follow-up's comparison with its prior, reported in the PET SR and burned into the SC, which
    shows `prior` (the prior study's PET and lesions) beside the current MIP."""
    model = dict(model_name=algorithm.name, model_version=algorithm.version)
    provenance = algorithm.provenance()
    sr_provenance = Provenance({"folds": ",".join(str(f) for f in algorithm.folds), **provenance.parameters},
                               provenance.organization, provenance.disclaimer, provenance.when)
    run, name, images = algorithm.run, algorithm.name, source.datasets
    lesions = findings.segments is None
    described = LESION_SERIES_DESCRIPTIONS if lesions else SEGMENT_SERIES_DESCRIPTIONS

    def description(kind: OutputKind) -> str:
        return described[kind].format(model=name, run=run)[:64]

    seg = None
    if OutputKind.SEG in kinds:
        if lesions:
            seg = build_seg(
                findings.labels,  # one segment of every lesion: build_seg takes labels > 0
                images,
                **model,
                folds=list(algorithm.folds),
                series_number=numbers[OutputKind.SEG],
                series_description=description(OutputKind.SEG),
                provenance=provenance,
            )
        else:
            seg = build_seg(
                findings.labels,
                images,
                **model,
                folds=list(algorithm.folds),
                segments=findings.segments,
                series_number=numbers[OutputKind.SEG],
                series_description=description(OutputKind.SEG),
                provenance=provenance,
            )
        yield OutputKind.SEG, seg
    elif OutputKind.SR in kinds:
        seg = segread(out / RESULT_FILES[OutputKind.SEG])
    if OutputKind.SR in kinds and lesions:
        yield (
            OutputKind.SR,
            build_sr(
                findings.measures,
                findings.labels,
                seg,
                images,
                pet_header=source.pet_header,
                comparison=comparison,
                **model,
                series_number=numbers[OutputKind.SR],
                series_description=description(OutputKind.SR),
                provenance=sr_provenance,
            ),
        )
    elif OutputKind.SR in kinds:
        yield (
            OutputKind.SR,
            build_segment_sr(
                findings.measures,
                seg,
                images,
                segment_codes=findings.segments,
                **model,
                series_number=numbers[OutputKind.SR],
                series_description=description(OutputKind.SR),
                provenance=sr_provenance,
            ),
        )
    if OutputKind.RTSTRUCT in kinds:
        yield (
            OutputKind.RTSTRUCT,
            build_rtstruct(
                findings.labels,
                images,
                **model,
                series_number=numbers[OutputKind.RTSTRUCT],
                series_description=description(OutputKind.RTSTRUCT),
            ),
        )
    if OutputKind.SC in kinds:
        yield (
            OutputKind.SC,
            build_sc(
                source.suv,
                findings.labels,
                findings.measures,
                images,
                source.spacing,
                **model,
                series_number=numbers[OutputKind.SC],
                series_description=description(OutputKind.SC),
                prior=prior,
                comparison=comparison if prior is not None else None,
            ),
        )
