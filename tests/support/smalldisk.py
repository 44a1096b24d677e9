"""A small real file system for disk-full tests: a tmpfs of a few MB mounted on a folder (the
tests run as root). Where mounting is impossible the test is skipped with the reason, except on
CI, where it fails: a green CI must not come from a skipped disk test."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@contextmanager
def small_filesystem(folder: Path, megabytes: int) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    mounted = _mount("-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder))
    if mounted.returncode != 0:
        reason = f"cannot mount a {megabytes} MB tmpfs on {folder}: {mounted.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def grow(folder: Path, megabytes: int) -> None:
    """Space comes back: the file system is made larger, its contents kept."""
    grown = _mount("-o", f"remount,size={megabytes}m", str(folder))
    assert grown.returncode == 0, grown.stderr


def fill(folder: Path, leave_bytes: int = 0) -> Path:
    """A ballast file that takes all but `leave_bytes` of the free space."""
    ballast = folder / "ballast"
    stat = os.statvfs(folder)
    remaining = max(stat.f_bavail * stat.f_frsize - leave_bytes, 0)
    chunk = b"\0" * (1 << 16)
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while remaining > 0:
            try:
                remaining -= os.write(fd, chunk[: min(remaining, len(chunk))])
            except OSError:  # full already
                break
    finally:
        os.close(fd)
    return ballast
