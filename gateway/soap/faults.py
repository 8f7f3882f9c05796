"""A WSGI helper that answers with a SOAP 1.2 fault, for code that has no SOAP framework in
front of it (the MTOM middleware, the edge's last-resort error path). The envelope itself is
written by `gateway.soap.envelope.fault_envelope`; which problem earns which code is decided by
the callers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.errors import SoapFault, SoapFaultCode
from gateway.soap.envelope import FaultReport, http_status_line, to_bytes
from gateway.soap.envelope import fault_envelope as envelope_fault

CONTENT_TYPE = "application/soap+xml; charset=utf-8"
_CODES = frozenset({
    SoapFaultCode.SENDER, SoapFaultCode.RECEIVER, SoapFaultCode.VERSION_MISMATCH,
    SoapFaultCode.MUST_UNDERSTAND, SoapFaultCode.DATA_ENCODING_UNKNOWN,
})

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
    """A SOAP 1.2 fault envelope as bytes, for faults raised before the envelope was read
    (so without wsa:RelatesTo).

    `code` is a SOAP 1.2 fault code ("Sender", "Receiver", "VersionMismatch", "MustUnderstand",
    "DataEncodingUnknown"; an "env:" prefix and the SOAP 1.1 names Client/Server are accepted).
    `subcode` is (namespace, local name) of an optional env:Subcode value.
    """
    fault = SoapFault(_code_name(code), reason, subcode)
    return to_bytes(envelope_fault(FaultReport(fault), relates_to=None))


def soap_fault_response(start_response: StartResponse, code: str, reason: str,
                        http_status: int | None = None, *,
                        subcode: tuple[str, str] | None = None,
                        exc_info: Any = None) -> list[bytes]:
    """Start a WSGI response carrying a SOAP 1.2 fault; return its body iterable."""
    status = default_http_status(code) if http_status is None else http_status
    data = fault_envelope(code, reason, subcode=subcode)
    headers = [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(data)))]
    if exc_info is None:
        start_response(http_status_line(status), headers)
    else:
        start_response(http_status_line(status), headers, exc_info)
    return [data]


def respond_with(start_response: StartResponse, fault: SoapFault) -> list[bytes]:
    """`soap_fault_response` for a `gateway.errors.SoapFault`."""
    return soap_fault_response(start_response, fault.code, fault.reason, fault.http_status,
                               subcode=fault.subcode)
