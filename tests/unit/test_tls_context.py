"""The TLS policy (handshakes in memory, no sockets), peer subjects, the client-certificate
middleware and the gunicorn settings derived from the configuration."""

from __future__ import annotations

import dataclasses
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from gunicorn.http.errors import NoMoreData
from gunicorn.workers.gthread import ThreadWorker

from gateway.config import GatewayConfig, ServerConfig, TlsConfig
from gateway.security.tls import client_context, peer_subject, server_context
from gateway.soap.server import (
    ACCESS_LOG_FORMAT,
    ClientCertMiddleware,
    GatewayServer,
    deadlines,
    gunicorn_options,
    main,
    resolve_factory,
)
from gateway.soap.worker import (
    DeadlineConn,
    Deadlines,
    DeadlineThreadWorker,
    RequestTimeout,
    limit_malloc_arenas,
    release_memory,
)
from tests.support.pki import CLIENT_SUBJECT, TestPki, make_test_pki
from tests.support.server import write_config

APP = "tests.support.echo_app:app_factory"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def tls_config(pki: TestPki, **changes: Any) -> TlsConfig:
    return dataclasses.replace(
        TlsConfig(certificate=pki.dev.server_cert, private_key=pki.dev.server_key,
                  ca_bundle=pki.dev.ca_cert), **changes)


def handshake(server: ssl.SSLContext, client: ssl.SSLContext,
              hostname: str = "localhost") -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A full TLS handshake over memory BIOs; raises the first side's SSLError."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server checks the client certificate after the client is done;
            # one round of application data makes any refusal surface on both sides.
            c.write(b"ping")
            s_in.write(c_out.read())
            assert s.read(4) == b"ping"
            return c, s
    raise AssertionError("handshake did not finish")


def test_server_policy(pki: TestPki) -> None:
    ctx = server_context(tls_config(pki))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    for cipher in tls12:
        assert cipher["aead"], cipher["name"]
        assert cipher["kea"] == "kx-ecdhe", cipher["name"]
    assert all(c["aead"] for c in ctx.get_ciphers())  # TLS 1.3 suites too


def test_server_verify_modes(pki: TestPki) -> None:
    optional = server_context(tls_config(pki, require_client_certificate=False))
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    none = server_context(tls_config(pki, require_client_certificate=False, ca_bundle=None))
    assert none.verify_mode == ssl.CERT_NONE
    with pytest.raises(ValueError, match="ca_bundle"):
        server_context(tls_config(pki, ca_bundle=None))
    with pytest.raises(ValueError, match="certificate"):
        server_context(tls_config(pki, certificate=None))


def test_client_policy(pki: TestPki) -> None:
    ctx = client_context(pki.dev.ca_cert, pki.dev.client_cert, pki.dev.client_key)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert all(c["aead"] for c in ctx.get_ciphers())
    with pytest.raises(ValueError):
        client_context(pki.dev.ca_cert, None, pki.dev.client_key)


def test_mutual_handshake_names_the_client(pki: TestPki) -> None:
    c, s = handshake(server_context(tls_config(pki)),
                     client_context(pki.dev.ca_cert, pki.dev.client_cert, pki.dev.client_key))
    assert c.version() == "TLSv1.3"
    cert = s.getpeercert()
    assert cert and peer_subject(cert) == CLIENT_SUBJECT


def test_tls12_handshake_uses_an_aead_suite(pki: TestPki) -> None:
    client = client_context(pki.dev.ca_cert, pki.dev.client_cert, pki.dev.client_key)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    c, _ = handshake(server_context(tls_config(pki)), client)
    cipher = c.cipher()
    assert c.version() == "TLSv1.2" and cipher is not None
    assert "GCM" in cipher[0] or "CHACHA20" in cipher[0]


@pytest.mark.parametrize("which", ["none", "expired", "other"])
def test_bad_client_certificates_refused(pki: TestPki, which: str) -> None:
    cert = {"none": (None, None), "expired": (pki.expired_cert, pki.expired_key),
            "other": (pki.other_client_cert, pki.other_client_key)}[which]
    client = client_context(pki.dev.ca_cert, *cert)
    with pytest.raises(ssl.SSLError):
        handshake(server_context(tls_config(pki)), client)


def test_client_checks_the_server_name(pki: TestPki) -> None:
    client = client_context(pki.dev.ca_cert, pki.dev.client_cert, pki.dev.client_key)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"(?i)hostname"):
        handshake(server_context(tls_config(pki)), client, hostname="elsewhere.example")
    with pytest.raises(ssl.SSLCertVerificationError):  # a server of an untrusted CA
        handshake(server_context(tls_config(pki)),
                  client_context(pki.other_ca_cert, pki.dev.client_cert, pki.dev.client_key))


