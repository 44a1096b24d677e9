"""Telling systemd how the service is doing (sd_notify): READY=1, WATCHDOG=1, STOPPING=1, STATUS=.

The protocol is one datagram of newline-separated assignments to the unix socket named by
$NOTIFY_SOCKET (a leading "@" names an abstract socket). Without $NOTIFY_SOCKET (not run by
systemd, or Type= is not notify) every call does nothing.
"""

from __future__ import annotations

import os
import socket


def notify(*assignments: str) -> bool:
    """Send e.g. notify("READY=1", "STATUS=listening"); False when there is nobody to tell."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall("\n".join(assignments).encode())
    return True


def watchdog_seconds() -> float | None:
    """How often to send WATCHDOG=1 (half of WatchdogSec=), or None when systemd expects no pings
    from this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6 / 2
