"""XUA forwarding by the initiating gateways: the consumer's wsse:Security header goes out
unchanged (its signed assertion still verifies after the trip through SoapClient), or the
configured `[xua] outbound_assertion` when the consumer sent none."""

from __future__ import annotations

import copy
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from gateway.config import ConfigError, GatewayConfig, from_dict
from gateway.ebrim.model import AdhocQuery, Slot
from gateway.ebrim.render import render_adhoc_query_request
from gateway.ebrim.xmlsafe import parse_xml
from gateway.ns import QUERY, SAML2, SOAP12, WSSE, Action, StoredQuery, q
from gateway.security import xua
from gateway.soap.client import SoapClient, SoapReply
from gateway.transactions import RequestContext
from gateway.xca import initiating
from gateway.xca.outbound import security_headers
from tests.support import saml
from tests.support.config import plain_community

B = "urn:oid:1.2.3.4.2"
C = "urn:oid:1.2.3.4.3"


def config(tmp_path: Path, **xua_keys: Any) -> GatewayConfig:
    raw: dict[str, Any] = {
        **plain_community(),
        "xua": xua_keys,
        "communities": [{"home_community_id": h,
                         "query_url": f"https://{h[-1]}.example/xca/responding",
                         "retrieve_url": f"https://{h[-1]}.example/xca/responding"}
                        for h in (B, C)],
    }
    return from_dict(raw, tmp_path)


@pytest.fixture(scope="module")
def idp() -> saml.TestIdp:
    return saml.TestIdp.create()


def consumer_headers(*blocks: etree._Element) -> tuple[etree._Element, ...]:
    """The header blocks as the edge hands them to a handler: parsed from the wire."""
    body = etree.Element(q(QUERY, "AdhocQueryRequest"))
    env = parse_xml(saml.envelope(body, Action.ITI18, *blocks))
    header = env.find(q(SOAP12, "Header"))
    assert header is not None
    return tuple(header)


def assertion_in(block: etree._Element) -> etree._Element:
    found = block.find(q(SAML2, "Assertion"))
    assert found is not None
    return found


def c14n(el: etree._Element) -> bytes:
    return etree.tostring(el, method="c14n", exclusive=True)


# --- a plain HTTP endpoint that records what SoapClient sent ---------------------------------

class _Capture(http.server.BaseHTTPRequestHandler):
    received: list[bytes] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        _Capture.received.append(self.rfile.read(length))
        answer = (b'<?xml version="1.0" encoding="UTF-8"?><s:Envelope xmlns:s="' + SOAP12.encode()
                  + b'"><s:Body><ok xmlns="urn:test"/></s:Body></s:Envelope>')
        self.send_response(200)
        self.send_header("Content-Type", "application/soap+xml; charset=UTF-8")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[tuple[SoapClient, list[bytes]]]:
    _Capture.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = SoapClient(f"http://127.0.0.1:{server.server_address[1]}", ca_bundle=None,
                        certificate=None, private_key=None, timeout=10)
    try:
        yield client, _Capture.received
    finally:
        client.close()
        server.shutdown()
        server.server_close()


# --- the tests --------------------------------------------------------------------------------

def test_consumer_assertion_goes_out_unchanged_and_still_verifies(
        idp: saml.TestIdp, tmp_path: Path, endpoint: tuple[SoapClient, list[bytes]]) -> None:
    client, received = endpoint
    signed = idp.assertion()
    incoming = consumer_headers(saml.security_header(signed))
    out = security_headers(config(tmp_path), incoming)
    assert len(out) == 1
    body = etree.Element(q(QUERY, "AdhocQueryRequest"))
    reply = client.call("/xca/responding", Action.ITI38, body, headers=out)
    assert reply.http_status == 200 and not reply.is_fault
    (sent,) = received
    env = parse_xml(sent)
    header = env.find(q(SOAP12, "Header"))
    assert header is not None
    blocks = header.findall(q(WSSE, "Security"))
    assert len(blocks) == 1
    assert blocks[0].get(q(SOAP12, "mustUnderstand")) == "true"
    # the very block the consumer sent: same attributes, same children byte for byte in
    # canonical form (only the prefix of the SOAP namespace may be the envelope's own)
    assert dict(blocks[0].attrib.items()) == dict(incoming[-1].attrib.items())
    assert [c14n(c) for c in blocks[0]] == [c14n(c) for c in incoming[-1]]
    forwarded = assertion_in(blocks[0])
    assert c14n(forwarded) == c14n(signed)
    subject = xua.verify(forwarded, idp.policy())
    assert subject.name_id == "dr.house@hospital.example.org"
    # and as the responding gateway's edge checks it
    checked = xua.check_security(tuple(header), "/xca/responding", idp.policy(required=True))
    assert checked is not None and checked.name_id == subject.name_id
    # WS-Addressing still comes first, the caller's elements were not moved
    assert header[0].tag.endswith("}Action")
    assert incoming[-1].find(q(SAML2, "Assertion")) is not None


