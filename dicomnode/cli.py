"""The `dicomnode` command: run the node and inspect it (the inspection commands read only
the database, so they work while the service runs)."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from dicomnode.config import Config, ConfigError, load_config

app = typer.Typer(
    help="DICOM node that runs nnU-Net segmentation models on studies sent by a PACS.", no_args_is_help=True
)
jobs_app = typer.Typer(help="Inspect and manage jobs.", no_args_is_help=True)
studies_app = typer.Typer(help="Inspect received studies.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(studies_app, name="studies")
console = Console()

ConfigOption = typer.Option(
    Path("config.toml"), "--config", "-c", help="Path to config.toml.", envvar="DICOMNODE_CONFIG"
)


def _setup_logging(level: str = "INFO", with_pid: bool = False) -> None:
    # Under systemd, journald stamps the time itself (and the process ID).
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    pid = "[%(process)d]" if with_pid and not os.environ.get("JOURNAL_STREAM") else ""
    logging.basicConfig(level=level.upper(), format=f"{stamp}%(levelname)s %(name)s{pid}: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # alembic logs its plugin set-up at every start; schema upgrades are logged by dicomnode.schema
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # highdicom logs each module it copies and openjpeg each tile it encodes, per object written
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("openjpeg").setLevel(logging.WARNING)


def _config(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from None


def _sessions(config: Config):  # noqa: ANN202
    from dicomnode.store.engine import make_sessionmaker

    with _schema_checked():
        return make_sessionmaker(config.database_url)


@contextmanager
def _schema_checked() -> Iterator[None]:
    """A database this version cannot use (dicomnode.store.schema) is a one-line error, exit status 2."""
    from dicomnode.store.schema import SchemaError

    try:
        yield
    except SchemaError as exc:
        console.print(f"[red]database error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
def serve(
    config: Path = ConfigOption,
    log_level: str = "INFO",
    no_worker: bool = typer.Option(False, help="Run without worker processes."),
) -> None:
    """Start the receiver, the scheduler and the worker processes ([node] workers, [[workers]])."""
    _setup_logging(log_level)
    from dicomnode.service import serve as run

    settings = _config(config)
    with _schema_checked():
        run(settings, with_worker=not no_worker)


@app.command()
def worker(
    config: Path = ConfigOption,
    log_level: str = "INFO",
    device: Optional[str] = typer.Option(
        None, help='Where this worker runs the models set to "auto" or "cuda": cpu, cuda, cuda:N.'),
    name: Optional[str] = typer.Option(None, help="Its name in `status` and the job timeline "
                                       '(default: "worker", or "worker-cudaN" with --device).'),
    index: int = typer.Option(0, hidden=True, help="serve's number of this worker ([node] workers)."),
) -> None:
    """Run a worker alone (no receiver): claim jobs from the node's database and run the models;
    `serve` starts its own. Several, on this host or others, may share one queue (PostgreSQL)."""
    _setup_logging(log_level)
    from dicomnode.config import WorkerSpec, check_device
    from dicomnode.pipeline.worker import Worker, limit_memory, small_pages_for_arrays

    settings = _config(config)
    if device is not None:
        try:
            check_device(device)
        except ValueError as exc:
            console.print(f"[red]--device:[/red] {exc}")
            raise typer.Exit(2) from None
    spec = WorkerSpec(name or ("worker" if device is None else "worker-" + device.replace(":", "")), device, index)
    limit_memory(settings.node)  # before the models are imported
    small_pages_for_arrays()
    with _schema_checked():
        Worker(settings, spec=spec).run_forever()


@app.command("receive-process", hidden=True)
def receive_process(
    config: Path = ConfigOption,
    log_level: str = "INFO",
    control_fd: int = typer.Option(..., help="serve's end of the link (a Unix socket passed down)."),
) -> None:
    """One of serve's receiving processes ([node] receive_processes): serves the connections serve
    gives it, until serve closes the link."""
    import socket

    _setup_logging(log_level, with_pid=True)
    from dicomnode.net.receive_processes import run_receiving_process

    settings = _config(config)
    run_receiving_process(settings, socket.socket(fileno=control_fd))
    # every instance it acknowledged has its row with serve: no thread pynetdicom left behind (an
    # association still being aborted) may keep the process
    logging.shutdown()
    os._exit(0)


@app.command()
def synth(
    out: Path,
    seed: int = 0,
    lesions: Optional[int] = typer.Option(None, help="Number of lesions (default: 2 to 6)."),
    variant: str = typer.Option(
        "bqml", help="How the PET is stored: bqml, ge-private-time, philips-cnts, admin-mbq, midnight."
    ),
    kind: str = typer.Option(
        "petct",
        help="The study: petct, or a registry model's: glioma (4 MR series and 2 "
        "distractors), lymph (CT, topogram), organs (CT).",
    ),
) -> None:
    """Write a synthetic study (series and truth) to OUT: PET/CT with lesions by default."""
    from dicomnode.synth.petct import VARIANTS, write_study
    from dicomnode.synth.registry import KINDS, write_registry_study

    if kind in KINDS:
        registry = write_registry_study(out, kind, seed=seed)
        console.print(
            f"study {registry.study_instance_uid}: {kind}, {len(registry.series)} series, "
            f"labels {registry.case.label_names}, written to {out}"
        )
        return
    if kind != "petct":
        console.print(f"[red]unknown kind {kind!r}[/red] (one of petct, {', '.join(KINDS)})")
        raise typer.Exit(2)
    if variant not in VARIANTS:
        console.print(f"[red]unknown variant {variant!r}[/red] (one of {', '.join(VARIANTS)})")
        raise typer.Exit(2)
    study = write_study(out, seed=seed, n_lesions=lesions, variant=variant)
    console.print(
        f"study {study.study_instance_uid}: {len(study.phantom.lesions)} lesions, PET {variant}, written to {out}"
    )


def _destination(cfg: Config, name: str):  # noqa: ANN202 - config.Destination
    dest = next((d for d in cfg.destinations if d.name == name), None)
    if dest is None:
        console.print(
            f"[red]no destination named {name!r}[/red] (have: {', '.join(d.name for d in cfg.destinations) or 'none'})"
        )
        raise typer.Exit(2)
    return dest


@app.command()
def echo(destination: str, config: Path = ConfigOption) -> None:
    """C-ECHO a configured destination (a DICOMweb one: a QIDO-RS search with its authorization)."""
    from dicomnode.net.sender import SendError
    from dicomnode.net.sender import echo as c_echo

    cfg = _config(config)
    dest = _destination(cfg, destination)
    if dest.is_dicomweb:
        from dicomnode.net.stow import check

        try:
            line = check(dest, cfg.node.network_timeout_seconds)
        except SendError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from None
        console.print(f"{destination}: QIDO-RS {line}")
        raise typer.Exit(0)
    try:
        status = c_echo(dest, cfg.node.ae_title, cfg.node.network_timeout_seconds)
    except SendError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(f"{destination}: C-ECHO status 0x{status:04X}")
    raise typer.Exit(0 if status == 0 else 1)


SEND_BATCH = 100  # files read and sent per association (store_each holds a batch in memory)


@app.command()
def send(path: Path, destination: str, config: Path = ConfigOption) -> None:
    """C-STORE (or STOW-RS) every DICOM file under PATH to a configured destination, with a progress bar.

    Exit status 0 when the destination stored every file, 1 otherwise (each refusal is listed)."""
    from pydicom.misc import is_dicom
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from dicomnode.net.outbound import store_each

    cfg = _config(config)
    dest = _destination(cfg, destination)
    if not path.exists():
        console.print(f"[red]no such file or folder: {path}[/red]")
        raise typer.Exit(2)
    candidates = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())
    files = [p for p in candidates if is_dicom(p)]
    if len(files) < len(candidates):
        console.print(f"skipping {len(candidates) - len(files)} files that are not DICOM files (no DICM preamble)")
    refused = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"sending to {destination}", total=len(files))
        for start in range(0, len(files), SEND_BATCH):
            outcomes = store_each(
                dest,
                files[start : start + SEND_BATCH],
                cfg.node.ae_title,
                cfg.node.network_timeout_seconds,
                on_sent=lambda _outcome: progress.advance(task),
            )
            refused.extend(o for o in outcomes if not o.ok)
    for outcome in refused:
        console.print(f"[red]not stored:[/red] {outcome.path}: {outcome.error}")
    console.print(f"sent {len(files) - len(refused)} of {len(files)} files to {destination}")
    raise typer.Exit(1 if refused else 0)


@app.command()
def fetch(
    source: str = typer.Option(..., "--source", help="A [[sources]] entry's name."),
    study: Optional[str] = typer.Option(None, "--study", help="Study Instance UID."),
    accession: Optional[str] = typer.Option(None, "--accession", help="Accession number."),
    patient: Optional[str] = typer.Option(None, "--patient", help="Patient ID: every study of the patient."),
    since: Optional[str] = typer.Option(None, "--since", help="With --patient: studies from this date (YYYY-MM-DD)."),
    config: Path = ConfigOption,
) -> None:
    """Find studies on a source (C-FIND or QIDO-RS) and fetch them (C-MOVE, C-GET or WADO-RS), with a progress bar.

    What arrives is stored, indexed, assembled and queued as a push is. With C-MOVE the source sends to the node's
    AE title: the node (`serve`) must be running and known to the source. Exit status 1 naming each study that did
    not arrive whole (fewer instances than the source announced is a failure, whatever status it gave)."""
    from datetime import datetime as _datetime

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from dicomnode.net.fetch import SourceError, StudyQuery, client_for, fetch_study
    from dicomnode.net.receiver import InstanceStore

    cfg = _config(config)
    try:
        src = cfg.fetch_source(source)
    except KeyError:
        have = ", ".join(s.name for s in cfg.sources) or "none"
        console.print(f"[red]no source named {source!r}[/red] (have: {have})")
        raise typer.Exit(2) from None
    if sum(x is not None for x in (study, accession, patient)) != 1:
        console.print("[red]give one of --study, --accession, --patient[/red]")
        raise typer.Exit(2)
    if since is not None and patient is None:
        console.print("[red]--since goes with --patient[/red]")
        raise typer.Exit(2)
    since_day = None
    if since is not None:
        try:
            since_day = _datetime.strptime(since.replace("-", ""), "%Y%m%d").date()
        except ValueError:
            console.print(f"[red]--since {since!r} is not a date (YYYY-MM-DD)[/red]")
            raise typer.Exit(2) from None
    query = StudyQuery(study_uid=study, accession=accession, patient_id=patient, since=since_day)
    sessions = _sessions(cfg)
    store = InstanceStore(cfg, sessions)
    try:
        client = client_for(src, cfg)
        matches = client.find_studies(query)
    except SourceError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    if not matches:
        console.print(f"[red]{source}: no study matches {query.describe()}[/red]")
        raise typer.Exit(1)
    failed = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    for match in matches:
        try:
            announced = client.announce(match.study_uid)
            with Progress(*columns, console=console) as progress:
                task = progress.add_task(f"{match.study_uid} by {client.method}", total=len(announced.wanted()))
                fetched = fetch_study(client, announced, store, sessions,
                                      progress=lambda done, total: progress.update(task, completed=done, total=total))
        except SourceError as exc:
            failed.append(match.study_uid)
            console.print(f"[red]not fetched:[/red] {exc}")
            continue
        console.print(f"fetched {fetched.describe()}")
    console.print(f"{len(matches) - len(failed)} of {len(matches)} studies fetched from {source}")
    raise typer.Exit(1 if failed else 0)


# --- what the node is doing: read from the database (dicomnode.ops.history) --------------------------

JsonOption = typer.Option(False, "--json", help="Print the data as JSON instead of tables.")
WideOption = typer.Option(
    False, "--wide", help="Every column and whole UIDs, the tables as wide as they need (the terminal wraps them)."
)


def _when(value) -> str:  # noqa: ANN001 - a datetime or None
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60), ("min", 60, "s", 1)):
        if abs(seconds) >= size:
            return f"{int(seconds // size)} {unit} {int(seconds % size // smaller_size)} {smaller}"
    return f"{seconds:.1f} s"


def _table(title: str, columns: tuple[str, ...], rows) -> Table:  # noqa: ANN001 - rows of strings
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def _print_fitted(title: str, columns, rows, wide: bool = False) -> None:  # noqa: ANN001 - tablefit.Column, cells
    """A table that keeps one line per row at the terminal's width (dicomnode.ops.tablefit): UIDs
    shortened in the middle and the least useful columns dropped when it does not fit; `wide`:
    every column, UIDs whole, as wide as it needs."""
    from dicomnode.ops.tablefit import fit_table

    fitted = fit_table(title, list(columns), list(rows), console.width, wide)
    if wide and fitted.width > console.width:
        Console(file=console.file, width=fitted.width, force_terminal=console.is_terminal,
                color_system=console.color_system, no_color=console.no_color).print(fitted.table)
    else:
        console.print(fitted.table)


def _since(text: Optional[str]):  # noqa: ANN202 - datetime or None
    from dicomnode.ops.history import parse_since

    try:
        return parse_since(text) if text else None
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


@app.command()
def status(config: Path = ConfigOption, as_json: bool = JsonOption, wide: bool = WideOption) -> None:
    """Receiver and worker up, queue depth, oldest waiting job, disk use, models loaded, last errors,
    and result objects that failed for good to reach a destination.

    Exit status 0 when every component is up and no result object failed for good, 1 otherwise."""
    from rich.filesize import decimal
    from rich.text import Text

    from dicomnode.ops.history import as_json as to_json
    from dicomnode.ops.status import node_status
    from dicomnode.ops.tablefit import Column, Kind

    cfg = _config(config)
    node = node_status(_sessions(cfg), cfg)
    code = 0 if all(c.up for c in node.components) and not node.undelivered else 1
    if as_json:
        print(to_json(node))
        raise typer.Exit(code)
    _print_fitted(
        "components",
        (
            Column("component"),
            Column("state", Kind.TEXT, min_width=24),
            Column("host", drop=4),
            Column("pid", drop=2),
            Column("started", drop=1),
            Column("last seen", drop=3),
            Column("detail", Kind.TEXT, drop=5),
        ),
        (
            (
                c.name if c.detail.get("name") in (None, c.name) else f"{c.name} {c.detail['name']}",
                Text.assemble(("up", "green") if c.up else ("down", "red"), f" ({c.why})"),
                c.host or "",
                str(c.pid or ""),
                _when(c.started_at),
                _when(c.last_seen_at),
                Text(", ".join(f"{k}: {v}" for k, v in c.detail.items() if k != "name")),
            )
            for c in node.components
        ),
        wide,
    )
    by_priority = ", ".join(f"{p} {n}" for p, n in node.queued_by_priority.items() if n)
    console.print("queue: " + ", ".join(
        f"{state} {count}" + (f" ({by_priority})" if state == "queued" and by_priority else "")
        for state, count in node.queue.items()))
    console.print("deliveries: " + ", ".join(f"{state} {count}" for state, count in node.deliveries.items())
                  + " (sent: stored, not asked to confirm; confirmed: committed or found by the destination)")
    if any(node.notifications.values()):
        console.print("notifications: " + ", ".join(f"{state} {count}" for state, count in node.notifications.items())
                      + " ([[notify]] webhooks and RIS; a failed one never holds up a job)")
    for g in node.notifications_given_up:
        console.print(f"  notification given up: {g.event} of job {g.job_id} to {g.target} after {g.attempts} "
                      f"tries: {g.error}", style="yellow")
    if node.oldest_waiting:
        w = node.oldest_waiting
        console.print(
            f"oldest waiting: job {w.job_id}" + (f" ({w.priority})" if w.priority != "normal" else "")
            + f", study {w.study_uid}, model {w.model}, queued {_duration(w.waiting_seconds)} ago"
        )
    if node.low_priority_hours:
        low = node.low_priority_hours
        waiting = node.queued_by_priority.get("low", 0)
        console.print(
            f"low-priority jobs run {low.window} (local time): "
            + ("[green]open now[/green]" if low.open_now else "closed now")
            + (f", {waiting} low job(s) queued" if waiting else "")
        )
    d = node.disk
    console.print(
        f"disk of {d.data_dir}: {decimal(d.used_bytes)} used of {decimal(d.total_bytes)}, "
        f"[bold]{decimal(d.free_bytes)} free[/bold]; "
        f"spool {decimal(d.spool_bytes)}, results {decimal(d.results_bytes)}"
        + (f", database {decimal(d.database_bytes)}" if d.database_bytes is not None else "")
    )
    console.print(f"database schema: revision {node.schema}")
    if node.undelivered:
        jobs = sorted({u.job_id for u in node.undelivered})
        console.print(
            f"[bold red]{len(node.undelivered)} result object(s) of {len(jobs)} job(s): delivery failed for "
            "good[/bold red] (`dicomnode jobs retry ID` sends the same objects again)"
        )
        for u in node.undelivered:
            console.print(f"  job {u.job_id} {u.file} to {u.destination}: {u.error}", style="red")
    console.print(
        _table(
            "models", ("model", "loaded by"), ((m.name, ", ".join(m.loaded_by) or "not loaded") for m in node.models)
        )
    )
    if node.last_errors:
        _print_fitted(
            "last errors",
            (Column("at", drop=2), Column("event"), Column("job", drop=1), Column("message", Kind.TEXT)),
            ((_when(e.at), e.kind, str(e.job_id or ""), Text(e.message)) for e in node.last_errors),
            wide,
        )
    raise typer.Exit(code)


def _priority(priority: str) -> str:
    return {"urgent": "[bold red]urgent[/bold red]", "high": "[yellow]high[/yellow]"}.get(priority, priority)


def _print_jobs(jobs, wide: bool) -> None:  # noqa: ANN001 - ops.history.JobRow
    """The jobs table; at 80 columns: id, state, study (shortened), model and the error's start."""
    from rich.text import Text

    from dicomnode.ops.tablefit import Column, Kind

    _print_fitted(
        "jobs",
        (
            Column("id"),
            Column("state"),
            Column("priority", drop=7),
            Column("study", Kind.UID),
            Column("model", drop=6),
            Column("run", drop=2),
            Column("attempts", drop=3),
            Column("created", drop=4),
            Column("finished", drop=1),
            Column("error", Kind.TEXT, drop=5),
        ),
        (
            (
                str(j.id),
                j.state,
                _priority(j.priority),
                j.study,
                j.model,
                str(j.run),
                f"{j.attempts}/{j.max_attempts}",
                _when(j.created),
                _when(j.finished),
                Text(j.error or ""),
            )
            for j in jobs
        ),
        wide,
    )


