"""MTOM/XOP: outbound framing, the streaming multipart parser, and the WSGI middleware."""

from __future__ import annotations

import io
import itertools
import os
import random
import tracemalloc
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest

from gateway.ebrim.xmlsafe import parse_xml
from gateway.ns import SOAP12, XOP
from gateway.soap.faults import CONTENT_TYPE as FAULT_CONTENT_TYPE
from gateway.soap.faults import fault_envelope
from gateway.soap.mtom import (
    ROOT_CONTENT_ID,
    MtomMiddleware,
    mtom_response,
)
from gateway.soap.multipart import (
    MAX_HEADER_BLOCK,
    MAX_PARTS,
    AttachmentMap,
    MultipartError,
    parse_content_type,
    parse_multipart,
    parse_multipart_ex,
    resolve_cid,
)
from gateway.transactions import Attachment
from tests.support.streams import GeneratedStream

ENVELOPE = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope"><env:Body>'
    b'<r xmlns:xop="http://www.w3.org/2004/08/xop/include">'
    b'<d><xop:Include href="cid:doc1@test"/></d></r></env:Body></env:Envelope>'
)
MB = 1024 * 1024
WIRE = Path("messages/iti-41/nist/wire")


# --- helpers --------------------------------------------------------------------------------

class Trickle(io.RawIOBase):
    """A stream that returns short reads of varying sizes (splits every marker somewhere)."""

    def __init__(self, data: bytes, sizes: Iterable[int]):
        self.data = memoryview(data)
        self.pos = 0
        self.sizes = iter(sizes)

    def read(self, n: int = -1) -> bytes:
        step = next(self.sizes)
        take = step if n < 0 else min(n, step)
        out = bytes(self.data[self.pos:self.pos + take])
        self.pos += len(out)
        return out


def build(parts: list[tuple[dict[str, str], bytes]], boundary: str = "b0und",
          *, close: bool = True, nl: bytes = b"\r\n") -> bytes:
    out = bytearray()
    for headers, body in parts:
        out += b"--" + boundary.encode() + nl
        for k, v in headers.items():
            out += f"{k}: {v}".encode() + nl
        out += nl + body + nl
    if close:
        out += b"--" + boundary.encode() + b"--" + nl
    return bytes(out)


def root_headers(cid: str = "root@test", typ: str = "application/soap+xml") -> dict[str, str]:
    return {"Content-Type": f'application/xop+xml; charset=UTF-8; type="{typ}"',
            "Content-Transfer-Encoding": "binary", "Content-ID": f"<{cid}>"}


def att_headers(cid: str, ctype: str = "application/octet-stream",
                cte: str = "binary") -> dict[str, str]:
    return {"Content-Type": ctype, "Content-Transfer-Encoding": cte, "Content-ID": f"<{cid}>"}


def ctype_for(boundary: str = "b0und", start: str = "root@test",
              start_info: str = "application/soap+xml") -> str:
    return (f'multipart/related; boundary="{boundary}"; type="application/xop+xml"; '
            f'start="<{start}>"; start-info="{start_info}"')


def write_files(folder: Path, blobs: dict[str, bytes]) -> list[Attachment]:
    atts = []
    for i, (cid, data) in enumerate(blobs.items()):
        p = folder / f"src{i}"
        p.write_bytes(data)
        atts.append(Attachment(cid, p, len(data), "application/dicom"))
    return atts


def tricky_blobs() -> dict[str, bytes]:
    rnd = random.Random(7)
    return {
        "empty@test": b"",
        "crlf@test": b"\r\n--\r\n--MIMEBoundary_\r\n--MIMEBoundary_" + uuid.uuid4().hex.encode()
                     + b"\r\n\r\n--",
        "cr-end@test": b"ends with a CR\r",
        "random@test": rnd.randbytes(300_000),
        "with space and%20pct@test": b"x" * 5,
    }


# --- Content-Type parameters ----------------------------------------------------------------

