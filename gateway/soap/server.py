"""Serve a WSGI application over HTTPS with mutual TLS in several worker processes.

gunicorn (gthread workers: `[server] workers` processes of `threads` threads) is embedded
through a `BaseApplication` subclass, so no gunicorn configuration file or command line is
read. The worker class is gateway.soap.worker's `DeadlineThreadWorker`: TLS handshake and
request head are read in the event loop, not in a thread, within `[server]
header_timeout_seconds`; the body must arrive within `body_timeout_seconds` plus one second per
`min_body_rate_bytes_per_second` bytes; the response must be read: every send makes progress
within `send_timeout_seconds` and the time spent waiting for the client stays within that plus
one second per `min_send_rate_bytes_per_second` bytes sent, or the connection is reset and the
response closed (its spool files removed); malloc arenas are capped and trimmed after large
requests. TLS uses gunicorn's `ssl_context` hook, which returns `tls.server_context([tls])`:
the gateway's own policy (TLS 1.2+, BCP195 AEAD suites, client certificates required) applies,
not gunicorn's defaults. The application is built by `app_factory(config)` inside each worker,
after the fork, so database engines, thread pools and sockets are never shared between
processes. `ClientCertMiddleware` puts the client certificate's subject into
`environ["xdsi.client_subject"]`.

Logging: gunicorn's error log goes to stderr at the level of the root logger; the access log
(only when that level is INFO or finer) records method, path without query string, status,
size and duration - never query strings, headers or bodies, which may carry patient data.
SIGTERM (or SIGINT) stops gracefully: workers finish the requests in flight first.

`[tls] enabled = false` serves plain HTTP, for use behind a TLS-terminating proxy only; a
warning says so at start.

Run as `python -m gateway.soap.server --config FILE --app module:factory [--port N]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import ssl
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gunicorn.app.base import BaseApplication

from gateway.config import ConfigError, GatewayConfig, load
from gateway.security.tls import peer_subject, server_context
from gateway.soap.worker import Deadlines, worker_class

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
else:
    StartResponse = WSGIApplication = WSGIEnvironment = Any

AppFactory = Callable[[GatewayConfig], "WSGIApplication"]

log = logging.getLogger(__name__)

SUBJECT_KEY = "xdsi.client_subject"
# No query string (%(U)s is the path alone), no headers, no body.
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'
PLAIN_HTTP_WARNING = (
    "[tls] enabled = false: serving PLAIN HTTP without TLS or client authentication. "
    "Only do this behind a TLS-terminating proxy that authenticates clients; "
    "IHE ATNA requires mutual TLS on every connection.")


class ClientCertMiddleware:
    """Put the TLS client certificate's subject into `environ["xdsi.client_subject"]`.

    The subject is an RFC 4514 string (`CN=...,O=...`) or None. When TLS is on and client
    certificates are required, a request without one is answered 403 (the handshake already
    refuses such clients; this is a second lock should the TLS context ever be relaxed).
    """

    def __init__(self, app: WSGIApplication, *, tls_enabled: bool,
                 require_client_certificate: bool) -> None:
        self.app = app
        self.tls_enabled = tls_enabled
        self.required = tls_enabled and require_client_certificate

    def __call__(self, environ: WSGIEnvironment,
                 start_response: StartResponse) -> Iterable[bytes]:
        subject = None
        if self.tls_enabled:
            sock = environ.get("gunicorn.socket")
            if isinstance(sock, ssl.SSLSocket):
                subject = peer_subject(sock)
        environ[SUBJECT_KEY] = subject
        if self.required and subject is None:
            body = b"A client certificate is required.\n"
            start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8"),
                                             ("Content-Length", str(len(body)))])
            return [body]
        return self.app(environ, start_response)


def resolve_factory(spec: str) -> AppFactory:
    """`package.module:attribute` -> the callable it names."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected module:factory, got {spec!r}")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{spec} is not callable")
    return target


def _gunicorn_log_level() -> str:
    level = logging.getLogger().getEffectiveLevel()
    for limit, name in ((logging.DEBUG, "debug"), (logging.INFO, "info"),
                        (logging.WARNING, "warning"), (logging.ERROR, "error")):
        if level <= limit:
            return name
    return "critical"


