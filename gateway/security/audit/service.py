"""The audit service one worker process holds: records in, spool on disk, a sender thread out.

Owns `AuditService` (what `services.audit` is when [audit] transport is "tls" or "udp"),
`NullAudit` (transport "none": every call does nothing), `Forwarder` (the sender thread that
drains the spool in order to the repository) and `build_audit(config)`.

Recording never touches the network: `record_transaction()` (transactions the gateway
answers, called by the SOAP edge after the handler returned) and `record_outbound()`
(transactions it sends) build the DICOM audit message (gateway.security.audit.events), wrap
it in its RFC 5424 header and append it to the durable spool. The forwarder of whichever
worker holds the spool's sender lock writes the records, oldest first, and removes each one
only after the write succeeded; while the repository is unreachable the records wait (one
WARNING per outage, one when it is back), and a full spool drops new records with a WARNING.
Log lines never name a patient.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lxml import etree

from gateway.security.audit import events
from gateway.security.audit.messages import AuditMessage, render
from gateway.security.audit.spool import AuditSpool, SenderLock
from gateway.security.audit.transport import (
    CLOSED,
    OPEN,
    RESET,
    RecordTooLarge,
    Sender,
    TlsSender,
    UdpSender,
    syslog_message,
)

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

log = logging.getLogger("gateway.audit")

# EventTypeCode display names (the transactions' names in the technical frameworks).
TITLES = {
    "ITI-18": "Registry Stored Query",
    "ITI-38": "Cross Gateway Query",
    "ITI-39": "Cross Gateway Retrieve",
    "ITI-41": "Provide and Register Document Set-b",
    "ITI-42": "Register Document Set-b",
    "ITI-43": "Retrieve Document Set",
    "RAD-69": "Retrieve Imaging Document Set",
    "RAD-75": "Cross Gateway Retrieve Imaging Document Set",
}

SenderFactory = Callable[[], Sender]


def _name_and_title(transaction: Any) -> tuple[str, str]:
    if isinstance(transaction, str):
        return transaction, TITLES.get(transaction, transaction)
    name = str(transaction.name)
    return name, TITLES.get(name, str(getattr(transaction, "title", name)).split(" (")[0])


class NullAudit:
    """[audit] transport = "none": nothing is recorded."""

    enabled = False

    def record_transaction(self, transaction: Any, ctx: Any, request_body: Any,
                           response_body: Any, outcome: int | None = None) -> None:
        return None

    def record_outbound(self, transaction: Any, **kwargs: Any) -> None:
        return None

    def record(self, message: AuditMessage) -> bool:
        return False

    def close(self, timeout: float = 0.0) -> None:
        return None


class Forwarder:
    """The sender thread: drains the spool, oldest first, while it holds the sender lock.

    A record is removed from the spool ("marked sent") only after it was written and the
    connection was then still open (or ended in order) at the next check, made before the
    following write or within `confirm_seconds` when idle. A reset (the repository's kernel
    threw away data it had not read) sends the unconfirmed records again. Before every write
    the connection is checked, so a repository that closed it gets a new one.

    RFC 5425 has no acknowledgement: a repository that reads a record in the instant it shuts
    down and drops it (rsyslog does, on SIGTERM and when killed) cannot be told from one that
    kept it, so the one record in transit at that instant can be lost. RELP or an
    application-level acknowledgement would close that gap; ITI-20 has neither.
    """

    def __init__(self, spool: AuditSpool, sender_factory: SenderFactory, *,
                 target: str, poll_seconds: float = 0.05, max_backoff_seconds: float = 5.0,
                 confirm_seconds: float = 0.002):
        self.spool = spool
        self.sender_factory = sender_factory
        self.target = target  # host:port, for log lines
        self.poll_seconds = poll_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.confirm_seconds = confirm_seconds
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._lock = SenderLock(spool.directory)
        self._sender: Sender | None = None
        self._thread: threading.Thread | None = None
        self._inflight: list[tuple[int, float]] = []  # (record id, monotonic write time)
        self._backoff = 0.25
        self.sent = 0  # records confirmed
        self.resent = 0  # records written again after a reset
        self.dropped = 0  # records no transport could carry
        self.outage_since: float | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-forwarder",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        self.spool.relax_durability_of_removals()
        try:
            while not self._stop.is_set():
                if not self._lock.try_acquire():
                    self._stop.wait(max(self.poll_seconds, 0.2))
                    continue
                if not self.drain_once():
                    wait = self.poll_seconds
                    if self._inflight:
                        wait = min(wait, max(self.confirm_seconds, 0.001))
                    self.wake.wait(wait)
                    self.wake.clear()
            self._settle(final=True)
        except Exception as exc:  # never let the thread die silently
            log.error("audit forwarder stopped: %s", type(exc).__name__)
            log.debug("audit forwarder failure", exc_info=True)
        finally:
            self._close_sender()
            self._lock.release()
            self.spool.close()

    def _close_sender(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def _settle(self, final: bool = False, idle: bool = True) -> None:
        """Confirm or give back the in-flight records, from the connection's state."""
        if not self._inflight:
            return
        wait = self.confirm_seconds if final else 0.0
        state = self._sender.peer_state(wait) if self._sender is not None else RESET
        now = time.monotonic()
        if state == OPEN:
            done = [rid for rid, t in self._inflight
                    if final or now - t >= self.confirm_seconds or not idle]
        elif state == CLOSED:
            done = [rid for rid, _ in self._inflight]
            self._close_sender()
        else:  # RESET / NONE: what was not read is lost on the repository's side
            log.debug("audit connection reset: %d in-flight record(s) will be sent again",
                      len(self._inflight))
            self.resent += len(self._inflight)
            self._inflight.clear()
            self._close_sender()
            return
        if done:
            self.spool.remove_many(done)
            self.sent += len(done)
            self._inflight = self._inflight[len(done):]

    def _outage(self, exc: BaseException) -> None:
        self._close_sender()
        if self._inflight:  # their fate is unknown: send them again
            self.resent += len(self._inflight)
            self._inflight.clear()
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            log.warning("audit repository %s unreachable (%s): %d record(s) wait in the "
                        "spool", self.target, type(exc).__name__, self.spool.count())
        self._stop.wait(self._backoff)
        self._backoff = min(self._backoff * 2, self.max_backoff_seconds)

    def drain_once(self, batch: int = 64) -> bool:
        """Write what the spool holds beyond the in-flight records (up to `batch`), after
        settling those; True when any record was written."""
        self._settle(idle=False)
        after = self._inflight[-1][0] if self._inflight else 0
        records = self.spool.after(after, batch)
        if not records:
            return False
        for record_id, payload in records:
            if self._stop.is_set():
                break
            try:
                if self._sender is None:
                    self._sender = self.sender_factory()
                elif self._sender.peer_state() != OPEN:
                    self._settle(idle=False)
                    self._close_sender()
                    return True  # start again from the first unconfirmed record
                self._sender.send(payload)
            except RecordTooLarge:
                log.warning("audit record of %d bytes cannot be sent over %s; dropped",
                            len(payload), self.target)
                self.spool.remove(record_id)
                self.dropped += 1
                continue
            except OSError as exc:
                self._outage(exc)
                return False
            self._inflight.append((record_id, time.monotonic()))
            if self.outage_since is not None:
                log.warning("audit repository %s reachable again after %.1f s; sending the "
                            "waiting records", self.target,
                            time.monotonic() - self.outage_since)
                self.outage_since = None
                self._backoff = 0.25
        return True


