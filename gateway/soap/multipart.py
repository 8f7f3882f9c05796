"""Streaming parser for multipart/related (MTOM/XOP) messages.

Owns the MIME side of MTOM: Content-Type parameter parsing, the boundary scan, part headers,
Content-Transfer-Encoding (binary, 8bit, 7bit; base64 decoded as it streams), and the lookup
of attachments by Content-ID. The root part is kept in memory (bounded); every other part is
written to a file as it arrives, so memory stays flat whatever the size of the attachments.
On request (`sha1=True`) the SHA-1 of each spooled part is computed in the same pass
(`Attachment.sha1`). The gateway's own edge does not ask for it: measured with gunicorn, hashing
in the receive loop cost more than one later pass over the file from the page cache. With
`early_writeback` the kernel is asked to start writing each spooled part to disk while it
still arrives (Linux), so that the fsync of a document the repository keeps has little left to
wait for.
The delimiter search runs over large blocks through the C library's memmem where that is
glibc's (`_find`), and a block goes to its part's file in one write unless its end may begin a
delimiter (`_held_back`).
`iter_multipart` yields the parts one by one as each completes (the root wherever it comes),
for callers that pass a message on while it arrives; `parse_multipart` collects them.
`iter_multipart_piped` hands each part that comes after the root over while it arrives,
without a file: a `PartStream` whose chunks (`PartChunks`, bounded, read before the next
part) are the part's bytes as received, for a gateway piping a root-first reply through.
Nothing here knows WSGI or SOAP: `gateway.soap.mtom` builds the middleware and the outbound
side on top of it.

Lenient where real peers differ (LF-only line ends, transport padding after a boundary, a
preamble, an epilogue, quoted or bare parameters in any order and case) and strict on what
makes a message ambiguous or unbounded (every limit raises `MultipartError`).
"""

from __future__ import annotations

import binascii
import hashlib
import os
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote

from gateway.transactions import Attachment

MAX_HEADER_BLOCK = 16 * 1024
MAX_PARTS = 10_000
MAX_PREAMBLE = 64 * 1024
MAX_PADDING = 256  # transport padding (spaces, tabs) allowed after a boundary
DEFAULT_CHUNK = 256 * 1024
# A piped part's chunks (`iter_multipart_piped`) are at least this long, but its last.
MIN_PIPED_CHUNK = 64 * 1024
# With early writeback, every WRITEBACK_STEP bytes written to a part's file are handed to the
# kernel's writeback (posix_fadvise DONTNEED on dirty pages starts writing them and keeps them
# cached: only clean pages are dropped).
WRITEBACK_STEP = 8 * 1024 * 1024
_FADVISE = getattr(os, "posix_fadvise", None)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
_LWSP = b" \t"
# Searches of at least this many bytes go to the C library's memmem (when there is one).
MEMMEM_MIN = 16 * 1024


