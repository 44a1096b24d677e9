"""Workers racing for the queue: each in its own thread, all starting at once, claiming until
the queue is empty."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy.orm import sessionmaker

from dicomnode.pipeline.queue import claim


def claim_concurrently(sessions_of_worker: Callable[[], sessionmaker], workers: int = 4,
                       lease: timedelta = timedelta(minutes=5)) -> list[int]:
    """The ids of the jobs each worker (named w0, w1, ...) claimed, all together, in claim order."""
    claimed: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(workers)

    def work(owner: str) -> None:
        sessions = sessions_of_worker()
        start.wait()
        while (job := claim(sessions, owner, lease)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=work, args=(f"w{n}",)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return claimed
