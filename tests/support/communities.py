"""Several gateway communities on loopback, for integration tests and benchmarks.

`community_config` writes a gateway configuration (gateway.demo.write_config) under another
homeCommunityId, with extra TOML appended (the dev PKI's node certificate serves and is also
the client certificate of an initiating gateway's outbound calls); `gateway_client` is a
consumer's mutual-TLS client of one of them; `submit` loads a community's repository with the
demo's documents (ITI-41); `PeerServer` stands in for a misbehaving community (an HTTPS server
with mutual TLS running a test's own `QuietHandler`); `shut_down` closes the clients and stops
the servers of one run.
"""

from __future__ import annotations

import dataclasses
import http.server
import os
import ssl
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from lxml import etree

from gateway.demo import (
    HOME,
    ORG_ROOT,
    provide_and_register_body,
    sample_documents,
    write_config,
)
from gateway.ns import Action, ResponseStatus
from gateway.security.pki import (
    DevPki,
)
from gateway.soap.client import SoapClient


class Stoppable(Protocol):
    def stop(self) -> object: ...


def community_config(workdir: Path, pki: DevPki, port: int, home: str,
                     extra: str = "", *, workers: int = 1) -> Path:
    """The demo configuration in `workdir` for community `home`, `extra` appended."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = write_config(workdir, pki, port, workers=workers)
    text = path.read_text().replace(f'"{HOME}"', f'"{home}"')
    assert f'"{home}"' in text
    path.write_text(text + extra)
    return path


def shut_down(clients: Iterable[SoapClient], *servers: Stoppable) -> None:
    """Close every client, then stop the servers in the order given."""
    for c in clients:
        c.close()
    for s in servers:
        s.stop()


def gateway_client(pki: DevPki, port: int, clients: list[SoapClient]) -> SoapClient:
    """A client of the gateway on `port` with the dev PKI's client certificate, added to
    `clients` (for `shut_down`)."""
    c = SoapClient(f"https://localhost:{port}", ca_bundle=pki.ca_cert,
                   certificate=pki.client_cert, private_key=pki.client_key, timeout=60)
    clients.append(c)
    return c


def submit(client: SoapClient, workdir: Path, patient: str, tag: str
           ) -> dict[str, Path]:
    """ITI-41 of the demo's report and KOS manifest for `patient`; uniqueId -> file."""
    workdir.mkdir(parents=True, exist_ok=True)
    entries = [(dataclasses.replace(values, patient_id=patient,
                                    unique_id=f"{values.unique_id}.{tag}"
                                    if values.mime_type == "text/plain" else values.unique_id),
                path) for values, path in sample_documents(workdir)]
    root, attachments = provide_and_register_body(
        entries, f"{ORG_ROOT}.30.{tag}.{os.getpid()}.{time.time_ns()}", patient=patient)
    reply = client.call("/xds/repository", Action.ITI41, root, attachments=attachments)
    assert reply.body is not None and reply.body.get("status") == ResponseStatus.SUCCESS, \
        etree.tostring(reply.envelope)
    return {v.unique_id: p for v, p in entries}


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A request handler that logs nothing (a `PeerServer` test's handlers derive from it)."""

    def log_message(self, format: str, *args: object) -> None:
        pass


class PeerServer:
    """HTTPS with mutual TLS (the dev PKI's server certificate, clients of its CA) on a free
    loopback port, serving `handler` in a thread per request until `stop()`."""

    def __init__(self, pki: DevPki, handler: type[http.server.BaseHTTPRequestHandler]):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port: int = self.server.server_address[1]
        self.server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        ctx.load_verify_locations(cafile=str(pki.ca_cert))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
