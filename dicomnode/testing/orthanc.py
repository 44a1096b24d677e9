"""A throw-away local Orthanc PACS for the demo and the end-to-end tests.

Wraps the Debian ``Orthanc`` binary: writes a minimal configuration under a work directory,
starts the server on loopback ports (free ones by default), and talks to it over its REST
API with nothing but the standard library. Not imported by the node's runtime code.

    with LocalOrthanc(tmp_path / "pacs", modalities={"node": ("DICOMNODE", "127.0.0.1", 11112)}) as pacs:
        ids = pacs.upload(sorted(ct_dir.glob("*.dcm")))
        pacs.store_to_modality("node", ids)
        seg = pacs.wait_for_series(study_uid, "SEG", timeout=120)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dicomnode.testing.ports import free_port

__all__ = ["LocalOrthanc", "OrthancError", "orthanc_binary"]

# Where Debian puts the server (/usr/sbin is often not on a normal user's PATH).
_BINARY_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call failed."""


def orthanc_binary() -> str | None:
    """Path of the Orthanc server binary: $ORTHANC_BIN, then PATH, then the Debian locations."""
    env = os.environ.get("ORTHANC_BIN")
    if env and os.access(env, os.X_OK):
        return env
    found = shutil.which("Orthanc")
    if found:
        return found
    for cand in _BINARY_CANDIDATES:
        if os.access(cand, os.X_OK):
            return cand
    return None


# Debian's orthanc-dicomweb package (`make system-packages` installs it)
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