@jobs_app.command("list")
def jobs_list(
    config: Path = ConfigOption,
    state: Optional[str] = typer.Option(
        None, help="Only jobs in this state: queued, running, succeeded, failed, cancelled, awaiting-review, rejected."
    ),
    since: Optional[str] = typer.Option(None, help="Only jobs created since: 30m, 2h, 1d or an ISO time (UTC)."),
    study: Optional[str] = typer.Option(None, help="Only jobs of this Study Instance UID."),
    as_json: bool = JsonOption,
    wide: bool = WideOption,
) -> None:
    """Jobs, newest first (at 80 columns: UIDs shortened, some columns left out; --wide for all)."""
    from dicomnode.ops.history import as_json as to_json
    from dicomnode.ops.history import list_jobs

    try:
        jobs = list_jobs(_sessions(_config(config)), state=state, since=_since(since), study=study)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    if as_json:
        print(to_json(jobs))
        return
    _print_jobs(jobs, wide)


def _shown_as_json(detail, missing: str, as_json: bool) -> bool:  # noqa: ANN001 - an admin dataclass or None
    """Exit 1 saying `missing` when there is no `detail`; print it as JSON and return True when
    --json asked for it."""
    from dicomnode.ops.history import as_json as to_json

    if detail is None:
        console.print(f"[red]{missing}[/red]")
        raise typer.Exit(1)
    if as_json:
        print(to_json(detail))
    return as_json


