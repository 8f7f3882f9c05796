"""The spyne side of the edge: a SOAP 1.2 protocol that routes on wsa:Action.

Owns `GatewaySoap12` (a spyne Soap12 subclass) and `build_spyne_app()`, which gives one spyne
`WsgiApplication` per endpoint with one spyne method per transaction. spyne does the request
cycle (read the body, build contexts, pick the method, call it, serialize, report the HTTP
status); this protocol replaces the parts of spyne 2.14 that do not fit (DESIGN.md, known
limits):

- the envelope is parsed with the hardened parser, never by spyne's XMLParser, and a
  malformed request is answered without being logged (all spyne loggers are silenced here:
  requests carry patient data);
- the method is chosen in `get_call_handles()` from wsa:Action and the endpoint, not from
  {tns} + the body element's name (ITI-18 and ITI-38 share a body element);
- mustUnderstand is enforced, and any SOAP 1.2 fault code is written (spyne's Soap12 only
  knows Client.* / Server.*);
- the method receives the whole first body element (lxml), and the response is written as the
  raw element with WS-Addressing headers, as plain SOAP or as MTOM through
  gateway.soap.mtom.

Per-request state lives in an `Exchange` kept in the WSGI environ, shared with the WSGI layer
in gateway.soap.application (which streams and cleans up after the response).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lxml import etree
from spyne import Application, ServiceBase, rpc
from spyne.error import RequestTooLongError
from spyne.model.fault import Fault
from spyne.model.primitive import AnyXml
from spyne.protocol.soap import Soap12
from spyne.server.wsgi import WsgiApplication

from gateway.errors import SoapFault, SoapFaultCode
from gateway.security.limits import RequestLimits, check_markup
from gateway.soap.envelope import (
    FAULT_ACTION,
    EnvelopeError,
    FaultReport,
    InboundEnvelope,
    action_not_supported,
    check_content_type,
    fault_envelope,
    http_status_line,
    inspect_envelope,
    message_id_of,
    parse_envelope,
    require_action,
    response_envelope,
    soap_content_type,
    to_bytes,
)
from gateway.transactions import Attachment, Endpoint, SoapResponse, Transaction

log = logging.getLogger("gateway.soap")

# spyne logs whole requests (at ERROR when malformed, at DEBUG otherwise) and tracebacks at
# CRITICAL: nothing of it may reach the logs. Every spyne logger inherits this level.
SPYNE_LOGGER = logging.getLogger("spyne")
SPYNE_LOGGER.setLevel(logging.CRITICAL + 1)

EXCHANGE_KEY = "xdsi.exchange"
MAX_XML_ELEMENTS_KEY = "xdsi.max_xml_elements"  # set by the application ([limits])
TNS_PREFIX = "urn:xdsi-gateway:soap:"
READ_BLOCK = 64 * 1024


class Exchange:
    """What one request/response needs beyond spyne's context; lives in environ."""

    def __init__(self) -> None:
        self.inbound: InboundEnvelope | None = None
        self.message_id: str | None = None
        self.transaction: Transaction | None = None
        self.fault: FaultReport | None = None
        self.stream: Iterable[bytes] | None = None  # MTOM body, closed with the response
        self.content_length: int | None = None
        self.cleanup: list[Path] = []
        self.own_spool_dir: Path | None = None
        self._closed = False

    def close(self) -> None:
        """Close the response stream and delete what the request left behind (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self.stream, "close", None)
            if close is not None:
                close()
        finally:
            for path in [*self.cleanup, *([self.own_spool_dir] if self.own_spool_dir else [])]:
                _remove(path)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, type(exc).__name__)


def exchange_of(environ: dict[str, Any]) -> Exchange:
    ex = environ.get(EXCHANGE_KEY)
    if not isinstance(ex, Exchange):
        ex = environ[EXCHANGE_KEY] = Exchange()
    return ex


class EdgeFault(Fault):
    """A SOAP 1.2 fault of any code, carried through spyne's Fault handling."""

    def __init__(self, report: FaultReport):
        spyne_code = "Client" if report.fault.code == SoapFaultCode.SENDER else "Server"
        super().__init__(spyne_code, report.fault.reason)
        self.report = report

    @classmethod
    def of(cls, fault: SoapFault) -> EdgeFault:
        return cls(FaultReport(fault))


@contextlib.contextmanager
def _as_fault() -> Iterator[None]:
    try:
        yield
    except EnvelopeError as exc:
        raise EdgeFault(exc.report) from None


