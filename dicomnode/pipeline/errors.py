"""How a job's work ends other than in success: the errors the worker turns into queue states."""

from __future__ import annotations

from datetime import datetime


class JobError(Exception):
    """A job cannot succeed. `retryable` says whether trying again could help."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class InputsNotReady(JobError):
    """The job's inputs are not ready yet, a transient cause (a series still arriving): the job
    waits in the queue without counting an attempt (queue.wait), until its give_up_at."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


class DeliveryPending(Exception):
    """Some deliveries wait for their backoff: the job goes back to the queue until `not_before`
    (queue.defer) instead of holding the worker; the next run reuses the results."""

    def __init__(self, message: str, not_before: datetime) -> None:
        super().__init__(message)
        self.not_before = not_before


class AwaitingReview(Exception):
    """[[models]] review = true: the results are built and held, nothing sent, until a reader
    releases or rejects them (dicomnode.pipeline.review); the message says what was found."""

    def __init__(self, message: str, data: dict | None = None) -> None:
        super().__init__(message)
        self.data = data or {}
