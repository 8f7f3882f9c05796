"""The gunicorn worker of the HTTPS server: gthread, with request deadlines and bounded memory.

gunicorn's gthread worker hands a new connection to a worker thread, which then does the TLS
handshake and reads the request head and body with blocking reads and no deadline (its
`timeout` is only the worker heartbeat): as many slow senders as there are threads, each
trickling a few bytes per second, hold every thread and nobody else is served.
`DeadlineThreadWorker` changes that:

- Head: a connection is "parked" in the worker's event loop (no thread) from accept until its
  whole request head has arrived: the TLS handshake runs there, non-blocking, then the head is
  read into a buffer until its blank line. Only then does a thread get the connection, with
  the head in the parser's buffer. Handshake and head must be complete within
  `header_timeout` seconds of the connection (of the first byte, for the next request on a
  kept-alive connection), or the connection is closed. A kept-alive connection that becomes
  readable is parked again the same way.
- Body: read in the thread, through `DeadlineReader`, whose `recv()` is bounded by a deadline
  in the style of Apache's mod_reqtimeout: `body_timeout` seconds from the end of the head,
  extended by one second per `min_body_rate` bytes received. A sender slower than that gets
  `RequestTimeout` (an OSError: the application sees a failed read) and the connection is
  closed after the request.
- Response: connections are TCP_NODELAY (`nodelay`); every socket send goes through
  `SendBudget` (the connection's sockets are
  `GuardedSocket` / `GuardedSSLSocket`, whose `sendall()` sends in slices of `SEND_SLICE`
  bytes): each slice must be sent within `send_timeout` seconds (a client that stops reading
  without disconnecting), and the time the response spends blocked on the client may not
  exceed `send_timeout` plus one second per `min_send_rate` bytes sent (a client that reads at
  a trickle). Only time blocked in a send counts, never the time the application takes to
  produce the response (a live RAD-69 waiting for the PACS); bytes count as sent once the
  kernel has taken them, so its socket buffers (a few MB) give a little more time at the
  start. A slower reader gets `ResponseTimeout`: gunicorn closes the response iterable (the
  application's cleanup runs and the request's spool folder goes), a WARNING names the peer
  address and the byte count, the thread is free again and the connection is reset
  (SO_LINGER 0: the unsent data is dropped, not retried against a closed window).
- Memory: glibc gives each thread its own malloc arena and keeps an arena's high-water mark,
  so every thread would keep the peak of the largest envelope it ever parsed. Each worker
  process limits the arenas (`mallopt(M_ARENA_MAX)`) and returns free memory to the system
  (`malloc_trim(0)`) after any request with a large body. Both are no-ops off glibc.

`worker_class(limits)` returns the class to give gunicorn (`worker_class` setting), carrying
the `Deadlines` of the configuration.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import gc
import logging
import selectors
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from gunicorn import http
from gunicorn import sock as gsock
from gunicorn.http.errors import NoMoreData
from gunicorn.workers import gthread

log = logging.getLogger(__name__)

HEAD_END = b"\r\n\r\n"
MAX_PARKED_HEAD = 128 * 1024  # beyond this the thread's parser reads (and refuses) the rest
ALERT_LINGER = 0.5  # seconds to drain a refused TLS client so that it reads our alert
STOP_LINGER = 2.0  # a stopping worker closes parked connections after this long
SEND_SLICE = 64 * 1024  # one send: the unit of progress the send timeout bounds
TRIM_AFTER_BYTES = 256 * 1024  # malloc_trim after a request body at least this large
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc malloc.h


@dataclass(frozen=True)
class Deadlines:
    header_timeout: float = 10.0  # TLS handshake + request head, from the connection
    body_timeout: float = 30.0  # the body, from the end of the head ...
    min_body_rate: float = 4096.0  # ... plus 1 s per this many bytes received (0: no extension)
    send_timeout: float = 60.0  # each response slice sent within this (0: no limit) ...
    min_send_rate: float = 4096.0  # ... and all the time blocked on the client within this
    # timeout plus 1 s per this many bytes sent (0: no overall bound)


class RequestTimeout(NoMoreData, TimeoutError):
    """A read passed the request's deadline. A TimeoutError for the application and for
    gunicorn's body drain; a NoMoreData for gunicorn's connection handler, which then closes
    the connection quietly."""

    def __init__(self, what: str) -> None:
        super().__init__(b"")
        self.what = what

    def __str__(self) -> str:
        return f"the request {self.what} was not received in time"


class ResponseTimeout(NoMoreData, TimeoutError):
    """A send passed the response's deadline: the client does not read, or reads too slowly.
    Handled like `RequestTimeout` by gunicorn (the connection is closed quietly)."""

    def __init__(self) -> None:
        super().__init__(b"")

    def __str__(self) -> str:
        return "the response was not read in time"


class SendBudget:
    """The send deadline of one connection's current response (module docstring).

    `sent` bytes went out while `blocked` seconds were spent inside sends; `reset()` starts
    the account again for the next response."""

    def __init__(self, deadlines: Deadlines) -> None:
        self.deadlines = deadlines
        self.sent = 0
        self.blocked = 0.0
        self.started = time.monotonic()
        self.expired = False

    def reset(self) -> None:
        self.sent = 0
        self.blocked = 0.0
        self.started = time.monotonic()
        self.expired = False

    def timeout(self) -> float | None:
        """Seconds the next slice may take (None: no limit); `ResponseTimeout` when spent."""
        d = self.deadlines
        if self.expired:
            raise ResponseTimeout()
        if d.send_timeout <= 0:
            return None
        left = d.send_timeout
        if d.min_send_rate > 0:
            left = min(left, d.send_timeout + self.sent / d.min_send_rate - self.blocked)
        if left <= 0:
            self.expired = True
            raise ResponseTimeout()
        return left

    def sendall(self, sock: socket.socket, data: Any) -> None:
        """`sock.sendall(data)` with the budget's deadlines, through `sock.send()`."""
        with memoryview(data) as view, view.cast("B") as octets:
            total = len(octets)
            done = 0
            restore = sock.gettimeout()
            current = restore
            try:
                while done < total:
                    limit = self.timeout()
                    if limit != current:
                        sock.settimeout(limit)
                        current = limit
                    piece = octets[done:done + SEND_SLICE]
                    start = time.monotonic()
                    try:
                        n = sock.send(piece)
                    except TimeoutError:
                        self.blocked += time.monotonic() - start
                        self.expired = True
                        raise ResponseTimeout() from None
                    self.blocked += time.monotonic() - start
                    self.sent += n
                    done += n
            finally:
                if current != restore:
                    try:
                        sock.settimeout(restore)
                    except OSError:
                        pass


