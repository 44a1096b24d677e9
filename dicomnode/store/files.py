"""Files written so that a crash leaves either the whole file or none: written to a temporary
name in the same folder, fsynced, renamed over the final name, and the folder fsynced. The
spool writes received instances this way, and the results writer its DICOM objects (a full
disk fails the write, removes the temporary file and never leaves a truncated object behind).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writing the dirty pages out, do not wait


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) from the C library (the standard library has no binding); None
    elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range  # the C library the process runs on
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_START_WRITEBACK = _sync_file_range()


def start_writeback(fd: int) -> bool:
    """Have the kernel start writing the file's dirty pages to disk now, without waiting (Linux's
    sync_file_range with SYNC_FILE_RANGE_WRITE, as PostgreSQL does before its checkpoint fsyncs),
    so that an fsync after other work finds most of the data written. Only a head start: it makes
    nothing durable (no metadata, no disk cache flush), the fsync still must follow. Does nothing
    where the call is missing or refused. True: the kernel took it."""
    return _START_WRITEBACK is not None and _START_WRITEBACK(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0


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
