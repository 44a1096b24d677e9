"""Where a job's results lie: its result folder and the label map file in it (dicomnode.pipeline.job
writes them; chained models and comparisons read them)."""

from __future__ import annotations

from pathlib import Path

from dicomnode.config import Config
from dicomnode.store.tables import Job

# The model's label map (key "labels") on the grid (keys spacing z,y,x, origin, direction, as
# imaging.volumes.Volume has them) with dataset.json's label names (key "label_names", JSON):
# objects missing later are built without inference, and a chained model reads it (pipeline/chain).
LABELS_FILE = "labels.npz"


def result_dir(config: Config, job: Job) -> Path:
    return config.results_dir / job.study_uid / f"job-{job.id}"
