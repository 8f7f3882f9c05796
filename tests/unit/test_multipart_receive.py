"""The multipart parser's receive path at large reads (the client's): the delimiter search
through memmem (`_find`, the same answers as bytes.find), what a read keeps back for a
delimiter split across reads (`_held_back`), parts cut exactly wherever a delimiter falls
against a read's end, one piece (one write) per read block, base64 parts still cut where the
reads end, the header block's end found as before, the spool file written whole on short
writes, and SoapClient.call reading a reply in RECEIVE_CHUNK blocks."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

import gateway.soap.multipart as multipart
from gateway.soap.client import RECEIVE_CHUNK, SoapClient
from gateway.soap.multipart import (
    DEFAULT_CHUNK,
    MultipartError,
    _FileSink,
    _find,
    _held_back,
    _Parser,
    parse_multipart,
)
from tests.unit.test_mtom import ENVELOPE, MB, Trickle, att_headers, build, ctype_for, root_headers

PAT = b"\n--b0und"  # the parser's delimiter pattern for the boundary of ctype_for()
# Bytes that look like the start of a delimiter, a CR, or a delimiter followed by junk.
# (None of them, nor two in a row, makes a delimiter.)
TRICKY = [b"\r", b"\n", b"\r\n", b"\r\n-", b"\r\n--", b"\r\n--b0u", b"\r\n--b0un", b"\n--b0un",
          b"\r\n--b0undX", b"\r\r\n--b0", b"x"]


@pytest.fixture(params=["memmem", "bytes.find"])
def search(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the memmem search on every search (when this libc has it) and with
    bytes.find only."""
    if request.param == "memmem":
        if multipart._MEMMEM is None:
            pytest.skip("no memmem here")
        monkeypatch.setattr(multipart, "MEMMEM_MIN", 0)
    else:
        monkeypatch.setattr(multipart, "_MEMMEM", None)
    return str(request.param)


# --- the search -------------------------------------------------------------------------------

def test_find_answers_as_bytes_find(search: str) -> None:
    rnd = random.Random(5)
    pats = [PAT, b"\n--MIMEBoundary_" + b"ab" * 16, b"\n--aaaa", b"\n-"]
    for _ in range(300):
        pat = rnd.choice(pats)
        pieces = [rnd.choice([pat, pat[:rnd.randint(1, len(pat) - 1)], b"\r\n",
                              rnd.randbytes(rnd.randint(0, 50)), b"a" * rnd.randint(0, 9)])
                  for _ in range(rnd.randint(0, 12))]
        buf = b"".join(pieces)
        for start in {0, 1, len(buf) // 2, max(0, len(buf) - len(pat)), len(buf) - 1,
                      len(buf), rnd.randint(0, len(buf))}:
            if start >= 0:
                assert _find(buf, pat, start) == buf.find(pat, start), (buf, pat, start)


