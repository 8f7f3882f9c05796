"""SOAP 1.2 + WS-Addressing envelopes, free of any SOAP framework.

Owns: the Content-Type check of an inbound request, the hardened parse of its envelope, the
envelope-level checks (SOAP version, Header/Body shape, mustUnderstand, wsa:Action) with the
SOAP 1.2 fault each failure maps to, and the writers of response and fault envelopes with their
WS-Addressing headers. The spyne protocol (gateway.soap.protocol) calls these; nothing here
imports spyne, so the edge can change framework without touching the rules.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

from lxml import etree

from gateway.ebrim.xmlsafe import UnsafeXmlError, parse_xml
from gateway.errors import SoapFault, SoapFaultCode
from gateway.ns import SOAP11, SOAP12, WSA, WSA_ANONYMOUS, WSSE, Action, q
from gateway.soap.multipart import parse_content_type

SOAP12_MEDIA_TYPE = "application/soap+xml"
SOAP11_MEDIA_TYPE = "text/xml"
XOP_MEDIA_TYPE = "application/xop+xml"

ROLE_NEXT = "http://www.w3.org/2003/05/soap-envelope/role/next"
ROLE_NONE = "http://www.w3.org/2003/05/soap-envelope/role/none"
ROLE_ULTIMATE_RECEIVER = "http://www.w3.org/2003/05/soap-envelope/role/ultimateReceiver"
# Roles this node plays (SOAP 1.2 part 1, 2.2): no role attribute means ultimateReceiver.
OUR_ROLES = frozenset({"", ROLE_NEXT, ROLE_ULTIMATE_RECEIVER})

# Namespaces of header blocks the edge understands (SOAP 1.2 part 1, 2.4): WS-Addressing, and
# WS-Security, whose wsse:Security header gateway.security.xua processes (XUA, ITI-40).
UNDERSTOOD_HEADER_NAMESPACES: frozenset[str] = frozenset({WSA, WSSE})

FAULT_ACTION = Action.SOAP_FAULT
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
# Characters XML 1.0 cannot carry (lxml refuses them): replaced in fault reasons.
_XML_UNSAFE = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass
class FaultReport:
    """A SOAP 1.2 fault and what travels with it: extra header blocks (env:Upgrade,
    env:NotUnderstood) and an optional env:Detail child."""

    fault: SoapFault
    header_blocks: tuple[etree._Element, ...] = ()
    detail: etree._Element | None = None


class EnvelopeError(Exception):
    """An inbound message the edge refuses; `report` says how to answer."""

    def __init__(self, report: FaultReport):
        super().__init__(report.fault.reason)
        self.report = report


def _fail(code: str, reason: str, subcode: tuple[str, str] | None = None,
          http_status: int | None = None, *,
          header_blocks: tuple[etree._Element, ...] = (),
          detail: etree._Element | None = None) -> EnvelopeError:
    return EnvelopeError(FaultReport(SoapFault(code, reason, subcode, http_status),
                                     header_blocks=header_blocks, detail=detail))


# --- Content-Type -----------------------------------------------------------------------------

def check_content_type(content_type: str | None) -> None:
    """Accept SOAP 1.2 (application/soap+xml), and its MTOM forms (multipart/related with
    start-info application/soap+xml, or the XOP root part application/xop+xml). text/xml is
    SOAP 1.1: env:VersionMismatch. Anything else: env:Sender."""
    if not content_type:
        raise _fail(SoapFaultCode.SENDER,
                    "The request has no Content-Type; SOAP 1.2 requires application/soap+xml")
    media, params = parse_content_type(content_type)
    inner = media
    if media == "multipart/related":
        inner = parse_content_type(params.get("start-info", ""))[0]
        if not inner and parse_content_type(params.get("type", ""))[0] == SOAP12_MEDIA_TYPE:
            inner = SOAP12_MEDIA_TYPE
    elif media == XOP_MEDIA_TYPE:
        inner = parse_content_type(params.get("type", ""))[0]
    if inner == SOAP12_MEDIA_TYPE:
        return
    if inner == SOAP11_MEDIA_TYPE:
        raise _fail(SoapFaultCode.VERSION_MISMATCH,
                    "Content-Type text/xml is SOAP 1.1; this endpoint speaks SOAP 1.2 "
                    "(application/soap+xml)", header_blocks=(upgrade_header(),))
    raise _fail(SoapFaultCode.SENDER,
                f"Unsupported Content-Type {media[:80]!r}; SOAP 1.2 requires application/soap+xml")


# --- Parsing ------------------------------------------------------------------------------------

def parse_envelope(data: bytes) -> etree._Element:
    """The hardened parse of the envelope bytes; a problem becomes an env:Sender fault whose
    reason never quotes the input."""
    if not data.strip():
        raise _fail(SoapFaultCode.SENDER, "The request body is empty; expected a SOAP 1.2 "
                                          "envelope")
    try:
        return parse_xml(data)
    except UnsafeXmlError:
        raise _fail(SoapFaultCode.SENDER, "The request contains a DTD or entity declaration; "
                                          "this gateway refuses them") from None
    except ValueError:  # MalformedXmlError
        raise _fail(SoapFaultCode.SENDER, "The request is not well-formed XML") from None


# --- Inbound envelope ------------------------------------------------------------------------

@dataclass
class InboundEnvelope:
    envelope: etree._Element
    headers: tuple[etree._Element, ...]
    body: etree._Element  # the first element child of env:Body
    action: str | None = None
    message_id: str | None = None
    reply_to: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


def upgrade_header() -> etree._Element:
    """The env:Upgrade header block of SOAP 1.2 part 1, 5.4.7: we support SOAP 1.2 only."""
    up = etree.Element(q(SOAP12, "Upgrade"), nsmap={"env": SOAP12})
    se = etree.SubElement(up, q(SOAP12, "SupportedEnvelope"))
    se.set("qname", "env:Envelope")  # "env" is bound to SOAP 1.2 on the element itself
    return up


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip() in ("true", "1")


def _text(el: etree._Element | None) -> str | None:
    if el is None or el.text is None:
        return None
    return el.text.strip() or None


def message_id_of(root: etree._Element) -> str | None:
    """wsa:MessageID of an envelope, if it has one (for RelatesTo on a fault)."""
    return _text(root.find(f"{q(SOAP12, 'Header')}/{q(WSA, 'MessageID')}"))


def inspect_envelope(root: etree._Element) -> InboundEnvelope:
    """Check the envelope shape and header processing rules, in SOAP's order: version, shape,
    mustUnderstand, then WS-Addressing. Raises EnvelopeError."""
    if root.tag != q(SOAP12, "Envelope"):
        if root.tag == q(SOAP11, "Envelope"):
            reason = "SOAP 1.1 envelope received; this endpoint speaks SOAP 1.2"
        else:
            reason = "The document element is not a SOAP 1.2 env:Envelope"
        raise _fail(SoapFaultCode.VERSION_MISMATCH, reason, header_blocks=(upgrade_header(),))
    header: etree._Element | None = None
    body: etree._Element | None = None
    for child in root:
        if not isinstance(child.tag, str):
            continue  # comments
        if child.tag == q(SOAP12, "Header") and header is None and body is None:
            header = child
        elif child.tag == q(SOAP12, "Body") and body is None:
            body = child
        else:
            raise _fail(SoapFaultCode.SENDER,
                        "env:Envelope may hold only an optional env:Header then env:Body")
    if body is None:
        raise _fail(SoapFaultCode.SENDER, "The envelope has no env:Body")
    first = next((c for c in body if isinstance(c.tag, str)), None)
    if first is None:
        raise _fail(SoapFaultCode.SENDER, "env:Body is empty; expected the request element")
    headers = tuple(c for c in header if isinstance(c.tag, str)) if header is not None else ()
    _check_must_understand(headers)
    env = InboundEnvelope(envelope=root, headers=headers, body=first)
    for h in headers:
        if h.tag == q(WSA, "Action") and env.action is None:
            env.action = _text(h)
        elif h.tag == q(WSA, "MessageID") and env.message_id is None:
            env.message_id = _text(h)
        elif h.tag == q(WSA, "ReplyTo") and env.reply_to is None:
            env.reply_to = _text(h.find(q(WSA, "Address")))
    return env


def _check_must_understand(headers: tuple[etree._Element, ...]) -> None:
    missed: list[etree._Element] = []
    for h in headers:
        if not _is_true(h.get(q(SOAP12, "mustUnderstand"))):
            continue
        role = (h.get(q(SOAP12, "role")) or "").strip()
        if role not in OUR_ROLES:
            continue
        qn = etree.QName(h)
        if qn.namespace in UNDERSTOOD_HEADER_NAMESPACES:
            continue
        missed.append(h)
    if not missed:
        return
    blocks = []
    for h in missed:
        qn = etree.QName(h)
        if qn.namespace in (None, SOAP12):
            nu = etree.Element(q(SOAP12, "NotUnderstood"), nsmap={"env": SOAP12})
            nu.set("qname", f"env:{qn.localname}" if qn.namespace else qn.localname)
        else:
            nu = etree.Element(q(SOAP12, "NotUnderstood"),
                               nsmap={"env": SOAP12, "ns1": qn.namespace})
            nu.set("qname", f"ns1:{qn.localname}")
        blocks.append(nu)
    names = ", ".join(f"{{{etree.QName(h).namespace or ''}}}{etree.QName(h).localname}"
                      for h in missed)
    raise _fail(SoapFaultCode.MUST_UNDERSTAND,
                f"Header block(s) marked mustUnderstand are not understood: {names}",
                header_blocks=tuple(blocks))


def require_action(env: InboundEnvelope) -> str:
    """wsa:Action is required (WS-Addressing 1.0 SOAP binding, 6.4.1)."""
    if not env.action:
        detail = etree.Element(q(WSA, "ProblemHeaderQName"), nsmap={"wsa": WSA})
        detail.text = "wsa:Action"
        raise _fail(SoapFaultCode.SENDER, "A required header representing a Message "
                    "Addressing Property is not present: wsa:Action",
                    subcode=(WSA, "MessageAddressingHeaderRequired"), detail=detail)
    return env.action


def action_not_supported(action: str, endpoint: str, offered: tuple[str, ...]) -> EnvelopeError:
    detail = etree.Element(q(WSA, "ProblemAction"), nsmap={"wsa": WSA})
    etree.SubElement(detail, q(WSA, "Action")).text = action
    return _fail(SoapFaultCode.SENDER,
                 f"The action {action!r} is not supported by the endpoint {endpoint} "
                 f"(it offers: {', '.join(offered) or 'nothing'})",
                 subcode=(WSA, "ActionNotSupported"), detail=detail)


# --- Outbound envelopes ------------------------------------------------------------------------

def new_message_id() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _envelope_with_headers(action: str, relates_to: str | None, *,
                           must_understand: bool) -> tuple[etree._Element, etree._Element]:
    env = etree.Element(q(SOAP12, "Envelope"), nsmap={"env": SOAP12, "wsa": WSA})
    header = etree.SubElement(env, q(SOAP12, "Header"))
    a = etree.SubElement(header, q(WSA, "Action"))
    if must_understand:
        a.set(q(SOAP12, "mustUnderstand"), "true")
    a.text = action
    etree.SubElement(header, q(WSA, "MessageID")).text = new_message_id()
    if relates_to:
        etree.SubElement(header, q(WSA, "RelatesTo")).text = relates_to
    etree.SubElement(header, q(WSA, "To")).text = WSA_ANONYMOUS
    return env, header


def response_envelope(body: etree._Element, *, action: str,
                      relates_to: str | None) -> etree._Element:
    """A SOAP 1.2 response: wsa:Action (mustUnderstand), wsa:MessageID, wsa:RelatesTo, wsa:To
    anonymous, and `body` (moved, not copied) as the only child of env:Body."""
    env, _ = _envelope_with_headers(action, relates_to, must_understand=True)
    etree.SubElement(env, q(SOAP12, "Body")).append(body)
    return env


def fault_envelope(report: FaultReport, *, relates_to: str | None) -> etree._Element:
    """A SOAP 1.2 fault envelope with the WS-Addressing fault action."""
    fault = report.fault
    env, header = _envelope_with_headers(FAULT_ACTION, relates_to, must_understand=False)
    for block in report.header_blocks:
        header.append(block)
    f = etree.SubElement(etree.SubElement(env, q(SOAP12, "Body")), q(SOAP12, "Fault"))
    code = etree.SubElement(f, q(SOAP12, "Code"))
    etree.SubElement(code, q(SOAP12, "Value")).text = f"env:{fault.code}"
    if fault.subcode is not None:
        ns, local = fault.subcode
        sub = etree.SubElement(code, q(SOAP12, "Subcode"))
        if ns == WSA:
            etree.SubElement(sub, q(SOAP12, "Value")).text = f"wsa:{local}"
        else:
            etree.SubElement(sub, q(SOAP12, "Value"), nsmap={"sc": ns}).text = f"sc:{local}"
    reason = etree.SubElement(f, q(SOAP12, "Reason"))
    text = etree.SubElement(reason, q(SOAP12, "Text"))
    text.set(_XML_LANG, "en")
    text.text = _XML_UNSAFE.sub("?", fault.reason)  # reasons may quote hostile input
    if report.detail is not None:
        etree.SubElement(f, q(SOAP12, "Detail")).append(report.detail)
    return env


def to_bytes(env: etree._Element) -> bytes:
    return etree.tostring(env, xml_declaration=True, encoding="UTF-8")


def soap_content_type(action: str) -> str:
    return f'{SOAP12_MEDIA_TYPE}; charset=UTF-8; action="{action}"'


def http_status_line(status: int) -> str:
    reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
               413: "Content Too Large", 415: "Unsupported Media Type",
               500: "Internal Server Error", 503: "Service Unavailable"}
    return f"{status} {reasons.get(status, 'Error')}"
