"""ITI-20 transport: syslog (RFC 5424) messages to an Audit Record Repository.

Owns `syslog_message()` (the RFC 5424 header in front of an audit message: PRI 85 =
facility 10 security/authorization, severity 5 notice; MSGID IHE+RFC-3881; no structured
data; the XML as MSG), and two senders with one contract, `send(message)` that returns only
once the message is written and raises `OSError` otherwise:

- `TlsSender`: RFC 5425, octet-counting framing (`MSG-LEN SP SYSLOG-MSG`) over one kept-open
  mutual TLS connection (the gateway's [tls] certificate and CA bundle), reconnecting when the
  repository closed it; before each write it checks that the repository has not closed the
  connection (a syslog receiver never sends data, so anything readable is the end).
- `UdpSender`: RFC 5426, one message per datagram (no delivery guarantee by design).
"""

from __future__ import annotations

import datetime as dt
import os
import select
import socket
import ssl
from typing import Protocol

PRI = 85  # facility 10 (security/authorization) * 8 + severity 5 (notice)
MSGID = "IHE+RFC-3881"
NILVALUE = "-"
UDP_MAX_PAYLOAD = 65507

# Connection states (TlsSender.peer_state)
OPEN = "open"
CLOSED = "closed"
RESET = "reset"
NONE = "none"


class RecordTooLarge(ValueError):
    """A record that this transport can never carry (a UDP datagram holds 65,507 bytes)."""


def _field(value: str | None, limit: int) -> str:
    """A PRINTUSASCII header field (RFC 5424 6.2), NILVALUE when empty."""
    text = "".join(ch for ch in (value or "") if 33 <= ord(ch) <= 126)[:limit]
    return text or NILVALUE


def syslog_message(msg: bytes, *, hostname: str, app_name: str, procid: str | None = None,
                   timestamp: dt.datetime | None = None, msgid: str = MSGID) -> bytes:
    """One RFC 5424 SYSLOG-MSG carrying `msg` (UTF-8 XML) as its MSG part."""
    ts = (timestamp or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    header = (f"<{PRI}>1 {ts.isoformat(timespec='milliseconds').replace('+00:00', 'Z')} "
              f"{_field(hostname, 255)} {_field(app_name, 48)} "
              f"{_field(procid or str(os.getpid()), 128)} {_field(msgid, 32)} {NILVALUE} ")
    return header.encode("ascii") + msg


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 framing: MSG-LEN SP SYSLOG-MSG."""
    return str(len(message)).encode("ascii") + b" " + message


class Sender(Protocol):
    def send(self, message: bytes) -> None: ...

    def peer_state(self, wait: float = 0.0) -> str: ...

    def close(self) -> None: ...


class TlsSender:
    """RFC 5425 syslog over mutual TLS; one connection, reopened on demand."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, *,
                 server_hostname: str | None = None, timeout: float = 10.0,
                 settle_seconds: float = 0.1):
        self.host = host
        self.port = port
        self.context = context
        self.server_hostname = server_hostname or host
        self.timeout = timeout
        # With TLS 1.3 the repository rejects our certificate only after the client thinks
        # the handshake is done: wait this long for such a rejection before the first write.
        self.settle_seconds = settle_seconds
        self._sock: ssl.SSLSocket | None = None

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.context.wrap_socket(raw, server_hostname=self.server_hostname)
        except BaseException:
            raw.close()
            raise
        tls.settimeout(self.timeout)
        if self.settle_seconds > 0 and self._closed_by_peer(tls, wait=self.settle_seconds):
            tls.close()
            raise ConnectionRefusedError("the audit repository closed the TLS connection "
                                         "after the handshake (certificate not accepted?)")
        return tls

    def _closed_by_peer(self, sock: ssl.SSLSocket, wait: float = 0.0) -> bool:
        return self._state(sock, wait) != OPEN

    def _state(self, sock: ssl.SSLSocket, wait: float = 0.0) -> str:
        try:
            readable, _, _ = select.select([sock], [], [], wait)
        except (OSError, ValueError):
            return RESET
        if not readable and not sock.pending():
            return OPEN
        try:
            sock.settimeout(0)
            data = sock.recv(1)
        except ssl.SSLWantReadError:
            return OPEN  # a partial TLS record; not an end (yet)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return CLOSED
        except (OSError, ssl.SSLError):
            return RESET  # ECONNRESET: the repository dropped data it had not read
        finally:
            try:
                sock.settimeout(self.timeout)
            except OSError:
                pass
        # EOF after close_notify or FIN: everything sent was read. Data: a syslog receiver
        # never sends any; the state of what it read is unknown.
        return CLOSED if not data else RESET

    def peer_state(self, wait: float = 0.0) -> str:
        """OPEN (connected, nothing heard), CLOSED (the repository ended the connection in
        order: it read everything), RESET (it ended it with unread data discarded, or the
        state is unknown), or NONE (not connected)."""
        if self._sock is None:
            return NONE
        return self._state(self._sock, wait)

    def connected(self) -> bool:
        return self._sock is not None

    def send(self, message: bytes) -> None:
        sock = self._sock
        if sock is None:
            sock = self._sock = self._connect()
        try:
            sock.sendall(octet_counted(message))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


class UdpSender:
    """RFC 5426 syslog over UDP: one message per datagram."""

    def __init__(self, host: str, port: int):
        self.address = (host, port)
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        self._sock = socket.socket(info[0], socket.SOCK_DGRAM)
        self._target = info[4]

    def send(self, message: bytes) -> None:
        if len(message) > UDP_MAX_PAYLOAD:
            raise RecordTooLarge(f"audit message of {len(message)} bytes does not fit a "
                                 "datagram")
        self._sock.sendto(message, self._target)

    def peer_state(self, wait: float = 0.0) -> str:
        return OPEN  # nothing is ever known of a datagram

    def close(self) -> None:
        self._sock.close()
