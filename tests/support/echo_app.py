"""A trivial WSGI application factory for server tests.

GET /subject  -> JSON {"subject": environ["xdsi.client_subject"], "pid": ...,
                 "factory_pid": <process that called app_factory>, "scheme": ...}
GET /big?bytes=N -> N bytes streamed in 64 KiB chunks with an exact Content-Length; byte i is
                    i % 251, so the client can check every byte.
POST /upload     -> JSON {"bytes": N, "sha256": ...} of the request body, read in 64 KiB reads.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

from gateway.config import GatewayConfig

CHUNK = 64 * 1024
PATTERN = bytes(i % 251 for i in range(251 * CHUNK))  # period 251, whole multiple of CHUNK


def pattern(offset: int, size: int) -> bytes:
    start = offset % 251
    return PATTERN[start:start + size]


def _chunks(total: int) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        size = min(CHUNK, total - sent)
        yield pattern(sent, size)
        sent += size


def app_factory(config: GatewayConfig) -> Any:
    factory_pid = os.getpid()  # the server builds the app in each worker, after the fork

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/subject":
            body = json.dumps({"subject": environ.get("xdsi.client_subject"),
                               "pid": os.getpid(), "factory_pid": factory_pid,
                               "scheme": environ.get("wsgi.url_scheme")}).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if path == "/upload" and environ.get("REQUEST_METHOD") == "POST":
            digest, size, stream = hashlib.sha256(), 0, environ["wsgi.input"]
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
            body = json.dumps({"bytes": size, "sha256": digest.hexdigest()}).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if path == "/big":
            total = int(parse_qs(environ.get("QUERY_STRING", "")).get("bytes", ["0"])[0])
            start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                      ("Content-Length", str(total))])
            return _chunks(total)
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]

    return app
