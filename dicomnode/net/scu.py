"""The node as a DICOM client (SCU): a guard for pynetdicom's requestor associations.

pynetdicom runs a reactor thread on every association. Each `send_*()` pauses it and then
waits for the peer's response. The pause has a race: `send_*()` clears the reactor's checkpoint
and waits for its `_is_paused` flag, but the flag still says "paused" in the moment after the
previous `send_*()` released the reactor and before the reactor thread has run again. The next
`send_*()` then goes ahead while the reactor still runs. If the peer answers before the reactor
pauses, the reactor takes the response off the queue and drops it ("Received unexpected C-STORE
service message"). The sender then waits out its whole DIMSE timeout and counts the try as "no
response" (pynetdicom 3.0; pydicom/pynetdicom#875 reports it for C-FIND). It happens under CPU
load, and one CI run hit it.

On an association where the peer sends no requests of its own, the reactor has nothing to
serve. `responses_to_the_caller` keeps the reactor's queue polls away from the messages, so every
response reaches the `send_*()` that waits for it. C-STORE, C-FIND, C-MOVE and C-GET are such
associations: pynetdicom's C-GET and C-MOVE loops serve the peer's C-STORE requests themselves.
Storage commitment is not one of them (the peer may send N-EVENT-REPORT on the same association,
which the reactor serves), so dicomnode.net.verify does not use this guard.
"""

from __future__ import annotations

from typing import Any


def responses_to_the_caller(assoc: Any) -> Any:  # noqa: ANN401 - a pynetdicom Association
    """Let only the blocking `get_msg` of a `send_*()` take messages off `assoc`'s DIMSE queue.

    The reactor's non-blocking poll is the only non-blocking caller in pynetdicom 3.0. Returns `assoc`.
    """
    dimse = assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False) -> tuple[Any, Any]:
        if not block:
            return None, None  # the reactor: nothing for it on this association
        return take(block=True)

    dimse.get_msg = get_msg
    return assoc
