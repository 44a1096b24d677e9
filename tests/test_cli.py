"""The dicomnode command on a database with jobs, serve refusing a bad config, and echo and
send to a running receiver (the admin commands: tests/test_admin.py)."""

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select
from typer.testing import CliRunner

from dicomnode import cli
from dicomnode.config import load_config
from dicomnode.pipeline.queue import RetryPolicy, claim, enqueue, fail, succeed
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Instance

from tests.support.nodeutil import write_config, write_series


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicomnode", *args], capture_output=True, text=True, timeout=60,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def _invoke(config: Path, *args: str):  # noqa: ANN202 - click.testing.Result
    """The command in this process (typer's CliRunner)."""
    return CliRunner().invoke(cli.app, [*args, "--config", str(config)])


@pytest.mark.e2e
def test_serve_refuses_a_misspelt_key(tmp_path: Path):
    config = write_config(tmp_path, node="study_quiet_secs = 5")
    result = _run("serve", "--config", str(config))
    assert result.returncode == 2
    assert "unknown key 'node.study_quiet_secs'" in result.stdout.replace("\n", "")


def test_jobs_list_show_retry(tmp_path: Path):
    config = write_config(tmp_path)
    sessions = make_sessionmaker(load_config(config).database_url)
    ok = enqueue(sessions, "1.2.3", "demo-petct", RetryPolicy())
    bad = enqueue(sessions, "1.2.4", "demo-petct", RetryPolicy())
    claim(sessions, "w", timedelta(seconds=60))
    job = claim(sessions, "w", timedelta(seconds=60))
    assert job.id == bad
    fail(sessions, bad, "w", "cannot compute SUVbw: PatientWeight: missing", RetryPolicy(), retryable=False)

    listing = json.loads(_invoke(config, "jobs", "list", "--json").output)
    assert [(j["id"], j["state"]) for j in listing] == [(bad, "failed"), (ok, "running")]
    failed = json.loads(_invoke(config, "jobs", "list", "--state", "failed", "--json").output)
    assert [j["error"] for j in failed] == ["cannot compute SUVbw: PatientWeight: missing"]

    shown = json.loads(_invoke(config, "jobs", "show", str(bad), "--json").output)
    assert [e["event"] for e in shown["timeline"]] == ["queued", "started", "failed"]
    table = _invoke(config, "jobs", "show", str(bad)).output
    assert "PatientWeight: missing" in table and "failed" in table

    assert _invoke(config, "jobs", "retry", str(ok)).exit_code == 1  # not a failed job
    assert _invoke(config, "jobs", "retry", str(bad)).exit_code == 0
    again = json.loads(_invoke(config, "jobs", "show", str(bad), "--json").output)
    assert again["state"] == "queued" and again["timeline"][-1]["event"] == "retry-requested"


def _sender_config(folder: Path, node_config, calling_aet: str) -> Path:
    """A config whose node AE title is `calling_aet` and whose destination "node" is the running receiver."""
    return write_config(
        folder,
        node=f'ae_title = "{calling_aet}"',
        extra=(
            f'[[destinations]]\nname = "node"\nae_title = "{node_config.node.ae_title}"\nhost = '
            f'"127.0.0.1"\nport = {node_config.node.port}\n'
        ),
    )


@pytest.mark.e2e
def test_echo_and_send_a_folder_to_a_receiver(node, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 160)
    config, sessions, _ = node
    study = generate_uid()
    files = write_series(tmp_path / "study", study, "CT", 5)
    (tmp_path / "study" / "notes.txt").write_text("not DICOM")
    sender = _sender_config(tmp_path / "sender", config, "GOODSCU")
    runner = CliRunner()

    echoed = runner.invoke(cli.app, ["echo", "node", "--config", str(sender)])
    assert (echoed.exit_code, echoed.output.strip()) == (0, "node: C-ECHO status 0x0000")
    sent = runner.invoke(cli.app, ["send", str(tmp_path / "study"), "node", "--config", str(sender)])
    assert sent.exit_code == 0, sent.output
    assert "skipping 1 files that are not DICOM files" in sent.output
    assert (
        "5/5" in sent.output and "sent 5 of 5 files to node" in sent.output
    )  # the progress bar's count, and the tally
    with sessions() as session:
        stored = set(session.scalars(select(Instance.sop_instance_uid).where(Instance.study_uid == study)))
    assert stored == {str(dcmread(f).SOPInstanceUID) for f in files}

    refused = _sender_config(tmp_path / "intruder", config, "INTRUDER")  # not an allowed calling AE title
    result = runner.invoke(cli.app, ["send", str(files[0]), "node", "--config", str(refused)])
    assert result.exit_code == 1
    assert (
        f"not stored: {files[0]}: association with {config.node.ae_title}@127.0.0.1:{config.node.port} rejected"
        in " ".join(result.output.split())
    )
    assert "sent 0 of 1 files" in result.output
    unknown = runner.invoke(cli.app, ["echo", "pacs", "--config", str(sender)])
    assert unknown.exit_code == 2 and "no destination named 'pacs' (have: node)" in unknown.output


def test_jobs_prioritize_list_show_and_status(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 200)
    config = write_config(tmp_path, node='low_priority_hours = "20:00-06:00"')
    sessions = make_sessionmaker(load_config(config).database_url)
    first, second = (enqueue(sessions, uid, "demo-petct", RetryPolicy()) for uid in ("1.2.3", "1.2.4"))

    done = _invoke(config, "jobs", "prioritize", str(second), "URGENT")
    assert (done.exit_code, done.output.strip()) == (0, f"job {second}: priority urgent (was normal)")
    assert _invoke(config, "jobs", "prioritize", str(first), "soon").exit_code == 2
    assert "no job 999" in _invoke(config, "jobs", "prioritize", "999", "low").output

    listing = json.loads(_invoke(config, "jobs", "list", "--json").output)
    assert [(j["id"], j["priority"]) for j in listing] == [(second, "urgent"), (first, "normal")]
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in _invoke(config, "jobs", "list").output.splitlines()
            if line.startswith("│")]
    assert [row[:3] for row in rows] == [[str(second), "queued", "urgent"], [str(first), "queued", "normal"]]
    shown = _invoke(config, "jobs", "show", str(second))
    assert "priority urgent" in shown.output and "urgent (was normal) by operator" in shown.output
    assert json.loads(_invoke(config, "jobs", "show", str(second), "--json").output)["timeline"][-1]["event"] == (
        "prioritized")

    status = json.loads(_invoke(config, "status", "--json").output)
    assert status["queued_by_priority"] == {"urgent": 1, "high": 0, "normal": 1, "low": 0}
    assert status["low_priority_hours"]["window"] == "20:00-06:00"
    text = _invoke(config, "status").output
    assert "queued 2 (urgent 1, normal 1)" in text and "low-priority jobs run 20:00-06:00 (local time)" in text

    assert claim(sessions, "w", timedelta(seconds=60)).id == second
    assert succeed(sessions, second, "w")
    refused = _invoke(config, "jobs", "prioritize", str(second), "low")
    assert refused.exit_code == 1 and f"job {second} is succeeded" in refused.output
