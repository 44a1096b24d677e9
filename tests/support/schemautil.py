"""Several processes opening one new database at the same moment (a barrier before make_engine),
as the service, its worker and an admin's CLI command may on a fresh install."""

from __future__ import annotations

import multiprocessing


def _open(url: str, barrier, results) -> None:  # noqa: ANN001 - multiprocessing proxies
    from dicomnode.store.engine import make_engine
    from dicomnode.store.schema import current_revision

    barrier.wait(60)
    try:
        engine = make_engine(url)
        results.put(current_revision(engine))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - the test shows what went wrong in the child
        results.put(f"{type(exc).__name__}: {exc}")


def open_at_once(url: str, processes: int = 4) -> list[str]:
    """What each process found the schema revision to be after opening, or its error."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    children = [context.Process(target=_open, args=(url, barrier, results)) for _ in range(processes)]
    for child in children:
        child.start()
    found = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(30)
    return found
