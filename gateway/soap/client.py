"""An outbound SOAP 1.2 client with mutual TLS, WS-Addressing and streaming MTOM.

Used by the demo, the benchmarks and (later) the initiating gateways. Requests with
attachments are sent as MTOM streamed from files with an exact Content-Length; MTOM responses
are stream-parsed with their attachments spooled to files, so neither direction holds a
document in memory. The root part of a response is the one the multipart `start` parameter
names, wherever it comes: a RAD-69 answered root-last (`[pacs] response_order`, chunked,
the root after every instance) reads like one answered root-first.

`SoapClient.stream()` is the streaming variant: a `StreamedReply` whose `events()` yields each
MIME part of the reply as soon as its closing delimiter is read: every attachment as an
`Attachment` (its file in the spool folder complete, never in memory), the root part as a
`SoapReply` (parsed by the hardened parser, without attachments) wherever it comes, first or
last. The caller passes the parts on while the rest still arrives (gateway.xca.initiating).
With `pipe_after_root`, a part that comes after the root is not spooled: it is yielded as a
`gateway.soap.multipart.PartStream` as soon as its headers are read, its bytes handed over
chunk by chunk as they arrive (`iter_multipart_piped`).
"""

from __future__ import annotations

import copy
import http.client
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from lxml import etree
from urllib3.exceptions import ProtocolError

from gateway.ebrim.xmlsafe import parse_xml
from gateway.ns import SOAP12, WSA, q
from gateway.soap.mtom import mtom_response, parse_multipart, resolve_cid
from gateway.soap.multipart import (
    AttachmentMap,
    MultipartError,
    PartStream,
    RootPart,
    iter_multipart,
    iter_multipart_piped,
)
from gateway.transactions import Attachment

MAX_ENVELOPE_BYTES = 64 * 1024 * 1024
# Read size of `call()` for a multipart reply (spooled to files): with 1 MiB reads instead of
# the parser's 256 KiB the client spent about 0.05 CPU s less on a RAD-69 reply of 263 MB
# through the gateway (fewer passes through urllib3, http.client and the parser, fewer
# read/write alternations with the sender on a busy machine). `stream()` keeps the parser's
# default: its deadline is checked between reads.
RECEIVE_CHUNK = 1024 * 1024


@dataclass
class SoapReply:
    http_status: int
    envelope: etree._Element
    body: etree._Element | None  # first child of soap:Body
    attachments: dict[str, Attachment] = field(default_factory=dict)

    @property
    def is_fault(self) -> bool:
        return self.body is not None and self.body.tag == q(SOAP12, "Fault")

    def attachment_path(self, content_id: str | None) -> Path | None:
        """The spooled file of the attachment an xop:Include named, if it arrived."""
        found = resolve_cid(self.attachments, content_id) if content_id else None
        return found.path if found is not None else None


def envelope(action: str, to: str, body: etree._Element,
             headers: Sequence[etree._Element] = ()) -> tuple[bytes, str]:
    """A SOAP 1.2 envelope with WS-Addressing headers; returns (bytes, MessageID).

    `headers` (e.g. a wsse:Security block with a signed XUA assertion) are copied, unchanged,
    into soap:Header after the WS-Addressing blocks; the caller's elements are not moved."""
    message_id = f"urn:uuid:{uuid.uuid4()}"
    env = etree.Element(q(SOAP12, "Envelope"), nsmap={"s": SOAP12, "a": WSA})
    header = etree.SubElement(env, q(SOAP12, "Header"))
    a = etree.SubElement(header, q(WSA, "Action"))
    a.set(q(SOAP12, "mustUnderstand"), "true")
    a.text = action
    etree.SubElement(header, q(WSA, "MessageID")).text = message_id
    reply_to = etree.SubElement(header, q(WSA, "ReplyTo"))
    etree.SubElement(reply_to, q(WSA, "Address")).text = \
        "http://www.w3.org/2005/08/addressing/anonymous"
    t = etree.SubElement(header, q(WSA, "To"))
    t.set(q(SOAP12, "mustUnderstand"), "true")
    t.text = to
    for extra in headers:
        block = copy.deepcopy(extra)
        block.tail = None
        header.append(block)
    etree.SubElement(env, q(SOAP12, "Body")).append(body)
    return etree.tostring(env, xml_declaration=True, encoding="UTF-8"), message_id


