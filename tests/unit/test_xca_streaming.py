"""Streaming a community's reply through the initiating gateway: the part-by-part parser
(`iter_multipart`), the streaming client (`StreamedReply`: root first or last, a part cut
mid-way, read timeout, whole-reply deadline), the merge of a streamed reply
(`_merge_streamed`: everything sent, failure mid-way after or before the root) and
`retrieve_routed` answering live (root-last, one community) against a fake outbound pool."""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from lxml import etree
from urllib3.exceptions import ReadTimeoutError

from gateway.ebrim.parse import parse_retrieve_document_set_response
from gateway.errors import XdsError
from gateway.ns import RS, SOAP12, XDSB, XOP, Action, ErrorCode, ResponseStatus, q
from gateway.soap.client import ReplyTimeout, SoapReply, StreamedReply
from gateway.soap.multipart import MultipartError, RootPart, iter_multipart
from gateway.transactions import Attachment
from gateway.xca import initiating
from gateway.xca.initiating import RoutedRequest, _merge_streamed
from gateway.xca.outbound import Outcome
from tests.unit.test_xca_initiating import Services, config, ctx, retrieve_body

B = "urn:oid:1.2.3.4.2"
C = "urn:oid:1.2.3.4.3"
BOUNDARY = "MIMEBoundary_test"


def envelope_bytes(body: etree._Element) -> bytes:
    env = etree.Element(q(SOAP12, "Envelope"), nsmap={"s": SOAP12})
    etree.SubElement(env, q(SOAP12, "Body")).append(body)
    return etree.tostring(env, xml_declaration=True, encoding="UTF-8")


def retrieve_response(uids: list[str], *, status: str = ResponseStatus.SUCCESS,
                      home: str | None = None) -> etree._Element:
    """B's RetrieveDocumentSetResponse: document uid i in part p<i>@b."""
    out = etree.Element(q(XDSB, "RetrieveDocumentSetResponse"), nsmap={"xdsb": XDSB, "xop": XOP})
    etree.SubElement(out, q(RS, "RegistryResponse"), status=status)
    for i, uid in enumerate(uids):
        dr = etree.SubElement(out, q(XDSB, "DocumentResponse"))
        if home:
            etree.SubElement(dr, q(XDSB, "HomeCommunityId")).text = home
        etree.SubElement(dr, q(XDSB, "RepositoryUniqueId")).text = "1.2.3.4.5"
        etree.SubElement(dr, q(XDSB, "DocumentUniqueId")).text = uid
        etree.SubElement(dr, q(XDSB, "mimeType")).text = "text/plain"
        etree.SubElement(etree.SubElement(dr, q(XDSB, "Document")), q(XOP, "Include"),
                         href=f"cid:p{i}@b")
    return out


def message(root: bytes, parts: list[tuple[str, bytes]], *, root_last: bool,
            closed: bool = True) -> tuple[str, list[bytes]]:
    """(Content-Type, the message as one chunk per MIME part) with the root first or last."""
    dash = b"--" + BOUNDARY.encode()
    root_part = (dash + b"\r\nContent-Type: application/xop+xml; type=\"application/soap+xml\""
                 b"\r\nContent-ID: <root@b>\r\n\r\n" + root + b"\r\n")
    chunks = [dash + b"\r\nContent-Type: text/plain\r\nContent-ID: <" + cid.encode()
              + b">\r\n\r\n" + data + b"\r\n" for cid, data in parts]
    chunks = [*chunks, root_part] if root_last else [root_part, *chunks]
    if closed:
        chunks[-1] += dash + b"--\r\n"
    ctype = (f'multipart/related; boundary="{BOUNDARY}"; type="application/xop+xml"; '
             f'start="<root@b>"; start-info="application/soap+xml"')
    return ctype, chunks


class Trickle(io.RawIOBase):
    """A stream handing out one chunk per read, calling `before(i)` before chunk i; then
    raises `error` (if any) instead of ending."""

    def __init__(self, chunks: list[bytes], before: Any = None,
                 error: BaseException | None = None):
        self.chunks = list(chunks)
        self.before = before
        self.error = error
        self.i = 0
        self.decode_content = False

    def read(self, size: int = -1, /, **_kw: Any) -> bytes:
        if self.i >= len(self.chunks):
            if self.error is not None:
                raise self.error
            return b""
        if self.before is not None:
            self.before(self.i)
        chunk = self.chunks[self.i]
        self.i += 1
        return chunk