@jobs_app.command("show")
def jobs_show(job_id: int, config: Path = ConfigOption, as_json: bool = JsonOption, wide: bool = WideOption) -> None:
    """One job: its deliveries and its timeline (each step with the time since the one before and
    since the study's first instance), and the error text."""
    from rich.text import Text

    from dicomnode.ops.history import job_detail
    from dicomnode.ops.tablefit import Column, Kind
    from dicomnode.store.tables import DeliveryState

    job = job_detail(_sessions(_config(config)), job_id)
    if _shown_as_json(job, f"no job {job_id}", as_json):
        return
    console.print(
        f"job {job.id}: [bold]{job.state}[/bold]  priority {_priority(job.priority)}  model {job.model}  "
        f"run {job.run}  attempts {job.attempts}/{job.max_attempts}"
        + (f"  worker {job.lease_owner}" if job.lease_owner else "")
    )
    console.print(f"study {job.study}", soft_wrap=True)  # whole, on its own line: a UID to copy
    if job.prior_of_job is not None:
        console.print(f"compute-only: the comparison prior of job {job.prior_of_job} (nothing delivered)")
    if job.error:
        console.print(f"[red]error:[/red] {job.error}")
    if job.deliveries:
        _print_fitted(
            "deliveries",
            (
                Column("destination"),
                Column("file"),
                Column("state"),
                Column("attempts", drop=3),
                Column("sent", drop=2),
                Column("confirmed", drop=4),
                Column("next try", drop=1),
                Column("last error", Kind.TEXT, drop=5),
            ),
            (
                (
                    d.destination,
                    d.file,
                    d.state,
                    f"{d.attempts}/{d.max_attempts}",
                    _when(d.sent_at) if d.sent_at else "",
                    _when(d.confirmed_at) if d.confirmed_at else "",
                    _when(d.not_before) if d.state == DeliveryState.PENDING
                    else (f"report by {_when(d.confirm_by)}" if d.state == DeliveryState.CONFIRMING else ""),
                    Text(d.last_error or ""),
                )
                for d in job.deliveries
            ),
            wide,
        )
    _print_fitted(
        "timeline (UTC)",
        (
            Column("at"),
            Column("after", drop=1),
            Column("since received", drop=2),
            Column("event"),
            Column("message", Kind.PROSE, min_width=30),
        ),
        (
            (
                _when(s.at),
                _duration(s.since_previous_seconds),
                _duration(s.since_received_seconds),
                s.event,
                Text(s.message),
            )
            for s in job.timeline
        ),
        wide,
    )
    if job.comparison:  # [models.compare]: the follow-up against its prior, as the engine words it
        console.print("\n[bold]comparison with the prior study[/bold]")
        for line in job.comparison:
            console.print(Text(line), soft_wrap=True)


