"""The real HTTPS server (gunicorn, gthread workers) and its TLS policy, over real sockets.

One server per module (mutual TLS required) serves tests/support/echo_app.py, which echoes
environ["xdsi.client_subject"]. A good client certificate gets through with its subject;
no certificate, a certificate from another CA, an expired certificate, TLS 1.1 and a CBC
TLS 1.2 suite are refused during the handshake - and the server keeps serving afterwards.
Two smaller servers check the optional-certificate and plain-HTTP modes and a graceful stop.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.echo_app import pattern
from tests.support.pki import CLIENT_SUBJECT, TestPki, make_test_pki
from tests.support.server import RunningServer, run_server, write_config

pytestmark = [pytest.mark.integration,
              # TLSVersion.TLSv1_1 is deprecated: these tests use it to be refused.
              pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1:DeprecationWarning")]

APP = "tests.support.echo_app:app_factory"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(pki: TestPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    config = write_config(tmp_path_factory.mktemp("mtls") / "gateway.toml", pki.dev)
    with run_server(config, APP, log_level="info") as running:
        yield running


def session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # REQUESTS_CA_BUNDLE must not override verify=
    return s


def get_subject(server: RunningServer, pki: TestPki,
                cert: tuple[str, str] | None) -> requests.Response:
    with session() as s:
        return s.get(server.base_url + "/subject", verify=str(pki.dev.ca_cert), cert=cert,
                     timeout=10)


def raw_context(pki: TestPki, *, cert: tuple[str, str] | None = None) -> ssl.SSLContext:
    """A permissive client context (so a refusal is the server's, not the client's)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(pki.dev.ca_cert))
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


def raw_get(server: RunningServer, ctx: ssl.SSLContext) -> tuple[str | None, bytes]:
    """Handshake, send GET /subject, read the whole answer; returns (TLS version, bytes)."""
    with socket.create_connection((server.host, server.port), timeout=10) as tcp, \
            ctx.wrap_socket(tcp, server_hostname="localhost") as tls:
        version = tls.version()
        tls.sendall(b"GET /subject HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        return version, data


def assert_refused(server: RunningServer, ctx: ssl.SSLContext) -> str:
    """The server ends the connection with a TLS alert and no HTTP answer; returns the error.

    With TLS 1.3 the client's handshake may finish before the server has checked the client
    certificate, so the alert can arrive on the first read instead."""
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)) as info:
        _, data = raw_get(server, ctx)
        assert not data.startswith(b"HTTP/"), data[:200]
        raise ConnectionResetError("closed without an HTTP answer")
    return str(info.value)


# --- mutual TLS required ---------------------------------------------------------------------

def test_good_client_certificate_subject_arrives(server: RunningServer, pki: TestPki) -> None:
    r = get_subject(server, pki, pki.client)
    assert r.status_code == 200
    assert r.json()["subject"] == CLIENT_SUBJECT
    assert r.json()["scheme"] == "https"


def test_requests_without_client_certificate_refused(server: RunningServer,
                                                     pki: TestPki) -> None:
    with pytest.raises(requests.exceptions.SSLError, match=r"(?i)certificate"):
        get_subject(server, pki, None)


def test_raw_socket_without_client_certificate_refused(server: RunningServer,
                                                       pki: TestPki) -> None:
    error = assert_refused(server, raw_context(pki))
    assert "CERTIFICATE_REQUIRED" in error or "HANDSHAKE_FAILURE" in error, error


def test_certificate_from_another_ca_refused(server: RunningServer, pki: TestPki) -> None:
    with pytest.raises(requests.exceptions.SSLError, match=r"(?i)unknown ca"):
        get_subject(server, pki, pki.other)
    assert "UNKNOWN_CA" in assert_refused(server, raw_context(pki, cert=pki.other))


def test_expired_client_certificate_refused(server: RunningServer, pki: TestPki) -> None:
    with pytest.raises(requests.exceptions.SSLError, match=r"(?i)expired"):
        get_subject(server, pki, pki.expired)
    assert "CERTIFICATE_EXPIRED" in assert_refused(server, raw_context(pki, cert=pki.expired))


def test_tls_1_1_refused_by_the_server(server: RunningServer, pki: TestPki) -> None:
    ctx = raw_context(pki, cert=pki.client)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this OpenSSL offer TLS 1.1 at all
    error = assert_refused(server, ctx)
    # The server's alert, not "no protocols available" on our side.
    assert "PROTOCOL_VERSION" in error or "UNSUPPORTED_PROTOCOL" in error, error
    assert "NO_PROTOCOLS_AVAILABLE" not in error