class FakeResponse:
    def __init__(self, ctype: str, raw: Trickle):
        self.status_code = 200
        self.headers = {"Content-Type": ctype}
        self.raw = raw
        self.closed = False

    def close(self) -> None:
        self.closed = True


def streamed(ctype: str, raw: Trickle, spool: Path,
             deadline: float | None = None) -> StreamedReply:
    return StreamedReply(FakeResponse(ctype, raw), spool, deadline)  # type: ignore[arg-type]


# --- the part-by-part parser and the streaming client ----------------------------------------

@pytest.mark.parametrize("root_last", [False, True])
def test_parts_come_one_by_one_root_wherever_it_is(root_last: bool, tmp_path: Path) -> None:
    body = retrieve_response(["1.1", "1.2"])
    ctype, chunks = message(envelope_bytes(body), [("p0@b", b"zero" * 1000),
                                                   ("p1@b", b"one")], root_last=root_last)
    seen: list[str] = []
    reads: list[int] = []
    reply = streamed(ctype, Trickle(chunks, before=reads.append), tmp_path)
    for event in reply.events():
        # a part is handed over once its closing delimiter is read: by then the reader has
        # asked for at most the next chunk (which starts with that delimiter)
        if isinstance(event, Attachment):
            seen.append(event.content_id)
            assert event.path.parent == tmp_path and event.path.stat().st_size == event.size
        else:
            assert isinstance(event, SoapReply) and event.body is not None
            assert event.body.tag == q(XDSB, "RetrieveDocumentSetResponse")
            seen.append("root")
        assert len(reads) <= len(seen) + 1
    assert seen == (["p0@b", "p1@b", "root"] if root_last else ["root", "p0@b", "p1@b"])
    assert reply.complete
    whole = reply.reply()
    assert whole.attachment_path("cid:p0@b") is not None
    assert (tmp_path / whole.attachments["p0@b"].path.name).read_bytes() == b"zero" * 1000


def test_iter_multipart_yields_root_part_and_attachments(tmp_path: Path) -> None:
    ctype, chunks = message(b"<root/>", [("a@x", b"A"), ("b@x", b"BB")], root_last=True)
    items = list(iter_multipart(io.BytesIO(b"".join(chunks)), ctype, tmp_path,
                                max_envelope_bytes=1000, max_total_bytes=10_000))
    assert [type(i).__name__ for i in items] == ["Attachment", "Attachment", "RootPart"]
    last = items[-1]
    assert isinstance(last, RootPart) and last.data == b"<root/>"
    assert [(a.content_id, a.size) for a in items[:2] if isinstance(a, Attachment)] == [
        ("a@x", 1), ("b@x", 2)]


def test_a_part_cut_mid_way_raises_after_the_complete_ones(tmp_path: Path) -> None:
    ctype, chunks = message(b"<root/>", [("a@x", b"A" * 100), ("b@x", b"B" * 100)],
                            root_last=True, closed=False)
    cut = [chunks[0], chunks[1][:60]]  # part b@x stops half-way, then the stream ends
    got: list[str] = []
    with pytest.raises(MultipartError):
        for item in iter_multipart(io.BytesIO(b"".join(cut)), ctype, tmp_path,
                                   max_envelope_bytes=1000, max_total_bytes=10_000):
            assert isinstance(item, Attachment)
            got.append(item.content_id)
    assert got == ["a@x"]


def test_the_client_reports_a_reply_cut_mid_way(tmp_path: Path) -> None:
    ctype, chunks = message(envelope_bytes(retrieve_response(["1.1", "1.2"])),
                            [("p0@b", b"zero"), ("p1@b", b"one" * 50)], root_last=False)
    cut = [chunks[0], chunks[1], chunks[2][:40]]
    reply = streamed(ctype, Trickle(cut), tmp_path)
    got = []
    with pytest.raises(MultipartError):
        for event in reply.events():
            got.append(event)
    assert isinstance(got[0], SoapReply)
    assert [a.content_id for a in got[1:] if isinstance(a, Attachment)] == ["p0@b"]
    assert not reply.complete


