"""The worker: claims jobs and runs them, with models loaded once and kept between jobs.

It runs in its own process (`dicomnode worker`, started by `dicomnode serve`), so a crash
or out-of-memory in torch never stops the receiver. While a job runs, a heartbeat thread
renews its lease; if the process dies, the lease expires and the job is queued again.
On SIGTERM the running job is released back to the queue and the worker exits.
A job whose results wait for a delivery's backoff goes back to the queue until then
(queue.defer), so a PACS that is down never holds the worker.
A job of a model with review = true is held (awaiting-review) once its results are built and
delivered only after a reader releases it (dicomnode.pipeline.review).
A job that fails for good without results sends its "not performed" status SR right away
(dicomnode.pipeline.notperformed); the worker's periodic pass sends the due retries of those, and
the status SR of a study the assembler held back (a job failed at once).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable

from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config, NodeSettings, WorkerSpec
from dicomnode.pipeline import review
from dicomnode.pipeline.chain import dependants
from dicomnode.pipeline.errors import AwaitingReview, DeliveryPending, InputsNotReady, JobError
from dicomnode.pipeline.job import process
from dicomnode.pipeline.model_cache import ModelCache
from dicomnode.pipeline.notperformed import report_not_performed, send_status_reports
from dicomnode.pipeline.queue import (
    RetryPolicy,
    claim,
    defer,
    fail,
    release,
    renew_lease,
    requeue_expired,
    succeed,
    wait,
    wake,
)
from dicomnode.store.components import HEARTBEAT_SECONDS, Role, heartbeat
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.tables import Job, JobState

log = logging.getLogger("dicomnode.worker")

OOM_SCORE_ADJ = 800  # of 1000: the OOM killer takes the worker, not the receiver beside it


def limit_memory(node: NodeSettings) -> None:
    """The worker process's own memory rules, set when it starts: the kernel's OOM killer is to
    pick it before the receiver (oom_score_adj raised, which needs no privilege), and with
    worker_memory_gb its data (heap and anonymous mappings) is limited to that (RLIMIT_DATA), so
    running out fails an allocation in this process instead of the machine's memory."""
    try:
        Path("/proc/self/oom_score_adj").write_text(f"{OOM_SCORE_ADJ}\n")
    except OSError as exc:  # not Linux, or a sandbox that forbids it
        log.debug("cannot raise oom_score_adj: %s", exc)
    if node.worker_memory_gb is not None:
        limit = int(node.worker_memory_gb * 1e9)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        log.info("worker memory limited to %.2f GB (worker_memory_gb)", node.worker_memory_gb)


def small_pages_for_arrays() -> bool:
    """numpy asks the kernel for no transparent huge pages (madvise) for the worker's arrays,
    unless NUMPY_MADVISE_HUGEPAGE is set (numpy's own switch, then it decides); returns whether
    huge pages stay asked for. A whole-body job on the CT grid allocates about 2 GB of
    fresh arrays; where the kernel compacts memory to find huge pages for them (its default
    `defrag` setting does for madvised memory) the first touch costs up to 3 s per GB, against
    0.5 s per GB in 4 KiB pages: bench/bench_wholebody.py's CT-grid job 13.6-14.4 s CPU with
    huge pages, 9.9-10.3 s without, on a 2-core VM."""
    if os.environ.get("NUMPY_MADVISE_HUGEPAGE") is not None:  # numpy applied it at import
        return os.environ["NUMPY_MADVISE_HUGEPAGE"].strip() not in ("0", "")
    import numpy as np

    multiarray = getattr(getattr(np, "_core", None), "multiarray", None)  # numpy >= 2 (numpy.core before)
    setter = getattr(multiarray, "_set_madvise_hugepage", None)  # what numpy's import calls for the switch
    if setter is None:
        log.debug("numpy %s has no _set_madvise_hugepage: huge pages left as they are", np.__version__)
        return True
    setter(False)
    return False


def out_of_memory(exc: BaseException) -> str | None:
    """How `exc` says the process ran out of memory, or None: a MemoryError (numpy, Python),
    torch's CPU allocator failing, or CUDA out of memory."""
    if isinstance(exc, MemoryError):
        return "out of memory"
    text = str(exc)
    if type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text:
        return "CUDA out of memory"
    if isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()):
        return "out of memory"
    return None


