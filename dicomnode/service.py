"""`dicomnode serve`: the receiver, the periodic sweeps and a supervised worker process.

The receiver runs in this process; APScheduler runs the sweeps (completeness, expired
leases, retention) and sends the notifications ([[notify]], dicomnode.pipeline.notify); the
worker runs in a child process that is restarted if it dies, so
nothing the model does can stop C-STORE from being accepted. With [node] receive_processes > 1,
more receiving processes run beside the receiver, supervised the same way; the receiver gives them
connections (dicomnode.net.receive_processes). Under systemd (Type=notify) it
says READY=1 once the receiver listens, pings the watchdog while the receiver and the
scheduler run, and says STOPPING=1 on SIGTERM: then it stops accepting associations, lets
the worker release its running job back to the queue, and exits 0.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import sessionmaker

from dicomnode.config import Config, WorkerSpec
from dicomnode.net.receive_processes import ProcessLink
from dicomnode.net.receiver import Receiver
from dicomnode.ops import systemd
from dicomnode.ops.metrics import Metrics
from dicomnode.pipeline import assembler, notify, queue
from dicomnode.store import retention
from dicomnode.store.components import Role, heartbeat
from dicomnode.store.engine import make_sessionmaker

log = logging.getLogger("dicomnode.service")


QUICK_EXIT_SECONDS = 600.0  # a worker that lived less than this exited quickly: the next restart waits longer
MAX_RESTART_SECONDS = 300.0


class ChildSupervisor:
    """Keeps one child process of serve running. A child that exits is started again after
    worker_restart_seconds, doubled for each quick exit in a row (at most 5 minutes), so a child
    that cannot start (out of memory at import, a broken model folder) never storms; the others go
    on meanwhile."""

    kind = "child"

    def __init__(self, config: Config, name: str) -> None:
        self.config = config
        self.name = name
        self.min_delay = config.node.worker_restart_seconds
        self.quick_exits = 0
        self.started_at = 0.0
        self.process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._spawn_lock = threading.Lock()  # no child started once stopping is set
        self._terminated: subprocess.Popen | None = None  # the child signal_stop sent SIGTERM
        self._thread = threading.Thread(target=self._watch, name=f"supervisor-{name}", daemon=True)

    def _popen(self) -> subprocess.Popen:
        raise NotImplementedError

    def _exited(self) -> None:
        """After the child exited (before it is started again)."""

    def _spawn(self) -> None:
        self.process = self._popen()
        self.started_at = time.monotonic()

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.is_set():
            code = self.process.poll() if self.process else 0
            if code is not None and not self._stopping.is_set():
                if self.process is not None:
                    self._exited()
                    lived = time.monotonic() - self.started_at
                    self.quick_exits = self.quick_exits + 1 if lived < QUICK_EXIT_SECONDS else 1
                    killed = " (SIGKILL: out of memory?)" if code == -signal.SIGKILL else ""
                    said = f"{self.kind} process {self.process.pid} ({self.name}) exited with {code}{killed} " \
                           f"after {lived:.0f} s"
                else:  # it could not be started at all
                    self.quick_exits += 1
                    said = f"{self.kind} process ({self.name}) could not be started"
                delay = min(self.min_delay * 2 ** (self.quick_exits - 1), MAX_RESTART_SECONDS)
                log.error("%s; restarting in %.1f s (%d quick exit(s) in a row)", said, delay, self.quick_exits)
                if self._stopping.wait(delay):
                    return
                with self._spawn_lock:
                    if self._stopping.is_set():
                        return
                    try:
                        self._spawn()
                    except Exception:  # noqa: BLE001 - out of descriptors, say: tried again after the delay
                        log.exception("%s process (%s): start failed", self.kind, self.name)
                        self.process = None
            self._stopping.wait(1.0)

    def _stop_starting(self) -> None:
        with self._spawn_lock:
            self._stopping.set()

    def signal_stop(self) -> None:
        """SIGTERM to the child without waiting (so several stop at once); `stop` waits."""
        self._stop_starting()
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self._terminated = self.process

    def stop(self, timeout: float = 30.0) -> None:
        self._stop_starting()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self.process and self.process.poll() is None:
            if self._terminated is not self.process:  # one SIGTERM: a worker releases its job and exits
                self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("%s process %d did not stop in %.0f s; killing it", self.kind, self.process.pid, timeout)
                self.process.kill()
                self.process.wait()


class WorkerSupervisor(ChildSupervisor):
    """One `dicomnode worker` (one supervisor per worker of config.worker_specs(): its name, device
    and index passed on)."""

    kind = "worker"

    def __init__(self, config: Config, spec: WorkerSpec | None = None) -> None:
        self.spec = spec or WorkerSpec("worker", None, 0)
        super().__init__(config, self.spec.name)

    def _popen(self) -> subprocess.Popen:
        command = [sys.executable, "-m", "dicomnode", "worker", "--config", str(self.config.source),
                   "--name", self.spec.name, "--index", str(self.spec.index)]
        if self.spec.device is not None:
            command += ["--device", self.spec.device]
        process = subprocess.Popen(command)
        log.info("worker process %d (%s%s) started", process.pid, self.spec.name,
                 f" on {self.spec.device}" if self.spec.device else "")
        return process


class ReceivingProcess(ChildSupervisor):
    """One of the receiving processes beside serve's own receiver ([node] receive_processes,
    dicomnode.net.receive_processes): linked to the receiver by a Unix socket pair; once it
    exits, the receiver gives it nothing more (what it had open is gone: the senders try again)."""

    kind = "receiving"

    def __init__(self, config: Config, receiver: Receiver, number: int) -> None:
        super().__init__(config, f"receiver-{number}")
        self.receiver = receiver
        self.link: ProcessLink | None = None

    def _popen(self) -> subprocess.Popen:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "dicomnode", "receive-process", "--config", str(self.config.source),
                 "--log-level", logging.getLevelName(logging.getLogger().level), "--control-fd", str(theirs.fileno())],
                pass_fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.link = ProcessLink(ours, process.pid, self.receiver.store.index.take_rows, self._count)
        self.receiver.add_process(self.link)
        log.info("receiving process %d (%s) started", process.pid, self.name)
        return process

    def _count(self, counter: str, label: str | None) -> None:
        metric = getattr(self.receiver.counters, counter)
        (metric.labels(label) if label is not None else metric).inc()

    def _exited(self) -> None:
        if self.link is not None:
            self.receiver.remove_process(self.link)
            self.link.close()
            self.link.drain(5.0)  # the rows it sent before it died are in the socket: every one indexed

    def signal_stop(self) -> None:
        """The receiver closes the link (Receiver.stop): the process stops on its own."""
        self._stop_starting()


def periodic_sweep(sessions: sessionmaker, config: Config) -> None:
    started = time.monotonic()
    try:
        heartbeat(sessions, Role.RECEIVER)  # for `dicomnode status`: this process is alive
        orphaned = queue.requeue_orphaned(sessions, socket.gethostname())
        if orphaned:
            log.warning("re-queued jobs %s at once: their worker on this host is not running", orphaned)
        expired = queue.requeue_expired(sessions)
        if expired:
            log.warning("re-queued jobs %s whose lease expired", expired)
        assembler.queue_ready_studies(sessions, config)
    except Exception:
        log.exception("sweep failed; will try again at the next one")
    took = time.monotonic() - started
    if took > config.node.sweep_seconds:
        log.warning(
            "sweep took %.1f s, longer than sweep_seconds = %g (slow disk or database?)",
            took,
            config.node.sweep_seconds,
        )


class _SkippedRunsFilter(logging.Filter):
    """Drops APScheduler's "skipped: maximum number of running instances reached", logged once per
    interval while a sweep runs long; `periodic_sweep` logs one line with the time it took instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


