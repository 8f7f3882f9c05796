"""The built-in storage SCP (`[pacs] dimse_engine = "builtin"`): the acceptor side of the DICOM
upper layer for the C-MOVE destination, without pynetdicom's DUL and DIMSE threads.

`StorageSCP.start()` binds the listening socket (an OSError such as EADDRINUSE goes to the
caller: gateway.dicom.storescp then knows another process serves the port) and accepts in a
background thread; every association runs in its own thread, at most `max_associations` at a
time (more get A-ASSOCIATE-RJ transient, local-limit-exceeded, and are closed).

Negotiation: a called AE title other than ours is rejected (PS3.8 reason 7), so is another
application context (reason 2) or protocol version; every proposed context is accepted with
its first transfer syntax (data sets are never decoded: their bytes are kept as sent), except
the Query/Retrieve and worklist models (abstract syntax not supported); Verification is
accepted and C-ECHO answered with success.

Receive loop (like gateway.dicom.cget's): each C-STORE-RQ data set goes, fragment by fragment
straight from the association's receive buffer, behind the Part 10 header of
gateway.dicom.cget.file_meta_header into a temp file in the SCP's root folder; on its last
fragment the `route` callback places it (gateway.dicom.storescp.route) and its status is sent
back in the C-STORE-RSP. A data set nobody expects (`expected` says so when its command
arrives) is discarded unwritten and refused (0xA900). A-RELEASE-RQ is answered and the
association closed; A-ABORT closes it; a malformed PDU, an unexpected command or a wait longer
than `timeout` (every socket read is bounded) aborts it. A data set broken off leaves no file.
With a TLS context (DICOM TLS), each accepted socket is wrapped, the handshake bounded by
`timeout` too."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from gateway.dicom.cget import file_meta_header
from gateway.dicom.ul import command as dimse
from gateway.dicom.ul import pdu
from gateway.dicom.ul.link import MAX_PDU_LENGTH, Link, _implementation, write_all
from gateway.dicom.ul.pdu import AcceptedAssociation, AssociateRequest, PduError

log = logging.getLogger(__name__)

# Abstract syntaxes that are not storage: Query/Retrieve (FIND/MOVE/GET of every model, incl.
# composite instance root and the Get without bulk data variant) and the worklist models.
_NOT_STORAGE_PREFIXES = ("1.2.840.10008.5.1.4.1.2.", "1.2.840.10008.5.1.4.31",
                         "1.2.840.10008.5.1.4.32", "1.2.840.10008.5.1.4.33",
                         "1.2.840.10008.5.1.4.34.")
MAX_ASSOCIATIONS = 16
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)

# route(SOP Instance UID, received file) -> C-STORE status; it takes the file away or not
Route = Callable[[str, Path], int]
Expected = Callable[[str], bool]


def is_storage_syntax(abstract_syntax: str) -> bool:
    """Whether we accept `abstract_syntax` as a storage SOP class (anything that is not a
    Q/R or worklist model nor Verification)."""
    return (abstract_syntax != dimse.VERIFICATION
            and not abstract_syntax.startswith(_NOT_STORAGE_PREFIXES))


def negotiate(request: AssociateRequest) -> list[tuple[int, int, str]]:
    """(context id, result, transfer syntax) for each proposed context: accepted with its
    first transfer syntax, or the reason it is not."""
    results: list[tuple[int, int, str]] = []
    for pc in request.contexts:
        if not (pc.abstract_syntax == dimse.VERIFICATION
                or is_storage_syntax(pc.abstract_syntax)):
            results.append((pc.context_id, pdu.ABSTRACT_SYNTAX_NOT_SUPPORTED, ""))
        elif not pc.transfer_syntaxes:
            results.append((pc.context_id, pdu.TRANSFER_SYNTAXES_NOT_SUPPORTED, ""))
        else:
            results.append((pc.context_id, pdu.ACCEPTANCE, pc.transfer_syntaxes[0]))
    return results


class _Store:
    """The C-STORE-RQ being received: its command and the temp file of its data set."""

    __slots__ = ("context_id", "fd", "message_id", "path", "sop_class", "sop_uid", "status")

    def __init__(self, message_id: int, context_id: int, sop_class: str, sop_uid: str,
                 fd: int | None, path: Path | None, status: int):
        self.message_id, self.context_id = message_id, context_id
        self.sop_class, self.sop_uid = sop_class, sop_uid
        self.fd, self.path, self.status = fd, path, status  # fd None: discard


class _Association:
    """One accepted association's receive loop."""

    def __init__(self, link: Link, contexts: dict[int, tuple[str, str]], root: Path,
                 route: Route, expected: Expected):
        self.link = link
        self.contexts = contexts  # id -> (abstract syntax, transfer syntax)
        self.root = root
        self.route = route
        self.expected = expected
        self._store: _Store | None = None
        self._command_buf = bytearray()

    def run(self) -> None:
        link = self.link
        try:
            while True:
                pdu_type, length = link.pdu_header()
                if pdu_type == pdu.P_DATA_TF:
                    self._p_data(length)
                elif pdu_type == pdu.A_RELEASE_RQ:
                    link.copy(length, None)
                    if self._store is not None or self._command_buf:
                        raise PduError("A-RELEASE-RQ in the middle of a message")
                    link.send(pdu.encode_release_rp())
                    return
                elif pdu_type == pdu.A_ABORT:
                    return
                else:
                    raise PduError(f"unexpected PDU type 0x{pdu_type:02X}")
        finally:
            self._drop_partial()

    def _drop_partial(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            self._discard(store)

    @staticmethod
    def _discard(store: _Store) -> None:
        if store.fd is not None:
            with contextlib.suppress(OSError):
                os.close(store.fd)
            store.fd = None
        if store.path is not None:
            with contextlib.suppress(OSError):
                store.path.unlink()
            store.path = None

    def _p_data(self, length: int) -> None:
        link = self.link
        command = self._command_buf
        for context_id, mch, n in link.pdvs(length):
            if mch & 1:
                if self._store is not None:
                    raise PduError("command set before the previous data set ended")
                if len(command) + n > dimse.MAX_COMMAND_SET:
                    raise PduError("command set too long")
                command += link.read(n)
                if mch & 2:
                    raw = bytes(command)
                    command.clear()
                    self._command(raw, context_id)
            else:
                store = self._store
                if store is None or command:
                    raise PduError("data set fragment without a command")
                if context_id != store.context_id:
                    raise PduError("data set fragment on another presentation context")
                link.copy(n, store.fd)
                if mch & 2:
                    self._stored(store)

    def _command(self, raw: bytes, context_id: int) -> None:
        cmd = dimse.decode(raw)
        field = dimse.us(cmd, dimse.COMMAND_FIELD)
        has_data = dimse.us(cmd, dimse.DATA_SET_TYPE) != dimse.NO_DATA_SET
        if context_id not in self.contexts:
            raise PduError(f"message on presentation context {context_id}, not accepted")
        message_id = dimse.us(cmd, dimse.MESSAGE_ID)
        if field == dimse.C_ECHO_RQ:
            if has_data:
                raise PduError("C-ECHO-RQ with a data set")
            self.link.send_message(context_id, dimse.c_echo_rsp(message_id))
        elif field == dimse.C_STORE_RQ:
            sop_class = dimse.ui(cmd, dimse.AFFECTED_SOP_CLASS)
            sop_uid = dimse.ui(cmd, dimse.AFFECTED_SOP_INSTANCE)
            if not has_data:
                self._respond(context_id, message_id, sop_class, sop_uid, 0xC000)
                return
            if not self.expected(sop_uid):
                self._store = _Store(message_id, context_id, sop_class, sop_uid, None, None,
                                     0xA900)
                return
            path = self.root / f".{uuid.uuid4().hex}.part"
            fd = os.open(path, _OPEN_FLAGS, 0o600)
            self._store = _Store(message_id, context_id, sop_class, sop_uid, fd, path, 0)
            write_all(fd, memoryview(file_meta_header(sop_class, sop_uid,
                                                      self.contexts[context_id][1])))
        else:
            raise PduError(f"unexpected DIMSE command 0x{field:04X}")

    def _stored(self, store: _Store) -> None:
        status = store.status
        if store.fd is not None and store.path is not None:
            os.close(store.fd)
            store.fd = None
            try:
                status = self.route(store.sop_uid, store.path)
            except OSError:
                log.warning("storage SCP: cannot place a received instance", exc_info=True)
                status = 0xA700  # out of resources
        self._store = None
        self._discard(store)  # the temp file, unless routed away
        self._respond(store.context_id, store.message_id, store.sop_class, store.sop_uid,
                      status)

    def _respond(self, context_id: int, message_id: int, sop_class: str, sop_uid: str,
                 status: int) -> None:
        self.link.send_message(context_id,
                               dimse.c_store_rsp(message_id, sop_class, sop_uid, status))


class StorageSCP:
    """The listening socket and its association threads; see the module docstring."""

    def __init__(self, ae_title: str, port: int, root: Path, route: Route, expected: Expected,
                 *, timeout: float = 30, tls: ssl.SSLContext | None = None,
                 max_associations: int = MAX_ASSOCIATIONS, host: str = ""):
        self.ae_title = ae_title.strip()
        self.port = port
        self.host = host
        self.root = root
        self.route = route
        self.expected = expected
        self.timeout = timeout
        self.tls = tls
        self.max_associations = max_associations
        self._slots = threading.BoundedSemaphore(max_associations)
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("not started")
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and listen (OSError, e.g. EADDRINUSE, to the caller), then accept in a
        daemon thread. Temp files a previous server of this port left behind (a process
        killed mid-instance) are removed: only the process holding the port writes them."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(64)
            sock.settimeout(0.5)  # to notice shutdown()
        except OSError:
            sock.close()
            raise
        self._listener = sock
        for stale in self.root.glob(".*.part"):
            with contextlib.suppress(OSError):
                stale.unlink()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"storage-scp-{self.address[1]}")
        self._thread.start()

    def shutdown(self) -> None:
        """Stop accepting (running associations end on their own)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stop.is_set():
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # e.g. out of file descriptors: not a busy loop
                if self._stop.wait(0.1):
                    return
                continue
            if not self._slots.acquire(blocking=False):
                self._refuse(conn)
                continue
            try:
                threading.Thread(target=self._serve, args=(conn, peer), daemon=True,
                                 name="storage-scp-association").start()
            except RuntimeError:  # cannot start a thread
                self._slots.release()
                conn.close()

    def _refuse(self, conn: socket.socket) -> None:
        """Too many associations: A-ASSOCIATE-RJ (transient, local limit exceeded) on plain
        TCP, then close; with TLS just close (no handshake on the accept thread)."""
        with contextlib.suppress(OSError):
            if self.tls is None:
                conn.settimeout(1)
                conn.sendall(pdu.encode_associate_rj(pdu.RJ_TRANSIENT,
                                                     pdu.RJ_SOURCE_PRESENTATION,
                                                     pdu.RJ_LOCAL_LIMIT_EXCEEDED))
                conn.shutdown(socket.SHUT_WR)
        conn.close()
        log.warning("storage SCP: association refused, %d already running",
                    self.max_associations)

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        where = f"{peer[0]}:{peer[1]}"
        link: Link | None = None
        try:
            conn.settimeout(self.timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = conn
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    log.warning("storage SCP: DICOM TLS handshake with %s failed (%s)",
                                where, getattr(exc, "reason", None) or type(exc).__name__)
                    conn.close()
                    return
            link = Link(sock, where, self.timeout)
            association = self._negotiate(link)
            if association is not None:
                association.run()
        except PduError as exc:
            log.warning("storage SCP: protocol error from %s, association aborted (%s)",
                        where, exc)
            if link is not None:
                link.abort()
        except TimeoutError:
            log.warning("storage SCP: nothing from %s within %.0f s, association aborted",
                        where, self.timeout)
            if link is not None:
                link.abort()
        except (OSError, ValueError) as exc:  # the peer went away, or a spool file failed
            log.info("storage SCP: association with %s ended (%s)", where,
                     type(exc).__name__)
            if link is not None:
                link.abort()  # best effort: a dead socket just closes
        except Exception:
            log.exception("storage SCP: association with %s failed", where)
            if link is not None:
                link.abort()
        finally:
            if link is not None:
                link.close()
            else:
                with contextlib.suppress(OSError):
                    conn.close()
            self._slots.release()

    def _negotiate(self, link: Link) -> _Association | None:
        try:
            pdu_type, length = link.pdu_header()
        except TimeoutError:  # PS3.8 ARTIM expiry before A-ASSOCIATE-RQ: just close
            log.warning("storage SCP: no A-ASSOCIATE-RQ from %s within %.0f s", link.where,
                        self.timeout)
            link.close()
            return None
        if pdu_type != pdu.A_ASSOCIATE_RQ:
            raise PduError(f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ")
        request = pdu.decode_associate_rq(link.read(length))
        reject: tuple[int, int, int] | None = None
        if not request.protocol_version & 1:
            reject = (pdu.RJ_PERMANENT, pdu.RJ_SOURCE_ACSE,
                      pdu.RJ_PROTOCOL_VERSION_NOT_SUPPORTED)
        elif request.application_context != pdu.APPLICATION_CONTEXT:
            reject = (pdu.RJ_PERMANENT, pdu.RJ_SOURCE_USER,
                      pdu.RJ_APPLICATION_CONTEXT_NOT_SUPPORTED)
        elif request.called_ae != self.ae_title:
            reject = (pdu.RJ_PERMANENT, pdu.RJ_SOURCE_USER, pdu.RJ_CALLED_AE_NOT_RECOGNIZED)
        if reject is not None:
            log.warning("storage SCP: association from %s rejected (%s)", link.where,
                        pdu.describe_reject(bytes([0, *reject])))
            link.send(pdu.encode_associate_rj(*reject))
            link.close()
            return None
        results = negotiate(request)
        uid, version = _implementation()
        link.send(pdu.encode_associate_ac(request, results, max_pdu_length=MAX_PDU_LENGTH,
                                          implementation_uid=uid,
                                          implementation_version=version))
        accepted = {cid: syntax for cid, result, syntax in results if result == pdu.ACCEPTANCE}
        abstract = {pc.context_id: pc.abstract_syntax for pc in request.contexts}
        link.accepted = AcceptedAssociation(accepted, request.max_pdu_length)
        return _Association(link, {cid: (abstract[cid], ts) for cid, ts in accepted.items()},
                            self.root, self.route, self.expected)
