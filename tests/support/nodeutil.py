"""Helpers for the node's tests: a config on free loopback ports and tiny DICOM instances."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)

from dicomnode.config import load_config
from dicomnode.testing.ports import free_port

REPO = Path(__file__).resolve().parents[2]


def write_config(folder: Path, *, node: str = "", extra: str = "", model_path: str | None = None,
                 mirroring: bool = False) -> Path:
    """A config.toml in `folder` on a free port; `node` adds lines to [node]; `mirroring`: the
    model's test-time mirroring (8 passes per window instead of one: a job that lasts)."""
    model_dir = Path(model_path) if model_path else folder / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    settings = {"ae_title": '"TESTNODE"', "bind": '"127.0.0.1"', "port": str(free_port()), "data_dir": '"var"',
                "study_quiet_seconds": "1", "sweep_seconds": "0.5"}
    for line in filter(None, node.splitlines()):
        key, value = line.split("=", 1)
        settings[key.strip()] = value.strip()
    node_lines = "\n".join(f"{k} = {v}" for k, v in settings.items())
    path = folder / "config.toml"
    path.write_text(
        f"""
[node]
{node_lines}

[[models]]
name = "demo-petct"
path = "{model_dir}"
folds = [0, 1, 2, 3, 4]
use_mirroring = {str(mirroring).lower()}
{extra}
"""
    )
    return path


def node_config(folder: Path, **kwargs):  # noqa: ANN003, ANN201
    return load_config(write_config(folder, **kwargs))


def tiny_instance(study_uid: str, series_uid: str, index: int, modality: str = "CT", rows: int = 8) -> Dataset:
    """A small valid CT or PET image instance (uncompressed)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage if modality == "CT" else PositronEmissionTomographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = "Test^Tiny"
    ds.PatientID = "TINY-1"
    ds.SeriesNumber = 1 if modality == "CT" else 2
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(index) * 3.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [2.0, 2.0]
    ds.SliceThickness = 3.0
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = (np.arange(rows * rows, dtype=np.int16) + index).tobytes()
    return ds


def selectable_instance(study_uid: str, series_uid: str, index: int, modality: str, frame_of_reference: str,
                        count: int = 4) -> Dataset:
    """tiny_instance with the headers series selection reads: an axial CT, or a static attenuation-
    and decay-corrected PET of `count` slices, in `frame_of_reference`."""
    ds = tiny_instance(study_uid, series_uid, index, modality)
    ds.FrameOfReferenceUID = frame_of_reference
    if modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.CorrectedImage = ["ATTN", "DECY"]
        ds.SeriesType = ["WHOLE BODY", "IMAGE"]
        ds.NumberOfSlices = count
    return ds


def write_series(folder: Path, study_uid: str, modality: str, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    paths = []
    for i in range(count):
        ds = tiny_instance(study_uid, series_uid, i, modality)
        path = folder / f"{modality}{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class IndexedSessions:
    """A running Receiver's sessions, for a test's reads: each session opens once the receiver's
    index writer has committed every row handed to it (the receiver acknowledges an instance when
    it is durable in the spool and writes its row a moment later: this waits for that, never
    sleeps). Anything else is the sessionmaker's."""

    def __init__(self, sessions, receiver) -> None:  # noqa: ANN001 - a sessionmaker, a Receiver
        self.sessions, self.receiver = sessions, receiver

    def _written(self) -> None:
        assert self.receiver.store.index.flush(30), "the receiver's index rows were not written in 30 s"

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        self._written()
        return self.sessions(*args, **kwargs)

    def begin(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        self._written()
        return self.sessions.begin(*args, **kwargs)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.sessions, name)