class AuditService:
    """services.audit when [audit] transport is "tls" or "udp"."""

    enabled = True

    def __init__(self, spool: AuditSpool, node: events.Node, *, app_name: str,
                 hostname: str, forwarder: Forwarder | None = None,
                 default_base_url: str = ""):
        self.spool = spool
        self.node = node
        self.app_name = app_name
        self.hostname = hostname
        self.forwarder = forwarder
        self.default_base_url = default_base_url
        self.dropped = 0
        self._last_full_warning = 0.0
        self._lock = threading.Lock()

    # --- recording ---------------------------------------------------------------------------

    def record(self, message: AuditMessage) -> bool:
        """Spool one audit message; False when the spool is full (the record is dropped)."""
        payload = syslog_message(render(message), hostname=self.hostname,
                                 app_name=self.app_name, procid=str(os.getpid()),
                                 timestamp=message.event_time)
        if self.spool.append(payload):
            if self.forwarder is not None:
                self.forwarder.wake.set()
            return True
        with self._lock:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_full_warning >= 10.0 or self.dropped == 1:
                self._last_full_warning = now
                log.warning("audit spool %s is full (%d records, %d bytes; limits %d, %d): "
                            "%d audit record(s) dropped so far", self.spool.directory,
                            self.spool.count(), self.spool.size(), self.spool.max_records,
                            self.spool.max_bytes, self.dropped)
        return False

    def _node(self) -> events.Node:
        return events.Node(self.node.audit_source_id, self.node.host, str(os.getpid()),
                           self.node.enterprise_site_id)

    def record_transaction(self, transaction: Any, ctx: Any,
                           request_body: etree._Element | None,
                           response_body: etree._Element | None,
                           outcome: int | None = None) -> None:
        """The record of a transaction this gateway answered (`ctx`: its RequestContext;
        `outcome`: None to read it from the response status, or 0/4/8/12)."""
        name, title = _name_and_title(transaction)
        if name not in events.ANSWERED:
            return
        endpoint_url = (getattr(ctx, "endpoint_url", None)
                        or f"{self.default_base_url}{getattr(ctx, 'endpoint', '')}")
        requestor = events.Peer(
            user_id=getattr(ctx, "reply_to", None) or events.WSA_ANONYMOUS,
            network_access_point=getattr(ctx, "client_address", None),
            tls_subject=getattr(ctx, "client_subject", None))
        message = events.answered_event(
            name, title, node=self._node(), endpoint_url=endpoint_url, requestor=requestor,
            request=request_body, response=response_body, outcome=outcome,
            human=events.human_requestor_of(getattr(ctx, "xua_subject", None)))
        self.record(message)

    def record_outbound(self, transaction: Any, *, endpoint_url: str,
                        request_body: etree._Element | None,
                        response_body: etree._Element | None, outcome: int | None = None,
                        reply_to: str | None = None, responder_address: str | None = None,
                        responder_subject: str | None = None,
                        human: Any = None) -> None:
        """The record of a transaction this gateway sent to `endpoint_url` (a Transaction or
        its name, e.g. "ITI-38"); `human`: the XUA subject it was sent for, if any."""
        name, title = _name_and_title(transaction)
        if name not in events.SENT:
            return
        message = events.sent_event(
            name, title, node=self._node(), endpoint_url=endpoint_url, request=request_body,
            response=response_body, outcome=outcome, reply_to=reply_to,
            responder_address=responder_address, responder_subject=responder_subject,
            human=events.human_requestor_of(human))
        self.record(message)

    def close(self, timeout: float = 2.0) -> None:
        if self.forwarder is not None:
            self.forwarder.stop(timeout)


