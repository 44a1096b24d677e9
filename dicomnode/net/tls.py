"""Small pieces shared by the node's DICOM server and client sides: TCP_NODELAY, and the TLS
contexts of DICOM TLS (TLS 1.2 or later, certificates from the config)."""

from __future__ import annotations

import socket
import ssl

from pynetdicom import evt

from dicomnode.config import Destination, DestinationTls, ReceiverTls, Source


def _set_nodelay(event) -> None:  # noqa: ANN001 - pynetdicom event
    """Turn Nagle off: without it every C-STORE response waits ~40 ms for a delayed ACK."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NODELAY_HANDLER = (evt.EVT_CONN_OPEN, _set_nodelay)


class _HandshakeInAssociation(ssl.SSLContext):
    """pynetdicom wraps each accepted socket in its one accepting thread; a handshake there
    would let one silent client stop every other association. Deferred, the handshake runs
    in the association's own thread on its first read."""

    def wrap_socket(self, sock, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_tls_context(tls: ReceiverTls) -> ssl.SSLContext:
    context = _HandshakeInAssociation(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates is not None:
        context.load_verify_locations(tls.ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


def client_tls_args(destination: Destination | Source) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's `tls_args` for associating with `destination` (or a fetch source); None without TLS."""
    tls: DestinationTls | None = destination.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_certificates)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certificate is not None:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context, tls.server_name or destination.host