def test_cbc_suite_on_tls_1_2_refused(server: RunningServer, pki: TestPki) -> None:
    ctx = raw_context(pki, cert=pki.client)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA")  # EC key: ECDSA suites
    error = assert_refused(server, ctx)
    assert "HANDSHAKE_FAILURE" in error or "NO_SHARED_CIPHER" in error, error


def test_tls_1_3_accepted(server: RunningServer, pki: TestPki) -> None:
    ctx = raw_context(pki, cert=pki.client)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    version, data = raw_get(server, ctx)
    assert version == "TLSv1.3"
    assert data.startswith(b"HTTP/1.1 200")
    assert CLIENT_SUBJECT.encode() in data


@pytest.mark.parametrize("suite", ["ECDHE-ECDSA-AES128-GCM-SHA256",
                                   "ECDHE-ECDSA-AES256-GCM-SHA384",
                                   "ECDHE-ECDSA-CHACHA20-POLY1305"])
def test_aead_suite_on_tls_1_2_accepted(server: RunningServer, pki: TestPki, suite: str) -> None:
    ctx = raw_context(pki, cert=pki.client)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(suite)
    with socket.create_connection((server.host, server.port), timeout=10) as tcp, \
            ctx.wrap_socket(tcp, server_hostname="localhost") as tls:
        assert tls.version() == "TLSv1.2"
        cipher = tls.cipher()
        assert cipher is not None and cipher[0] == suite
        tls.sendall(b"GET /subject HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")


def test_server_keeps_serving_after_refusals(server: RunningServer, pki: TestPki) -> None:
    tls11 = raw_context(pki, cert=pki.client)
    tls11.maximum_version = ssl.TLSVersion.TLSv1_1
    tls11.set_ciphers("DEFAULT:@SECLEVEL=0")
    refusals = [raw_context(pki), raw_context(pki, cert=pki.other),
                raw_context(pki, cert=pki.expired), tls11]
    for ctx in refusals * 3:
        assert_refused(server, ctx)
        assert get_subject(server, pki, pki.client).json()["subject"] == CLIENT_SUBJECT
    assert server.process.poll() is None


def test_several_worker_processes_answer(server: RunningServer, pki: TestPki) -> None:
    pids = set()
    for _ in range(100):
        answer = get_subject(server, pki, pki.client).json()
        assert answer["factory_pid"] == answer["pid"]  # the app was built after the fork
        pids.add(answer["pid"])
        if len(pids) > 1:
            break
    assert len(pids) == 2  # [server] workers = 2 in write_config
    assert server.process.pid not in pids


def test_big_streamed_response_is_complete(server: RunningServer, pki: TestPki) -> None:
    total = 24 * 1024 * 1024 + 12345
    received = 0
    with session() as s, s.get(server.base_url + f"/big?bytes={total}",
                               verify=str(pki.dev.ca_cert), cert=pki.client, stream=True,
                               timeout=30) as r:
        assert r.status_code == 200
        assert int(r.headers["Content-Length"]) == total
        for chunk in r.iter_content(1024 * 1024):
            assert chunk == pattern(received, len(chunk))
            received += len(chunk)
    assert received == total


def test_access_log_has_no_query_string(server: RunningServer, pki: TestPki) -> None:
    with session() as s:
        r = s.get(server.base_url + "/subject?patientId=SECRET-4711",
                  verify=str(pki.dev.ca_cert), cert=pki.client, timeout=10)
    assert r.status_code == 200
    log = server.log()
    assert '"GET /subject HTTP/1.1" 200' in log  # the access log is on at INFO
    assert "SECRET-4711" not in log


# --- other modes -----------------------------------------------------------------------------

def test_optional_client_certificate_mode(pki: TestPki, tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.toml", pki.dev, require_client_certificate=False,
                          workers=1)
    with run_server(config, APP) as running:
        anonymous = get_subject(running, pki, None)
        assert anonymous.status_code == 200
        assert anonymous.json()["subject"] is None
        assert get_subject(running, pki, pki.client).json()["subject"] == CLIENT_SUBJECT
        # An offered certificate is still verified.
        assert_refused(running, raw_context(pki, cert=pki.other))
        assert get_subject(running, pki, None).status_code == 200