def sender_factory(config: GatewayConfig) -> SenderFactory:
    """A new connection to the configured repository, per [audit] transport."""
    a = config.audit
    if a.transport == "udp":
        return lambda: UdpSender(a.host, a.port)
    from gateway.security.tls import client_context

    t = config.tls
    context = client_context(t.ca_bundle, t.certificate, t.private_key)
    return lambda: TlsSender(a.host, a.port, context, server_hostname=a.server_name or a.host)


def _node_host(config: GatewayConfig) -> str:
    host = config.server.host
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = not host
    return socket.gethostname() if unspecified else host


def build_audit(config: GatewayConfig, *, start: bool = True) -> AuditService | NullAudit:
    """services.audit for `config`: NullAudit when [audit] transport is "none"."""
    a = config.audit
    if a.transport == "none":
        return NullAudit()
    assert a.spool_directory is not None  # set by config.from_dict
    spool = AuditSpool(a.spool_directory, max_records=a.max_spool_records,
                       max_bytes=a.max_spool_bytes)
    node = events.Node(a.audit_source_id or config.community.home_community_id,
                       _node_host(config), str(os.getpid()), a.enterprise_site_id or None)
    forwarder = Forwarder(spool, sender_factory(config), target=f"{a.host}:{a.port}")
    scheme = "https" if config.tls.enabled else "http"
    service = AuditService(spool, node, app_name=a.app_name, hostname=socket.gethostname(),
                           forwarder=forwarder,
                           default_base_url=f"{scheme}://{_node_host(config)}:"
                                            f"{config.server.port}")
    if start:
        forwarder.start()
    return service
