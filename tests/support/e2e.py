"""Config for a node beside a local Orthanc, for the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

from dicomnode.testing.orthanc import LocalOrthanc

REPO = Path(__file__).resolve().parents[2]


DEMO_MODEL = f"""
[[models]]
name = "demo-petct"
path = "{REPO / 'models' / 'demo-petct'}"
folds = [0, 1, 2, 3, 4]
device = "auto"
use_mirroring = false
"""


def write_node_config(folder: Path, pacs: LocalOrthanc, port: int, *, quiet_seconds: float = 2.0,
                      models: str = DEMO_MODEL, node: str = "") -> Path:
    """`models`: the [[models]] entries (default: the demo model); `node`: more [node] lines."""
    path = folder / "config.toml"
    path.write_text(f"""
[node]
ae_title = "DICOMNODE"
bind = "127.0.0.1"
port = {port}
data_dir = "var"
allowed_calling_aets = ["{pacs.aet}", "STORESCU"]
study_quiet_seconds = {quiet_seconds}
sweep_seconds = 0.5
retry_backoff_seconds = 2
{node}
[[destinations]]
name = "pacs"
ae_title = "{pacs.aet}"
host = "127.0.0.1"
port = {pacs.dicom_port}
{models}""")
    return path
