"""The admin commands (status, studies, jobs) on a database with a job in every state, as
tables and as JSON: filters, timelines with durations, cancel and requeue with their events."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import (
    CTImageStorage,
    PositronEmissionTomographyImageStorage,
    SegmentationStorage,
    generate_uid,
)
from sqlalchemy import select, update
from typer.testing import CliRunner

from dicomnode import cli
from dicomnode.config import Config, load_config
from dicomnode.net.sender import Outcome
from dicomnode.ops.history import parse_since
from dicomnode.pipeline import delivery, review
from dicomnode.pipeline.queue import RetryPolicy, cancel, claim, enqueue, fail, succeed
from dicomnode.pipeline.selection import Verdict
from dicomnode.store.components import heartbeat
from dicomnode.store.engine import make_sessionmaker
from dicomnode.store.events import EventKind, log_event
from dicomnode.store.index import ReceivedInstance, record_instance
from dicomnode.store.schema import head_revision
from dicomnode.store.tables import Component, Delivery, Job, JobState, utcnow
from dicomnode.testing.node import start_node

from tests.support.nodeutil import node_config, write_config

LEASE = timedelta(minutes=10)
REMOTE_WORKER = "gpu-2:77"  # a worker on another host, busy with the running job


@dataclass
class Site:
    config: Config
    sessions: object
    t0: datetime  # when every study arrived (an hour ago)
    jobs: dict[str, int]  # state -> job id
    studies: dict[str, str]  # state of its job -> study UID
    series: dict[str, dict[str, str]]  # study UID -> {"CT": series UID, "PT": series UID}


def _index_study(sessions, at: datetime) -> tuple[str, dict[str, str]]:
    """A study of 3 CT and 2 PET instances: the CT at `at`, the PET a second later."""
    study = generate_uid()
    series = {"CT": generate_uid(), "PT": generate_uid()}
    for modality, count, sop_class, when in (
        ("CT", 3, CTImageStorage, at),
        ("PT", 2, PositronEmissionTomographyImageStorage, at + timedelta(seconds=1)),
    ):
        for i in range(count):
            record_instance(
                sessions,
                ReceivedInstance(
                    study,
                    series[modality],
                    generate_uid(),
                    sop_class,
                    "1.2.840.10008.1.2.1",
                    modality,
                    1 if modality == "CT" else 2,
                    f"{modality} series",
                    f"/spool/{study}/{i}.dcm",
                    "PACS",
                ),
                now=when,
            )
    return study, series


def _verdicts(series: dict[str, str]) -> list[tuple[str, str]]:
    used = Verdict(series["PT"], "PT", 2, "PT series", 2, "used", "PET", label='PT #2 "PT series", 2 instances')
    ignored = Verdict(
        series["CT"],
        "CT",
        1,
        "CT series",
        3,
        "ignored",
        None,
        ("ImageType lacks AXIAL",),
        label='CT #1 "CT series", 3 instances',
    )
    return [
        (EventKind.SERIES_VERDICT, used.message, used.as_dict()),
        (EventKind.SERIES_VERDICT, ignored.message, ignored.as_dict()),
    ]


def _succeed_with_deliveries(sessions, job_id: int, study: str) -> None:
    with sessions.begin() as session:
        for kind, message in (
            ("inputs-built", "CT <- CT #1, PET <- PT #2"),
            ("inference-done", "1.5 s on cpu, 12 foreground voxels"),
            ("results-written", "SEG 1.2.3 series 901, SR 1.2.4 series 951"),
        ):
            log_event(session, kind, message, study_uid=study, job_id=job_id)
        now = utcnow()
        rows = [
            Delivery(
                job_id=job_id,
                destination="pacs",
                path=f"/results/{name}",
                sop_instance_uid=generate_uid(),
                sop_class_uid=SegmentationStorage,
                state="pending",
                attempts=0,
                max_attempts=5,
                not_before=now,
                created_at=now,
                updated_at=now,
            )
            for name in ("seg.dcm", "sr.dcm")
        ]
        session.add_all(rows)
    for row in rows:
        delivery.record(
            sessions,
            row.id,
            Outcome(Path(row.path), row.sop_instance_uid, row.sop_class_uid, 1, 0x0000),
            RetryPolicy(5, 30),
            study_uid=study,
        )
    assert succeed(sessions, job_id, "w", "2 objects delivered to 1 destinations")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Site:
    """The database, made once (each commit is fsynced): a study per job state, the studies an hour old."""
    config = node_config(tmp_path_factory.mktemp("site"))
    sessions = make_sessionmaker(config.database_url)
    t0 = utcnow() - timedelta(hours=1)
    # in the order their jobs are made
    states = ("running", "succeeded", "failed", "awaiting-review", "rejected", "cancelled", "queued")
    indexed = {state: _index_study(sessions, t0) for state in states}
    studies = {state: uid for state, (uid, _series) in indexed.items()}
    jobs = {
        state: enqueue(
            sessions,
            studies[state],
            "demo-petct",
            RetryPolicy(),
            "study complete and quiet",
            details=_verdicts(indexed[state][1]),
        )
        for state in states[:3]
    }
    assert claim(sessions, REMOTE_WORKER, LEASE).id == jobs["running"]
    assert claim(sessions, "w", LEASE).id == jobs["succeeded"]
    _succeed_with_deliveries(sessions, jobs["succeeded"], studies["succeeded"])
    assert claim(sessions, "w", LEASE).id == jobs["failed"]
    fail(sessions, jobs["failed"], "w", "cannot compute SUVbw: PatientWeight: missing", RetryPolicy(), retryable=False)
    for state in ("awaiting-review", "rejected"):  # results built and held ([[models]] review), one then rejected
        jobs[state] = enqueue(sessions, studies[state], "demo-petct", RetryPolicy())
        assert claim(sessions, "w", LEASE).id == jobs[state]
        assert review.hold(sessions, jobs[state], "w", "2 lesions; nothing sent")
    review.reject(sessions, jobs["rejected"], "Curie^Marie", "not a lesion")
    jobs["cancelled"] = enqueue(sessions, studies["cancelled"], "demo-petct", RetryPolicy())
    cancel(sessions, jobs["cancelled"])
    jobs["queued"] = enqueue(sessions, studies["queued"], "demo-petct", RetryPolicy())
    with sessions.begin() as session:  # the failed job is three days old
        session.execute(update(Job).where(Job.id == jobs["failed"]).values(created_at=utcnow() - timedelta(days=3)))
    sessions.kw["bind"].dispose()  # the last connection closed: the WAL is checkpointed into the file
    return Site(config, None, t0, jobs, studies, {uid: series for uid, series in indexed.values()})


@pytest.fixture
def site(built: Site, tmp_path: Path, monkeypatch) -> Site:
    """A copy of the built node folder for one test."""
    monkeypatch.setattr(cli.console, "width", 220)
    shutil.copytree(built.config.source.parent, tmp_path / "node")
    config = load_config(tmp_path / "node" / "config.toml")
    return replace(built, config=config, sessions=make_sessionmaker(config.database_url))


def _cli(site: Site, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli.app, [*args, "--config", str(site.config.source)])
    assert result.exit_code == code, result.output
    return result.output


def _rows(output: str) -> list[list[str]]:
    """The cells of each line of a rich table (a folded cell continues on the next line)."""
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in output.splitlines() if line.startswith("│")]


def _seconds(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def test_jobs_list_has_every_state_as_table_and_json(site: Site):
    listing = json.loads(_cli(site, "jobs", "list", "--json"))
    assert {j["state"]: j["id"] for j in listing} == site.jobs
    assert set(site.jobs) == set(list(JobState))
    assert [j["id"] for j in listing] == sorted(site.jobs.values(), reverse=True)  # newest first
    failed = next(j for j in listing if j["state"] == "failed")
    assert (failed["study"], failed["attempts"], failed["max_attempts"]) == (site.studies["failed"], 1, 3)
    assert failed["error"] == "cannot compute SUVbw: PatientWeight: missing"

    rows = {row[0]: row for row in _rows(_cli(site, "jobs", "list")) if row[0].isdigit()}
    assert {int(i): row[1] for i, row in rows.items()} == {v: k for k, v in site.jobs.items()}
    assert rows[str(site.jobs["failed"])][6] == "1/3" and "PatientWeight" in rows[str(site.jobs["failed"])][9]

    for state, job_id in site.jobs.items():
        assert [j["id"] for j in json.loads(_cli(site, "jobs", "list", "--state", state, "--json"))] == [job_id]
    recent = {j["id"] for j in json.loads(_cli(site, "jobs", "list", "--since", "1d", "--json"))}
    assert recent == set(site.jobs.values()) - {site.jobs["failed"]}
    iso = (utcnow() - timedelta(days=4)).strftime("%Y-%m-%dT%H:%M")
    assert len(json.loads(_cli(site, "jobs", "list", "--since", iso, "--json"))) == len(JobState)
    one_study = json.loads(_cli(site, "jobs", "list", "--study", site.studies["queued"], "--json"))
    assert [j["id"] for j in one_study] == [site.jobs["queued"]]

    assert "no job state 'done': one of queued, running, succeeded, failed, cancelled" in _cli(
        site, "jobs", "list", "--state", "done", code=2
    )
    assert "cannot read 'yesterday' as a time" in _cli(site, "jobs", "list", "--since", "yesterday", code=2)


def test_parse_since():
    now = datetime.fromisoformat("2024-05-01T12:00:00+00:00")
    assert parse_since("2h", now) == now - timedelta(hours=2)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("1d", now) == now - timedelta(days=1)
    assert parse_since("2024-05-01T08:00", now) == datetime.fromisoformat("2024-05-01T08:00:00+00:00")
    assert parse_since("2024-05-01T08:00+02:00", now) == datetime.fromisoformat("2024-05-01T06:00:00+00:00")
    with pytest.raises(ValueError, match="30m, 2h, 1d"):
        parse_since("2 hours", now)


def test_job_timeline_in_order_with_durations(site: Site):
    shown = json.loads(_cli(site, "jobs", "show", str(site.jobs["succeeded"]), "--json"))
    assert (shown["state"], shown["run"], shown["study"]) == ("succeeded", 1, site.studies["succeeded"])
    steps = shown["timeline"]
    assert [s["event"] for s in steps] == [
        "study-received",
        "last-instance",
        "queued",
        EventKind.SERIES_VERDICT,
        EventKind.SERIES_VERDICT,
        "started",
        "inputs-built",
        "inference-done",
        "results-written",
        "delivered",
        "delivered",
        "succeeded",
    ]
    assert steps[0]["since_previous_seconds"] is None and steps[0]["since_received_seconds"] == 0
    assert steps[1]["since_received_seconds"] == 1.0  # the PET, the study's last instances, a second after the CT
    assert steps[1]["message"] == "the last of 5 instances received before the job was queued"
    assert 3599 < steps[2]["since_received_seconds"] < 3660  # queued now, the study arrived an hour ago
    for before, step in zip(steps, steps[1:]):
        assert step["since_previous_seconds"] == pytest.approx(_seconds(before["at"], step["at"]), abs=1e-6)
        assert step["since_received_seconds"] == pytest.approx(_seconds(steps[0]["at"], step["at"]), abs=1e-6)
        assert step["since_previous_seconds"] >= 0
    assert [(d["file"], d["state"], d["attempts"]) for d in shown["deliveries"]] == [
        ("seg.dcm", "sent", 1),
        ("sr.dcm", "sent", 1),
    ]
    assert "seg.dcm" in next(s["message"] for s in steps if s["event"] == "delivered")

    table = _rows(_cli(site, "jobs", "show", str(site.jobs["succeeded"])))
    assert next(row for row in table if row[3:4] == ["last-instance"])[1:3] == ["1.0 s", "1.0 s"]
    assert next(row for row in table if row[3:4] == ["queued"])[2] == "1 h 0 min"  # an hour after the study arrived
    [seg_row] = [row for row in table if row[:4] == ["pacs", "seg.dcm", "sent", "1/5"]]
    assert seg_row[4] and seg_row[5:] == ["", "", ""]  # sent at a time; not confirmed (verify = "none")

    failed = _cli(site, "jobs", "show", str(site.jobs["failed"]))
    assert "error: cannot compute SUVbw: PatientWeight: missing" in failed
    assert "no job 999" in _cli(site, "jobs", "show", "999", code=1)


def test_cancel_and_requeue_change_states_with_events(site: Site):
    assert "cancelled" in _cli(site, "jobs", "cancel", str(site.jobs["queued"]))
    refused = _cli(site, "jobs", "cancel", str(site.jobs["running"]), code=1)
    assert f"job {site.jobs['running']} is running (worker {REMOTE_WORKER})" in refused
    assert "is succeeded: only queued, failed or awaiting-review jobs can be cancelled" in _cli(
        site, "jobs", "cancel", str(site.jobs["succeeded"]), code=1
    )
    assert "no job 999" in _cli(site, "jobs", "cancel", "999", code=1)
    _cli(site, "jobs", "cancel", str(site.jobs["failed"]))
    states = {j["id"]: j["state"] for j in json.loads(_cli(site, "jobs", "list", "--json"))}
    assert states[site.jobs["queued"]] == states[site.jobs["failed"]] == "cancelled"
    assert states[site.jobs["running"]] == "running"
    assert claim(site.sessions, "w", LEASE) is None  # nothing cancelled runs
    cancelled = json.loads(_cli(site, "jobs", "show", str(site.jobs["queued"]), "--json"))["timeline"][-1]
    assert (cancelled["event"], cancelled["message"]) == ("cancelled", "by operator")

    study = site.studies["succeeded"]
    assert "queued for model demo-petct" in _cli(site, "jobs", "requeue", study)
    [again, first] = json.loads(_cli(site, "jobs", "list", "--study", study, "--json"))
    assert (first["id"], first["state"]) == (site.jobs["succeeded"], "succeeded")
    assert (again["state"], again["run"]) == ("queued", 2)  # a new run: new result series
    queued = json.loads(_cli(site, "jobs", "show", str(again["id"]), "--json"))["timeline"]
    assert [s["message"] for s in queued if s["event"] == "queued"] == ["model demo-petct, run 2: requeued by operator"]
    assert f"job {again['id']} of study {study} for model demo-petct is already queued" in _cli(
        site, "jobs", "requeue", study, code=1
    )
    assert "no study 1.2.999 in the index" in _cli(site, "jobs", "requeue", "1.2.999", code=1)
    assert "no model named 'other'" in _cli(site, "jobs", "requeue", study, "--model", "other", code=2)
    assert claim(site.sessions, "w", LEASE).id == again["id"]


def test_cancel_takes_pending_deliveries_with_it(site: Site):
    job_id = site.jobs["queued"]
    now = utcnow()
    with site.sessions.begin() as session:
        session.add(
            Delivery(
                job_id=job_id,
                destination="pacs",
                path="/results/seg.dcm",
                sop_instance_uid=generate_uid(),
                sop_class_uid=SegmentationStorage,
                state="pending",
                attempts=2,
                max_attempts=5,
                not_before=now,
                created_at=now,
                updated_at=now,
            )
        )
    _cli(site, "jobs", "cancel", str(job_id))
    shown = json.loads(_cli(site, "jobs", "show", str(job_id), "--json"))
    assert [d["state"] for d in shown["deliveries"]] == ["cancelled"]
    assert shown["timeline"][-1]["message"] == "by operator; 1 pending deliveries cancelled"


def test_studies_list_and_show_series_with_verdicts(site: Site):
    studies = json.loads(_cli(site, "studies", "list", "--json"))
    assert {s["study"] for s in studies} == set(site.studies.values())
    by_uid = {s["study"]: s for s in studies}
    running = by_uid[site.studies["running"]]
    assert running["instances"] == 5 and [j["id"] for j in running["jobs"]] == [site.jobs["running"]]
    assert [(s["modality"], s["instances"]) for s in running["series"]] == [("CT", 3), ("PT", 2)]
    assert _seconds(running["first_received"], running["last_received"]) == 1.0

    table = _rows(_cli(site, "studies", "list"))
    assert [row for row in table if row[0] == site.studies["failed"]][0][4] == f"{site.jobs['failed']} failed (run 1)"

    study = site.studies["succeeded"]
    shown = json.loads(_cli(site, "studies", "show", study, "--json"))
    series = {s["series_uid"]: s for s in shown["series"]}
    pet, ct = series[site.series[study]["PT"]], series[site.series[study]["CT"]]
    assert (pet["verdict"], pet["verdict_job"]) == ("used for channel PET", site.jobs["succeeded"])
    assert ct["verdict"] == "ignored because ImageType lacks AXIAL"
    assert [e["kind"] for e in shown["events"]] == ["study-received"]
    assert [j["state"] for j in shown["jobs"]] == ["succeeded"]

    rows = _rows(_cli(site, "studies", "show", study))
    assert [
        "2",
        "PT",
        "PT series",
        "2",
        pet["last_received"][:19].replace("T", " "),
        f"used for channel PET (job {site.jobs['succeeded']})",
    ] in rows
    assert "no study 1.2.999 in the index" in _cli(site, "studies", "show", "1.2.999", code=1)
    assert [
        s["verdict"] for s in json.loads(_cli(site, "studies", "show", site.studies["queued"], "--json"))["series"]
    ] == [None, None]


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.e2e
def test_status_reads_components_queue_disk_and_errors(site: Site):
    config, sessions = site.config, site.sessions
    heartbeat(sessions, "receiver", {"address": "127.0.0.1:11112"})  # this process: up
    long_ago = utcnow() - timedelta(minutes=10)
    with sessions.begin() as session:
        session.add(
            Component(
                name="worker",
                host=socket.gethostname(),
                pid=_dead_pid(),
                started_at=long_ago,
                last_seen_at=utcnow(),
                detail=json.dumps({"models": ["demo-petct"]}),
            )
        )
        session.add(
            Component(
                name="worker",
                host="gpu-2",
                pid=77,
                started_at=long_ago,
                last_seen_at=long_ago,
                detail=json.dumps({"models": ["demo-petct"]}),
            )
        )
    (config.spool_dir / "1.2.3").mkdir(parents=True)
    (config.spool_dir / "1.2.3" / "a.dcm").write_bytes(b"\0" * 12345)
    (config.results_dir / "1.2.3" / "job-1").mkdir(parents=True)
    (config.results_dir / "1.2.3" / "job-1" / "seg.dcm").write_bytes(b"\0" * 1000)

    result = CliRunner().invoke(cli.app, ["status", "--json", "--config", str(config.source)])
    assert result.exit_code == 1, result.output  # a worker of this host is down
    status = json.loads(result.output)
    parts = {(c["name"], c["host"]): c for c in status["components"]}
    receiver, local_worker, busy_worker = (
        parts["receiver", socket.gethostname()],
        parts["worker", socket.gethostname()],
        parts["worker", "gpu-2"],
    )
    assert (receiver["up"], receiver["pid"], receiver["detail"]) == (True, os.getpid(), {"address": "127.0.0.1:11112"})
    assert local_worker["up"] is False and "is not running" in local_worker["why"]
    assert busy_worker["up"] is True and busy_worker["why"].startswith(
        f"running job {site.jobs['running']}, lease renewed until"
    )
    assert status["models"] == [{"name": "demo-petct", "loaded_by": ["gpu-2:77"]}]
    assert status["queue"] == {state: 1 for state in list(JobState)}
    assert (status["oldest_waiting"]["job_id"], status["oldest_waiting"]["study_uid"]) == (
        site.jobs["queued"],
        site.studies["queued"],
    )
    disk = status["disk"]
    assert (disk["spool_bytes"], disk["results_bytes"]) == (12345, 1000)
    assert disk["database_bytes"] >= (config.node.data_dir / "dicomnode.db").stat().st_size > 0
    assert 0 < disk["free_bytes"] <= disk["total_bytes"]
    assert status["schema"] == head_revision()
    [error] = status["last_errors"]
    assert (error["kind"], error["job_id"], error["message"]) == (
        "failed",
        site.jobs["failed"],
        "cannot compute SUVbw: PatientWeight: missing",
    )

    table = _cli(site, "status", code=1)
    assert "gpu-2:77" in table and "12.3 kB" in table and "not running" in table and "queued 1" in table
    assert f"database schema: revision {head_revision()}" in table


def _status(config_path: Path) -> tuple[int, dict[str, dict]]:
    """`dicomnode status --json` as its own process: the exit code and the components by name."""
    result = subprocess.run(
        [sys.executable, "-m", "dicomnode", "status", "--json", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, {c["name"]: c for c in json.loads(result.stdout)["components"]}


@pytest.mark.e2e
def test_status_of_a_running_node_then_a_stopped_one(tmp_path: Path):
    """`dicomnode serve` says its receiver is up (pid, address); once stopped, status says so."""
    config_path = write_config(tmp_path)
    config = load_config(config_path)
    node = start_node(config_path, config.node.port, tmp_path / "node.log", extra_args=("--no-worker",))
    try:
        deadline = time.monotonic() + 30
        while (live := _status(config_path))[1]["receiver"]["why"] == "never seen" and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        assert node.stop() == 0
    code, parts = live
    assert code == 1  # no worker: serve --no-worker
    receiver = parts["receiver"]
    assert (receiver["up"], receiver["pid"]) == (True, node.process.pid)
    assert receiver["detail"] == {"ae_title": "TESTNODE", "address": f"127.0.0.1:{config.node.port}"}
    assert (parts["worker"]["up"], parts["worker"]["why"]) == (False, "never seen")
    code, parts = _status(config_path)
    assert code == 1 and parts["receiver"]["up"] is False
    assert parts["receiver"]["why"].startswith(f"process {node.process.pid} is not running")


def test_heartbeat_is_rate_limited_unless_the_detail_changes(site: Site):
    def row() -> Component:
        with site.sessions() as session:
            return session.scalar(select(Component).where(Component.name == "worker", Component.pid == os.getpid()))

    heartbeat(site.sessions, "worker", {"models": []}, every=60)
    first = row()
    heartbeat(site.sessions, "worker", {"models": []}, every=60)  # the same, within a minute: not written
    assert row().last_seen_at == first.last_seen_at
    heartbeat(site.sessions, "worker", {"models": ["demo-petct"]}, every=60)  # a model loaded: written at once
    assert row().last_seen_at > first.last_seen_at and json.loads(row().detail) == {"models": ["demo-petct"]}
    heartbeat(site.sessions, "worker")  # no detail: the last one kept
    assert json.loads(row().detail) == {"models": ["demo-petct"]} and row().started_at == first.started_at