@jobs_app.command("retry")
def jobs_retry(job_id: int, config: Path = ConfigOption) -> None:
    """Queue a failed job again, with fresh attempts (and a fresh give-up horizon) for it and its
    failed deliveries; the deliveries send the same objects, with the same SOP Instance UIDs."""
    from dicomnode.pipeline.queue import RetryPolicy, retry

    cfg = _config(config)
    if not retry(_sessions(cfg), job_id, RetryPolicy.for_jobs(cfg.node), RetryPolicy.for_deliveries(cfg.node)):
        console.print(f"[red]job {job_id} is not a failed job[/red]")
        raise typer.Exit(1)
    console.print(f"job {job_id} queued again")


@jobs_app.command("cancel")
def jobs_cancel(job_id: int, config: Path = ConfigOption) -> None:
    """Cancel a queued, failed or awaiting-review job (and its pending deliveries); a running job is
    refused. A job held for review sends nothing, not even the status SR (`review reject` does)."""
    from dicomnode.pipeline.queue import RefusedError, cancel

    try:
        cancel(_sessions(_config(config)), job_id)
    except RefusedError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(f"job {job_id} cancelled")


PRIORITIES = "urgent, high, normal, low"


def _priority_argument(text: str):  # noqa: ANN202 - config.Priority
    from dicomnode.config import Priority

    try:
        return Priority(text.strip().lower())
    except ValueError:
        console.print(f"[red]no priority {text!r}[/red] (one of {PRIORITIES})")
        raise typer.Exit(2) from None


