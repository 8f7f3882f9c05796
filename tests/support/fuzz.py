"""Hypothesis strategies and property checks shared by tests/unit/test_fuzz_*.py and
bench/fuzz.py: hostile SOAP envelopes, MTOM bodies and ebRIM trees, and the properties the
parsers must keep (only their documented error types, never a 500 or a traceback, spool folders
always removed)."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hypothesis import strategies as st
from lxml import etree

from gateway.ebrim import parse
from gateway.ebrim.xmlsafe import parse_xml
from gateway.errors import XdsFailure
from gateway.ns import LCM, QUERY, RIM, SOAP12, WSA, XDSB, XOP, Action
from gateway.soap.envelope import EnvelopeError, inspect_envelope, parse_envelope, require_action
from gateway.soap.multipart import MultipartError, parse_multipart_ex

ITI18_BODY = (
    b'<query:AdhocQueryRequest xmlns:query="urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0" '
    b'xmlns:rim="urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0">'
    b'<query:ResponseOption returnType="ObjectRef"/>'
    b'<rim:AdhocQuery id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d">'
    b'<rim:Slot name="$XDSDocumentEntryPatientId"><rim:ValueList>'
    b"<rim:Value>'fuzz^^^&amp;1.2.3&amp;ISO'</rim:Value></rim:ValueList></rim:Slot>"
    b'<rim:Slot name="$XDSDocumentEntryStatus"><rim:ValueList>'
    b"<rim:Value>('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')</rim:Value>"
    b"</rim:ValueList></rim:Slot></rim:AdhocQuery></query:AdhocQueryRequest>")


def envelope(body: bytes = ITI18_BODY, action: str = Action.ITI18,
             extra_headers: bytes = b"") -> bytes:
    return (b'<?xml version="1.0" encoding="UTF-8"?><env:Envelope xmlns:env="' + SOAP12.encode()
            + b'" xmlns:wsa="' + WSA.encode() + b'"><env:Header><wsa:Action env:mustUnderstand='
            b'"true">' + action.encode() + b"</wsa:Action><wsa:MessageID>urn:uuid:"
            b"0b1f2a4c-3d5e-4f60-8a7b-9c0d1e2f3a4b</wsa:MessageID>" + extra_headers
            + b"</env:Header><env:Body>" + body + b"</env:Body></env:Envelope>")


VALID_ENVELOPE = envelope()

HOSTILE_SNIPPETS = [
    b'<!DOCTYPE a [<!ENTITY x "xx"><!ENTITY y "&x;&x;&x;&x;">]>',
    b'<!DOCTYPE a SYSTEM "http://127.0.0.1:1/x.dtd">',
    b"&x;", b"<![CDATA[", b"]]>", b"<?pi x?>", b"<!--", b"-->", b"\x00", b"\xff\xfe",
    b'<xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="/etc/passwd"/>',
    b"<a>" * 300, b"</a>" * 3, b' a="' + b"x" * 5000 + b'"', b"&#0;", b"&#x110000;",
    b'<env:Header xmlns:env="' + SOAP12.encode() + b'"/>', b'env:mustUnderstand="1"',
]


@st.composite
def mutated(draw: Any, base: bytes) -> bytes:
    """`base` with a few byte-level edits: cut, insert hostile snippets or random bytes,
    flip bytes, duplicate a slice."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            data.extend(draw(st.binary(max_size=64)))
            continue
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.integers(0, 4))
        if kind == 0:
            del data[pos:pos + draw(st.integers(1, 200))]
        elif kind == 1:
            data[pos:pos] = draw(st.sampled_from(HOSTILE_SNIPPETS))
        elif kind == 2:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif kind == 3 and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        else:
            end = min(len(data), pos + draw(st.integers(1, 400)))
            data[pos:pos] = data[pos:end]
    return bytes(data)


def check_envelope(data: bytes) -> None:
    """The envelope layer raises EnvelopeError and nothing else."""
    try:
        root = parse_envelope(data)
        env = inspect_envelope(root)
        require_action(env)
    except EnvelopeError:
        pass


# --- MTOM ------------------------------------------------------------------------------------

BOUNDARY = "MIMEBoundary_fuzz_4f1c"
MTOM_TYPE = (f'multipart/related; boundary="{BOUNDARY}"; type="application/xop+xml"; '
             f'start="<root@fuzz>"; start-info="application/soap+xml"')


