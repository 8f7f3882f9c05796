"""What the SOAP edge checks on every request before a transaction runs: the XUA assertion
(gateway.security.xua) and the per-request limits (gateway.security.limits).

`RequestSecurity.check()` returns the verified XUA subject (or None), raises a `SoapFault`
(the WS-Security fault) for a refused or missing assertion, and an `XdsFailure` for a body over
the limits. The edge (gateway.soap.application) calls it once per request, before the handler.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lxml import etree

from gateway.security.limits import RequestLimits, check_body
from gateway.security.xua import XuaError, XuaPolicy, XuaSubject, check_security

if TYPE_CHECKING:
    from gateway.transactions import Transaction

log = logging.getLogger("gateway.security")


@dataclass(frozen=True)
class RequestSecurity:
    xua: XuaPolicy = field(default_factory=XuaPolicy)
    limits: RequestLimits = field(default_factory=RequestLimits)

    @classmethod
    def from_config(cls, config: Any) -> RequestSecurity:
        """From a GatewayConfig ([xua], [limits]); defaults for anything else (tests)."""
        return cls(xua=XuaPolicy.from_config(getattr(config, "xua", None)),
                   limits=RequestLimits.from_config(getattr(config, "limits", None)))

    def check(self, endpoint: str, transaction: Transaction,
              headers: Sequence[etree._Element], body: etree._Element) -> XuaSubject | None:
        try:
            subject = check_security(headers, endpoint, self.xua)
        except XuaError as exc:
            log.info("%s %s: XUA refused: wsse:%s: %s", endpoint, transaction.name, exc.code,
                     exc.reason)
            raise exc.fault() from None
        check_body(transaction, body, self.limits)
        return subject