@jobs_app.command("prioritize")
def jobs_prioritize(
    job_id: int,
    priority: str = typer.Argument(..., help=f"One of {PRIORITIES}."),
    config: Path = ConfigOption,
) -> None:
    """Change a job's priority (an event in its timeline): a queued job is claimed by it from now
    on (urgent first; low only within [node] low_priority_hours), a running or failed one when it
    goes back to the queue."""
    from dicomnode.pipeline.queue import RefusedError, prioritize

    wanted = _priority_argument(priority)
    try:
        was = prioritize(_sessions(_config(config)), job_id, wanted)
    except RefusedError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(f"job {job_id}: priority {wanted}" + (f" (was {was})" if was != wanted else " already"))


@jobs_app.command("requeue")
def jobs_requeue(
    study: str,
    config: Path = ConfigOption,
    model: Optional[str] = typer.Option(None, help="Only this model (default: every configured model)."),
    priority: Optional[str] = typer.Option(
        None, help=f"The new jobs' priority, one of {PRIORITIES} (default: the model's)."
    ),
) -> None:
    """Run a study again now, as a new job per model (the next run number: new result series),
    even when an earlier run succeeded."""
    from dicomnode.config import Priority
    from dicomnode.pipeline.queue import RefusedError, RetryPolicy, requeue

    cfg = _config(config)
    if model is not None and model not in {m.name for m in cfg.models}:
        console.print(f"[red]no model named {model!r}[/red] (have: {', '.join(m.name for m in cfg.models)})")
        raise typer.Exit(2)
    sessions = _sessions(cfg)
    policy = RetryPolicy.for_jobs(cfg.node)
    refused = False
    wanted = _priority_argument(priority) if priority is not None else None
    for name in [model] if model else [m.name for m in cfg.models]:
        chosen = wanted or cfg.model(name).priority
        why = "by operator" if wanted else (f"model {name}" if chosen != Priority.NORMAL else "")
        try:
            job_id = requeue(sessions, study, name, policy, chosen, why)
            console.print(f"job {job_id} queued for model {name}"
                          + (f", priority {chosen}" if chosen != Priority.NORMAL else ""))
        except RefusedError as exc:
            console.print(f"[red]{exc}[/red]")
            refused = True
    raise typer.Exit(1 if refused else 0)


