"""RAD-69 with `[pacs] response_order = "root-last"`: instances written as the retrieve reports
them, the root part last (named by `start`), exact status and DocumentResponses in part order,
the audit record once the root is known, and the retrieve, spool and audit settled when the
client goes away mid-stream. The PACS is replaced by fakes; the edge is the real WSGI app."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from lxml import etree
from requests.structures import CaseInsensitiveDict

from gateway.config import ConfigError, from_dict
from gateway.dicom.retrieve import InstanceRef, Received, RetrieveOutcome
from gateway.ebrim.parse import parse_retrieve_document_set_response
from gateway.ebrim.xmlsafe import parse_xml
from gateway.imaging import rad69
from gateway.imaging.plan import Resolution
from gateway.imaging.request import ImagingDocumentRequest, Wado
from gateway.ns import SOAP12, WSA, Action, ResponseStatus
from gateway.soap.application import make_app
from gateway.soap.client import SoapClient
from gateway.soap.mtom import ROOT_CONTENT_ID, mtom_stream
from gateway.soap.multipart import parse_content_type, parse_multipart
from gateway.transactions import ENDPOINTS, Attachment, RequestContext
from tests.support.rad69 import EXPLICIT_LE, NIST_SOURCE, rad69_request

JPEG_LS = "1.2.840.10008.1.2.4.80"
DOCS = [("1.1", "1.1.1", f"1.1.1.{i}") for i in range(1, 6)]
PATH = "/xdsi/imaging-source"


class FakeAudit:
    enabled = True

    def __init__(self) -> None:
        self.records: list[tuple[etree._Element | None, int | None]] = []

    def record_transaction(self, transaction: Any, ctx: Any, request_body: Any,
                           response_body: Any, outcome: int | None = None) -> None:
        self.records.append((response_body, outcome))


def services(tmp_path: Path, order: str = "root-last") -> Any:
    (tmp_path / "spool").mkdir(exist_ok=True)
    cfg = from_dict({
        "tls": {"enabled": False, "require_client_certificate": False},
        "community": {"home_community_id": "urn:oid:1.3.6.1.4.1.21367.13.70.101",
                      "repository_unique_id": "1.2.3.4",
                      "imaging_source_unique_id": NIST_SOURCE,
                      "patient_id_assigning_authority": "1.2.3.5"},
        "registry": {"database": f"sqlite:///{tmp_path / 'r.db'}"},
        "server": {"spool_directory": str(tmp_path / "spool")},
        "pacs": {"response_order": order, "timeout_seconds": 2},
    }, base=tmp_path)
    return SimpleNamespace(config=cfg, audit=FakeAudit())


def payload(uid: str) -> bytes:
    return b"\0" * 128 + b"DICM" + uid.encode() * 1000


def fake_resolve(_pacs: Any, docs: list[ImagingDocumentRequest], **_: Any) -> Resolution:
    return Resolution(found=[(InstanceRef(d.study_uid, d.series_uid, d.document_unique_id,
                                          "1.2.840.10008.5.1.4.1.1.2"), d) for d in docs])


class FakePacs:
    """retrieve() that places instances in `order` (uid -> transfer syntax), reporting each
    through on_received; `gate` (if set) holds the retrieve after the first instance."""

    def __init__(self, order: list[tuple[str, str]], *, report: bool = True,
                 gate: threading.Event | None = None, fail: Exception | None = None):
        self.order = order
        self.report = report
        self.gate = gate
        self.fail = fail
        self.finished = threading.Event()
        self.spool: Path | None = None

    def __call__(self, _pacs: Any, refs: list[InstanceRef], syntaxes: Any, spool: Path, *,
                 on_received: Callable[[Received], None] | None = None,
                 **_: Any) -> RetrieveOutcome:
        self.spool = spool
        try:
            spool.mkdir(parents=True, exist_ok=True)
            out = RetrieveOutcome()
            for i, (uid, ts) in enumerate(self.order):
                if i == 1 and self.gate is not None:
                    assert self.gate.wait(5), "the test never opened the gate"
                p = spool / f"{uid}.dcm"
                p.write_bytes(payload(uid))
                rec = Received(uid, p, ts, p.stat().st_size)
                out.received[uid] = rec
                if self.report and on_received is not None:
                    on_received(rec)
            if self.fail is not None:
                raise self.fail
            for r in refs:
                if r.sop_instance_uid not in out.received:
                    out.missing[r.sop_instance_uid] = "not sent"
            return out
        finally:
            self.finished.set()


def install(monkeypatch: pytest.MonkeyPatch, pacs: FakePacs) -> None:
    monkeypatch.setattr(rad69, "resolve", fake_resolve)
    monkeypatch.setattr("gateway.dicom.retrieve.retrieve", pacs)


def ctx(tmp_path: Path) -> RequestContext:
    spool = tmp_path / "req"
    spool.mkdir(exist_ok=True)
    return RequestContext(PATH, Action.RAD69, None, None, {}, spool)


# --- the handler ------------------------------------------------------------------------------

def test_parts_in_arrival_order_and_root_matches(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrival order differs from request order; 1.1.1.2 comes in a syntax not asked for;
    # 1.1.1.4 never comes.
    pacs = FakePacs([("1.1.1.5", EXPLICIT_LE), ("1.1.1.2", JPEG_LS), ("1.1.1.1", EXPLICIT_LE),
                     ("1.1.1.3", EXPLICIT_LE)])
    install(monkeypatch, pacs)
    resp = rad69.retrieve_imaging_document_set(services(tmp_path), ctx(tmp_path),
                                               rad69_request(DOCS, [EXPLICIT_LE]))
    assert resp.live is not None and resp.attachments == ()
    assert resp.cleanup == [tmp_path / "req" / "rad69"]
    parts = list(resp.live.parts)
    parsed = parse_retrieve_document_set_response(resp.live.finish())
    resp.live.close()
    assert [p.path.name for p in parts] == ["1.1.1.5.dcm", "1.1.1.1.dcm", "1.1.1.3.dcm"]
    assert [d.document_unique_id for d in parsed.documents] == ["1.1.1.5", "1.1.1.1", "1.1.1.3"]
    assert [d.content_id for d in parsed.documents] == [p.content_id for p in parts]
    assert len({p.content_id for p in parts}) == 3
    assert parsed.status == ResponseStatus.PARTIAL_SUCCESS
    assert sorted((e.location, e.code) for e in parsed.errors) == [
        ("1.1.1.2", Wado.TS_NOT_PROVIDED), ("1.1.1.4", Wado.TS_NOT_PROVIDED)]
    assert not (tmp_path / "req" / "rad69" / "1.1.1.2.dcm").exists()  # not kept


def test_first_part_before_the_retrieve_ends(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    pacs = FakePacs([(d[2], EXPLICIT_LE) for d in DOCS], gate=gate)
    install(monkeypatch, pacs)
    resp = rad69.retrieve_imaging_document_set(services(tmp_path), ctx(tmp_path),
                                               rad69_request(DOCS, [EXPLICIT_LE]))
    assert resp.live is not None
    parts = iter(resp.live.parts)
    first = next(parts)  # while the retrieve waits at the gate
    assert first.path.read_bytes() == payload(DOCS[0][2])
    assert not pacs.finished.is_set()
    gate.set()
    rest = list(parts)
    assert len(rest) == len(DOCS) - 1
    parsed = parse_retrieve_document_set_response(resp.live.finish())
    assert parsed.status == ResponseStatus.SUCCESS and len(parsed.documents) == len(DOCS)
    resp.live.close()


def test_instances_not_reported_live_still_sent(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pacs = FakePacs([(d[2], EXPLICIT_LE) for d in DOCS], report=False)
    install(monkeypatch, pacs)
    resp = rad69.retrieve_imaging_document_set(services(tmp_path), ctx(tmp_path),
                                               rad69_request(DOCS, [EXPLICIT_LE]))
    assert resp.live is not None
    parts = list(resp.live.parts)
    parsed = parse_retrieve_document_set_response(resp.live.finish())
    resp.live.close()
    assert [p.path.name for p in parts] == [f"{d[2]}.dcm" for d in DOCS]
    assert parsed.status == ResponseStatus.SUCCESS


def test_retrieve_crash_after_streaming_began(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pacs = FakePacs([("1.1.1.1", EXPLICIT_LE), ("1.1.1.2", EXPLICIT_LE)],
                    fail=RuntimeError("association aborted"))
    install(monkeypatch, pacs)
    resp = rad69.retrieve_imaging_document_set(services(tmp_path), ctx(tmp_path),
                                               rad69_request(DOCS, [EXPLICIT_LE]))
    assert resp.live is not None
    parts = list(resp.live.parts)
    parsed = parse_retrieve_document_set_response(resp.live.finish())
    resp.live.close()
    assert len(parts) == 2  # already written: they stay in the response
    assert [d.document_unique_id for d in parsed.documents] == ["1.1.1.1", "1.1.1.2"]
    assert parsed.status == ResponseStatus.PARTIAL_SUCCESS
    assert {e.location for e in parsed.errors} == {"1.1.1.3", "1.1.1.4", "1.1.1.5"}
    assert {e.code for e in parsed.errors} == {Wado.PROCESSING_FAILURE}


def test_nothing_to_retrieve_is_a_plain_response(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakePacs([]))
    resp = rad69.retrieve_imaging_document_set(
        services(tmp_path), ctx(tmp_path), rad69_request(DOCS, [EXPLICIT_LE],
                                                         repository="1.2.3.999"))
    assert resp.live is None
    assert parse_retrieve_document_set_response(resp.body).status == ResponseStatus.FAILURE


def test_root_first_is_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakePacs([(d[2], EXPLICIT_LE) for d in DOCS]))
    resp = rad69.retrieve_imaging_document_set(services(tmp_path, "root-first"),
                                               ctx(tmp_path),
                                               rad69_request(DOCS, [EXPLICIT_LE]))
    assert resp.live is None and len(resp.attachments) == len(DOCS)


def test_config_rejects_unknown_order(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[pacs\] response_order"):
        services(tmp_path, "root-middle")


# --- MTOM framing -----------------------------------------------------------------------------

def _stream_parts(tmp_path: Path, n: int) -> list[Attachment]:
    out = []
    for i in range(n):
        p = tmp_path / f"a{i}.bin"
        p.write_bytes(bytes([i]) * (1000 + i))
        out.append(Attachment(f"a{i}@x", p, p.stat().st_size, "application/dicom"))
    return out


def _parse(ctype: str, data: bytes, tmp_path: Path) -> tuple[bytes, dict[str, Attachment]]:
    spool = tmp_path / "parsed"
    spool.mkdir(exist_ok=True)
    return parse_multipart(io.BytesIO(data), ctype, spool, max_envelope_bytes=1 << 20,
                           max_total_bytes=1 << 24)


def test_mtom_stream_root_last_named_by_start(tmp_path: Path) -> None:
    atts = _stream_parts(tmp_path, 3)
    ctype, stream = mtom_stream(iter(atts), lambda: b"<root/>", soap_action="urn:x")
    data = b"".join(stream)
    media, params = parse_content_type(ctype)
    assert media == "multipart/related" and params["start"] == f"<{ROOT_CONTENT_ID}>"
    assert params["type"] == "application/xop+xml" and params["action"] == "urn:x"
    boundary = params["boundary"].encode()
    pieces = data.split(b"--" + boundary)
    assert len(pieces) == 6 and pieces[-1] == b"--\r\n"
    assert f"Content-ID: <{ROOT_CONTENT_ID}>".encode() in pieces[4]  # the last part
    root, got = _parse(ctype, data, tmp_path)
    assert root == b"<root/>"
    for a in atts:
        assert got[a.content_id].path.read_bytes() == a.path.read_bytes()


def test_mtom_stream_escapes_boundary_in_root_and_falls_back(tmp_path: Path) -> None:
    holder: dict[str, str] = {}

    def root() -> bytes:
        return f"<r>{holder['b']}</r>".encode()

    ctype, stream = mtom_stream(iter(_stream_parts(tmp_path, 1)), root)
    holder["b"] = parse_content_type(ctype)[1]["boundary"]
    got_root, _ = _parse(ctype, b"".join(stream), tmp_path)
    assert etree.fromstring(got_root).text == holder["b"]  # same XML, boundary not in bytes
    assert holder["b"].encode() not in got_root

    def broken() -> bytes:
        raise RuntimeError("no")

    closed: list[bool] = []
    ctype, stream = mtom_stream(iter(()), broken, fallback_root=b"<fallback/>",
                                on_close=lambda: closed.append(True))
    assert _parse(ctype, b"".join(stream), tmp_path)[0] == b"<fallback/>"
    stream.close()
    stream.close()
    assert closed == [True]


# --- through the edge (WSGI) ------------------------------------------------------------------

def _soap_request(body: etree._Element) -> bytes:
    env = etree.Element(f"{{{SOAP12}}}Envelope", nsmap={"s": SOAP12, "a": WSA})
    header = etree.SubElement(env, f"{{{SOAP12}}}Header")
    a = etree.SubElement(header, f"{{{WSA}}}Action")
    a.set(f"{{{SOAP12}}}mustUnderstand", "true")
    a.text = Action.RAD69
    etree.SubElement(header, f"{{{WSA}}}MessageID").text = "urn:uuid:stream-1"
    etree.SubElement(env, f"{{{SOAP12}}}Body").append(body)
    return etree.tostring(env)


def _start(app: Any, body: etree._Element) -> tuple[dict[str, Any], Any]:
    from wsgiref.util import setup_testing_defaults

    data = _soap_request(body)
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD="POST", PATH_INFO=PATH, CONTENT_LENGTH=str(len(data)),
                   CONTENT_TYPE="application/soap+xml; charset=UTF-8",
                   HTTP_HOST="gw.example:8443")
    environ["wsgi.input"] = io.BytesIO(data)
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> None:
        got["status"], got["headers"] = status, {k.lower(): v for k, v in headers}

    return got, app(environ, start_response)


def test_edge_streams_chunked_and_audits_once_with_the_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pacs = FakePacs([(d[2], EXPLICIT_LE) for d in reversed(DOCS)])
    install(monkeypatch, pacs)
    svc = services(tmp_path)
    app = make_app(svc, endpoints=ENDPOINTS)
    got, result = _start(app, rad69_request(DOCS, [EXPLICIT_LE]))
    assert got["status"].startswith("200")
    assert "content-length" not in got["headers"]  # unknown length: the server chunks it
    assert svc.audit.records == []  # not before the root is known
    data = b"".join(result)
    assert svc.audit.records and svc.audit.records[0][1] is None
    result.close()
    assert len(svc.audit.records) == 1
    audited = svc.audit.records[0][0]
    assert parse_retrieve_document_set_response(audited).status == ResponseStatus.SUCCESS

    ctype = got["headers"]["content-type"]
    root, attachments = _parse(ctype, data, tmp_path)
    envelope = parse_xml(root)
    assert envelope.findtext(f"{{{SOAP12}}}Header/{{{WSA}}}RelatesTo") == "urn:uuid:stream-1"
    body = envelope.find(f"{{{SOAP12}}}Body")
    assert body is not None
    parsed = parse_retrieve_document_set_response(body[0])
    assert [d.document_unique_id for d in parsed.documents] == [d[2] for d in reversed(DOCS)]
    for d in parsed.documents:
        assert attachments[str(d.content_id)].path.read_bytes() == payload(d.document_unique_id)
    assert data.rstrip().endswith(b"--")
    assert data.rfind(ROOT_CONTENT_ID.encode()) > data.rfind(payload(DOCS[0][2])[-50:])
    assert list((tmp_path / "spool").iterdir()) == []  # request folder removed


def test_client_gone_mid_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    pacs = FakePacs([(d[2], EXPLICIT_LE) for d in DOCS], gate=gate)
    install(monkeypatch, pacs)
    svc = services(tmp_path)
    app = make_app(svc, endpoints=ENDPOINTS)
    got, result = _start(app, rad69_request(DOCS, [EXPLICIT_LE]))
    assert got["status"].startswith("200")
    it = iter(result)
    next(it)  # the first part's header: the client then goes away
    assert not pacs.finished.is_set()
    threading.Timer(0.2, gate.set).start()  # the retrieve goes on a little longer
    t = time.monotonic()
    result.close()  # what the server does when a write fails
    assert pacs.finished.is_set()  # close() waited for the retrieve before the cleanup
    assert time.monotonic() - t < 5
    assert pacs.spool is not None and not pacs.spool.exists()
    assert list((tmp_path / "spool").iterdir()) == []
    assert svc.audit.records == [(None, 8)]


# --- our client honours `start` ---------------------------------------------------------------

class _Raw(io.BytesIO):
    decode_content = False

    def read(self, size: int | None = -1, decode_content: bool | None = None) -> bytes:
        return super().read(size)


def test_soap_client_reads_root_last(tmp_path: Path) -> None:
    atts = _stream_parts(tmp_path, 2)
    env = (f'<s:Envelope xmlns:s="{SOAP12}"><s:Body><x:R xmlns:x="urn:x">'
           '<x:Doc href="cid:a1@x"/></x:R></s:Body></s:Envelope>').encode()
    ctype, stream = mtom_stream(iter(atts), lambda: env)
    resp = requests.Response()
    resp.status_code = 200
    resp.headers = CaseInsensitiveDict({"Content-Type": ctype,
                                        "Transfer-Encoding": "chunked"})
    resp.raw = _Raw(b"".join(stream))
    client = SoapClient("https://gw.invalid", ca_bundle=None, certificate=None,
                        private_key=None)
    spool = tmp_path / "client"
    spool.mkdir()
    reply = client._reply(resp, spool)
    client.close()
    assert reply.body is not None and reply.body.tag == "{urn:x}R"
    path = reply.attachment_path("cid:a1@x")
    assert path is not None and path.read_bytes() == atts[1].path.read_bytes()