def test_find_falls_back_for_other_buffers_and_ends(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setattr(multipart, "MEMMEM_MIN", 0)
    class Sub(bytes):
        pass

    data = b"x" * 100 + PAT + b"y"
    assert _find(Sub(data), PAT, 0) == 100
    assert _find(data, PAT, 101) == -1
    assert _find(data, PAT, len(data)) == -1


def test_memmem_is_used_on_large_blocks() -> None:
    if multipart._MEMMEM is None:
        pytest.skip("no memmem here")
    calls: list[int] = []
    real = multipart._MEMMEM

    def counting(buf: bytes, pat: bytes, start: int) -> int:
        calls.append(len(buf) - start)
        return real(buf, pat, start)

    data = os.urandom(3 * multipart.MEMMEM_MIN)
    wire = build([(root_headers(), ENVELOPE), (att_headers("a@t"), data)])
    mp = pytest.MonkeyPatch()
    mp.setattr(multipart, "_MEMMEM", counting)
    try:
        with io.BytesIO(wire) as stream:
            parser = _Parser(stream, b"b0und", content_length=None, max_total_bytes=MB,
                             chunk_size=4 * multipart.MEMMEM_MIN)
            parser.read_headers()  # (reads the first block)
            assert parser.fill()
            assert _find(parser.buf, PAT, parser.pos) > 0
    finally:
        mp.undo()
    assert calls and all(n >= multipart.MEMMEM_MIN for n in calls)


# --- what a read keeps back -------------------------------------------------------------------

def held_back_by_definition(buf: bytes, start: int, pat: bytes) -> int:
    """The first position from `start` at which the rest of buf is a proper prefix of pat
    (len(buf) when none), one earlier when a CR precedes it."""
    k = next((p for p in range(start, len(buf)) if pat.startswith(buf[p:])), len(buf))
    return k - 1 if k > start and buf[k - 1] == 0x0D else k


def test_held_back_is_what_may_begin_a_delimiter() -> None:
    rnd = random.Random(11)
    for _ in range(3000):
        buf = b"".join(rnd.choice([*TRICKY, rnd.randbytes(rnd.randint(0, 12))])
                       for _ in range(rnd.randint(0, 6)))
        if PAT in buf:
            continue
        start = rnd.randint(0, len(buf))
        assert _held_back(buf, start, PAT) == held_back_by_definition(buf, start, PAT), \
            (buf, start)
    assert _held_back(b"abc", 0, PAT) == 3  # nothing kept back
    assert _held_back(b"abc\r", 0, PAT) == 3  # a CR that may precede a delimiter
    assert _held_back(b"abc\r\n--b0u", 0, PAT) == 3  # CR + the start of a delimiter
    assert _held_back(b"\n--b0u", 2, PAT) == 6  # only from start on


# --- parts cut exactly at large reads ---------------------------------------------------------

@pytest.mark.parametrize("cr", [True, False])
def test_parts_exact_wherever_a_delimiter_falls_against_a_read_end(
        tmp_path: Path, search: str, cr: bool) -> None:
    """Reads of 20 KiB (memmem searches them); the first attachment's length is swept so
    that its closing delimiter (CRLF or LF only) and the tricky bytes before it fall at every
    offset around the end of a read, and one read may end inside it."""
    chunk = 20 * 1024
    nl = b"\r\n" if cr else b"\n"
    head = build([(root_headers(), ENVELOPE), (att_headers("a@t"), b"")], close=False, nl=nl)
    head = head[:-len(nl)]  # up to the start of a@t's (here empty) data
    rnd = random.Random(3)
    for offset in range(-len(PAT) - 4, 6):
        tail = rnd.choice(TRICKY)
        length = 2 * chunk - len(head) + offset
        data = (bytes(rnd.randrange(256) for _ in range(64)) * (length // 64 + 1))[:length]
        data = (data[:-len(tail)] + tail) if len(tail) <= len(data) else data
        other = rnd.choice(TRICKY) * 50
        wire = head + data + nl + b"--b0und" + nl + b"Content-ID: <b@t>" + nl + nl + other \
            + nl + b"--b0und--" + nl
        spool = tmp_path / f"{offset}"
        spool.mkdir()
        root, got = parse_multipart(io.BytesIO(wire), ctype_for(), spool,
                                    max_envelope_bytes=MB, max_total_bytes=MB,
                                    chunk_size=chunk)
        assert root == ENVELOPE
        # (before an LF-only delimiter, a CR ending the data is taken as the delimiter's)
        expected = data[:-1] if not cr and data.endswith(b"\r") else data
        assert got["a@t"].path.read_bytes() == expected, offset
        assert got["b@t"].path.read_bytes() == other, offset


def test_random_messages_exact_at_large_and_odd_reads(tmp_path: Path, search: str) -> None:
    rnd = random.Random(8)
    for n in range(25):
        parts = [(att_headers(f"p{i}@t"),
                  b"".join(rnd.choice([*TRICKY, os.urandom(rnd.randint(0, 30_000))])
                           for _ in range(rnd.randint(0, 8))))
                 for i in range(rnd.randint(1, 5))]
        wire = build([(root_headers(), ENVELOPE), *parts])
        spool = tmp_path / f"m{n}"
        spool.mkdir()
        sizes = [rnd.choice([17 * 1024, 40_000, 65_536, 1 << 20]) for _ in range(50)]
        root, got = parse_multipart(Trickle(wire, iter(sizes * 100)), ctype_for(), spool,
                                    max_envelope_bytes=MB, max_total_bytes=4 * MB,
                                    chunk_size=rnd.choice([20_000, 64 * 1024, 1 << 20]))
        assert root == ENVELOPE
        for i, (_h, body) in enumerate(parts):
            assert got[f"p{i}@t"].path.read_bytes() == body, (n, i)


class ListSink:
    def __init__(self) -> None:
        self.size = 0
        self.pieces: list[bytes] = []

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        self.pieces.append(bytes(data))

    def close(self) -> None:
        pass


def part_pieces(wire: bytes, chunk: int, *, read_cuts: bool = False, index: int = 0
                ) -> list[bytes]:
    """The pieces part `index` of `wire` reaches its sink in, read in `chunk` blocks."""
    parser = _Parser(io.BytesIO(wire), b"b0und", content_length=None, max_total_bytes=MB,
                     chunk_size=chunk)
    assert not parser.read_part(ListSink())  # the (empty) preamble
    for _ in range(index):
        parser.read_headers()
        parser.read_part(ListSink())
    parser.read_headers()
    sink = ListSink()
    parser.read_part(sink, read_cuts=read_cuts)
    return sink.pieces


def test_a_read_block_goes_out_in_one_piece() -> None:
    """Data with no LF or CR near the end of a read: each read block reaches the sink (and
    the spool file) whole, not as the block less a delimiter's length plus that tail."""
    chunk = 4096
    data = b"x" * (10 * chunk)
    wire = build([(att_headers("a@t"), data)])
    pieces = part_pieces(wire, chunk)
    assert b"".join(pieces) == data
    assert len(pieces) == 11  # one per read it spans
    assert all(len(p) >= chunk - 200 for p in pieces[1:-1])


def decode_pieces(pieces: list[bytes]) -> bytes:
    out = ListSink()
    b64 = multipart._Base64Sink(out)
    for piece in pieces:
        b64.write(piece)
    b64.close()
    return b"".join(out.pieces)


def test_base64_parts_are_still_cut_where_the_reads_end(tmp_path: Path) -> None:
    """read_cuts: the pieces end a delimiter's length before each read's end, as before this
    receive path, so the lenient decoding of malformed base64 gives what it gave."""
    chunk = 4096
    data = b"QUFB" * 5000
    pieces = part_pieces(build([(att_headers("a@t"), data)]), chunk, read_cuts=True)
    assert b"".join(pieces) == data
    header_end = build([(att_headers("a@t"), data)]).index(b"\r\n\r\n") + 4
    # The first piece ends len(PAT) bytes (the tail kept back) before the first read's end;
    # that tail goes out alone, then the next read's block less its own tail.
    assert len(pieces[0]) == chunk - header_end - len(PAT)
    assert pieces[1] == data[len(pieces[0]):len(pieces[0]) + len(PAT)]
    assert len(pieces[2]) == chunk - len(PAT)

    malformed = b"YQ==QUFB" * 3000  # a pad mid-part: decoded leniently, piece by piece
    wire = build([(root_headers(), ENVELOPE), (att_headers("b@t", cte="base64"), malformed)])
    old = decode_pieces(part_pieces(wire, chunk, read_cuts=True, index=1))
    assert old != decode_pieces(part_pieces(wire, chunk, index=1))  # the cuts matter here
    _root, got = parse_multipart(io.BytesIO(wire), ctype_for(), tmp_path,
                                 max_envelope_bytes=MB, max_total_bytes=MB, chunk_size=chunk)
    assert got["b@t"].path.read_bytes() == old


# --- header blocks ----------------------------------------------------------------------------

@pytest.mark.parametrize(("block", "body"), [
    (b"Content-ID: <a@t>\r\n\r\n", b"\n\nbody\n\n"),  # CRLF blank line; LF LF in the data
    (b"Content-ID: <a@t>\n\n", b"\r\nbody"),  # LF blank line, a CRLF right after it
    (b"Content-ID: <a@t>\n\n", b"x\r\n\r\ny"),
    (b"Content-ID: <a@t>\r\nX-A: 1\n\n", b"\r\n\r\n"),  # mixed: the first blank line wins
])
def test_header_block_ends_at_its_first_blank_line(tmp_path: Path, block: bytes,
                                                   body: bytes) -> None:
    wire = (b"--b0und\r\n" + b"Content-ID: <root@test>\r\n\r\n" + ENVELOPE + b"\r\n--b0und\r\n"
            + block + body + b"\r\n--b0und--\r\n")
    for chunk in (1, 5, 64, 4096):
        spool = tmp_path / f"c{chunk}"
        spool.mkdir()
        root, got = parse_multipart(io.BytesIO(wire), ctype_for(), spool,
                                    max_envelope_bytes=MB, max_total_bytes=MB,
                                    chunk_size=chunk)
        assert root == ENVELOPE
        assert got["a@t"].path.read_bytes() == body, chunk


def test_header_block_limit_unchanged(tmp_path: Path) -> None:
    big = b"X-Pad: " + b"a" * (multipart.MAX_HEADER_BLOCK - 9) + b"\r\n"  # block = the limit
    for extra, ok in ((b"", True), (b"b", False)):
        wire = build([(root_headers(), ENVELOPE)], close=False) + b"--b0und\r\n" + big[:-2] \
            + extra + b"\r\n\r\ndata\r\n--b0und--\r\n"
        spool = tmp_path / f"e{len(extra)}"
        spool.mkdir()
        if ok:
            parse_multipart(io.BytesIO(wire), ctype_for(), spool, max_envelope_bytes=MB,
                            max_total_bytes=MB)
        else:
            with pytest.raises(MultipartError, match="header block exceeds"):
                parse_multipart(io.BytesIO(wire), ctype_for(), spool, max_envelope_bytes=MB,
                                max_total_bytes=MB)


# --- the spool file ---------------------------------------------------------------------------

def test_file_sink_writes_everything_on_short_writes(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls: list[int] = []

    def short_write(fd: int, data: Any) -> int:
        calls.append(len(data))
        return real_write(fd, memoryview(data)[:777])

    data = os.urandom(50_000)
    sink = _FileSink(tmp_path / "p.bin")
    monkeypatch.setattr(os, "write", short_write)
    sink.write(data[:30_000])
    sink.write(memoryview(data)[30_000:])
    monkeypatch.undo()
    sink.close()
    assert (tmp_path / "p.bin").read_bytes() == data
    assert sink.size == len(data) and len(calls) > 60


def test_file_sink_creates_never_overwrites_and_closes(tmp_path: Path) -> None:
    (tmp_path / "taken.bin").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        _FileSink(tmp_path / "taken.bin")
    assert (tmp_path / "taken.bin").read_bytes() == b"keep"
    sink = _FileSink(tmp_path / "new.bin", sha1=True)
    fd = sink.fd
    assert fd is not None and not os.get_inheritable(fd)
    sink.write(b"abc")
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(OSError):
        os.fstat(fd)
    assert sink.sha1 == "a9993e364706816aba3e25717850c26c9cd0d89d"


# --- the client -------------------------------------------------------------------------------

class _Raw:
    """A response body that records the sizes the parser asks for."""

    def __init__(self, data: bytes):
        self.stream = io.BytesIO(data)
        self.asked: list[int] = []
        self.decode_content = False

    def read(self, size: int = -1, decode_content: bool | None = None) -> bytes:
        self.asked.append(size)
        return self.stream.read(size)


class _Response:
    def __init__(self, ctype: str, data: bytes):
        self.status_code = 200
        self.headers = {"Content-Type": ctype}
        self.raw = _Raw(data)


def test_client_reads_a_multipart_reply_in_receive_chunks(tmp_path: Path) -> None:
    assert RECEIVE_CHUNK > DEFAULT_CHUNK
    data = os.urandom(3 * RECEIVE_CHUNK + 12345)
    env = (b'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body><r/>'
           b"</s:Body></s:Envelope>")
    wire = build([(root_headers(), env), (att_headers("a@t"), data)])
    resp = _Response(ctype_for(), wire)
    client = SoapClient("https://127.0.0.1:1", ca_bundle=None, certificate=None,
                        private_key=None)
    try:
        reply = client._reply(resp, tmp_path)  # type: ignore[arg-type]
    finally:
        client.close()
    assert reply.attachments["a@t"].path.read_bytes() == data
    assert reply.body is not None and etree.QName(reply.body).localname == "r"
    assert resp.raw.decode_content is True
    assert max(resp.raw.asked) == RECEIVE_CHUNK
    assert len(resp.raw.asked) <= len(wire) // RECEIVE_CHUNK + 2