def report_for(error: BaseException) -> FaultReport:
    """The SOAP 1.2 fault for whatever spyne put in ctx.out_error."""
    if isinstance(error, EdgeFault):
        return error.report
    if isinstance(error, RequestTooLongError):
        return FaultReport(SoapFault(SoapFaultCode.SENDER, "The request is too large",
                                     http_status=413))
    if isinstance(error, Fault) and str(error.faultcode).startswith("Client"):
        return FaultReport(SoapFault(SoapFaultCode.SENDER,
                                     str(error.faultstring) or "Bad request"))
    return FaultReport(SoapFault(SoapFaultCode.RECEIVER, "Internal error"))


# The callable a spyne method hands its work to: (environ, transaction, first body element).
Dispatch = Callable[[dict[str, Any], Transaction, etree._Element], SoapResponse]
# Builds the MTOM response: (envelope, attachments, soap_action) -> (type, length, body).
MtomWriter = Callable[..., tuple[str, int, Iterable[bytes]]]


def _default_mtom_writer(envelope: bytes, attachments: tuple[Attachment, ...], *,
                         soap_action: str | None = None) -> tuple[str, int, Iterable[bytes]]:
    from gateway.soap.mtom import mtom_response
    return mtom_response(envelope, attachments, soap_action=soap_action)


class GatewaySoap12(Soap12):
    """spyne's Soap12 with hardened parsing, wsa:Action routing, mustUnderstand and raw
    response elements (see the module docstring)."""

    def __init__(self, endpoint: Endpoint, method_keys: dict[str, str], *,
                 max_envelope_bytes: int, mtom_writer: MtomWriter | None = None):
        super().__init__(cleanup_namespaces=False)
        self.endpoint = endpoint
        self.method_keys = method_keys  # request action -> spyne method key
        self.max_envelope_bytes = max_envelope_bytes
        self.mtom_writer = mtom_writer or _default_mtom_writer

    # --- inbound ---------------------------------------------------------------------------

    def create_in_document(self, ctx: Any, charset: str | None = None) -> None:
        ex = exchange_of(ctx.transport.req_env)
        with _as_fault():
            check_content_type(ctx.transport.get_request_content_type())
        chunks: list[bytes] = []
        total = 0
        for chunk in ctx.in_string:  # spyne's bounded reader of wsgi.input
            total += len(chunk)
            if total > self.max_envelope_bytes:
                raise EdgeFault.of(SoapFault(
                    SoapFaultCode.SENDER,
                    f"The SOAP envelope is larger than {self.max_envelope_bytes} bytes",
                    http_status=413))
            chunks.append(chunk)
        data = b"".join(chunks)
        try:  # hostile input: bound the element count before lxml builds the tree
            check_markup(data, ctx.transport.req_env.get(MAX_XML_ELEMENTS_KEY,
                                                         RequestLimits.max_xml_elements))
        except SoapFault as fault:
            raise EdgeFault.of(fault) from None
        with _as_fault():
            root = parse_envelope(data)
        ex.message_id = message_id_of(root)  # known early, so any fault can relate to it
        ctx.in_document = root

    def decompose_incoming_envelope(self, ctx: Any, message: Any = None) -> None:
        ex = exchange_of(ctx.transport.req_env)
        with _as_fault():
            inbound = inspect_envelope(ctx.in_document)
            ex.inbound = inbound
            ex.message_id = inbound.message_id
            action = require_action(inbound)
        ctx.in_header_doc = list(inbound.headers)
        ctx.in_body_doc = inbound.body
        ctx.method_request_string = action

    def get_call_handles(self, ctx: Any) -> list[Any]:
        ex = exchange_of(ctx.transport.req_env)
        action = ctx.method_request_string
        transaction = self.endpoint.transaction_for(action)
        if transaction is None:
            offered = tuple(t.request_action for t in self.endpoint.transactions)
            raise EdgeFault(action_not_supported(action, self.endpoint.path, offered).report)
        ex.transaction = transaction
        key = self.method_keys[transaction.request_action]
        return list(self.app.interface.service_method_map.get(key, []))

    def deserialize(self, ctx: Any, message: Any) -> None:
        # The method takes the whole first body element; spyne's own deserialisation would
        # lose it (AnyXml gets only its first child) and inline MTOM parts.
        ctx.in_header = None
        ctx.in_object = [ctx.in_body_doc]

    # --- outbound --------------------------------------------------------------------------

    def serialize(self, ctx: Any, message: Any) -> None:
        ex = exchange_of(ctx.transport.req_env)
        headers = ctx.transport.resp_headers
        if ctx.out_error is not None:
            report = report_for(ctx.out_error)
            ex.fault = report
            ctx.out_document = fault_envelope(report, relates_to=ex.message_id)
            headers["Content-Type"] = soap_content_type(FAULT_ACTION)
            return
        response = ctx.out_object[0]
        transaction = ex.transaction
        assert isinstance(response, SoapResponse) and transaction is not None
        ex.cleanup.extend(response.cleanup)
        ctx.out_document = response_envelope(response.body,
                                             action=transaction.response_action,
                                             relates_to=ex.message_id)
        headers["Content-Type"] = soap_content_type(transaction.response_action)

    def create_out_string(self, ctx: Any, charset: str | None = None) -> None:
        ex = exchange_of(ctx.transport.req_env)
        data = to_bytes(ctx.out_document)
        transaction = ex.transaction
        if ctx.out_error is None and transaction is not None:
            response: SoapResponse = ctx.out_object[0]
            if response.live is not None:
                self._live_out_string(ctx, ex, transaction, response, data)
                return
            if transaction.mtom_response or response.attachments:
                try:
                    ctype, length, stream = self.mtom_writer(
                        data, tuple(response.attachments),
                        soap_action=transaction.response_action)
                except Exception as exc:
                    log.error("%s: MTOM response failed: %s", transaction.name,
                              type(exc).__name__)
                    log.debug("MTOM response failure", exc_info=True)
                    ctx.out_error = EdgeFault.of(SoapFault(
                        SoapFaultCode.RECEIVER,
                        f"{transaction.name}: the response could not be written"))
                    ctx.transport.resp_code = http_status_line(500)
                    self.serialize(ctx, self.RESPONSE)
                    ctx.out_string = [to_bytes(ctx.out_document)]
                    return
                ex.stream = stream
                ex.content_length = length
                ctx.transport.resp_headers["Content-Type"] = ctype
                ctx.out_string = stream
                return
        ctx.out_string = [data]

    @staticmethod
    def _live_out_string(ctx: Any, ex: Exchange, transaction: Transaction,
                         response: SoapResponse, fallback: bytes) -> None:
        """A streamed MTOM response (SoapResponse.live): attachments as they come, the
        envelope around `live.finish()` last, chunked (no Content-Length)."""
        from gateway.soap.mtom import mtom_stream

        live = response.live
        assert live is not None

        def root() -> bytes:
            return to_bytes(response_envelope(live.finish(),
                                              action=transaction.response_action,
                                              relates_to=ex.message_id))

        ctype, stream = mtom_stream(live.parts, root, fallback_root=fallback,
                                    soap_action=transaction.response_action,
                                    on_close=live.close, root_first=live.root_first)
        ex.stream = stream
        ex.content_length = None
        ctx.transport.resp_headers["Content-Type"] = ctype
        ctx.out_string = stream

    def fault_to_http_response_code(self, fault: Any) -> str:
        status = report_for(fault).fault.http_status or 500
        return http_status_line(status)