def _series_line(study) -> str:  # noqa: ANN001 - ops.history.StudyRow
    return "; ".join(f"{s.modality} #{s.number} {s.description} ({s.instances})" for s in study.series)


@app.command()
def events(
    config: Path = ConfigOption,
    since: Optional[str] = typer.Option(None, help="Only events since: 30m, 2h, 1d or an ISO time (UTC)."),
    kind: Optional[str] = typer.Option(None, help="Only events of this kind, e.g. delivery-failed."),
    study: Optional[str] = typer.Option(None, help="Only events of this Study Instance UID."),
) -> None:
    """Export the event log, oldest first, one JSON object a line (read in batches: the node goes
    on receiving while a long export runs)."""
    from dicomnode.ops.history import iter_events

    for event in iter_events(_sessions(_config(config)), since=_since(since), kind=kind, study=study):
        sys.stdout.write(json.dumps(event) + "\n")


@studies_app.command("list")
def studies_list(
    config: Path = ConfigOption,
    since: Optional[str] = typer.Option(None, help="Only studies received since: 30m, 2h, 1d or an ISO time (UTC)."),
    as_json: bool = JsonOption,
    wide: bool = WideOption,
) -> None:
    """Received studies, the latest first: their series and their latest job (at 80 columns: UIDs
    shortened, some columns left out; --wide for all)."""
    from rich.text import Text

    from dicomnode.ops.history import as_json as to_json
    from dicomnode.ops.history import list_studies
    from dicomnode.ops.tablefit import Column, Kind

    studies = list_studies(_sessions(_config(config)), since=_since(since))
    if as_json:
        print(to_json(studies))
        return
    _print_fitted(
        "studies",
        (
            Column("study", Kind.UID),
            Column("last received", drop=3),
            Column("instances", drop=1),
            Column("series", Kind.TEXT, drop=2),
            Column("latest job"),
        ),
        (
            (
                s.study,
                _when(s.last_received),
                str(s.instances),
                Text(_series_line(s)),
                f"{s.jobs[0].id} {s.jobs[0].state} (run {s.jobs[0].run})" if s.jobs else "",
            )
            for s in studies
        ),
        wide,
    )


@studies_app.command("show")
def studies_show(
    study_uid: str, config: Path = ConfigOption, as_json: bool = JsonOption, wide: bool = WideOption
) -> None:
    """One study: its series with the verdict of the latest job, its jobs and its events."""
    from rich.text import Text

    from dicomnode.ops.history import study_detail
    from dicomnode.ops.tablefit import Column, Kind

    study = study_detail(_sessions(_config(config)), study_uid)
    if _shown_as_json(study, f"no study {study_uid} in the index", as_json):
        return
    console.print(
        f"study {study.study}: {study.instances} instances, first received {_when(study.first_received)}, "
        f"last {_when(study.last_received)} UTC"
    )
    _print_fitted(
        "series",
        (
            Column("#"),
            Column("modality"),
            Column("description", Kind.PROSE, drop=2),
            Column("instances", drop=3),
            Column("last received", drop=1),
            Column("verdict", Kind.PROSE, min_width=24),
        ),
        (
            (
                "" if s.number is None else str(s.number),
                s.modality,
                Text(s.description),
                str(s.instances),
                _when(s.last_received),
                Text(f"{s.verdict} (job {s.verdict_job})" if s.verdict else ""),
            )
            for s in study.series
        ),
        wide,
    )
    if study.jobs:
        _print_jobs(study.jobs, wide)
    _print_fitted(
        "events",
        (Column("at"), Column("event"), Column("message", Kind.PROSE, min_width=24)),
        ((_when(e.at), e.kind, Text(e.message)) for e in study.events),
        wide,
    )