def mtom_body(envelope_bytes: bytes = VALID_ENVELOPE, attachment: bytes = b"%PDF-1.4 fuzz"
              ) -> bytes:
    b = BOUNDARY.encode()
    return (b"--" + b + b"\r\nContent-Type: application/xop+xml; charset=UTF-8; "
            b'type="application/soap+xml"\r\nContent-Transfer-Encoding: binary\r\n'
            b"Content-ID: <root@fuzz>\r\n\r\n" + envelope_bytes + b"\r\n--" + b
            + b"\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: binary\r\n"
            b"Content-ID: <doc1@fuzz>\r\n\r\n" + attachment + b"\r\n--" + b + b"--\r\n")


def check_multipart(data: bytes, content_type: str, spool: Path) -> None:
    """The MIME parser raises MultipartError and nothing else."""
    try:
        parse_multipart_ex(io.BytesIO(data), content_type, spool, max_envelope_bytes=64 * 1024,
                           max_total_bytes=1024 * 1024, content_length=len(data),
                           chunk_size=257)
    except MultipartError:
        pass


# --- ebRIM -----------------------------------------------------------------------------------

_TAGS = [(RIM, "ExtrinsicObject"), (RIM, "RegistryPackage"), (RIM, "Association"),
         (RIM, "Classification"), (RIM, "ExternalIdentifier"), (RIM, "Slot"),
         (RIM, "ValueList"), (RIM, "Value"), (RIM, "Name"), (RIM, "LocalizedString"),
         (RIM, "RegistryObjectList"), (RIM, "AdhocQuery"), (RIM, "ObjectRef"),
         (QUERY, "ResponseOption"), (XDSB, "Document"), (XDSB, "DocumentRequest"),
         (XDSB, "DocumentUniqueId"), (XDSB, "RepositoryUniqueId"),
         (XDSB, "HomeCommunityId"), (XOP, "Include"), (LCM, "SubmitObjectsRequest")]
_ATTRS = ["id", "objectType", "mimeType", "status", "name", "value", "classificationScheme",
          "classifiedObject", "nodeRepresentation", "identificationScheme",
          "registryObject", "associationType", "sourceObject", "targetObject", "returnType",
          "returnComposedObjects", "href", "lid", "home", "charset", "xml:lang"]
_VALUES = st.one_of(
    st.sampled_from(["urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1", "Document01", "",
                     "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d", "cid:doc1@fuzz",
                     "text/xml", "LeafClass", "ObjectRef", "true", "x" * 300,
                     "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember",
                     "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd", "('a','b')", "'"]),
    st.text(max_size=20))


def _clean(text: str) -> str:
    return "".join(c for c in text if c in "\t\n\r" or (" " <= c <= "\ud7ff")
                   or ("\ue000" <= c <= "\ufffd"))


@st.composite
def ebrim_tree(draw: Any, root: tuple[str, str], depth: int = 0) -> etree._Element:
    el = etree.Element(f"{{{root[0]}}}{root[1]}")
    for attr in draw(st.lists(st.sampled_from(_ATTRS), max_size=4, unique=True)):
        name = "{http://www.w3.org/XML/1998/namespace}lang" if attr == "xml:lang" else attr
        el.set(name, _clean(draw(_VALUES)))
    if draw(st.booleans()):
        el.text = _clean(draw(_VALUES))
    if depth < 3:
        for tag in draw(st.lists(st.sampled_from(_TAGS), max_size=4)):
            el.append(draw(ebrim_tree(tag, depth + 1)))
    return el


EBRIM_ROOTS = [(LCM, "SubmitObjectsRequest"), (QUERY, "AdhocQueryRequest"),
               (XDSB, "RetrieveDocumentSetRequest"),
               (XDSB, "ProvideAndRegisterDocumentSetRequest")]


def check_ebrim(el: etree._Element, spool: Path) -> None:
    """The ebRIM parsers raise XdsFailure and nothing else (after a round trip through the
    hardened parser, as from the wire)."""
    el = parse_xml(etree.tostring(el))
    local = etree.QName(el).localname
    try:
        if local == "SubmitObjectsRequest":
            parse.parse_submit_objects_request(el)
        elif local == "AdhocQueryRequest":
            parse.parse_adhoc_query_request(el)
        elif local == "RetrieveDocumentSetRequest":
            parse.parse_retrieve_document_set_request(el)
        else:
            attachment = SimpleNamespace(content_id="doc1@fuzz", path=spool / "none", size=0,
                                         content_type="text/plain", sha1=None)
            parse.parse_provide_and_register(el, {"doc1@fuzz": attachment},  # type: ignore[dict-item]
                                             spool)
    except XdsFailure:
        pass
