"""The disk watermark: is there room to accept more instances?

The data folder's file system is low when its free space is below `min_free_percent` of its
size or below `min_free_gb`, whichever limit is crossed first (a limit of 0 is off). The
receiver asks before every association and every C-STORE; each crossing is logged once, and
so is the return of enough space.
"""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from dicomnode.config import NodeSettings

log = logging.getLogger("dicomnode.diskspace")

GB = 1e9


@dataclass(frozen=True)
class DiskSpace:
    path: Path
    total_bytes: int
    free_bytes: int
    limit_bytes: int  # below this much free space the node refuses new instances

    @property
    def low(self) -> bool:
        return self.free_bytes < self.limit_bytes

    def describe(self) -> str:
        return (f"{self.free_bytes / GB:.1f} GB free of {self.total_bytes / GB:.1f} GB on {self.path} "
                f"(limit {self.limit_bytes / GB:.1f} GB)")


def limit_bytes(total_bytes: int, settings: NodeSettings) -> int:
    """The free space below which the node refuses: the larger of the two limits."""
    return int(max(total_bytes * settings.min_free_percent / 100, settings.min_free_gb * GB))


def existing_folder(path: Path) -> Path:
    """`path` or its nearest existing parent (the data folder may not exist yet)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def measure(data_dir: Path, settings: NodeSettings) -> DiskSpace:
    usage = shutil.disk_usage(existing_folder(data_dir))
    return DiskSpace(Path(data_dir), usage.total, usage.free, limit_bytes(usage.total, settings))


class Watermark:
    """Answers `low()` for the data folder, logging when the state changes."""

    def __init__(self, data_dir: Path, settings: NodeSettings) -> None:
        self.data_dir = data_dir
        self.settings = settings
        self._low = False
        self._lock = threading.Lock()

    def low(self) -> DiskSpace | None:
        """The measurement when space is low (refuse), None when there is room."""
        space = measure(self.data_dir, self.settings)
        with self._lock:
            if space.low and not self._low:
                log.error("disk space low: %s; refusing new associations and instances (0xA700)", space.describe())
            elif not space.low and self._low:
                log.warning("disk space back: %s; accepting instances again", space.describe())
            self._low = space.low
        return space if space.low else None