def _load_memmem() -> Callable[[bytes, bytes, int], int] | None:
    """`bytes.find` through the C library's memmem, which finds a delimiter in a large block
    two to four times faster than CPython's search (measured: 0.032 against 0.016 CPU s for
    a reply of 263 MB). Only with glibc, whose memmem is linear in the worst case as
    CPython's search is (a sender picks both the boundary and the data); None elsewhere, or
    when it does not answer as bytes.find does on a few probes."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        import ctypes

        memmem = ctypes.CDLL(None).memmem
    except (ImportError, OSError, AttributeError, ValueError):  # pragma: no cover - platform
        return None
    memmem.restype = ctypes.c_void_p
    memmem.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)
    cast, void_p, char_p = ctypes.cast, ctypes.c_void_p, ctypes.c_char_p

    def find(buf: bytes, pat: bytes, start: int) -> int:
        # buf is a bytes object (immutable, alive for the call): c_char_p points at its data,
        # without a copy.
        addr = cast(char_p(buf), void_p).value
        assert addr is not None
        hit = memmem(addr + start, len(buf) - start, pat, len(pat))
        return -1 if hit is None else hit - addr

    probe = b"ab\n--x\n--xy-" * 50
    for pat, start in ((b"\n--xy", 0), (b"\n--xy", 13), (b"\n--xz", 0), (b"b", 590)):
        if find(probe, pat, start) != probe.find(pat, start):  # pragma: no cover
            return None
    return find


_MEMMEM = _load_memmem()


def _find(buf: bytes, pat: bytes, start: int) -> int:
    """buf.find(pat, start) for a non-empty `pat`, through memmem for a large bytes `buf`."""
    if _MEMMEM is not None and type(buf) is bytes and len(buf) - start >= MEMMEM_MIN \
            and start >= 0:
        return _MEMMEM(buf, pat, start)
    return buf.find(pat, start)


class MultipartError(ValueError):
    """A multipart message that cannot be accepted; `http_status` is 400 or 413."""

    def __init__(self, reason: str, http_status: int = 400):
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


# --- Content-Type -------------------------------------------------------------------------

def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type value into (lower-case media type, {lower-case name: value}).

    Parameter values may be tokens or quoted strings (with backslash escapes, and containing
    ';' or '='); parameters may come in any order. Malformed pieces are skipped.
    """
    i, n = 0, len(value)
    semi = value.find(";")
    media = (value if semi < 0 else value[:semi]).strip().lower()
    params: dict[str, str] = {}
    i = n if semi < 0 else semi + 1
    while i < n:
        while i < n and value[i] in " \t;":
            i += 1
        start = i
        while i < n and value[i] not in "=;":
            i += 1
        name = value[start:i].strip().lower()
        if i >= n or value[i] == ";":
            continue  # a name without a value: ignore
        i += 1  # '='
        while i < n and value[i] in " \t":
            i += 1
        if i < n and value[i] == '"':
            i += 1
            out: list[str] = []
            while i < n and value[i] != '"':
                if value[i] == "\\" and i + 1 < n:
                    i += 1
                out.append(value[i])
                i += 1
            i += 1  # closing quote (or end)
            val = "".join(out)
            while i < n and value[i] != ";":
                i += 1
        else:
            start = i
            while i < n and value[i] != ";":
                i += 1
            val = value[start:i].strip()
        if name:
            params.setdefault(name, val)
    return media, params


def strip_cid(value: str) -> str:
    """A Content-ID or cid: URL as a bare id: no 'cid:', no angle brackets, no blanks."""
    v = value.strip()
    if v[:4].lower() == "cid:":
        v = v[4:]
    v = v.strip()
    if v.startswith("<") and v.endswith(">"):
        v = v[1:-1].strip()
    return v


def _cid_key(value: str) -> str:
    return unquote(strip_cid(value))


