"""The response side of gateway.soap.worker: `SendBudget`, the guarded sockets' `sendall()`
and the reset of a connection whose client does not read."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from gunicorn.http.errors import NoMoreData

from gateway.config import GatewayConfig, ServerConfig
from gateway.soap.server import deadlines
from gateway.soap.worker import (
    SEND_SLICE,
    DeadlineConn,
    Deadlines,
    GuardedSocket,
    ResponseTimeout,
    SendBudget,
)


def guarded_pair(deadlines: Deadlines) -> tuple[DeadlineConn, socket.socket]:
    """A connection (its socket guarded like an accepted one) and the client's end."""
    a, b = socket.socketpair()
    conn = DeadlineConn(object(), GuardedSocket(fileno=a.detach()), ("127.0.0.1", 1),
                        ("127.0.0.1", 2), deadlines)
    conn.sock.setblocking(True)
    return conn, b


def test_send_deadlines_from_config() -> None:
    cfg = GatewayConfig(server=ServerConfig(send_timeout_seconds=7,
                                            min_send_rate_bytes_per_second=512))
    d = deadlines(cfg)
    assert (d.send_timeout, d.min_send_rate) == (7.0, 512.0)
    defaults = deadlines(GatewayConfig())
    assert (defaults.send_timeout, defaults.min_send_rate) == (60.0, 4096.0)


def test_budget_grows_with_the_bytes_sent_and_shrinks_with_the_time_blocked() -> None:
    budget = SendBudget(Deadlines(send_timeout=10, min_send_rate=100))
    assert budget.timeout() == 10  # never more than the send timeout for one slice
    budget.blocked = 8.0
    assert budget.timeout() == pytest.approx(2.0)
    budget.sent = 500  # 5 s more at 100 bytes per second
    assert budget.timeout() == pytest.approx(7.0)
    budget.blocked = 15.0
    with pytest.raises(ResponseTimeout):
        budget.timeout()
    assert budget.expired
    budget.reset()
    assert budget.timeout() == 10 and budget.sent == 0 and budget.blocked == 0


def test_budget_without_a_rate_bounds_each_slice_only() -> None:
    budget = SendBudget(Deadlines(send_timeout=5, min_send_rate=0))
    budget.blocked = 1000.0
    assert budget.timeout() == 5
    assert SendBudget(Deadlines(send_timeout=0)).timeout() is None


def test_a_reader_gets_every_byte_and_the_timeout_is_restored() -> None:
    conn, client = guarded_pair(Deadlines(send_timeout=5, min_send_rate=1000))
    data = bytes(range(256)) * 4000  # about 1 MB: many slices, more than the buffers hold
    received = bytearray()

    def read() -> None:
        while len(received) < len(data):
            chunk = client.recv(65536)
            if not chunk:
                break
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        conn.sock.sendall(data)
        reader.join(10)
        assert bytes(received) == data
        assert conn.send_budget.sent == len(data)
        assert conn.sock.gettimeout() is None  # blocking again, as the reader expects
    finally:
        conn.sock.close()
        client.close()


def test_a_client_that_stops_reading_gets_response_timeout() -> None:
    conn, client = guarded_pair(Deadlines(send_timeout=0.3, min_send_rate=0))
    with client:
        start = time.monotonic()
        with pytest.raises(ResponseTimeout) as info:
            conn.sock.sendall(b"x" * (8 * 1024 * 1024))  # far more than the buffers hold
        waited = time.monotonic() - start
        assert 0.25 < waited < 3
        # gunicorn's connection handler closes quietly on a NoMoreData (an OSError for the
        # code between, which re-raises socket errors).
        assert isinstance(info.value, NoMoreData) and isinstance(info.value, TimeoutError)
        assert 0 < conn.send_budget.sent < 8 * 1024 * 1024
        assert conn.sock.gettimeout() is None
        start = time.monotonic()
        with pytest.raises(ResponseTimeout):
            conn.sock.sendall(b"more")  # spent: at once, nothing more goes out
        assert time.monotonic() - start < 0.1
        conn.sock.close()


