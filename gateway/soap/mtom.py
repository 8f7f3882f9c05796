"""MTOM/XOP at the WSGI level, both directions (spyne's own MTOM is unusable, see DESIGN.md).

Inbound, `MtomMiddleware` wraps the SOAP application: a multipart/related request is
stream-parsed (`gateway.soap.multipart`), attachments spooled to files in a per-request folder
(their writeback to disk started as they arrive: the repository fsyncs and keeps them),
and the inner application sees a plain SOAP request whose body is the root part, with the
attachments in ``environ["xdsi.attachments"]`` and the folder in ``environ["xdsi.spool_dir"]``.
Every request gets such a folder (handlers spool retrieved documents there too); it is removed
once the response iterable is closed. Malformed or oversized requests are answered here with a
SOAP 1.2 fault.

Outbound, `mtom_response()` frames an envelope and attachment files as multipart/related with
an exact Content-Length, and streams the files from disk in chunks; `mtom_stream()` frames
attachments as they are produced and the envelope last (root named by `start`, no length:
the response is chunked), for handlers that return `SoapResponse.live`, or, with
`root_first`, the envelope first and the attachments as they are produced (from files, or
chunk by chunk: `gateway.transactions.StreamedAttachment`).
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from gateway.errors import SoapFaultCode
from gateway.soap.faults import soap_fault_response
from gateway.soap.multipart import (
    AttachmentMap,
    MultipartError,
    iter_file,
    parse_content_type,
    parse_multipart,
    parse_multipart_ex,
    resolve_cid,
)
from gateway.transactions import Attachment, StreamedAttachment

__all__ = [
    "ROOT_CONTENT_ID",
    "AttachmentMap",
    "LiveMtomResponse",
    "MtomMiddleware",
    "MtomResponse",
    "MultipartError",
    "mtom_response",
    "mtom_stream",
    "parse_multipart",
    "resolve_cid",
]

log = logging.getLogger(__name__)

ROOT_CONTENT_ID = "root.message@xdsi-gateway"
DEFAULT_CHUNK = 256 * 1024
ENV_ATTACHMENTS = "xdsi.attachments"
ENV_SPOOL_DIR = "xdsi.spool_dir"
# Bodies of non-MTOM requests sent without Content-Length (chunked) are buffered up to this
# size in memory, then in a file in the request's spool folder.
_SPOOL_IN_MEMORY = 1024 * 1024

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


# --- Outbound -------------------------------------------------------------------------------

class MtomResponse:
    """The body of an MTOM message: the root part, then each attachment streamed from disk.

    Iterate once. `close()` (called by the WSGI server, or by the HTTP client's caller) runs
    the optional `on_close` callback exactly once, typically to delete the spooled files.
    """

    def __init__(self, head: bytes, parts: Sequence[tuple[Attachment, int, bytes]],
                 trailer: bytes, chunk_size: int,
                 on_close: Callable[[], None] | None = None):
        self._head = head
        self._parts = parts
        self._trailer = trailer
        self._chunk = chunk_size
        self._on_close = on_close
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield self._head
        for att, size, after in self._parts:
            yield from iter_file(att.path, size, self._chunk, att.offset)
            yield after
        if self._trailer:
            yield self._trailer

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._on_close is not None:
            self._on_close()


def _part_header(content_type: str, content_id: str) -> bytes:
    return (f"Content-Type: {content_type}\r\n"
            "Content-Transfer-Encoding: binary\r\n"
            f"Content-ID: <{content_id}>\r\n\r\n").encode()


def _header_safe(value: str, what: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"{what} contains a line break")
    return value


def mtom_response(envelope: bytes, attachments: Sequence[Attachment], *,
                  soap_action: str | None = None, chunk_size: int = DEFAULT_CHUNK,
                  on_close: Callable[[], None] | None = None,
                  ) -> tuple[str, int, MtomResponse]:
    """Frame `envelope` (SOAP 1.2, UTF-8, with xop:Include hrefs) and `attachments` as MTOM.

    Returns (Content-Type header value, exact Content-Length, body iterable). File sizes are
    taken when this is called (an attachment with an offset: its `size` bytes from there);
    each file is then sent with exactly that many bytes. The
    boundary is random and never occurs in the envelope.
    """
    while True:
        boundary = "MIMEBoundary_" + uuid.uuid4().hex
        if boundary.encode("ascii") not in envelope:
            break
    dash = b"--" + boundary.encode("ascii")
    ctype = (f'multipart/related; boundary="{boundary}"; type="application/xop+xml"; '
             f'start="<{ROOT_CONTENT_ID}>"; start-info="application/soap+xml"')
    if soap_action:
        ctype += f'; action="{_header_safe(soap_action, "soap_action").replace(chr(34), "")}"'
    head = (dash + b"\r\n"
            + _part_header('application/xop+xml; charset=UTF-8; type="application/soap+xml"',
                           ROOT_CONTENT_ID)
            + envelope + b"\r\n")
    total = len(head)
    parts: list[tuple[Attachment, int, bytes]] = []
    for i, att in enumerate(attachments):
        size = att.path.stat().st_size if att.offset is None else att.size
        header = dash + b"\r\n" + _part_header(
            _header_safe(att.content_type or "application/octet-stream", "content type"),
            _header_safe(att.content_id, "content id"))
        if i == 0:
            head += header
        else:
            prev_att, prev_size, prev_after = parts[-1]
            parts[-1] = (prev_att, prev_size, prev_after + header)
        after = b"\r\n"
        parts.append((att, size, after))
        total += len(header) + size + len(after)
    trailer = dash + b"--\r\n"
    total += len(trailer)
    if parts:
        # Fold the trailer into the last part's tail: fewer, larger writes.
        last_att, last_size, last_after = parts[-1]
        parts[-1] = (last_att, last_size, last_after + trailer)
        trailer = b""
    else:
        head += trailer
        trailer = b""
    return ctype, total, MtomResponse(head, parts, trailer, chunk_size, on_close)


def _boundary_safe_root(root: bytes, boundary: bytes) -> bytes:
    """`root` (XML written after the boundary was chosen) without the boundary in it: every
    occurrence gets its "_" as a character reference, the same XML. The boundary holds 128
    random bits, so this is for completeness only."""
    if boundary not in root:
        return root
    return root.replace(boundary, boundary.replace(b"_", b"&#95;"))


class LiveMtomResponse:
    """The body of a streamed MTOM message: each attachment as it is produced, the root part
    last (see `mtom_stream`). Iterate once; `close()` closes the producer and runs
    `on_close` exactly once."""

    def __init__(self, boundary: bytes, parts: Iterator[Attachment | StreamedAttachment],
                 root: Callable[[], bytes], fallback_root: bytes | None, chunk_size: int,
                 on_close: Callable[[], None] | None = None, *, root_first: bool = False):
        self._root_first = root_first
        self._dash = b"--" + boundary
        self._parts = parts
        self._root = root
        self._fallback = fallback_root
        self._chunk = chunk_size
        self._on_close = on_close
        self._closed = False
        self.parts_written = 0

    def _root_part(self) -> bytes:
        try:
            root = self._root()
        except Exception as exc:
            if self._fallback is None:
                raise
            log.error("the streamed response's root part could not be written: %s",
                      type(exc).__name__)
            log.debug("root part failure", exc_info=True)
            root = self._fallback
        root = _boundary_safe_root(root, self._dash[2:])
        return (self._dash + b"\r\n"
                + _part_header('application/xop+xml; charset=UTF-8; type="application/soap+xml"',
                               ROOT_CONTENT_ID)
                + root)

    def __iter__(self) -> Iterator[bytes]:
        dash = self._dash
        pending = b""  # the previous part's CRLF, folded into the next header
        if self._root_first:
            pending = self._root_part() + b"\r\n"
        for att in self._parts:
            size = (0 if isinstance(att, StreamedAttachment) else att.path.stat().st_size
                    if att.offset is None else att.size)
            pending += dash + b"\r\n" + _part_header(
                _header_safe(att.content_type or "application/octet-stream", "content type"),
                _header_safe(att.content_id, "content id"))
            # The small header goes as its own write: cheaper than copying it in front of
            # the first chunk of the file.
            yield pending
            if isinstance(att, StreamedAttachment):
                for chunk in att.chunks:
                    if chunk:  # an empty write would end a chunked HTTP body
                        yield chunk
            else:
                yield from iter_file(att.path, size, self._chunk, att.offset)
            pending = b"\r\n"
            self.parts_written += 1
        if self._root_first:
            yield pending + dash + b"--\r\n"
            return
        yield pending + self._root_part() + b"\r\n" + dash + b"--\r\n"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._parts, "close", None)
            if close is not None:
                close()
        finally:
            if self._on_close is not None:
                self._on_close()


def mtom_stream(parts: Iterator[Attachment | StreamedAttachment], root: Callable[[], bytes], *,
                fallback_root: bytes | None = None, soap_action: str | None = None,
                chunk_size: int = DEFAULT_CHUNK, on_close: Callable[[], None] | None = None,
                root_first: bool = False) -> tuple[str, LiveMtomResponse]:
    """Frame attachments produced one by one, then the envelope `root()` returns, as MTOM
    with the root part LAST.

    Returns (Content-Type header value, body iterable); the length is unknown, so the HTTP
    response goes out chunked. The root part is the one the `start` parameter names, which
    is all RFC 2387 (3.2: "the content-ID of the compound object's root"; only without
    `start` is the root the first body part) and XOP 1.0 (4.1: apart from determining the
    root part as RFC 2387 says, the order of MIME parts MUST NOT be significant) ask of the
    order. Clients that take the first part as the envelope whatever `start` says (zeep 4)
    cannot read it. `root()` is called after `parts` is exhausted; when it raises,
    `fallback_root` is written instead (or the error propagates when there is none).

    With `root_first`, `root()` is called first and the root part goes FIRST (readable by
    every MTOM client), then each attachment as it is produced: for a producer that knows
    the whole root before its parts (an initiating gateway passing on a root-first reply).
    The root then names parts not yet written: a producer that cannot deliver one must
    raise from `parts` (or from the `chunks` of a `StreamedAttachment`, whose bytes are
    written as they come, without a file), which breaks the response off (no closing
    boundary, the chunked body not terminated) rather than end it with a root that lies.
    """
    boundary = "MIMEBoundary_" + uuid.uuid4().hex
    ctype = (f'multipart/related; boundary="{boundary}"; type="application/xop+xml"; '
             f'start="<{ROOT_CONTENT_ID}>"; start-info="application/soap+xml"')
    if soap_action:
        ctype += f'; action="{_header_safe(soap_action, "soap_action").replace(chr(34), "")}"'
    return ctype, LiveMtomResponse(boundary.encode("ascii"), parts, root, fallback_root,
                                   chunk_size, on_close, root_first=root_first)


# --- Inbound --------------------------------------------------------------------------------

class ClosingIterable:
    """Wraps an application's response iterable; `close()` closes it, then cleans up."""

    def __init__(self, inner: Iterable[bytes], cleanup: Callable[[], None]):
        self._inner = inner
        self._cleanup: Callable[[], None] | None = cleanup

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._inner)

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            cleanup, self._cleanup = self._cleanup, None
            if cleanup is not None:
                cleanup()

    def __del__(self) -> None:
        # A server that never calls close() must not leak the request's spool folder.
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            cleanup()