class LoadedOnUse:
    """The job's model, loaded (or taken from the cache) when the job first uses it: a job whose
    results are already written (a delivery retried, results released at review) sends them
    without loading a model into memory."""

    def __init__(self, load) -> None:  # noqa: ANN001 - a callable returning the model
        self._load, self._model = load, None

    def __getattr__(self, name: str):  # noqa: ANN204
        if self._model is None:
            self._model = self._load()
        return getattr(self._model, name)


class Shutdown(BaseException):
    """Raised in the worker's main thread by SIGTERM/SIGINT."""


class Heartbeat(threading.Thread):
    """Renews a running job's lease every third of it; `beat` (if given) runs after each renewal:
    the worker's check for other workers' expired leases, so a busy worker also hands back the job
    of one that died."""

    def __init__(self, sessions: sessionmaker, job_id: int, owner: str, lease: timedelta,
                 beat: Callable[[], None] | None = None) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.sessions, self.job_id, self.owner, self.lease, self.beat = sessions, job_id, owner, lease, beat
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.lease.total_seconds() / 3):
            if not renew_lease(self.sessions, self.job_id, self.owner, self.lease):
                log.warning("job %d: lease lost", self.job_id)
                return
            if self.beat is not None:
                self.beat()


class Worker:
    """One worker process. `spec` (one of config.worker_specs(), or a `dicomnode worker --device`)
    names it and gives its device: the models it loads go there (model_cache.place), and each job's
    `started` event says which worker and device ran it."""

    def __init__(self, config: Config, sessions: sessionmaker | None = None, poll_seconds: float = 1.0,
                 spec: WorkerSpec | None = None) -> None:
        self.config = config
        self.sessions = sessions or make_sessionmaker(config.database_url)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.spec = spec or WorkerSpec("worker", None, 0)
        self.lease = timedelta(seconds=config.node.lease_seconds)
        self.policy = RetryPolicy.for_jobs(config.node)
        self.models = ModelCache(config, self.spec.device, self.spec.index)
        self._expiry_pass_at = float("-inf")
        self.poll_seconds = poll_seconds
        self.stop_requested: str | None = None  # the signal's name once SIGTERM/SIGINT came
        self._claiming = False  # a stop signal now would leave a claimed job unreleased: deferred
        self._status_pass_at = float("-inf")

    def request_stop(self, reason: str) -> None:
        """SIGTERM/SIGINT: stop now (Shutdown), unless a job is being claimed; then run_one stops
        as soon as it holds the job, so the job is released rather than left to its lease. A second
        signal changes nothing: raised again, it would interrupt the release of the running job."""
        if self.stop_requested:
            return
        self.stop_requested = reason
        if not self._claiming:
            raise Shutdown(reason)

    def run_one(self) -> bool:
        """Claim and run one job; False when none was waiting."""
        self._claiming = True
        try:
            job = claim(self.sessions, self.owner, self.lease, self.config.node.low_priority_hours,
                        worker={"worker": self.spec.name, "device": self.spec.device or "model's own"})
        except BaseException:
            self._claiming = False
            raise
        if job is None:
            self._claiming = False
            if self.stop_requested:
                raise Shutdown(self.stop_requested)
            return False
        heartbeat = Heartbeat(self.sessions, job.id, self.owner, self.lease, self.requeue_expired)
        try:
            self._claiming = False
            if self.stop_requested:  # came while claiming
                raise Shutdown(self.stop_requested)
            log.info("job %d study %s model %s: attempt %d", job.id, job.study_uid, job.model, job.attempts)
            heartbeat.start()
            self.report_alive()
            model = LoadedOnUse(lambda name=job.model: self._model(name))
            message = process(self.config, self.sessions, job, model)
        except Shutdown:
            release(self.sessions, job.id, self.owner, "worker shutting down")
            raise
        except AwaitingReview as exc:  # review = true: results built and held until a reader decides
            review.hold(self.sessions, job.id, self.owner, str(exc), exc.data)
            log.info("job %d study %s: awaiting review: %s", job.id, job.study_uid, exc)
        except DeliveryPending as exc:  # results ready, deliveries backing off: free the worker meanwhile
            defer(self.sessions, job.id, self.owner, exc.not_before, str(exc))
            log.warning("job %d study %s: %s (queued until %s)", job.id, job.study_uid, exc, exc.not_before)
        except InputsNotReady as exc:  # a transient cause: wait, the attempt not counted
            state = wait(self.sessions, job.id, self.owner, str(exc), self.policy)
            log.warning("job %d study %s: %s (now %s)", job.id, job.study_uid, exc, state)
            self._not_performed(job.id, state)
        except JobError as exc:
            state = fail(self.sessions, job.id, self.owner, str(exc), self.policy, retryable=exc.retryable)
            log.error("job %d study %s: %s (now %s)", job.id, job.study_uid, exc, state)
            self._not_performed(job.id, state)
        except Exception as exc:  # noqa: BLE001 - a bug or a torch error: keep the worker alive, keep the reason
            memory = out_of_memory(exc)
            if memory:  # the process lives on: what failed to allocate is freed with the attempt
                reason = f"{memory} while running the job: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                log.error("job %d study %s: %s", job.id, job.study_uid, reason)
                self.models.after_out_of_memory(job.model, gpu=memory.startswith("CUDA"))
            else:
                log.error("job %d study %s: unexpected error\n%s", job.id, job.study_uid, traceback.format_exc())
                reason = f"{type(exc).__name__}: {exc}"
            state = fail(self.sessions, job.id, self.owner, reason, self.policy)
            self._not_performed(job.id, state)
        else:
            succeed(self.sessions, job.id, self.owner, message)
            log.info("job %d study %s: succeeded, %s", job.id, job.study_uid, message)
        finally:
            heartbeat.stopped.set()
        self._wake_dependants(job.id)
        return True

    def _model(self, name: str):  # noqa: ANN202 - an inference.SegmentationModel
        model = self.models.get(name)
        self.report_alive()  # a model may have just loaded
        return model

    def _wake_dependants(self, job_id: int) -> None:
        """Jobs waiting for this one (a comparison's prior, a chained model's label map) run now
        that it has ended, instead of after their backoff."""
        try:
            with self.sessions() as session:
                job = session.get(Job, job_id)
            if job is None or job.state not in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
                return
            woken = wake(self.sessions, dependants(self.config, self.sessions, job), f"job {job.id} ({job.model} "
                         f"on study {job.study_uid}) {job.state}")
        except Exception:  # noqa: BLE001 - a database hiccup: the waiting jobs run after their backoff anyway
            log.exception("job %d: jobs waiting for it not woken", job_id)
            return
        if woken:
            log.info("job %d %s: woke job(s) %s waiting for it", job.id, job.state, ", ".join(map(str, woken)))

    def _not_performed(self, job_id: int, state: str) -> None:
        """A job failed for good: its status SR to the destinations that want it (never raises)."""
        if state == JobState.FAILED:
            said = report_not_performed(self.config, self.sessions, job_id)
            if said:
                log.info("job %d: %s", job_id, said)

    def send_status_reports(self, every: float = 0.0) -> None:
        """The status SRs due (retries, studies held back), at most once per `every` seconds."""
        now = time.monotonic()
        if now - self._status_pass_at < every:
            return
        self._status_pass_at = now
        try:
            send_status_reports(self.config, self.sessions)
        except Exception:  # noqa: BLE001 - a database hiccup: the next pass tries again
            log.exception("status SR pass failed; will try again")

    def report_alive(self, every: float = 0.0) -> None:
        """The worker's row for `dicomnode status`: alive, its name and device, the models it holds."""
        detail = {"name": self.spec.name, "device": self.spec.device or "model's own", "owner": self.owner,
                  "models": sorted(self.models.loaded())}
        heartbeat(self.sessions, Role.WORKER, detail, every=every)

    def requeue_expired(self) -> None:
        """Jobs whose worker stopped renewing its lease (killed, its host gone) back to the queue, at
        most every third of a lease (between jobs, and from a running job's heartbeat thread): a host
        that runs only workers has no receiver's sweep to do it."""
        now = time.monotonic()
        if now - self._expiry_pass_at < min(self.lease.total_seconds() / 3, HEARTBEAT_SECONDS):
            return
        self._expiry_pass_at = now
        try:
            expired = requeue_expired(self.sessions)
        except Exception:  # noqa: BLE001 - a database hiccup: the next pass tries again
            log.exception("lease expiry pass failed; will try again")
            return
        if expired:
            log.warning("re-queued jobs %s whose lease expired", expired)

    def run_forever(self) -> None:
        def _stop(signum: int, _frame: object) -> None:
            self.request_stop(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        log.info("worker %s (%s, device %s) waiting for jobs", self.owner, self.spec.name,
                 self.spec.device or "of each model")
        try:
            while True:
                self.report_alive(every=HEARTBEAT_SECONDS)
                self.send_status_reports(every=HEARTBEAT_SECONDS)
                self.requeue_expired()
                if not self.run_one():
                    time.sleep(self.poll_seconds)
        except Shutdown as exc:
            log.info("worker %s stopping (%s)", self.owner, exc)
