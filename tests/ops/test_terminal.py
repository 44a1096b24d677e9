"""The CLI on an ordinary 80 x 24 terminal: `dicomnode jobs list` and `studies list` run as a
subprocess in a pseudo-terminal (no COLUMNS: rich reads the window size the terminal reports),
one line per row within 80 columns, the UIDs shortened yet told apart; `--wide` shows them whole."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from rich.cells import cell_len

from tests.ops.test_tablefit import populated

REPO = Path(__file__).resolve().parents[2]
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def in_terminal(*args: str, columns: int = 80, rows: int = 24) -> str:
    """`python -m dicomnode ARGS` on a pseudo-terminal of `columns` x `rows`: what it showed, its
    colour and cursor escapes taken out."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(TERM="xterm-256color", PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-m", "dicomnode", *args], stdin=slave, stdout=slave, stderr=slave,
                               env=env, cwd=REPO, start_new_session=True)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError as exc:  # EIO: the child closed the terminal
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    assert process.wait(timeout=60) == 0, b"".join(chunks).decode(errors="replace")
    return ESCAPES.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")


@pytest.fixture
def node(tmp_path: Path) -> Path:
    return populated(tmp_path)


def _rows(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("│")]


@pytest.mark.e2e
@pytest.mark.parametrize("command, uid_cell", [(("jobs", "list"), 4), (("studies", "list"), 1)])
def test_listings_on_an_80_column_terminal(node: Path, command, uid_cell):
    config = ("--config", str(node))
    listed = json.loads(in_terminal(*command, "--json", *config, columns=200))
    uids = [item["study"] for item in listed]

    output = in_terminal(*command, *config)
    assert all(cell_len(line) <= 80 for line in output.splitlines()), output
    rows = _rows(output)
    assert len(rows) == len(uids) == 5, output  # one line per row: no UID folded over lines
    shown = [row.split("│")[uid_cell].strip() for row in rows]
    assert len(set(shown)) == 5
    for uid, short in zip(uids, shown):
        head, ellipsis, tail = short.partition("…")
        assert ellipsis and len(tail) >= 7 and uid.startswith(head) and uid.endswith(tail), (uid, short)

    whole = in_terminal(*command, "--wide", *config)
    assert [row.split("│")[uid_cell].strip() for row in _rows(whole)] == uids


@pytest.mark.e2e
def test_review_list_on_an_80_column_terminal(node: Path):
    """`dicomnode review list`: one line per held job at 80 columns, the UIDs shortened yet told apart."""
    from datetime import timedelta

    from dicomnode.config import load_config
    from dicomnode.pipeline import review
    from dicomnode.pipeline.queue import claim
    from dicomnode.store.engine import make_sessionmaker

    sessions = make_sessionmaker(load_config(node).database_url)
    held = []
    while (job := claim(sessions, "w", timedelta(minutes=5))) is not None:
        assert review.hold(sessions, job.id, "w", "3 lesions, total MTV 21.5 ml, TLG 88.3 g; nothing sent yet")
        held.append(job.study_uid)
    assert len(held) == 4  # the fifth failed for good in `populated`
    config = ("--config", str(node))
    listed = json.loads(in_terminal("review", "list", "--json", *config, columns=200))
    assert sorted(item["study"] for item in listed) == sorted(held)

    output = in_terminal("review", "list", *config)
    assert all(cell_len(line) <= 80 for line in output.splitlines()), output
    rows = _rows(output)
    assert len(rows) == 4, output
    shown = [row.split("│")[2].strip() for row in rows]
    for item, short in zip(listed, shown):
        head, ellipsis, tail = short.partition("…")
        assert ellipsis and item["study"].startswith(head) and item["study"].endswith(tail), (item["study"], short)
    whole = in_terminal("review", "list", "--wide", *config)
    assert [row.split("│")[2].strip() for row in _rows(whole)] == [item["study"] for item in listed]