def test_sigterm_lets_the_request_in_flight_finish(pki: TestPki, tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.toml", pki.dev, workers=1)
    total = 48 * 1024 * 1024
    received: list[int] = []
    with run_server(config, APP) as running, session() as s, \
            s.get(running.base_url + f"/big?bytes={total}", verify=str(pki.dev.ca_cert),
                  cert=pki.client, stream=True, timeout=30) as r:
        chunks = r.iter_content(256 * 1024)
        first = next(chunks)  # the response has started
        running.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the master is stopping while we read slowly
        count = len(first)
        for chunk in chunks:
            count += len(chunk)
            time.sleep(0.002)
        received.append(count)
        assert running.process.wait(timeout=15) == 0  # graceful exit, status 0
    assert received == [total]


def test_plain_http_mode_warns_and_serves(tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.toml", None, tls_enabled=False, workers=1)
    with run_server(config, APP) as running:
        assert running.base_url.startswith("http://")
        with session() as s:
            r = s.get(running.base_url + "/subject", timeout=10)
        assert r.status_code == 200
        assert r.json()["subject"] is None and r.json()["scheme"] == "http"
        assert "PLAIN HTTP" in running.log()


# --- request deadlines (gateway.soap.worker) -------------------------------------------------

@pytest.fixture(scope="module")
def strict_server(pki: TestPki, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[RunningServer]:
    """One worker of two threads, 1 s for handshake + head, 1 s + 1 s per KiB for the body."""
    config = write_config(tmp_path_factory.mktemp("strict") / "gateway.toml", pki.dev,
                          workers=1, threads=2)
    text = config.read_text().replace(
        "request_timeout_seconds = 30\n",
        "request_timeout_seconds = 30\nheader_timeout_seconds = 1\nbody_timeout_seconds = 1\n"
        "min_body_rate_bytes_per_second = 1024\n")
    config.write_text(text)
    with run_server(config, APP, log_level="info") as running:
        yield running


def trickle(server: RunningServer, pki: TestPki, fast: bytes, slow: bytes,
            pause: float = 0.2) -> tuple[int, bytes]:
    """Handshake, send `fast` at once, then `slow` a byte every `pause` s until the server
    closes the connection; returns (bytes of `slow` sent, what the server answered)."""
    with socket.create_connection((server.host, server.port), timeout=10) as tcp, \
            raw_context(pki, cert=pki.client).wrap_socket(tcp,
                                                         server_hostname="localhost") as tls:
        tls.sendall(fast)
        sent = 0
        tls.settimeout(pause)
        answer = b""
        try:
            for i in range(len(slow)):
                tls.sendall(slow[i:i + 1])
                sent += 1
                try:
                    chunk = tls.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                answer += chunk
        except (ssl.SSLError, OSError):
            pass
        return sent, answer


def test_slow_request_head_is_cut_off(strict_server: RunningServer, pki: TestPki) -> None:
    head = (b"GET /subject HTTP/1.1\r\nHost: localhost\r\nUser-Agent: "
            + b"slow" * 40 + b"\r\n\r\n")
    sent, answer = trickle(strict_server, pki, b"", head)
    assert sent < len(head) and answer == b""  # closed before the head was complete
    assert "request head not complete within 1 s" in strict_server.log()


def test_slow_request_body_is_cut_off(strict_server: RunningServer, pki: TestPki) -> None:
    body = b"x" * 200
    head = (f"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
            f"\r\n").encode()
    sent, answer = trickle(strict_server, pki, head, body)
    assert sent < len(body)  # 5 bytes per second, where 1 KiB per second is the least
    assert b'"bytes": 200' not in answer
    log = strict_server.log()
    assert "request body slower than the deadline" in log
    assert "Traceback" not in log


def test_fast_large_upload_passes_the_deadlines(strict_server: RunningServer,
                                                pki: TestPki) -> None:
    data = pattern(0, 64 * 1024) * 320  # 20 MiB
    with session() as s:
        r = s.post(strict_server.base_url + "/upload", data=data, verify=str(pki.dev.ca_cert),
                   cert=pki.client, timeout=60)
    assert r.status_code == 200
    assert r.json() == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_idle_connections_hold_no_thread(strict_server: RunningServer, pki: TestPki) -> None:
    """Ten connections that never send (and ten stuck in the TLS handshake) on a server of
    two threads: requests are still answered while they wait."""
    held = []
    try:
        for _ in range(10):
            tcp = socket.create_connection((strict_server.host, strict_server.port), timeout=10)
            held.append(raw_context(pki, cert=pki.client).wrap_socket(
                tcp, server_hostname="localhost"))
            raw = socket.create_connection((strict_server.host, strict_server.port), timeout=10)
            raw.sendall(b"\x16\x03")  # the start of a ClientHello, then nothing
            held.append(raw)
        for _ in range(3):
            r = get_subject(strict_server, pki, pki.client)
            assert r.status_code == 200
    finally:
        for s in held:
            s.close()
