"""HTTP to a DICOMweb peer (a STOW-RS destination, a QIDO-RS/WADO-RS source): the
Authorization header, read at each use from `authorization_file` or `authorization_env` and
never logged, and a requests session whose https is checked against the peer's `tls`
(`ca_certificates`, else the system's CA certificates; TLS 1.2 or later; our certificate when
given), not against requests' own certifi bundle."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

from dicomnode.config import Endpoint


class AuthorizationUnavailable(Exception):
    """The configured Authorization header cannot be read; the message names the file or variable."""


def authorization_source(endpoint: Endpoint) -> str:
    """Where the endpoint's Authorization header comes from, for messages (never the value)."""
    if endpoint.authorization_file is not None:
        return f"authorization_file {endpoint.authorization_file}"
    if endpoint.authorization_env is not None:
        return f"authorization_env {endpoint.authorization_env}"
    return "no authorization configured (authorization_file or authorization_env)"


def authorization(endpoint: Endpoint) -> str | None:
    """The endpoint's Authorization header value, read now; None when none is configured."""
    where = authorization_source(endpoint)
    if endpoint.authorization_file is not None:
        try:
            value = Path(endpoint.authorization_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or exc
            raise AuthorizationUnavailable(f"{where}: cannot read it ({why})") from None
    elif endpoint.authorization_env is not None:
        value = os.environ.get(endpoint.authorization_env)
        if value is None:
            raise AuthorizationUnavailable(f"{where}: not set in the node's environment")
    else:
        return None
    value = value.strip()
    if not value:
        raise AuthorizationUnavailable(f"{where}: empty")
    if any(c in value for c in "\r\n\0"):
        raise AuthorizationUnavailable(f"{where}: the header value must be one line")
    return value


def tls_context(endpoint: Endpoint) -> ssl.SSLContext:
    """The TLS context for an https peer: TLS 1.2 or later, the server checked against
    `tls.ca_certificates` or else the system's CA certificates, our certificate when given."""
    tls = endpoint.tls
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_certificates if tls else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls is not None and tls.certificate is not None:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context


class _TlsAdapter(HTTPAdapter):
    """requests with our SSLContext only (requests would add certifi's CA bundle to it)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def build_connection_pool_key_attributes(self, request, verify, cert=None) -> tuple[dict, dict]:  # noqa: ANN001
        host, pool = super().build_connection_pool_key_attributes(request, verify, cert)
        for key in ("ca_certs", "ca_cert_dir", "cert_file", "key_file"):
            pool.pop(key, None)
        pool["ssl_context"], pool["cert_reqs"] = self._context, "CERT_REQUIRED"
        return host, pool

    def cert_verify(self, conn, url, verify, cert) -> None:  # noqa: ANN001
        conn.cert_reqs, conn.ca_certs, conn.ca_cert_dir = "CERT_REQUIRED", None, None


def session_for(endpoint: Endpoint, authorization_value: str | None) -> requests.Session:
    session = requests.Session()
    session.headers["Accept"] = "application/dicom+json"
    if authorization_value is not None:
        session.headers["Authorization"] = authorization_value
    session.mount("https://", _TlsAdapter(tls_context(endpoint)))
    return session
