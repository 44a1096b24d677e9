from pathlib import Path

import pytest

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