def test_peer_subject_from_cert_dict() -> None:
    cert = {"subject": ((("countryName", "CH"),), (("organizationName", "Spital, AG"),),
                        (("commonName", " node+1"), ("userId", "u#1")))}
    assert peer_subject(cert) == "CN=\\ node\\+1+UID=u#1,O=Spital\\, AG,C=CH"
    assert peer_subject({}) is None
    assert peer_subject(None) is None


# --- the middleware ---------------------------------------------------------------------------

def call(app: Any, environ: dict[str, Any]) -> tuple[str, bytes]:
    status: list[str] = []
    body = b"".join(app(environ, lambda s, h: status.append(s)))
    return status[0], body


def echo(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [repr(environ["xdsi.client_subject"]).encode()]


def test_middleware_refuses_missing_certificate_when_required() -> None:
    app = ClientCertMiddleware(echo, tls_enabled=True, require_client_certificate=True)
    status, _ = call(app, {"gunicorn.socket": object()})
    assert status.startswith("403")


def test_middleware_passes_when_not_required() -> None:
    optional = ClientCertMiddleware(echo, tls_enabled=True, require_client_certificate=False)
    assert call(optional, {}) == ("200 OK", b"None")
    plain = ClientCertMiddleware(echo, tls_enabled=False, require_client_certificate=True)
    assert call(plain, {"gunicorn.socket": object()}) == ("200 OK", b"None")


# --- gunicorn settings ------------------------------------------------------------------------

def gateway_config(pki: TestPki | None, **server: Any) -> GatewayConfig:
    tls = tls_config(pki) if pki else TlsConfig(enabled=False)
    return GatewayConfig(server=ServerConfig(**server), tls=tls)


def test_gunicorn_options(pki: TestPki) -> None:
    opts = gunicorn_options(gateway_config(pki, host="::", port=9443, workers=3, threads=7,
                                           request_timeout_seconds=120), log_level="info")
    assert opts["bind"] == ["[::]:9443"]
    assert (opts["workers"], opts["threads"], opts["timeout"]) == (3, 7, 120)
    assert issubclass(opts["worker_class"], DeadlineThreadWorker)
    assert issubclass(opts["worker_class"], ThreadWorker) and opts["preload_app"] is False
    assert opts["worker_class"].deadlines == Deadlines(10.0, 30.0, 4096.0)  # the defaults
    assert opts["certfile"] == str(pki.dev.server_cert)
    assert opts["accesslog"] == "-"
    # The access log never has the query string, headers or the request line as sent.
    for atom in ("%(r)s", "%(q)s", "%(u)s", "%(f)s", "%(a)s", "%({"):
        assert atom not in ACCESS_LOG_FORMAT
    quiet = gunicorn_options(gateway_config(None), log_level="warning")
    assert quiet["accesslog"] is None and "certfile" not in quiet


def test_gateway_server_uses_our_tls_context(pki: TestPki) -> None:
    server = GatewayServer(gateway_config(pki), "tests.support.echo_app:app_factory",
                           log_level="warning")
    cfg = server.cfg
    assert cfg.is_ssl and cfg.worker_class_str == "DeadlineThreadWorker"
    assert issubclass(cfg.worker_class, DeadlineThreadWorker)

    def gunicorn_default() -> ssl.SSLContext:
        raise AssertionError("gunicorn's default context must not be used")

    ctx = cfg.ssl_context(cfg, gunicorn_default)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert cfg.ssl_context(cfg, gunicorn_default) is ctx  # built once per process
    app = server.load()
    assert isinstance(app, ClientCertMiddleware) and app.required


def test_resolve_factory() -> None:
    assert callable(resolve_factory("tests.support.echo_app:app_factory"))
    for bad in ("tests.support.echo_app", ":x", "tests.support.echo_app:CHUNK"):
        with pytest.raises((ValueError, TypeError)):
            resolve_factory(bad)
    with pytest.raises(AttributeError):
        resolve_factory("tests.support.echo_app:nothing")



def test_stalled_handshake_times_out(pki: TestPki) -> None:
    ctx = server_context(tls_config(pki), handshake_timeout=0.2)
    server_end, client_end = socket.socketpair()
    with server_end, client_end:
        client_end.sendall(b"\x16\x03")  # the start of a ClientHello, then nothing
        started = time.monotonic()
        with pytest.raises(ssl.SSLError) as info:
            ctx.wrap_socket(server_end, server_side=True, do_handshake_on_connect=False)
        assert info.value.args[0] == ssl.SSL_ERROR_EOF
        assert time.monotonic() - started < 2


def test_handshake_completes_and_socket_is_blocking_again(pki: TestPki) -> None:
    server = server_context(tls_config(pki), handshake_timeout=5)
    client = client_context(pki.dev.ca_cert, pki.dev.client_cert, pki.dev.client_key)
    server_end, client_end = socket.socketpair()
    with server_end, client_end:
        result: dict[str, Any] = {}

        def connect() -> None:
            with client.wrap_socket(client_end, server_hostname="localhost") as tls:
                tls.sendall(b"hello")
                result["reply"] = tls.recv(5)

        thread = threading.Thread(target=connect)
        thread.start()
        tls = server.wrap_socket(server_end, server_side=True, do_handshake_on_connect=False)
        assert tls.gettimeout() is None
        assert peer_subject(tls) == CLIENT_SUBJECT
        assert tls.recv(5) == b"hello"
        tls.sendall(b"world")
        thread.join(5)
        tls.close()
    assert result["reply"] == b"world"


def test_main_refuses_bad_arguments_before_serving(pki: TestPki, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "gateway.toml", pki.dev)
    assert main(["--config", str(config), "--app", "tests.support.echo_app:nothing"]) == 2
    assert "nothing" in capsys.readouterr().err
    assert main(["--config", str(config), "--app", APP, "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.toml"), "--app", APP]) == 2
    assert "not found" in capsys.readouterr().err
    broken = write_config(tmp_path / "broken.toml", pki.dev)
    broken.write_text(broken.read_text().replace(str(pki.dev.server_key),
                                                 str(pki.other_client_key)))
    assert main(["--config", str(broken), "--app", APP]) == 2  # key does not match the cert
    assert "[tls]" in capsys.readouterr().err