class AttachmentMap(dict[str, Attachment]):
    """Attachments by Content-ID (bare, as the sender wrote it).

    Look-ups (`[]`, `get`, `in`) also accept 'cid:' URLs, angle brackets and the URL-encoded or
    decoded form of the id, as xop:Include hrefs are URLs (RFC 2392) while Content-ID headers
    are not.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._index: dict[str, str] = {_cid_key(k): k for k in self}

    def __setitem__(self, key: str, value: Attachment) -> None:
        super().__setitem__(key, value)
        self._index[_cid_key(key)] = key

    def __delitem__(self, key: str) -> None:
        real = self._real_key(key)
        if real is None:
            raise KeyError(key)
        super().__delitem__(real)
        self._index.pop(_cid_key(real), None)

    def _real_key(self, key: object) -> str | None:
        if not isinstance(key, str):
            return None
        if dict.__contains__(self, key):
            return key
        for cand in (strip_cid(key), _cid_key(key), quote(_cid_key(key), safe="@.-_~!$&'()*+,;=:")):
            if dict.__contains__(self, cand):
                return cand
        return self._index.get(_cid_key(key))

    def __missing__(self, key: str) -> Attachment:
        real = self._real_key(key)
        if real is None:
            raise KeyError(key)
        return dict.__getitem__(self, real)

    def __contains__(self, key: object) -> bool:
        return self._real_key(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        real = self._real_key(key)
        return default if real is None else dict.__getitem__(self, real)


def resolve_cid(attachments: Mapping[str, Attachment], href: str) -> Attachment | None:
    """The attachment an xop:Include href ('cid:...') points to, or None."""
    if isinstance(attachments, AttachmentMap):
        return attachments.get(href)
    want = _cid_key(href)
    for key, att in attachments.items():
        if key == href or _cid_key(key) == want:
            return att
    return None


# --- Part sinks -----------------------------------------------------------------------------

class _Sink(Protocol):
    @property
    def size(self) -> int: ...

    def write(self, data: bytes | memoryview) -> None: ...

    def close(self) -> None: ...


class _MemorySink:
    def __init__(self, limit: int, what: str):
        self.buf = bytearray()
        self.limit = limit
        self.what = what
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise MultipartError(f"{self.what} exceeds max_envelope_bytes ({self.limit})", 413)
        self.buf += data

    def close(self) -> None:
        pass


class _FileSink:
    """Writes a part to a new file through its descriptor (no Python file object, no fstat);
    with `sha1`, hashes the bytes as it writes; with `writeback`, starts the kernel's
    writeback of each WRITEBACK_STEP bytes written."""

    def __init__(self, path: Path, *, sha1: bool = False, writeback: bool = False):
        self.path = path
        # As open(path, "xb"): created, never an existing file; not inherited.
        self.fd: int | None = os.open(path, _CREATE_FLAGS, 0o666)
        self.size = 0
        self.digest = hashlib.sha1(usedforsecurity=False) if sha1 else None
        self.flushed: int | None = 0 if writeback and _FADVISE is not None else None

    @property
    def sha1(self) -> str | None:
        return None if self.digest is None else self.digest.hexdigest()

    def write(self, data: bytes | memoryview) -> None:
        assert self.fd is not None
        size = len(data)
        self.size += size
        if self.digest is not None:
            self.digest.update(data)
        written = os.write(self.fd, data)
        if written < size:  # a short write (rare on a regular file): write the rest
            view = memoryview(data)[written:]
            while view:
                view = view[os.write(self.fd, view):]
        if self.flushed is not None and self.size - self.flushed >= WRITEBACK_STEP:
            self._writeback()

    def _writeback(self) -> None:
        assert self.fd is not None and self.flushed is not None and _FADVISE is not None
        try:
            _FADVISE(self.fd, self.flushed, self.size - self.flushed, os.POSIX_FADV_DONTNEED)
        except OSError:
            self.flushed = None  # not supported here: never mind, fsync does it all later
        else:
            self.flushed = self.size

    def close(self) -> None:
        if self.fd is not None:
            try:
                if self.flushed is not None and self.size > self.flushed:
                    self._writeback()
            finally:
                os.close(self.fd)
                self.fd = None


class _NullSink:
    def __init__(self, limit: int, what: str):
        self.size = 0
        self.limit = limit
        self.what = what

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise MultipartError(self.what)

    def close(self) -> None:
        pass


class _Base64Sink:
    """Decodes base64 as it streams and writes the bytes to another sink.

    Valid base64 decodes the same however it is cut; malformed text (a pad mid-part, stray
    characters) is decoded leniently per piece, so its outcome depends on where the pieces
    end: the parser cuts a base64 part's pieces where the reads end (`read_cuts`)."""

    _STRIP = b" \t\r\n"

    def __init__(self, inner: _Sink):
        self.inner = inner
        self.pending = b""

    @property
    def size(self) -> int:
        return self.inner.size

    def write(self, data: bytes | memoryview) -> None:
        text = self.pending + bytes(data).translate(None, self._STRIP)
        n = len(text) // 4 * 4
        self.pending = text[n:]
        if n:
            self.inner.write(self._decode(text[:n]))

    def close(self) -> None:
        if self.pending:
            rest = self.pending + b"=" * (-len(self.pending) % 4)
            self.pending = b""
            self.inner.write(self._decode(rest))
        self.inner.close()

    @staticmethod
    def _decode(text: bytes) -> bytes:
        try:
            return binascii.a2b_base64(text, strict_mode=False)
        except binascii.Error as exc:
            raise MultipartError(f"invalid base64 in a MIME part: {exc}") from None


# --- The parser -----------------------------------------------------------------------------