_SKIPPED_RUNS = _SkippedRunsFilter()  # one instance: adding it again (a second serve in a process) is a no-op


RETENTION_SWEEP_SECONDS = 600.0


def periodic_retention(sessions: sessionmaker, config: Config) -> None:
    try:
        retention.purge_due(sessions, config)
    except Exception:
        log.exception("retention sweep failed; will try again at the next one")


def _wait_for_stop(stop: threading.Event, receiver: Receiver, scheduler: BackgroundScheduler) -> None:
    """Block until SIGTERM/SIGINT, pinging systemd's watchdog while the receiver and the scheduler run."""
    watchdog = systemd.watchdog_seconds()
    while not stop.wait(min(watchdog or 1.0, 1.0)):
        if watchdog and receiver.listening and scheduler.running:
            systemd.notify("WATCHDOG=1")


def serve(config: Config, with_worker: bool = True) -> None:
    config.node.data_dir.mkdir(parents=True, exist_ok=True)
    sessions = make_sessionmaker(config.database_url)
    stop = threading.Event()

    def _stop(signum, _frame) -> None:  # noqa: ANN001
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    metrics = Metrics(config, sessions)
    receiver = Receiver(config, sessions, metrics.receiver, shared_slots=config.node.receive_processes > 1)
    receiver.start()
    receiving = [ReceivingProcess(config, receiver, number) for number in range(2, config.node.receive_processes + 1)]
    for process in receiving:
        process.start()
    heartbeat(
        sessions, Role.RECEIVER, {"ae_title": config.node.ae_title, "address": f"{config.node.bind}:{receiver.port}"}
    )
    scheduler = BackgroundScheduler(timezone="UTC")
    logging.getLogger("apscheduler.scheduler").addFilter(_SKIPPED_RUNS)
    scheduler.add_job(
        periodic_sweep,
        "interval",
        seconds=config.node.sweep_seconds,
        args=(sessions, config),
        id="sweep",
        max_instances=1,
        coalesce=True,
    )
    scheduler.add_job(
        periodic_retention,
        "interval",
        seconds=RETENTION_SWEEP_SECONDS,
        args=(sessions, config),
        id="retention",
        max_instances=1,
        coalesce=True,
        next_run_time=datetime.now(timezone.utc),
    )
    # [[notify]]: the outbox, sent from the scheduler's threads, never in the worker's way (also without
    # targets: new notifications are marked routed, so a target added later is not told the past)
    scheduler.add_job(notify.send_due, "interval", seconds=notify.POLL_SECONDS, args=(config, sessions),
                      id="notify", max_instances=1, coalesce=True)
    periodic_sweep(sessions, config)  # restart recovery now, not after the first interval; before the
    scheduler.start()  # scheduler's own sweeps, which would otherwise run beside this one on a slow start
    supervisors = [WorkerSupervisor(config, spec) for spec in config.worker_specs()] if with_worker else []
    for supervisor in supervisors:
        supervisor.start()
    metrics_port = metrics.start()
    log.info(
        "node ready: AE %s on port %d (%d receiving process(es)), %d worker(s), %d model(s), %d destination(s)%s",
        config.node.ae_title,
        receiver.port,
        config.node.receive_processes,
        len(supervisors),
        len(config.models),
        len(config.destinations),
        f", metrics on {config.node.metrics_bind}:{metrics_port}" if metrics_port else "",
    )
    systemd.notify("READY=1", f"STATUS=accepting associations on port {receiver.port}")
    try:
        _wait_for_stop(stop, receiver, scheduler)
    finally:
        systemd.notify("STOPPING=1", "STATUS=stopping: no new associations; the running job goes back to the queue")
        for process in receiving:
            process.signal_stop()
        receiver.stop()  # no new associations first; the receiving processes stop, their rows indexed
        for process in receiving:
            process.stop(5.0)
        scheduler.shutdown(wait=False)
        for supervisor in supervisors:  # SIGTERM to every worker first, then wait for each
            supervisor.signal_stop()
        for supervisor in supervisors:
            supervisor.stop()
        metrics.stop()
        log.info("node stopped")
