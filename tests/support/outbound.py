"""A fake outbound pool for the XCA unit tests, so gateways run without a network.

`FakePool` stands in for gateway.xca.outbound.OutboundPool: each call is answered by
`responders[first letter of the URL's host]` (a `Responder`) and recorded in `calls`;
`stream` replays such an answer as a streamed reply (the root first, then the attachments).
`reply` wraps a body in a SOAP 1.2 reply, `refusing` is a community that cannot be reached, and
`Audit` records the outbound ATNA records a handler asks for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from lxml import etree

from gateway.ns import SOAP12, q
from gateway.soap.client import SoapReply
from gateway.transactions import Attachment

Responder = Callable[[str, str, etree._Element, Path | None], SoapReply]


class Audit:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, int | None]] = []

    def record_outbound(self, transaction: str, *, endpoint_url: str, request_body: Any,
                        response_body: Any, outcome: int | None, human: Any = None) -> None:
        self.records.append((transaction, endpoint_url, outcome))


class FakePool:
    """Stands in for OutboundPool: `responders[first letter of the URL's host]` answers."""

    def __init__(self, responders: dict[str, Responder] | None = None):
        self.responders: dict[str, Responder] = responders if responders is not None else {}
        self.calls: list[tuple[str, str, etree._Element]] = []
        self.lock = threading.Lock()

    def call(self, url: str, action: str, body: etree._Element, *, read_timeout: float,
             spool_dir: Path | None = None, headers: Any = ()) -> SoapReply:
        with self.lock:
            self.calls.append((url, action, body))
        return self.responders[url.split("//")[1][0]](url, action, body, spool_dir)

    @contextmanager
    def stream(self, url: str, action: str, body: etree._Element, *, read_timeout: float,
               spool_dir: Path, deadline: float | None = None, headers: Any = (),
               pipe_after_root: bool = False
               ) -> Iterator[Any]:
        """OutboundPool.stream over `call`: the root first, then the attachments."""
        whole = self.call(url, action, body, read_timeout=read_timeout, spool_dir=spool_dir,
                          headers=headers)

        class Streamed:
            complete = False

            def events(self) -> Iterator[Any]:
                yield SoapReply(whole.http_status, whole.envelope, whole.body, {})
                yield from whole.attachments.values()
                self.complete = True

        yield Streamed()


def reply(body: etree._Element, attachments: dict[str, Attachment] | None = None) -> SoapReply:
    env = etree.Element(q(SOAP12, "Envelope"))
    etree.SubElement(env, q(SOAP12, "Body")).append(body)
    return SoapReply(200, env, body, attachments or {})


def refusing(url: str, action: str, body: etree._Element, spool: Path | None) -> SoapReply:
    raise requests.ConnectionError("connection refused")