@app.command("inspect")
def inspect_cmd(
    path: Path,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    export: Optional[Path] = typer.Option(
        None, "--export", help="Write the model's input volumes here (pet_suv.nii.gz, ct_hu.nii.gz)."
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="Take the model's input spec from this config.toml (default: built-in defaults)."
    ),
    model: Optional[str] = typer.Option(None, "--model", help="The model of the config (default: its first)."),
) -> None:
    """What the node would do with a folder of DICOM files: series verdicts, SUV factor, warnings.

    Exit status 0 when the node would queue a job for every study found, 1 otherwise."""
    from rich.text import Text

    from dicomnode.config import ModelSettings
    from dicomnode.ops.inspect import export_inputs, inspect_path
    from dicomnode.pipeline.errors import JobError

    if not path.exists():
        console.print(f"[red]no such file or folder: {path}[/red]")
        raise typer.Exit(2)
    if config is not None:
        cfg = _config(config)
        try:
            settings = cfg.model(model) if model else cfg.models[0]
        except KeyError:
            console.print(f"[red]no model named {model!r}[/red] (have: {', '.join(m.name for m in cfg.models)})")
            raise typer.Exit(2) from None
    else:
        settings = ModelSettings(name="(built-in defaults)", path=Path("."))
    report = inspect_path(path, settings)
    failed = False
    if export is not None:
        for study in report.studies:
            out = export if len(report.studies) == 1 else export / study.study_uid
            try:
                export_inputs(study, settings, out)
            except (JobError, ValueError) as exc:
                study.warnings.append(f"export failed: {exc}")
                failed = True
    ok = bool(report.studies) and all(s.ready for s in report.studies) and not failed
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        raise typer.Exit(0 if ok else 1)
    console.print(
        f"{report.path}: {report.files} files, model [bold]{report.model}[/bold] "
        f"(channels {', '.join(report.channels)} on the {report.grid} grid)"
    )
    for warning in report.warnings:
        console.print("[yellow]warning:[/yellow]", Text(warning))
    for study in report.studies:
        state = "[green]would queue a job[/green]" if study.ready else "[yellow]would hold the study back[/yellow]"
        console.print(f"\nstudy {study.study_uid}: {state}")
        table = Table(title="series")
        for column in ("#", "modality", "description", "instances", "verdict"):
            table.add_column(column, overflow="fold", no_wrap=column in ("#", "modality", "instances"))
        for v in study.selection.verdicts:
            colour = {"used": "green", "waiting": "yellow"}.get(v.state, "")
            table.add_row(
                "" if v.series_number is None else str(v.series_number),
                Text(v.modality),
                Text(v.description),
                str(v.instances),
                Text(v.text, style=colour),
            )
        console.print(table)
        if study.suv:
            suv_table = Table(title=f"SUVbw factor {study.suv['factor']:.6g} per rescaled unit (first PET slice)")
            suv_table.add_column("attribute")
            suv_table.add_column("value", overflow="fold")
            for key, value in study.suv["attributes"].items():
                suv_table.add_row(key, Text(str(value)))
            if "factor_range" in study.suv:
                low, high = study.suv["factor_range"]
                suv_table.add_row("factor range over slices", f"{low:.6g} to {high:.6g}")
            console.print(suv_table)
        for warning in study.warnings:
            console.print("[yellow]warning:[/yellow]", Text(warning))
        for channel, file in study.exported.items():
            console.print(f"exported {channel}: {file}")
    raise typer.Exit(0 if ok else 1)


review_app = typer.Typer(help="Results held for review ([[models]] review = true): list, show, release, reject.",
                         no_args_is_help=True)
app.add_typer(review_app, name="review")


@review_app.command("list")
def review_list(config: Path = ConfigOption, as_json: bool = JsonOption, wide: bool = WideOption) -> None:
    """Jobs whose results await review, oldest first: what each found (at 80 columns: UIDs
    shortened; --wide for whole UIDs)."""
    from rich.text import Text

    from dicomnode.ops.history import as_json as to_json
    from dicomnode.ops.review import list_awaiting
    from dicomnode.ops.tablefit import Column, Kind

    cfg = _config(config)
    rows = list_awaiting(cfg, _sessions(cfg))
    if as_json:
        print(to_json(rows))
        return
    _print_fitted(
        "awaiting review",
        (Column("id"), Column("study", Kind.UID), Column("model", drop=3), Column("run", drop=1),
         Column("held since", drop=2), Column("found", Kind.TEXT, drop=4)),
        ((str(r.id), r.study, r.model, str(r.run), _when(r.held_at), Text(r.found)) for r in rows),
        wide,
    )