def test_the_client_passes_on_a_read_timeout(tmp_path: Path) -> None:
    ctype, chunks = message(b"<x/>", [("p0@b", b"zero")], root_last=True)
    reply = streamed(ctype, Trickle(chunks[:1], error=ReadTimeoutError(
        None, "/", "Read timed out.")), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ReadTimeoutError):
        list(reply.events())


def test_the_whole_reply_is_bounded_by_its_deadline(tmp_path: Path) -> None:
    ctype, chunks = message(b"<x/>", [(f"p{i}@b", b"x") for i in range(5)], root_last=True)
    reply = streamed(ctype, Trickle(chunks, before=lambda i: time.sleep(0.2) if i >= 2 else None),
                     tmp_path, deadline=time.monotonic() + 0.3)
    got = []
    with pytest.raises(ReplyTimeout):
        for event in reply.events():
            got.append(event)
    assert 1 <= len(got) < 5


# --- the merge of a streamed reply ------------------------------------------------------------

def routed(*uids: str, home: str = B) -> RoutedRequest:
    cfg = config(B, C)
    community = next(c for c in cfg.communities if c.home_community_id == home)
    return RoutedRequest(community, community.retrieve_url,
                         retrieve_body(*((home, u) for u in uids)))


def sent_map(tmp_path: Path, originals: list[str]) -> Any:
    from gateway.soap.multipart import AttachmentMap
    sent = AttachmentMap()
    for i, cid in enumerate(originals):
        path = tmp_path / f"s{i}"
        path.write_bytes(cid.encode())
        sent[cid] = Attachment(f"doc{i}@a", path, path.stat().st_size, "text/plain")
    return sent


def root_reply(body: etree._Element) -> SoapReply:
    return SoapReply(200, body, body)


def test_merge_of_a_complete_stream_references_the_parts_sent(tmp_path: Path) -> None:
    r = routed("1.1", "1.2")
    sent = sent_map(tmp_path, ["p1@b", "p0@b"])  # arrival order differs from the root's
    out = _merge_streamed(r, Outcome(None), root_reply(retrieve_response(["1.1", "1.2"])),
                          sent, [XdsError(ErrorCode.UNKNOWN_COMMUNITY, "document 9.9",
                                          location="urn:oid:7.7")], 5, "ITI-39", None)
    resp = parse_retrieve_document_set_response(out)
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS  # the routing error
    assert {(d.document_unique_id, d.content_id, d.home_community_id)
            for d in resp.documents} == {("1.1", "doc1@a", B), ("1.2", "doc0@a", B)}
    assert [(e.code, e.location) for e in resp.errors] == [
        (ErrorCode.UNKNOWN_COMMUNITY, "urn:oid:7.7")]


def test_merge_when_the_community_fails_after_its_root(tmp_path: Path) -> None:
    r = routed("1.1", "1.2", "1.3")
    sent = sent_map(tmp_path, ["p0@b"])
    outcome: Outcome[SoapReply] = Outcome(None, requests.ConnectionError("reset"))
    out = _merge_streamed(r, outcome, root_reply(retrieve_response(["1.1", "1.2", "1.3"])),
                          sent, [], 5, "RAD-75", None)
    resp = parse_retrieve_document_set_response(out)
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert [(d.document_unique_id, d.content_id) for d in resp.documents] == [("1.1", "doc0@a")]
    assert sorted((e.code, e.location, e.context.split(":")[0]) for e in resp.errors) == [
        (ErrorCode.UNAVAILABLE_COMMUNITY, B, "document 1.2"),
        (ErrorCode.UNAVAILABLE_COMMUNITY, B, "document 1.3")]


def test_merge_when_the_community_fails_before_its_root(tmp_path: Path) -> None:
    r = routed("1.1", "1.2", "1.3")
    sent = sent_map(tmp_path, ["p2@b", "p0@b", "junk@b"])
    ids = {"p2@b": "1.3", "p0@b": "1.1"}  # the third part cannot be identified
    by_new = {a.content_id: ids.get(cid) for cid, a in sent.items()}
    outcome: Outcome[SoapReply] = Outcome(timed_out=True)
    out = _merge_streamed(r, outcome, None, sent, [], 5, "RAD-75",
                          lambda a: by_new[a.content_id])
    resp = parse_retrieve_document_set_response(out)
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert sorted((d.document_unique_id, d.content_id, d.repository_unique_id,
                   d.home_community_id) for d in resp.documents) == [
        ("1.1", "doc1@a", "1.2.3.4.5", B), ("1.3", "doc0@a", "1.2.3.4.5", B)]
    assert [(e.code, e.location) for e in resp.errors] == [
        (ErrorCode.UNAVAILABLE_COMMUNITY, B)]
    assert "did not answer within 5 s" in resp.errors[0].context