# --- request deadlines (gateway.soap.worker) -------------------------------------------------

def deadline_conn(sock: socket.socket, deadlines: Deadlines) -> DeadlineConn:
    conn = DeadlineConn(object(), sock, ("127.0.0.1", 1), ("127.0.0.1", 2), deadlines)
    conn.sock.setblocking(True)
    return conn


def test_deadlines_from_config() -> None:
    cfg = GatewayConfig(server=ServerConfig(header_timeout_seconds=3, body_timeout_seconds=7,
                                            min_body_rate_bytes_per_second=100))
    assert deadlines(cfg) == Deadlines(3.0, 7.0, 100.0)
    assert gunicorn_options(cfg, log_level="warning")["worker_class"].deadlines == \
        Deadlines(3.0, 7.0, 100.0)


def test_body_deadline_grows_with_the_bytes_received() -> None:
    a, b = socket.socketpair()
    with a, b:
        conn = deadline_conn(a, Deadlines(header_timeout=5, body_timeout=2, min_body_rate=100))
        assert conn.remaining() is None  # between requests, no read is pending
        conn.read_deadline = time.monotonic() + 5
        assert 4 < (conn.remaining() or 0) <= 5
        conn.body_start = time.monotonic()
        assert 1 < (conn.remaining() or 0) <= 2
        conn.body_received = 1000  # 10 s more at 100 bytes per second
        assert 11 < (conn.remaining() or 0) <= 12


def test_reader_raises_request_timeout_past_the_deadline() -> None:
    a, b = socket.socketpair()
    with a, b:
        conn = deadline_conn(a, Deadlines(header_timeout=5, body_timeout=1, min_body_rate=0))
        conn.body_start = time.monotonic() - 0.8  # 0.2 s left
        b.sendall(b"abc")
        assert conn.reader.recv(10) == b"abc"
        assert conn.body_received == 3
        with pytest.raises(RequestTimeout) as info:
            conn.reader.recv(10)  # nothing more comes
        assert conn.timed_out == "body"
        # gunicorn's connection handler closes quietly on NoMoreData; its body drain and
        # the application see a TimeoutError (an OSError).
        assert isinstance(info.value, NoMoreData) and isinstance(info.value, TimeoutError)
        assert a.gettimeout() is None  # blocking again for the response
        with pytest.raises(RequestTimeout):
            conn.reader.recv(10)  # past the deadline: at once


def test_reader_honours_a_shorter_timeout_set_by_gunicorn() -> None:
    a, b = socket.socketpair()
    with a, b:
        conn = deadline_conn(a, Deadlines())
        conn.reader.settimeout(0.1)  # gunicorn's keep-alive body drain
        assert conn.reader.gettimeout() == 0.1
        with pytest.raises(TimeoutError) as info:
            conn.reader.recv(10)
        assert not isinstance(info.value, RequestTimeout) and conn.timed_out is None


def test_malloc_tuning_is_harmless() -> None:
    # glibc: True (the arena cap is accepted); elsewhere False. Either way no exception.
    assert limit_malloc_arenas(8) in (True, False)
    assert release_memory() in (True, False)
