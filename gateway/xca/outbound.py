"""Outbound SOAP for the initiating gateways: a per-process pool of `SoapClient`s and bounded
parallel calls.

`OutboundPool` keeps idle `gateway.soap.client.SoapClient`s per remote origin
(scheme://host:port), so consecutive requests to a community reuse its TLS connections
(requests' keep-alive); a client is used by one thread at a time (checked out, then returned;
a client whose call raised is closed, not returned). Every client authenticates with the
gateway's own certificate and key from [tls] and trusts [tls] ca_bundle (mutual TLS), and
every call has a connect timeout ([xca] connect_timeout_seconds) and a read timeout (the
caller's). `pool_for(config)` gives the process's pool for a configuration (created lazily,
so a gunicorn worker builds its own after the fork).

`OutboundPool.stream` is the streaming variant of `call`: the reply's MIME parts are handed
over as they complete (`gateway.soap.client.StreamedReply`), for an initiating gateway that
passes a community's answer on while it arrives.

`run_bounded` runs calls in threads, at most `max_parallel` at once, each bounded by
`timeout` seconds from its own start: a call still running then is abandoned (reported as
timed out; its daemon thread ends on its socket timeout) and its slot goes to the next call.
So a community that never answers costs its timeout and nothing more. The threads come from
`Workers`, the process's idle daemon threads kept for the next call (`workers()`): a fresh
`threading.Thread.start()` waits until the new thread runs, which while the other calls'
threads hold the GIL cost about 2 ms a thread, one after the other, when fanning out to 20
communities (bench/xca_fanout.py).

XUA forwarding (ITI-40): `security_headers(config, request_headers)` gives the SOAP header
blocks every outbound call of one request carries: the consumer's own wsse:Security block
(the one addressed to this node), copied unchanged so its signed assertion still verifies at
the responding gateway, or, when the consumer sent none, `[xua] outbound_assertion` (a
saml:Assertion wrapped in a wsse:Security with mustUnderstand, or a whole wsse:Security
element), re-read whenever the file changes.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import urlsplit

from lxml import etree

from gateway.config import GatewayConfig
from gateway.ebrim.xmlsafe import parse_xml
from gateway.ns import SAML2, SOAP12, WSSE, q
from gateway.soap.client import SoapClient, SoapReply, StreamedReply
from gateway.transactions import Attachment

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


@dataclass(frozen=True)
class OutboundSettings:
    certificate: Path | None
    private_key: Path | None
    ca_bundle: Path | None
    connect_timeout: float

    @classmethod
    def from_config(cls, config: GatewayConfig) -> OutboundSettings:
        t = config.tls
        return cls(certificate=t.certificate if t.enabled else None,
                   private_key=t.private_key if t.enabled else None,
                   ca_bundle=t.ca_bundle,
                   connect_timeout=float(config.xca.connect_timeout_seconds))


def split_url(url: str) -> tuple[str, str]:
    """"https://h:1/a/b?x" -> ("https://h:1", "/a/b?x")."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return f"{parts.scheme}://{parts.netloc}", path


