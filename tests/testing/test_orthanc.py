"""LocalOrthanc (the demo/e2e PACS) and the MIP preview."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from dicomnode.results.preview import (
    PALETTE,
    default_zoom,
    mip_png,
    panel_size,
    render_mip,
)
from dicomnode.testing.orthanc import LocalOrthanc, orthanc_binary
from dicomnode.testing.ports import free_port

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

needs_orthanc = pytest.mark.skipif(
    orthanc_binary() is None,
    reason="Orthanc server binary not found (apt install orthanc, or set ORTHANC_BIN)",
)


# ---------------------------------------------------------------------------- helpers


def make_ct_series(directory: Path, n_slices: int = 3, rows: int = 16, cols: int = 12) -> list[Path]:
    """A tiny but valid CT series written with pydicom: one file per slice."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    directory.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(7)
    paths = []
    for i in range(n_slices):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.PatientName = "Test^LocalPacs"
        ds.PatientID = "LP0001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = "ACC42"
        ds.ReferringPhysicianName = ""
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.SeriesDescription = "tiny CT"
        ds.FrameOfReferenceUID = frame_uid
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-(cols - 1) / 2.0, -(rows - 1) / 2.0, 3.0 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 3.0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        pixels = rng.integers(-1000, 1000, size=(rows, cols), dtype=np.int16)
        ds.PixelData = pixels.tobytes()
        path = directory / f"ct_{i:03d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------- Orthanc


def test_free_port_is_bindable():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.fixture(scope="module")
def pacs_pair(tmp_path_factory):
    """Two Orthanc servers: ``first`` knows ``second`` as modality "second" (added over REST)."""
    if orthanc_binary() is None:
        pytest.skip("Orthanc server binary not found (apt install orthanc, or set ORTHANC_BIN)")
    root = tmp_path_factory.mktemp("orthanc")
    first = LocalOrthanc(root / "first", aet="FIRSTPACS")
    second = LocalOrthanc(root / "second", aet="SECONDPACS")
    try:
        first.start()
        second.start()
        first.add_modality("second", second.aet, "127.0.0.1", second.dicom_port)
        yield first, second
    finally:
        first.terminate()  # shut both down in parallel (each takes a few seconds)
        second.stop()
        first.stop()


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory):
    return make_ct_series(tmp_path_factory.mktemp("ct"))


@pytest.mark.e2e
@needs_orthanc
def test_start_writes_config_and_answers(pacs_pair):
    first, _ = pacs_pair
    assert first.running
    system = first.get("/system")
    assert system["DicomAet"] == "FIRSTPACS"
    assert system["DicomPort"] == first.dicom_port
    assert system["HttpPort"] == first.http_port
    assert first.url == f"http://127.0.0.1:{first.http_port}"
    assert (first.workdir / "orthanc.json").is_file()
    assert (first.workdir / "orthanc.log").is_file()
    assert first.startup_seconds is not None and first.startup_seconds < 30


@pytest.mark.e2e
@needs_orthanc
def test_upload_and_find_study(pacs_pair, ct_files):
    import pydicom

    first, _ = pacs_pair
    ids = first.upload(ct_files)
    assert len(ids) == len(ct_files) == len(set(ids))
    ref = pydicom.dcmread(ct_files[0])

    study_id = first.find_study(ref.StudyInstanceUID)
    assert study_id is not None and study_id in first.studies()
    assert first.find_study("1.2.3.4.5.6.7.8.9") is None

    series = first.series_of_study(ref.StudyInstanceUID)
    assert len(series) == 1
    tags = series[0]["MainDicomTags"]
    assert tags["Modality"] == "CT"
    assert tags["SeriesInstanceUID"] == ref.SeriesInstanceUID
    assert tags["SeriesDescription"] == "tiny CT"
    assert sorted(series[0]["Instances"]) == sorted(ids)

    inst = first.instance_tags(ids[0])
    assert inst["PatientID"] == "LP0001"
    assert inst["SOPClassUID"] == CT_IMAGE_STORAGE

    # wait_for_series finds what is there and reports what it saw when it is not.
    assert first.wait_for_series(ref.StudyInstanceUID, "CT", timeout=60)["ID"] == series[0]["ID"]
    with pytest.raises(TimeoutError, match=r"CT 'tiny CT' \(3 instances\)"):
        first.wait_for_series(ref.StudyInstanceUID, "SEG", timeout=0.3, poll=0.1)
    with pytest.raises(TimeoutError, match="not in the PACS"):
        first.wait_for_series("1.2.3.4.5.6.7.8.9", "SEG", timeout=0.2, poll=0.1)


@pytest.mark.e2e
@needs_orthanc
def test_store_to_modality_forwards_identical_instances(pacs_pair, ct_files, tmp_path):
    import pydicom

    first, second = pacs_pair
    ids = first.upload(ct_files)
    ref = pydicom.dcmread(ct_files[0])

    result = first.store_to_modality("second", [first.find_study(ref.StudyInstanceUID)])
    assert result["InstancesCount"] == len(ct_files)
    assert result["FailedInstancesCount"] == 0
    assert result["RemoteAet"] == "SECONDPACS"

    # A synchronous C-STORE has completed; still poll (bounded) rather than trust timing.
    series = second.wait_for_series(ref.StudyInstanceUID, "CT", timeout=10)
    assert len(series["Instances"]) == len(ct_files)

    originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in ct_files}
    for instance_id in series["Instances"]:
        got = pydicom.dcmread(second.download_instance(instance_id, tmp_path))
        assert got.SOPInstanceUID in originals
        orig = originals.pop(got.SOPInstanceUID)
        assert got.SeriesInstanceUID == orig.SeriesInstanceUID
        assert got.PixelData == orig.PixelData
        np.testing.assert_array_equal(got.pixel_array, orig.pixel_array)
    assert not originals
    assert ids  # uploaded into the first only
    assert set(first.studies()) >= {first.find_study(ref.StudyInstanceUID)}