@review_app.command("show")
def review_show(job_id: int, config: Path = ConfigOption, as_json: bool = JsonOption,
                wide: bool = WideOption) -> None:
    """One job's results as a reader reviews them: the measures, the preview PNG's path, the
    result files (SOP class, SOP Instance UID, an SR's verification)."""
    from dicomnode.ops.review import review_detail
    from dicomnode.ops.tablefit import Column, Kind

    cfg = _config(config)
    detail = review_detail(cfg, _sessions(cfg), job_id)
    if _shown_as_json(detail, f"no job {job_id}", as_json):
        return
    console.print(f"job {detail.id}: [bold]{detail.state}[/bold]  model {detail.model}  run {detail.run}"
                  + (f"  held since {_when(detail.held_at)}" if detail.held_at else ""))
    if detail.reviewed_by:
        console.print(f"reviewed by {detail.reviewed_by} at {_when(detail.reviewed_at)} UTC")
    console.print(f"study {detail.study}", soft_wrap=True)
    console.print(f"results: {detail.result_dir}", soft_wrap=True)
    console.print(f"preview: {detail.preview or 'none (a model without PET, or not written)'}", soft_wrap=True)
    m = detail.measures
    if isinstance(m, dict) and "lesion_count" in m:
        console.print(f"{m['lesion_count']} lesions, total MTV {m['total_mtv_ml']:.1f} ml, "
                      f"total TLG {m['total_tlg_g']:.1f} g")
        if m.get("lesions"):
            _print_fitted(
                "lesions",
                (Column("lesion"), Column("SUVmax"), Column("SUVmean"), Column("SUVpeak"), Column("MTV ml"),
                 Column("TLG g")),
                ((str(les["number"]), f"{les['suv_max']:.2f}", f"{les['suv_mean']:.2f}", f"{les['suv_peak']:.2f}",
                  f"{les['volume_ml']:.2f}", f"{les['tlg_g']:.1f}") for les in m["lesions"]),
                wide,
            )
    elif isinstance(m, list):
        _print_fitted("segments", (Column("label"), Column("name", Kind.TEXT), Column("volume ml"),
                                   Column("parts")),
                      ((str(s["label"]), s["name"], f"{s['volume_ml']:.2f}", str(s["components"])) for s in m),
                      wide)
    else:
        console.print("[yellow]no measures.json in the result folder[/yellow]")
    _print_fitted(
        "result files",
        (Column("kind"), Column("file", Kind.TEXT, drop=3), Column("SOP class", Kind.TEXT, drop=2),
         Column("SOP Instance UID", Kind.UID), Column("verification", drop=1)),
        ((f.kind, Path(f.path).name, f.sop_class, f.sop_instance_uid, f.verification) for f in detail.files),
        wide,
    )


@review_app.command("release")
def review_release(
    job_id: int,
    by: str = typer.Option(..., "--by", help="The reader's name: the SR's Verifying Observer ('Family^Given')."),
    config: Path = ConfigOption,
) -> None:
    """Release held results: the SR is made VERIFIED by the reader and the objects are sent by
    the running node (its worker claims the job within about a second)."""
    from dicomnode.pipeline.queue import RefusedError
    from dicomnode.pipeline.review import release

    try:
        job = release(_sessions(_config(config)), job_id, by)
    except RefusedError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(f"job {job.id} released by {job.reviewed_by}: queued for delivery (SR made VERIFIED first)")


@review_app.command("reject")
def review_reject(
    job_id: int,
    by: str = typer.Option(..., "--by", help="The reader's name."),
    reason: str = typer.Option(..., "--reason", help="Why the results are rejected (sent in the status SR)."),
    config: Path = ConfigOption,
) -> None:
    """Reject held results: nothing is sent but, to each destination with STATUS in its outputs,
    the "not performed" status SR with the reason and the reader."""
    from dicomnode.pipeline.queue import RefusedError
    from dicomnode.pipeline.review import reject

    try:
        job = reject(_sessions(_config(config)), job_id, by, reason)
    except RefusedError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(f"job {job.id} rejected by {job.reviewed_by}: {job.error}")


models_app = typer.Typer(help="Check the configured models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("check")
def models_check(
    names: Optional[list[str]] = typer.Argument(None, help="Models to check (default: every configured model)."),
    config: Path = ConfigOption,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    dry_run: bool = typer.Option(
        True, "--dry-run/--no-dry-run", help="Load each model and segment a small synthetic array."
    ),
) -> None:
    """Files, folds, trainer, channels, label codes and destinations of each model, and a dry run;
    exit 1 when any model has a problem."""
    from rich.text import Text

    from dicomnode.ops.modelcheck import check_models

    cfg = _config(config)
    try:
        reports = check_models(cfg, names or None, dry_run=dry_run)
    except KeyError as exc:
        console.print(f"[red]no model named {exc.args[0]!r}[/red] (have: {', '.join(m.name for m in cfg.models)})")
        raise typer.Exit(2) from None
    ok = all(r.ok for r in reports)
    if as_json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
        raise typer.Exit(0 if ok else 1)
    table = Table(title="models")
    for column in ("model", "path", "channels", "labels", "dry run", "problems"):
        table.add_column(column, overflow="fold")
    for r in reports:
        labels = ", ".join(f"{v} {k}" for k, v in sorted(r.labels.items(), key=lambda item: item[1]) if v)
        problems = Text("\n".join(r.problems), style="red") if r.problems else Text("none", style="green")
        table.add_row(Text(r.name), Text(r.path), Text(", ".join(r.channels)), Text(labels), Text(r.dry_run), problems)
    console.print(table)
    raise typer.Exit(0 if ok else 1)


def main() -> None:
    app()


@app.command()
def conformance(
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="Path to config.toml (default: the built-in defaults, as docs/conformance.md)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the statement here (default: stdout)."),
) -> None:
    """The DICOM conformance statement (Markdown, PS3.2's order) from what the node negotiates and writes."""
    from dicomnode.ops.conformance import statement

    text = statement(_config(config) if config is not None else None)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        console.print(f"wrote {out}")