class _GuardedSend:
    """`sendall()` through the connection's `SendBudget` (when set, on a socket with a
    blocking mode or a timeout; a non-blocking socket keeps the plain behaviour)."""

    send_budget: SendBudget | None = None

    def sendall(self, data: Any, flags: int = 0) -> None:
        budget = self.send_budget
        sock: Any = self
        if budget is None or flags or sock.gettimeout() == 0.0:
            super().sendall(data, flags)  # type: ignore[misc]
            return
        budget.sendall(sock, data)


class GuardedSocket(_GuardedSend, socket.socket):
    """A plain TCP connection socket whose `sendall()` honours a `SendBudget`."""


class GuardedSSLSocket(_GuardedSend, ssl.SSLSocket):
    """A TLS connection socket whose `sendall()` honours a `SendBudget` (through
    `SSLContext.sslsocket_class`)."""


def nodelay(sock: socket.socket) -> None:
    """TCP_NODELAY on a client connection: every write goes out at once. The response is
    written in large slices already; what Nagle's algorithm would hold back is a small write
    while earlier data is unacknowledged: an MTOM part header, the root part of a streamed
    response, the closing boundary, each then waiting up to the client's delayed
    acknowledgement (40 ms on Linux)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):  # best effort (a peer that has already reset)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): the unsent data is dropped at once."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class DeadlineReader:
    """The socket as the HTTP parser sees it: `recv()` bounded by the connection's deadline
    (and by any shorter timeout gunicorn sets through `settimeout`)."""

    def __init__(self, conn: DeadlineConn) -> None:
        self.conn = conn
        self._timeout: float | None = None

    def gettimeout(self) -> float | None:
        return self._timeout

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def recv(self, size: int) -> bytes:
        conn = self.conn
        left = conn.remaining()
        own = True
        if self._timeout is not None and (left is None or self._timeout < left):
            left, own = self._timeout, False
        if left is not None and left <= 0:
            raise conn.expire() if own else TimeoutError("timed out")
        sock = conn.sock
        sock.settimeout(left)
        try:
            data: bytes = sock.recv(size)
        except TimeoutError:
            if own:
                raise conn.expire() from None
            raise
        finally:
            try:
                sock.settimeout(None)
            except OSError:
                pass
        if conn.body_start is not None:
            conn.body_received += len(data)
        return data


class DeadlineConn(gthread.TConn):
    """A gthread connection that knows its deadlines and its parking state."""

    def __init__(self, cfg: Any, sock: socket.socket, client: Any, server: Any,
                 deadlines: Deadlines) -> None:
        super().__init__(cfg, sock, client, server)
        self.deadlines = deadlines
        self.stage = "new"  # new -> handshake -> head (parked) ... ; linger: closing
        self.head = bytearray()
        self.park_deadline = 0.0
        self.events = 0  # events registered with the worker's poller (0: not registered)
        self.read_deadline: float | None = None  # for head reads in the thread
        self.body_start: float | None = None
        self.body_received = 0
        self.timed_out: str | None = None  # "head", "body" or "response" once a deadline passed
        self.reader = DeadlineReader(self)
        self.send_budget = SendBudget(deadlines)
        self.guard(self.sock)

    def guard(self, sock: socket.socket) -> None:
        """Send through this connection's `SendBudget` on `sock` (a guarded socket)."""
        if isinstance(sock, _GuardedSend):
            sock.send_budget = self.send_budget

    def close(self, graceful: bool = False) -> None:
        if self.timed_out == "response":  # nobody reads: no graceful close, no lingering
            abort(self.sock)
        else:
            super().close(graceful)

    def remaining(self) -> float | None:
        """Seconds left for the next read (None: no deadline)."""
        now = time.monotonic()
        if self.body_start is not None:
            d = self.deadlines
            if d.body_timeout <= 0:
                return None
            extension = self.body_received / d.min_body_rate if d.min_body_rate > 0 else 0.0
            return self.body_start + d.body_timeout + extension - now
        if self.read_deadline is None:
            return None
        return self.read_deadline - now

    def expire(self) -> RequestTimeout:
        self.timed_out = "body" if self.body_start is not None else "head"
        return RequestTimeout(self.timed_out)