class _Parser:
    def __init__(self, stream: Readable, boundary: bytes, *, content_length: int | None,
                 max_total_bytes: int, chunk_size: int):
        self.stream = stream
        self.remaining = content_length
        self.max_total = max_total_bytes
        self.chunk = max(chunk_size, 1)
        self.total = 0
        self.eof = False
        # The opening delimiter may start the body: a virtual CRLF before it lets one pattern
        # ("\n--" boundary) find every delimiter.
        self.buf = b"\r\n"
        self.pos = 0  # bytes of buf before pos are consumed
        self.delim = b"\n--" + boundary

    def _read(self) -> bytes:
        """The next block of input (b"" at its end), counted against the limits."""
        if self.eof:
            return b""
        want = self.chunk if self.remaining is None else min(self.chunk, self.remaining)
        if want <= 0:
            self.eof = True
            return b""
        try:
            data = self.stream.read(want)
        except OSError as exc:
            raise MultipartError(f"could not read the request body: {exc}") from None
        if not data:
            self.eof = True
            if self.remaining:
                raise MultipartError(
                    f"request body truncated: {self.remaining} bytes short of Content-Length")
            return b""
        self.total += len(data)
        if self.total > self.max_total:
            raise MultipartError(f"request body exceeds max_request_bytes ({self.max_total})",
                                 413)
        if self.remaining is not None:
            self.remaining -= len(data)
        return data

    def fill(self) -> bool:
        """Read more input into the buffer (dropping what was consumed before `pos`); False
        at the end of the input. Positions relative to `pos` stay valid."""
        data = self._read()
        if not data:
            return False
        buf, pos = self.buf, self.pos
        if pos >= len(buf):
            self.buf = data
        elif pos == 0:
            self.buf = buf + data
        else:
            self.buf = buf[pos:] + data
        self.pos = 0
        return True

    def _refill_scan(self) -> bytes | None:
        """`fill()` for `scan_part` once the buffer holds only a tail that may begin a
        delimiter: when no delimiter starts in that tail or at the new block's first byte
        (the tail plus the block's first delimiter-length bytes tell), the tail is returned
        (part data, for the caller to pass on) and the block becomes the buffer as it is,
        without copying it behind the tail (each block of a large part would otherwise be
        copied once more). Returns b"" when the tail stays in the buffer, None at the end of
        the input."""
        data = self._read()
        if not data:
            return None
        tail, pat = self.buf[self.pos:], self.delim
        out = b""
        if tail and len(data) >= len(pat) and pat not in tail + data[:len(pat)]:
            out = tail
            self.buf = data
        else:
            self.buf = tail + data if tail else data
        self.pos = 0
        return out

    def need(self, n: int) -> bool:
        """At least `n` bytes from `pos` in the buffer; False if the input ends first."""
        while len(self.buf) - self.pos < n:
            if not self.fill():
                return False
        return True

    def read_part(self, sink: _Sink,
                  eof_reason: str = "multipart body ends without its closing boundary", *,
                  read_cuts: bool = False) -> bool:
        """Stream bytes up to the next delimiter into `sink`; consume the delimiter line.

        Returns True when the delimiter was the closing one ("--boundary--"). The buffer is
        consumed by moving `pos`, never by copying what follows a delimiter.
        """
        scan = self.scan_part(eof_reason, read_cuts=read_cuts)
        write = sink.write
        while True:
            try:
                piece = next(scan)
            except StopIteration as stop:
                return bool(stop.value)
            write(piece)

    def scan_part(self, eof_reason: str = "multipart body ends without its closing boundary",
                  *, read_cuts: bool = False) -> Generator[bytes | memoryview, None, bool]:
        """`read_part` as a generator: yields the part's bytes (views of the buffer, at most
        about one read block each) and returns True when the delimiter was the closing one.

        The bytes are cut where a delimiter might begin at the end of a read (rarely). With
        `read_cuts` they are cut a delimiter's length before the end of every read instead,
        as they were before: for base64 parts, whose lenient decoding of malformed text
        depends on where the pieces end (see `_Base64Sink`)."""
        pat = self.delim
        plen = len(pat)
        rel = 0  # where to search from, relative to pos
        while True:
            buf, pos = self.buf, self.pos
            idx = _find(buf, pat, pos + rel)
            if idx < 0:
                # Keep back only what may begin a delimiter split across reads (with its
                # CR): usually nothing, so a block goes out whole and the next read becomes
                # the buffer as it is.
                n = len(buf) - plen if read_cuts else _held_back(buf, pos, pat)
                if n > pos:
                    yield memoryview(buf)[pos:n]
                    self.pos = n
                rel = 0
                tail = self._refill_scan()
                if tail is None:
                    raise MultipartError(eof_reason)
                if tail:
                    yield tail
                continue
            r_idx = idx - pos  # positions relative to pos survive need()/fill()
            r_after = r_idx + plen
            self.need(r_after + 2)
            buf, pos = self.buf, self.pos
            after = pos + r_after
            if buf[after:after + 2] == b"--":
                closing, r_nxt = True, r_after + 2
            else:
                closing, rj = False, r_after
                while (self.need(rj + 2) and self.buf[self.pos + rj] in _LWSP
                       and rj - r_after < MAX_PADDING):
                    rj += 1
                buf, pos = self.buf, self.pos
                j = pos + rj
                if buf[j:j + 2] == b"\r\n":
                    r_nxt = rj + 2
                elif buf[j:j + 1] == b"\n":
                    r_nxt = rj + 1
                else:
                    # "--boundary" followed by something else is data, not a delimiter.
                    rel = r_idx + 1
                    continue
            r_end = r_idx - 1 if r_idx > 0 and buf[pos + r_idx - 1] == 0x0D else r_idx
            self.pos = pos + r_nxt
            if r_end > 0:
                yield memoryview(buf)[pos:pos + r_end]
            return closing

    def read_headers(self) -> dict[str, str]:
        """Read one part's header block (up to its blank line), unfolded, names lower-case."""
        searched = 0  # relative to pos
        while True:
            buf, pos = self.buf, self.pos
            if buf.startswith(b"\r\n", pos):
                self.pos = pos + 2
                return {}
            if buf.startswith(b"\n", pos):
                self.pos = pos + 1
                return {}
            window = pos + MAX_HEADER_BLOCK + 3
            # The first blank line, CRLF or LF: an LF-only one is only looked for before
            # the first CRLF one (not through the whole window after it).
            i = buf.find(b"\n\r\n", pos + searched, window)
            lf = buf.find(b"\n\n", pos + searched, window if i < 0 else i + 1)
            if lf >= 0 or i >= 0:
                i, seplen = (lf, 2) if lf >= 0 else (i, 3)
                if i + 1 - pos > MAX_HEADER_BLOCK:
                    raise MultipartError(
                        f"a MIME part header block exceeds {MAX_HEADER_BLOCK} bytes")
                block = buf[pos:i + 1]
                self.pos = i + seplen
                return _parse_header_block(block)
            if len(buf) - pos > MAX_HEADER_BLOCK:
                raise MultipartError(f"a MIME part header block exceeds {MAX_HEADER_BLOCK} bytes")
            searched = max(0, len(buf) - pos - 3)
            if not self.fill():
                raise MultipartError("multipart body ends inside a part's headers")


