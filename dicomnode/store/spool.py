"""The spool: received instances on disk, durably, at data_dir/spool/<study>/<series>/<sop>.dcm.

An instance is written to a temporary file in its series folder, fsynced, renamed over its
final name and the folder fsynced, so a crash leaves either the whole file or none. The receiver
has pynetdicom write what it receives into `incoming/` instead (on the spool's file system), and
renames that file into place once checked and fsynced (`place`).
UIDs are checked before they become path components.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from pathlib import Path

from dicomnode.store.files import fsync_dir, write_durably

UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
TEMP_PREFIX = ".incoming-"
INCOMING = ".incoming"  # the receiver's received data sets, before they are checked (never a UID: no clash)


class InvalidUID(ValueError):
    """A UID that is not a valid DICOM UID (and so must not become a path)."""


def check_uid(name: str, value: object) -> str:
    text = str(value) if value is not None else ""
    if not text or len(text) > 64 or not UID.match(text):
        raise InvalidUID(f"{name} {text[:80]!r} is not a valid DICOM UID")
    return text


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / INCOMING

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        return (
            self.root
            / check_uid("StudyInstanceUID", study_uid)
            / check_uid("SeriesInstanceUID", series_uid)
            / f"{check_uid('SOPInstanceUID', sop_instance_uid)}.dcm"
        )

    def write(self, study_uid: str, series_uid: str, sop_instance_uid: str, data: bytes,
              sync_folder: bool = True) -> Path:
        """Write one encoded DICOM file durably; return its final path. With `sync_folder` False,
        the series folder's entry for it is left for the caller to fsync (the receiver's index
        writer fsyncs each folder once for all the instances of a batch, before acknowledging)."""
        final = self.path_for(study_uid, series_uid, sop_instance_uid)
        return self._in_folder(final, lambda: self.write_file(final, data, sync_folder))

    def write_file(self, final: Path, data: bytes, sync_folder: bool = False) -> Path:
        """`data` durably at `final` (its folder exists) through a temporary file beside it."""
        temp = final.parent / f"{TEMP_PREFIX}{final.stem}-{secrets.token_hex(4)}"
        return write_durably(final, lambda fh: fh.write(data), temp, sync_folder)

    def place(self, study_uid: str, series_uid: str, sop_instance_uid: str, put: Callable[[Path], None]) -> Path:
        """`put(final path)` puts the instance's file there durably (fsynced, renamed); the new
        folders' entries are fsynced here, the series folder's entry is left to the caller (as
        `write` with sync_folder False)."""
        final = self.path_for(study_uid, series_uid, sop_instance_uid)
        return self._in_folder(final, lambda: put(final))

    def _in_folder(self, final: Path, put: Callable[[], object]) -> Path:
        folder = final.parent
        new_folders = [p for p in (folder.parent, folder) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        put()
        for created in new_folders:  # make new folder entries durable too
            fsync_dir(created.parent)
        return final

    def remove(self, path: Path) -> None:
        """Remove a file written for an instance that was then refused (never acknowledged)."""
        Path(path).unlink(missing_ok=True)
        fsync_dir(Path(path).parent)

    def remove_incoming_of(self, pid: int) -> int:
        """Delete the incoming files of a receiving process that has exited (their names carry its
        process ID: dicomnode.net.receiver): data sets it never acknowledged; return how many."""
        count = 0
        for temp in self.incoming.glob(f"{TEMP_PREFIX}{pid}-*"):
            temp.unlink(missing_ok=True)
            count += 1
        return count

    def remove_leftovers(self) -> int:
        """Delete temporary files a crash left behind (never acknowledged); return how many."""
        count = 0
        if self.root.exists():
            for temp in [*self.root.glob(f"*/*/{TEMP_PREFIX}*"), *self.incoming.glob("*")]:
                temp.unlink(missing_ok=True)
                count += 1
        return count
