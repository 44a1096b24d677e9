"""Series loading sorts by position, refuses broken geometry, and resamples between grids."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.imaging.volumes import VolumeError, load_series, resample_to
from dicomnode.synth import petct_phantom as ph


def _copy_series(files: list[Path], folder: Path, edit=None) -> list[Path]:
    """Rewrite `files` into `folder`, applying `edit(index, dataset)` to each."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        if edit is not None:
            edit(k, ds)
        target = folder / f"x{k:03d}.dcm"
        ds.save_as(target)
        out.append(target)
    return out


def test_sorted_by_position_not_file_order_or_instance_number(synth_study, tmp_path):
    n = len(synth_study.pt_files)

    def reverse_instance_number(k, ds):
        ds.InstanceNumber = n - k

    files = _copy_series(synth_study.pt_files, tmp_path, reverse_instance_number)
    random.Random(1).shuffle(files)
    shuffled = load_series(files)
    reference = load_series(synth_study.pt_files)
    np.testing.assert_array_equal(shuffled.array, reference.array)
    z = [float(ds.ImagePositionPatient[2]) for ds in shuffled.datasets]
    assert z == sorted(z)
    assert [ds.InstanceNumber for ds in shuffled.datasets] == list(range(n, 0, -1))
    assert shuffled.origin == pytest.approx(ph.PET_GRID.origin)


def test_volume_metadata(synth_study):
    pet = load_series(synth_study.pt_files)
    assert pet.modality == "PT"
    assert pet.series_instance_uid == synth_study.pt_series_instance_uid
    assert pet.frame_of_reference_uid == synth_study.frame_of_reference_uid
    assert pet.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert pet.array.dtype == np.float32
    image = pet.to_sitk()
    assert image.GetSize() == (64, 64, 64)
    assert image.GetSpacing() == pytest.approx((4.08, 4.08, 3.0))
    assert image.GetOrigin() == pytest.approx(ph.PET_GRID.origin)


def test_missing_slice_names_the_gap(synth_study):
    files = list(synth_study.pt_files)
    del files[20]
    with pytest.raises(VolumeError, match=r"gap .* step 6\.00 mm, expected 3\.00 mm \(1 slice\(s\) missing\)") as err:
        load_series(files)
    z19 = ph.PET_GRID.origin[2] + 19 * 3.0
    assert f"z = {z19:.2f} and {z19 + 6:.2f} mm" in str(err.value)


def test_duplicate_slice_refused(synth_study):
    files = list(synth_study.pt_files) + [synth_study.pt_files[5]]
    with pytest.raises(VolumeError, match="duplicate slice position"):
        load_series(files)


def test_mixed_size_refused(synth_study):
    with pytest.raises(VolumeError, match="mixed"):
        load_series(synth_study.pt_files[:3] + synth_study.ct_files[3:6])


def test_oblique_refused(synth_study, tmp_path):
    c, s = np.cos(0.2), np.sin(0.2)

    def tilt(k, ds):
        ds.ImageOrientationPatient = [1, 0, 0, 0, c, s]

    files = _copy_series(synth_study.pt_files[:4], tmp_path, tilt)
    with pytest.raises(VolumeError, match="not axial"):
        load_series(files)


def test_ct_pixel_padding_becomes_minus_1024(synth_study, tmp_path):
    def pad_corner(k, ds):
        pixels = ds.pixel_array.copy()
        pixels[:4, :4] = 4095  # stored value chosen as padding
        ds.PixelData = pixels.tobytes()
        ds.add_new("PixelPaddingValue", "US", 4095)  # US: unsigned stored pixels

    files = _copy_series(synth_study.ct_files[:3], tmp_path, pad_corner)
    ct = load_series(files)
    assert (ct.array[:, :4, :4] == -1024.0).all()
    assert (ct.array[:, 10:, 10:] > -1024.0).all()