def test_a_tampered_forward_would_fail(idp: saml.TestIdp, tmp_path: Path) -> None:
    """The round trip test above could fail: a changed assertion does not verify."""
    incoming = consumer_headers(saml.security_header(saml.tampered(idp.assertion())))
    out = security_headers(config(tmp_path), incoming)
    with pytest.raises(xua.XuaError):
        xua.verify(assertion_in(out[0]), idp.policy())


def test_no_consumer_header_and_none_configured_sends_nothing(tmp_path: Path) -> None:
    assert security_headers(config(tmp_path), consumer_headers()) == ()


def test_configured_assertion_when_the_consumer_sent_none(
        idp: saml.TestIdp, tmp_path: Path, endpoint: tuple[SoapClient, list[bytes]]) -> None:
    client, received = endpoint
    signed = idp.assertion(name_id="gateway@node.example.org")
    path = tmp_path / "assertion.xml"
    path.write_bytes(etree.tostring(signed))
    cfg = config(tmp_path, outbound_assertion="assertion.xml")
    out = security_headers(cfg, consumer_headers())
    assert len(out) == 1 and out[0].tag == q(WSSE, "Security")
    assert out[0].get(q(SOAP12, "mustUnderstand")) == "true"
    client.call("/x", Action.ITI38, etree.Element(q(QUERY, "AdhocQueryRequest")), headers=out)
    env = parse_xml(received[0])
    sent = env.find(f"{q(SOAP12, 'Header')}/{q(WSSE, 'Security')}/{q(SAML2, 'Assertion')}")
    assert sent is not None
    assert xua.verify(sent, idp.policy()).name_id == "gateway@node.example.org"
    # the consumer's own assertion wins over the configured one
    theirs = idp.assertion()
    out = security_headers(cfg, consumer_headers(saml.security_header(theirs)))
    assert c14n(assertion_in(out[0])) == c14n(theirs)


def test_configured_file_is_reread_when_it_changes(idp: saml.TestIdp, tmp_path: Path) -> None:
    path = tmp_path / "assertion.xml"
    first = idp.assertion(name_id="first@node.example.org")
    path.write_bytes(etree.tostring(saml.security_header(first)))  # a whole wsse:Security
    cfg = config(tmp_path, outbound_assertion=str(path))
    (block,) = security_headers(cfg, ())
    assert xua.verify(assertion_in(block), idp.policy()).name_id == "first@node.example.org"
    second = idp.assertion(name_id="second-renewed@node.example.org")
    path.write_bytes(etree.tostring(second))
    (block,) = security_headers(cfg, ())
    assert xua.verify(assertion_in(block), idp.policy()).name_id == \
        "second-renewed@node.example.org"
    path.write_bytes(b"<!DOCTYPE x [<!ENTITY e 'x'>]><x>&e;</x>")
    assert security_headers(cfg, ()) == ()  # refused, with a warning, not sent


def test_configured_assertion_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^\[xua\] outbound_assertion: file not found"):
        config(tmp_path, outbound_assertion="missing.xml")


def test_a_block_for_another_role_is_not_forwarded(idp: saml.TestIdp, tmp_path: Path) -> None:
    other = saml.security_header(idp.assertion())
    other.set(q(SOAP12, "role"), "urn:example:some-other-node")
    assert security_headers(config(tmp_path), consumer_headers(other)) == ()


class _RecordingPool:
    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[etree._Element, ...]]] = []
        self.lock = threading.Lock()

    def call(self, url: str, action: str, body: etree._Element, *, read_timeout: float,
             spool_dir: Path | None = None, headers: Any = ()) -> SoapReply:
        with self.lock:
            self.sent.append((url, tuple(headers)))
        raise ConnectionError("no network in this test")


def test_initiating_gateway_sends_it_to_every_community(
        idp: saml.TestIdp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = _RecordingPool()
    monkeypatch.setattr(initiating, "pool_for", lambda _cfg: pool)
    signed = idp.assertion()
    headers = consumer_headers(saml.security_header(signed))
    ctx = RequestContext("/xca/initiating", Action.ITI18, None, None, {}, tmp_path,
                         headers=headers)

    class Services:
        config = config(tmp_path)

    query = render_adhoc_query_request(AdhocQuery(
        query_id=StoredQuery.FIND_DOCUMENTS, return_type="LeafClass", parameters=(
            Slot("$XDSDocumentEntryPatientId", ("'P1^^^&1.2.3.9&ISO'",)),
            Slot("$XDSDocumentEntryStatus",
                 ("('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')",)))))
    initiating.stored_query(Services(), ctx, copy.deepcopy(query))
    assert sorted(url for url, _ in pool.sent) == ["https://2.example/xca/responding",
                                                    "https://3.example/xca/responding"]
    for _url, sent in pool.sent:
        assert len(sent) == 1
        assert c14n(assertion_in(sent[0])) == c14n(signed)
        xua.verify(assertion_in(sent[0]), idp.policy())
    # each community got its own copy (they are sent from parallel threads)
    assert pool.sent[0][1][0] is not pool.sent[1][1][0]