def test_merge_when_nothing_came_is_a_failure(tmp_path: Path) -> None:
    out = _merge_streamed(routed("1.1"), Outcome(None, requests.ConnectionError("x")), None,
                          sent_map(tmp_path, []), [], 5, "ITI-39", None)
    resp = parse_retrieve_document_set_response(out)
    assert resp.status == ResponseStatus.FAILURE and not resp.documents
    assert [e.code for e in resp.errors] == [ErrorCode.UNAVAILABLE_COMMUNITY]


# --- retrieve_routed live ---------------------------------------------------------------------

class FakeStreamPool:
    """Stands in for OutboundPool.stream: writes B's parts into the spool folder one by one
    (`fail_after`: raise after that many events instead of going on)."""

    def __init__(self, root_last: bool, fail_after: int | None = None):
        self.root_last = root_last
        self.fail_after = fail_after
        self.calls: list[str] = []

    @contextmanager
    def stream(self, url: str, action: str, body: etree._Element, *, read_timeout: float,
               spool_dir: Path, deadline: float | None = None, headers: Any = (),
               pipe_after_root: bool = False
               ) -> Iterator[Any]:
        self.calls.append(url)
        uids = [d.findtext(q(XDSB, "DocumentUniqueId")) or ""
                for d in body.iter(q(XDSB, "DocumentRequest"))]
        pool = self

        class Reply:
            complete = False

            def events(self) -> Iterator[Any]:
                root = root_reply(retrieve_response(uids))
                parts = []
                for i, uid in enumerate(uids):
                    parts.append((f"p{i}@b", uid))
                order: list[Any] = [*parts, root] if pool.root_last else [root, *parts]
                for n, item in enumerate(order):
                    if pool.fail_after is not None and n >= pool.fail_after:
                        raise requests.ConnectionError("B went away")
                    if isinstance(item, SoapReply):
                        yield item
                        continue
                    path = spool_dir / f"part-{n}"
                    path.write_bytes(f"{item[1]} from B".encode())
                    yield Attachment(item[0], path, path.stat().st_size, "text/plain")
                self.complete = True

        yield Reply()


def live_config(*homes: str) -> Any:
    import dataclasses
    cfg = config(*homes)
    return dataclasses.replace(cfg, xca=dataclasses.replace(cfg.xca, response_order="root-last"))


def run_live(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pool: FakeStreamPool,
             body: etree._Element, homes: tuple[str, ...] = (B,)) -> tuple[Any, list[Attachment],
                                                                         Services]:
    monkeypatch.setattr(initiating, "pool_for", lambda _cfg: pool)
    services = Services(live_config(*homes))
    out = initiating.retrieve_document_set(services, ctx(tmp_path), body)
    assert out.live is not None
    parts = list(out.live.parts)
    root = out.live.finish()
    out.live.close()
    return root, parts, services


@pytest.mark.parametrize("root_last", [False, True])
def test_one_community_root_last_is_streamed_through(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path, root_last: bool) -> None:
    root, parts, services = run_live(
        monkeypatch, tmp_path, FakeStreamPool(root_last),
        retrieve_body((B, "1.1"), (B, "1.2"), ("urn:oid:7.7", "9.9")))
    resp = parse_retrieve_document_set_response(root)
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    by_cid = {p.content_id: p for p in parts}
    assert [p.content_id for p in parts] == [f"doc{i}@{initiating.CONTENT_ID_DOMAIN}"
                                             for i in range(2)]
    assert {d.document_unique_id: by_cid[d.content_id or ""].path.read_text()
            for d in resp.documents} == {"1.1": "1.1 from B", "1.2": "1.2 from B"}
    assert [e.code for e in resp.errors] == [ErrorCode.UNKNOWN_COMMUNITY]
    assert services.audit.records and services.audit.records[0][0] == "ITI-39"
    assert services.audit.records[0][2] is None  # the outbound call succeeded


