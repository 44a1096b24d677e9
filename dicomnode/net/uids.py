"""pynetdicom's UID checks, remembered: each UID an association carries is converted and validated
once per process instead of at every use.

To negotiate one association, pynetdicom builds a pydicom UID from every abstract and transfer
syntax UID in the A-ASSOCIATE-RQ. It builds them again for the presentation contexts, and again
for the A-ASSOCIATE-AC. Each build runs `pynetdicom.utils.set_uid`. That function constructs a
UID (one regex check in pydicom), runs pynetdicom's UI validator (a second UID, a second check)
and asks `is_valid` (a third). dcmtk's storescu proposes about 120 contexts, so one association
runs about 1,800 such calls. They were a third of the receiver's CPU time per association
(bench/bench_association_setup.py).

A UID is an immutable string, so the same input gives the same result every time. `remember()`
puts a memo in front of `set_uid` in the pynetdicom modules that imported it. Only successful
results are kept. A value that fails still raises, with its own parameter name, every time. The
memo holds up to MAX_REMEMBERED values and starts again when full (a peer sending random UIDs
cannot grow it).

One visible difference: pynetdicom logs "Non-conformant ... value" for a UID that is valid but not
conformant once per process now, not once per use. This relies on `set_uid` as of the pynetdicom
version pinned in pyproject.toml (3.0.4).
"""

from __future__ import annotations

import pynetdicom.ae
import pynetdicom.dimse_primitives
import pynetdicom.pdu_items
import pynetdicom.pdu_primitives
import pynetdicom.presentation
import pynetdicom.utils
from pydicom.uid import UID

MAX_REMEMBERED = 4096
_USERS = (pynetdicom.ae, pynetdicom.dimse_primitives, pynetdicom.pdu_items, pynetdicom.pdu_primitives,
          pynetdicom.presentation)
_original = pynetdicom.utils.set_uid
_known: dict[tuple, UID | None] = {}


def set_uid(value: object, name: str, allow_empty: bool = True, allow_none: bool = True,
            validate: bool = True) -> UID | None:
    """`pynetdicom.utils.set_uid`, with its successful results remembered."""
    if isinstance(value, bytes):
        key: tuple = (True, bytes(value), allow_empty, allow_none, validate)
    elif isinstance(value, str):
        key = (False, str.__str__(value), allow_empty, allow_none, validate)
    else:  # None, or a type set_uid refuses: as it does
        return _original(value, name, allow_empty, allow_none, validate)
    try:
        return _known[key]
    except KeyError:
        pass
    result = _original(value, name, allow_empty, allow_none, validate)  # raises for a bad value, every time
    if len(_known) >= MAX_REMEMBERED:
        _known.clear()
    _known[key] = result
    return result


def remember() -> None:
    """Put the memo in front of pynetdicom's `set_uid` (once; later calls change nothing)."""
    for module in _USERS:
        module.set_uid = set_uid
