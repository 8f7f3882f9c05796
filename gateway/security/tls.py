"""The TLS policy of every connection the gateway makes or accepts (ATNA ITI-19 node auth).

Policy (BCP195, RFC 9325): TLS 1.2 minimum, 1.3 allowed; for TLS 1.2 only ECDHE key exchange
with AEAD ciphers (AES-GCM, ChaCha20-Poly1305) - no CBC, no RSA key transport, no SHA-1 MACs;
TLS 1.3 keeps OpenSSL's suites, which are all AEAD. No compression, no renegotiation, a fresh
ECDHE key per handshake, the server's cipher order wins.

`server_context` builds the listening side from `[tls]` (client certificates required when
`require_client_certificate`), `client_context` the outbound side (server certificate and host
name always checked, our client certificate presented when given), `peer_subject` names the
authenticated peer as an RFC 4514 string (`CN=...,O=...`).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509

from gateway.config import TlsConfig

# TLS 1.2 suites (OpenSSL names), ECDSA and RSA server keys, strongest first.
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
))


_Context = TypeVar("_Context", bound=ssl.SSLContext)


def _apply_policy(ctx: _Context) -> _Context:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    ctx.set_ciphers(TLS12_CIPHERS)  # TLS 1.3 suites are set apart and are AEAD already
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE
                    | ssl.OP_CIPHER_SERVER_PREFERENCE)
    return ctx


class HandshakeTimeoutContext(ssl.SSLContext):
    """A server context whose `wrap_socket` completes the handshake within a time limit.

    A worker thread wraps each accepted socket; a peer that sends part of a ClientHello and
    then nothing would otherwise hold that thread for ever (a handful of such connections
    would stop a server of few threads). The handshake runs at once with a socket timeout; a
    peer that is too slow gets `ssl.SSLError(SSL_ERROR_EOF)` (servers close such connections
    quietly) and the socket is blocking again afterwards, as the server expects.
    """

    handshake_timeout: float = 5.0

    def wrap_socket(self, sock: socket.socket, server_side: bool = False,
                    do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
                    server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        if not server_side:
            return super().wrap_socket(sock, server_side, do_handshake_on_connect,
                                       suppress_ragged_eofs, server_hostname, session)
        sock.settimeout(self.handshake_timeout)
        tls = super().wrap_socket(sock, server_side=True, do_handshake_on_connect=False,
                                  suppress_ragged_eofs=suppress_ragged_eofs)
        try:
            tls.do_handshake()
        except ssl.SSLError:
            _close_after_alert(tls)
            raise
        except OSError as exc:  # TimeoutError, a reset: the peer went away or stalled
            tls.close()
            raise ssl.SSLError(ssl.SSL_ERROR_EOF, f"TLS handshake not completed: {exc}") \
                from exc
        tls.settimeout(None)
        return tls


def _close_after_alert(tls: ssl.SSLSocket, linger: float = 0.5) -> None:
    """Close a connection whose handshake failed so that the peer still reads our alert.

    With TLS 1.3 the client may already have sent its request; closing with those bytes
    unread makes the kernel send a reset that can overtake the alert, and the client then
    sees "EOF" instead of "unknown ca" or "certificate expired". So: stop writing, drain
    what the peer sent (briefly, at the TCP level), then close.
    """
    try:
        socket.socket.shutdown(tls, socket.SHUT_WR)
        tls.settimeout(linger)
        deadline = time.monotonic() + linger
        while time.monotonic() < deadline and socket.socket.recv(tls, 65536):
            pass
    except OSError:
        pass
    finally:
        tls.close()


def server_context(tls: TlsConfig, *, handshake_timeout: float = 5.0) -> ssl.SSLContext:
    """The listening TLS context for `[tls]`.

    Client certificates are required (CERT_REQUIRED) when `require_client_certificate`;
    otherwise they are verified when offered and a CA bundle is configured (CERT_OPTIONAL), or
    not asked for at all (CERT_NONE). `wrap_socket(..., server_side=True)` on the result
    completes the handshake within `handshake_timeout` seconds (see HandshakeTimeoutContext).
    """
    if tls.certificate is None or tls.private_key is None:
        raise ValueError("[tls] certificate and private_key are required to serve TLS")
    if tls.require_client_certificate and tls.ca_bundle is None:
        raise ValueError("[tls] ca_bundle: required when client certificates are required")
    ctx = _apply_policy(HandshakeTimeoutContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.handshake_timeout = handshake_timeout
    ctx.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.private_key))
    if tls.ca_bundle is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_bundle))
    if tls.require_client_certificate:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_bundle is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(ca_bundle: Path | None, certificate: Path | None = None,
                   private_key: Path | None = None) -> ssl.SSLContext:
    """An outbound TLS context: verifies the server against `ca_bundle` (the system store
    when None) and its host name, and presents `certificate`/`private_key` when given."""
    ctx = _apply_policy(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if ca_bundle is not None:
        ctx.load_verify_locations(cafile=str(ca_bundle))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if certificate is not None:
        ctx.load_cert_chain(certfile=str(certificate),
                            keyfile=str(private_key) if private_key is not None else None)
    elif private_key is not None:
        raise ValueError("client_context: a private key without a certificate")
    return ctx


# Python's getpeercert() attribute names -> RFC 4514 short names (others stay as Python names).
_SHORT_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
    "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID",
}


def _escape(value: str) -> str:
    """RFC 4514 section 2.4 escaping of an attribute value."""
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        elif ch == "\x00":
            out.append("\\00")
        else:
            out.append(ch)
    return "".join(out)


def subject_from_cert_dict(cert: Mapping[str, Any]) -> str | None:
    """RFC 4514 subject string of a `getpeercert()` dictionary (most specific RDN first)."""
    rdns = cert.get("subject")
    if not rdns:
        return None
    parts = []
    for rdn in reversed(rdns):
        parts.append("+".join(f"{_SHORT_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(parts)


def peer_subject(peer: ssl.SSLSocket | Mapping[str, Any] | None) -> str | None:
    """The RFC 4514 subject of a TLS peer's certificate, or None when it presented none.

    `peer` is a connected `ssl.SSLSocket` (the certificate is read from its DER form, so the
    string is the one `cryptography` gives, e.g. `CN=xdsi-gateway dev client,O=...`) or a
    `getpeercert()` dictionary.
    """
    if peer is None:
        return None
    if isinstance(peer, ssl.SSLSocket):
        try:
            der = peer.getpeercert(binary_form=True)
        except (ValueError, OSError):  # not connected / handshake not done
            return None
        if not der:
            return None
        return x509.load_der_x509_certificate(der).subject.rfc4514_string() or None
    return subject_from_cert_dict(peer)