def _inner_content_type(outer_params: dict[str, str], root_type: str) -> str:
    """The Content-Type the SOAP application should see for the root part."""
    media, params = parse_content_type(root_type)
    if media == "application/xop+xml":
        inner = params.get("type") or outer_params.get("start-info") or "application/soap+xml"
    else:
        inner = root_type or outer_params.get("start-info") or "application/soap+xml"
    inner_media, inner_params = parse_content_type(inner)
    charset = params.get("charset") or inner_params.get("charset") or "utf-8"
    action = outer_params.get("action") or inner_params.get("action") or params.get("action")
    if inner_media in ("", "application/xop+xml"):
        inner_media = "application/soap+xml"
    value = f"{inner_media}; charset={charset}"
    if action and '"' not in action:
        value += f'; action="{action}"'
    return value


def _content_length(environ: dict[str, Any]) -> int | None:
    raw = str(environ.get("CONTENT_LENGTH") or "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise MultipartError("invalid Content-Length")
    return int(raw)


# A rejected request's body is read and discarded up to this size before the fault is sent.
DRAIN_LIMIT = 64 * 1024 * 1024


class MtomMiddleware:
    """WSGI middleware: MTOM requests in, plain SOAP plus spooled attachments to `app`.

    For every request it creates a folder under `spool_root` (the system temp folder when
    None), exposed as ``environ["xdsi.spool_dir"]`` and removed after the response iterable
    is closed (or when `app` raises). multipart/related requests are parsed into that folder;
    other requests pass through, their size checked against `max_request_bytes` (a chunked
    body is buffered so the application sees a Content-Length).
    """

    def __init__(self, app: WsgiApp, *, spool_root: Path | None, max_request_bytes: int,
                 max_envelope_bytes: int, chunk_size: int = DEFAULT_CHUNK):
        self.app = app
        self.spool_root = spool_root
        self.max_request_bytes = max_request_bytes
        self.max_envelope_bytes = max_envelope_bytes
        self.chunk_size = chunk_size

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        try:
            length = _content_length(environ)
        except MultipartError as exc:
            return self._fault(start_response, exc)
        if length is not None and length > self.max_request_bytes:
            self._drain(environ)
            return self._fault(start_response, MultipartError(
                f"request body exceeds max_request_bytes ({self.max_request_bytes})", 413))

        if self.spool_root is not None:
            self.spool_root.mkdir(parents=True, exist_ok=True)
        spool = Path(tempfile.mkdtemp(prefix="xdsi-req-", dir=self.spool_root))
        held: list[IO[bytes]] = []

        def cleanup() -> None:
            for f in held:
                f.close()
            shutil.rmtree(spool, ignore_errors=True)

        try:
            media, params = parse_content_type(str(environ.get("CONTENT_TYPE") or ""))
            stream = environ["wsgi.input"]
            if media == "multipart/related":
                root, root_type, attachments = parse_multipart_ex(
                    stream, str(environ.get("CONTENT_TYPE")), spool,
                    max_envelope_bytes=self.max_envelope_bytes,
                    max_total_bytes=self.max_request_bytes, content_length=length,
                    chunk_size=self.chunk_size, early_writeback=True)
                body: IO[bytes] = io.BytesIO(root)
                held.append(body)
                environ["wsgi.input"] = body
                environ["CONTENT_LENGTH"] = str(len(root))
                environ["CONTENT_TYPE"] = _inner_content_type(params, root_type)
                environ[ENV_ATTACHMENTS] = attachments
                environ["xdsi.mtom"] = True
            else:
                if length is None and _is_chunked(environ):
                    body, size = self._buffer(stream, spool)
                    held.append(body)
                    environ["wsgi.input"] = body
                    environ["CONTENT_LENGTH"] = str(size)
                environ[ENV_ATTACHMENTS] = AttachmentMap()
                environ["xdsi.mtom"] = False
            environ[ENV_SPOOL_DIR] = spool
        except MultipartError as exc:
            cleanup()
            self._drain(environ)
            return self._fault(start_response, exc)
        except Exception:
            cleanup()
            log.exception("could not read an MTOM request")
            return soap_fault_response(start_response, SoapFaultCode.RECEIVER,
                                       "the gateway could not read the request", 500)

        try:
            result = self.app(environ, start_response)
        except BaseException:
            cleanup()
            raise
        return ClosingIterable(result, cleanup)

    def _buffer(self, stream: Any, spool: Path) -> tuple[IO[bytes], int]:
        buf = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY, dir=str(spool))
        size = 0
        try:
            while True:
                data = stream.read(self.chunk_size)
                if not data:
                    break
                size += len(data)
                if size > self.max_request_bytes:
                    raise MultipartError(
                        f"request body exceeds max_request_bytes ({self.max_request_bytes})", 413)
                buf.write(data)
        except OSError as exc:
            buf.close()
            raise MultipartError(f"could not read the request body: {exc}") from None
        except BaseException:
            buf.close()
            raise
        buf.seek(0)
        return buf, size

    def _drain(self, environ: dict[str, Any]) -> None:
        """Read and discard what is left of a rejected body (at most DRAIN_LIMIT bytes), so
        that a client still sending can read the fault instead of a reset connection. A
        larger rest is not read: the server answers and closes."""
        stream = environ.get("wsgi.input")
        if stream is None:
            return
        left = DRAIN_LIMIT
        try:
            while left > 0:
                data = stream.read(min(self.chunk_size, left))
                if not data:
                    return
                left -= len(data)
        except (OSError, ValueError):
            return

    @staticmethod
    def _fault(start_response: StartResponse, exc: MultipartError) -> list[bytes]:
        log.info("rejected a request: %s", exc.reason)
        return soap_fault_response(start_response, SoapFaultCode.SENDER, exc.reason,
                                   exc.http_status)


def _is_chunked(environ: dict[str, Any]) -> bool:
    te = str(environ.get("HTTP_TRANSFER_ENCODING") or "").lower()
    return "chunked" in te or bool(environ.get("wsgi.input_terminated"))
