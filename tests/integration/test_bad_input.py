"""The bad-input matrix over real HTTPS with mutual TLS: each bad request gets the right SOAP
1.2 fault (envelope problems) or XDS error (metadata problems), no stack trace, and the
gateway keeps serving good requests after every one of them."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from lxml import etree

from gateway.ns import RS, SOAP12, WSA, Action, ResponseStatus
from tests.conftest import CONFORMANCE
from tests.integration.conftest import MAX_ENVELOPE_BYTES, MAX_REQUEST_BYTES
from tests.support.zeep_client import mtls_session

pytestmark = pytest.mark.integration

SOAP_CT = "application/soap+xml; charset=UTF-8"
KOS_METADATA = CONFORMANCE / "messages/iti-41/nist-kos/testdata_IDCDEPT001_metadata.xml"
KOS = CONFORMANCE / "dicom/kos/nist/testdata_IDCDEPT001_kos.dcm"


@pytest.fixture(scope="module")
def http(live_gateway) -> Iterator[requests.Session]:  # type: ignore[no-untyped-def]
    pki = live_gateway.pki
    s = mtls_session(pki.ca_cert, pki.client_cert, pki.client_key)
    yield s
    s.close()


def envelope(action: str | None, body: str, *, header_extra: str = "",
             soap_ns: str = SOAP12) -> bytes:
    action_el = (f'<a:Action s:mustUnderstand="true">{action}</a:Action>' if action else "")
    return (f'<s:Envelope xmlns:s="{soap_ns}" xmlns:a="{WSA}"><s:Header>{action_el}'
            f'<a:MessageID>urn:uuid:{uuid.uuid4()}</a:MessageID>{header_extra}</s:Header>'
            f'<s:Body>{body}</s:Body></s:Envelope>').encode()


RETRIEVE_BODY = ('<RetrieveDocumentSetRequest xmlns="urn:ihe:iti:xds-b:2007"><DocumentRequest>'
                 '<RepositoryUniqueId>1.2.3</RepositoryUniqueId>'
                 '<DocumentUniqueId>1.2.3.4</DocumentUniqueId></DocumentRequest>'
                 '</RetrieveDocumentSetRequest>')


def post(http: requests.Session, base: str, data: bytes, *, path: str = "/xds/repository",
         content_type: str = SOAP_CT) -> requests.Response:
    return http.post(base + path, data=data, headers={"Content-Type": content_type},
                     timeout=60)


def fault_of(resp: requests.Response) -> tuple[str, list[str], str]:
    """(code, subcodes, reason) of a SOAP 1.2 fault response."""
    assert resp.headers["Content-Type"].startswith("application/soap+xml"), resp.headers
    env = etree.fromstring(resp.content)
    fault = env.find(f"{{{SOAP12}}}Body/{{{SOAP12}}}Fault")
    assert fault is not None, resp.text
    code = fault.findtext(f"{{{SOAP12}}}Code/{{{SOAP12}}}Value") or ""
    subs = [e.text or "" for e in fault.iter(f"{{{SOAP12}}}Subcode")
            for e in e.findall(f"{{{SOAP12}}}Value")]
    reason = fault.findtext(f"{{{SOAP12}}}Reason/{{{SOAP12}}}Text") or ""
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    return code.split(":")[-1], [s.split(":")[-1] for s in subs], reason


def assert_still_serving(http: requests.Session, base: str) -> None:
    resp = post(http, base, envelope(Action.ITI43, RETRIEVE_BODY))
    assert resp.status_code == 200, resp.text[:500]


LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
          '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
          '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>')
EXTERNAL = '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'

ENVELOPE_CASES = {
    # name: (body bytes, content type, path, expected HTTP status, code, subcode or None)
    "not-xml": (b"this is not XML <", SOAP_CT, 400, "Sender", None),
    "dtd": (b'<?xml version="1.0"?><!DOCTYPE s:Envelope SYSTEM "x.dtd">'
            + envelope(Action.ITI43, RETRIEVE_BODY), SOAP_CT, 400, "Sender", None),
    "entity-expansion": (LAUGHS.encode() + envelope(Action.ITI43, RETRIEVE_BODY.replace(
        "1.2.3.4", "&lol3;")), SOAP_CT, 400, "Sender", None),
    "external-entity": (EXTERNAL.encode() + envelope(Action.ITI43, RETRIEVE_BODY.replace(
        "1.2.3.4", "&xxe;")), SOAP_CT, 400, "Sender", None),
    "soap-1.1": (envelope(Action.ITI43, RETRIEVE_BODY,
                          soap_ns="http://schemas.xmlsoap.org/soap/envelope/"),
                 "text/xml; charset=UTF-8", 500, "VersionMismatch", None),
    "no-action": (envelope(None, RETRIEVE_BODY), SOAP_CT, 400, "Sender",
                  "MessageAddressingHeaderRequired"),
    "unknown-action": (envelope("urn:example:NoSuchAction", RETRIEVE_BODY), SOAP_CT, 400,
                       "Sender", "ActionNotSupported"),
    "action-of-other-endpoint": (envelope(Action.ITI18, RETRIEVE_BODY), SOAP_CT, 400,
                                 "Sender", "ActionNotSupported"),
    "must-understand": (envelope(Action.ITI43, RETRIEVE_BODY, header_extra=(
        '<x:Secret xmlns:x="urn:example" s:mustUnderstand="true">1</x:Secret>')),
        SOAP_CT, 500, "MustUnderstand", None),
    "empty-body": (envelope(Action.ITI43, ""), SOAP_CT, 400, "Sender", None),
    "empty-post": (b"", SOAP_CT, 400, "Sender", None),
}


@pytest.mark.parametrize("case", list(ENVELOPE_CASES))
def test_envelope_faults(http, live_gateway, case: str) -> None:  # type: ignore[no-untyped-def]
    data, ctype, status, code, subcode = ENVELOPE_CASES[case]
    resp = post(http, live_gateway.base_url, data, content_type=ctype)
    assert resp.status_code == status, resp.text[:800]
    got_code, subcodes, reason = fault_of(resp)
    assert got_code == code, (got_code, reason)
    if subcode:
        assert subcode in subcodes, (subcodes, reason)
    assert reason
    assert_still_serving(http, live_gateway.base_url)


def test_body_over_max_request_bytes(http, live_gateway) -> None:  # type: ignore[no-untyped-def]
    pad = "x" * (MAX_REQUEST_BYTES + 1024)
    data = envelope(Action.ITI43, RETRIEVE_BODY.replace("1.2.3.4", "1.2.3.4" + pad))
    resp = post(http, live_gateway.base_url, data)
    assert resp.status_code in (400, 413)
    code, _subs, reason = fault_of(resp)
    assert code == "Sender"
    assert "max_request_bytes" in reason or "too large" in reason.lower()
    assert_still_serving(http, live_gateway.base_url)


def test_envelope_over_max_envelope_bytes_in_mtom(http, live_gateway) -> None:  # type: ignore[no-untyped-def]
    boundary = "MIMEBoundary_test"
    root = envelope(Action.ITI43, RETRIEVE_BODY.replace(
        "1.2.3.4", "1.2.3.4" + "y" * (MAX_ENVELOPE_BYTES + 10)))
    data = (f"--{boundary}\r\nContent-Type: application/xop+xml; charset=UTF-8; "
            f'type="application/soap+xml"\r\nContent-ID: <root@x>\r\n\r\n').encode() + root + \
        f"\r\n--{boundary}--\r\n".encode()
    resp = post(http, live_gateway.base_url, data, content_type=(
        f'multipart/related; boundary="{boundary}"; type="application/xop+xml"; '
        f'start="<root@x>"; start-info="application/soap+xml"'))
    assert resp.status_code in (400, 413)
    assert fault_of(resp)[0] == "Sender"
    assert_still_serving(http, live_gateway.base_url)


@pytest.mark.parametrize("case", ["no-boundary", "truncated", "no-closing-boundary",
                                  "missing-root"])
def test_broken_mtom(http, live_gateway, case: str) -> None:  # type: ignore[no-untyped-def]
    boundary = "MIMEBoundary_broken"
    root = envelope(Action.ITI43, RETRIEVE_BODY)
    part = (f"--{boundary}\r\nContent-Type: application/xop+xml; charset=UTF-8; "
            f'type="application/soap+xml"\r\nContent-ID: <root@x>\r\n\r\n').encode() + root
    ctype = (f'multipart/related; boundary="{boundary}"; type="application/xop+xml"; '
             f'start="<root@x>"; start-info="application/soap+xml"')
    if case == "no-boundary":
        data, ctype = part + f"\r\n--{boundary}--\r\n".encode(), \
            'multipart/related; type="application/xop+xml"'
    elif case == "truncated":
        data = part[: len(part) // 2]
    elif case == "no-closing-boundary":
        data = part + b"\r\n"
    else:
        data = part + f"\r\n--{boundary}--\r\n".encode()
        ctype = ctype.replace("<root@x>", "<other@x>")
    resp = post(http, live_gateway.base_url, data, content_type=ctype)
    assert resp.status_code == 400, resp.text[:500]
    code, _subs, reason = fault_of(resp)
    assert code == "Sender" and reason
    assert_still_serving(http, live_gateway.base_url)


# --- Metadata errors: XDS errors as values in a RegistryResponse -------------------------------

def pnr_body(metadata: str, document: bytes | None, doc_id: str = "Document01") -> str:
    doc = (f'<Document id="{doc_id}">{base64.b64encode(document).decode()}</Document>'
           if document is not None else "")
    return (f'<ProvideAndRegisterDocumentSetRequest xmlns="urn:ihe:iti:xds-b:2007">'
            f"{metadata}{doc}</ProvideAndRegisterDocumentSetRequest>")


def kos_metadata(mutate: str = "", *, new_ids: bool = True) -> str:
    text = KOS_METADATA.read_text()
    text = text[text.index("<lcm:SubmitObjectsRequest"):]
    if new_ids:  # a fresh document and submission set uniqueId for each case
        text = text.replace("2.25.264096862221500429694988291417299542916",
                            f"2.25.{uuid.uuid4().int}")
        root = etree.fromstring(text.encode())
        for ei in root.iter("{urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0}ExternalIdentifier"):
            if ei.get("identificationScheme") == "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8":
                ei.set("value", f"2.25.{uuid.uuid4().int}")
        text = etree.tostring(root).decode()
    return text


def _registry_errors(resp: requests.Response) -> tuple[str, list[str]]:
    assert resp.status_code == 200, resp.text[:800]
    env = etree.fromstring(resp.content)
    rr = env.find(f"{{{SOAP12}}}Body/{{{RS}}}RegistryResponse")
    assert rr is not None, resp.text[:800]
    codes = [e.get("errorCode") or "" for e in rr.iter(f"{{{RS}}}RegistryError")]
    for e in rr.iter(f"{{{RS}}}RegistryError"):
        assert e.get("codeContext"), "every error says what to fix"
    return rr.get("status") or "", codes


def _set_attr(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


METADATA_CASES = {
    "missing-classCode": (lambda m: _set_attr(
        m, 'classificationScheme="urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"',
        'classificationScheme="urn:uuid:00000000-0000-0000-0000-000000000000"'),
        True, "XDSRepositoryMetadataError"),
    "patient-mismatch": (lambda m: m.replace(
        'value="IDCAD001-a^^^&amp;1.3.6.1.4.1.21367.2005.13.20.1000&amp;ISO"',
        'value="OTHER-1^^^&amp;1.3.6.1.4.1.21367.2005.13.20.1000&amp;ISO"', 1),
        True, "XDSPatientIdDoesNotMatch"),
    "missing-document": (lambda m: m, False, "XDSMissingDocument"),
}


@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_metadata_errors(http, live_gateway, case: str) -> None:  # type: ignore[no-untyped-def]
    mutate, with_doc, expected = METADATA_CASES[case]
    body = pnr_body(mutate(kos_metadata()), KOS.read_bytes() if with_doc else None)
    resp = post(http, live_gateway.base_url, envelope(Action.ITI41, body))
    status, codes = _registry_errors(resp)
    assert status == ResponseStatus.FAILURE
    assert expected in codes, codes
    assert_still_serving(http, live_gateway.base_url)


def test_document_without_metadata(http, live_gateway) -> None:  # type: ignore[no-untyped-def]
    body = pnr_body(kos_metadata(), KOS.read_bytes()).replace(
        "</ProvideAndRegisterDocumentSetRequest>",
        f'<Document id="Stray">{base64.b64encode(b"x").decode()}</Document>'
        "</ProvideAndRegisterDocumentSetRequest>")
    status, codes = _registry_errors(post(http, live_gateway.base_url,
                                          envelope(Action.ITI41, body)))
    assert status == ResponseStatus.FAILURE
    assert "XDSMissingDocumentMetadata" in codes


def test_hash_mismatch_leaves_nothing(http, live_gateway) -> None:  # type: ignore[no-untyped-def]
    metadata = kos_metadata()
    marker = "<rim:Slot name=\"languageCode\">"
    assert marker in metadata
    metadata = metadata.replace(marker, '<rim:Slot name="hash"><rim:ValueList><rim:Value>'
                                + "0" * 40 + "</rim:Value></rim:ValueList></rim:Slot>" + marker, 1)
    repo_dir = Path(live_gateway.workdir) / "var" / "repository"
    before = sorted(p for p in repo_dir.rglob("*") if p.is_file())
    status, codes = _registry_errors(post(http, live_gateway.base_url, envelope(
        Action.ITI41, pnr_body(metadata, KOS.read_bytes() + b"different"))))
    assert status == ResponseStatus.FAILURE
    assert "XDSNonIdenticalHash" in codes
    assert sorted(p for p in repo_dir.rglob("*") if p.is_file()) == before


def test_duplicate_unique_id(http, live_gateway) -> None:  # type: ignore[no-untyped-def]
    metadata = kos_metadata()
    first = _registry_errors(post(http, live_gateway.base_url, envelope(
        Action.ITI41, pnr_body(metadata, KOS.read_bytes()))))
    assert first == (ResponseStatus.SUCCESS, [])
    root = etree.fromstring(metadata.encode())
    for ei in root.iter("{urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0}ExternalIdentifier"):
        if ei.get("identificationScheme") == "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8":
            ei.set("value", f"2.25.{uuid.uuid4().int}")
    status, codes = _registry_errors(post(http, live_gateway.base_url, envelope(
        Action.ITI41, pnr_body(etree.tostring(root).decode(), KOS.read_bytes() + b"x"))))
    assert status == ResponseStatus.FAILURE
    assert codes and codes[0] in ("XDSDuplicateUniqueIdInRegistry", "XDSNonIdenticalHash")