def gunicorn_options(config: GatewayConfig, *, log_level: str | None = None) -> dict[str, Any]:
    """The gunicorn settings for `config` (without the TLS hook, which `GatewayServer` adds)."""
    s, t = config.server, config.tls
    host = f"[{s.host}]" if ":" in s.host else s.host
    level = (log_level or _gunicorn_log_level()).lower()
    options: dict[str, Any] = {
        "bind": [f"{host}:{s.port}"],
        # gthread with request deadlines: slow senders never hold a thread (gateway.soap.worker)
        "worker_class": worker_class(deadlines(config)),
        "workers": s.workers,
        "threads": s.threads,
        "timeout": s.request_timeout_seconds,
        "graceful_timeout": min(30, s.request_timeout_seconds),
        "keepalive": 5,
        "preload_app": False,  # build the application in each worker, after the fork
        "proc_name": "xdsi-gateway",
        "errorlog": "-",
        "loglevel": level,
        "accesslog": "-" if level in ("debug", "info") else None,
        "access_log_format": ACCESS_LOG_FORMAT,
        "capture_output": False,
        # Request line and headers only; the body limit is the application's
        # ([server] max_request_bytes). SOAP requests have short URLs and few headers.
        "limit_request_line": 8190,
        "limit_request_fields": 100,
        "limit_request_field_size": 8190,
        "http_protocols": "h1",
        "sendfile": False,
        "control_socket_disable": True,  # no $HOME/.gunicorn/gunicorn.ctl shared by gateways
    }
    if t.enabled:
        # gunicorn wraps sockets only when certfile/keyfile are set; the context itself comes
        # from the ssl_context hook, so these two are the only TLS settings gunicorn reads.
        options["certfile"] = str(t.certificate)
        options["keyfile"] = str(t.private_key)
    return options


def deadlines(config: GatewayConfig) -> Deadlines:
    """The worker's request and response deadlines from `[server]`."""
    s = config.server
    return Deadlines(header_timeout=float(s.header_timeout_seconds),
                     body_timeout=float(s.body_timeout_seconds),
                     min_body_rate=float(s.min_body_rate_bytes_per_second),
                     send_timeout=float(s.send_timeout_seconds),
                     min_send_rate=float(s.min_send_rate_bytes_per_second))


class GatewayServer(BaseApplication):
    """gunicorn embedded: settings from `GatewayConfig`, the app built per worker."""

    def __init__(self, config: GatewayConfig, app_factory: AppFactory | str, *,
                 log_level: str | None = None) -> None:
        self.config = config
        self.app_factory = app_factory
        self.options = gunicorn_options(config, log_level=log_level)
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)
        if self.config.tls.enabled:
            self.cfg.set("ssl_context", _make_ssl_context_hook(self.config))

    def load(self) -> WSGIApplication:
        factory = (resolve_factory(self.app_factory) if isinstance(self.app_factory, str)
                   else self.app_factory)
        app = factory(self.config)
        tls = self.config.tls
        return ClientCertMiddleware(app, tls_enabled=tls.enabled,
                                    require_client_certificate=tls.require_client_certificate)


def _make_ssl_context_hook(config: GatewayConfig) -> Callable[[Any, Any], ssl.SSLContext]:
    """gunicorn calls the hook for every connection; build the context once per process."""
    cache: dict[int, ssl.SSLContext] = {}

    def ssl_context(_conf: Any, _default_factory: Any) -> ssl.SSLContext:
        pid = os.getpid()
        ctx = cache.get(pid)
        if ctx is None:
            cache.clear()
            ctx = cache[pid] = server_context(config.tls)
        return ctx

    return ssl_context


def serve(config: GatewayConfig, app_factory: AppFactory | str, *,
          log_level: str | None = None) -> None:
    """Serve `app_factory(config)` until SIGTERM/SIGINT; blocks, and ends by SystemExit.

    `app_factory` is a callable or a `module:attribute` string (imported in each worker).
    `log_level` (debug, info, warning, error) defaults to the root logger's level.
    """
    if config.tls.enabled:
        server_context(config.tls)  # fail here, with the reason, not in every worker
    else:
        if logging.getLogger().hasHandlers():
            log.warning(PLAIN_HTTP_WARNING)
        else:
            print(f"WARNING: {PLAIN_HTTP_WARNING}", file=sys.stderr, flush=True)
    GatewayServer(config, app_factory, log_level=log_level).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.soap.server",
        description="Serve a WSGI application factory with the gateway's HTTPS/mutual TLS.")
    parser.add_argument("--config", required=True, help="TOML configuration file")
    parser.add_argument("--app", required=True,
                        help="application factory, module:callable taking a GatewayConfig")
    parser.add_argument("--host", help="override [server] host")
    parser.add_argument("--port", type=int, help="override [server] port")
    parser.add_argument("--log-level", default="warning",
                        choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load(Path(args.config))
        server = config.server
        if args.host is not None:
            server = dataclasses.replace(server, host=args.host)
        if args.port is not None:
            if not 0 < args.port < 65536:
                raise ConfigError(f"--port: {args.port} is not a TCP port")
            server = dataclasses.replace(server, port=args.port)
        config = dataclasses.replace(config, server=server)
        resolve_factory(args.app)  # an unknown factory fails now, not in every worker
    except (ConfigError, ValueError, TypeError, ImportError, AttributeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config.tls.enabled:
        try:
            server_context(config.tls)
        except (ssl.SSLError, OSError, ValueError) as exc:
            print(f"error: [tls]: cannot build the TLS context: {exc}", file=sys.stderr)
            return 2
    serve(config, args.app, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
