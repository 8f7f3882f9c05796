"""Per-request bounds against hostile or runaway input, checked at the SOAP edge.

Owns `RequestLimits` (from the [limits] configuration), `check_markup()` (a cheap bound on the
number of elements of an envelope, counted in its bytes before lxml builds a tree: about 100
bytes of memory per element) and `check_body()` (counts of documents, DocumentRequests, query
slots and values in a request body, before any handler builds model objects from it).

What the other layers already bound (README, "Hostile input"): the HTTP body and the envelope
sizes ([server] max_request_bytes, max_envelope_bytes), MIME parts and header blocks
(gateway.soap.multipart), DTDs and entities (refused by gateway.ebrim.xmlsafe), element depth
(libxml2 without huge_tree: 256 levels) and text or attribute values (10 MB each), query
results ([registry] max_results), concurrent requests (gunicorn workers x threads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lxml import etree

from gateway.errors import SoapFault, SoapFaultCode, XdsError, XdsFailure
from gateway.ns import QUERY, RIM, XDSB, Action, ErrorCode

if TYPE_CHECKING:
    from gateway.config import LimitsConfig
    from gateway.transactions import Transaction

_REGISTRY_SIDE = frozenset({Action.ITI18, Action.ITI38, Action.ITI42})


@dataclass(frozen=True)
class RequestLimits:
    max_xml_elements: int = 1_000_000
    max_documents_per_request: int = 1000
    max_document_requests: int = 1000
    max_query_slots: int = 100
    max_query_values: int = 2000

    @classmethod
    def from_config(cls, cfg: LimitsConfig | None) -> RequestLimits:
        if cfg is None:
            return cls()
        return cls(max_xml_elements=cfg.max_xml_elements,
                   max_documents_per_request=cfg.max_documents_per_request,
                   max_document_requests=cfg.max_document_requests,
                   max_query_slots=cfg.max_query_slots, max_query_values=cfg.max_query_values)


def check_markup(data: bytes, max_elements: int) -> None:
    """Refuse an envelope with more than `max_elements` elements, before parsing it.

    Counts '<' (every element has one or two: start and end tag), so the bound is 2 x
    `max_elements` of them; raises an env:Sender SoapFault."""
    if data.count(b"<") > 2 * max_elements:
        raise SoapFault(SoapFaultCode.SENDER,
                        f"The SOAP envelope has more than {max_elements} elements")


def _count(body: etree._Element, *tags: str) -> int:
    return sum(1 for _ in body.iter(*tags))


def check_body(transaction: Transaction, body: etree._Element, limits: RequestLimits) -> None:
    """Raise XdsFailure (XDSRegistryOutOfResources / XDSRepositoryOutOfResources) when the body
    of `transaction` exceeds `limits`."""
    code = (ErrorCode.REGISTRY_OUT_OF_RESOURCES if transaction.request_action in _REGISTRY_SIDE
            else ErrorCode.REPOSITORY_OUT_OF_RESOURCES)

    def fail(what: str, count: int, limit: int) -> XdsFailure:
        return XdsFailure(XdsError(code, f"{transaction.name}: the request has {count} {what}; "
                                         f"this gateway accepts at most {limit}"))

    action = transaction.request_action
    if action in (Action.ITI41, Action.ITI42):
        # ITI-41 carries each document twice (metadata and content): count the larger part.
        docs = max(_count(body, f"{{{XDSB}}}Document"), _count(body, f"{{{RIM}}}ExtrinsicObject"))
        if docs > limits.max_documents_per_request:
            raise fail("documents", docs, limits.max_documents_per_request)
    elif action in (Action.ITI18, Action.ITI38):
        query = body.find(f"{{{RIM}}}AdhocQuery")
        if query is None:
            query = next(body.iter(f"{{{RIM}}}AdhocQuery"), None)
        if query is None and body.tag != f"{{{QUERY}}}AdhocQueryRequest":
            return
        scope = query if query is not None else body
        slots = _count(scope, f"{{{RIM}}}Slot")
        if slots > limits.max_query_slots:
            raise fail("query parameters (Slots)", slots, limits.max_query_slots)
        values = _count(scope, f"{{{RIM}}}Value")
        if values > limits.max_query_values:
            raise fail("query parameter values", values, limits.max_query_values)
    else:  # the retrieves: ITI-43, ITI-39, RAD-69, RAD-75
        requests = sum(1 for el in body.iter(etree.Element)
                       if etree.QName(el).localname == "DocumentRequest")
        if requests > limits.max_document_requests:
            raise fail("DocumentRequests", requests, limits.max_document_requests)
