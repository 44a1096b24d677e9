"""Files written so that a crash leaves either the whole file or none: written to a temporary
name in the same folder, fsynced, renamed over the final name, and the folder fsynced. The
spool writes received instances this way, and the results writer its DICOM objects (a full
disk fails the write, removes the temporary file and never leaves a truncated object behind).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(final: Path, write: Callable[[BinaryIO], object], temp: Path, sync_folder: bool = True) -> Path:
    """`write(file)` into `temp`, then fsync, rename to `final` and fsync the folder (with
    `sync_folder` False the caller must fsync it before relying on the file); on any failure
    `temp` is removed and the error raised. Returns `final`."""
    try:
        with open(temp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if sync_folder:
        fsync_dir(final.parent)
    return final