def _method_name(index: int, transaction: Transaction) -> str:
    return f"t{index}_{re.sub(r'[^A-Za-z0-9]', '_', transaction.name)}"


def _method(name: str, transaction: Transaction, dispatch: Dispatch) -> Callable[..., Any]:
    def method(ctx: Any, body: Any) -> SoapResponse:
        return dispatch(ctx.transport.req_env, transaction, body)

    method.__name__ = name
    return method


def build_spyne_app(endpoint: Endpoint, dispatch: Dispatch, *, max_envelope_bytes: int,
                    max_request_bytes: int,
                    mtom_writer: MtomWriter | None = None) -> WsgiApplication:
    """One spyne WSGI application for `endpoint`: a method per transaction, routed on
    wsa:Action by GatewaySoap12, each handing the body element to `dispatch`."""
    tns = TNS_PREFIX + endpoint.path.strip("/").replace("/", ":")
    methods: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for i, transaction in enumerate(endpoint.transactions):
        name = _method_name(i, transaction)
        methods[name] = rpc(AnyXml, _returns=AnyXml)(_method(name, transaction, dispatch))
        keys[transaction.request_action] = f"{{{tns}}}{name}"
    service = type(f"Service_{tns.rsplit(':', 1)[-1]}", (ServiceBase,), methods)
    app = Application(
        [service], tns=tns, name=endpoint.title.replace(" ", ""),
        in_protocol=GatewaySoap12(endpoint, keys, max_envelope_bytes=max_envelope_bytes,
                                  mtom_writer=mtom_writer),
        out_protocol=GatewaySoap12(endpoint, keys, max_envelope_bytes=max_envelope_bytes,
                                   mtom_writer=mtom_writer),
    )
    return WsgiApplication(app, chunked=True, max_content_length=max_request_bytes,
                           block_length=READ_BLOCK)