class OutboundPool:
    """Idle SoapClients per origin; see the module docstring."""

    def __init__(self, settings: OutboundSettings, *, max_idle_per_origin: int = 8):
        self.settings = settings
        self.max_idle_per_origin = max_idle_per_origin
        self._idle: dict[str, list[SoapClient]] = {}
        self._lock = threading.Lock()
        self.created = 0  # clients made so far (tests, benchmarks)

    def _new_client(self, origin: str) -> SoapClient:
        s = self.settings
        self.created += 1
        return SoapClient(origin, ca_bundle=s.ca_bundle, certificate=s.certificate,
                          private_key=s.private_key, timeout=(s.connect_timeout, 60.0))

    @contextmanager
    def client(self, origin: str) -> Iterator[SoapClient]:
        """A client for `origin` for this thread alone; returned to the pool afterwards."""
        client = self._checkout(origin)
        try:
            yield client
        except BaseException:
            client.close()  # its connection may be half-used: never reuse it
            raise
        self._checkin(origin, client)

    def _checkout(self, origin: str) -> SoapClient:
        """An idle client for `origin`, or a new one."""
        with self._lock:
            idle = self._idle.get(origin)
            client = idle.pop() if idle else None
        return client if client is not None else self._new_client(origin)

    def _checkin(self, origin: str, client: SoapClient) -> None:
        """`client`, its reply fully read, back to the idle list (closed when that is full)."""
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if len(idle) < self.max_idle_per_origin:
                idle.append(client)
                return
        client.close()

    def call(self, url: str, action: str, body: etree._Element, *, read_timeout: float,
             spool_dir: Path | None = None,
             attachments: Sequence[Attachment] = (),
             headers: Sequence[etree._Element] = ()) -> SoapReply:
        """One SOAP 1.2 request to `url` (the full endpoint URL); MTOM replies spooled to
        `spool_dir`; `headers` are extra SOAP header blocks (see `security_headers`).
        Raises requests' exceptions (connect, TLS, timeout) and ValueError."""
        origin, path = split_url(url)
        with self.client(origin) as client:
            client.timeout = (self.settings.connect_timeout, read_timeout)
            return client.call(path, action, body, spool_dir=spool_dir,
                               attachments=attachments, headers=headers)

    @contextmanager
    def stream(self, url: str, action: str, body: etree._Element, *, read_timeout: float,
               spool_dir: Path, deadline: float | None = None,
               headers: Sequence[etree._Element] = (),
               pipe_after_root: bool = False) -> Iterator[StreamedReply]:
        """`call`, streaming: the reply unread, its parts yielded as they arrive
        (`StreamedReply.events()`), bounded by the same connect and read timeouts and, with
        `deadline` (time.monotonic()), as a whole; `pipe_after_root`: the parts after the root
        handed over chunk by chunk (`SoapClient.stream`). The reply is closed on exit; the client
        goes back to the pool only when the whole reply was read."""
        origin, path = split_url(url)
        client = self._checkout(origin)
        client.timeout = (self.settings.connect_timeout, read_timeout)
        reply: StreamedReply | None = None
        try:
            reply = client.stream(path, action, body, spool_dir=spool_dir, headers=headers,
                                  deadline=deadline, pipe_after_root=pipe_after_root)
            yield reply
        finally:
            if reply is not None:
                reply.close()
            if reply is None or not reply.complete:
                client.close()  # its connection may be half-read: never reuse it
            else:
                self._checkin(origin, client)

    def close(self) -> None:
        with self._lock:
            clients = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in clients:
            c.close()


