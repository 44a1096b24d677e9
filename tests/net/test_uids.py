"""dicomnode.net.uids: the memo in front of pynetdicom's set_uid gives what set_uid gives, raises
what it raises, and is what pynetdicom's modules call once the receiver is imported."""

from __future__ import annotations

import pynetdicom.pdu_items
import pynetdicom.presentation
import pynetdicom.utils
import pytest
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.pdu_items import AbstractSyntaxSubItem
from pynetdicom.presentation import PresentationContext

import dicomnode.net.receiver  # noqa: F401 - installs the memo, as the node does
from dicomnode.net import uids

CASES = [
    (b"1.2.840.10008.1.2.1", {}),
    ("1.2.840.10008.1.2.1", {}),
    (UID(CTImageStorage), {}),
    (b"1.2.840.10008.1.2.1\x00", {}),  # padded as in a PDU
    ("", {}),
    (None, {}),
    ("1.2.3", {"validate": False}),
    ("1.02.3", {}),  # valid for pynetdicom, not conformant (a leading zero)
]


@pytest.mark.parametrize("value,options", CASES)
def test_the_memo_gives_what_set_uid_gives_twice(value, options):
    expected = uids._original(value, "x", **options)
    for _ in range(2):  # the first call fills the memo, the second reads it
        got = uids.set_uid(value, "x", **options)
        assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value,options,error", [
    ("", {"allow_empty": False}, "Invalid 'Abstract Syntax Name' value - must not be an empty str"),
    ("9" * 65, {}, "must not exceed 64 characters"),
    (None, {"allow_none": False}, "must be str, bytes or UID, not 'NoneType'"),
    (12, {}, "must be str, bytes, UID or None, not 'int'"),
])
def test_a_bad_value_raises_every_time_with_its_own_name(value, options, error):
    for _ in range(2):
        with pytest.raises((ValueError, TypeError), match=error.replace("(", r"\(").replace(")", r"\)")):
            uids.set_uid(value, "Abstract Syntax Name", **options)
    options = (options.get("allow_empty", True), options.get("allow_none", True), True)
    assert not [key for key in uids._known if key[1] == value and key[2:] == options]  # nothing remembered


def test_the_memo_starts_again_when_full(monkeypatch):
    monkeypatch.setattr(uids, "MAX_REMEMBERED", 3)
    uids._known.clear()
    for n in range(5):
        assert uids.set_uid(f"1.2.3.{n}", "x") == f"1.2.3.{n}"
    assert len(uids._known) <= 3


def test_pynetdicom_builds_its_negotiation_items_through_the_memo():
    assert pynetdicom.utils.set_uid is uids._original  # pynetdicom's own is left as it is
    assert pynetdicom.pdu_items.set_uid is uids.set_uid and pynetdicom.presentation.set_uid is uids.set_uid
    uids._known.clear()
    item = AbstractSyntaxSubItem()
    item.abstract_syntax_name = CTImageStorage.encode()
    context = PresentationContext()
    context.abstract_syntax = CTImageStorage
    context.add_transfer_syntax(ExplicitVRLittleEndian)
    assert item.abstract_syntax_name == context.abstract_syntax == CTImageStorage
    assert (True, CTImageStorage.encode(), True, True, True) in uids._known  # the PDU item's, from bytes
