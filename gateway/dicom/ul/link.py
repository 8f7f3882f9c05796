"""One association as an SCU over a plain TCP or DICOM TLS socket, without pynetdicom's DUL
thread: connect, A-ASSOCIATE-RQ and its answer, then bounded reads of PDU headers and bodies
through one receive buffer (`read`; `copy` writes a body slice to a file descriptor straight
from that buffer; `pdvs` walks the PDV headers of a P-DATA-TF body), sends, A-RELEASE and
A-ABORT. Every socket wait is bounded by the association's timeout, and every failure becomes
a `PacsError` with the same kinds and wording as gateway.dicom.association."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence

from gateway.config import PacsConfig
from gateway.dicom.association import _server_name, _tls_diagnose, connect, tls_context
from gateway.dicom.errors import PacsError
from gateway.dicom.ul import pdu
from gateway.dicom.ul.pdu import AcceptedAssociation, PduError, ProposedContext

# The maximum PDU length we advertise in A-ASSOCIATE-RQ (bodies are streamed through one
# receive buffer, so it bounds nothing in memory). 64 KiB, measured against Orthanc 1.10 on
# loopback (500 instances, 263 MB, one association, 9-12 runs each): Orthanc spent 0.21-0.22
# CPU s at 64 KiB against 0.26-0.29 s at 32, 48, 96, 128 KiB, 1 MiB and unlimited (it sends
# 128 KiB PDUs at most), our side the same (0.30-0.36 s), wall time 0.59-0.67 s against
# 0.77-0.80 s; 16 KiB cost Orthanc as little but us 0.05 s more (bench/rad69.py docstring).
MAX_PDU_LENGTH = 1 << 16
# The largest P-DATA-TF PDU we accept: a peer that exceeds what we advertised is tolerated
# (the body is streamed anyway), one that claims more than this is a broken peer.
MAX_ACCEPTED_PDU = 1 << 24
# Other PDUs (A-ASSOCIATE-AC with 128 contexts and role items is a few kB) are read whole.
MAX_CONTROL_PDU = 1 << 18
# One receive buffer per association: every recv_into fills it as far as the socket has data
# (PDU boundaries do not matter), and data set bytes are written to their file straight from
# it: no bytes object per read, one copy in and one copy out.
RECV_BUFFER = 1 << 18
# SO_RCVBUF is left to the kernel's autotuning: 256 KiB, 2 MiB and 8 MiB set before
# connecting made no difference in CPU or time (bench/rad69.py docstring).


def _implementation() -> tuple[str, str]:
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    return str(PYNETDICOM_IMPLEMENTATION_UID), PYNETDICOM_IMPLEMENTATION_VERSION


def write_all(fd: int, data: memoryview) -> None:
    """os.write until all of `data` is written (a regular file takes it in one call)."""
    while data:
        n = os.write(fd, data)
        data = data[n:]


class Link:
    """An established association: `accepted` says which contexts the PACS took."""

    def __init__(self, sock: socket.socket, where: str, timeout: float):
        self.sock = sock
        self.where = where
        self.timeout = timeout
        self.accepted = AcceptedAssociation({}, 0)
        self._recv_into = sock.recv_into
        # Acknowledge at once what arrives (see _fill); Linux only.
        self._quickack: Callable[[], None] | None = (
            functools.partial(sock.setsockopt, socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            if hasattr(socket, "TCP_QUICKACK") and sock.family != getattr(socket, "AF_UNIX", -1)
            else None)
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._pos = 0  # unread bytes of the buffer are _buf[_pos:_end]
        self._end = 0
        self.closed = False
        # Monotonic time after which the next PDU is not waited for (a peer that trickles
        # bytes just fast enough never trips the per-read timeout); None: no bound.
        self.deadline: float | None = None

    # -- receiving ---------------------------------------------------------------------
    def _fill(self) -> int:
        """Receive into the (empty) buffer; returns how many bytes arrived.

        TCP_QUICKACK before each receive: a PACS that leaves Nagle's algorithm on (Orthanc's
        DCMTK here) sends a PDU header as a small segment and holds the rest of the PDU until
        that segment is acknowledged, and Linux delays the acknowledgement of a lone small
        segment by 40 ms. Measured against Orthanc: a C-FIND took 43 ms instead of 1.2 ms, and
        a 500-instance C-GET 0.65-1.46 s (17-24 such stalls) instead of 0.34-0.43 s. The
        option is not sticky (the kernel returns to delayed acknowledgements), hence each
        time; it costs one system call per receive (of up to RECV_BUFFER bytes)."""
        if self._quickack is not None:
            with contextlib.suppress(OSError):
                self._quickack()
        n = self._recv_into(self._view)
        if not n:
            raise ConnectionResetError("connection closed by the PACS")
        self._pos, self._end = 0, n
        return n

    def read(self, n: int) -> bytes:
        pos, end = self._pos, self._end
        if end - pos >= n:
            self._pos = pos + n
            return self._view[pos:pos + n].tobytes()
        out = bytearray()
        while len(out) < n:
            if self._pos == self._end:
                self._fill()
            take = min(n - len(out), self._end - self._pos)
            out += self._view[self._pos:self._pos + take]
            self._pos += take
        return bytes(out)

    def pdu_header(self) -> tuple[int, int]:
        """The next PDU's type and length, checked (unknown type, oversized: PduError)."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeoutError("operation deadline passed")
        pdu_type, length = pdu.PDU_HEADER.unpack(self.read(6))
        if pdu_type not in pdu.PDU_TYPES:
            raise PduError(f"unknown PDU type 0x{pdu_type:02X}")
        limit = MAX_ACCEPTED_PDU if pdu_type == pdu.P_DATA_TF else MAX_CONTROL_PDU
        if length > limit:
            raise PduError(f"PDU of {length} bytes (type 0x{pdu_type:02X}) exceeds {limit}")
        return pdu_type, length

    def copy(self, n: int, fd: int | None) -> None:
        """Write the next `n` bytes to file descriptor `fd` (None: discard) straight from
        the receive buffer."""
        view = self._view
        while n:
            if self._pos == self._end:
                self._fill()
            pos = self._pos
            take = min(n, self._end - pos)
            if fd is not None:
                write_all(fd, view[pos:pos + take])
            self._pos = pos + take
            n -= take

    def pdvs(self, length: int) -> Iterator[tuple[int, int, int]]:
        """The PDVs of one P-DATA-TF PDU whose body is the next `length` bytes, header by
        header: (presentation context id, message control header, value length). The caller
        takes each value (`read` or `copy`) before asking for the next PDV; a PDV that does
        not fit its PDU is a PduError."""
        unpack = pdu.PDV_HEADER.unpack
        remaining = length
        while remaining:
            if remaining < 6:
                raise PduError("P-DATA-TF PDU ends inside a PDV header")
            item_length, context_id, mch = unpack(self.read(6))
            if item_length < 2 or item_length + 4 > remaining:
                raise PduError("PDV length does not fit its PDU")
            remaining -= 4 + item_length
            yield context_id, mch, item_length - 2

    # -- sending -----------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_message(self, context_id: int, command: bytes, data_set: bytes | None = None
                     ) -> None:
        """One DIMSE message (command set, then data set if any), fragmented to the PACS's
        maximum PDU length."""
        peer_max = self.accepted.max_pdu_length
        parts = list(pdu.encode_p_data(context_id, command, command=True,
                                       max_pdu_length=peer_max))
        if data_set is not None:
            parts += pdu.encode_p_data(context_id, data_set, command=False,
                                       max_pdu_length=peer_max)
        self.sock.sendall(b"".join(parts))

    # -- ending ------------------------------------------------------------------------
    def release(self) -> None:
        """A-RELEASE-RQ and wait (bounded) for A-RELEASE-RP; never raises (the work is
        done by then), and closes the socket."""
        try:
            self.send(pdu.encode_release_rq())
            while True:
                pdu_type, length = self.pdu_header()
                self.copy(length, None)
                if pdu_type in (pdu.A_RELEASE_RP, pdu.A_ABORT):
                    break
                if pdu_type == pdu.A_RELEASE_RQ:  # release collision: answer it
                    self.send(pdu.encode_release_rp())
        except (OSError, PduError, ValueError):
            pass
        self.close()

    def abort(self) -> None:
        """A-ABORT (best effort) and close."""
        if not self.closed:
            with contextlib.suppress(OSError, ValueError):
                self.sock.settimeout(1)
                self.send(pdu.encode_abort())
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn socket and protocol failures inside the block into PacsError (and abort)."""
        try:
            yield
        except PacsError:
            self.abort()
            raise
        except PduError as exc:
            self.abort()
            raise PacsError("aborted", f"protocol error from the PACS during {what}: {exc}"
                            ) from None
        except TimeoutError:
            self.abort()
            raise PacsError("timeout", f"no data from the PACS within {self.timeout:.0f} s "
                                       f"during {what}") from None
        except (OSError, ValueError) as exc:  # ValueError: I/O on a closed file
            self.close()
            raise PacsError("aborted", f"the association ended during {what} "
                                       f"({type(exc).__name__})") from None


def _connect(pacs: PacsConfig, timeout: float) -> socket.socket:
    sock = connect(pacs, timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    return sock


def open_link(pacs: PacsConfig, contexts: Sequence[ProposedContext], timeout: float, *,
              scp_roles: Sequence[str] = ()) -> Link:
    """An established association with `pacs`, or PacsError (unreachable, rejected,
    aborted, timeout)."""
    where = f"{pacs.host}:{pacs.port}"
    sock = _connect(pacs, timeout)
    ctx = tls_context(pacs)
    if ctx is not None:
        try:
            sock = ctx.wrap_socket(sock, server_hostname=_server_name(pacs))
        except (ssl.SSLError, OSError):
            sock.close()
            _tls_diagnose(pacs, ctx, timeout)
            raise PacsError("rejected", f"DICOM TLS handshake with {where} failed") from None
    link = Link(sock, where, timeout)
    uid, version = _implementation()
    try:
        with link.guard("association negotiation"):
            link.send(pdu.encode_associate_rq(
                pacs.called_ae_title, pacs.calling_ae_title, contexts,
                max_pdu_length=MAX_PDU_LENGTH, implementation_uid=uid,
                implementation_version=version, scp_roles=scp_roles))
            pdu_type, length = link.pdu_header()
            body = link.read(length)
            if pdu_type == pdu.A_ASSOCIATE_AC:
                link.accepted = pdu.decode_associate_ac(body, contexts)
                return link
            if pdu_type == pdu.A_ASSOCIATE_RJ:
                why = pdu.describe_reject(body)
                link.close()
                raise PacsError("rejected", f"{pacs.called_ae_title} at {where} rejected "
                                            f"the association ({why})")
            if pdu_type == pdu.A_ABORT:
                link.close()
                raise PacsError("aborted", f"{pacs.called_ae_title} at {where} aborted the "
                                           "association request")
            raise PduError(f"unexpected PDU type 0x{pdu_type:02X} in answer to "
                           "A-ASSOCIATE-RQ")
    except PacsError as exc:
        if ctx is not None and exc.kind == "aborted":  # e.g. our certificate refused (TLS 1.3)
            _tls_diagnose(pacs, ctx, timeout)
        if exc.kind == "aborted" and "ended during" in exc.message:
            raise PacsError("aborted", f"{pacs.called_ae_title} at {where} aborted the "
                                       "association request") from None
        raise
