"""Acknowledged instances the index lacks, indexed at start from the spool alone.

The receiver acknowledges an instance once its file is fsynced under its final name in the spool
and that folder fsynced; its index row is written a moment later by the index writer's thread
(dicomnode.store.index.IndexWriter, deferred). A process killed in between leaves files in the
spool that the index does not name: before the receiver listens again, every spool file whose SOP
Instance UID is not in the index is read (header only) and indexed, as the receiver would have
indexed it. What it cannot say is who sent it: such a row's calling AE title is RECOVERED_AET.
Temporary files (never acknowledged) are removed before this (Spool.remove_leftovers).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pydicom
from sqlalchemy.orm import sessionmaker

from dicomnode.imaging.headers import facts_from_dataset
from dicomnode.imaging.sopclasses import INPUT_CLASSES
from dicomnode.store.index import ReceivedInstance, add_instances, held_instances
from dicomnode.store.spool import Spool
from dicomnode.store.tables import utcnow

log = logging.getLogger("dicomnode.receiver")

RECOVERED_AET = ""  # the sender is not in the file: the row says no calling AE title


def index_from_spool(spool: Spool, sessions: sessionmaker) -> int:
    """Index the spool's files the index lacks (by SOP Instance UID); how many were indexed."""
    if not spool.root.is_dir():
        return 0
    indexed = 0
    for study in os.scandir(spool.root):
        if not study.is_dir() or study.name.startswith("."):
            continue
        files = {entry.name[:-4]: Path(entry.path) for series in os.scandir(study.path) if series.is_dir()
                 for entry in os.scandir(series.path) if entry.name.endswith(".dcm") and not entry.name.startswith(".")}
        if not files:
            continue
        with sessions() as session:
            held = held_instances(session, list(files))
        items = [item for item in (_received(path) for uid, path in files.items() if uid not in held) if item]
        if items:
            with sessions.begin() as session:
                add_instances(session, items, utcnow())
            log.warning("study %s: %d acknowledged instances were in the spool and not in the index (the node "
                        "stopped before it wrote them): indexed now", study.name, len(items))
            indexed += len(items)
    return indexed


def _received(path: Path) -> ReceivedInstance | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        facts = facts_from_dataset(ds, path)
        sop_class = str(ds.SOPClassUID)
        return ReceivedInstance(
            study_uid=facts.study_uid, series_uid=facts.series_uid, sop_instance_uid=facts.sop_instance_uid,
            sop_class_uid=sop_class, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            modality=facts.modality, series_number=facts.series_number, series_description=facts.series_description,
            path=str(path), calling_aet=RECOVERED_AET, counts_as_arrival=sop_class in INPUT_CLASSES)
    except Exception as exc:  # noqa: BLE001 - a file that is not what the receiver wrote: left as it is
        log.error("spool file %s is not in the index and cannot be read: %s; left unindexed", path, exc)
        return None
