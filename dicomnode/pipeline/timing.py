"""Where a job's time went: seconds per step (reading the series, SUV, resampling, measures, each
result object, delivery, ...), recorded with the job's events (`dicomnode jobs show` prints them)
and read by bench/bench_wholebody.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StepTimes:
    """Seconds per named step, in the order first timed; a step timed twice adds up. `cpu`: the
    process's CPU seconds in each step (all its threads), which a busy machine does not stretch."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def add(self, step: str, seconds: float, cpu: float = 0.0) -> None:
        self.seconds[step] = self.seconds.get(step, 0.0) + seconds
        self.cpu[step] = self.cpu.get(step, 0.0) + cpu

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        started, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(step, time.perf_counter() - started, time.process_time() - cpu)

    def total(self, *, leaving_out: tuple[str, ...] = ()) -> float:
        return sum(s for step, s in self.seconds.items() if step not in leaving_out)

    def text(self) -> str:
        return ", ".join(f"{step} {seconds:.2f} s" for step, seconds in self.seconds.items())

    def as_data(self, cpu: bool = False) -> dict[str, float]:
        return {step: round(seconds, 3) for step, seconds in (self.cpu if cpu else self.seconds).items()}
