"""Small pieces shared by the node's DICOM server and client sides."""

from __future__ import annotations

import socket

from pynetdicom import evt


def _set_nodelay(event) -> None:  # noqa: ANN001 - pynetdicom event
    """Turn Nagle off: without it every C-STORE response waits ~40 ms for a delayed ACK."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NODELAY_HANDLER = (evt.EVT_CONN_OPEN, _set_nodelay)
