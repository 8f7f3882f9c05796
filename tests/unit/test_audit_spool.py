"""The audit spool, the syslog framing and the forwarder, with a local TLS/UDP receiver
(gateway.security.audit.spool, .transport, .service)."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.security.audit.service import Forwarder
from gateway.security.audit.spool import AuditSpool, SenderLock
from gateway.security.audit.transport import (
    CLOSED,
    OPEN,
    RecordTooLarge,
    TlsSender,
    UdpSender,
    octet_counted,
    syslog_message,
)
from gateway.security.pki import DevPki, create_dev_pki
from gateway.security.tls import client_context

PATIENT = "SECRET-PATIENT-4711"


# --- spool --------------------------------------------------------------------------------------

def test_spool_keeps_order_and_survives_reopening(tmp_path: Path) -> None:
    spool = AuditSpool(tmp_path)
    for i in range(5):
        assert spool.append(f"record {i}".encode())
    first = spool.oldest(2)
    assert [p for _, p in first] == [b"record 0", b"record 1"]
    spool.remove(first[0][0])
    spool.close()
    again = AuditSpool(tmp_path)  # a restart: what was left is still there, in order
    assert [p for _, p in again.oldest(10)] == [f"record {i}".encode() for i in range(1, 5)]
    assert again.count() == 4 and again.size() == 4 * len(b"record 0")
    ids = [i for i, _ in again.oldest(10)]
    assert [p for _, p in again.after(ids[1], 10)] == [b"record 3", b"record 4"]
    again.remove_many(ids[:3])
    assert [p for _, p in again.oldest(10)] == [b"record 4"]
    assert again.count() == 1


def test_spool_is_bounded_by_records_and_bytes(tmp_path: Path) -> None:
    spool = AuditSpool(tmp_path / "a", max_records=3)
    assert all(spool.append(b"x") for _ in range(3))
    assert not spool.append(b"x")
    spool.remove(spool.oldest(1)[0][0])
    assert spool.append(b"x")
    by_size = AuditSpool(tmp_path / "b", max_bytes=10)
    assert by_size.append(b"123456")
    assert not by_size.append(b"123456")
    assert by_size.append(b"1234")


def test_appends_from_two_processes_are_all_kept(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; "
            "from gateway.security.audit.spool import AuditSpool; "
            "s = AuditSpool(Path(sys.argv[1])); "
            "[s.append(f'{sys.argv[2]}-{i}'.encode()) for i in range(50)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), tag])
             for tag in ("a", "b")]
    assert all(p.wait(60) == 0 for p in procs)
    payloads = [p.decode() for _, p in AuditSpool(tmp_path).oldest(1000)]
    assert len(payloads) == 100
    for tag in ("a", "b"):  # each writer's records in its own order
        assert [p for p in payloads if p.startswith(tag)] == [f"{tag}-{i}" for i in range(50)]


def test_one_sender_lock_holder_at_a_time(tmp_path: Path) -> None:
    a, b = SenderLock(tmp_path), SenderLock(tmp_path)
    assert a.try_acquire() and a.held
    assert not b.try_acquire()
    a.release()
    assert b.try_acquire()
    b.release()


# --- syslog framing ---------------------------------------------------------------------------

def test_rfc5424_header_and_octet_counting() -> None:
    ts = dt.datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=dt.UTC)
    msg = syslog_message(b"<AuditMessage/>", hostname="gw 1", app_name="xdsi-gateway",
                         procid="77", timestamp=ts)
    assert msg == (b"<85>1 2026-03-04T05:06:07.890Z gw1 xdsi-gateway 77 IHE+RFC-3881 - "
                   b"<AuditMessage/>")
    assert octet_counted(msg) == str(len(msg)).encode() + b" " + msg
    assert syslog_message(b"x", hostname="", app_name="a").split(b" ")[2] == b"-"


# --- a local TLS syslog receiver ------------------------------------------------------------------

class Receiver:
    """A minimal RFC 5425 receiver: mutual TLS, octet-counted frames, one thread."""

    def __init__(self, pki: DevPki):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pki.server_cert, pki.server_key)
        self.ctx.load_verify_locations(pki.ca_cert)
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.messages: list[bytes] = []
        self.peers: list[str] = []
        self.close_after: int | None = None  # close each connection after N messages
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                tls = self.ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError):
                raw.close()
                continue
            cert = tls.getpeercert() or {}
            self.peers.append(str(cert.get("subject")))
            self._read(tls)

    def _read(self, tls: ssl.SSLSocket) -> None:
        buf = b""
        count = 0
        with tls:
            while True:
                while b" " in buf:
                    size, _, rest = buf.partition(b" ")
                    if len(rest) < int(size):
                        break
                    self.messages.append(rest[:int(size)])
                    buf = rest[int(size):]
                    count += 1
                    if self.close_after is not None and count >= self.close_after:
                        try:
                            tls.unwrap()  # close_notify: an orderly end
                        except (ssl.SSLError, OSError):
                            pass
                        return
                try:
                    data = tls.recv(65536)
                except (ssl.SSLError, OSError):
                    return
                if not data:
                    return
                buf += data

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return create_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def receiver(pki: DevPki) -> Iterator[Receiver]:
    r = Receiver(pki)
    yield r
    r.close()


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def tls_sender(pki: DevPki, port: int, *, with_certificate: bool = True) -> TlsSender:
    # The client certificate: Python's TLS server (unlike rsyslog's gnutls) insists on the
    # clientAuth extended key usage, which the development server certificate lacks.
    ctx = client_context(pki.ca_cert, pki.client_cert if with_certificate else None,
                         pki.client_key if with_certificate else None)
    return TlsSender("127.0.0.1", port, ctx, server_hostname="localhost", timeout=5)


def test_tls_sender_frames_and_presents_the_node_certificate(pki: DevPki,
                                                             receiver: Receiver) -> None:
    sender = tls_sender(pki, receiver.port)
    sender.send(b"first")
    sender.send(b"second message")
    assert wait_until(lambda: len(receiver.messages) == 2)
    assert receiver.messages == [b"first", b"second message"]
    assert "client" in receiver.peers[0]
    assert sender.peer_state() == OPEN
    sender.close()


def test_tls_sender_without_a_certificate_is_refused(pki: DevPki, receiver: Receiver) -> None:
    sender = tls_sender(pki, receiver.port, with_certificate=False)
    with pytest.raises(OSError):
        sender.send(b"nobody")
    assert receiver.messages == []


def test_closed_connection_is_seen_and_replaced(pki: DevPki, receiver: Receiver) -> None:
    receiver.close_after = 1
    sender = tls_sender(pki, receiver.port)
    sender.send(b"one")
    assert wait_until(lambda: sender.peer_state() == CLOSED, 5)
    receiver.close_after = None
    sender.close()
    sender.send(b"two")
    assert wait_until(lambda: receiver.messages == [b"one", b"two"])


def test_udp_sender_sends_one_datagram_per_message() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        sender = UdpSender("127.0.0.1", server.getsockname()[1])
        sender.send(b"<85>1 - - - - - - hello")
        assert server.recv(65535) == b"<85>1 - - - - - - hello"
        with pytest.raises(RecordTooLarge):
            sender.send(b"x" * 70000)
        sender.close()


# --- the forwarder ------------------------------------------------------------------------------

def test_forwarder_drains_in_order_and_waits_out_an_outage(
        pki: DevPki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.audit")
    spool = AuditSpool(tmp_path)
    for i in range(10):
        spool.append(f"{PATIENT} record {i}".encode())
    port_holder = socket.socket()
    port_holder.bind(("127.0.0.1", 0))
    port = port_holder.getsockname()[1]
    port_holder.close()  # nothing listens there yet: the repository is down
    fw = Forwarder(spool, lambda: tls_sender(pki, port), target=f"127.0.0.1:{port}",
                   max_backoff_seconds=0.2)
    fw.start()
    try:
        assert wait_until(lambda: "unreachable" in caplog.text, 5)
        assert spool.count() == 10
        receiver = Receiver.__new__(Receiver)
        Receiver.__init__(receiver, pki)  # a fresh receiver...
        receiver.listener.close()  # ...but on our chosen port:
        receiver.listener = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=receiver._serve, daemon=True).start()
        for i in range(10, 15):
            spool.append(f"{PATIENT} record {i}".encode())
            fw.wake.set()
        assert wait_until(lambda: len(receiver.messages) == 15)
        assert receiver.messages == [f"{PATIENT} record {i}".encode() for i in range(15)]
        assert wait_until(lambda: spool.count() == 0, 5)
        assert "reachable again" in caplog.text
        assert PATIENT not in "".join(r.getMessage() for r in caplog.records
                                      if r.levelno >= logging.INFO)
        receiver.close()
    finally:
        fw.stop()


def test_forwarders_of_two_workers_send_once(pki: DevPki, receiver: Receiver,
                                             tmp_path: Path) -> None:
    spool_a, spool_b = AuditSpool(tmp_path), AuditSpool(tmp_path)
    fws = [Forwarder(s, lambda: tls_sender(pki, receiver.port), target="r")
           for s in (spool_a, spool_b)]
    for fw in fws:
        fw.start()
    try:
        for i in range(40):
            (spool_a if i % 2 else spool_b).append(f"m{i}".encode())
            for fw in fws:
                fw.wake.set()
        assert wait_until(lambda: len(receiver.messages) >= 40)
        time.sleep(0.2)
        assert receiver.messages == [f"m{i}".encode() for i in range(40)]
        assert sum(fw.sent for fw in fws) == 40
    finally:
        for fw in fws:
            fw.stop()


def test_a_record_too_large_for_udp_is_dropped_not_retried(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        port = server.getsockname()[1]
        spool = AuditSpool(tmp_path)
        spool.append(b"small 1")
        spool.append(b"x" * 70000)
        spool.append(b"small 2")
        fw = Forwarder(spool, lambda: UdpSender("127.0.0.1", port), target="udp")
        assert fw.drain_once()
        fw._settle(final=True)
        assert [server.recv(65535), server.recv(65535)] == [b"small 1", b"small 2"]
        assert spool.count() == 0 and fw.dropped == 1 and fw.sent == 2


def test_group_commit_from_many_threads_keeps_every_record_and_the_bound(
        tmp_path: Path) -> None:
    spool = AuditSpool(tmp_path / "all")
    bounded = AuditSpool(tmp_path / "bounded", max_records=100)
    kept: list[int] = []

    def write(tag: int) -> None:
        for i in range(40):
            assert spool.append(f"{tag}-{i}".encode())
            if bounded.append(b"x"):
                kept.append(tag)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    payloads = [p.decode() for _, p in spool.oldest(1000)]
    assert len(payloads) == 320 and spool.count() == 320
    for tag in range(8):
        assert [p for p in payloads if p.startswith(f"{tag}-")] == [
            f"{tag}-{i}" for i in range(40)]
    assert bounded.count() == 100 and len(kept) == 100