@pytest.mark.e2e
@needs_orthanc
def test_echo(pacs_pair):
    first, second = pacs_pair
    assert first.echo("second")
    # A modality nobody listens on: the echo fails instead of raising.
    first.add_modality("nobody", "NOBODY", "127.0.0.1", free_port())
    assert not first.echo("nobody", timeout=2)


@pytest.mark.e2e
@needs_orthanc
def test_modalities_from_constructor_and_idempotent_stop(pacs_pair, tmp_path):
    _, second = pacs_pair
    third = LocalOrthanc(
        tmp_path / "third", aet="THIRD", modalities={"second": (second.aet, "127.0.0.1", second.dicom_port)}
    )
    with third:
        assert third.echo("second")
        # and the other way round: anyone may C-ECHO / C-STORE to it (DicomAlwaysAllow*)
        second.add_modality("third", third.aet, "127.0.0.1", third.dicom_port)
        assert second.echo("third")
        pid = third.pid
    assert not third.running
    third.stop()  # idempotent
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)


# ---------------------------------------------------------------------------- MIP preview


def _phantom_volume():
    """PET (z=10, y=6, x=8): background SUV 1 inside a body, air around, one hot lesion."""
    pet = np.zeros((10, 6, 8), np.float32)
    pet[1:9, 1:5, 1:7] = 1.0  # body
    labels = np.zeros(pet.shape, np.uint8)
    labels[2:4, 2:4, 2:4] = 1  # lesion near the feet (low z)
    pet[labels > 0] = 8.0
    return pet, labels


def test_render_mip_geometry_outline_and_inversion():
    pet, labels = _phantom_volume()
    spacing = (4.0, 2.0, 2.0)  # slices twice as far apart as the pixels
    zoom = 3  # k = 3 / 2 mm = 1.5 px/mm: each z voxel -> 6 rows, each x voxel -> 3 columns

    panel = render_mip(pet, labels, spacing, zoom=zoom)
    assert panel.dtype == np.uint8
    assert panel.shape == (10 * 6, 8 * 3, 3)  # aspect-correct: 40 mm x 16 mm at 1.5 px/mm
    assert panel_size(pet.shape, spacing, zoom) == (24, 60)

    # Projected lesion on the output grid (head at top: z flipped), and its 2-px outer border.
    proj = labels.max(axis=1)[::-1] > 0
    mask = np.repeat(np.repeat(proj, 6, axis=0), 3, axis=1)
    border = (ndimage.distance_transform_cdt(~mask, metric="taxicab") <= 2) & ~mask

    colour = np.array(PALETTE[0], np.uint8)
    is_colour = np.all(panel == colour, axis=2)
    np.testing.assert_array_equal(is_colour, border)
    grey = ~border
    assert np.all(panel[grey][:, 0] == panel[grey][:, 1]) and np.all(panel[grey][:, 1] == panel[grey][:, 2])

    # Inverted grey: lesion darkest, body mid, air white.
    rows, cols = np.nonzero(mask)
    hot = panel[int(rows.mean()), int(cols.mean()), 0]  # centre of the projected lesion
    body = panel[5 * 6 + 3, 5 * 3 + 1, 0]  # z index 4 (flipped row 5), x index 5: body only
    air = panel[1, 1, 0]
    assert hot < body < air
    assert air == 255
    assert hot < 40


def test_render_mip_without_labels_and_default_zoom():
    pet = np.zeros((64, 50, 80), np.float32)
    spacing = (3.0, 4.0, 4.0)
    zoom = default_zoom(pet.shape, spacing)
    w, h = panel_size(pet.shape, spacing, zoom)
    assert max(w, h) >= 400
    assert abs((w / h) - (80 * 4.0) / (64 * 3.0)) < 0.01
    panel = render_mip(pet, None, spacing)
    assert panel.shape == (h, w, 3)
    assert np.all(panel == 255)


def test_mip_png_stacks_header_over_panel(tmp_path):
    pet, labels = _phantom_volume()
    spacing = (4.0, 2.0, 2.0)
    out = mip_png(pet, labels, spacing, tmp_path / "sub" / "mip.png", title="Test patient: 1 lesion", zoom=3)
    assert out == tmp_path / "sub" / "mip.png"
    img = np.asarray(Image.open(io.BytesIO(out.read_bytes())).convert("RGB"))
    panel = render_mip(pet, labels, spacing, zoom=3)
    assert img.shape[1] == panel.shape[1]
    header_h = img.shape[0] - panel.shape[0]
    assert header_h > 0
    np.testing.assert_array_equal(img[header_h:], panel)
    assert (img[:header_h] < 128).any()  # some text was drawn

    # Default zoom on a realistic grid: image grows to a readable size.
    out2 = mip_png(pet, labels, spacing, tmp_path / "mip2.png")
    with Image.open(out2) as im:
        w, h = im.size
    pw, ph = panel_size(pet.shape, spacing, default_zoom(pet.shape, spacing))
    assert w == pw and h > ph >= 400
