"""A node process started from a config, and reading its SEG back: for the demo and the
end-to-end tests (not used by the node itself)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import dcmread


@dataclass
class RunningNode:
    config_path: Path
    port: int
    ae_title: str
    process: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dicomnode", *args, "--config", str(self.config_path)],
                              capture_output=True, text=True, timeout=60, check=True)


def start_node(
    config_path: Path, port: int, log_path: Path, timeout: float = 60.0, extra_args: tuple[str, ...] = ()
) -> RunningNode:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TCP_NODELAY": "1"}
    log = open(log_path, "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "serve", "--config", str(config_path), *extra_args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=config_path.parent,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"node exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return RunningNode(config_path, port, "DICOMNODE", process, log_path)
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise TimeoutError(f"node did not listen on {port} within {timeout} s:\n{log_path.read_text()}")


def seg_on_source_grid(seg_path: Path, source_paths: list[Path]) -> np.ndarray:
    """The SEG's first segment as a (z, y, x) mask on the source series, slices by position."""
    sources = sorted(
        (dcmread(p, stop_before_pixels=True) for p in source_paths), key=lambda d: float(d.ImagePositionPatient[2])
    )
    seg = hd.seg.segread(seg_path)
    uids = [str(d.SOPInstanceUID) for d in sources]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=[1],
        ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True,
    )
    return pixels[..., 0].astype(bool)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 2.0 * np.logical_and(a, b).sum() / total if total else 1.0
