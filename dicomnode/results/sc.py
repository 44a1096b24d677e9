"""Result -> DICOM Secondary Capture image, for PACS viewers that do not display a SEG.

`build_sc(suv, lesion_labels, measures, source, ...)` renders the PNG preview's image
(dicomnode.results.preview.render_preview: the coronal PET MIP in inverted grey, head up, patient's
right on the viewer's left, each lesion outlined in its colour, the RTSTRUCT's ROI colours)
with the key figures burned into its header band: lesion count, total MTV, total TLG, the
highest SUVmax, the model's name and version, and a caveat that it is an unreviewed
automatic result. It goes into a new series of the source study as a Secondary Capture
Image (highdicom `SCImage`, RGB, uncompressed so any viewer shows it), BurnedInAnnotation
YES, ConversionType WSD (rendered on a workstation), PatientOrientation L\\F.
"""

from __future__ import annotations

from typing import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.imaging.comparison import Comparison
from dicomnode.imaging.measures import StudyMeasures
from dicomnode.results.common import MANUFACTURER, ResultError, check_on_source
from dicomnode.results.preview import PriorView, comparison_text, display_window, render_comparison, render_preview

TRANSFER_SYNTAX = ExplicitVRLittleEndian  # uncompressed RGB: any viewer shows it
CAVEAT = "automatic segmentation, not reviewed: not for diagnosis"


def key_figures(measures: StudyMeasures, window: float) -> str:
    """The figures burned into the image, one line."""
    if measures.lesion_count == 0:
        found = "no lesions found"
    else:
        suv_max = max(lesion.suv_max for lesion in measures.lesions)
        plural = "s" if measures.lesion_count != 1 else ""
        found = (f"{measures.lesion_count} lesion{plural} | MTV {measures.total_mtv_ml:.1f} ml | "
                 f"TLG {measures.total_tlg_g:.1f} g | SUVmax {suv_max:.1f}")
    return f"{found} | MIP window SUVbw 0-{window:.1f}"


def build_sc(
    suv: np.ndarray,
    lesion_labels: np.ndarray,
    measures: StudyMeasures,
    source: Sequence[Dataset],
    spacing_zyx: Sequence[float],
    *,
    model_name: str,
    model_version: str,
    series_number: int,
    series_description: str,
    manufacturer: str = MANUFACTURER,
    prior: PriorView | None = None,
    comparison: Comparison | None = None,
) -> hd.sc.SCImage:
    """A secondary capture of the PET MIP with the lesions outlined; `suv` and `lesion_labels`
    are (z, y, x) on the grid of `source` (its slices, in order). With `prior` the prior study's
    MIP stands beside it (left), with `comparison` the change is burned in and the lesions are
    outlined by course (dicomnode.results.preview.render_comparison)."""
    _check_fits(suv, lesion_labels, source)
    text = f"{model_name} {model_version}: {CAVEAT}\n{key_figures(measures, display_window(suv))}"
    if prior is not None:
        if comparison is not None:
            text = f"{text}\n{comparison_text(comparison)}"
        pixels = render_comparison(suv, lesion_labels, spacing_zyx, prior, comparison, text,
                                   current_date=str(source[0].get("StudyDate", "")))
    else:
        pixels = render_preview(suv, lesion_labels, spacing_zyx, text)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source[0],
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        transfer_syntax_uid=TRANSFER_SYNTAX,
    )
    image.SeriesDescription = series_description
    image.ManufacturerModelName = model_name[:64]
    image.SoftwareVersions = model_version[:64]
    image.ConversionType = "WSD"
    image.BurnedInAnnotation = "YES"
    image.BodyPartExamined = source[0].get("BodyPartExamined") or "WHOLEBODY"  # no paired structure: no Laterality
    image.DerivationDescription = (f"coronal PET MIP (SUVbw) with the lesions of {model_name} outlined"
                                   + (", beside the prior study's" if prior is not None else ""))[:1024]
    return image


def _check_fits(suv: np.ndarray, lesion_labels: np.ndarray, source: Sequence[Dataset]) -> None:
    if suv.shape != lesion_labels.shape:
        raise ResultError(f"lesion labels shape {lesion_labels.shape} differs from the PET's {suv.shape}")
    check_on_source(suv, source, "the PET")
