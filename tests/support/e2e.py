"""Config for a node beside a local Orthanc, for the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicomnode.testing.node import RunningNode, start_node
from dicomnode.testing.orthanc import LocalOrthanc
from dicomnode.testing.ports import free_port

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


@contextmanager
def running_site(work: Path) -> Iterator[tuple[LocalOrthanc, RunningNode, Path]]:
    """Orthanc and a node (the demo model) that know each other, on free loopback ports; the node
    must exit 0 on SIGTERM, and its log's tail is printed when it stops."""
    node_port = free_port()
    pacs = LocalOrthanc(work / "orthanc", modalities={"dicomnode": ("DICOMNODE", "127.0.0.1", node_port)})
    pacs.start()
    node = None
    try:
        node = start_node(write_node_config(work, pacs, node_port), node_port, work / "node.log")
        yield pacs, node, work
    finally:
        if node is not None:
            code = node.stop()
            print((work / "node.log").read_text()[-5000:])
            assert code == 0, f"node exited with {code} on SIGTERM"
        pacs.stop()
