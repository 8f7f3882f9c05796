"""The response side is bounded (gateway.soap.worker): over real gunicorn with mutual TLS, a
client that asks for a large document (ITI-43, 16 MiB from the built-in repository) and then
stops reading without disconnecting, or reads at a trickle, has its connection reset within
the send deadline; the request's spool folder is removed, a WARNING says so without patient
data, other requests are served meanwhile and the worker threads are all free afterwards.

The server runs one worker process of two threads, `send_timeout_seconds = 3` and
`min_send_rate_bytes_per_second = 4 MiB` (time blocked on the client within 3 s plus 1 s per
4 MiB sent), so that each case takes a few seconds."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway import demo
from gateway.ebrim.model import DocumentRequest, RetrieveDocumentSetRequest
from gateway.ebrim.parse import parse_retrieve_document_set_response
from gateway.ebrim.render import render_retrieve_document_set_request
from gateway.ns import Action, ResponseStatus
from gateway.security.pki import DevPki, create_dev_pki
from gateway.soap.client import SoapClient, envelope
from tests.support.server import RunningServer, free_port, run_server
from tests.support.zeep_client import mtls_session

pytestmark = pytest.mark.integration

APP = "gateway.soap.application:app_factory"
SEND_TIMEOUT = 3
MIN_SEND_RATE = 4 * 1024 * 1024
DOCUMENT_BYTES = 16 * 1024 * 1024
WARNING = "the response was not read in time"


@dataclass
class Gateway:
    server: RunningServer
    pki: DevPki
    spool: Path
    document_uid: str
    document_sha1: str
    request: bytes  # the whole HTTP request of an ITI-43 for the large document


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("send-timeout")
    pki = create_dev_pki(workdir / "pki")
    spool = workdir / "spool"
    spool.mkdir()
    port = free_port()
    config = demo.write_config(workdir, pki, port, workers=1)
    text = config.read_text()
    assert "threads = 4\n" in text
    config.write_text(text.replace("threads = 4\n", (
        f"threads = 2\nsend_timeout_seconds = {SEND_TIMEOUT}\n"
        f"min_send_rate_bytes_per_second = {MIN_SEND_RATE}\n"
        f'spool_directory = "{spool}"\n'), 1))
    with run_server(config, APP, port=port, log_level="warning") as server:
        values, path = demo.sample_documents(workdir)[0]  # the text report ...
        block = b"".join(b"%015d\n" % i for i in range(4096))
        with path.open("wb") as fh:  # ... made large
            for _ in range(DOCUMENT_BYTES // len(block)):
                fh.write(block)
        client = SoapClient(server.base_url, ca_bundle=pki.ca_cert,
                            certificate=pki.client_cert, private_key=pki.client_key)
        try:
            body, attachments = demo.provide_and_register_body(
                [(values, path)], f"{demo.ORG_ROOT}.20.{time.time_ns()}")
            reply = client.call("/xds/repository", Action.ITI41, body, attachments=attachments)
            assert reply.body is not None and reply.body.get("status") == \
                ResponseStatus.SUCCESS, server.log()[-2000:]
        finally:
            client.close()
        retrieve = render_retrieve_document_set_request(RetrieveDocumentSetRequest(
            documents=(DocumentRequest(repository_unique_id=demo.REPOSITORY,
                                       document_unique_id=values.unique_id),)))
        url = server.base_url + "/xds/repository"
        data, _ = envelope(Action.ITI43, url, retrieve)
        request = (f"POST /xds/repository HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                   f'Content-Type: application/soap+xml; charset=UTF-8; action="{Action.ITI43}"'
                   f"\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data
        yield Gateway(server, pki, spool, values.unique_id, demo.sha1(path), request)


def request_spools(gw: Gateway) -> list[Path]:
    return [p for p in gw.spool.iterdir() if p.name.startswith("xdsi-req-")]


def open_retrieve(gw: Gateway, head_timeout: float = 2.0) -> tuple[ssl.SSLSocket, int, int]:
    """Send the ITI-43 and read only the response head (and what came with it), on a socket
    with a small receive buffer. Returns (socket, Content-Length, body bytes read)."""
    ctx = ssl.create_default_context(cafile=str(gw.pki.ca_cert))
    ctx.load_cert_chain(str(gw.pki.client_cert), str(gw.pki.client_key))
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    raw.settimeout(head_timeout)
    raw.connect((gw.server.host, gw.server.port))
    sock = ctx.wrap_socket(raw, server_hostname=gw.server.host)
    sock.sendall(gw.request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(16384)
        assert chunk, "the gateway closed before its response head"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200"), head
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert fields["Content-Type"].startswith("multipart/related")
    length = int(fields["Content-Length"])
    assert length > DOCUMENT_BYTES
    return sock, length, len(rest)


def wait_for_reset(gw: Gateway, spools: int, limit: float) -> float:
    """Seconds until no more than `spools` request spool folders are left (at most `limit`)."""
    start = time.monotonic()
    while len(request_spools(gw)) > spools:
        assert time.monotonic() - start < limit, "the stalled response was never cut off"
        time.sleep(0.05)
    return time.monotonic() - start


def drain_until_closed(sock: ssl.SSLSocket, already: int, length: int) -> int:
    """Read what the client had still buffered; the connection must then end before the
    response did (a reset, or an end of stream), not time out."""
    got = already
    sock.settimeout(5)
    try:
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            got += len(chunk)
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        pass
    finally:
        sock.close()
    assert got < length, "the whole response arrived: nothing was cut off"
    return got


def health(gw: Gateway, timeout: float = 2.0) -> None:
    with mtls_session(gw.pki.ca_cert, gw.pki.client_cert, gw.pki.client_key) as s:
        assert s.get(gw.server.base_url + "/health", timeout=timeout).status_code == 200


def warnings_logged(gw: Gateway) -> list[str]:
    return [line for line in gw.server.log().splitlines() if WARNING in line]


def test_a_client_that_stops_reading_is_cut_off_and_the_thread_freed(gateway: Gateway) -> None:
    gw = gateway
    wait_for_reset(gw, 0, 5)  # the server removes a spool folder after its client has the reply
    before = len(warnings_logged(gw))
    sock, length, got = open_retrieve(gw)  # and then read nothing more
    stalled = time.monotonic()
    assert len(request_spools(gw)) == 1  # the response is in flight, its spool folder there
    health(gw)  # served meanwhile, by the other thread
    wait_for_reset(gw, 1, 5)
    assert len(request_spools(gw)) == 1
    wait_for_reset(gw, 0, SEND_TIMEOUT + 7)
    waited = time.monotonic() - stalled
    assert waited >= SEND_TIMEOUT - 1, "cut off before the send timeout"
    drain_until_closed(sock, got, length)

    # Both threads are free again: two more stalled clients both get their response heads
    # at once (with a lost thread the second would wait for the first one's timeout).
    start = time.monotonic()
    pairs = [open_retrieve(gw, head_timeout=SEND_TIMEOUT - 1) for _ in range(2)]
    assert time.monotonic() - start < SEND_TIMEOUT - 1
    assert len(request_spools(gw)) == 2
    wait_for_reset(gw, 0, SEND_TIMEOUT + 7)
    for sock, length, got in pairs:
        drain_until_closed(sock, got, length)

    # Afterwards: a client that reads gets the whole document, byte-exact.
    health(gw)
    client = SoapClient(gw.server.base_url, ca_bundle=gw.pki.ca_cert,
                        certificate=gw.pki.client_cert, private_key=gw.pki.client_key)
    try:
        spool = gw.spool / "client"
        spool.mkdir(exist_ok=True)
        reply = client.call("/xds/repository", Action.ITI43, render_retrieve_document_set_request(
            RetrieveDocumentSetRequest(documents=(DocumentRequest(
                repository_unique_id=demo.REPOSITORY, document_unique_id=gw.document_uid),))),
            spool_dir=spool)
    finally:
        client.close()
    assert reply.body is not None
    docs = parse_retrieve_document_set_response(reply.body).documents
    assert len(docs) == 1
    path = reply.attachment_path(docs[0].content_id)
    assert path is not None
    assert demo.sha1(path) == gw.document_sha1
    wait_for_reset(gw, 0, 5)

    lines = warnings_logged(gw)[before:]
    assert len(lines) == 3, gw.server.log()[-3000:]
    assert all("WARNING" in line for line in lines)
    assert not any("DEMO-0001" in line for line in gw.server.log().splitlines())


def test_a_trickle_reader_is_cut_off_by_the_minimum_rate(gateway: Gateway) -> None:
    """About 160 KB/s: every 64 KiB send goes out well within the send timeout, but the
    average is far below the minimum rate."""
    gw = gateway
    wait_for_reset(gw, 0, SEND_TIMEOUT + 7)
    before = len(warnings_logged(gw))
    sock, length, got = open_retrieve(gw)
    stop = threading.Event()
    received = [got]
    ended: list[str] = []

    def trickle() -> None:
        sock.settimeout(SEND_TIMEOUT + 10)
        try:
            while not stop.is_set():
                chunk = sock.recv(16384)
                if not chunk:
                    ended.append("eof")
                    return
                received[0] += len(chunk)
                time.sleep(0.1)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            ended.append("reset")
        except OSError as exc:
            ended.append(repr(exc))

    reader = threading.Thread(target=trickle, daemon=True)
    start = time.monotonic()
    reader.start()
    try:
        wait_for_reset(gw, 0, 15)
        took = time.monotonic() - start
        reader.join(SEND_TIMEOUT + 12)
        assert ended and ended[0] in ("eof", "reset"), ended
        assert received[0] < length
        assert took > SEND_TIMEOUT - 1
    finally:
        stop.set()
        sock.close()
    lines = warnings_logged(gw)[before:]
    assert len(lines) == 1, gw.server.log()[-3000:]
    health(gw)
