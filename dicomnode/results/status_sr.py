"""The "not performed" status SR: a small Comprehensive SR that goes into a study whose job ended
without results, so the reader sees in the PACS which model did not run and why, instead of a
silent absence. It holds no measurements.

Content tree (every item a child of the root CONTAINER):

- Document title: (NOTPERFORMED, 99DCMNODE, "AI processing not performed"). PS3.16 has no
  document title for a processing status: CID 7000-7021 titles name reports of findings
  ("Imaging Measurement Report", "Diagnostic Imaging Report" LN 18748-4), which this document is
  not, so the title is of the node's private coding scheme 99DCMNODE (the "99" prefix PS3.3 keeps
  for private schemes), declared in CodingSchemeIdentificationSequence. Viewers show the code
  meaning, which says it.
- HAS OBS CONTEXT: the node as device observer (TID 1004), as in the measurement SR.
- CONTAINS CODE (111017, DCM, "CAD Processing and Findings Summary") = (111245, DCM, "No
  algorithms succeeded; without findings"), CID 6047: the standard's words for an automatic
  analysis that produced nothing.
- CONTAINS TEXT (111001, DCM, "Algorithm Name") and (111003, DCM, "Algorithm Version") (TID 4019):
  the model and its version.
- CONTAINS TEXT (REASON, 99DCMNODE, "Reason not performed"): the reason in plain words (the job's
  final error, what `dicomnode jobs show` prints).
- CONTAINS TEXT (121106, DCM, "Comment"): one sentence for the reader naming the model, the run
  and that no results of this run follow.
- CONTAINS DATETIME (111702, DCM, "DateTime of processing"): when the job ended.

Patient and study come from `evidence` (headers of the study's instances), listed in
CurrentRequestedProcedureEvidenceSequence (highdicom puts the evidence there).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicomnode.results.common import PRIVATE_SCHEME, ResultError, declare_private_scheme, with_type2_attributes
from dicomnode.results.sr import device_observation_context

TITLE = Code("NOTPERFORMED", PRIVATE_SCHEME, "AI processing not performed")
REASON = Code("REASON", PRIVATE_SCHEME, "Reason not performed")
PROCESSING_SUMMARY = Code("111017", "DCM", "CAD Processing and Findings Summary")
NO_ALGORITHMS_SUCCEEDED = Code("111245", "DCM", "No algorithms succeeded; without findings")
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
COMMENT = Code("121106", "DCM", "Comment")
PROCESSING_TIME = Code("111702", "DCM", "DateTime of processing")

_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


def not_performed_sentence(model_name: str, model_version: str, run: int, reason: str) -> str:
    """What the reader is told in one sentence (the Comment item)."""
    return (f"AI model {model_name} (version {model_version}) was not performed on this study (run {run}): "
            f"{reason}. No results of this run will follow; results of a later run come in series of their own.")


def build_status_sr(
    evidence: Sequence[Dataset],
    *,
    model_name: str,
    model_version: str,
    run: int,
    reason: str,
    when: datetime,
    series_number: int,
    series_description: str,
    manufacturer: str = "dicomnode",
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> hd.sr.ComprehensiveSR:
    """The status SR of a job of `model_name` that ended without results at `when`, in a new
    series of the evidence's study (see the module's docstring). The UIDs are new unless given
    (the pipeline derives them from the job, so a rewrite can never make a second object)."""
    if not evidence:
        raise ResultError("a status SR needs at least one instance of the study (patient and study attributes)")
    studies = {str(ds.StudyInstanceUID) for ds in evidence}
    if len(studies) != 1:
        raise ResultError(f"evidence from {len(studies)} studies, expected one")
    reason = " ".join(reason.split()) or "no reason recorded"
    items = [
        *device_observation_context(manufacturer, model_name, model_version),
        hd.sr.CodeContentItem(PROCESSING_SUMMARY, NO_ALGORITHMS_SUCCEEDED, relationship_type=_CONTAINS),
        hd.sr.TextContentItem(ALGORITHM_NAME, model_name, relationship_type=_CONTAINS),
        hd.sr.TextContentItem(ALGORITHM_VERSION, model_version, relationship_type=_CONTAINS),
        hd.sr.TextContentItem(REASON, reason, relationship_type=_CONTAINS),
        hd.sr.TextContentItem(COMMENT, not_performed_sentence(model_name, model_version, run, reason),
                              relationship_type=_CONTAINS),
        hd.sr.DateTimeContentItem(PROCESSING_TIME, when, relationship_type=_CONTAINS),
    ]
    root = hd.sr.ContainerContentItem(name=TITLE, template_id=None)
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.ComprehensiveSR(
        evidence=[with_type2_attributes(ds) for ds in evidence],
        content=root,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=True,
        is_verified=False,
        series_description=series_description[:64],
        manufacturer_model_name=model_name,
        software_versions=model_version,
        device_serial_number="0",
    )
    declare_private_scheme(sr)
    return sr
