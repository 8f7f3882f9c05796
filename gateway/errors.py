"""XDS errors as values.

`XdsError` is one RegistryError of a RegistryErrorList (code, context, severity, location).
`XdsFailure` is the exception a handler raises when a request fails as a whole; the SOAP edge
turns it into a RegistryResponse (or the transaction's response type) with status Failure.
`SoapFault` is for envelope-level problems only (not XML, wrong SOAP version, no wsa:Action,
mustUnderstand): the edge renders it as a SOAP 1.2 fault.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.ns import ResponseStatus, Severity


@dataclass(frozen=True)
class XdsError:
    code: str
    context: str
    severity: str = Severity.ERROR
    location: str | None = None

    @property
    def is_error(self) -> bool:
        return self.severity == Severity.ERROR


class XdsFailure(Exception):
    """A request that fails as a whole, with one or more XDS errors."""

    def __init__(self, errors: XdsError | Iterable[XdsError]):
        self.errors: tuple[XdsError, ...] = (
            (errors,) if isinstance(errors, XdsError) else tuple(errors)
        )
        super().__init__("; ".join(f"{e.code}: {e.context}" for e in self.errors))


def status_for(errors: Iterable[XdsError], *, partial_possible: bool = False,
               any_success: bool = False) -> str:
    """The ResponseStatus for a response carrying `errors`.

    Warnings alone leave Success. With errors: PartialSuccess when the transaction allows it
    and something succeeded, else Failure.
    """
    if not any(e.is_error for e in errors):
        return ResponseStatus.SUCCESS
    if partial_possible and any_success:
        return ResponseStatus.PARTIAL_SUCCESS
    return ResponseStatus.FAILURE


class SoapFaultCode:
    SENDER = "Sender"
    RECEIVER = "Receiver"
    VERSION_MISMATCH = "VersionMismatch"
    MUST_UNDERSTAND = "MustUnderstand"
    DATA_ENCODING_UNKNOWN = "DataEncodingUnknown"


@dataclass
class SoapFault(Exception):
    """An envelope-level problem, answered with a SOAP 1.2 fault.

    `code` is a SOAP 1.2 fault code (SoapFaultCode); `subcode` an optional qualified subcode
    such as "wsa:ActionNotSupported" written as (namespace, local name); `http_status` follows
    SOAP 1.2 part 2 (400 for Sender, 500 for the others).
    """

    code: str
    reason: str
    subcode: tuple[str, str] | None = None
    http_status: int | None = None

    def __post_init__(self) -> None:
        super().__init__(self.reason)
        if self.http_status is None:
            # SOAP 1.2 part 2, 7.5.1: only env:Sender maps to 400; every other code to 500.
            self.http_status = 400 if self.code == SoapFaultCode.SENDER else 500
