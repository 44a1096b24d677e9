"""The systemd side: the unit and the sysusers snippet pass systemd's own checks (where the tools
exist), and `dicomnode serve` speaks sd_notify to a real unix datagram socket: READY=1 once
the receiver listens, WATCHDOG=1 pings, STOPPING=1 on SIGTERM, then exit 0."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicomnode.config import load_config

from tests.support.nodeutil import REPO, write_config

pytestmark = pytest.mark.e2e  # starts servers or subprocesses (tests/conftest.py)

DEPLOY = REPO / "deploy"


def needs(tool: str):  # noqa: ANN201 - a pytest mark
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} not installed")


@needs("systemd-analyze")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path):
    # verify checks that ExecStart exists: point it at this checkout's installed command.
    unit = (DEPLOY / "dicomnode.service").read_text()
    assert "\nType=notify\n" in unit and "\nWatchdogSec=" in unit and "\nPrivateDevices" not in unit
    assert "\nOOMPolicy=continue\n" in unit  # a worker killed for memory does not stop the receiver
    command = Path(sys.executable).parent / "dicomnode"
    (tmp_path / "dicomnode.service").write_text(unit.replace("/opt/dicomnode/.venv/bin/dicomnode", str(command)))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "dicomnode.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr  # an unknown key is only a warning


@needs("systemd-analyze")
def test_worker_template_passes_systemd_analyze_verify(tmp_path: Path):
    """deploy/dicomnode-worker@.service, one instance per GPU on a worker-only host: instance 1
    sees GPU 1 alone (as its cuda:0) and runs `dicomnode worker` with no receiver."""
    unit = (DEPLOY / "dicomnode-worker@.service").read_text()
    assert "\nEnvironment=CUDA_VISIBLE_DEVICES=%i\n" in unit and "\nPrivateDevices" not in unit
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.split()[1:5] == ["worker", "--config", "/etc/dicomnode/config.toml", "--device"]
    assert "serve" not in exec_start and "RequiresMountsFor=/var/lib/dicomnode" in unit
    command = Path(sys.executable).parent / "dicomnode"
    (tmp_path / "dicomnode-worker@.service").write_text(
        unit.replace("/opt/dicomnode/.venv/bin/dicomnode", str(command)))
    for instance in ("0", "1"):  # the template, loaded for an instance name
        result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / f"dicomnode-worker@{instance}.service")],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stderr == "", result.stderr
    # the check does catch a mistake in the template
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dicomnode-worker@.service").write_text(
        unit.replace("/opt/dicomnode/.venv/bin/dicomnode", str(command)).replace("RestartSec=", "RestartSecs="))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "bad" / "dicomnode-worker@0.service")],
                            capture_output=True, text=True, timeout=60)
    assert "Unknown key 'RestartSecs'" in result.stderr


@needs("systemd-sysusers")
def test_sysusers_snippet_is_valid():
    result = subprocess.run(["systemd-sysusers", "--dry-run", str(DEPLOY / "dicomnode.sysusers.conf")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "invalid" not in result.stderr.lower() and "Failed" not in result.stderr, (
        result.stderr
    )


def _messages(sock: socket.socket, until: str, timeout: float) -> list[str]:
    """Datagrams received until one holds the assignment `until`."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if until in got[-1].splitlines():
            return got
    raise AssertionError(f"no {until} within {timeout} s; got {got}")


def test_serve_notifies_ready_watchdog_and_stopping(tmp_path: Path):
    config_path = write_config(tmp_path)
    port = load_config(config_path).node.port
    address = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(address))
        env = {**os.environ, "NOTIFY_SOCKET": str(address), "WATCHDOG_USEC": "1000000"}
        process = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "serve", "--config", str(config_path), "--no-worker"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            ready = _messages(sock, "READY=1", 60)[-1].splitlines()
            assert f"STATUS=accepting associations on port {port}" in ready
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass  # listening when it said so
            assert "WATCHDOG=1" in _messages(sock, "WATCHDOG=1", 5)[-1]
            process.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in _messages(sock, "STOPPING=1", 10)[-1]
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
            log = process.communicate()[1]
    assert "received SIGTERM: stopping" in log and "node stopped" in log
