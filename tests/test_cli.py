"""The dicomnode command on a database with jobs, and serve refusing a bad config."""

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from dicomnode.config import load_config
from dicomnode.db import make_sessionmaker
from dicomnode.queue import RetryPolicy, claim, enqueue, fail

from nodeutil import write_config


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicomnode", *args], capture_output=True, text=True, timeout=60,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


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

    listing = json.loads(_run("jobs", "list", "--json", "--config", str(config)).stdout)
    assert [(j["id"], j["state"]) for j in listing] == [(bad, "failed"), (ok, "running")]
    failed = json.loads(_run("jobs", "list", "--state", "failed", "--json", "--config", str(config)).stdout)
    assert [j["error"] for j in failed] == ["cannot compute SUVbw: PatientWeight: missing"]

    shown = json.loads(_run("jobs", "show", str(bad), "--json", "--config", str(config)).stdout)
    assert [e["event"] for e in shown["timeline"]] == ["queued", "started", "failed"]
    table = _run("jobs", "show", str(bad), "--config", str(config)).stdout
    assert "PatientWeight: missing" in table and "failed" in table

    assert _run("jobs", "retry", str(ok), "--config", str(config)).returncode == 1  # not a failed job
    assert _run("jobs", "retry", str(bad), "--config", str(config)).returncode == 0
    again = json.loads(_run("jobs", "show", str(bad), "--json", "--config", str(config)).stdout)
    assert again["state"] == "queued" and again["timeline"][-1]["event"] == "retry-requested"
