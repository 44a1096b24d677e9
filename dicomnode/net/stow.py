"""STOW-RS: result files to a DICOMweb destination (dicomweb-client), instance by instance,
with the same outcomes as the C-STORE sender (dicomnode.net.sender.Outcome), so the
pipeline's deliveries treat both alike and keep the retry state (none is kept here).

Each instance goes in its own POST to {url}/studies, so every HTTP answer belongs to one
instance. How an answer maps (PS3.18 10.5.3):

    200, or 202 with the instance in ReferencedSOPSequence   stored (a WarningReason is its status)
    200/202/409 with the instance in FailedSOPSequence       its FailureReason read as a C-STORE
        status: 0x0122 (SOP class not supported) for good, the SOP class refused (the
        destination's fallback is sent instead); 0x0124 and 0xA9xx for good; 0xC122 (transfer
        syntax not supported) sent again at once decompressed, same SOP Instance UID; the rest
        (0x0110, 0xA7xx, 0xCxxx) transient under 200/202; under 409 (none stored) only 0xA7xx
        (out of resources) is transient
    401, 403                                                 for good, the reason naming authorization
    409 and other 4xx (400, 413, 415 ...)                    for good
    408, 429, 5xx, no answer, connection lost                transient: sent again (same file, same
                                                             SOP Instance UID; the server keeps one)
    server not reached (refused, TLS handshake failed)       transient, the files after it not tried

The Authorization header value (dicomnode.net.web: from `authorization_file` or
`authorization_env`) is read at each send, so a rotated token needs no restart, and is never
logged nor put in a message.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from xml.etree.ElementTree import ParseError

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomnode.config import Destination
from dicomnode.net.sender import Outcome, SendError, uncompressed
from dicomnode.net.status import NOT_AUTHORIZED, SOP_CLASS_NOT_SUPPORTED, is_permanent
from dicomnode.net.web import AuthorizationUnavailable, authorization, authorization_source, session_for

log = logging.getLogger("dicomnode.sender")  # one log name for both transports: journald filters keep working

TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
PROCESSING_FAILURE = 0x0110
FAILURE_REASONS = {
    PROCESSING_FAILURE: "processing failure",
    SOP_CLASS_NOT_SUPPORTED: "SOP class not supported",
    NOT_AUTHORIZED: "not authorized",
    TRANSFER_SYNTAX_NOT_SUPPORTED: "transfer syntax not supported",
}
NO_CHUNKS = 1 << 30  # dicomweb-client sends a body larger than its chunk size chunked; some servers refuse that


# ---------------------------------------------------------------- what an answer means


@dataclass(frozen=True)
class Answer:
    """What one STOW-RS request did for one instance."""

    stored: bool
    status: int | None  # the DICOM status: 0x0000 or a WarningReason when stored, else the FailureReason (None: none)
    what: str  # "HTTP 409 Conflict, FailureReason 0x0122 (SOP class not supported)", "connection refused", ...
    permanent: bool = False
    sop_class_refused: bool = False
    syntax_refused: bool = False  # 0xC122: the same object uncompressed may pass
    reached: bool = True  # False: the request never reached the server (nothing sent)


def _item_for(response: Dataset | None, keyword: str, sop_instance_uid: str) -> Dataset | None:
    for item in getattr(response, keyword, None) or []:
        if str(getattr(item, "ReferencedSOPInstanceUID", "")) == sop_instance_uid:
            return item
    return None


def _reason_text(code: int) -> str:
    if code in FAILURE_REASONS:
        return FAILURE_REASONS[code]
    if 0xA700 <= code <= 0xA7FF:
        return "out of resources"
    if 0xA900 <= code <= 0xA9FF:
        return "data set does not match SOP class"
    if 0xC000 <= code <= 0xCFFF:
        return "cannot understand"
    return "failure"


def classify(
    http_status: int, response: Dataset | None, sop_instance_uid: str, authorization_from: str = ""
) -> Answer:
    """The outcome of a STOW-RS answer (HTTP status and the response data set, when there is
    one) for the instance `sop_instance_uid` that the request carried."""
    try:
        phrase = HTTPStatus(http_status).phrase
    except ValueError:
        phrase = ""
    head = f"HTTP {http_status} {phrase}".rstrip()
    failed = _item_for(response, "FailedSOPSequence", sop_instance_uid)
    code = int(failed.FailureReason) if failed is not None and "FailureReason" in failed else None
    if failed is not None:
        what = f"{head}, FailureReason 0x{code:04X} ({_reason_text(code)})" if code is not None else f"{head}, failed"
        if 200 <= http_status < 300:
            permanent = code is not None and is_permanent(code)
        else:
            permanent = not (code is not None and 0xA700 <= code <= 0xA7FF)
        return Answer(False, code, what, permanent and code != TRANSFER_SYNTAX_NOT_SUPPORTED,
                      sop_class_refused=code == SOP_CLASS_NOT_SUPPORTED,
                      syntax_refused=code == TRANSFER_SYNTAX_NOT_SUPPORTED)
    if 200 <= http_status < 300:
        stored = _item_for(response, "ReferencedSOPSequence", sop_instance_uid)
        if stored is not None or http_status == HTTPStatus.OK:
            warning = int(stored.WarningReason) if stored is not None and "WarningReason" in stored else 0
            return Answer(True, warning, head if not warning else f"{head}, WarningReason 0x{warning:04X}")
        return Answer(False, None, f"{head} without this instance in the response")
    if http_status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
        return Answer(False, None, f"{head}: authorization refused by the server ({authorization_from})",
                      permanent=True)
    if http_status in (HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS) or http_status >= 500:
        return Answer(False, None, head)
    if 400 <= http_status < 500:
        return Answer(False, None, head, permanent=True)
    return Answer(False, None, f"{head}: not a STOW-RS answer")


def _cause(exc: BaseException, kind: type) -> BaseException | None:
    """The first exception of `kind` in `exc`'s chain (causes, contexts, urllib3's reasons, arguments)."""
    todo, seen = [exc], set()
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        todo.extend([current.__cause__, current.__context__, getattr(current, "reason", None)])
        todo.extend(a for a in getattr(current, "args", ()) if isinstance(a, BaseException))
    return None


def connection_answer(exc: requests.RequestException, timeout: float) -> Answer:
    """A request that got no HTTP answer: never reached the server, or its answer was lost."""
    from urllib3.exceptions import NewConnectionError, ProtocolError

    if isinstance(exc, requests.exceptions.SSLError):
        cause = _cause(exc, ssl.SSLError)
        why = getattr(cause, "verify_message", None) or getattr(cause, "reason", None) or str(cause or exc)
        return Answer(False, None, f"TLS handshake failed: {why}", reached=False)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return Answer(False, None, f"no connection within {timeout:g} s", reached=False)
    if isinstance(exc, requests.exceptions.Timeout):
        return Answer(False, None, f"no response within {timeout:g} s")
    refused = _cause(exc, NewConnectionError)
    if refused is not None:
        os_error = _cause(refused, OSError)
        why = getattr(os_error, "strerror", None) or str(refused).rpartition(": ")[2]
        return Answer(False, None, f"cannot connect: {why}", reached=False)
    lost = _cause(exc, ProtocolError)
    return Answer(False, None, f"connection lost: {lost.args[0] if lost is not None and lost.args else exc}")


def _response_dataset(response: requests.Response) -> Dataset | None:
    """The STOW-RS response data set of an error answer, None when it has none. We ask for JSON
    (Accept: application/dicom+json); an XML body is not read, its HTTP status alone counts."""
    kind = response.headers.get("Content-Type", "").split(";")[0].strip()
    if kind not in ("application/dicom+json", "application/json"):
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


# ---------------------------------------------------------------- sending


def store_each(
    destination: Destination,
    paths: list[Path],
    timeout: float = 30.0,
    tries_per_instance: int | Mapping[Path, int] = 3,
    on_sent: Callable[[Outcome], None] | None = None,  # called with each file's outcome as it is known
) -> list[Outcome]:
    """STOW-RS every file (in order), one POST each, and say per file whether the destination
    stored it (dicomnode.net.sender.store_each's contract): never raises for a network problem;
    a transient failure is sent again, up to `tries_per_instance` requests per file; a server
    not reached ends the pass with that reason for every file left."""
    datasets = {Path(p): dcmread(p) for p in paths}
    outcomes: dict[Path, Outcome] = {}

    def done(path: Path, tries: int, status: int | None, error: str | None = None, permanent: bool = False,
             history: tuple[str, ...] = (), sop_class_refused: bool = False) -> None:
        ds = datasets[path]
        outcomes[path] = Outcome(path, str(ds.SOPInstanceUID), str(ds.SOPClassUID), tries, status, error, permanent,
                                 history, sop_class_refused)
        if on_sent is not None:
            on_sent(outcomes[path])

    def _send_one(path: Path, allowed: int) -> bool:
        """Send one file until stored, refused for good or out of tries; False: the server was not reached."""
        ds, tries, history, decompressed = datasets[path], 0, [], False
        while True:
            tries += 1
            answer = _post(client, ds, answered, timeout, authorization_source(destination))
            if answer.stored:
                done(path, tries, answer.status, history=tuple(history))
                return True
            log.warning("%s: %s of %s: %s (try %d)", destination.name, stow, ds.SOPInstanceUID, answer.what, tries)
            if not answer.reached:  # nothing sent: no try
                done(path, tries - 1, None, f"{stow}: {answer.what}", history=tuple(history))
                return False
            history.append(answer.what)
            if answer.syntax_refused and not decompressed and UID(ds.file_meta.TransferSyntaxUID).is_compressed:
                try:
                    ds = datasets[path] = uncompressed(ds)
                except (RuntimeError, ValueError, NotImplementedError) as exc:
                    done(path, tries, answer.status, f"refused: {answer.what}; cannot decompress: {exc}",
                         permanent=True, history=tuple(history))
                    return True
                decompressed, allowed = True, max(allowed, tries + 1)  # one more try, uncompressed
                continue
            if answer.permanent or answer.syntax_refused:
                done(path, tries, answer.status, f"refused: {answer.what}", permanent=True, history=tuple(history),
                     sop_class_refused=answer.sop_class_refused)
                return True
            if tries >= allowed:
                done(path, tries, answer.status, f"{answer.what} after {tries} {'try' if tries == 1 else 'tries'}",
                     history=tuple(history))
                return True

    try:
        session = session_for(destination, authorization(destination))
    except (AuthorizationUnavailable, OSError, ssl.SSLError) as exc:
        why = exc if isinstance(exc, AuthorizationUnavailable) else f"TLS settings: {exc}"
        for path in datasets:
            done(path, 0, None, f"not sent: {why}")
        return [outcomes[p] for p in datasets]
    answered: list[requests.Response] = []
    client = DICOMwebClient(destination.url.rstrip("/"), session=session, timeout=timeout, chunk_size=NO_CHUNKS,
                            callback=lambda response, *_a, **_k: answered.append(response) or response)
    client.set_http_retry_params(retry=False)  # the retries are ours (here and in pipeline.delivery)
    stow = f"STOW-RS to {destination.url}"
    try:
        for path in datasets:
            budget = tries_per_instance.get(path, 3) if isinstance(tries_per_instance, Mapping) else tries_per_instance
            if budget <= 0:
                done(path, 0, None, "not sent: no tries left")
                continue
            if not _send_one(path, budget):
                for rest in datasets:  # the server was not reached: the files left wait for the next pass
                    if rest not in outcomes:
                        done(rest, 0, None, outcomes[path].error)
                break
    finally:
        session.close()
    return [outcomes[p] for p in datasets]


def _post(client: DICOMwebClient, ds: Dataset, answered: list, timeout: float, authorization_from: str) -> Answer:
    """One STOW-RS request carrying `ds`, and what it did."""
    uid = str(ds.SOPInstanceUID)
    answered.clear()
    try:
        response = client.store_instances([ds])
    except requests.HTTPError as exc:
        return classify(exc.response.status_code, _response_dataset(exc.response), uid, authorization_from)
    except requests.RequestException as exc:
        if answered:  # an answer came, with a body that could not be read
            return classify(answered[-1].status_code, None, uid, authorization_from)
        return connection_answer(exc, timeout)
    except (ValueError, ParseError):  # a 200/202 answer whose body is no STOW-RS response
        return classify(answered[-1].status_code if answered else 202, None, uid, authorization_from)
    return classify(answered[-1].status_code if answered else 200, response, uid, authorization_from)


def check(destination: Destination, timeout: float = 10.0) -> str:
    """A QIDO-RS search (one study) on the destination, with its authorization and TLS: what
    `dicomnode echo` does for a DICOMweb destination. Returns the HTTP status line; raises
    SendError saying why when the server did not answer 200 or 204."""
    try:
        session = session_for(destination, authorization(destination))
    except AuthorizationUnavailable as exc:
        raise SendError(f"{destination.name}: {exc}") from None
    with session:
        try:
            response = session.get(f"{destination.url.rstrip('/')}/studies", params={"limit": 1}, timeout=timeout)
        except requests.RequestException as exc:
            why = connection_answer(exc, timeout).what
            raise SendError(f"{destination.name}: QIDO-RS to {destination.url}: {why}") from None
    line = f"HTTP {response.status_code} {response.reason}"
    if response.status_code in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
        line += f": authorization refused by the server ({authorization_source(destination)})"
    if response.status_code not in (HTTPStatus.OK, HTTPStatus.NO_CONTENT):
        raise SendError(f"{destination.name}: QIDO-RS to {destination.url}: {line}")
    return line
