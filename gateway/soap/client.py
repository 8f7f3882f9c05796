"""An outbound SOAP 1.2 client with mutual TLS, WS-Addressing and streaming MTOM.

Used by the demo, the benchmarks and (later) the initiating gateways. Requests with
attachments are sent as MTOM streamed from files with an exact Content-Length; MTOM responses
are stream-parsed with their attachments spooled to files, so neither direction holds a
document in memory. The root part of a response is the one the multipart `start` parameter
names, wherever it comes: a RAD-69 answered root-last (`[pacs] response_order`, chunked,
the root after every instance) reads like one answered root-first.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests
from lxml import etree

from gateway.ebrim.xmlsafe import parse_xml
from gateway.ns import SOAP12, WSA, q
from gateway.soap.mtom import mtom_response, parse_multipart, resolve_cid
from gateway.transactions import Attachment

MAX_ENVELOPE_BYTES = 64 * 1024 * 1024


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
        with self.session.post(url, data=payload, headers=http_headers, stream=True,
                               timeout=self.timeout) as resp:
            return self._reply(resp, spool_dir)

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
                max_total_bytes=1 << 40)
        else:
            root = resp.raw.read(MAX_ENVELOPE_BYTES + 1, decode_content=True)
            if len(root) > MAX_ENVELOPE_BYTES:
                raise ValueError("response envelope larger than 64 MiB")
        env = parse_xml(root)
        body_el = env.find(q(SOAP12, "Body"))
        first = None if body_el is None or len(body_el) == 0 else body_el[0]
        return SoapReply(resp.status_code, env, first, attachments)
