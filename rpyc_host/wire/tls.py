"""TLS contexts for both ends: TLS 1.2 or newer, certificates verified.

Usage::

    server_context("server.crt", "server.key", ca="clients-ca.crt")  # ca: require client certificates
    client_context(ca="ca.crt", cert="client.crt", key="client.key")  # cert/key: for mutual TLS
"""

from __future__ import annotations

import ssl


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """Serve with ``cert``/``key``; with ``ca``, clients must present a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """Verify the server against ``ca`` (or the system store); present ``cert``/``key`` when the
    server requires client certificates (mutual TLS)."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx
