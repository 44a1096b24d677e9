"""The `dicomnode` command: run the node and inspect it (the inspection commands read only
the database, so they work while the service runs)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from dicomnode.config import Config, ConfigError, load_config

app = typer.Typer(help="DICOM node that runs nnU-Net segmentation models on studies sent by a PACS.", no_args_is_help=True)
jobs_app = typer.Typer(help="Inspect and manage jobs.", no_args_is_help=True)
studies_app = typer.Typer(help="Inspect received studies.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(studies_app, name="studies")
console = Console()

ConfigOption = typer.Option(Path("config.toml"), "--config", "-c", help="Path to config.toml.", envvar="DICOMNODE_CONFIG")


def _setup_logging(level: str = "INFO") -> None:
    # Under systemd, journald stamps the time itself.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(level=level.upper(), format=f"{stamp}%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _config(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from None


def _sessions(config: Config):  # noqa: ANN202
    from dicomnode.db import make_sessionmaker

    return make_sessionmaker(config.database_url)


@app.command()
def serve(config: Path = ConfigOption, log_level: str = "INFO", no_worker: bool = typer.Option(False, help="Run without the worker process.")) -> None:
    """Start the receiver, the scheduler and a worker process."""
    _setup_logging(log_level)
    from dicomnode.service import serve as run

    run(_config(config), with_worker=not no_worker)


@app.command()
def worker(config: Path = ConfigOption, log_level: str = "INFO") -> None:
    """Run a worker: claim jobs and run the models (serve starts one itself)."""
    _setup_logging(log_level)
    from dicomnode.worker import Worker

    Worker(_config(config)).run_forever()


@app.command()
def synth(
    out: Path,
    seed: int = 0,
    lesions: Optional[int] = typer.Option(None, help="Number of lesions (default: 2 to 6)."),
    variant: str = typer.Option("bqml", help="How the PET is stored: bqml, ge-private-time, philips-cnts, admin-mbq, midnight."),
) -> None:
    """Write a synthetic PET/CT study (CT and PET series, lesion truth) to OUT."""
    from dicomnode.synth import VARIANTS, write_study

    if variant not in VARIANTS:
        console.print(f"[red]unknown variant {variant!r}[/red] (one of {', '.join(VARIANTS)})")
        raise typer.Exit(2)
    study = write_study(out, seed=seed, n_lesions=lesions, variant=variant)
    console.print(f"study {study.study_instance_uid}: {len(study.phantom.lesions)} lesions, PET {variant}, written to {out}")


@app.command()
def echo(destination: str, config: Path = ConfigOption) -> None:
    """C-ECHO a configured destination."""
    from dicomnode.sender import SendError, echo as c_echo

    cfg = _config(config)
    dest = next((d for d in cfg.destinations if d.name == destination), None)
    if dest is None:
        console.print(f"[red]no destination named {destination!r}[/red] (have: {', '.join(d.name for d in cfg.destinations)})")
        raise typer.Exit(2)
    try:
        status = c_echo(dest, cfg.node.ae_title, cfg.node.network_timeout_seconds)
    except SendError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(f"{destination}: C-ECHO status 0x{status:04X}")
    raise typer.Exit(0 if status == 0 else 1)


@app.command()
def send(path: Path, destination: str, config: Path = ConfigOption) -> None:
    """C-STORE every DICOM file under PATH to a configured destination."""
    from rich.progress import track

    from dicomnode.sender import SendError, send_files

    cfg = _config(config)
    dest = next((d for d in cfg.destinations if d.name == destination), None)
    if dest is None:
        console.print(f"[red]no destination named {destination!r}[/red]")
        raise typer.Exit(2)
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file() and p.suffix.lower() in (".dcm", ""))
    try:
        for chunk_start in track(range(0, len(files), 50), description=f"sending to {destination}"):
            send_files(dest, files[chunk_start:chunk_start + 50], cfg.node.ae_title, cfg.node.network_timeout_seconds)
    except SendError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(f"sent {len(files)} files to {destination}")


def _when(value) -> str:  # noqa: ANN001
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


@jobs_app.command("list")
def jobs_list(config: Path = ConfigOption, state: Optional[str] = None, as_json: bool = typer.Option(False, "--json")) -> None:
    """Jobs, newest first."""
    from dicomnode.db import Job

    sessions = _sessions(_config(config))
    with sessions() as session:
        query = select(Job).order_by(Job.id.desc())
        if state:
            query = query.where(Job.state == state)
        jobs = list(session.scalars(query))
    rows = [
        {"id": j.id, "state": j.state, "study": j.study_uid, "model": j.model, "run": j.run_number,
         "attempts": f"{j.attempts}/{j.max_attempts}", "created": _when(j.created_at), "finished": _when(j.finished_at),
         "error": j.error or ""}
        for j in jobs
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="jobs")
    for column in ("id", "state", "study", "model", "run", "attempts", "created", "finished", "error"):
        table.add_column(column, overflow="fold", no_wrap=column in ("id", "state", "run", "attempts", "created", "finished"))
    for row in rows:
        table.add_row(*(str(row[c]) for c in ("id", "state", "study", "model", "run", "attempts", "created", "finished", "error")))
    console.print(table)


@jobs_app.command("show")
def jobs_show(job_id: int, config: Path = ConfigOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """One job and its timeline."""
    from dicomnode.db import Delivery, Event, Job

    sessions = _sessions(_config(config))
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            console.print(f"[red]no job {job_id}[/red]")
            raise typer.Exit(1)
        events = list(session.scalars(
            select(Event).where((Event.job_id == job_id) | ((Event.study_uid == job.study_uid) & Event.job_id.is_(None))).order_by(Event.id)
        ))
        sends = list(session.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)))
    timeline = [{"at": _when(e.at), "event": e.kind, "message": e.message} for e in events]
    delivered = [{"destination": d.destination, "file": Path(d.path).name, "sop_instance_uid": d.sop_instance_uid,
                  "state": d.state, "attempts": d.attempts, "max_attempts": d.max_attempts,
                  "not_before": _when(d.not_before), "last_error": d.last_error} for d in sends]
    if as_json:
        print(json.dumps({"id": job.id, "state": job.state, "study": job.study_uid, "model": job.model,
                          "attempts": job.attempts, "error": job.error, "deliveries": delivered, "timeline": timeline}, indent=2))
        return
    console.print(f"job {job.id}: [bold]{job.state}[/bold]  study {job.study_uid}  model {job.model}  run {job.run_number}  attempts {job.attempts}/{job.max_attempts}")
    if job.error:
        console.print(f"[red]error:[/red] {job.error}")
    if delivered:
        sends_table = Table(title="deliveries")
        for column in ("destination", "file", "state", "attempts", "next try", "last error"):
            sends_table.add_column(column, overflow="fold")
        for d in delivered:
            sends_table.add_row(d["destination"], d["file"], d["state"], f"{d['attempts']}/{d['max_attempts']}",
                                d["not_before"] if d["state"] == "pending" else "", d["last_error"] or "")
        console.print(sends_table)
    table = Table(title="timeline")
    for column in ("at", "event", "message"):
        table.add_column(column, overflow="fold")
    for row in timeline:
        table.add_row(row["at"], row["event"], row["message"])
    console.print(table)


@jobs_app.command("retry")
def jobs_retry(job_id: int, config: Path = ConfigOption) -> None:
    """Queue a failed job again."""
    from dicomnode.queue import retry

    if not retry(_sessions(_config(config)), job_id):
        console.print(f"[red]job {job_id} is not a failed job[/red]")
        raise typer.Exit(1)
    console.print(f"job {job_id} queued again")


@studies_app.command("list")
def studies_list(config: Path = ConfigOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """Received studies with their series."""
    from dicomnode.db import Study
    from dicomnode.index import series_of_study

    sessions = _sessions(_config(config))
    with sessions() as session:
        studies = list(session.scalars(select(Study).order_by(Study.last_received_at.desc())))
        rows = [
            {"study": s.study_uid, "last_received": _when(s.last_received_at), "instances": s.instances_received,
             "series": [f"{x.modality} #{x.series_number} {x.description} ({x.instances})" for x in series_of_study(session, s.study_uid)]}
            for s in studies
        ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="studies")
    for column in ("study", "last received", "instances", "series"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["study"], row["last_received"], str(row["instances"]), "\n".join(row["series"]))
    console.print(table)


@app.command("inspect")
def inspect_cmd(
    path: Path,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    export: Optional[Path] = typer.Option(None, "--export", help="Write the model's input volumes here (pet_suv.nii.gz, ct_hu.nii.gz)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Take the model's input spec from this config.toml (default: built-in defaults)."),
    model: Optional[str] = typer.Option(None, "--model", help="The model of the config (default: its first)."),
) -> None:
    """What the node would do with a folder of DICOM files: series verdicts, SUV factor, warnings.

    Exit status 0 when the node would queue a job for every study found, 1 otherwise."""
    from rich.text import Text

    from dicomnode.config import ModelSettings
    from dicomnode.inspect import export_inputs, inspect_path
    from dicomnode.processing import JobError

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
    console.print(f"{report.path}: {report.files} files, model [bold]{report.model}[/bold] (channels {', '.join(report.channels)} on the {report.grid} grid)")
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
            table.add_row("" if v.series_number is None else str(v.series_number), Text(v.modality), Text(v.description),
                          str(v.instances), Text(v.text, style=colour))
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


def main() -> None:
    app()