def test_content_type_params_any_order_quoted_or_not_case_insensitive() -> None:
    media, p = parse_content_type(
        'Multipart/Related; START-INFO="application/soap+xml"; Boundary=abc_123;'
        ' start="<a;b=c@x>"; TYPE=application/xop+xml; action="urn:a\\"b"')
    assert media == "multipart/related"
    assert p["boundary"] == "abc_123"
    assert p["start"] == "<a;b=c@x>"
    assert p["type"] == "application/xop+xml"
    assert p["start-info"] == "application/soap+xml"
    assert p["action"] == 'urn:a"b'


# --- outbound + parser roundtrip ------------------------------------------------------------

def _roundtrip(tmp_path: Path, out_chunk: int, reader: Any) -> None:
    blobs = tricky_blobs()
    src = tmp_path / "src"
    src.mkdir()
    atts = write_files(src, blobs)
    ctype, length, body = mtom_response(ENVELOPE, atts, soap_action="urn:x:y",
                                        chunk_size=out_chunk)
    wire = b"".join(body)
    assert len(wire) == length
    spool = tmp_path / "spool"
    spool.mkdir()
    root, rtype, got = parse_multipart_ex(reader(wire), ctype, spool, max_envelope_bytes=MB,
                                          max_total_bytes=10 * MB, content_length=length,
                                          chunk_size=4096)
    assert root == ENVELOPE
    assert parse_content_type(rtype)[1]["type"] == "application/soap+xml"
    assert set(got) == set(blobs)
    for cid, data in blobs.items():
        a = got[cid]
        assert a.path.read_bytes() == data
        assert a.size == len(data)
        assert a.content_type == "application/dicom"
        assert a.path.parent == spool


def test_roundtrip_plain(tmp_path: Path) -> None:
    _roundtrip(tmp_path, 256 * 1024, io.BytesIO)


def test_roundtrip_tiny_output_chunks(tmp_path: Path) -> None:
    _roundtrip(tmp_path, 7, io.BytesIO)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_roundtrip_short_reads_split_every_marker(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    _roundtrip(tmp_path, 1000, lambda data: Trickle(data, iter(lambda: rnd.randint(1, 9), 0)))


def test_parser_blocks_split_delimiters_at_every_offset(tmp_path: Path) -> None:
    """Reads of one fixed size, swept over a range, put every delimiter (and the CR before
    it, and the near-delimiters in the data) at every offset of a read: the parser's
    no-copy refill (a read becomes the buffer as it is) must cut parts exactly there too."""
    data = (b"x" * 61 + b"\r\n--b0un" + b"y" * 37 + b"\r" + b"\r\n--b0undX" + b"z" * 13
            + b"\r")
    parts = [(root_headers(), ENVELOPE)] + [(att_headers(f"p{i}@t"), data[:i * 17 % 97])
                                            for i in range(12)]
    wire = build(parts)
    for size in range(8, 90):
        spool = tmp_path / f"s{size}"
        spool.mkdir()
        root, got = parse_multipart(Trickle(wire, iter(lambda size=size: size, 0)),
                                    ctype_for(), spool, max_envelope_bytes=MB,
                                    max_total_bytes=MB, chunk_size=size)
        assert root == ENVELOPE, size
        for i in range(12):
            assert got[f"p{i}@t"].path.read_bytes() == data[:i * 17 % 97], (size, i)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 17, 64])
def test_parser_tiny_chunk_sizes(tmp_path: Path, chunk: int) -> None:
    data = b"a\r\n--b0unc\r\n--b0un\r\n--b0und-x--b0und" + b"\r" * 3
    wire = build([(root_headers(), ENVELOPE), (att_headers("a@t"), data),
                  (att_headers("e@t"), b"")])
    root, got = parse_multipart(io.BytesIO(wire), ctype_for(), tmp_path, max_envelope_bytes=MB,
                                max_total_bytes=MB, chunk_size=chunk)
    assert root == ENVELOPE
    assert got["a@t"].path.read_bytes() == data
    assert got["e@t"].size == 0


