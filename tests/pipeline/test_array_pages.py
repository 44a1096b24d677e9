"""The worker's arrays in 4 KiB pages (pipeline.worker.small_pages_for_arrays): numpy no longer
asks for transparent huge pages, unless NUMPY_MADVISE_HUGEPAGE says otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.pipeline.worker import small_pages_for_arrays

_switch = np._core.multiarray._set_madvise_hugepage  # returns the setting it replaces


@pytest.fixture
def numpy_setting():
    before = _switch(True)
    _switch(before)
    yield
    _switch(before)


def _huge_kib(array: np.ndarray) -> int:
    """AnonHugePages (KiB) of the mapping that holds `array`'s data (/proc/self/smaps)."""
    address = array.__array_interface__["data"][0] + array.nbytes // 2  # past the first page (its own mapping)
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError("no mapping holds the array")


def test_huge_pages_are_turned_off(monkeypatch, numpy_setting):
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    _switch(True)
    assert small_pages_for_arrays() is False
    assert _switch(False) is False  # what the worker set
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if mode.exists() and "[madvise]" in mode.read_text():  # huge pages only where asked for
        array = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched: 32 huge pages if madvised
        assert _huge_kib(array) == 0


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("0", False)])
def test_numpys_own_switch_decides_where_set(monkeypatch, numpy_setting, value, expected):
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", value)
    _switch(True)
    assert small_pages_for_arrays() is expected
    assert _switch(True) is True  # left as numpy set it (here: as the test did)
