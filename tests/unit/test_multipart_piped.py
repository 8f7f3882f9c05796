"""Piping a multipart message's parts chunk by chunk, without spool files: the parser's piped
mode (`iter_multipart_piped`: part boundaries at every read offset, chunk bounds, a part cut
mid-way, a consumer that does not drain a part), `mtom_stream` writing a
`StreamedAttachment`, and the initiating gateway's root-first pipe (`_retrieve_piped` over a
real `StreamedReply`): bytes exact, nothing in the spool folder, a reply cut mid-part breaks
the response off."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from lxml import etree

from gateway.ebrim.parse import parse_retrieve_document_set_response
from gateway.ns import XDSB, q
from gateway.soap.client import SoapReply, StreamedReply
from gateway.soap.mtom import mtom_stream
from gateway.soap.multipart import (
    MIN_PIPED_CHUNK,
    MultipartError,
    PartStream,
    RootPart,
    iter_multipart,
    iter_multipart_piped,
)
from gateway.transactions import Attachment, StreamedAttachment
from gateway.xca import initiating
from tests.unit.test_xca_initiating import ctx, retrieve_body
from tests.unit.test_xca_streaming import (
    B,
    FakeResponse,
    Trickle,
    envelope_bytes,
    message,
    retrieve_response,
    root_first_run,
)

# Data that looks like the start of a delimiter in many places.
TRICKY = b"\r\n--MIMEBoundary_tes\r\n--\r\n--MIMEBoundary_testX\r\n\r\n-\r"


def piped_message(parts: list[tuple[str, bytes]], closed: bool = True) -> tuple[str, bytes]:
    ctype, chunks = message(b"<root/>", parts, root_last=False, closed=closed)
    return ctype, b"".join(chunks)


class Splits(io.RawIOBase):
    """Hands out `data` in reads that end at the given offsets (then the rest)."""

    def __init__(self, data: bytes, cuts: list[int]):
        self.data = data
        self.cuts = [c for c in sorted(cuts) if 0 < c < len(data)] + [len(data)]
        self.pos = 0

    def read(self, size: int = -1, /) -> bytes:
        if self.pos >= len(self.data):
            return b""
        end = next(c for c in self.cuts if c > self.pos)
        if size >= 0:
            end = min(end, self.pos + size)
        out = self.data[self.pos:end]
        self.pos = end
        return out


def collect(items: Iterator[Any]) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for item in items:
        if isinstance(item, RootPart):
            out.append(("root", item.data))
        elif isinstance(item, PartStream):
            out.append((item.content_id, b"".join(item.chunks)))
        else:
            out.append((item.content_id, item.path.read_bytes()))
    return out


PARTS = [("p0@b", TRICKY * 3), ("p1@b", b""), ("p2@b", b"x" + TRICKY + b"y"),
         ("p3@b", TRICKY[:-1])]


def test_piped_parts_are_exact_at_every_read_size(tmp_path: Path) -> None:
    ctype, data = piped_message(PARTS)
    want = [("root", b"<root/>"), *PARTS]
    for chunk_size in range(1, 90):
        got = collect(iter_multipart_piped(io.BytesIO(data), ctype, tmp_path,
                                           max_envelope_bytes=1000, max_total_bytes=10**6,
                                           chunk_size=chunk_size))
        assert got == want, chunk_size
    assert list(tmp_path.iterdir()) == []  # nothing spooled


def test_piped_parts_are_exact_whatever_read_ends_where(tmp_path: Path) -> None:
    ctype, data = piped_message(PARTS)
    want = [("root", b"<root/>"), *PARTS]
    for cut in range(1, len(data)):
        for cuts in ([cut], [cut, cut + 1], [cut, cut + 7]):
            got = collect(iter_multipart_piped(Splits(data, cuts), ctype, tmp_path,
                                               max_envelope_bytes=1000,
                                               max_total_bytes=10**6, chunk_size=1 << 16))
            assert got == want, cuts
    assert list(tmp_path.iterdir()) == []


def test_piped_chunks_are_bounded_and_read_as_they_arrive(tmp_path: Path) -> None:
    big = bytes(range(256)) * (8 * 1024)  # 2 MiB
    ctype, data = piped_message([("big@b", big), ("small@b", b"s")])
    stream = io.BytesIO(data)
    chunk = 256 * 1024
    sizes: list[int] = []
    out = bytearray()
    for item in iter_multipart_piped(stream, ctype, tmp_path, max_envelope_bytes=1000,
                                     max_total_bytes=10**8, chunk_size=chunk):
        if isinstance(item, PartStream) and item.content_id == "big@b":
            for piece in item.chunks:
                assert isinstance(piece, bytes)
                sizes.append(len(piece))
                out += piece
                # memory-flat: the parser is never more than two blocks ahead of the consumer
                assert stream.tell() - len(out) <= 2 * chunk
            assert item.chunks.size == len(big)
    assert bytes(out) == big
    assert max(sizes) <= chunk + MIN_PIPED_CHUNK + 200
    assert all(s >= MIN_PIPED_CHUNK for s in sizes[:-1])
    assert len(sizes) >= len(big) // (chunk + MIN_PIPED_CHUNK)


def test_a_part_cut_mid_way_raises_from_its_chunks(tmp_path: Path) -> None:
    ctype, data = piped_message([("p0@b", b"a" * 5000), ("p1@b", b"b" * 5000)])
    cut = data[:data.index(b"b" * 5000) + 2500]
    items = iter_multipart_piped(io.BytesIO(cut), ctype, tmp_path, max_envelope_bytes=1000,
                                 max_total_bytes=10**6, chunk_size=1024)
    assert isinstance(next(items), RootPart)
    first = next(items)
    assert isinstance(first, PartStream) and b"".join(first.chunks) == b"a" * 5000
    second = next(items)
    assert isinstance(second, PartStream)
    got = bytearray()
    with pytest.raises(MultipartError, match="closing boundary"):
        for piece in second.chunks:
            got += piece
    assert bytes(got) == b"b" * len(got) and len(got) <= 2500
    with pytest.raises(MultipartError):
        next(items)
    assert list(tmp_path.iterdir()) == []


def test_a_part_left_undrained_is_dropped_when_the_next_is_asked_for(tmp_path: Path) -> None:
    ctype, data = piped_message([("p0@b", b"a" * 50_000), ("p1@b", b"b" * 3000),
                                 ("p2@b", b"c" * 10)])
    items = iter_multipart_piped(io.BytesIO(data), ctype, tmp_path, max_envelope_bytes=1000,
                                 max_total_bytes=10**6, chunk_size=1024)
    assert isinstance(next(items), RootPart)
    p0 = next(items)
    assert isinstance(p0, PartStream)
    assert next(p0.chunks).startswith(b"a")  # read a little, not all
    p1 = next(items)  # never read at all
    assert isinstance(p1, PartStream) and p1.content_id == "p1@b"
    with pytest.raises(RuntimeError):
        next(p0.chunks)
    p2 = next(items)
    assert isinstance(p2, PartStream) and p2.content_id == "p2@b"
    assert b"".join(p2.chunks) == b"c" * 10
    with pytest.raises(RuntimeError):
        list(p1.chunks)
    assert next(items, None) is None


def test_piped_base64_part_is_decoded(tmp_path: Path) -> None:
    raw = bytes(range(256)) * 40
    ctype, chunks = message(b"<root/>", [], root_last=False, closed=False)
    dash = b"--MIMEBoundary_test"
    encoded = base64.encodebytes(raw)
    data = b"".join(chunks) + (dash + b"\r\nContent-ID: <b64@b>\r\nContent-Transfer-Encoding:"
                               b" base64\r\n\r\n" + encoded + b"\r\n" + dash + b"--\r\n")
    for chunk_size in (7, 64, 4096):
        got = collect(iter_multipart_piped(io.BytesIO(data), ctype, tmp_path,
                                           max_envelope_bytes=1000, max_total_bytes=10**6,
                                           chunk_size=chunk_size))
        assert got == [("root", b"<root/>"), ("b64@b", raw)]


def test_piped_mode_spools_parts_before_the_root(tmp_path: Path) -> None:
    ctype, chunks = message(b"<root/>", [("p0@b", b"zero"), ("p1@b", b"one")], root_last=True)
    items = list(iter_multipart_piped(io.BytesIO(b"".join(chunks)), ctype, tmp_path,
                                      max_envelope_bytes=1000, max_total_bytes=10**6))
    assert [type(i) for i in items] == [Attachment, Attachment, RootPart]
    assert collect(iter(items)) == [("p0@b", b"zero"), ("p1@b", b"one"), ("root", b"<root/>")]


def test_piped_mode_keeps_the_limits(tmp_path: Path) -> None:
    ctype, data = piped_message([("p0@b", b"a" * 5000)])
    items = iter_multipart_piped(io.BytesIO(data), ctype, tmp_path, max_envelope_bytes=1000,
                                 max_total_bytes=3000, chunk_size=512)
    with pytest.raises(MultipartError) as err:
        for item in items:
            if isinstance(item, PartStream):
                list(item.chunks)
    assert err.value.http_status == 413
    ctype, data = piped_message([("p0@b", b"a"), ("p0@b", b"b")])
    with pytest.raises(MultipartError, match="duplicate"):
        collect(iter_multipart_piped(io.BytesIO(data), ctype, tmp_path,
                                     max_envelope_bytes=1000, max_total_bytes=10**6))


def test_iter_multipart_still_spools_every_part(tmp_path: Path) -> None:
    ctype, data = piped_message(PARTS)
    got = list(iter_multipart(io.BytesIO(data), ctype, tmp_path, max_envelope_bytes=1000,
                              max_total_bytes=10**6, chunk_size=13))
    assert all(not isinstance(i, PartStream) for i in got)
    assert collect(iter(got)) == [("root", b"<root/>"), *PARTS]


def test_streamed_reply_pipes_after_the_root(tmp_path: Path) -> None:
    body = retrieve_response(["1.1"])
    ctype, chunks = message(envelope_bytes(body), [("p0@b", TRICKY * 100)], root_last=False)
    reply = StreamedReply(FakeResponse(ctype, Trickle(chunks)),  # type: ignore[arg-type]
                          tmp_path, None, pipe_after_root=True)
    events = reply.events()
    assert isinstance(next(events), SoapReply)
    part = next(events)
    assert isinstance(part, PartStream) and b"".join(part.chunks) == TRICKY * 100
    assert next(events, None) is None and reply.complete
    assert list(tmp_path.iterdir()) == []


# --- mtom_stream with a StreamedAttachment ---------------------------------------------------

def test_mtom_stream_writes_streamed_attachments_exactly(tmp_path: Path) -> None:
    file = tmp_path / "f"
    file.write_bytes(b"from a file")
    pieces = [TRICKY, b"", b"middle", TRICKY]

    def parts() -> Iterator[Attachment | StreamedAttachment]:
        yield StreamedAttachment("s@x", iter(pieces), "application/dicom")
        yield Attachment("f@x", file, file.stat().st_size)

    ctype, body = mtom_stream(parts(), lambda: b"<root/>", root_first=True)
    written = list(body)
    assert b"" not in written  # an empty write would end the chunked HTTP body
    out = tmp_path / "out"
    out.mkdir()
    got = collect(iter_multipart(io.BytesIO(b"".join(written)), ctype, out,
                                 max_envelope_bytes=1000, max_total_bytes=10**6))
    assert got[1:] == [("s@x", b"".join(pieces)), ("f@x", b"from a file")]


def test_mtom_stream_breaks_off_when_a_streamed_part_fails() -> None:
    def chunks() -> Iterator[bytes]:
        yield b"half"
        raise initiating.BrokenOff("gone")

    _ctype, body = mtom_stream(iter([StreamedAttachment("s@x", chunks())]), lambda: b"<r/>",
                              root_first=True)
    written: list[bytes] = []
    with pytest.raises(initiating.BrokenOff):
        for piece in body:
            written.append(piece)
    assert written[-1] == b"half"
    assert not b"".join(written).rstrip().endswith(b"--")  # no closing boundary


# --- the initiating gateway's pipe --------------------------------------------------------

class PipePool:
    """OutboundPool.stream over a real `StreamedReply` reading B's message from `chunks`
    (`error` raised after the last chunk, like a connection that breaks)."""

    def __init__(self, chunks: list[bytes], ctype: str, error: BaseException | None = None):
        self.chunks, self.ctype, self.error = chunks, ctype, error
        self.piped: list[bool] = []

    @contextmanager
    def stream(self, url: str, action: str, body: etree._Element, *, read_timeout: float,
               spool_dir: Path, deadline: float | None = None, headers: Any = (),
               pipe_after_root: bool = False) -> Iterator[StreamedReply]:
        self.piped.append(pipe_after_root)
        raw = Trickle(self.chunks, error=self.error)
        yield StreamedReply(FakeResponse(self.ctype, raw),  # type: ignore[arg-type]
                            spool_dir, deadline, pipe_after_root=pipe_after_root)


def b_reply(uids: list[str], contents: list[bytes]) -> tuple[str, list[bytes]]:
    body = retrieve_response(uids)
    ctype, chunks = message(envelope_bytes(body), [(f"p{i}@b", c) for i, c in
                                                   enumerate(contents)], root_last=False)
    # B's parts arriving in many reads, split inside the parts and delimiters
    data = b"".join(chunks)
    return ctype, [data[i:i + 997] for i in range(0, len(data), 997)]


def test_root_first_reply_is_piped_without_spool_files(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    contents = [TRICKY * 500 + b"one", bytes(range(256)) * 300]
    ctype, chunks = b_reply(["1.1", "1.2"], contents)
    pool = PipePool(chunks, ctype)
    out, services = root_first_run(monkeypatch, tmp_path, pool,
                                   retrieve_body((B, "1.1"), (B, "1.2")))
    live = out.live
    assert live is not None and live.root_first and pool.piped == [True]
    resp = parse_retrieve_document_set_response(live.finish())
    got: dict[str, bytes] = {}
    for part in live.parts:
        assert isinstance(part, StreamedAttachment)
        got[part.content_id] = b"".join(part.chunks)
        assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # never a file
    live.close()
    assert {d.document_unique_id: got[d.content_id or ""] for d in resp.documents} == {
        "1.1": contents[0], "1.2": contents[1]}
    assert services.audit.records[0][2] is None


@pytest.mark.parametrize("error", [None, requests.ConnectionError("B went away")])
def test_root_first_reply_cut_mid_part_breaks_the_response_off(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: BaseException | None) -> None:
    contents = [b"a" * 20_000, b"b" * 20_000]
    ctype, chunks = b_reply(["1.1", "1.2"], contents)
    whole = b"".join(chunks)
    cut = whole[:whole.index(b"b" * 20_000) + 9000]
    pool = PipePool([cut[i:i + 4096] for i in range(0, len(cut), 4096)], ctype, error)
    out, services = root_first_run(monkeypatch, tmp_path, pool,
                                   retrieve_body((B, "1.1"), (B, "1.2")))
    live = out.live
    assert live is not None
    got: list[bytes] = []
    with pytest.raises(initiating.BrokenOff):
        for part in live.parts:
            assert isinstance(part, StreamedAttachment)
            got.append(b"")
            for piece in part.chunks:
                got[-1] += piece
    live.close()
    assert got[0] == contents[0] and len(got) == 2 and got[1] == b"b" * len(got[1]) \
        and len(got[1]) <= 9000
    assert services.audit.records[0][2] == initiating.OUTCOME_SERIOUS_FAILURE
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_root_first_consumer_skipping_a_part_does_not_stall(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    # B sends a part nothing names between two named ones: it is dropped, unread
    body = retrieve_response(["1.1", "1.2"])
    parts = [("p0@b", b"0" * 70_000), ("extra@b", b"x" * 300_000), ("p1@b", b"1" * 70_000)]
    ctype, chunks = message(envelope_bytes(body), parts, root_last=False)
    data = b"".join(chunks)
    pool = PipePool([data[i:i + 8192] for i in range(0, len(data), 8192)], ctype)
    out, _ = root_first_run(monkeypatch, tmp_path, pool,
                            retrieve_body((B, "1.1"), (B, "1.2")))
    live = out.live
    assert live is not None
    got = [b"".join(p.chunks) for p in live.parts if isinstance(p, StreamedAttachment)]
    live.close()
    assert got == [b"0" * 70_000, b"1" * 70_000]


def test_relay_timeout_mid_part_breaks_off(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    import threading
    release = threading.Event()
    ctype, chunks = b_reply(["1.1"], [b"z" * 50_000])

    def before(i: int) -> None:
        if i == 10:  # inside the part
            release.wait(5)

    class SlowPool(PipePool):
        @contextmanager
        def stream(self, url: str, action: str, body: etree._Element, *, read_timeout: float,
                   spool_dir: Path, deadline: float | None = None, headers: Any = (),
                   pipe_after_root: bool = False) -> Iterator[StreamedReply]:
            raw = FakeResponse(ctype, Trickle(chunks, before=before))
            yield StreamedReply(raw, spool_dir, deadline,  # type: ignore[arg-type]
                                pipe_after_root=pipe_after_root)

    import dataclasses

    from tests.unit.test_xca_initiating import Services, config
    cfg = config(B)
    cfg = dataclasses.replace(cfg, xca=dataclasses.replace(cfg.xca,
                                                           retrieve_timeout_seconds=0.2,
                                                           pipe_root_first=True))
    monkeypatch.setattr(initiating, "pool_for", lambda _cfg: SlowPool([], ctype))
    services = Services(cfg)
    out = initiating.retrieve_document_set(services, ctx(tmp_path),
                                           retrieve_body((B, "1.1")))
    live = out.live
    assert live is not None
    try:
        with pytest.raises(initiating.BrokenOff, match="did not answer within"):
            for part in live.parts:
                assert isinstance(part, StreamedAttachment)
                for _ in part.chunks:
                    pass
    finally:
        release.set()
        live.close()
    assert services.audit.records[0][2] == initiating.OUTCOME_SERIOUS_FAILURE
    assert q(XDSB, "RetrieveDocumentSetResponse") == live.finish().tag