def test_mtom_response_headers_and_framing(tmp_path: Path) -> None:
    atts = write_files(tmp_path, {"doc1@test": b"hello"})
    ctype, length, body = mtom_response(ENVELOPE, atts, soap_action="urn:ihe:iti:2007:X")
    media, p = parse_content_type(ctype)
    assert media == "multipart/related"
    assert p["type"] == "application/xop+xml"
    assert p["start"] == f"<{ROOT_CONTENT_ID}>"
    assert p["start-info"] == "application/soap+xml"
    assert p["action"] == "urn:ihe:iti:2007:X"
    wire = b"".join(body)
    b = p["boundary"].encode()
    assert wire.startswith(b"--" + b + b"\r\n" +
                           b'Content-Type: application/xop+xml; charset=UTF-8; '
                           b'type="application/soap+xml"\r\nContent-Transfer-Encoding: binary\r\n'
                           b"Content-ID: <root.message@xdsi-gateway>\r\n\r\n" + ENVELOPE + b"\r\n")
    assert (b"--" + b + b"\r\nContent-Type: application/dicom\r\nContent-Transfer-Encoding: "
            b"binary\r\nContent-ID: <doc1@test>\r\n\r\nhello\r\n--" + b + b"--\r\n") in wire
    assert len(wire) == length


def test_mtom_response_without_attachments_and_action(tmp_path: Path) -> None:
    ctype, length, body = mtom_response(ENVELOPE, [])
    assert "action=" not in ctype
    wire = b"".join(body)
    assert len(wire) == length
    root, got = parse_multipart(io.BytesIO(wire), ctype, tmp_path, max_envelope_bytes=MB,
                                max_total_bytes=MB)
    assert root == ENVELOPE and not got


def test_mtom_boundary_never_in_envelope(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = uuid.UUID(int=1), uuid.UUID(int=2)
    seq = iter([first, second])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(seq))
    envelope = ENVELOPE.replace(b"<d>", b"<d>MIMEBoundary_" + first.hex.encode())
    ctype, _, _ = mtom_response(envelope, [])
    assert parse_content_type(ctype)[1]["boundary"] == "MIMEBoundary_" + second.hex


def test_mtom_response_close_runs_on_close_once(tmp_path: Path) -> None:
    calls: list[int] = []
    atts = write_files(tmp_path, {"a@t": b"1234"})
    _, _, body = mtom_response(ENVELOPE, atts, on_close=lambda: calls.append(1))
    it = iter(body)
    next(it)
    body.close()
    body.close()
    assert calls == [1]


def test_mtom_response_file_shrinking_is_an_error(tmp_path: Path) -> None:
    atts = write_files(tmp_path, {"a@t": b"1234567890"})
    _, _, body = mtom_response(ENVELOPE, atts)
    atts[0].path.write_bytes(b"123")
    with pytest.raises(OSError, match="shrank"):
        b"".join(body)


# --- parser details -------------------------------------------------------------------------

def test_base64_part_is_decoded_streaming(tmp_path: Path) -> None:
    import base64

    data = os.urandom(100_003)
    enc = base64.encodebytes(data)  # 76-column lines
    wire = build([(root_headers(), ENVELOPE), (att_headers("b@t", cte="base64"), enc)])
    _, got = parse_multipart(io.BytesIO(wire), ctype_for(), tmp_path, max_envelope_bytes=MB,
                             max_total_bytes=MB, chunk_size=999)
    assert got["b@t"].path.read_bytes() == data


def test_spooled_parts_carry_the_sha1_of_their_file(tmp_path: Path) -> None:
    import base64
    import hashlib

    binary, encoded = os.urandom(300_017), os.urandom(70_001)
    wire = build([(root_headers(), ENVELOPE), (att_headers("bin@t"), binary),
                  (att_headers("b64@t", cte="base64"), base64.encodebytes(encoded)),
                  (att_headers("empty@t"), b"")])
    hashed, unhashed = tmp_path / "hashed", tmp_path / "unhashed"
    hashed.mkdir()
    unhashed.mkdir()
    root, got = parse_multipart(Trickle(wire, itertools.cycle([1, 7, 4096, 65_537])),
                                ctype_for(), hashed, max_envelope_bytes=MB,
                                max_total_bytes=MB, chunk_size=5000, sha1=True)
    assert root == ENVELOPE
    for cid, data in (("bin@t", binary), ("b64@t", encoded), ("empty@t", b"")):
        att = got[cid]
        assert att.sha1 == hashlib.sha1(att.path.read_bytes()).hexdigest()
        assert att.sha1 == hashlib.sha1(data).hexdigest()
    _, plain = parse_multipart(io.BytesIO(wire), ctype_for(), unhashed,
                               max_envelope_bytes=MB, max_total_bytes=MB)  # off by default
    assert plain["bin@t"].sha1 is None
    assert plain["bin@t"].path.read_bytes() == binary


