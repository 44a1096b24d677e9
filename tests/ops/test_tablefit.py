"""Tables at 80 columns (dicomnode.ops.tablefit): UIDs shortened in the middle and still told
apart, the least useful columns dropped in their order, free text cut with "…", `wide` whole;
and the CLI's listings on a populated database, one line per row at 80 columns (the same
through a real terminal: tests/ops/test_terminal.py)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, generate_uid
from rich.console import Console
from rich.text import Text
from typer.testing import CliRunner

from dicomnode import cli
from dicomnode.config import load_config
from dicomnode.ops.tablefit import Column, Kind, fit_table, shorten_uid, shorten_uids
from dicomnode.pipeline.queue import RetryPolicy, claim, enqueue, fail
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.index import ReceivedInstance, record_instance
from dicomnode.store.tables import utcnow

from tests.support.nodeutil import write_config

UID = "1.2.826.0.1.3680043.8.498.12345678901234567890123456090.12"


def test_a_uid_is_shortened_in_the_middle():
    assert shorten_uid(UID) == "1.2.826.0…6090.12"
    assert shorten_uid("1.2.840.10008.1.2") == "1.2.840.10008.1.2"  # no shorter with "…": whole


def test_shortened_uids_stay_distinct():
    a, b, c = "1.2.826.0.1.3680043.8.498.111.6090.12", "1.2.826.0.1.3680043.8.498.222.6090.12", "1.2.3"
    short = shorten_uids([a, b, c, a])
    assert len(set(short.values())) == 3
    assert short[a] == "1.2.826.0…1.6090.12" and short[b] == "1.2.826.0…2.6090.12" and short[c] == "1.2.3"
    for uid, shown in short.items():
        head, _, tail = shown.partition("…")
        assert uid.startswith(head) and uid.endswith(tail)


COLUMNS = [
    Column("id"),
    Column("study", Kind.UID),
    Column("when", drop=1),
    Column("count", drop=2),
    Column("error", Kind.TEXT, drop=3),
]
ROWS = [("1", UID, "2026-01-01 08:00:00", "12", Text("a very long error text " * 5)),
        ("2", UID.replace("1.2.826", "1.2.827"), "2026-01-01 08:01:00", "3", Text(""))]


def _lines(table, width: int) -> list[str]:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table)
    return console.export_text().splitlines()


def test_columns_go_in_their_order_and_text_takes_the_rest():
    wide = fit_table("t", COLUMNS, ROWS, 300)
    assert wide.shown == ["id", "study", "when", "count", "error"] and UID in "\n".join(_lines(wide.table, 300))
    at80 = fit_table("t", COLUMNS, ROWS, 80)
    assert at80.shown == ["id", "study", "when", "count", "error"] and at80.width == 80
    text = _lines(at80.table, 80)
    assert all(len(line) <= 80 for line in text) and len(text) == 7  # title, 3 rules, header, 2 rows
    assert "1.2.826.0…6090.12" in text[4] and text[4].rstrip(" │").endswith("…")
    narrow = fit_table("t", COLUMNS, ROWS, 50)
    assert narrow.shown == ["id", "study", "count", "error"]  # "when" went first
    assert all(len(line) <= 50 for line in _lines(narrow.table, 50))
    assert fit_table("t", COLUMNS, ROWS, 40).shown == ["id", "study"]  # then "count", then the error too
    forced = fit_table("t", COLUMNS, ROWS, 50, wide=True)
    assert forced.shown == ["id", "study", "when", "count", "error"] and forced.width > 150
    assert any(UID in line for line in _lines(forced.table, forced.width))


def populated(tmp_path: Path) -> Path:
    """A node's config.toml, its database with five studies and their jobs, one failed with a long error."""
    config = write_config(tmp_path)
    sessions = make_sessionmaker(load_config(config).database_url)
    for _ in range(5):
        study, series = generate_uid(), generate_uid()
        for i in range(2):
            record_instance(sessions, ReceivedInstance(study, series, generate_uid(), CTImageStorage,
                                                       "1.2.840.10008.1.2.1", "CT", 3, "WB CT 3.0 B30f",
                                                       f"/spool/{i}.dcm", "PACS"), now=utcnow())
        enqueue(sessions, study, "demo-petct", RetryPolicy())
    job = claim(sessions, "w", timedelta(minutes=5))
    fail(sessions, job.id, "w", "cannot compute SUVbw: PatientWeight: missing " * 3, RetryPolicy(), retryable=False)
    return config


@pytest.fixture
def node(tmp_path: Path) -> Path:
    return populated(tmp_path)


def _cli(config: Path, *args: str) -> str:
    result = CliRunner().invoke(cli.app, [*args, "--config", str(config)])
    assert result.exit_code == 0, result.output
    return result.output


def _table_rows(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("│")]


@pytest.mark.parametrize("command", [("jobs", "list"), ("studies", "list")])
def test_listings_keep_one_line_per_row_at_80_columns(node: Path, monkeypatch, command):
    monkeypatch.setattr(cli.console, "width", 80)
    listed = json.loads(_cli(node, *command, "--json"))
    uids = [item["study"] for item in listed]
    output = _cli(node, *command)
    rows = _table_rows(output)
    assert len(rows) == len(listed) == 5  # one line per row
    assert all(len(line) <= 80 for line in output.splitlines())
    shown = [row.split("│")[1 if command[0] == "studies" else 4].strip() for row in rows]
    for uid, short in zip(uids, shown):
        head, _, tail = short.partition("…")
        assert tail and uid.startswith(head) and uid.endswith(tail)
    assert len(set(shown)) == 5
    whole = _cli(node, *command, "--wide")
    assert all(uid in whole for uid in uids) and len(_table_rows(whole)) == 5
    assert json.loads(_cli(node, *command, "--json")) == listed  # --json as it was


def test_jobs_show_at_80_columns(node: Path, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 80)
    job = json.loads(_cli(node, "jobs", "list", "--state", "failed", "--json"))[0]
    output = _cli(node, "jobs", "show", str(job["id"]))
    assert all(len(line) <= 80 for line in output.splitlines())
    assert f"study {job['study']}" in output  # whole, on its own line
    first_cells = {row.split("│")[1].strip() for row in _table_rows(output)}
    assert all(len(cell) in (0, 19) for cell in first_cells)  # the times whole; the messages wrap beside them
