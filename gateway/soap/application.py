"""The gateway's WSGI application: HTTP routing in front, spyne behind for SOAP.

Owns `make_app()` (services -> WSGI callable), `app_factory()` (configuration -> the same,
wrapped in the MTOM middleware; what gateway.soap.server runs in each worker) and the call of
a transaction's handler (`SoapEdge.dispatch`): building the `RequestContext`, importing the
handler named in gateway.transactions, turning an escaped `XdsFailure` into the transaction's
Failure response and any other exception into an env:Receiver fault that leaks nothing.

Routing by PATH_INFO: `POST <endpoint>` -> SOAP through the endpoint's spyne application
(gateway.soap.protocol); `GET <endpoint>?wsdl` and `?xsd=NAME` -> gateway.soap.wsdl;
`GET /health` -> gateway.soap.health; unknown path -> 404, wrong method -> 405.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from lxml import etree

from gateway.errors import SoapFault, SoapFaultCode, XdsError, XdsFailure
from gateway.ns import Action, ResponseStatus
from gateway.security.guard import RequestSecurity
from gateway.soap.envelope import (
    FAULT_ACTION,
    FaultReport,
    fault_envelope,
    http_status_line,
    soap_content_type,
    to_bytes,
)
from gateway.soap.health import HEALTH_PATH, health_document
from gateway.soap.mtom import ClosingIterable
from gateway.soap.protocol import (
    EXCHANGE_KEY,
    MAX_XML_ELEMENTS_KEY,
    EdgeFault,
    Exchange,
    MtomWriter,
    build_spyne_app,
    exchange_of,
)
from gateway.transactions import (
    ENDPOINTS,
    Endpoint,
    Handler,
    LiveAttachments,
    RequestContext,
    SoapResponse,
    Transaction,
)

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

log = logging.getLogger("gateway.soap")

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

REQUEST_CONTEXT_KEY = "xdsi.request_context"
LIVE_KEY = "xdsi.live_response"  # environ: the audited SoapResponse.live, closed with the response

ENDPOINT_KEY = "xdsi.endpoint"  # environ: the path of the endpoint being called
DEFAULT_MAX_ENVELOPE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024 * 1024

_QUERY_RESPONSES = frozenset({Action.ITI18_RESPONSE, Action.ITI38_RESPONSE})
_RETRIEVE_RESPONSES = frozenset({Action.ITI43_RESPONSE, Action.ITI39_RESPONSE,
                                 Action.RAD69_RESPONSE, Action.RAD75_RESPONSE})


def failure_body(transaction: Transaction, errors: Sequence[XdsError]) -> etree._Element:
    """The response element of `transaction` with status Failure and `errors`:
    query:AdhocQueryResponse for ITI-18/38, xds-b:RetrieveDocumentSetResponse for
    ITI-43/39 and RAD-69/75, rs:RegistryResponse otherwise (ITI-41/42)."""
    from gateway.ebrim import render

    status = ResponseStatus.FAILURE
    if transaction.response_action in _QUERY_RESPONSES:
        return render.render_adhoc_query_response(status, (), errors)
    if transaction.response_action in _RETRIEVE_RESPONSES:
        return render.render_retrieve_document_set_response(
            status, (), errors, content_id_for=lambda _d: "")
    return render.render_registry_response(status, errors)


def _plain(start_response: StartResponse, status: int, text: str,
           allow: str | None = None) -> list[bytes]:
    body = (text + "\n").encode("utf-8")
    headers = [("Content-Type", "text/plain; charset=utf-8"),
               ("Content-Length", str(len(body)))]
    if allow:
        headers.append(("Allow", allow))
    start_response(http_status_line(status), headers)
    return [body]


# A Host header is used in the served WSDL only when it is a plain host[:port].
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253})(:[0-9]{1,5})?$")


def _base_url(environ: dict[str, Any]) -> str:
    scheme = environ.get("wsgi.url_scheme", "http")
    host = str(environ.get("HTTP_HOST") or "")
    if not _HOST.match(host):
        host = str(environ.get("SERVER_NAME", "localhost"))
        port = str(environ.get("SERVER_PORT", ""))
        if port and port != ("443" if scheme == "https" else "80"):
            host = f"{host}:{port}"
    return f"{scheme}://{host}{environ.get('SCRIPT_NAME', '').rstrip('/')}"


class SoapEdge:
    """The WSGI callable returned by `make_app`."""

    def __init__(self, services: Any, endpoints: Sequence[Endpoint], *,
                 max_envelope_bytes: int, max_request_bytes: int,
                 spool_root: Path | None = None, mtom_writer: MtomWriter | None = None):
        self.services = services
        self.endpoints = {e.path: e for e in endpoints}
        self.spool_root = spool_root
        self._handlers: dict[str, Handler] = {}
        self._lock = threading.Lock()
        self._security = RequestSecurity.from_config(getattr(services, "config", None))
        self._soap: dict[str, WsgiApp] = {
            e.path: build_spyne_app(e, self.audited_dispatch,
                                    max_envelope_bytes=max_envelope_bytes,
                                    max_request_bytes=max_request_bytes,
                                    mtom_writer=mtom_writer)
            for e in endpoints
        }

    # --- HTTP routing ----------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if len(path) > 1:
            path = path.rstrip("/") or "/"
        method = str(environ.get("REQUEST_METHOD") or "GET").upper()
        if path == HEALTH_PATH:
            if method != "GET":
                return _plain(start_response, 405, "Use GET.", allow="GET")
            status, body = health_document(self.services, self.endpoints.values())
            start_response(http_status_line(status),
                           [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store")])
            return [body]
        endpoint = self.endpoints.get(path)
        if endpoint is None:
            return _plain(start_response, 404, "Not found.")
        if method == "POST":
            return self._soap_call(endpoint, environ, start_response)
        if method == "GET":
            return self._get(endpoint, environ, start_response)
        return _plain(start_response, 405, "Use POST for SOAP, GET ?wsdl for the WSDL.",
                      allow="GET, POST")

    def _get(self, endpoint: Endpoint, environ: dict[str, Any],
             start_response: StartResponse) -> list[bytes]:
        query = {k.lower(): v for k, v in
                 parse_qs(environ.get("QUERY_STRING") or "", keep_blank_values=True).items()}
        from gateway.soap import wsdl

        data: bytes | None
        if "wsdl" in query:
            try:
                data = wsdl.wsdl_document(endpoint.path, endpoint.wsdl, _base_url(environ))
            except FileNotFoundError:
                log.error("WSDL %s missing for %s", endpoint.wsdl, endpoint.path)
                return _plain(start_response, 404, "No WSDL for this endpoint.")
        elif "xsd" in query:
            data = wsdl.xsd_document(query["xsd"][0], endpoint.path, _base_url(environ))
            if data is None:
                return _plain(start_response, 404, "No such schema.")
        else:
            return _plain(start_response, 405, "Use POST for SOAP, GET ?wsdl for the WSDL.",
                          allow="GET, POST")
        start_response(http_status_line(200), [("Content-Type", "application/xml"),
                                               ("Content-Length", str(len(data)))])
        return [data]

    # --- SOAP ----------------------------------------------------------------------------------

    def _soap_call(self, endpoint: Endpoint, environ: dict[str, Any],
                   start_response: StartResponse) -> Iterable[bytes]:
        ex = Exchange()
        environ[EXCHANGE_KEY] = ex
        environ[MAX_XML_ELEMENTS_KEY] = self._security.limits.max_xml_elements
        environ[ENDPOINT_KEY] = endpoint.path

        def spyne_start_response(status: str, headers: list[tuple[str, str]],
                                 exc_info: Any = None) -> Any:
            if ex.content_length is not None:  # MTOM: spyne drops the length of a stream
                headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
                headers.append(("Content-Length", str(ex.content_length)))
            if ex.fault is not None:
                f = ex.fault.fault
                log.info("%s: SOAP fault %s%s: %s", endpoint.path, f.code,
                         f" ({f.subcode[1]})" if f.subcode else "", f.reason)
            if exc_info is None:
                return start_response(status, headers)
            return start_response(status, headers, exc_info)

        def close() -> None:
            live = environ.get(LIVE_KEY)
            try:
                if isinstance(live, LiveAttachments):  # idempotent; normally closed by ex
                    live.close()  # before ex.close() removes the files it writes
            finally:
                ex.close()

        try:
            result = self._soap[endpoint.path](environ, spyne_start_response)
        except Exception as exc:  # a failure spyne did not turn into a fault
            log.error("%s: SOAP edge failure: %s", endpoint.path, type(exc).__name__)
            log.debug("SOAP edge failure", exc_info=True)
            close()  # a live response already started by the handler is stopped too
            report = FaultReport(SoapFault(SoapFaultCode.RECEIVER, "Internal error"))
            data = to_bytes(fault_envelope(report, relates_to=ex.message_id))
            start_response(http_status_line(500),
                           [("Content-Type", soap_content_type(FAULT_ACTION)),
                            ("Content-Length", str(len(data)))], sys.exc_info())
            return [data]
        return ClosingIterable(result, close)

    def _handler(self, transaction: Transaction) -> Handler:
        spec = transaction.handler
        assert spec is not None
        handler = self._handlers.get(spec)
        if handler is not None:
            return handler
        with self._lock:
            module_name, _, attribute = spec.partition(":")
            try:
                handler = getattr(importlib.import_module(module_name), attribute)
            except (ImportError, AttributeError) as exc:
                log.error("%s: handler %s cannot be loaded: %s", transaction.name, spec,
                          type(exc).__name__)
                raise EdgeFault.of(SoapFault(
                    SoapFaultCode.RECEIVER,
                    f"{transaction.name} {transaction.title} is not available on this "
                    "gateway")) from None
            self._handlers[spec] = handler
            return handler

    # --- ATNA audit (ITI-20): one record per answered transaction ---------------------------

    def audited_dispatch(self, environ: dict[str, Any], transaction: Transaction,
                         body: etree._Element) -> SoapResponse:
        """`dispatch()`, then the transaction's audit record, whatever the outcome: from the
        response status (XdsFailure responses included), 8 for a Sender fault, 12 for a
        Receiver fault or any other failure. Recording only appends to the local spool."""
        response_body: etree._Element | None = None
        outcome: int | None = None
        deferred = False
        try:
            response = self.dispatch(environ, transaction, body)
            if response.live is not None:  # streamed: recorded once the body is known
                response.live = _audited_live(
                    response.live, lambda rb, oc: self._record_audit(
                        environ, transaction, body, rb, oc))
                environ[LIVE_KEY] = response.live
                deferred = True
            response_body = response.body
            return response
        except EdgeFault as fault:
            outcome = 8 if fault.report.fault.code == SoapFaultCode.SENDER else 12
            raise
        except BaseException:
            outcome = 12
            raise
        finally:
            if not deferred:
                self._record_audit(environ, transaction, body, response_body, outcome)

    def _record_audit(self, environ: dict[str, Any], transaction: Transaction,
                      body: etree._Element, response_body: etree._Element | None,
                      outcome: int | None) -> None:
        audit = getattr(self.services, "audit", None)
        if audit is None or not getattr(audit, "enabled", False):
            return
        try:
            ex = exchange_of(environ)
            rctx = environ.get(REQUEST_CONTEXT_KEY)
            endpoint = environ.get(ENDPOINT_KEY) or next(
                (p for p, e in self.endpoints.items() if transaction in e.transactions), "")
            if not isinstance(rctx, RequestContext):  # refused before the handler was called
                rctx = RequestContext(endpoint=endpoint, action=transaction.request_action,
                                      message_id=ex.message_id,
                                      client_subject=environ.get("xdsi.client_subject"),
                                      attachments={}, spool_dir=Path("."))
            rctx = dataclasses.replace(
                rctx, reply_to=ex.inbound.reply_to if ex.inbound is not None else None,
                client_address=environ.get("REMOTE_ADDR") or None,
                endpoint_url=_base_url(environ) + (rctx.endpoint or endpoint))
            audit.record_transaction(transaction, rctx, body, response_body, outcome)
        except Exception as exc:  # the audit never breaks the answer
            log.error("%s: audit record not written: %s", transaction.name,
                      type(exc).__name__)
            log.debug("audit failure", exc_info=True)

    def dispatch(self, environ: dict[str, Any], transaction: Transaction,
                 body: etree._Element) -> SoapResponse:
        """Call the transaction's handler (spyne's method body for every transaction)."""
        ex = exchange_of(environ)
        endpoint = environ.get(ENDPOINT_KEY) or next(
            (p for p, e in self.endpoints.items() if transaction in e.transactions), "")
        try:  # XUA and request limits, before any transaction work (gateway.security.guard)
            xua_subject = self._security.check(endpoint, transaction,
                                               ex.inbound.headers if ex.inbound else (), body)
        except SoapFault as fault:
            raise EdgeFault.of(fault) from None
        except XdsFailure as failure:
            log.info("%s: request refused: %s", transaction.name,
                     ", ".join(e.code for e in failure.errors))
            return SoapResponse(failure_body(transaction, failure.errors))
        if transaction.handler is None:
            raise EdgeFault.of(SoapFault(
                SoapFaultCode.RECEIVER,
                f"{transaction.name} {transaction.title} is not implemented by this gateway "
                "yet"))
        handler = self._handler(transaction)
        spool = environ.get("xdsi.spool_dir")
        if spool is None:
            if self.spool_root is not None:
                self.spool_root.mkdir(parents=True, exist_ok=True)
            spool = ex.own_spool_dir = Path(tempfile.mkdtemp(prefix="xdsi-req-",
                                                             dir=self.spool_root))
        rctx = RequestContext(
            endpoint=endpoint,
            action=transaction.request_action,
            message_id=ex.message_id,
            client_subject=environ.get("xdsi.client_subject"),
            attachments=environ.get("xdsi.attachments") or {},
            spool_dir=Path(spool),
            headers=ex.inbound.headers if ex.inbound is not None else (),
            xua_subject=xua_subject,
        )
        environ[REQUEST_CONTEXT_KEY] = rctx  # read by audited_dispatch (ATNA record)
        try:
            response = handler(self.services, rctx, body)
        except XdsFailure as failure:
            log.info("%s: request failed: %s", transaction.name,
                     ", ".join(e.code for e in failure.errors))
            return SoapResponse(failure_body(transaction, failure.errors))
        except SoapFault as fault:
            raise EdgeFault.of(fault) from None
        except Exception as exc:
            log.error("%s: handler failed: %s", transaction.name, type(exc).__name__)
            log.debug("%s handler failure", transaction.name, exc_info=True)
            raise EdgeFault.of(SoapFault(
                SoapFaultCode.RECEIVER,
                f"{transaction.name}: the gateway could not process the request")) from None
        if not isinstance(response, SoapResponse):
            log.error("%s: handler returned %s, not a SoapResponse", transaction.name,
                      type(response).__name__)
            raise EdgeFault.of(SoapFault(
                SoapFaultCode.RECEIVER,
                f"{transaction.name}: the gateway could not process the request"))
        return response


def _audited_live(live: LiveAttachments,
                  record: Callable[[etree._Element | None, int | None], None]
                  ) -> LiveAttachments:
    """`live` whose audit record is written exactly once, when the response is complete:
    with the body (outcome from its status) once both the root and every part have gone out,
    with no body and outcome 12 when `finish()` raises, or with outcome 8 (serious failure:
    the response was not delivered) when the response is closed before it was complete
    (client gone, or a root-first response broken off after its root: then with that root).
    `close()` becomes idempotent."""
    lock = threading.Lock()
    state: dict[str, Any] = {"recorded": False, "closed": False, "parts_done": False,
                             "body": None}

    def once(response_body: etree._Element | None, outcome: int | None) -> None:
        with lock:
            if state["recorded"]:
                return
            state["recorded"] = True
        record(response_body, outcome)

    def parts() -> Iterator[Any]:  # what live.parts yields, passed on unchanged
        yield from live.parts
        state["parts_done"] = True
        if state["body"] is not None:  # root-first: the root went out before the parts
            once(state["body"], None)

    def finish() -> etree._Element:
        try:
            body = live.finish()
        except BaseException:
            once(None, 12)
            raise
        if state["parts_done"]:
            once(body, None)
        else:  # root-first: complete only once every part it names has gone out
            state["body"] = body
        return body

    def close() -> None:
        with lock:
            if state["closed"]:
                return
            state["closed"] = True
        try:
            live.close()
        finally:
            once(state["body"], 8)

    return LiveAttachments(parts(), finish, close, root_first=live.root_first)


def make_app(services: Any, *, endpoints: Sequence[Endpoint] | None = None,
             max_envelope_bytes: int | None = None, max_request_bytes: int | None = None,
             spool_root: Path | None = None,
             mtom_writer: MtomWriter | None = None) -> SoapEdge:
    """The WSGI application serving `endpoints` (default: gateway.transactions.ENDPOINTS).

    Sizes default to `services.config.server` when there is one. `mtom_writer` replaces
    gateway.soap.mtom.mtom_response (tests).
    """
    server = getattr(getattr(services, "config", None), "server", None)
    if max_envelope_bytes is None:
        max_envelope_bytes = getattr(server, "max_envelope_bytes", DEFAULT_MAX_ENVELOPE_BYTES)
    if max_request_bytes is None:
        max_request_bytes = getattr(server, "max_request_bytes", DEFAULT_MAX_REQUEST_BYTES)
    if spool_root is None:
        spool_root = getattr(server, "spool_directory", None)
    return SoapEdge(services, ENDPOINTS if endpoints is None else endpoints,
                    max_envelope_bytes=max_envelope_bytes,
                    max_request_bytes=max_request_bytes, spool_root=spool_root,
                    mtom_writer=mtom_writer)


def app_factory(config: GatewayConfig) -> WsgiApp:
    """What each server worker runs: services from `config`, the edge, MTOM in front."""
    from gateway.services import build_services
    from gateway.soap.mtom import MtomMiddleware

    services = build_services(config)
    if config.community.imaging_source_unique_id:  # RAD-69 served: start its retrieve pool
        from gateway.dicom.retrieve import warm_up_in_background
        warm_up_in_background(config.pacs.associations)
    return MtomMiddleware(make_app(services), spool_root=config.server.spool_directory,
                          max_request_bytes=config.server.max_request_bytes,
                          max_envelope_bytes=config.server.max_envelope_bytes)
