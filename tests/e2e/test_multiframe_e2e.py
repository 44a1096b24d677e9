"""End to end with enhanced multi-frame images: the synthetic PET/CT study (seed 11) and the
same study converted by highdicom.legacy (one Legacy Converted Enhanced PET and one CT instance)
go to a running node by dcmtk storescu; the node runs the demo model on both and the SEG and SR
that come back into Orthanc hold the same lesions, voxel for voxel and measure for measure."""

import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicomnode.imaging.frames import frame_headers
from dicomnode.synth.petct import write_study
from dicomnode.testing.node import seg_on_source_grid
from dicomnode.testing.orthanc import LocalOrthanc, orthanc_binary

from tests.support.dicomtools import dciodvfy_errors
from tests.support.e2e import REPO, running_site
from tests.support.multiframe import convert_series

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(orthanc_binary() is None, reason="Debian package orthanc not installed"),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed"),
    pytest.mark.skipif(not (REPO / "models" / "demo-petct" / "plans.json").exists(), reason="demo model not built"),
]
SEG_TIMEOUT = 300


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Orthanc and a node that know each other, both on free loopback ports."""
    with running_site(tmp_path_factory.mktemp("mf-site")) as running:
        yield running


def _storescu(folder: Path, port: int) -> None:
    """storescu -R: propose the SOP classes of the files (its default list has no Legacy Converted ones)."""
    result = subprocess.run(
        ["storescu", "-R", "-aet", "STORESCU", "-aec", "DICOMNODE", "+sd", "+r", "+sp", "*.dcm", "127.0.0.1",
         str(port), str(folder)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _results(pacs: LocalOrthanc, study_uid: str, work: Path, name: str) -> tuple[Path, Path]:
    [seg] = pacs.wait_for_series(study_uid, "SEG", timeout=SEG_TIMEOUT)["Instances"]
    [sr] = pacs.wait_for_series(study_uid, "SR", timeout=60)["Instances"]
    return pacs.download_instance(seg, work / f"{name}-seg.dcm"), pacs.download_instance(sr, work / f"{name}-sr.dcm")


def _lesions(sr_path: Path) -> list[tuple[float, ...]]:
    """Each lesion's measurements in the SR (value of every measurement, in order), lesion by lesion."""
    sr = hd.sr.srread(sr_path)
    groups = hd.sr.MeasurementReport.from_sequence(sr.content).get_volumetric_roi_measurement_groups()
    return [tuple(float(m.value) for m in group.get_measurements()) for group in groups]


def _multiframe_mask(seg_path: Path, pet_path: Path) -> np.ndarray:
    """The SEG's segment on the multi-frame PET's frames, slices by position along z."""
    frames = sorted(frame_headers(pydicom.dcmread(pet_path, stop_before_pixels=True)),
                    key=lambda ds: float(ds.ImagePositionPatient[2]))
    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=str(frames[0].SOPInstanceUID),
        source_frame_numbers=[ds.frame_number for ds in frames],
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )
    return pixels[..., 0].astype(bool)


def test_multiframe_study_gets_the_single_frame_lesions(site):
    pacs, node, work = site
    single = write_study(work / "single", seed=11)
    twin = write_study(work / "twin", seed=11)  # the same phantom, new UIDs
    multi_folder = work / "multi"
    [pet_path] = convert_series(twin.pt_files, multi_folder)
    convert_series(twin.ct_files, multi_folder)
    _storescu(single.root, node.port)
    _storescu(multi_folder, node.port)

    single_seg, single_sr = _results(pacs, single.study_instance_uid, work, "single")
    multi_seg, multi_sr = _results(pacs, twin.study_instance_uid, work, "multi")
    for path in (multi_seg, multi_sr):
        assert dciodvfy_errors(path) == []

    seg = pydicom.dcmread(multi_seg)
    pet_uid = str(pydicom.dcmread(pet_path, stop_before_pixels=True).SOPInstanceUID)
    assert [i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
            for i in s.ReferencedInstanceSequence] == [pet_uid]
    assert {int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
            for item in seg.PerFrameFunctionalGroupsSequence} == set(range(1, 65))

    single_mask = seg_on_source_grid(single_seg, sorted(single.pt_dir.glob("*.dcm")))
    multi_mask = _multiframe_mask(multi_seg, pet_path)
    print(f"SEG voxels: single-frame {int(single_mask.sum())}, multi-frame {int(multi_mask.sum())}")
    assert single_mask.any()
    np.testing.assert_array_equal(multi_mask, single_mask)

    single_lesions, multi_lesions = _lesions(single_sr), _lesions(multi_sr)
    print(f"SR lesions: single-frame {len(single_lesions)}, multi-frame {len(multi_lesions)}; "
          f"per lesion (SUVmax, SUVmean, SUVpeak, MTV ml, TLG g): {multi_lesions}")
    assert len(multi_lesions) == len(single_lesions) > 0
    np.testing.assert_allclose(np.array(multi_lesions), np.array(single_lesions), rtol=1e-6)
