"""One record per IHE transaction, and the contract between the SOAP edge and the handlers.

The edge (gateway.soap) parses the envelope, finds the `Transaction` for (endpoint path,
wsa:Action), and calls its handler with a `RequestContext` and the body's first element (lxml).
The handler returns a `SoapResponse`: the response body element and any attachments, which the
edge writes as MTOM (xop:Include by Content-ID) when the transaction's response carries
documents. Handlers know nothing of HTTP, spyne or MTOM framing; XDS errors are values in the
response body, never exceptions that reach the edge (an `XdsFailure` that does is rendered as a
RegistryResponse with status Failure).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lxml import etree

from gateway.ns import Action

if TYPE_CHECKING:
    from gateway.security.xua import XuaSubject
    from gateway.services import Services


@dataclass(frozen=True)
class Attachment:
    """A MIME part of an MTOM message, its content in a file."""

    content_id: str  # without "cid:" and without angle brackets
    path: Path
    size: int
    content_type: str = "application/octet-stream"
    # Lowercase hex SHA-1 of the bytes, when the writer of `path` computed it while writing
    # (the MTOM parser does); None when unknown.
    sha1: str | None = None
    # `size` bytes of `path` from `offset` (a file shared by several parts); None: the
    # whole file, whose size is taken when the response is framed.
    offset: int | None = None


@dataclass(frozen=True, eq=False)
class StreamedAttachment:
    """A MIME part of an MTOM response whose content is not in a file: `chunks` yields its
    bytes as they arrive (an initiating gateway piping a community's part through; the
    iterator raises when the part cannot be completed). Iterated once, by the edge."""

    content_id: str  # without "cid:" and without angle brackets
    chunks: Iterator[bytes]
    content_type: str = "application/octet-stream"


@dataclass
class RequestContext:
    endpoint: str
    action: str
    message_id: str | None
    # Subject DN of the TLS client certificate (RFC 4514 string), None when TLS is off.
    client_subject: str | None
    # MTOM attachments of the request, by Content-ID (no "cid:", no brackets).
    attachments: Mapping[str, Attachment]
    # A folder that lives as long as the request and its response; removed afterwards.
    spool_dir: Path
    # Envelope headers (lxml elements) for handlers that need them (XUA, later).
    headers: tuple[etree._Element, ...] = ()
    # The verified XUA subject (gateway.security.xua.XuaSubject) when the request carried a
    # valid SAML assertion; None otherwise. Set by the edge before the handler runs.
    xua_subject: XuaSubject | None = None
    # Who asked and where (for the ATNA audit record): wsa:ReplyTo/Address of the request, the
    # client's IP address, and the URL of the endpoint that answered.
    reply_to: str | None = None
    client_address: str | None = None
    endpoint_url: str | None = None


@dataclass
class LiveAttachments:
    """Attachments produced while the response is being written, the body rendered last.

    The edge writes each attachment `parts` yields as an MTOM part as soon as it is yielded
    (its file complete, or its chunks as they come: `StreamedAttachment`), then calls
    `finish()` once `parts` is exhausted for the response body, whose xop:Include hrefs name
    the parts already written; the root part goes last,
    named by the multipart `start` parameter (gateway.soap.mtom.mtom_stream). `close()` is
    called exactly once when the response ends, completed or not (client gone): it stops the
    producer and must return only when nothing writes to the handler's files any more.
    """

    parts: Iterator[Attachment | StreamedAttachment]
    finish: Callable[[], etree._Element]
    close: Callable[[], None] = field(default=lambda: None)
    # The root part FIRST instead: `finish()` is called before `parts` is iterated, and the
    # body it returns names parts still to come; `parts` raises when one cannot be
    # delivered, which breaks the response off (gateway.soap.mtom.mtom_stream).
    root_first: bool = False


@dataclass
class SoapResponse:
    body: etree._Element
    # Attachments referenced from `body` by <xop:Include href="cid:..."/>; only the edge reads
    # the files, streaming them, and only after the handler has returned.
    attachments: tuple[Attachment, ...] = ()
    # Files or folders to delete once the response has been sent (or failed to send).
    cleanup: list[Path] = field(default_factory=list)
    # Streamed response (MTOM, root part last): attachments written as they are produced and
    # the body from `live.finish()`. `attachments` is then empty, and `body` is only the
    # fallback written as the root when `finish()` fails. Its audit record is written when
    # the body is known (or the response is abandoned), not when the handler returns.
    live: LiveAttachments | None = None


Handler = Callable[["Services", RequestContext, etree._Element], SoapResponse]


@dataclass(frozen=True)
class Transaction:
    name: str  # "ITI-41"
    title: str  # "Provide and Register Document Set-b"
    request_action: str
    response_action: str
    # Dotted path "module:function" of the handler, imported on first use, or None while the
    # transaction is not built yet (the edge then answers a clear SOAP fault).
    handler: str | None
    mtom_response: bool = False


ITI18 = Transaction("ITI-18", "Registry Stored Query", Action.ITI18, Action.ITI18_RESPONSE,
                    "gateway.registry.handlers:stored_query")
ITI42 = Transaction("ITI-42", "Register Document Set-b", Action.ITI42, Action.ITI42_RESPONSE,
                    "gateway.registry.handlers:register_document_set")
ITI41 = Transaction("ITI-41", "Provide and Register Document Set-b", Action.ITI41,
                    Action.ITI41_RESPONSE, "gateway.repository.handlers:provide_and_register")
ITI43 = Transaction("ITI-43", "Retrieve Document Set", Action.ITI43, Action.ITI43_RESPONSE,
                    "gateway.repository.handlers:retrieve_document_set", mtom_response=True)
RAD69 = Transaction("RAD-69", "Retrieve Imaging Document Set", Action.RAD69,
                    Action.RAD69_RESPONSE, "gateway.imaging.rad69:retrieve_imaging_document_set",
                    mtom_response=True)
ITI38 = Transaction("ITI-38", "Cross Gateway Query", Action.ITI38, Action.ITI38_RESPONSE,
                    "gateway.xca.responding:cross_gateway_query")
ITI39 = Transaction("ITI-39", "Cross Gateway Retrieve", Action.ITI39, Action.ITI39_RESPONSE,
                    "gateway.xca.responding:cross_gateway_retrieve", mtom_response=True)
RAD75 = Transaction("RAD-75", "Cross Gateway Retrieve Imaging Document Set", Action.RAD75,
                    Action.RAD75_RESPONSE,
                    "gateway.xca.responding_imaging:cross_gateway_retrieve_imaging",
                    mtom_response=True)
# The initiating gateways answer the local consumer transactions (routed to other communities).
ITI18_INITIATING = Transaction("ITI-18", "Registry Stored Query (initiating gateway)",
                               Action.ITI18, Action.ITI18_RESPONSE,
                               "gateway.xca.initiating:stored_query")
ITI43_INITIATING = Transaction("ITI-43", "Retrieve Document Set (initiating gateway)",
                               Action.ITI43, Action.ITI43_RESPONSE,
                               "gateway.xca.initiating:retrieve_document_set",
                               mtom_response=True)
RAD69_INITIATING = Transaction("RAD-69", "Retrieve Imaging Document Set (initiating gateway)",
                               Action.RAD69, Action.RAD69_RESPONSE,
                               "gateway.xca.initiating_imaging:retrieve_imaging_document_set",
                               mtom_response=True)


@dataclass(frozen=True)
class Endpoint:
    path: str
    title: str
    wsdl: str  # file name in wsdl/
    transactions: tuple[Transaction, ...]

    def transaction_for(self, action: str) -> Transaction | None:
        for t in self.transactions:
            if t.request_action == action:
                return t
        return None


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/xds/registry", "Document Registry", "registry.wsdl", (ITI18, ITI42)),
    Endpoint("/xds/repository", "Document Repository", "repository.wsdl", (ITI41, ITI43)),
    Endpoint("/xdsi/imaging-source", "Imaging Document Source", "imaging-source.wsdl",
             (RAD69,)),
    Endpoint("/xca/responding", "Responding Gateway", "xca-responding.wsdl", (ITI38, ITI39)),
    Endpoint("/xcai/responding", "Responding Imaging Gateway", "xcai-responding.wsdl",
             (RAD75,)),
    Endpoint("/xca/initiating", "Initiating Gateway", "xca-initiating.wsdl",
             (ITI18_INITIATING, ITI43_INITIATING)),
    Endpoint("/xcai/initiating", "Initiating Imaging Gateway", "xcai-initiating.wsdl",
             (RAD69_INITIATING,)),
)

ENDPOINTS_BY_PATH: Mapping[str, Endpoint] = {e.path: e for e in ENDPOINTS}
