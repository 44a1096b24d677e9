"""A throwaway PostgreSQL server for the tests: Debian's postgresql package, a new cluster in a
temporary folder, listening on a free loopback port, stopped at the end of the session."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psycopg

from dicomnode.testing.ports import free_port

USER = "dicomnode"


def postgres_bin() -> Path | None:
    """The folder of the newest installed PostgreSQL's server programs (initdb, postgres)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    def __init__(self, folder: Path) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql; `make system-packages`)")
        self.port = free_port()
        data = folder / "data"
        data.mkdir(parents=True)
        as_owner: dict = {}
        if os.geteuid() == 0:  # the server refuses to run as root: run it as Debian's postgres user
            shutil.chown(folder, "postgres")
            shutil.chown(data, "postgres")
            as_owner = {"user": "postgres", "group": "postgres", "cwd": folder}
        initdb = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "--encoding=UTF8", "--no-sync"],
            capture_output=True,
            text=True,
            **as_owner,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed ({initdb.returncode}): {initdb.stderr.strip()}")
        self._command = [
            str(bin_dir / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(folder),
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=100",
        ]  # fsync off: a test cluster, thrown away; the socket directory is the cluster's own folder
        self._folder, self._as_owner = folder, as_owner
        self.start()

    def start(self) -> None:
        """Start the server (again, after stop: same cluster, same port)."""
        self._process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL,
                                         stderr=open(self._folder / "server.log", "ab"), **self._as_owner)
        try:
            self._wait_ready(self._folder / "server.log")
        except RuntimeError:
            self.stop()
            raise

    def _wait_ready(self, log: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited: {log.read_text(errors='replace')[-2000:]}")
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                time.sleep(0.2)
        raise RuntimeError(f"PostgreSQL did not start in {timeout} s: {log.read_text(errors='replace')[-2000:]}")

    def dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={USER} dbname={database}"

    def new_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        name = f"node_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{name}"

    def stop(self, fast: bool = False) -> None:
        """Stop the server: smart shutdown (waits for clients), or fast (disconnects them, as a
        restart of the database server does)."""
        if fast:
            self._process.send_signal(signal.SIGINT)
        else:
            self._process.terminate()  # SIGTERM: PostgreSQL's smart shutdown
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
