"""The SOAP 1.2 edge driven as a WSGI callable: routing, faults, WS-Addressing, logging."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from gateway.config import GatewayConfig, RegistryConfig, RepositoryConfig, ServerConfig
from gateway.errors import SoapFault, XdsError, XdsFailure
from gateway.ns import QUERY, RS, SOAP12, WSA, XDSB, Action, ErrorCode, ResponseStatus
from gateway.soap.application import app_factory, failure_body, make_app
from gateway.transactions import (
    ENDPOINTS,
    Attachment,
    Endpoint,
    RequestContext,
    SoapResponse,
    Transaction,
)

NS = {"env": SOAP12, "wsa": WSA, "rs": RS, "query": QUERY, "xdsb": XDSB}
BODY_NS = "urn:test:edge"
MARKER = "PATIENTMARKER-4711^^^&1.2.3.4&ISO"
MARKER_XML = MARKER.replace("&", "&amp;")
SECRET = "secret-internal-detail-0815"

# --- test handlers (looked up by the edge from Transaction.handler) -----------------------------

CALLS: list[tuple[str, RequestContext, etree._Element]] = []


def _reply(tag: str, ctx: RequestContext, body: etree._Element) -> SoapResponse:
    CALLS.append((tag, ctx, body))
    out = etree.Element(f"{{{BODY_NS}}}Reply", nsmap={"t": BODY_NS})
    out.set("handler", tag)
    out.set("body", etree.QName(body).localname)
    out.set("children", str(len(body)))
    return SoapResponse(out)


def handler_a(services: Any, ctx: RequestContext, body: etree._Element) -> SoapResponse:
    return _reply("a", ctx, body)


def handler_b(services: Any, ctx: RequestContext, body: etree._Element) -> SoapResponse:
    return _reply("b", ctx, body)


def handler_query_failure(services: Any, ctx: RequestContext,
                          body: etree._Element) -> SoapResponse:
    raise XdsFailure(XdsError(ErrorCode.UNKNOWN_STORED_QUERY, "no such query"))


def handler_crash(services: Any, ctx: RequestContext, body: etree._Element) -> SoapResponse:
    raise RuntimeError(f"{SECRET} {MARKER}")


def handler_soap_fault(services: Any, ctx: RequestContext,
                       body: etree._Element) -> SoapResponse:
    raise SoapFault("Sender", "security header rejected", subcode=(WSA, "InvalidAddressingHeader"))


def handler_spool(services: Any, ctx: RequestContext, body: etree._Element) -> SoapResponse:
    assert ctx.spool_dir.is_dir()
    produced = ctx.spool_dir / "produced.bin"
    produced.write_bytes(b"\x00\x01payload\x02")
    CALLS.append(("spool", ctx, body))
    out = etree.Element(f"{{{BODY_NS}}}Reply")
    inc = etree.SubElement(out, "{http://www.w3.org/2004/08/xop/include}Include")
    inc.set("href", "cid:doc1@test")
    extra = ctx.spool_dir.parent / f"{ctx.spool_dir.name}-cleanup.tmp"
    extra.write_bytes(b"x")
    att = Attachment("doc1@test", produced, produced.stat().st_size, "application/dicom")
    return SoapResponse(out, attachments=(att,), cleanup=[extra])


def handler_plain_cleanup(services: Any, ctx: RequestContext,
                          body: etree._Element) -> SoapResponse:
    extra = ctx.spool_dir.parent / f"{ctx.spool_dir.name}-plain.tmp"
    extra.write_bytes(b"x")
    CALLS.append(("plain", ctx, body))
    return SoapResponse(etree.Element(f"{{{BODY_NS}}}Reply"), cleanup=[extra])


def _h(name: str) -> str:
    return f"{__name__}:{name}"


A = Transaction("T-A", "Test A", "urn:test:ActionA", "urn:test:ActionAResponse", _h("handler_a"))
B = Transaction("T-B", "Test B", "urn:test:ActionB", "urn:test:ActionBResponse", _h("handler_b"))
QFAIL = Transaction("T-Q", "Query failing", "urn:test:Query", Action.ITI18_RESPONSE,
                    _h("handler_query_failure"))
CRASH = Transaction("T-C", "Crashing", "urn:test:Crash", "urn:test:CrashResponse",
                    _h("handler_crash"))
SFAULT = Transaction("T-F", "Faulting", "urn:test:Fault", "urn:test:FaultResponse",
                     _h("handler_soap_fault"))
SPOOL = Transaction("T-S", "Spooling", "urn:test:Spool", "urn:test:SpoolResponse",
                    _h("handler_spool"), mtom_response=True)
PLAIN = Transaction("T-P", "Plain cleanup", "urn:test:Plain", "urn:test:PlainResponse",
                    _h("handler_plain_cleanup"))
MISSING = Transaction("T-M", "Missing module", "urn:test:Missing", "urn:test:MissingResponse",
                      "tests.unit.no_such_module:handler")
UNBUILT = Transaction("T-U", "Unbuilt Transaction", "urn:test:Unbuilt",
                      "urn:test:UnbuiltResponse", None)
TEST_ENDPOINT = Endpoint("/test/edge", "Test edge", "registry.wsdl",
                         (A, B, QFAIL, CRASH, SFAULT, SPOOL, PLAIN, MISSING, UNBUILT))
OTHER_ENDPOINT = Endpoint("/test/other", "Other", "registry.wsdl", (A,))


# --- fixtures and helpers ----------------------------------------------------------------------

def _config(tmp_path: Path) -> GatewayConfig:
    return GatewayConfig(
        server=ServerConfig(max_envelope_bytes=64 * 1024, max_request_bytes=1024 * 1024,
                            spool_directory=tmp_path / "spool"),
        registry=RegistryConfig(database=f"sqlite:///{tmp_path / 'registry.db'}"),
        repository=RepositoryConfig(directory=tmp_path / "repository"),
    )


@pytest.fixture
def services(tmp_path: Path) -> Any:
    from gateway.services import build_services

    return build_services(_config(tmp_path))


@pytest.fixture
def app(services: Any) -> Any:
    CALLS.clear()
    return make_app(services, endpoints=[TEST_ENDPOINT, OTHER_ENDPOINT, *ENDPOINTS])


def envelope(action: str | None = "urn:test:ActionA", *, message_id: str | None = "urn:uuid:m-1",
             body: str = f'<t:Request xmlns:t="{BODY_NS}"><t:Item>1</t:Item></t:Request>',
             extra_headers: str = "", soap_ns: str = SOAP12) -> bytes:
    headers = ""
    if action is not None:
        headers += f'<wsa:Action env:mustUnderstand="true">{action}</wsa:Action>'
    if message_id is not None:
        headers += f"<wsa:MessageID>{message_id}</wsa:MessageID>"
    headers += extra_headers
    return (f'<env:Envelope xmlns:env="{soap_ns}" xmlns:wsa="{WSA}">'
            f"<env:Header>{headers}</env:Header><env:Body>{body}</env:Body></env:Envelope>"
            ).encode()


def one(root: etree._Element, path: str) -> etree._Element:
    found = root.find(path, namespaces=NS)
    assert found is not None, path
    return found


def attr(el: etree._Element, name: str) -> str:
    value = el.get(name)
    assert value is not None, name
    return value


class Reply:
    def __init__(self, status: str, headers: list[tuple[str, str]], body: bytes):
        self.status = int(status.split()[0])
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body

    @property
    def xml(self) -> etree._Element:
        return etree.fromstring(self.body)

    def fault(self) -> tuple[str, str | None, str]:
        root = self.xml
        code = root.findtext("env:Body/env:Fault/env:Code/env:Value", namespaces=NS)
        sub = root.findtext("env:Body/env:Fault/env:Code/env:Subcode/env:Value", namespaces=NS)
        reason = root.findtext("env:Body/env:Fault/env:Reason/env:Text", namespaces=NS)
        assert code is not None and reason is not None, self.body
        return code, sub, reason

    def header(self, local: str) -> str | None:
        return self.xml.findtext(f"env:Header/wsa:{local}", namespaces=NS)


def call(app: Any, method: str = "POST", path: str = "/test/edge", body: bytes = b"", *,
         content_type: str | None = "application/soap+xml; charset=UTF-8",
         query: str = "", extra: dict[str, Any] | None = None) -> Reply:
    from wsgiref.util import setup_testing_defaults

    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD=method, PATH_INFO=path, QUERY_STRING=query,
                   CONTENT_LENGTH=str(len(body)), HTTP_HOST="gw.example:8443")
    environ["wsgi.url_scheme"] = "https"
    if content_type is not None:
        environ["CONTENT_TYPE"] = content_type
    environ["wsgi.input"] = io.BytesIO(body)
    environ.update(extra or {})
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        got["status"], got["headers"] = status, headers

    result = app(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return Reply(got["status"], got["headers"], data)


def assert_good(app: Any) -> Reply:
    r = call(app, body=envelope())
    assert r.status == 200, r.body
    assert one(r.xml, "env:Body/{urn:test:edge}Reply").get("handler") == "a"
    return r


# --- routing and WS-Addressing -----------------------------------------------------------------

def test_routes_on_wsa_action_not_on_body_element(app: Any) -> None:
    ra = call(app, body=envelope("urn:test:ActionA"))
    rb = call(app, body=envelope("urn:test:ActionB"))
    assert ra.status == rb.status == 200
    ea = one(ra.xml, "env:Body/{urn:test:edge}Reply")
    eb = one(rb.xml, "env:Body/{urn:test:edge}Reply")
    assert (ea.get("handler"), eb.get("handler")) == ("a", "b")
    # The handler got the whole first body element, not just its first child.
    assert ea.get("body") == "Request" and ea.get("children") == "1"
    assert [c[0] for c in CALLS] == ["a", "b"]


def test_response_carries_ws_addressing_headers(app: Any) -> None:
    r = call(app, body=envelope("urn:test:ActionB", message_id="urn:uuid:req-42"))
    assert r.status == 200
    assert r.headers["content-type"] == \
        'application/soap+xml; charset=UTF-8; action="urn:test:ActionBResponse"'
    assert int(r.headers["content-length"]) == len(r.body)
    action = one(r.xml, "env:Header/wsa:Action")
    assert action.text == "urn:test:ActionBResponse"
    assert action.get(f"{{{SOAP12}}}mustUnderstand") == "true"
    assert r.header("RelatesTo") == "urn:uuid:req-42"
    mid = r.header("MessageID")
    assert mid and mid.startswith("urn:uuid:") and mid != "urn:uuid:req-42"
    assert call(app, body=envelope()).header("MessageID") != mid


def test_request_context_is_filled_from_envelope_and_environ(app: Any, tmp_path: Path) -> None:
    spool = tmp_path / "given-spool"
    spool.mkdir()
    att = Attachment("a@b", spool / "a", 0)
    r = call(app, body=envelope(message_id="urn:uuid:ctx", extra_headers=(
        '<wsa:To>https://gw.example:8443/test/edge</wsa:To><x:Custom xmlns:x="urn:x">v</x:Custom>'
    )), extra={"xdsi.client_subject": "CN=client,O=test", "xdsi.attachments": {"a@b": att},
               "xdsi.spool_dir": spool})
    assert r.status == 200
    (_, ctx, body), = CALLS
    assert ctx.endpoint == "/test/edge"
    assert ctx.action == "urn:test:ActionA"
    assert ctx.message_id == "urn:uuid:ctx"
    assert ctx.client_subject == "CN=client,O=test"
    assert ctx.attachments == {"a@b": att}
    assert ctx.spool_dir == spool and spool.is_dir()  # not ours to remove
    assert [etree.QName(h).localname for h in ctx.headers] == ["Action", "MessageID", "To",
                                                                "Custom"]
    assert etree.QName(body).localname == "Request"


def test_own_spool_dir_and_cleanup_removed_after_plain_response(app: Any) -> None:
    r = call(app, body=envelope("urn:test:Plain"))
    assert r.status == 200
    (_, ctx, _), = CALLS
    assert not ctx.spool_dir.exists()
    assert not (ctx.spool_dir.parent / f"{ctx.spool_dir.name}-plain.tmp").exists()


def test_mtom_response_with_exact_length_and_cleanup(app: Any) -> None:
    r = call(app, body=envelope("urn:test:Spool", message_id="urn:uuid:mtom"))
    assert r.status == 200
    ctype = r.headers["content-type"]
    assert ctype.startswith("multipart/related;") and 'start-info="application/soap+xml"' in ctype
    assert 'action="urn:test:SpoolResponse"' in ctype
    assert int(r.headers["content-length"]) == len(r.body)
    assert b"\x00\x01payload\x02" in r.body
    assert b"<wsa:RelatesTo>urn:uuid:mtom</wsa:RelatesTo>" in r.body
    (_, ctx, _), = CALLS
    assert not ctx.spool_dir.exists()
    assert not (ctx.spool_dir.parent / f"{ctx.spool_dir.name}-cleanup.tmp").exists()


def test_two_endpoints_route_independently(app: Any) -> None:
    assert call(app, path="/test/other", body=envelope("urn:test:ActionA")).status == 200
    r = call(app, path="/test/other", body=envelope("urn:test:ActionB"))
    assert r.fault()[1] == "wsa:ActionNotSupported"
    assert call(app, path="/test/edge/", body=envelope()).status == 200  # trailing slash


# --- the fault matrix --------------------------------------------------------------------------

SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
CASES = {
    "not-xml": (b"<env:Envelope><oops", None, "env:Sender", None, 400),
    "dtd": (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY e "x">]><r>&e;</r>', None,
            "env:Sender", None, 400),
    "soap11-envelope": (envelope(soap_ns=SOAP11), None, "env:VersionMismatch", None, 500),
    "not-an-envelope": (b"<hello/>", None, "env:VersionMismatch", None, 500),
    "text-xml": (envelope(), "text/xml; charset=utf-8", "env:VersionMismatch", None, 500),
    "json": (envelope(), "application/json", "env:Sender", None, 400),
    "no-content-type": (envelope(), "", "env:Sender", None, 400),
    "empty-post": (b"", None, "env:Sender", None, 400),
    "no-body": (f'<env:Envelope xmlns:env="{SOAP12}"><env:Header/></env:Envelope>'.encode(),
                None, "env:Sender", None, 400),
    "empty-body": (envelope(body=""), None, "env:Sender", None, 400),
    "no-action": (envelope(None), None, "env:Sender", "wsa:MessageAddressingHeaderRequired",
                  400),
    "unknown-action": (envelope("urn:test:Nope"), None, "env:Sender", "wsa:ActionNotSupported",
                       400),
    "must-understand": (envelope(extra_headers=(
        f'<x:Secret xmlns:x="urn:x:unknown" env:mustUnderstand="1">{MARKER_XML}</x:Secret>')),
        None, "env:MustUnderstand", None, 500),
    "must-understand-true": (envelope(extra_headers=(
        '<x:Other xmlns:x="urn:x:unknown" env:mustUnderstand="true"/>')),
        None, "env:MustUnderstand", None, 500),
    "not-implemented": (envelope("urn:test:Missing"), None, "env:Receiver", None, 500),
    "handler-soap-fault": (envelope("urn:test:Fault"), None, "env:Sender",
                           "wsa:InvalidAddressingHeader", 400),
    "too-large": (envelope(body=f'<t:R xmlns:t="{BODY_NS}">{"x" * 70000}</t:R>'), None,
                  "env:Sender", None, 413),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fault_matrix(app: Any, case: str) -> None:
    data, ctype, code, subcode, status = CASES[case]
    r = call(app, body=data, content_type=ctype if ctype is not None else
             "application/soap+xml; charset=UTF-8")
    assert r.status == status, r.body
    assert r.headers["content-type"].startswith("application/soap+xml")
    assert 'action="http://www.w3.org/2005/08/addressing/soap/fault"' in r.headers["content-type"]
    got_code, got_sub, _reason = r.fault()
    assert (got_code, got_sub) == (code, subcode)
    assert r.header("Action") == "http://www.w3.org/2005/08/addressing/soap/fault"
    assert MARKER not in r.body.decode()
    assert CALLS == []
    assert_good(app)  # the next good request still works


def test_fault_relates_to_request_message_id_when_known(app: Any) -> None:
    r = call(app, body=envelope("urn:test:Nope", message_id="urn:uuid:known"))
    assert r.header("RelatesTo") == "urn:uuid:known"
    _code, _sub, reason = r.fault()
    assert "urn:test:Nope" in reason and "/test/edge" in reason
    assert r.xml.findtext("env:Body/env:Fault/env:Detail/wsa:ProblemAction/wsa:Action",
                          namespaces=NS) == "urn:test:Nope"
    assert call(app, body=b"<broken").header("RelatesTo") is None
    r = call(app, body=envelope(None, message_id="urn:uuid:noaction"))
    assert r.header("RelatesTo") == "urn:uuid:noaction"


def test_version_mismatch_has_upgrade_header(app: Any) -> None:
    r = call(app, body=envelope(soap_ns=SOAP11))
    se = one(r.xml, "env:Header/env:Upgrade/env:SupportedEnvelope")
    prefix, local = attr(se, "qname").split(":")
    assert (se.nsmap[prefix], local) == (SOAP12, "Envelope")


def test_must_understand_names_the_header(app: Any) -> None:
    r = call(app, body=envelope(extra_headers=(
        '<x:Secret xmlns:x="urn:x:unknown" env:mustUnderstand="true"/>'
        '<wsa:To env:mustUnderstand="true">https://gw/test/edge</wsa:To>')))
    assert r.status == 500
    nus = r.xml.findall("env:Header/env:NotUnderstood", namespaces=NS)
    assert len(nus) == 1  # wsa:To is understood
    prefix, local = attr(nus[0], "qname").split(":")
    assert (nus[0].nsmap[prefix], local) == ("urn:x:unknown", "Secret")


@pytest.mark.parametrize("header", [
    '<x:Opt xmlns:x="urn:x:unknown">v</x:Opt>',
    '<x:Opt xmlns:x="urn:x:unknown" env:mustUnderstand="false"/>',
    '<x:Opt xmlns:x="urn:x:unknown" env:mustUnderstand="1" '
    'env:role="http://www.w3.org/2003/05/soap-envelope/role/none"/>',
    '<x:Opt xmlns:x="urn:x:unknown" env:mustUnderstand="1" env:role="urn:some:other-role"/>',
])
def test_headers_we_need_not_understand_are_accepted(app: Any, header: str) -> None:
    assert call(app, body=envelope(extra_headers=header)).status == 200


def test_unimplemented_transaction_names_itself(app: Any) -> None:
    # Every IHE transaction of ENDPOINTS has a handler now; a test-only one stands for the next.
    r = call(app, path=TEST_ENDPOINT.path, body=envelope(UNBUILT.request_action))
    assert r.status == 500
    assert r.fault() == ("env:Receiver", None,
                         "T-U Unbuilt Transaction is not implemented by this gateway yet")


def test_every_ihe_transaction_has_a_handler() -> None:
    assert [t.name for e in ENDPOINTS for t in e.transactions if t.handler is None] == []


def test_mtom_request_content_types_are_accepted(app: Any) -> None:
    for ctype in ('multipart/related; boundary="b"; type="application/xop+xml"; '
                  'start-info="application/soap+xml"',
                  'application/xop+xml; charset=UTF-8; type="application/soap+xml"'):
        assert call(app, body=envelope(), content_type=ctype).status == 200


# --- handler failures --------------------------------------------------------------------------

def test_xds_failure_becomes_failure_response(app: Any) -> None:
    r = call(app, body=envelope("urn:test:Query"))
    assert r.status == 200
    assert r.header("Action") == Action.ITI18_RESPONSE
    resp = one(r.xml, "env:Body/query:AdhocQueryResponse")
    assert resp.get("status") == ResponseStatus.FAILURE
    err = one(resp, "rs:RegistryErrorList/rs:RegistryError")
    assert err.get("errorCode") == ErrorCode.UNKNOWN_STORED_QUERY


@pytest.mark.parametrize(("response_action", "path"), [
    (Action.ITI18_RESPONSE, "query:AdhocQueryResponse"),
    (Action.ITI38_RESPONSE, "query:AdhocQueryResponse"),
    (Action.ITI41_RESPONSE, "rs:RegistryResponse"),
    (Action.ITI42_RESPONSE, "rs:RegistryResponse"),
    (Action.ITI43_RESPONSE, "xdsb:RetrieveDocumentSetResponse/rs:RegistryResponse"),
    (Action.RAD69_RESPONSE, "xdsb:RetrieveDocumentSetResponse/rs:RegistryResponse"),
    (Action.RAD75_RESPONSE, "xdsb:RetrieveDocumentSetResponse/rs:RegistryResponse"),
    (Action.ITI39_RESPONSE, "xdsb:RetrieveDocumentSetResponse/rs:RegistryResponse"),
])
def test_failure_body_per_transaction(response_action: str, path: str) -> None:
    t = Transaction("X", "x", "urn:x", response_action, None)
    holder = etree.Element("holder")
    holder.append(failure_body(t, [XdsError(ErrorCode.REGISTRY_ERROR, "boom")]))
    found = one(holder, path)
    status_el = found if found.get("status") else one(found, "rs:RegistryResponse")
    assert status_el.get("status") == ResponseStatus.FAILURE
    assert one(holder, ".//rs:RegistryError").get("errorCode") == ErrorCode.REGISTRY_ERROR


def test_handler_crash_is_a_receiver_fault_without_details(
        app: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    r = call(app, body=envelope("urn:test:Crash"))
    assert r.status == 500
    code, sub, _reason = r.fault()
    assert (code, sub) == ("env:Receiver", None)
    text = r.body.decode()
    assert "Traceback" not in text and SECRET not in text and "RuntimeError" not in text
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert any("T-C" in rec.getMessage() and "RuntimeError" in rec.getMessage()
               for rec in errors)
    assert all(SECRET not in rec.getMessage() and rec.exc_info is None for rec in errors)
    assert_good(app)


# --- logging: spyne must not leak request content ----------------------------------------------

@pytest.mark.parametrize("data", [
    f"<env:Envelope><broken>{MARKER}".encode(),
    envelope(body=f'<t:R xmlns:t="{BODY_NS}">{MARKER_XML}</t:R>'),
    envelope("urn:test:Nope", body=f'<t:R xmlns:t="{BODY_NS}">{MARKER_XML}</t:R>'),
    envelope(soap_ns=SOAP11, body=f'<t:R xmlns:t="{BODY_NS}">{MARKER_XML}</t:R>'),
])
def test_request_content_never_logged(app: Any, caplog: pytest.LogCaptureFixture,
                                      data: bytes) -> None:
    caplog.set_level(logging.DEBUG)
    call(app, body=data)
    for rec in caplog.records:
        assert MARKER not in rec.getMessage()
        assert rec.exc_text is None or MARKER not in rec.exc_text
    assert not [rec for rec in caplog.records if rec.name.startswith("spyne")]


# --- GET: WSDL, XSD, health; 404 and 405 -------------------------------------------------------

def test_wsdl_served(app: Any) -> None:
    from gateway.soap import wsdl

    if not (wsdl.wsdl_dir() / "registry.wsdl").is_file():
        pytest.skip("registry.wsdl not written yet")
    r = call(app, "GET", "/xds/registry", query="wsdl", content_type=None)
    assert r.status == 200
    assert r.headers["content-type"] == "application/xml"
    root = r.xml
    assert etree.QName(root).localname == "definitions"
    assert b"https://gw.example:8443/xds/registry" in r.body


def test_unknown_xsd_is_404(app: Any) -> None:
    r = call(app, "GET", "/xds/registry", query="xsd=../../etc/passwd", content_type=None)
    assert r.status == 404


def test_health(app: Any) -> None:
    r = call(app, "GET", "/health", content_type=None)
    assert r.status == 200
    assert r.headers["content-type"] == "application/json"
    doc = json.loads(r.body)
    assert doc["status"] == "ok"
    assert doc["registry"] == {"objects": 0}
    assert "/xds/registry" in doc["endpoints"] and "/test/edge" in doc["endpoints"]
    from gateway import __version__
    assert doc["version"] == __version__


def test_health_reports_unreadable_registry() -> None:
    class Broken:
        def count(self) -> int:
            raise OSError(f"disk gone {MARKER}")

    class Services:
        registry = Broken()

    r = call(make_app(Services(), endpoints=[OTHER_ENDPOINT]), "GET", "/health")
    assert r.status == 503
    doc = json.loads(r.body)
    assert doc["status"] == "error" and MARKER not in r.body.decode()


@pytest.mark.parametrize(("method", "path", "query", "status"), [
    ("GET", "/nowhere", "", 404),
    ("POST", "/nowhere", "", 404),
    ("GET", "/", "", 404),
    ("GET", "/xds/registry", "", 405),
    ("PUT", "/xds/registry", "", 405),
    ("DELETE", "/test/edge", "", 405),
    ("POST", "/health", "", 405),
])
def test_plain_http_errors(app: Any, method: str, path: str, query: str, status: int) -> None:
    r = call(app, method, path, query=query)
    assert r.status == status
    assert r.headers["content-type"].startswith("text/plain")
    if status == 405:
        assert "allow" in r.headers


def test_app_factory_serves_through_mtom_middleware(tmp_path: Path) -> None:
    config = _config(tmp_path)
    (tmp_path / "spool").mkdir()
    wsgi = app_factory(config)
    r = call(wsgi, "GET", "/health", content_type=None)
    assert r.status == 200 and json.loads(r.body)["registry"] == {"objects": 0}
    r = call(wsgi, body=envelope("urn:test:Nope"), path="/xds/registry")
    assert r.fault()[1] == "wsa:ActionNotSupported"
    assert list((tmp_path / "spool").iterdir()) == []


# --- against the conformance corpus ------------------------------------------------------------

@pytest.fixture(scope="module")
def soap_schema(conformance: Path) -> etree.XMLSchema:
    w3c = (conformance / "schemas" / "w3c").resolve()
    soap_xsd = (w3c / "soap-1.2-envelope.xsd").as_uri()
    wsa_xsd = (w3c / "ws-addr.xsd").as_uri()
    wrapper = (
        '<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" targetNamespace="urn:wrap">'
        f'<xs:import namespace="{SOAP12}" schemaLocation="{soap_xsd}"/>'
        f'<xs:import namespace="{WSA}" schemaLocation="{wsa_xsd}"/>'
        "</xs:schema>")
    return etree.XMLSchema(etree.fromstring(wrapper.encode(), base_url=w3c.as_uri() + "/"))


@pytest.mark.parametrize("case", ["ok", "not-xml", "soap11-envelope", "must-understand",
                                  "unknown-action", "no-action", "crash"])
def test_envelopes_are_schema_valid(app: Any, soap_schema: etree.XMLSchema, case: str) -> None:
    if case == "ok":
        data = envelope()
    elif case == "crash":
        data = envelope("urn:test:Crash")
    else:
        data = CASES[case][0]
    r = call(app, body=data)
    assert soap_schema.validate(r.xml), soap_schema.error_log


def test_ihe_registry_stored_query_example(app: Any, conformance: Path) -> None:
    data = (conformance / "messages" / "iti-18" / "ihe" /
            "RegistryStoredQueryRequest_SOAP.xml").read_bytes()
    r = call(app, path="/xds/registry", body=data)
    assert r.status == 200, r.body
    assert r.header("RelatesTo") == "urn:uuid:a02ca8cd-86fa-4afc-a27c-616c183b2055"
    assert r.header("Action") == Action.ITI18_RESPONSE
    resp = one(r.xml, "env:Body/query:AdhocQueryResponse")
    assert resp.get("status") in (ResponseStatus.SUCCESS, ResponseStatus.FAILURE)