def test_early_writeback_hands_every_byte_to_the_kernel_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.soap.multipart as multipart

    calls: list[tuple[int, int, int]] = []

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((offset, length, advice))
        os.posix_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(multipart, "_FADVISE", fadvise)
    monkeypatch.setattr(multipart, "WRITEBACK_STEP", 10_000)
    data = os.urandom(123_457)
    wire = build([(root_headers(), ENVELOPE), (att_headers("a@t"), data)])
    _, got = parse_multipart(io.BytesIO(wire), ctype_for(), tmp_path, max_envelope_bytes=MB,
                             max_total_bytes=MB, chunk_size=4096, early_writeback=True)
    assert got["a@t"].path.read_bytes() == data
    assert len(calls) > 5
    assert all(advice == os.POSIX_FADV_DONTNEED for _, _, advice in calls)
    # Contiguous ranges from 0 to the end of the part: each byte handed over exactly once.
    assert calls[0][0] == 0
    assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(calls))
    assert calls[-1][0] + calls[-1][1] == len(data)

    calls.clear()
    (tmp_path / "off").mkdir()
    parse_multipart(io.BytesIO(wire), ctype_for(), tmp_path / "off", max_envelope_bytes=MB,
                    max_total_bytes=MB, chunk_size=4096)
    assert calls == []  # off by default (the client's retrieve spool)