def test_a_trickle_reader_is_cut_off_by_the_rate_although_each_slice_progresses() -> None:
    # Each 64 KiB slice goes out well within the 1 s send timeout, but the client takes
    # about 0.5 s per 64 KiB: far below 10 MB/s, so the time blocked soon passes
    # 1 s + sent / 10 MB/s.
    conn, client = guarded_pair(Deadlines(send_timeout=1.0, min_send_rate=10_000_000))
    stop = threading.Event()
    received = [0]

    def trickle() -> None:
        while not stop.is_set():
            try:
                chunk = client.recv(8192)
            except OSError:
                return
            if not chunk:
                return
            received[0] += len(chunk)
            time.sleep(0.06)

    reader = threading.Thread(target=trickle, daemon=True)
    reader.start()
    try:
        start = time.monotonic()
        with pytest.raises(ResponseTimeout):
            conn.sock.sendall(b"y" * (64 * 1024 * 1024))
        waited = time.monotonic() - start
        budget = conn.send_budget
        assert budget.blocked > 1.0  # the whole allowance waiting for the client
        assert waited < 10
        assert budget.sent > 2 * SEND_SLICE  # it did make progress all along
    finally:
        stop.set()
        conn.sock.close()
        client.close()
        reader.join(2)


def test_a_non_blocking_socket_keeps_the_plain_sendall() -> None:
    conn, client = guarded_pair(Deadlines(send_timeout=0.2))
    with client:
        conn.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            conn.sock.sendall(b"z" * (8 * 1024 * 1024))
        assert conn.send_budget.sent == 0  # the budget was not involved
        conn.sock.close()


def test_a_timed_out_response_closes_without_lingering() -> None:
    conn, client = guarded_pair(Deadlines(send_timeout=0.2, min_send_rate=0))
    with client:
        with pytest.raises(ResponseTimeout):
            conn.sock.sendall(b"w" * (8 * 1024 * 1024))
        conn.timed_out = "response"
        conn.close(graceful=True)  # what gunicorn calls: no lingering drain for this one
        assert conn.sock.fileno() == -1


def test_a_timed_out_tcp_response_is_reset_not_finished() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        client.connect(listener.getsockname())
        raw, addr = listener.accept()
        conn = DeadlineConn(object(), GuardedSocket(fileno=raw.detach()), addr,
                            listener.getsockname(), Deadlines(send_timeout=0.2,
                                                              min_send_rate=0))
        conn.sock.setblocking(True)
        with client:
            with pytest.raises(ResponseTimeout):
                conn.sock.sendall(b"v" * (32 * 1024 * 1024))
            conn.timed_out = "response"
            conn.close(graceful=True)
            client.settimeout(5)
            got = 0
            with pytest.raises(ConnectionResetError):
                while True:
                    chunk = client.recv(1 << 20)
                    assert chunk, "a reset, not an orderly end of the response"
                    got += len(chunk)
            assert got < conn.send_budget.sent


def test_accepted_connections_send_without_nagle() -> None:
    """The worker's accept gives each TCP connection TCP_NODELAY (small writes such as an
    MTOM part header never wait for a delayed acknowledgement) and parks it guarded."""
    from types import SimpleNamespace

    from gateway.soap.worker import DeadlineThreadWorker

    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    client = socket.create_connection(listener.getsockname())
    parked: list[DeadlineConn] = []
    worker = SimpleNamespace(nr_conns=0, cfg=SimpleNamespace(is_ssl=False),
                             deadlines=Deadlines(), _park=parked.append)
    try:
        for _ in range(100):  # the connection may take a moment to be acceptable
            DeadlineThreadWorker.accept(worker, listener)  # type: ignore[arg-type]
            if parked:
                break
            time.sleep(0.01)
        assert len(parked) == 1 and worker.nr_conns == 1
        sock = parked[0].sock
        assert isinstance(sock, GuardedSocket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for conn in parked:
            conn.sock.close()
        client.close()
        listener.close()