def test_ct_resampled_to_pet_grid(synth_study):
    ct = load_series(synth_study.ct_files)
    pet = load_series(synth_study.pt_files)
    on_pet = resample_to(ct, pet, default_value=-1024.0)
    assert on_pet.shape == pet.shape == ph.PET_GRID.shape
    assert on_pet.spacing == pytest.approx(pet.spacing)
    assert on_pet.origin == pytest.approx(pet.origin)
    assert on_pet.modality == "CT" and on_pet.datasets == []
    # Same body on both grids: soft tissue at the centre, air in the corners.
    assert on_pet.array[32, 0, 0] == pytest.approx(-1000.0)
    assert -100.0 < float(np.median(on_pet.array[32, 28:36, 28:36])) < 150.0
    # Voxels outside the CT's extent get the default value.
    assert float(on_pet.array.min()) >= -1024.0


def _reference_volume(files: list[Path]) -> np.ndarray:
    """What load_series must give: pydicom's pixel_array * RescaleSlope + RescaleIntercept in
    float64, stored as float32, slices by position."""
    datasets = sorted((pydicom.dcmread(p) for p in files), key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack([(ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
                     .astype(np.float32) for ds in datasets])


@pytest.mark.parametrize("series", ["ct", "pt"])
def test_rescaled_values_equal_pydicom_pixel_array(synth_study, series):
    """The uncompressed slices are read from their bytes (no pydicom decoder set-up): bit for bit
    what pixel_array and the rescale give, CT (unsigned, 12 of 16 bits) and PET (signed, a
    per-slice slope)."""
    files = synth_study.ct_files if series == "ct" else synth_study.pt_files
    np.testing.assert_array_equal(load_series(files).array, _reference_volume(files))


def test_other_pixel_encodings_decoded_as_pydicom_does(synth_study, tmp_path):
    """Implicit VR, signed 12-bit stored values with the high bits set (two's complement in 16
    bits) and an RLE-compressed slice: each gives what pydicom's pixel_array gives."""
    def edit(k, ds):
        stored = ds.pixel_array.astype(np.int16) - 2048  # signed 12-bit: -2048..2047
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 12, 11
        ds.RescaleIntercept, ds.RescaleSlope = "-0.5", "0.25"
        ds.PixelData = stored.tobytes()
        if k == 0:
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        if k == 1:
            ds.compress(pydicom.uid.RLELossless, stored)

    files = _copy_series(synth_study.ct_files[:3], tmp_path, edit)
    volume = load_series(files)
    np.testing.assert_array_equal(volume.array, _reference_volume(files))
    assert volume.array.min() < -400  # the negative values came through


def _onto_reference_image(volume, reference, default_value: float) -> np.ndarray:
    """resample_to as it was (commit 29f7468): SimpleITK given the reference's whole image."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.Resample(volume.to_sitk(), reference.to_sitk(), sitk.Transform(),
                                                sitk.sitkLinear, float(default_value), sitk.sitkFloat32))


@pytest.mark.parametrize("into", [False, True])
def test_resampling_from_the_reference_geometry_equals_resampling_onto_its_image(synth_study, into):
    """resample_to hands SimpleITK the reference's geometry, not its voxels, and can write into a
    given array: the values are those of resampling onto the reference image, bit for bit."""
    ct = load_series(synth_study.ct_files)
    pet = load_series(synth_study.pt_files)
    for volume, reference, default in ((ct, pet, -1024.0), (pet, ct, 0.0)):
        out = np.full(reference.shape, np.nan, dtype=np.float32) if into else None
        resampled = resample_to(volume, reference, default_value=default, out=out)
        expected = _onto_reference_image(volume, reference, default)
        assert resampled.array.dtype == np.float32 and (resampled.array is out if into else True)
        np.testing.assert_array_equal(resampled.array, expected)
        assert resampled.origin == reference.origin and resampled.direction == reference.direction
        assert resampled.spacing == pytest.approx(reference.spacing)
    with pytest.raises(ValueError, match="not float32"):
        resample_to(ct, pet, default_value=-1024.0, out=np.empty(ct.shape, dtype=np.float32))


def test_series_read_into_a_given_array(synth_study):
    buffer = np.full((2, *ph.CT_GRID.shape), np.nan, dtype=np.float32)
    ct = load_series(synth_study.ct_files, allocate=lambda shape: buffer[1])
    assert ct.array.base is buffer and np.isnan(buffer[0]).all()  # the other channel untouched
    np.testing.assert_array_equal(buffer[1], load_series(synth_study.ct_files).array)
