"""The worker: claims jobs and runs them, with models loaded once and kept between jobs.

It runs in its own process (`dicomnode worker`, started by `dicomnode serve`), so a crash
or out-of-memory in torch never stops the receiver. While a job runs, a heartbeat thread
renews its lease; if the process dies, the lease expires and the job is queued again.
On SIGTERM the running job is released back to the queue and the worker exits.
A job whose results wait for a delivery's backoff goes back to the queue until then
(queue.defer), so a PACS that is down never holds the worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
from datetime import timedelta

from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config
from dicomnode.db import make_sessionmaker
from dicomnode.processing import DeliveryPending, JobError, process
from dicomnode.queue import RetryPolicy, claim, defer, fail, release, renew_lease, succeed

log = logging.getLogger("dicomnode.worker")


class Shutdown(BaseException):
    """Raised in the worker's main thread by SIGTERM/SIGINT."""


class ModelCache:
    """Loads each configured model the first time a job needs it, then keeps it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._models: dict[str, object] = {}

    def get(self, name: str):  # noqa: ANN201 - inference.SegmentationModel
        if name not in self._models:
            from inference import SegmentationModel  # torch is imported here, in the worker only

            settings = self.config.model(name)
            started = time.monotonic()
            self._models[name] = SegmentationModel(
                settings.path,
                folds=settings.folds,
                checkpoint_name=settings.checkpoint,
                device=settings.device,
                use_mirroring=settings.use_mirroring,
            )
            log.info("model %s loaded in %.1f s (folds %s)", name, time.monotonic() - started, settings.folds)
        return self._models[name]


class Heartbeat(threading.Thread):
    def __init__(self, sessions: sessionmaker, job_id: int, owner: str, lease: timedelta) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.sessions, self.job_id, self.owner, self.lease = sessions, job_id, owner, lease
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.lease.total_seconds() / 3):
            if not renew_lease(self.sessions, self.job_id, self.owner, self.lease):
                log.warning("job %d: lease lost", self.job_id)
                return


class Worker:
    def __init__(self, config: Config, sessions: sessionmaker | None = None, poll_seconds: float = 1.0) -> None:
        self.config = config
        self.sessions = sessions or make_sessionmaker(config.database_url)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.lease = timedelta(seconds=config.node.lease_seconds)
        self.policy = RetryPolicy(config.node.max_attempts, config.node.retry_backoff_seconds)
        self.models = ModelCache(config)
        self.poll_seconds = poll_seconds

    def run_one(self) -> bool:
        """Claim and run one job; False when none was waiting."""
        job = claim(self.sessions, self.owner, self.lease)
        if job is None:
            return False
        log.info("job %d study %s model %s: attempt %d", job.id, job.study_uid, job.model, job.attempts)
        heartbeat = Heartbeat(self.sessions, job.id, self.owner, self.lease)
        heartbeat.start()
        try:
            message = process(self.config, self.sessions, job, self.models.get(job.model))
        except Shutdown:
            release(self.sessions, job.id, self.owner, "worker shutting down")
            raise
        except DeliveryPending as exc:  # results ready, deliveries backing off: free the worker meanwhile
            defer(self.sessions, job.id, self.owner, exc.not_before, str(exc))
            log.warning("job %d study %s: %s (queued until %s)", job.id, job.study_uid, exc, exc.not_before)
        except JobError as exc:
            state = fail(self.sessions, job.id, self.owner, str(exc), self.policy, retryable=exc.retryable)
            log.error("job %d study %s: %s (now %s)", job.id, job.study_uid, exc, state)
        except Exception as exc:  # a bug or a torch error: keep the worker alive, keep the reason
            log.error("job %d study %s: unexpected error\n%s", job.id, job.study_uid, traceback.format_exc())
            state = fail(self.sessions, job.id, self.owner, f"{type(exc).__name__}: {exc}", self.policy)
        else:
            succeed(self.sessions, job.id, self.owner, message)
            log.info("job %d study %s: succeeded, %s", job.id, job.study_uid, message)
        finally:
            heartbeat.stopped.set()
        return True

    def run_forever(self) -> None:
        def _stop(signum, _frame):  # noqa: ANN001
            raise Shutdown(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        log.info("worker %s waiting for jobs", self.owner)
        try:
            while True:
                if not self.run_one():
                    time.sleep(self.poll_seconds)
        except Shutdown as exc:
            log.info("worker %s stopping (%s)", self.owner, exc)
