"""`dicomnode serve` as a process: the worker is a separate, supervised process, so killing
it never stops the receiver, and it comes back."""

import os
import signal
import subprocess
import time
from pathlib import Path

from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicomnode.config import load_config
from dicomnode.localnode import start_node

from nodeutil import tiny_instance, write_config


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _wait_for(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError


def test_killed_worker_never_stops_the_receiver_and_is_restarted(tmp_path: Path):
    config_path = write_config(tmp_path)
    config = load_config(config_path)
    node = start_node(config_path, config.node.port, tmp_path / "node.log")
    try:
        [worker] = _wait_for(lambda: _children(node.process.pid), 30)
        os.kill(worker, signal.SIGKILL)  # as the kernel's OOM killer would
        ae = AE(ae_title="ANYSCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", config.node.port, ae_title=config.node.ae_title)
        assert assoc.send_c_store(tiny_instance(generate_uid(), generate_uid(), 0)).Status == 0x0000
        assoc.release()
        [restarted] = _wait_for(lambda: [p for p in _children(node.process.pid) if p != worker], 30)
        assert restarted != worker
    finally:
        assert node.stop() == 0
    log = (tmp_path / "node.log").read_text()
    assert f"worker process {worker} exited with -9; restarting" in log
