"""A JSON POST to a `[[notify]]` webhook (requests): the Authorization header read at each send
from `authorization_file` or `authorization_env` (dicomnode.net.web, never logged), https checked
against the target's `tls` (else the system's CA certificates), one try per call with the
target's timeout; the caller (dicomnode.pipeline.notify) keeps the retry state."""

from __future__ import annotations

from dataclasses import dataclass

import requests

from dicomnode.config import NotifyTarget
from dicomnode.net.web import AuthorizationUnavailable, authorization, session_for


@dataclass(frozen=True)
class Told:
    """What one try to tell a target did: `ok`, else `error` and whether trying again is pointless
    (`permanent`: a 4xx answer other than 408 and 429, or an ACK with AR)."""

    ok: bool
    detail: str  # "HTTP 204", "ACK AA (message 2612345...)", or the error
    permanent: bool = False

    @property
    def error(self) -> str | None:
        return None if self.ok else self.detail


def post_json(target: NotifyTarget, body: str, notification_id: int) -> Told:
    """POST `body` (JSON text) to the target's url once. The Idempotency-Key header is the
    notification's id and the target's name: a receiver that saw it already may drop the repeat
    (a try whose answer was lost is sent again)."""
    try:
        header = authorization(target)
    except AuthorizationUnavailable as exc:
        return Told(False, str(exc))
    session = session_for(target, header)
    session.headers["Accept"] = "application/json"
    headers = {**target.headers, "Content-Type": "application/json",
               "Idempotency-Key": f"dicomnode-{notification_id}-{target.name}"}
    try:
        with session:
            answer = session.post(target.url, data=body.encode(), headers=headers,
                                  timeout=(target.timeout_seconds, target.timeout_seconds))
    except requests.Timeout:
        return Told(False, f"no answer from {target.url} within {target.timeout_seconds:g} s (timeout_seconds)")
    except requests.RequestException as exc:
        return Told(False, f"{target.url} not reached: {type(exc).__name__}: {_first_line(exc)}")
    if 200 <= answer.status_code < 300:
        return Told(True, f"HTTP {answer.status_code}")
    permanent = 400 <= answer.status_code < 500 and answer.status_code not in (408, 429)
    text = answer.text.strip().splitlines()[0][:200] if answer.text.strip() else ""
    return Told(False, f"{target.url} answered HTTP {answer.status_code} {answer.reason or ''}".rstrip()
                + (f": {text}" if text else ""), permanent)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""
