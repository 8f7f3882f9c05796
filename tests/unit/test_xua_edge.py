"""XUA and request limits through the SOAP edge (make_app with test Services): a refused
assertion gets the WS-Security fault and never reaches a handler; a valid one reaches it as
ctx.xua_subject; bodies over the [limits] get the transaction's Failure response."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from lxml import etree

from gateway.config import LimitsConfig, XuaConfig
from gateway.ns import QUERY, RIM, RS, SOAP12, WSA, WSSE, XDSB, Action
from gateway.soap.application import make_app
from gateway.transactions import Endpoint, RequestContext, SoapResponse, Transaction
from tests.support import saml

NS = {"env": SOAP12, "wsa": WSA, "rs": RS, "query": QUERY, "sc": WSSE}
SEEN: list[RequestContext] = []


def echo(services: Any, ctx: RequestContext, body: etree._Element) -> SoapResponse:
    SEEN.append(ctx)
    return SoapResponse(etree.Element("{urn:test}Ok"))


QUERY_T = Transaction("ITI-18", "Registry Stored Query", Action.ITI18, Action.ITI18_RESPONSE,
                      f"{__name__}:echo")
RETRIEVE_T = Transaction("ITI-43", "Retrieve Document Set", Action.ITI43, Action.ITI43_RESPONSE,
                         f"{__name__}:echo")
REGISTER_T = Transaction("ITI-42", "Register", Action.ITI42, Action.ITI42_RESPONSE,
                         f"{__name__}:echo")
SECURED = Endpoint("/xca/responding", "Secured", "registry.wsdl", (QUERY_T, RETRIEVE_T))
OPEN = Endpoint("/xds/registry", "Open", "registry.wsdl", (QUERY_T, REGISTER_T))


@pytest.fixture(scope="module")
def idp() -> saml.TestIdp:
    return saml.TestIdp.create()


@pytest.fixture(scope="module")
def rogue() -> saml.TestIdp:
    return saml.TestIdp.create()


@pytest.fixture()
def app(idp: saml.TestIdp, tmp_path: Path) -> Any:
    cert = idp.write_cert(tmp_path / "idp.pem")
    config = SimpleNamespace(
        xua=XuaConfig(required_endpoints=("/xca/responding",), trusted_certificates=(cert,),
                      audience=saml.AUDIENCE, clock_skew_seconds=30),
        limits=LimitsConfig(max_query_slots=5, max_query_values=10, max_document_requests=3,
                            max_documents_per_request=2, max_xml_elements=2000))
    SEEN.clear()
    return make_app(SimpleNamespace(config=config), endpoints=(SECURED, OPEN),
                    spool_root=tmp_path / "spool")


def call(app: Any, path: str, data: bytes) -> tuple[int, etree._Element]:
    status: list[str] = []
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "wsgi.input": io.BytesIO(data),
               "CONTENT_LENGTH": str(len(data)), "wsgi.url_scheme": "https",
               "CONTENT_TYPE": "application/soap+xml; charset=UTF-8",
               "SERVER_NAME": "localhost", "SERVER_PORT": "443"}
    result = app(environ, lambda s, h, exc=None: status.append(s))
    try:
        body = b"".join(result)
    finally:
        getattr(result, "close", lambda: None)()
    return int(status[0].split()[0]), etree.fromstring(body)


def query_body(slots: int = 1, values: int = 1) -> etree._Element:
    req = etree.Element(f"{{{QUERY}}}AdhocQueryRequest")
    etree.SubElement(req, f"{{{QUERY}}}ResponseOption", returnType="LeafClass")
    q = etree.SubElement(req, f"{{{RIM}}}AdhocQuery",
                         id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d")
    for i in range(slots):
        vl = etree.SubElement(etree.SubElement(q, f"{{{RIM}}}Slot", name=f"$P{i}"),
                              f"{{{RIM}}}ValueList")
        for j in range(values):
            etree.SubElement(vl, f"{{{RIM}}}Value").text = f"'v{j}'"
    return req


def fault_subcode(env: etree._Element) -> str:
    assert env.find("env:Body/env:Fault/env:Code/env:Value", NS).text == "env:Sender"
    value = env.find("env:Body/env:Fault/env:Code/env:Subcode/env:Value", NS)
    prefix, local = value.text.split(":")
    assert value.nsmap[prefix] == WSSE
    reason = env.find("env:Body/env:Fault/env:Reason/env:Text", NS).text
    assert "dr.house" not in reason and "Gregory" not in reason  # no assertion content
    return local


def test_valid_assertion_reaches_the_handler(app: Any, idp: saml.TestIdp) -> None:
    data = saml.envelope(query_body(), Action.ITI18, saml.security_header(idp.assertion()))
    status, env = call(app, "/xca/responding", data)
    assert status == 200, etree.tostring(env)
    assert env.find("env:Body/{urn:test}Ok", NS) is not None
    subject = SEEN[-1].xua_subject
    assert subject is not None and subject.subject_id == "Gregory House"
    assert [p.code for p in subject.purposes_of_use] == ["TREATMENT"]


CASES = {
    "missing": ("InvalidSecurity", lambda idp, rogue: None),
    "expired": ("InvalidSecurityToken", lambda idp, rogue: idp.assertion(lifetime=-120)),
    "not yet valid": ("InvalidSecurityToken",
                      lambda idp, rogue: idp.assertion(not_before_offset=600, lifetime=900)),
    "wrong audience": ("InvalidSecurityToken",
                       lambda idp, rogue: idp.assertion(audience="urn:other")),
    "unsigned": ("FailedAuthentication",
                 lambda idp, rogue: saml.strip_placeholder(idp.unsigned())),
    "untrusted key": ("FailedAuthentication", lambda idp, rogue: rogue.assertion()),
    "tampered": ("FailedCheck", lambda idp, rogue: saml.tampered(idp.assertion())),
    "wrapping": ("InvalidSecurity", lambda idp, rogue: saml.wrapped(
        idp.assertion(), idp.unsigned(name_id="mallory@evil.example"))),
    "wrapping same id": ("InvalidSecurity", lambda idp, rogue: saml.wrapped(
        idp.assertion(), idp.unsigned(name_id="mallory@evil.example"), same_id=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_assertions_get_the_wsse_fault(app: Any, idp: saml.TestIdp,
                                               rogue: saml.TestIdp, case: str) -> None:
    code, make = CASES[case]
    assertion = make(idp, rogue)
    headers = () if assertion is None else (saml.security_header(assertion),)
    status, env = call(app, "/xca/responding", saml.envelope(query_body(), Action.ITI18,
                                                             *headers))
    assert status == 400
    assert fault_subcode(env) == code
    assert SEEN == []  # no transaction ran


def test_unsigned_beside_signed_through_the_edge(app: Any, idp: saml.TestIdp) -> None:
    evil = saml.strip_placeholder(idp.unsigned(name_id="mallory@evil.example"))
    header = saml.security_header(idp.assertion(), evil)
    status, env = call(app, "/xds/registry", saml.envelope(query_body(), Action.ITI18, header))
    assert status == 400 and fault_subcode(env) == "InvalidSecurity" and SEEN == []


def test_optional_endpoint(app: Any, idp: saml.TestIdp) -> None:
    status, _ = call(app, "/xds/registry", saml.envelope(query_body(), Action.ITI18))
    assert status == 200 and SEEN[-1].xua_subject is None
    # optional, but a bad assertion is refused anywhere
    bad = saml.security_header(saml.tampered(idp.assertion()))
    status, env = call(app, "/xds/registry", saml.envelope(query_body(), Action.ITI18, bad))
    assert status == 400 and fault_subcode(env) == "FailedCheck"


def test_security_header_is_understood_with_must_understand(app: Any,
                                                            idp: saml.TestIdp) -> None:
    header = saml.security_header(idp.assertion(), must_understand=True)
    status, env = call(app, "/xds/registry", saml.envelope(query_body(), Action.ITI18, header))
    assert status == 200, etree.tostring(env)


def test_refusal_is_logged_without_assertion_content(app: Any, idp: saml.TestIdp,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)  # signxml logs what it verifies at DEBUG
    bad = saml.security_header(idp.assertion(audience="urn:other"))
    call(app, "/xca/responding", saml.envelope(query_body(), Action.ITI18, bad))
    assert "InvalidSecurityToken" in caplog.text
    assert "dr.house" not in caplog.text and "Gregory" not in caplog.text


# --- limits ------------------------------------------------------------------------------------

def _errors(env: etree._Element) -> list[str]:
    return [e.get("errorCode") for e in env.iter(f"{{{RS}}}RegistryError")]


def test_query_limits(app: Any) -> None:
    status, env = call(app, "/xds/registry", saml.envelope(query_body(5, 2), Action.ITI18))
    assert status == 200 and env.find("env:Body/{urn:test}Ok", NS) is not None
    for slots, values in ((6, 1), (2, 6)):
        status, env = call(app, "/xds/registry",
                           saml.envelope(query_body(slots, values), Action.ITI18))
        assert status == 200
        assert _errors(env) == ["XDSRegistryOutOfResources"]
        assert env.find(f"env:Body/{{{QUERY}}}AdhocQueryResponse", NS).get("status").endswith(
            "Failure")


def test_document_request_and_document_limits(app: Any, idp: saml.TestIdp) -> None:
    req = etree.Element(f"{{{XDSB}}}RetrieveDocumentSetRequest")
    for i in range(4):
        etree.SubElement(etree.SubElement(req, f"{{{XDSB}}}DocumentRequest"),
                         f"{{{XDSB}}}DocumentUniqueId").text = f"1.2.{i}"
    data = saml.envelope(req, Action.ITI43, saml.security_header(idp.assertion()))
    status, env = call(app, "/xca/responding", data)
    assert status == 200 and _errors(env) == ["XDSRepositoryOutOfResources"] and SEEN == []
    sub = etree.Element("{urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0}SubmitObjectsRequest")
    rol = etree.SubElement(sub, f"{{{RIM}}}RegistryObjectList")
    for i in range(3):
        etree.SubElement(rol, f"{{{RIM}}}ExtrinsicObject", id=f"Doc{i}")
    _, env = call(app, "/xds/registry", saml.envelope(sub, Action.ITI42))
    assert _errors(env) == ["XDSRegistryOutOfResources"]


def test_element_count_bound_before_parsing(app: Any) -> None:
    status, env = call(app, "/xds/registry", saml.envelope(query_body(1, 2100), Action.ITI18))
    assert status == 400
    assert "elements" in env.find("env:Body/env:Fault/env:Reason/env:Text", NS).text