@pytest.mark.parametrize(("root_last", "fail_after"), [(False, 2), (True, 1)])
def test_community_going_away_mid_stream(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         root_last: bool, fail_after: int) -> None:
    pool = FakeStreamPool(root_last, fail_after=fail_after)
    root, parts, services = run_live(monkeypatch, tmp_path, pool,
                                     retrieve_body((B, "1.1"), (B, "1.2"), (B, "1.3")))
    resp = parse_retrieve_document_set_response(root)
    assert len(parts) == 1
    # root-first: B's root says which document the part is; root-last: nothing identifies a
    # text part, so it is sent but not listed, and every document is an error
    assert [d.document_unique_id for d in resp.documents] == (["1.1"] if not root_last else [])
    assert resp.status == (ResponseStatus.PARTIAL_SUCCESS if not root_last
                           else ResponseStatus.FAILURE)
    assert {e.code for e in resp.errors} == {ErrorCode.UNAVAILABLE_COMMUNITY}
    assert len(resp.errors) == (2 if not root_last else 3)
    assert services.audit.records[0][2] == initiating.OUTCOME_SERIOUS_FAILURE


def test_several_communities_stay_store_and_forward(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    from tests.unit.test_xca_initiating import FakePool, retrieve_responder
    fake = FakePool({"2": retrieve_responder(tmp_path), "3": retrieve_responder(tmp_path)})
    monkeypatch.setattr(initiating, "pool_for", lambda _cfg: fake)
    out = initiating.retrieve_document_set(Services(live_config(B, C)), ctx(tmp_path),
                                           retrieve_body((B, "1.1"), (C, "2.1")))
    assert out.live is None and len(out.attachments) == 2


def root_first_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pool: Any,
                   body: etree._Element, *, pipe: bool = True) -> tuple[Any, Services]:
    monkeypatch.setattr(initiating, "pool_for", lambda _cfg: pool)
    cfg = config(B, C)  # root-first: the default
    cfg = dataclasses.replace(cfg, xca=dataclasses.replace(cfg.xca, pipe_root_first=pipe))
    services = Services(cfg)
    return initiating.retrieve_document_set(services, ctx(tmp_path), body), services