_POOLS: dict[tuple[int, OutboundSettings], OutboundPool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(config: GatewayConfig) -> OutboundPool:
    """The pool of this process for the outbound settings of `config`."""
    key = (os.getpid(), OutboundSettings.from_config(config))
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = OutboundPool(key[1])
        return pool


# --- XUA: the wsse:Security header passed on ----------------------------------------------

_FOR_THIS_NODE = frozenset({"", "http://www.w3.org/2003/05/soap-envelope/role/next",
                            "http://www.w3.org/2003/05/soap-envelope/role/ultimateReceiver"})
_CONFIGURED: dict[Path, tuple[tuple[int, int], etree._Element | None]] = {}
_CONFIGURED_LOCK = threading.Lock()


def _configured_security(path: Path) -> etree._Element | None:
    """`[xua] outbound_assertion` as a wsse:Security element (cached until the file changes);
    None, with a warning, when it cannot be read or holds neither an assertion nor a
    wsse:Security element."""
    try:
        st = path.stat()
    except OSError as exc:
        log.warning("XUA: [xua] outbound_assertion %s unreadable: %s", path, exc.strerror)
        return None
    stamp = (st.st_mtime_ns, st.st_size)
    with _CONFIGURED_LOCK:
        cached = _CONFIGURED.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    block: etree._Element | None = None
    try:
        root = parse_xml(path.read_bytes())
    except (OSError, ValueError) as exc:
        log.warning("XUA: [xua] outbound_assertion %s is not usable XML: %s", path,
                    type(exc).__name__)
        root = None
    if root is not None and root.tag == q(WSSE, "Security"):
        block = root
    elif root is not None and root.tag == q(SAML2, "Assertion"):
        block = etree.Element(q(WSSE, "Security"), nsmap={"wsse": WSSE})
        block.set(q(SOAP12, "mustUnderstand"), "true")
        block.append(root)
    elif root is not None:
        log.warning("XUA: [xua] outbound_assertion %s holds neither a saml:Assertion nor a "
                    "wsse:Security element", path)
    with _CONFIGURED_LOCK:
        _CONFIGURED[path] = (stamp, block)
    return block


def security_headers(config: GatewayConfig, request_headers: Sequence[etree._Element]
                     ) -> tuple[etree._Element, ...]:
    """The wsse:Security block(s) to send with every outbound call of one request: the
    consumer's, unchanged, else the configured assertion, else none."""
    theirs = tuple(h for h in request_headers if h.tag == q(WSSE, "Security")
                   and (h.get(q(SOAP12, "role")) or "").strip() in _FOR_THIS_NODE)
    if theirs:
        return theirs
    path = config.xua.outbound_assertion
    if path is None:
        return ()
    block = _configured_security(path)
    return () if block is None else (copy.deepcopy(block),)


# --- bounded parallel calls -------------------------------------------------------------------

@dataclass
class Outcome(Generic[R]):
    value: R | None = None
    error: BaseException | None = None
    timed_out: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


class Workers:
    """Daemon threads that run one job at a time and then wait, idle, for the next one (at
    most `max_idle` wait; an idle thread ends after `idle_seconds`). `submit` hands a job to
    an idle thread, or starts a new thread when none is idle: never queues, so an abandoned
    call that still holds its thread delays nobody."""

    def __init__(self, *, max_idle: int = 32, idle_seconds: float = 60.0):
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self._idle: list[queue.SimpleQueue[Callable[[], None]]] = []
        self._lock = threading.Lock()
        self.started = 0  # threads started so far (tests, benchmarks)

    @property
    def idle(self) -> int:
        with self._lock:
            return len(self._idle)

    def submit(self, job: Callable[[], None]) -> None:
        """Run `job` (which must not raise) in a worker thread."""
        with self._lock:
            jobs = self._idle.pop() if self._idle else None
            if jobs is None:
                self.started += 1
        if jobs is not None:
            jobs.put(job)
            return
        jobs = queue.SimpleQueue()
        jobs.put(job)
        threading.Thread(target=self._loop, args=(jobs,), daemon=True,
                         name="xca-outbound").start()

    def _loop(self, jobs: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            try:
                job = jobs.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    if jobs in self._idle:  # else submit() took it: its job is on the way
                        self._idle.remove(jobs)
                        return
                continue
            try:
                job()
            except BaseException as exc:  # a job must not raise; keep the thread usable
                log.error("outbound worker job failed: %s", type(exc).__name__)
            del job
            with self._lock:
                if len(self._idle) >= self.max_idle:
                    return
                self._idle.append(jobs)


_WORKERS: dict[int, Workers] = {}


def workers() -> Workers:
    """This process's `Workers` (a gunicorn worker gets its own after the fork)."""
    pid = os.getpid()
    with _POOLS_LOCK:
        w = _WORKERS.get(pid)
        if w is None:
            w = _WORKERS[pid] = Workers()
        return w


def run_bounded(calls: Sequence[tuple[K, Callable[[], R]]], *, max_parallel: int,
                timeout: float, threads: Workers | None = None) -> dict[K, Outcome[R]]:
    """Run every call, at most `max_parallel` at once, each bounded by `timeout` seconds from
    its start, in threads of `threads` (default: `workers()`). Returns an Outcome per key
    (keys must be distinct)."""
    if len({k for k, _ in calls}) != len(calls):
        raise ValueError("run_bounded: keys must be distinct")
    pool = threads if threads is not None else workers()
    cond = threading.Condition()
    outcomes: dict[K, Outcome[R]] = {}
    started: dict[K, float] = {}
    pending = list(calls)
    active = [0]

    def worker(key: K, fn: Callable[[], R], t0: float) -> None:
        value: R | None = None
        error: BaseException | None = None
        try:
            value = fn()
        except BaseException as exc:  # reported as this call's outcome
            error = exc
        with cond:
            if key not in outcomes:  # not abandoned
                outcomes[key] = Outcome(value, error, False, time.monotonic() - t0)
                active[0] -= 1
                cond.notify_all()

    with cond:
        while len(outcomes) < len(calls):
            while pending and active[0] < max(1, max_parallel):
                key, fn = pending.pop(0)
                t0 = started[key] = time.monotonic()
                active[0] += 1
                pool.submit(functools.partial(worker, key, fn, t0))
            now = time.monotonic()
            running = [k for k in started if k not in outcomes]
            expired = [k for k in running if now - started[k] >= timeout]
            for k in expired:
                outcomes[k] = Outcome(timed_out=True, seconds=now - started[k])
                active[0] -= 1
            if expired or not running:
                continue
            cond.wait(min(started[k] for k in running) + timeout - now)
    return outcomes