# Loopback traffic must never go through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LocalOrthanc:
    """One Orthanc server process with its own storage, index, configuration and log in ``workdir``.

    ``modalities`` maps a name to ``(AET, host, port)``; more can be added at run time with
    :meth:`add_modality`. ``config_overrides`` is merged last into the generated orthanc.json.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        dicom_port: int | None = None,
        http_port: int | None = None,
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        config_overrides: Mapping[str, Any] | None = None,
        binary: str | None = None,
        dicomweb: bool = False,
        basic_auth: tuple[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.aet = aet
        self.http_port = int(http_port) if http_port else free_port()
        port = int(dicom_port) if dicom_port else free_port()
        while port == self.http_port:
            port = free_port()
        self.dicom_port = port
        self.host = "127.0.0.1"
        self.url = f"http://{self.host}:{self.http_port}"
        self.modalities: dict[str, tuple[str, str, int]] = dict(modalities or {})
        self.config_overrides = dict(config_overrides or {})
        self.binary = binary
        self.dicomweb = dicomweb
        self.basic_auth = basic_auth  # (user, password): HTTP (REST, DICOMweb) asks for it; this wrapper sends it
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None

    # ------------------------------------------------------------------ lifecycle

    def config(self) -> dict[str, Any]:
        """The configuration written to orthanc.json."""
        cfg: dict[str, Any] = {
            "Name": self.aet,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [DICOMWEB_PLUGIN] if self.dicomweb else [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # HTTP answers loopback only
            "AuthenticationEnabled": self.basic_auth is not None,
            "RegisteredUsers": dict([self.basic_auth]) if self.basic_auth else {},
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {
                name: [m_aet, m_host, int(m_port)] for name, (m_aet, m_host, m_port) in self.modalities.items()
            },
            "DicomModalitiesInDatabase": False,
            # Close outgoing associations as soon as a C-STORE job is done (default: kept 5 s),
            # so a receiver sees a study arrive the way a modality would send it.
            "DicomAssociationCloseDelay": 0,
            "SaveJobs": False,
            "StorageCompression": False,
            "TcpNoDelay": True,
            "KeepAlive": True,
        }
        if self.dicomweb:  # Debian's orthanc-dicomweb: QIDO-RS, WADO-RS and STOW-RS under /dicom-web/
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}
        cfg.update(self.config_overrides)
        return cfg

    def start(self, timeout: float = 30) -> None:
        """Write orthanc.json, start the server, and wait until ``GET /system`` answers."""
        if self.running:
            return
        binary = self.binary or orthanc_binary()
        if binary is None:
            raise OrthancError("Orthanc binary not found (apt install orthanc, or set ORTHANC_BIN)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "storage").mkdir(exist_ok=True)
        (self.workdir / "index").mkdir(exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        env = dict(os.environ)
        env["TCP_NODELAY"] = "1"  # dcmtk (inside Orthanc) otherwise leaves Nagle on: ~45 ms/instance
        t0 = time.monotonic()
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [binary, str(self.config_path)],
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = t0 + timeout
        while True:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._cleanup()
                raise OrthancError(f"Orthanc exited with code {rc} during start-up:\n{self.log_tail()}")
            try:
                self.get("/system", timeout=2)
                break
            except (OSError, OrthancError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise OrthancError(f"Orthanc did not answer GET /system within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)
        self.startup_seconds = time.monotonic() - t0

    def terminate(self) -> None:
        """Ask the server to shut down (SIGTERM) without waiting; follow with :meth:`stop`.

        Orthanc takes 2-4 s to shut down, so stopping several servers goes faster as
        ``for s in servers: s.terminate()`` then ``for s in servers: s.stop()``.
        """
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 15 s). Safe to call more than once."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        self._cleanup()

    def _cleanup(self) -> None:
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def __enter__(self) -> "LocalOrthanc":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"LocalOrthanc(aet={self.aet!r}, dicom_port={self.dicom_port}, url={self.url!r}, {state})"

    # ------------------------------------------------------------------ REST plumbing

    @property
    def authorization(self) -> str:
        """The HTTP Authorization header's value for `basic_auth`."""
        import base64

        user, password = self.basic_auth or ("", "")
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict | list | None = None,
        *,
        content_type: str | None = None,
        timeout: float = 60,
        raw: bool = False,
    ) -> Any:
        """One REST call. JSON bodies are encoded; the answer is decoded from JSON unless ``raw``."""
        if isinstance(body, (dict, list)):
            data: bytes | None = json.dumps(body).encode()
            content_type = content_type or "application/json"
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        if self.basic_auth:
            req.add_header("Authorization", self.authorization)
        try:
            with _OPENER.open(req, timeout=timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise OrthancError(f"{method} {path} -> HTTP {e.code}: {detail}") from None
        if raw:
            return payload
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            return payload.decode(errors="replace")

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, b"" if body is None else body, **kw)

    def put(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("PUT", path, b"" if body is None else body, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)

    # ------------------------------------------------------------------ PACS operations

    def upload(self, paths: str | Path | Iterable[str | Path]) -> list[str]:
        """POST each file (directories: every file below them) to /instances; the Orthanc instance ids."""
        if isinstance(paths, (str, Path)):
            paths = [paths]
        files: list[Path] = []
        for p in paths:
            p = Path(p)
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
        ids = []
        for f in files:
            ans = self.post("/instances", f.read_bytes(), content_type="application/dicom")
            if not isinstance(ans, dict) or "ID" not in ans:
                raise OrthancError(f"upload of {f} failed: {ans!r}")
            ids.append(ans["ID"])
        return ids

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare (or replace) a remote DICOM modality under ``name``."""
        self.put(f"/modalities/{urllib.parse.quote(name)}", {"AET": aet, "Host": host, "Port": int(port)})
        self.modalities[name] = (aet, host, int(port))

    def store_to_modality(
        self, name: str, resources: str | list[str], synchronous: bool = True, timeout: float = 300
    ) -> dict:
        """C-STORE Orthanc resources (instance/series/study/patient ids) to a modality.

        Synchronous: Orthanc's summary (InstancesCount, FailedInstancesCount, ...).
        Asynchronous: the job reference ({"ID": ..., "Path": ...}).
        """
        if isinstance(resources, str):
            resources = [resources]
        return self.post(
            f"/modalities/{urllib.parse.quote(name)}/store",
            {"Resources": list(resources), "Synchronous": bool(synchronous)},
            timeout=timeout,
        )

    def echo(self, name: str, timeout: float = 10) -> bool:
        """C-ECHO the modality ``name`` from Orthanc; True when it answered."""
        try:
            self.post(f"/modalities/{urllib.parse.quote(name)}/echo", {"Timeout": int(timeout)}, timeout=timeout + 5)
            return True
        except OrthancError:
            return False

    def studies(self) -> list[str]:
        """Orthanc ids of all stored studies."""
        return list(self.get("/studies"))

    def find_study(self, study_instance_uid: str) -> str | None:
        """Orthanc id of the study with this StudyInstanceUID, or None."""
        hits = self.post("/tools/lookup", study_instance_uid) or []
        for hit in hits:
            if hit.get("Type") == "Study":
                return hit["ID"]
        return None

    def series_of_study(self, study_instance_uid: str) -> list[dict]:
        """The study's series as Orthanc describes them (ID, MainDicomTags, Instances, ...); [] if absent."""
        sid = self.find_study(study_instance_uid)
        if sid is None:
            return []
        return list(self.get(f"/studies/{sid}/series"))

    def instance_tags(self, instance_id: str) -> dict:
        """Simplified tags (keyword -> value) of one instance."""
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def download_instance(self, instance_id: str, dest: Path) -> Path:
        """Write the DICOM file of an instance to ``dest`` (a directory: ``dest/<id>.dcm``)."""
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / f"{instance_id}.dcm"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.get(f"/instances/{instance_id}/file", raw=True))
        return dest

    def wait_for_series(
        self, study_instance_uid: str, modality: str, timeout: float, poll: float = 0.5
    ) -> dict:
        """Poll until the study holds a series of ``modality``; that series' description.

        Raises TimeoutError naming what the study held at the end.
        """
        deadline = time.monotonic() + timeout
        seen: list[dict] = []
        while True:
            seen = self.series_of_study(study_instance_uid)
            for s in seen:
                if s.get("MainDicomTags", {}).get("Modality") == modality and s.get("Instances"):
                    return s
            if time.monotonic() >= deadline:
                break
            time.sleep(poll)
        if not seen:
            what = "the study is not in the PACS" if self.find_study(study_instance_uid) is None else "no series"
        else:
            what = ", ".join(
                f"{s.get('MainDicomTags', {}).get('Modality', '?')} "
                f"{s.get('MainDicomTags', {}).get('SeriesDescription', '')!r} "
                f"({len(s.get('Instances', []))} instances)"
                for s in seen
            )
        raise TimeoutError(
            f"no {modality} series in study {study_instance_uid} on {self.aet} after {timeout} s; seen: {what}"
        )