class _SizedBody:
    """An iterable body with a length, so requests sends Content-Length, not chunked."""

    def __init__(self, chunks: Iterable[bytes], length: int):
        self._chunks = chunks
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._chunks)


class SoapClient:
    def __init__(self, base_url: str, *, ca_bundle: Path | None, certificate: Path | None,
                 private_key: Path | None,
                 timeout: float | tuple[float, float] = 300.0):  # (connect, read)
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE must not override verify
        self.session.verify = str(ca_bundle) if ca_bundle else True
        if certificate and private_key:
            self.session.cert = (str(certificate), str(private_key))

    def close(self) -> None:
        self.session.close()

    def call(self, path: str, action: str, body: etree._Element, *,
             attachments: Sequence[Attachment] = (), spool_dir: Path | None = None,
             force_mtom: bool = False,
             headers: Sequence[etree._Element] = ()) -> SoapReply:
        """POST one request; `headers` are extra SOAP header blocks (copied unchanged)."""
        with self._post(path, action, body, attachments, force_mtom, headers) as resp:
            return self._reply(resp, spool_dir)

    def stream(self, path: str, action: str, body: etree._Element, *, spool_dir: Path,
               headers: Sequence[etree._Element] = (),
               deadline: float | None = None, pipe_after_root: bool = False) -> StreamedReply:
        """POST one request and return its reply unread: `StreamedReply.events()` yields the
        parts as they arrive (module docstring). `deadline` (time.monotonic()) bounds the
        whole reply, on top of the read timeout of every socket read. With
        `pipe_after_root`, the parts after the root are not spooled but handed over chunk by
        chunk (`PartStream`). Close the reply."""
        resp = self._post(path, action, body, (), False, headers)
        return StreamedReply(resp, spool_dir, deadline, pipe_after_root=pipe_after_root)

    def _post(self, path: str, action: str, body: etree._Element,
              attachments: Sequence[Attachment], force_mtom: bool,
              headers: Sequence[etree._Element]) -> requests.Response:
        url = self.base_url + path
        data, _message_id = envelope(action, url, body, headers)
        http_headers = {}
        payload: _SizedBody | bytes
        if attachments or force_mtom:
            content_type, length, chunks = mtom_response(data, attachments, soap_action=action)
            http_headers["Content-Type"] = content_type
            payload = _SizedBody(chunks, length)
        else:
            http_headers["Content-Type"] = \
                f'application/soap+xml; charset=UTF-8; action="{action}"'
            payload = data
        return self.session.post(url, data=payload, headers=http_headers, stream=True,
                                 timeout=self.timeout)

    def get(self, path: str) -> requests.Response:
        return self.session.get(self.base_url + path, timeout=self.timeout)

    def _reply(self, resp: requests.Response, spool_dir: Path | None) -> SoapReply:
        ctype = resp.headers.get("Content-Type", "")
        attachments: dict[str, Attachment] = {}
        if ctype.lower().startswith("multipart/related"):
            if spool_dir is None:
                raise ValueError("an MTOM response needs a spool_dir for its attachments")
            resp.raw.decode_content = True
            root, attachments = parse_multipart(
                resp.raw, ctype, spool_dir, max_envelope_bytes=MAX_ENVELOPE_BYTES,
                max_total_bytes=1 << 40, chunk_size=RECEIVE_CHUNK)
        else:
            root = resp.raw.read(MAX_ENVELOPE_BYTES + 1, decode_content=True)
            if len(root) > MAX_ENVELOPE_BYTES:
                raise ValueError("response envelope larger than 64 MiB")
        return _soap_reply(resp.status_code, root, attachments)


def _soap_reply(status: int, root: bytes, attachments: dict[str, Attachment]) -> SoapReply:
    env = parse_xml(root)
    body_el = env.find(q(SOAP12, "Body"))
    first = None if body_el is None or len(body_el) == 0 else body_el[0]
    return SoapReply(status, env, first, attachments)


class ReplyTimeout(Exception):
    """The whole reply did not arrive before the deadline of `SoapClient.stream` (not an
    OSError: the multipart parser turns those into MultipartError)."""


