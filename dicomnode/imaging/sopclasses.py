"""Which SOP classes the node reads as images and which it only stores.

The receiver accepts every storage SOP class pynetdicom knows (a PACS forwards whole studies:
secondary captures, dose reports, presentation states, key object selections, encapsulated PDFs,
RT objects, and the node's own SEG and SR when it routes them back). Only the classes below can
fill a model's input channel: their headers are read by series selection and their pixel data
by volume building. Instances of every other class are stored and indexed like any other, their
series get the verdict "not an input of any model", and they never start a job nor count as a
late arrival of the study.
"""

from __future__ import annotations

from pydicom.uid import UID
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedPETImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    LegacyConvertedEnhancedPETImageStorage,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
)

# Image classes a model's channel can be filled from (CT, PET, MR; single-frame and enhanced)
INPUT_CLASSES: frozenset[str] = frozenset(
    str(uid)
    for uid in (
        CTImageStorage,
        EnhancedCTImageStorage,
        LegacyConvertedEnhancedCTImageStorage,
        PositronEmissionTomographyImageStorage,
        EnhancedPETImageStorage,
        LegacyConvertedEnhancedPETImageStorage,
        MRImageStorage,
        EnhancedMRImageStorage,
        LegacyConvertedEnhancedMRImageStorage,
    )
)

# Every storage SOP class pynetdicom knows (170 in pynetdicom 3.0), inputs first, then by UID (the same
# order in every process: a C-GET proposes the first 127)
STORAGE_CLASSES: tuple[str, ...] = tuple(
    sorted({str(cx.abstract_syntax) for cx in AllStoragePresentationContexts},
           key=lambda uid: (uid not in INPUT_CLASSES, uid))
)


def is_input(sop_class_uid: str) -> bool:
    """True for the classes a model can read; an unknown (empty) class is given the benefit of the doubt."""
    return not sop_class_uid or sop_class_uid in INPUT_CLASSES


def class_name(sop_class_uid: str) -> str:
    """"Segmentation Storage" for 1.2.840.10008.5.1.4.1.1.66.4; the UID itself when pydicom does not know it."""
    name = UID(sop_class_uid).name if sop_class_uid else ""
    return name if name and name != sop_class_uid else sop_class_uid or "(no SOP class)"