def _held_back(buf: bytes, start: int, pat: bytes) -> int:
    """Where the end of `buf` that may begin a delimiter `pat` ("\\n--boundary", not found in
    buf) starts, at `start` or later: the first position from which the rest of buf is a
    proper prefix of pat, one earlier when a CR comes before it (the CR of CRLF belongs to the
    delimiter), or a lone CR at the end; len(buf) when no delimiter can begin in buf."""
    n = len(buf)
    k = buf.find(b"\n", max(start, n - len(pat) + 1))
    while k >= 0 and not pat.startswith(buf[k:]):
        k = buf.find(b"\n", k + 1)
    if k < 0:
        k = n
    if k > start and buf[k - 1] == 0x0D:
        k -= 1
    return k


def _parse_header_block(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    last: str | None = None
    for raw in block.decode("latin-1").split("\n"):
        line = raw.rstrip("\r")
        if not line:
            continue
        if line[0] in " \t" and last is not None:
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise MultipartError("a MIME part header line has no ':'")
        last = name.strip().lower()
        if last in headers:
            headers[last] += ", " + value.strip()
        else:
            headers[last] = value.strip()
    return headers


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a multipart Content-Type, validated (RFC 2046: 1 to 70 characters)."""
    _media, params = parse_content_type(content_type)
    boundary = params.get("boundary", "")
    if not boundary:
        raise MultipartError("multipart Content-Type has no boundary parameter")
    if len(boundary) > 200:
        raise MultipartError("multipart boundary is longer than 200 characters")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        raise MultipartError("multipart boundary is not ASCII") from None


def parse_multipart(stream: Readable, content_type: str, spool_dir: Path, *,
                    max_envelope_bytes: int, max_total_bytes: int,
                    content_length: int | None = None,
                    chunk_size: int = DEFAULT_CHUNK, sha1: bool = False,
                    early_writeback: bool = False) -> tuple[bytes, AttachmentMap]:
    """Parse a multipart/related message from `stream` without holding attachments in memory.

    Returns (root part bytes, attachments by Content-ID). The root part is the one whose
    Content-ID is the `start` parameter, else the first part; it is held in memory up to
    `max_envelope_bytes`. Every other part is written to a new file in `spool_dir` (which must
    exist) and described by an `Attachment`. At most `max_total_bytes` are read; with
    `content_length` exactly that many are expected (less is an error), without it the stream
    is read to the closing boundary. With `sha1` each attachment's SHA-1 is computed as it is
    written (`Attachment.sha1`; None without). With `early_writeback` the
    kernel starts writing each part to disk as it arrives (for parts that will be fsynced and
    kept, e.g. ITI-41 documents). Raises `MultipartError` for anything malformed or too big;
    files already written stay in `spool_dir` for the caller to remove.
    """
    root, _root_type, attachments = parse_multipart_ex(
        stream, content_type, spool_dir, max_envelope_bytes=max_envelope_bytes,
        max_total_bytes=max_total_bytes, content_length=content_length, chunk_size=chunk_size,
        sha1=sha1, early_writeback=early_writeback)
    return root, attachments


def parse_multipart_ex(stream: Readable, content_type: str, spool_dir: Path, *,
                       max_envelope_bytes: int, max_total_bytes: int,
                       content_length: int | None = None,
                       chunk_size: int = DEFAULT_CHUNK, sha1: bool = False,
                       early_writeback: bool = False) -> tuple[bytes, str, AttachmentMap]:
    """`parse_multipart`, also returning the root part's Content-Type (second item)."""
    root: RootPart | None = None
    attachments = AttachmentMap()
    for item in iter_multipart(stream, content_type, spool_dir,
                               max_envelope_bytes=max_envelope_bytes,
                               max_total_bytes=max_total_bytes, content_length=content_length,
                               chunk_size=chunk_size, sha1=sha1,
                               early_writeback=early_writeback):
        if isinstance(item, RootPart):
            root = item
        else:
            attachments[item.content_id] = item
    assert root is not None  # iter_multipart raises without one
    return root.data, root.content_type, attachments


@dataclass(frozen=True)
class RootPart:
    """The root part of a multipart message (the SOAP envelope), as `iter_multipart` yields
    it once its closing delimiter has been read."""

    data: bytes
    content_type: str


def iter_multipart(stream: Readable, content_type: str, spool_dir: Path, *,
                   max_envelope_bytes: int, max_total_bytes: int,
                   content_length: int | None = None,
                   chunk_size: int = DEFAULT_CHUNK, sha1: bool = False,
                   early_writeback: bool = False) -> Iterator[RootPart | Attachment]:
    """The parts of a multipart/related message, each yielded as soon as its closing
    delimiter has been read: the root part (the `start` one, else the first; in memory, at
    most `max_envelope_bytes`) as a `RootPart` wherever it comes, every other part with a
    Content-ID as an `Attachment` whose file in `spool_dir` is complete (a part without a
    Content-ID is dropped: nothing can reference it). Same limits and errors as
    `parse_multipart`; `MultipartError` is raised when the message ends before its closing
    boundary (a part cut mid-way) and, after the last part, when no root part came. Files
    already written stay in `spool_dir` for the caller to remove (also when the generator is
    closed early: the part being written is closed, not removed)."""
    for item in _iter_parts(stream, content_type, spool_dir,
                            max_envelope_bytes=max_envelope_bytes,
                            max_total_bytes=max_total_bytes, content_length=content_length,
                            chunk_size=chunk_size, sha1=sha1, early_writeback=early_writeback,
                            pipe_after_root=False):
        assert not isinstance(item, PartStream)
        yield item


def iter_multipart_piped(stream: Readable, content_type: str, spool_dir: Path, *,
                         max_envelope_bytes: int, max_total_bytes: int,
                         content_length: int | None = None,
                         chunk_size: int = DEFAULT_CHUNK
                         ) -> Iterator[RootPart | Attachment | PartStream]:
    """`iter_multipart`, except that every part with a Content-ID that comes AFTER the root
    part is not spooled: it is yielded as a `PartStream` as soon as its headers are read,
    whose `chunks` hand over its bytes as they arrive (exactly as received; base64 decoded),
    without a file and without holding the part in memory (each chunk at most about
    `chunk_size` bytes plus a delimiter's length). Parts before the root are spooled to
    `spool_dir` as `Attachment`s, as `iter_multipart` does.

    A `PartStream`'s chunks must be read before the next part is asked for: asking for the
    next part reads (and drops) what the consumer left of the current one, and reading its
    chunks after that raises RuntimeError. A part cut mid-way raises `MultipartError` from
    its chunks (and from the next request for a part); the limits are those of
    `iter_multipart` (`max_total_bytes` for the whole message)."""
    return _iter_parts(stream, content_type, spool_dir, max_envelope_bytes=max_envelope_bytes,
                       max_total_bytes=max_total_bytes, content_length=content_length,
                       chunk_size=chunk_size, sha1=False, early_writeback=False,
                       pipe_after_root=True)


class PartChunks:
    """The bytes of one MIME part, read from the parser as they are asked for (the
    iterator of `PartStream.chunks`): small pieces (the tail a read kept back in case it
    began a delimiter) are joined to the next, so every chunk but a part's last is at least
    `MIN_PIPED_CHUNK` bytes (or the part's rest)."""

    def __init__(self, parser: _Parser, base64: bool):
        self._scan = parser.scan_part(read_cuts=base64)
        self._b64: _Base64Sink | None = None
        self._decoded: _ListSink | None = None
        if base64:
            self._decoded = _ListSink()
            self._b64 = _Base64Sink(self._decoded)
        self.done = False  # the part's closing delimiter has been read
        self.closing = False  # ... and it was the message's closing one
        self.dropped = False  # the parser moved on to the next part
        self.size = 0  # bytes handed over

    def __iter__(self) -> PartChunks:
        return self

    def __next__(self) -> bytes:
        if self.dropped:
            raise RuntimeError("a MIME part's chunks read after the next part was asked for")
        held: list[bytes | memoryview] = []
        length = 0
        while not self.done and length < MIN_PIPED_CHUNK:
            try:
                piece: bytes | memoryview = next(self._scan)
            except StopIteration as stop:
                self.done, self.closing = True, bool(stop.value)
                if self._b64 is not None:
                    assert self._decoded is not None
                    self._b64.close()
                    piece = self._decoded.take()
                    held.append(piece)
                    length += len(piece)
                break
            if self._b64 is not None:
                assert self._decoded is not None
                self._b64.write(piece)
                piece = self._decoded.take()
            held.append(piece)
            length += len(piece)
        if not length:
            raise StopIteration
        self.size += length
        return bytes(held[0]) if len(held) == 1 else b"".join(held)

    def drain(self) -> bool:
        """Read what is left of the part (dropped); whether its delimiter was the closing
        one. Later reads of the chunks raise RuntimeError."""
        while not self.done:
            try:
                piece = next(self._scan)
            except StopIteration as stop:
                self.done, self.closing = True, bool(stop.value)
                break
            if self._b64 is not None:
                self._b64.write(piece)  # still validated
                assert self._decoded is not None
                self._decoded.take()
        self.dropped = True
        return self.closing


class _ListSink:
    """Collects what a `_Base64Sink` decodes, for `PartChunks` to take."""

    def __init__(self) -> None:
        self.size = 0
        self._out: list[bytes] = []

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        self._out.append(bytes(data))

    def take(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class PartStream:
    """An attachment part handed over while it arrives (`iter_multipart_piped`): its
    Content-ID (bare), Content-Type and its bytes (`chunks`, an iterator to read before
    asking for the next part)."""

    content_id: str
    content_type: str
    chunks: PartChunks


def _iter_parts(stream: Readable, content_type: str, spool_dir: Path, *,
                max_envelope_bytes: int, max_total_bytes: int, content_length: int | None,
                chunk_size: int, sha1: bool, early_writeback: bool, pipe_after_root: bool
                ) -> Iterator[RootPart | Attachment | PartStream]:
    media, params = parse_content_type(content_type)
    if not media.startswith("multipart/"):
        raise MultipartError(f"not a multipart message: {media or 'no Content-Type'}", 415)
    boundary = multipart_boundary(content_type)
    start = strip_cid(params.get("start", ""))
    start_key = unquote(start)
    if content_length is not None and content_length > max_total_bytes:
        raise MultipartError(f"request body exceeds max_request_bytes ({max_total_bytes})", 413)
    parser = _Parser(stream, boundary, content_length=content_length,
                     max_total_bytes=max_total_bytes, chunk_size=chunk_size)

    # Preamble (normally empty) up to the opening delimiter.
    if parser.read_part(_NullSink(MAX_PREAMBLE, "no opening multipart boundary found"),
                        "no multipart boundary found in the body"):
        raise MultipartError("multipart body has no parts")

    have_root = False
    seen: set[str] = set()
    count = 0
    closed = False
    while not closed:
        count += 1
        if count > MAX_PARTS:
            raise MultipartError(f"multipart body has more than {MAX_PARTS} parts")
        headers = parser.read_headers()
        cid = strip_cid(headers.get("content-id", ""))
        ctype = headers.get("content-type", "").strip() or "application/octet-stream"
        cte = headers.get("content-transfer-encoding", "binary").strip().lower()
        if cte not in ("binary", "8bit", "7bit", "base64"):
            raise MultipartError(f"unsupported Content-Transfer-Encoding: {cte[:40]}")
        is_root = not have_root and ((not start and count == 1) or
                                     (bool(start) and (cid == start or unquote(cid) == start_key)))
        if not is_root and cid and (cid in seen or _cid_key(cid) in seen):
            raise MultipartError(f"duplicate Content-ID in multipart body: <{cid[:200]}>")
        if pipe_after_root and have_root and cid:
            seen.update((cid, _cid_key(cid)))
            chunks = PartChunks(parser, cte == "base64")
            yield PartStream(cid, ctype, chunks)
            closed = chunks.drain()
            continue
        sink: _Sink
        file_sink: _FileSink | None = None
        if is_root:
            mem = _MemorySink(max_envelope_bytes, "the root part (SOAP envelope)")
            sink = mem
        elif pipe_after_root and have_root:  # no Content-ID: nothing can reference it
            sink = _NullSink(max_total_bytes, "a MIME part exceeds max_request_bytes")
        else:
            file_sink = _FileSink(spool_dir / f"part-{count:05d}.bin", sha1=sha1,
                                  writeback=early_writeback)
            sink = file_sink
        if cte == "base64":
            sink = _Base64Sink(sink)
        try:
            closed = parser.read_part(sink, read_cuts=cte == "base64")
        finally:
            sink.close()
        if is_root:
            have_root = True
            yield RootPart(bytes(mem.buf), ctype)
        elif file_sink is not None:
            if cid:
                seen.update((cid, _cid_key(cid)))
                yield Attachment(cid, file_sink.path, file_sink.size, ctype,
                                 sha1=file_sink.sha1)
            else:  # a part nothing can reference
                os.unlink(file_sink.path)
    if content_length is not None:
        # Read (and drop) any epilogue up to Content-Length: a short body is an error, and the
        # connection is left at the end of this request.
        parser.buf, parser.pos = b"", 0
        while parser.fill():
            parser.buf, parser.pos = b"", 0
    if not have_root:
        raise MultipartError(
            f"the root part <{start[:200]}> named by the start parameter is missing"
            if start else "multipart body has no root part")


def iter_file(path: Path, size: int, chunk_size: int, offset: int | None = None
              ) -> Iterator[bytes]:
    """Exactly `size` bytes of the file at `path` (from `offset`, or its start), in chunks;
    an error if it is shorter."""
    with open(path, "rb", buffering=0) as f:
        if offset:
            f.seek(offset)
        left = size
        while left > 0:
            data = f.read(min(chunk_size, left))
            if not data:
                raise OSError(f"{path.name} shrank while being sent ({left} bytes missing)")
            left -= len(data)
            yield data