class _DeadlineReader:
    """A readable over a streamed HTTP body for the multipart parser.

    Raises `ReplyTimeout` once `deadline` has passed (checked before every read; each read
    is bounded by the socket's read timeout). Reads whole blocks (`read(size)`: the bytes
    are gathered by http.client's buffered reader; `read1` would hand over one TLS record of
    16 KiB at a time through urllib3's and the parser's Python code). When
    the connection breaks, the bytes of the complete HTTP chunks of the failed read (which
    http.client keeps in its IncompleteRead) are returned first and the error is raised by
    the next read, so a part that was complete before the break is still handed over.
    """

    def __init__(self, raw: Any, deadline: float | None):
        self._raw = raw
        self._deadline = deadline
        self._error: BaseException | None = None

    def read(self, size: int = -1, /) -> bytes:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise ReplyTimeout("the reply did not arrive in time")
        try:
            data: bytes = self._raw.read(size)
        except ProtocolError as exc:
            cause = exc.args[1] if len(exc.args) > 1 else None
            partial = getattr(cause, "partial", None)
            if isinstance(cause, http.client.IncompleteRead) and isinstance(partial, bytes) \
                    and partial:
                self._error = exc
                return partial
            raise
        return data


class StreamedReply:
    """A reply read part by part (`SoapClient.stream`). Iterate `events()` once; `close()`
    (idempotent) closes the HTTP response; the connection is reused only when the whole
    reply was read (`complete`)."""

    def __init__(self, resp: requests.Response, spool_dir: Path, deadline: float | None, *,
                 pipe_after_root: bool = False):
        self.response = resp
        self.pipe_after_root = pipe_after_root
        self.http_status = resp.status_code
        self.content_type = resp.headers.get("Content-Type", "")
        self.spool_dir = spool_dir
        self.deadline = deadline
        self.complete = False
        self.root: SoapReply | None = None
        self.parts: dict[str, Attachment] = {}
        self._events: Iterator[Attachment | PartStream | SoapReply] | None = None

    def events(self) -> Iterator[Attachment | PartStream | SoapReply]:
        """The one iterator of this reply's parts (`_read`); every call returns it."""
        if self._events is None:
            self._events = self._read()
        return self._events

    def _read(self) -> Iterator[Attachment | PartStream | SoapReply]:
        """Every attachment as it completes and the root part (a `SoapReply` without
        attachments) when it is read, in the order of the message; with `pipe_after_root`
        every attachment after the root as a `PartStream` once its headers are read (read
        its chunks before the next event; `iter_multipart_piped`). Raises `MultipartError`
        (malformed or cut short), `ValueError` (root not XML or too large), `ReplyTimeout`,
        and requests' / urllib3's read errors and timeouts."""
        resp = self.response
        resp.raw.decode_content = True
        reader = _DeadlineReader(resp.raw, self.deadline)
        if not self.content_type.lower().startswith("multipart/related"):
            root = reader.read(MAX_ENVELOPE_BYTES + 1)
            if len(root) > MAX_ENVELOPE_BYTES:
                raise ValueError("response envelope larger than 64 MiB")
            self.root = _soap_reply(self.http_status, root, {})
            self.complete = True
            yield self.root
            return
        items: Iterator[RootPart | Attachment | PartStream]
        if self.pipe_after_root:
            items = iter_multipart_piped(reader, self.content_type, self.spool_dir,
                                         max_envelope_bytes=MAX_ENVELOPE_BYTES,
                                         max_total_bytes=1 << 40)
        else:
            items = iter_multipart(reader, self.content_type, self.spool_dir,
                                   max_envelope_bytes=MAX_ENVELOPE_BYTES,
                                   max_total_bytes=1 << 40)
        for item in items:
            if isinstance(item, RootPart):
                self.root = _soap_reply(self.http_status, item.data, {})
                yield self.root
            elif isinstance(item, PartStream):
                yield item
            else:
                self.parts[item.content_id] = item
                yield item
        self.complete = True

    def collect(self) -> SoapReply:
        """Read what is left; the whole reply as `SoapClient.call` returns it."""
        for _ in self.events():
            pass
        if self.root is None:  # pragma: no cover - events() raises first
            raise MultipartError("multipart body has no root part")
        return self.reply()

    def reply(self) -> SoapReply:
        """The root with the attachments read so far (after `events()` ended)."""
        assert self.root is not None
        return SoapReply(self.root.http_status, self.root.envelope, self.root.body,
                         AttachmentMap(self.parts))

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> StreamedReply:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
