"""SOAP 1.2 fault envelopes, and a WSGI helper that answers with one.

Owns only the rendering: `fault_envelope()` writes an env:Fault (env:Code/env:Value with an
optional env:Subcode, env:Reason/env:Text xml:lang="en") with lxml; `soap_fault_response()`
sends it from WSGI code that has no SOAP framework in front of it (the MTOM middleware, the
edge's last-resort error path). Which problem earns which code is decided by the callers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lxml import etree

from gateway.errors import SoapFault, SoapFaultCode
from gateway.ns import SOAP12

CONTENT_TYPE = "application/soap+xml; charset=utf-8"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_CODES = frozenset({
    SoapFaultCode.SENDER, SoapFaultCode.RECEIVER, SoapFaultCode.VERSION_MISMATCH,
    SoapFaultCode.MUST_UNDERSTAND, SoapFaultCode.DATA_ENCODING_UNKNOWN,
})
_REASONS = {400: "Bad Request", 413: "Request Entity Too Large", 415: "Unsupported Media Type",
            500: "Internal Server Error", 503: "Service Unavailable"}

StartResponse = Callable[..., Any]


def _code_name(code: str) -> str:
    name = code.split(":", 1)[1] if ":" in code else code
    if name == "Client":
        name = SoapFaultCode.SENDER
    elif name == "Server":
        name = SoapFaultCode.RECEIVER
    if name not in _CODES:
        raise ValueError(f"not a SOAP 1.2 fault code: {code!r}")
    return name


def default_http_status(code: str) -> int:
    """SOAP 1.2 part 2, 7.5.1: env:Sender -> 400, every other code -> 500."""
    return 400 if _code_name(code) == SoapFaultCode.SENDER else 500


def fault_envelope(code: str, reason: str, *, subcode: tuple[str, str] | None = None) -> bytes:
    """A SOAP 1.2 envelope holding one env:Fault, UTF-8 with an XML declaration.

    `code` is a SOAP 1.2 fault code ("Sender", "Receiver", "VersionMismatch", "MustUnderstand",
    "DataEncodingUnknown"; an "env:" prefix and the SOAP 1.1 names Client/Server are accepted).
    `subcode` is (namespace, local name) of an optional env:Subcode value.
    """
    name = _code_name(code)
    env = etree.Element(f"{{{SOAP12}}}Envelope", nsmap={"env": SOAP12})
    body = etree.SubElement(env, f"{{{SOAP12}}}Body")
    fault = etree.SubElement(body, f"{{{SOAP12}}}Fault")
    code_el = etree.SubElement(fault, f"{{{SOAP12}}}Code")
    etree.SubElement(code_el, f"{{{SOAP12}}}Value").text = f"env:{name}"
    if subcode is not None:
        ns, local = subcode
        sub = etree.SubElement(code_el, f"{{{SOAP12}}}Subcode", nsmap={"sc": ns})
        etree.SubElement(sub, f"{{{SOAP12}}}Value").text = f"sc:{local}"
    reason_el = etree.SubElement(fault, f"{{{SOAP12}}}Reason")
    text = etree.SubElement(reason_el, f"{{{SOAP12}}}Text")
    text.set(XML_LANG, "en")
    text.text = reason
    return bytes(etree.tostring(env, xml_declaration=True, encoding="UTF-8"))


def soap_fault_response(start_response: StartResponse, code: str, reason: str,
                        http_status: int | None = None, *,
                        subcode: tuple[str, str] | None = None,
                        exc_info: Any = None) -> list[bytes]:
    """Start a WSGI response carrying a SOAP 1.2 fault; return its body iterable."""
    status = default_http_status(code) if http_status is None else http_status
    data = fault_envelope(code, reason, subcode=subcode)
    headers = [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(data)))]
    phrase = _REASONS.get(status, "Error")
    if exc_info is None:
        start_response(f"{status} {phrase}", headers)
    else:
        start_response(f"{status} {phrase}", headers, exc_info)
    return [data]


def respond_with(start_response: StartResponse, fault: SoapFault) -> list[bytes]:
    """`soap_fault_response` for a `gateway.errors.SoapFault`."""
    return soap_fault_response(start_response, fault.code, fault.reason, fault.http_status,
                               subcode=fault.subcode)