class DeadlineThreadWorker(gthread.ThreadWorker):
    """gunicorn's gthread worker with parked request heads, body deadlines and malloc
    trimming (module docstring). `deadlines` is set by `worker_class()`."""

    deadlines = Deadlines()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parked: set[DeadlineConn] = set()
        self._stop_deadline: float | None = None

    def init_process(self) -> None:
        limit_malloc_arenas()
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        # The application's long-lived objects leave the collector's generations: the full
        # collections after large requests (handle_request) then only walk recent objects.
        gc.collect()
        gc.freeze()

    # --- accepting and parking -------------------------------------------------------------

    def accept(self, listener: socket.socket) -> None:
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        try:
            client_sock = GuardedSocket(fileno=client_sock.detach())
            nodelay(client_sock)
        except OSError:
            self.nr_conns -= 1
            return
        conn = DeadlineConn(self.cfg, client_sock, client_addr, listener.getsockname(),
                            self.deadlines)
        conn.stage = "new" if self.cfg.is_ssl else "head"
        self._park(conn)

    def on_client_socket_readable(self, conn: DeadlineConn, client: Any) -> None:
        """A kept-alive connection has a new request coming: park it until its head is in."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        conn.stage = "head"
        self._park(conn)

    def _park(self, conn: DeadlineConn) -> None:
        conn.events = 0
        conn.head.clear()
        conn.timed_out = None
        conn.sock.setblocking(False)
        conn.park_deadline = time.monotonic() + self.deadlines.header_timeout
        self.parked.add(conn)
        self._advance(conn)

    def _advance(self, conn: DeadlineConn, _fileobj: Any = None) -> None:
        """Move a parked connection on as far as its data allows. Runs in the event loop:
        never raises."""
        try:
            step = self._step(conn)
        except Exception as exc:  # nothing a client sends may stop the event loop
            self.log.debug("parked connection failed: %r", exc)
            step = "close"
        try:
            if step == "ready":
                self._dispatch(conn)
            elif step == "close":
                self._drop(conn)
            else:
                self._wait(conn, selectors.EVENT_WRITE if step == "write"
                           else selectors.EVENT_READ)
        except Exception as exc:
            self.log.debug("parked connection failed: %r", exc)
            self._drop(conn)

    def _step(self, conn: DeadlineConn) -> str:
        """'read'/'write' (wait for the socket), 'ready' (head complete) or 'close'."""
        if conn.stage == "new":
            ctx = gsock.ssl_context(self.cfg)
            # Connection sockets whose sendall() honours the send deadline (documented hook).
            if ctx.sslsocket_class is not GuardedSSLSocket:
                ctx.sslsocket_class = GuardedSSLSocket
            # The plain SSLContext method: a non-blocking handshake, driven from here (the
            # context's own wrap_socket would block a thread for the whole handshake).
            conn.sock = ssl.SSLContext.wrap_socket(
                ctx, conn.sock, server_side=True, do_handshake_on_connect=False,
                suppress_ragged_eofs=self.cfg.suppress_ragged_eofs)
            conn.guard(conn.sock)
            conn.stage = "handshake"
        if conn.stage == "handshake":
            try:
                conn.sock.do_handshake()
            except ssl.SSLWantReadError:
                return "read"
            except ssl.SSLWantWriteError:
                return "write"
            except ssl.SSLError as exc:
                self.log.debug("TLS handshake refused: %s", exc)
                return self._start_linger(conn)
            except OSError:
                return "close"
            conn.stage = "head"
        if conn.stage == "linger":
            return self._linger(conn)
        while True:  # stage "head"
            try:
                data = conn.sock.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                return "read"
            except ssl.SSLWantWriteError:
                return "write"
            except OSError:  # ssl.SSLError included
                return "close"
            if not data:
                return "close"
            start = max(0, len(conn.head) - 3)
            conn.head += data
            if conn.head.find(HEAD_END, start) >= 0 or len(conn.head) >= MAX_PARKED_HEAD:
                return "ready"

    def _start_linger(self, conn: DeadlineConn) -> str:
        """The handshake failed and OpenSSL has sent its alert: stop writing and read what the
        client still sends for a moment, so closing does not reset the connection before the
        client has read the alert."""
        conn.stage = "linger"
        conn.park_deadline = min(conn.park_deadline, time.monotonic() + ALERT_LINGER)
        try:
            socket.socket.shutdown(conn.sock, socket.SHUT_WR)
        except OSError:
            return "close"
        return self._linger(conn)

    @staticmethod
    def _linger(conn: DeadlineConn) -> str:
        while True:
            try:
                if not socket.socket.recv(conn.sock, 65536):
                    return "close"
            except BlockingIOError:
                return "read"
            except OSError:
                return "close"

    def _wait(self, conn: DeadlineConn, events: int) -> None:
        if conn.events == events:
            return
        callback = partial(self._advance, conn)
        if conn.events:
            self.poller.modify(conn.sock, events, callback)
        else:
            self.poller.register(conn.sock, events, callback)
        conn.events = events

    def _unregister(self, conn: DeadlineConn) -> None:
        if conn.events:
            conn.events = 0
            try:
                self.poller.unregister(conn.sock)
            except (OSError, KeyError, ValueError):
                pass

    def _dispatch(self, conn: DeadlineConn) -> None:
        """The head is in: give the connection to a thread, the head in its parser's buffer."""
        self._unregister(conn)
        self.parked.discard(conn)
        conn.sock.setblocking(True)
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.reader, conn.client)
            conn.initialized = True
        conn.parser.unreader.unread(bytes(conn.head))
        conn.head.clear()
        conn.data_ready = True
        conn.read_deadline = conn.park_deadline  # the rest of an oversized head, if any
        conn.body_start = None
        conn.send_budget.reset()  # also for an error response to a bad head
        self.enqueue_req(conn)

    def _drop(self, conn: DeadlineConn) -> None:
        self._unregister(conn)
        if conn in self.parked:
            self.parked.discard(conn)
            self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        """gunicorn's pending connections, then parked ones past their deadline."""
        super().murder_pending()
        now = time.monotonic()
        if not self.alive and self._stop_deadline is None:
            self._stop_deadline = now + STOP_LINGER
        limit = self._stop_deadline
        for conn in list(self.parked):
            deadline = conn.park_deadline if limit is None else min(conn.park_deadline, limit)
            if deadline <= now:
                if conn.stage in ("new", "handshake", "head") and limit is None:
                    self.log.info("closed a connection from %s: %s not complete within %g s",
                                  _peer(conn), "TLS handshake" if conn.stage != "head"
                                  else "request head", self.deadlines.header_timeout)
                self._drop(conn)

    # --- in the thread -------------------------------------------------------------------

    def handle_request(self, req: Any, conn: DeadlineConn) -> bool:
        conn.body_start = time.monotonic()
        conn.body_received = 0
        conn.send_budget.reset()
        try:
            keepalive = bool(super().handle_request(req, conn))
        except ResponseTimeout:
            # gunicorn has closed the response iterable (its cleanup ran); the connection
            # handler closes the connection quietly on this NoMoreData.
            conn.timed_out = "response"
            budget = conn.send_budget
            self.log.warning("reset a connection from %s: the response was not read in time "
                             "(%d bytes sent in %.1f s, %.1f s of it waiting for the client)",
                             _peer(conn), budget.sent, time.monotonic() - budget.started,
                             budget.blocked)
            raise
        finally:
            received = conn.body_received
            conn.body_start = None
            conn.read_deadline = time.monotonic() + self.deadlines.header_timeout
            if received >= TRIM_AFTER_BYTES:
                release_memory()
            if conn.timed_out in ("head", "body"):
                self.log.info("closed a connection from %s: request %s slower than the "
                              "deadline", _peer(conn), conn.timed_out)
        return keepalive and not conn.timed_out


def _peer(conn: DeadlineConn) -> str:
    client = conn.client
    if isinstance(client, tuple) and client:
        return str(client[0])
    return str(client)


def worker_class(deadlines: Deadlines) -> type[DeadlineThreadWorker]:
    """A `DeadlineThreadWorker` subclass with `deadlines`, for gunicorn's `worker_class`."""
    return type("DeadlineThreadWorker", (DeadlineThreadWorker,), {"deadlines": deadlines})


# --- glibc malloc --------------------------------------------------------------------------

def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for threads created from now on; False off glibc."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(_M_ARENA_MAX, arenas))


def release_memory() -> bool:
    """After a large request: collect reference cycles (spyne's per-request contexts are
    cyclic and keep the parsed envelope, lxml tree included, until a collection), then give
    the freed heap back to the system. False when malloc_trim released nothing or is absent."""
    gc.collect()
    return trim_malloc()


def trim_malloc() -> bool:
    """Give free heap memory back to the system (`malloc_trim(0)`); False off glibc or when
    nothing was released."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))
