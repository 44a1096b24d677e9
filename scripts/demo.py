"""The demo: a local Orthanc PACS sends a synthetic PET/CT study to a running dicomnode, and
we wait for the SEG to come back into the same study and show what came back. In its second act
the PACS sends the same patient's follow-up, 84 days later (dicomnode.synth.timeline: one lesion
shrinking, one gone, one new, one unchanged), and the node compares it with the first study
([models.compare] in config.toml): the comparison's lines as `dicomnode jobs show` prints them.
`--single` stops after the first act.

Run with `make demo` (which installs what is needed). Uses the repo's config.toml as is:
the node on port 11112, the PACS (Orthanc, AE ORTHANC) on 4242. Everything it writes goes
under demo-out/ and var/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from dicomnode.config import load_config
from dicomnode.imaging.suv import pet_suv_volume
from dicomnode.imaging.volumes import load_series
from dicomnode.results.preview import mip_png
from dicomnode.synth.timeline import write_timeline
from dicomnode.testing.node import dice, seg_on_source_grid, start_node
from dicomnode.testing.orthanc import LocalOrthanc
from dicomnode.testing.ports import free_port

REPO = Path(__file__).resolve().parents[1]

OUT = REPO / "demo-out"


def main() -> int:
    config_path = REPO / "config.toml"
    config = load_config(config_path)
    pacs_dest = config.destinations[0]
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    print(f"1. writing a synthetic patient's PET/CT study (and its follow-up) to {OUT / 'timeline'}")
    timeline = write_timeline(OUT / "timeline", patient_id="DEMO-TIMELINE-1")
    study = timeline.baseline
    print(f"   study {study.study_instance_uid}: CT and PET series, {len(study.phantom.lesions)} planted lesions")

    print(
        f"2. starting Orthanc ({pacs_dest.ae_title} on port {pacs_dest.port}) and the node "
        f"({config.node.ae_title} on port {config.node.port})"
    )
    pacs = LocalOrthanc(
        OUT / "orthanc",
        aet=pacs_dest.ae_title,
        dicom_port=pacs_dest.port,
        http_port=free_port(),
        modalities={"dicomnode": (config.node.ae_title, "127.0.0.1", config.node.port)},
    )
    pacs.start()
    node = None
    try:
        node = start_node(config_path, config.node.port, OUT / "node.log", timeout=120)
        pacs.upload(sorted(study.ct_dir.glob("*.dcm")) + sorted(study.pt_dir.glob("*.dcm")))
        print(
            f"3. Orthanc sends the study to the node (C-STORE); the node waits until it has been quiet for "
            f"{config.node.study_quiet_seconds:.0f} s (study_quiet_seconds), then runs the model"
        )
        started = time.monotonic()
        pacs.store_to_modality("dicomnode", [pacs.find_study(study.study_instance_uid)])
        seg_series = pacs.wait_for_series(
            study.study_instance_uid, "SEG", timeout=config.node.study_quiet_seconds + 600
        )
        elapsed = time.monotonic() - started
        print(f"4. SEG back in Orthanc {elapsed:.0f} s after the study was sent")

        seg_path = pacs.download_instance(seg_series["Instances"][0], OUT / "seg.dcm")
        pet_files = sorted(study.pt_dir.glob("*.dcm"))
        mask = seg_on_source_grid(seg_path, pet_files)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(study.truth_labels)))
        lesions, n_found = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        planted_found = sum(bool(mask[truth == k].any()) for k in range(1, int(truth.max()) + 1))
        print("\nWhat the PACS holds for this study now:")
        for series in pacs.series_of_study(study.study_instance_uid):
            tags = series["MainDicomTags"]
            print(
                f"   {tags.get('Modality', ''):4} #{tags.get('SeriesNumber', ''):>4}  "
                f"{tags.get('SeriesDescription', ''):40} {len(series['Instances'])} instance(s)"
            )
        print(
            f"\nLesions found by the model: {n_found} (planted: {int(truth.max())}, of which found: {planted_found}); "
            f"Dice against the generator's truth: {dice(mask, truth > 0):.2f}"
        )
        pet = load_series(pet_files)
        png = mip_png(
            pet_suv_volume(pet),
            mask.astype(np.uint8),
            pet.spacing,
            OUT / "preview.png",
            title=f"dicomnode demo: {n_found} lesions",
        )
        print(f"Preview (PET MIP with the lesion outline): {png}")
        cli = [sys.executable, "-m", "dicomnode"]
        listing = subprocess.run(
            [*cli, "jobs", "list", "--json", "--config", str(config_path)], text=True, capture_output=True, check=True
        )
        [job] = [j for j in json.loads(listing.stdout)
               if j["study"] == study.study_instance_uid and j["model"] == config.models[0].name]
        print(f"\nThe job's timeline (dicomnode jobs show {job['id']}):")
        shown = subprocess.run(
            [*cli, "jobs", "show", str(job["id"]), "--config", str(config_path)],
            text=True,
            capture_output=True,
            env={**os.environ, "COLUMNS": "160"},
        )
        print(shown.stdout)
        if "--single" not in sys.argv[1:]:
            _follow_up(pacs, config, config_path, timeline.followup)
        return 0
    finally:
        if node is not None:
            node.stop()
        pacs.stop()


def _follow_up(pacs: LocalOrthanc, config, config_path: Path, study) -> None:  # noqa: ANN001
    """Act 2: the same patient's follow-up is sent; its job compares it with the first study."""
    print(f"\n5. Act 2: the same patient's follow-up PET/CT, 84 days later, lying elsewhere in the scanner: "
          f"study {study.study_instance_uid}")
    pacs.upload(sorted(study.ct_dir.glob("*.dcm")) + sorted(study.pt_dir.glob("*.dcm")))
    started = time.monotonic()
    pacs.store_to_modality("dicomnode", [pacs.find_study(study.study_instance_uid)])
    pacs.wait_for_series(study.study_instance_uid, "SR", timeout=config.node.study_quiet_seconds + 600)
    print(f"6. SEG and SR back in Orthanc {time.monotonic() - started:.0f} s after the follow-up was sent")
    cli = [sys.executable, "-m", "dicomnode"]
    listing = subprocess.run([*cli, "jobs", "list", "--json", "--config", str(config_path)], text=True,
                             capture_output=True, check=True)
    [job] = [j for j in json.loads(listing.stdout)
             if j["study"] == study.study_instance_uid and j["model"] == config.models[0].name]
    detail = json.loads(subprocess.run([*cli, "jobs", "show", str(job["id"]), "--json", "--config",
                                        str(config_path)], text=True, capture_output=True, check=True).stdout)
    for step in detail["timeline"]:
        if step["event"] in ("compare-prior", "no-compare-prior", "timepoint-saved", "not-compared"):
            print(f"   {step['event']}: {step['message']}")
    print(f"\nThe comparison (dicomnode jobs show {job['id']}, under the timeline):")
    for line in detail["comparison"] or ["(none: see the job's timeline)"]:
        print(f"   {line}")


if __name__ == "__main__":
    raise SystemExit(main())
