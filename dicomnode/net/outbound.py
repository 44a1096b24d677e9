"""Results to a destination by its transport: C-STORE (dicomnode.net.sender) or STOW-RS
(dicomnode.net.stow), with one outcome per file (sender.Outcome) either way."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from dicomnode.config import Destination
from dicomnode.net import sender, stow
from dicomnode.net.sender import Outcome


def store_each(
    destination: Destination,
    paths: list[Path],
    calling_aet: str,
    timeout: float = 30.0,
    tries_per_instance: int | Mapping[Path, int] = 3,
    on_sent: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Send every file (in order) to `destination`, C-STORE or STOW-RS; see sender.store_each."""
    if destination.is_dicomweb:
        return stow.store_each(destination, paths, timeout=timeout, tries_per_instance=tries_per_instance,
                               on_sent=on_sent)
    return sender.store_each(destination, paths, calling_aet, timeout=timeout, tries_per_instance=tries_per_instance,
                             on_sent=on_sent)
