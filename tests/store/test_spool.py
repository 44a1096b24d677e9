import os
import sys
from pathlib import Path

import pytest

from dicomnode.store.files import start_writeback
from dicomnode.store.spool import TEMP_PREFIX, InvalidUID, Spool


def test_write_is_final_and_leaves_no_temporary(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    path = spool.write("1.2.3", "1.2.3.4", "1.2.3.4.5", b"DICM-bytes")
    assert path == tmp_path / "spool" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert path.read_bytes() == b"DICM-bytes"
    assert [p.name for p in path.parent.iterdir()] == ["1.2.3.4.5.dcm"]


def test_rewrite_replaces(tmp_path: Path):
    spool = Spool(tmp_path)
    spool.write("1.2", "1.2.3", "1.2.3.4", b"old")
    path = spool.write("1.2", "1.2.3", "1.2.3.4", b"new")
    assert path.read_bytes() == b"new"


@pytest.mark.parametrize("uid", ["../../etc", "1.2.3/4", "", "1.02.3", "1..2", "1." + "2" * 70, "1.2.3 "])
def test_invalid_uids_never_become_paths(tmp_path: Path, uid: str):
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidUID):
        spool.write("1.2.3", uid, "1.2.3.4", b"x")
    assert not (tmp_path / "spool").exists() or not any((tmp_path / "spool").rglob("*.dcm"))


def test_leftover_temporaries_are_removed(tmp_path: Path):
    spool = Spool(tmp_path)
    final = spool.write("1.2", "1.2.3", "1.2.3.4", b"kept")
    (final.parent / f"{TEMP_PREFIX}1.2.3.5-abcd").write_bytes(b"half")
    assert spool.remove_leftovers() == 1
    assert [p.name for p in final.parent.iterdir()] == ["1.2.3.4.dcm"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_is_started_by_the_kernel_and_leaves_the_file_as_written(tmp_path: Path):
    """The receiver starts writing a received file out before it checks the header
    (dicomnode.store.files.start_writeback): the kernel must take the call, and the file's
    content and the fsync after it are unchanged."""
    data = os.urandom(300_000)
    with open(tmp_path / "received.dcm", "wb") as fh:
        fh.write(data)
        fh.flush()
        assert start_writeback(fh.fileno())
        os.fsync(fh.fileno())
    assert (tmp_path / "received.dcm").read_bytes() == data
    closed = os.open(tmp_path / "received.dcm", os.O_RDONLY)
    os.close(closed)
    assert not start_writeback(closed)  # refused (a closed descriptor): said, never raised