def test_root_first_without_pipe_root_first_stores_and_forwards(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The default: the whole reply is read before the answer, so a community failing
    mid-way is an XDSUnavailableCommunity in a complete answer, never a broken-off one."""
    calls: list[str] = []

    class CallOnly:
        def call(self, url: str, action: str, body: etree._Element, **_kw: Any) -> Any:
            calls.append(action)
            raise requests.ConnectionError("reset mid-reply")

    out, _ = root_first_run(monkeypatch, tmp_path, CallOnly(),
                            retrieve_body((B, "1.1"), (B, "1.2")), pipe=False)
    assert out.live is None and calls == [Action.ITI39]
    resp = parse_retrieve_document_set_response(out.body)
    assert resp.status == ResponseStatus.FAILURE
    assert [(e.code, e.location) for e in resp.errors] == [
        (ErrorCode.UNAVAILABLE_COMMUNITY, B)] * 2


def test_root_first_pipes_a_root_first_reply(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    out, services = root_first_run(monkeypatch, tmp_path, FakeStreamPool(root_last=False),
                                   retrieve_body((B, "1.1"), (B, "1.2"), ("urn:oid:7.7", "9")))
    live = out.live
    assert live is not None and live.root_first
    resp = parse_retrieve_document_set_response(live.finish())  # written before any part
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert [e.code for e in resp.errors] == [ErrorCode.UNKNOWN_COMMUNITY]
    parts = {p.content_id: p.path.read_text() for p in live.parts}
    live.close()
    assert {d.document_unique_id: parts[d.content_id or ""] for d in resp.documents} == {
        "1.1": "1.1 from B", "1.2": "1.2 from B"}
    assert services.audit.records[0][2] is None


def test_root_first_stores_and_forwards_a_root_last_reply(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    out, _ = root_first_run(monkeypatch, tmp_path, FakeStreamPool(root_last=True),
                            retrieve_body((B, "1.1"), (B, "1.2")))
    assert out.live is None
    resp = parse_retrieve_document_set_response(out.body)
    assert resp.status == ResponseStatus.SUCCESS
    by_cid = {a.content_id: a.path.read_text() for a in out.attachments}
    assert {d.document_unique_id: by_cid[d.content_id or ""] for d in resp.documents} == {
        "1.1": "1.1 from B", "1.2": "1.2 from B"}


def test_root_first_reply_failing_mid_way_breaks_the_response_off(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    out, services = root_first_run(monkeypatch, tmp_path,
                                   FakeStreamPool(root_last=False, fail_after=2),
                                   retrieve_body((B, "1.1"), (B, "1.2")))
    live = out.live
    assert live is not None and live.root_first
    got = []
    with pytest.raises(initiating.BrokenOff):
        for part in live.parts:
            got.append(part.content_id)
    assert len(got) == 1
    live.close()
    assert services.audit.records[0][2] == initiating.OUTCOME_SERIOUS_FAILURE


def test_root_first_community_down_is_a_plain_error_answer(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    out, _ = root_first_run(monkeypatch, tmp_path, FakeStreamPool(False, fail_after=0),
                            retrieve_body((B, "1.1")))
    assert out.live is None
    resp = parse_retrieve_document_set_response(out.body)
    assert resp.status == ResponseStatus.FAILURE
    assert [(e.code, e.location) for e in resp.errors] == [(ErrorCode.UNAVAILABLE_COMMUNITY, B)]


def test_mtom_stream_root_first_frames_the_root_first(tmp_path: Path) -> None:
    from gateway.soap.mtom import mtom_stream
    files = []
    for i in range(2):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"%d" % i * 100)
        files.append(Attachment(f"a{i}@x", path, 100, "application/dicom"))
    calls: list[str] = []

    def parts() -> Iterator[Attachment]:
        for f in files:
            calls.append("part")
            yield f

    def root() -> bytes:
        calls.append("root")
        return b"<root/>"

    ctype, body = mtom_stream(parts(), root, root_first=True)
    data = b"".join(body)
    assert calls == ["root", "part", "part"]
    out = tmp_path / "out"
    out.mkdir()
    items = list(iter_multipart(io.BytesIO(data), ctype, out, max_envelope_bytes=1000,
                                max_total_bytes=10_000))
    assert isinstance(items[0], RootPart) and items[0].data == b"<root/>"
    assert [(a.content_id, a.path.read_bytes()) for a in items[1:]
            if isinstance(a, Attachment)] == [("a0@x", b"0" * 100), ("a1@x", b"1" * 100)]


def test_closing_early_stops_the_relay(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The consumer goes away after the first part: close() returns once nothing writes to
    the spool folder any more, and the outbound call is audited as failed."""
    pool = FakeStreamPool(root_last=True)
    monkeypatch.setattr(initiating, "pool_for", lambda _cfg: pool)
    services = Services(live_config(B))
    out = initiating.retrieve_document_set(services, ctx(tmp_path),
                                           retrieve_body((B, "1.1"), (B, "1.2")))
    assert out.live is not None
    first = next(iter(out.live.parts))
    assert first.path.exists()
    out.live.close()
    assert services.audit.records[0][2] == initiating.OUTCOME_SERIOUS_FAILURE


def test_reply_order_falls_back_to_pacs(tmp_path: Path) -> None:
    import dataclasses
    cfg = config(B)
    assert initiating.reply_order(cfg) == "root-first"
    cfg = dataclasses.replace(cfg, pacs=dataclasses.replace(cfg.pacs, response_order="root-last"))
    assert initiating.reply_order(cfg) == "root-last"
    cfg = dataclasses.replace(cfg, xca=dataclasses.replace(cfg.xca, response_order="root-first"))
    assert initiating.reply_order(cfg) == "root-first"


def test_bytes_read_before_the_connection_broke_still_complete_a_part(tmp_path: Path) -> None:
    """http.client keeps the complete HTTP chunks of a read that failed in its IncompleteRead:
    the part they complete is handed over, then the break is reported."""
    import http.client

    from urllib3.exceptions import ProtocolError
    ctype, chunks = message(b"<x/>", [("p0@b", b"zero"), ("p1@b", b"one" * 100)],
                            root_last=True, closed=False)
    broken = ProtocolError("Connection broken", http.client.IncompleteRead(
        chunks[0] + chunks[1][:50]))
    reply = streamed(ctype, Trickle([], error=broken), tmp_path)
    got = []
    with pytest.raises(ProtocolError):
        for event in reply.events():
            got.append(event)
    assert [a.content_id for a in got if isinstance(a, Attachment)] == ["p0@b"]