def test_early_writeback_that_fails_is_ignored(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.soap.multipart as multipart

    calls = []

    def unsupported(*args: int) -> None:
        calls.append(args)
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(multipart, "_FADVISE", unsupported)
    monkeypatch.setattr(multipart, "WRITEBACK_STEP", 1000)
    data = os.urandom(50_000)
    wire = build([(root_headers(), ENVELOPE), (att_headers("a@t"), data)])
    _, got = parse_multipart(io.BytesIO(wire), ctype_for(), tmp_path, max_envelope_bytes=MB,
                             max_total_bytes=MB, chunk_size=999, early_writeback=True)
    assert got["a@t"].path.read_bytes() == data
    assert len(calls) == 1  # tried once, then left to the final fsync


def test_lf_only_preamble_padding_and_no_start(tmp_path: Path) -> None:
    wire = (b"this is a preamble\n--b0und  \t\nContent-Type: application/xop+xml; "
            b'type="text/xml"\nContent-ID: <r>\n\n<x/>\n--b0und\nContent-ID: <a>\n'
            b"Content-Type: image/png\n\nPNG\n--b0und--\nepilogue")
    root, rtype, got = parse_multipart_ex(io.BytesIO(wire), "multipart/related; boundary=b0und",
                                          tmp_path, max_envelope_bytes=MB, max_total_bytes=MB)
    assert root == b"<x/>"
    assert "text/xml" in rtype
    assert got["a"].path.read_bytes() == b"PNG"
    assert got["a"].content_type == "image/png"


def test_root_found_by_start_when_not_first(tmp_path: Path) -> None:
    wire = build([(att_headers("a@t"), b"AAA"), (root_headers("r@t"), ENVELOPE)])
    root, got = parse_multipart(io.BytesIO(wire), ctype_for(start="r@t"), tmp_path,
                                max_envelope_bytes=MB, max_total_bytes=MB)
    assert root == ENVELOPE
    assert list(got) == ["a@t"]


def test_cid_lookup_url_encoded_and_decoded(tmp_path: Path) -> None:
    wire = build([(root_headers(), ENVELOPE), (att_headers("doc 1@t"), b"1"),
                  (att_headers("doc%202@t"), b"2")])
    _, got = parse_multipart(io.BytesIO(wire), ctype_for(), tmp_path, max_envelope_bytes=MB,
                             max_total_bytes=MB)
    assert isinstance(got, AttachmentMap)
    assert got["cid:doc%201@t"].path.read_bytes() == b"1"
    assert got.get("<doc 1@t>") is not None
    assert "cid:doc 2@t" in got
    plain = dict(got)
    one = resolve_cid(plain, "cid:doc%201@t")
    assert one is not None and one.content_id == "doc 1@t"
    assert resolve_cid(plain, "cid:nope@t") is None
    assert got.get("cid:nope@t") is None


def test_duplicate_content_id_rejected(tmp_path: Path) -> None:
    wire = build([(root_headers(), ENVELOPE), (att_headers("a@t"), b"1"),
                  (att_headers("a@t"), b"2")])
    with pytest.raises(MultipartError, match="duplicate Content-ID"):
        parse_multipart(io.BytesIO(wire), ctype_for(), tmp_path, max_envelope_bytes=MB,
                        max_total_bytes=MB)


def test_unsupported_transfer_encoding_rejected(tmp_path: Path) -> None:
    wire = build([(root_headers(), ENVELOPE), (att_headers("a@t", cte="quoted-printable"), b"")])
    with pytest.raises(MultipartError, match="Content-Transfer-Encoding"):
        parse_multipart(io.BytesIO(wire), ctype_for(), tmp_path, max_envelope_bytes=MB,
                        max_total_bytes=MB)


# --- NIST wire captures ---------------------------------------------------------------------

def _split_http(raw: bytes) -> tuple[dict[str, str], bytes]:
    """Split off HTTP request headers if the capture has them."""
    if not raw.startswith((b"POST ", b"HTTP/")):
        return {}, raw
    sep = b"\r\n\r\n" if b"\r\n\r\n" in raw else b"\n\n"
    head, _, body = raw.partition(sep)
    headers = {}
    for line in head.decode("latin-1").splitlines()[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return headers, body


def _xop_hrefs(root: bytes) -> list[str]:
    doc = parse_xml(root)
    return [str(e.get("href")) for e in doc.iter(f"{{{XOP}}}Include")]


def test_nist_itI41_mtom_capture_resolves(conformance: Path, tmp_path: Path) -> None:
    folder = conformance / WIRE
    headers, _ = _split_http((folder / "multipart.header.txt").read_bytes() + b"\n\n")
    body = (folder / "multipart.body.txt").read_bytes()
    ctype = headers["content-type"]
    # The capture's Content-Length (from the original CRLF wire) no longer matches the stored
    # LF-only file, so the parser reads to the closing boundary.
    root, rtype, atts = parse_multipart_ex(io.BytesIO(body), ctype, tmp_path,
                                           max_envelope_bytes=MB, max_total_bytes=MB)
    assert "application/xop+xml" in rtype
    doc = parse_xml(root)
    assert doc.tag == f"{{{SOAP12}}}Envelope"
    hrefs = _xop_hrefs(root)
    assert hrefs
    for href in hrefs:
        att = atts.get(href)
        assert att is not None, href
        assert att.content_type == "text/plain"
        assert att.path.read_bytes().startswith(b"This is my document.")


def test_nist_sample_mtom_message_without_http_headers(conformance: Path,
                                                       tmp_path: Path) -> None:
    raw = (conformance / WIRE / "sample_mtom_message.txt").read_bytes()
    headers, body = _split_http(raw)
    assert not headers
    boundary = body.split(b"\n", 1)[0][2:].strip().decode()
    root, atts = parse_multipart(io.BytesIO(body), f"multipart/related; boundary={boundary}",
                                 tmp_path, max_envelope_bytes=MB, max_total_bytes=MB)
    assert parse_xml(root).tag == f"{{{SOAP12}}}Envelope"
    assert len(atts) == 1
    (att,) = atts.values()
    assert att.path.read_bytes() == b"This is my document.\n\nIt is great!\n\n"
    # This capture's xop:Include names "1.<id>@apache.org" while its attachment is "<2.<id>>"
    # (the root part is "<1.<id>>"): the sample itself is inconsistent, so nothing resolves.
    assert [resolve_cid(atts, h) for h in _xop_hrefs(root)] == [None]


def test_nist_capture_through_middleware(conformance: Path, tmp_path: Path) -> None:
    folder = conformance / WIRE
    headers, _ = _split_http((folder / "multipart.header.txt").read_bytes() + b"\n\n")
    body = (folder / "multipart.body.txt").read_bytes()
    seen: dict[str, Any] = {}
    status, *_ = call(tmp_path, body, headers["content-type"], app=recording_app(seen))
    assert status.startswith("200")
    assert seen["CONTENT_TYPE"] == ('application/soap+xml; charset=UTF-8; '
                                    'action="urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"')
    assert seen["body"].startswith(b"<?xml")
    hrefs = _xop_hrefs(seen["body"])
    assert [seen["atts"][h.removeprefix("cid:")] for h in hrefs] == [
        b"This is my document.\n\nIt is great!\n\n"]
    # The edge does not hash while spooling (the repository's one read pass is cheaper).
    assert set(seen["sha1"].values()) == {None}


# --- middleware -----------------------------------------------------------------------------

def recording_app(seen: dict[str, Any]) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen["CONTENT_TYPE"] = environ["CONTENT_TYPE"]
        seen["CONTENT_LENGTH"] = environ["CONTENT_LENGTH"]
        seen["body"] = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"] or 0))
        seen["atts"] = {k: a.path.read_bytes() for k, a in environ["xdsi.attachments"].items()}
        seen["sha1"] = {k: a.sha1 for k, a in environ["xdsi.attachments"].items()}
        seen["spool"] = environ["xdsi.spool_dir"]
        seen["spool_existed"] = environ["xdsi.spool_dir"].is_dir()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    return app


def call(tmp_path: Path, body: bytes | Any, ctype: str, *, app: Any = None,
         content_length: int | str | None = "auto", max_request: int = 10 * MB,
         max_envelope: int = MB, extra: dict[str, Any] | None = None
         ) -> tuple[str, list[tuple[str, str]], bytes, dict[str, Any]]:
    spool_root = tmp_path / "spool-root"
    mw = MtomMiddleware(app or recording_app({}), spool_root=spool_root,
                        max_request_bytes=max_request, max_envelope_bytes=max_envelope,
                        chunk_size=4096)
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ["REQUEST_METHOD"] = "POST"
    environ["CONTENT_TYPE"] = ctype
    environ["wsgi.input"] = io.BytesIO(body) if isinstance(body, bytes) else body
    if content_length == "auto":
        environ["CONTENT_LENGTH"] = str(len(body))
    elif content_length is None:
        environ.pop("CONTENT_LENGTH", None)
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    else:
        environ["CONTENT_LENGTH"] = str(content_length)
    environ.update(extra or {})
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        got["status"], got["headers"] = status, headers
        return lambda _data: None

    result = mw(environ, start_response)
    try:
        out = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close:
            close()
    return got["status"], got["headers"], out, environ


def spool_left(tmp_path: Path) -> list[Path]:
    root = tmp_path / "spool-root"
    return list(root.iterdir()) if root.exists() else []


def test_middleware_good_package(tmp_path: Path) -> None:
    wire = build([(root_headers(), ENVELOPE), (att_headers("doc1@test", "application/dicom"),
                                               b"DICM" * 1000)])
    seen: dict[str, Any] = {}
    status, _, out, _env = call(tmp_path, wire, ctype_for(), app=recording_app(seen))
    assert status.startswith("200") and out == b"ok"
    assert seen["body"] == ENVELOPE
    assert seen["CONTENT_LENGTH"] == str(len(ENVELOPE))
    assert seen["CONTENT_TYPE"] == "application/soap+xml; charset=UTF-8"
    assert seen["atts"] == {"doc1@test": b"DICM" * 1000}
    assert seen["spool_existed"]
    assert seen["spool"].parent == tmp_path / "spool-root"
    assert spool_left(tmp_path) == []


def test_middleware_spool_lives_until_close(tmp_path: Path) -> None:
    wire = build([(root_headers(), ENVELOPE), (att_headers("doc1@test"), b"x")])
    mw = MtomMiddleware(recording_app({}), spool_root=tmp_path, max_request_bytes=MB,
                        max_envelope_bytes=MB)
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ.update({"REQUEST_METHOD": "POST", "CONTENT_TYPE": ctype_for(),
                    "CONTENT_LENGTH": str(len(wire)), "wsgi.input": io.BytesIO(wire)})
    result = mw(environ, lambda *a: None)
    spool = environ["xdsi.spool_dir"]
    assert b"".join(result) == b"ok"
    assert (spool / "part-00002.bin").is_file()
    result.close()  # type: ignore[attr-defined]
    assert not spool.exists()


def test_middleware_soap11_root_keeps_text_xml(tmp_path: Path) -> None:
    wire = build([(root_headers(typ="text/xml"), ENVELOPE)])
    seen: dict[str, Any] = {}
    call(tmp_path, wire, ctype_for(start_info="text/xml"), app=recording_app(seen))
    assert seen["CONTENT_TYPE"].startswith("text/xml;")


def test_middleware_chunked_multipart_without_content_length(tmp_path: Path) -> None:
    wire = build([(root_headers(), ENVELOPE), (att_headers("doc1@test"), b"z" * 50_000)])
    seen: dict[str, Any] = {}
    status, *_ = call(tmp_path, wire, ctype_for(), app=recording_app(seen), content_length=None)
    assert status.startswith("200")
    assert seen["atts"]["doc1@test"] == b"z" * 50_000


def test_middleware_plain_soap_passes_through(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}
    status, *_ = call(tmp_path, ENVELOPE, "application/soap+xml; charset=utf-8",
                      app=recording_app(seen))
    assert status.startswith("200")
    assert seen["body"] == ENVELOPE and seen["atts"] == {}
    assert seen["CONTENT_TYPE"] == "application/soap+xml; charset=utf-8"
    assert spool_left(tmp_path) == []


def test_middleware_plain_soap_chunked_is_buffered(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}
    status, *_ = call(tmp_path, ENVELOPE, "application/soap+xml", app=recording_app(seen),
                      content_length=None)
    assert status.startswith("200")
    assert seen["body"] == ENVELOPE and seen["CONTENT_LENGTH"] == str(len(ENVELOPE))
    assert spool_left(tmp_path) == []


def _fault_of(out: bytes) -> tuple[str, str]:
    doc = parse_xml(out)
    ns = {"env": SOAP12}
    value = doc.findtext("env:Body/env:Fault/env:Code/env:Value", namespaces=ns)
    reason = doc.findtext("env:Body/env:Fault/env:Reason/env:Text", namespaces=ns)
    return str(value), str(reason)


_GOOD = [(root_headers(), ENVELOPE), (att_headers("doc1@test"), b"payload")]


def _too_many_parts() -> bytes:
    return build([(root_headers(), ENVELOPE)] + [(att_headers(f"p{i}"), b"") for i in
                                                 range(MAX_PARTS)])


MALFORMED: list[tuple[str, Any, dict[str, Any], int, str]] = [
    ("no boundary", lambda: build(_GOOD), {"ctype": "multipart/related; type=\"application/"
                                                    "xop+xml\""}, 400, "no boundary"),
    ("no closing boundary", lambda: build(_GOOD, close=False), {}, 400, "closing boundary"),
    ("truncated", lambda: build(_GOOD)[:-30], {"content_length": len(build(_GOOD))}, 400,
     "truncated"),
    ("short of content length", lambda: build(_GOOD), {"content_length": len(build(_GOOD)) + 9},
     400, "truncated"),
    ("huge part headers", lambda: build([(root_headers(), ENVELOPE),
                                        ({"X-Pad": "a" * (MAX_HEADER_BLOCK + 10)}, b"")]),
     {}, 400, "header block"),
    ("too many parts", _too_many_parts, {"max_request": 50 * MB}, 400, "more than 10000 parts"),
    ("root missing", lambda: build(_GOOD), {"ctype": ctype_for(start="other@test")}, 400,
     "root part"),
    ("envelope too big", lambda: build(_GOOD), {"max_envelope": 100}, 413, "max_envelope_bytes"),
    ("declared too big", lambda: build(_GOOD), {"max_request": 200}, 413, "max_request_bytes"),
    ("chunked too big", lambda: build(_GOOD), {"max_request": 200, "content_length": None}, 413,
     "max_request_bytes"),
    ("no boundary in body", lambda: b"just some bytes", {}, 400, "no multipart boundary"),
    ("bad content length", lambda: build(_GOOD), {"content_length": "12x"}, 400,
     "Content-Length"),
    ("plain too big", lambda: ENVELOPE, {"ctype": "application/soap+xml", "max_request": 100},
     413, "max_request_bytes (100)"),
    ("plain chunked too big", lambda: ENVELOPE, {"ctype": "application/soap+xml",
                                                 "max_request": 100, "content_length": None},
     413, "max_request_bytes (100)"),
]


@pytest.mark.parametrize(("name", "make", "opts", "status", "reason"), MALFORMED,
                         ids=[m[0] for m in MALFORMED])
def test_middleware_malformed(tmp_path: Path, name: str, make: Any, opts: dict[str, Any],
                              status: int, reason: str) -> None:
    reached: list[bool] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        reached.append(True)
        start_response("200 OK", [])
        return [b""]

    opts = dict(opts)
    ctype = opts.pop("ctype", ctype_for())
    got_status, headers, out, _ = call(tmp_path, make(), ctype, app=app, **opts)
    assert not reached
    assert got_status.split()[0] == str(status)
    assert dict(headers)["Content-Type"] == FAULT_CONTENT_TYPE
    code, text = _fault_of(out)
    assert code == "env:Sender"
    assert reason in text
    assert spool_left(tmp_path) == []


def test_middleware_removes_spool_when_app_raises(tmp_path: Path) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        call(tmp_path, build(_GOOD), ctype_for(), app=app)
    assert spool_left(tmp_path) == []


def test_middleware_closes_inner_iterable_then_cleans(tmp_path: Path) -> None:
    events: list[str] = []

    class Body:
        def __init__(self, spool: Path):
            self.spool = spool

        def __iter__(self) -> Iterator[bytes]:
            yield b"a"
            raise OSError("client went away")

        def close(self) -> None:
            events.append("closed" if self.spool.exists() else "closed-too-late")

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        start_response("200 OK", [])
        return Body(environ["xdsi.spool_dir"])

    with pytest.raises(OSError):
        call(tmp_path, build(_GOOD), ctype_for(), app=app)
    assert events == ["closed"]
    assert spool_left(tmp_path) == []


# --- faults ---------------------------------------------------------------------------------

def test_fault_envelope_shape() -> None:
    doc = parse_xml(fault_envelope("Sender", "bad", subcode=("urn:x", "Oops")))
    ns = {"env": SOAP12}
    fault = doc.find("env:Body/env:Fault", ns)
    assert fault is not None
    assert fault.findtext("env:Code/env:Value", namespaces=ns) == "env:Sender"
    sub = fault.find("env:Code/env:Subcode/env:Value", ns)
    assert sub is not None and sub.text == "sc:Oops" and sub.nsmap["sc"] == "urn:x"
    text = fault.find("env:Reason/env:Text", ns)
    assert text is not None and text.text == "bad"
    assert text.get("{http://www.w3.org/XML/1998/namespace}lang") == "en"
    with pytest.raises(ValueError):
        fault_envelope("Nonsense", "x")


# --- memory ---------------------------------------------------------------------------------

def _generated_message(boundary: str, size: int) -> Iterator[bytes]:
    block = bytes(range(256)) * 4096  # 1 MiB, no CR/LF runs that matter
    yield build([(root_headers(), ENVELOPE)], boundary, close=False)
    yield f"--{boundary}\r\nContent-ID: <big@t>\r\nContent-Type: application/dicom\r\n\r\n".encode()
    left = size
    while left > 0:
        piece = block if left >= len(block) else block[:left]
        left -= len(piece)
        yield piece
    yield f"\r\n--{boundary}--\r\n".encode()


def test_parse_200mb_stream_memory_stays_flat(tmp_path: Path) -> None:
    size = 200 * MB
    stream = GeneratedStream(_generated_message("bnd_" + "7" * 30, size))
    tracemalloc.start()
    try:
        root, atts = parse_multipart(stream, ctype_for("bnd_" + "7" * 30), tmp_path,
                                     max_envelope_bytes=MB, max_total_bytes=300 * MB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert root == ENVELOPE
    assert atts["big@t"].size == size
    assert atts["big@t"].path.stat().st_size == size
    assert peak < 10 * MB, peak
