"""The Responding Gateways' remote backends without a network: ITI-38 answered by ITI-18 to
the community's remote registry, ITI-39 routed per RepositoryUniqueId to the built-in
repository or remote ones (ITI-43), RAD-75 routed to the built-in Imaging Document Source or
remote ones (RAD-69); answers merged with our home, errors located at our home, a failing
remote giving per-document errors and PartialSuccess. The outbound pool is a fake; the real
one runs in tests/integration/test_xca_responding_remote.py."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from lxml import etree

from gateway.config import GatewayConfig, from_dict
from gateway.ebrim.model import (
    AdhocQuery,
    DocumentRequest,
    ExtrinsicObject,
    RetrievedDocument,
    RetrieveDocumentSetRequest,
    Slot,
)
from gateway.ebrim.parse import parse_adhoc_query_response, parse_retrieve_document_set_response
from gateway.ebrim.render import (
    render_adhoc_query_request,
    render_adhoc_query_response,
    render_registry_response,
    render_retrieve_document_set_request,
)
from gateway.ebrim.xmlsafe import parse_xml
from gateway.errors import XdsError
from gateway.imaging import rad69
from gateway.imaging.plan import Resolution
from gateway.imaging.request import ImagingDocumentRequest, parse_request
from gateway.ns import (
    RIM,
    SOAP12,
    XDSB,
    XDSI,
    XOP,
    Action,
    ErrorCode,
    ResponseStatus,
    StoredQuery,
    q,
)
from gateway.soap.client import SoapReply
from gateway.transactions import Attachment, RequestContext
from gateway.xca import remote_registry, remote_retrieve, responding, responding_imaging
from tests.support.outbound import Audit, FakePool, Responder, refusing, reply
from tests.support.rad69 import EXPLICIT_LE, rad69_request
from tests.support.xsd import assert_valid

HOME = "urn:oid:1.2.3.4.1"
OWN_REPO = "1.2.3.4.1.1"
OWN_SOURCE = "1.2.3.4.1.2"
REPO_R = "1.2.3.4.1.11"  # remote repository r.example (answers)
REPO_X = "1.2.3.4.1.12"  # remote repository x.example (down)
SOURCE_I = "1.2.3.4.1.21"  # remote imaging source i.example (answers)
SOURCE_S = "1.2.3.4.1.22"  # remote imaging source s.example (slow)
PATIENT = "P1^^^&1.2.3.9&ISO"
ENTRY_TYPE = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"


def config(tmp: Path, *, registry_url: str = "https://g.example/xds/registry",
           retrieve_timeout: int = 2) -> GatewayConfig:
    return from_dict({
        "tls": {"enabled": False, "require_client_certificate": False},
        "community": {"home_community_id": HOME, "repository_unique_id": OWN_REPO,
                      "imaging_source_unique_id": OWN_SOURCE,
                      "patient_id_assigning_authority": "1.2.3.9",
                      "registry_url": registry_url},
        "registry": {"database": f"sqlite:///{tmp / 'registry.db'}"},
        "repository": {"directory": str(tmp / "repository")},
        "xca": {"query_timeout_seconds": 2, "retrieve_timeout_seconds": retrieve_timeout},
        "repositories": [
            {"unique_id": REPO_R, "retrieve_url": "https://r.example/xds/repository"},
            {"unique_id": REPO_X, "retrieve_url": "https://x.example/xds/repository"}],
        "imaging_sources": [
            {"unique_id": SOURCE_I, "retrieve_url": "https://i.example/xdsi/imaging-source"},
            {"unique_id": SOURCE_S, "retrieve_url": "https://s.example/xdsi/imaging-source"}],
    }, base=tmp)


@dataclass
class Services:
    config: GatewayConfig
    audit: Audit = field(default_factory=Audit)


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakePool]:
    fake = FakePool()
    monkeypatch.setattr(remote_registry, "pool_for", lambda _cfg: fake)
    monkeypatch.setattr(remote_retrieve, "pool_for", lambda _cfg: fake)
    yield fake


def ctx(tmp: Path, endpoint: str, action: str) -> RequestContext:
    spool = tmp / f"spool-{uuid.uuid4().hex[:8]}"
    spool.mkdir()
    return RequestContext(endpoint, action, f"urn:uuid:{uuid.uuid4()}", None, {}, spool)


def sleeping(seconds: float) -> Responder:
    def respond(url: str, action: str, body: etree._Element, spool: Path | None) -> SoapReply:
        time.sleep(seconds)
        raise requests.ConnectionError("too late anyway")
    return respond


# --- ITI-38 -> ITI-18 to the remote registry -------------------------------------------------

def find_documents(home: str | None = None, slot_home: str | None = None) -> etree._Element:
    params = [Slot("$XDSDocumentEntryPatientId", (f"'{PATIENT}'",)),
              Slot("$XDSDocumentEntryStatus",
                   ("('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')",))]
    if slot_home:
        params.append(Slot("$homeCommunityId", (f"'{slot_home}'",)))
    return parse_xml(etree.tostring(render_adhoc_query_request(AdhocQuery(
        StoredQuery.FIND_DOCUMENTS, tuple(params), return_type="LeafClass", home=home))))


def registry_answering(*ids: str, errors: list[XdsError] | None = None,
                       status: str = ResponseStatus.SUCCESS, home: str | None = None
                       ) -> Responder:
    def respond(url: str, action: str, body: etree._Element, spool: Path | None) -> SoapReply:
        objects = [ExtrinsicObject(id=i, object_type=ENTRY_TYPE, mime_type="text/plain",
                                   home=home) for i in ids]
        return reply(render_adhoc_query_response(status, objects, errors or []))
    return respond


def query(services: Services, tmp: Path, body: etree._Element) -> etree._Element:
    resp = responding.cross_gateway_query(
        services, ctx(tmp, "/xca/responding", Action.ITI38), body).body  # type: ignore[arg-type]
    assert_valid(resp)
    return resp


def test_iti38_is_answered_by_the_remote_registry_with_our_home(pool: FakePool,
                                                                 tmp_path: Path) -> None:
    pool.responders["g"] = registry_answering("urn:uuid:e1", "urn:uuid:e2",
                                              home="urn:oid:9.9.9")
    services = Services(config(tmp_path))
    resp = query(services, tmp_path, find_documents(home=HOME, slot_home=HOME))
    parsed = parse_adhoc_query_response(resp)
    assert parsed.status == ResponseStatus.SUCCESS
    assert [o.id for o in parsed.objects] == ["urn:uuid:e1", "urn:uuid:e2"]
    assert {getattr(o, "home", None) for o in parsed.objects} == {HOME}
    [(url, action, sent)] = pool.calls
    assert (url, action) == ("https://g.example/xds/registry", Action.ITI18)
    aq = sent.find(q(RIM, "AdhocQuery"))
    assert aq is not None and aq.get("home") is None
    assert [s.get("name") for s in aq.iterfind(q(RIM, "Slot"))] == [
        "$XDSDocumentEntryPatientId", "$XDSDocumentEntryStatus"]
    assert services.audit.records == [("ITI-18", "https://g.example/xds/registry", None)]


def test_iti38_registry_errors_are_kept_located_at_our_home(pool: FakePool,
                                                            tmp_path: Path) -> None:
    pool.responders["g"] = registry_answering(
        "urn:uuid:e1", status=ResponseStatus.PARTIAL_SUCCESS,
        errors=[XdsError(ErrorCode.TOO_MANY_RESULTS, "too many", location="registry-x")])
    resp = query(Services(config(tmp_path)), tmp_path, find_documents())
    parsed = parse_adhoc_query_response(resp)
    assert parsed.status == ResponseStatus.PARTIAL_SUCCESS
    assert [(e.code, e.location) for e in parsed.errors] == [(ErrorCode.TOO_MANY_RESULTS, HOME)]


@pytest.mark.parametrize("responder", [
    refusing,
    lambda *_a: reply(etree.Element(q(SOAP12, "Fault"))),
    lambda *_a: reply(etree.Element(q(XDSB, "RetrieveDocumentSetResponse"))),
    lambda *_a: reply(render_adhoc_query_response("bogus", [])),
])
def test_iti38_registry_down_or_unusable_is_a_registry_error(pool: FakePool, tmp_path: Path,
                                                             responder: Responder) -> None:
    pool.responders["g"] = responder
    services = Services(config(tmp_path))
    parsed = parse_adhoc_query_response(query(services, tmp_path, find_documents()))
    assert parsed.status == ResponseStatus.FAILURE
    assert parsed.objects == ()
    [error] = parsed.errors
    assert (error.code, error.location) == (ErrorCode.REGISTRY_ERROR, HOME)
    assert "registry" in error.context and PATIENT not in error.context
    [(transaction, _url, outcome)] = services.audit.records
    assert transaction == "ITI-18"
    assert (outcome is None) == (responder is not refusing)


def test_iti38_home_rules_apply_before_the_registry_is_asked(pool: FakePool,
                                                             tmp_path: Path) -> None:
    body = parse_xml(etree.tostring(render_adhoc_query_request(AdhocQuery(
        StoredQuery.GET_DOCUMENTS, (Slot("$XDSDocumentEntryUniqueId", ("('1.2.3')",)),)))))
    parsed = parse_adhoc_query_response(query(Services(config(tmp_path)), tmp_path, body))
    assert [(e.code, e.location) for e in parsed.errors] == [
        (ErrorCode.MISSING_HOME_COMMUNITY_ID, HOME)]
    parsed = parse_adhoc_query_response(
        query(Services(config(tmp_path)), tmp_path, find_documents(home="urn:oid:9.9")))
    assert [e.code for e in parsed.errors] == [ErrorCode.UNKNOWN_COMMUNITY]
    assert pool.calls == []


def test_iti18_request_drops_only_what_a_gateway_reads() -> None:
    body = find_documents(home=HOME, slot_home=HOME)
    out = remote_registry.iti18_request(body)
    assert out is not body
    aq = out.find(q(RIM, "AdhocQuery"))
    assert aq is not None and aq.get("home") is None and aq.get("id") == \
        StoredQuery.FIND_DOCUMENTS
    assert "$homeCommunityId" not in {s.get("name") for s in aq.iter(q(RIM, "Slot"))}
    original = body.find(q(RIM, "AdhocQuery"))
    assert original is not None and original.get("home") == HOME  # the input is untouched


# --- ITI-39 -> built-in repository + ITI-43 to remote repositories ---------------------------

def repository_answering(*, inline: bool = False, errors: list[XdsError] | None = None,
                         status: str | None = None) -> Responder:
    """Answers every DocumentRequest with b"doc:<uid>" (MTOM part, or inline base64), except
    uids ending in .404 (XDSMissingDocument)."""
    def respond(url: str, action: str, body: etree._Element, spool: Path | None) -> SoapReply:
        assert spool is not None and spool.is_dir()
        errs = list(errors or [])
        resp = etree.Element(q(XDSB, "RetrieveDocumentSetResponse"),
                             nsmap={"xdsb": XDSB, "xop": XOP})
        docs = []
        for d in body.iter(q(XDSB, "DocumentRequest")):
            uid = d.findtext(q(XDSB, "DocumentUniqueId")) or ""
            repo = d.findtext(q(XDSB, "RepositoryUniqueId")) or ""
            if uid.endswith(".404"):
                errs.append(XdsError(ErrorCode.MISSING_DOCUMENT, f"{uid} unknown",
                                     location=uid))
            else:
                docs.append((repo, uid))
        render_registry_response(status or (
            ResponseStatus.PARTIAL_SUCCESS if errs and docs else
            ResponseStatus.FAILURE if errs else ResponseStatus.SUCCESS), errs, parent=resp)
        attachments = {}
        for n, (repo, uid) in enumerate(docs):
            dr = etree.SubElement(resp, q(XDSB, "DocumentResponse"))
            etree.SubElement(dr, q(XDSB, "RepositoryUniqueId")).text = repo
            etree.SubElement(dr, q(XDSB, "DocumentUniqueId")).text = uid
            etree.SubElement(dr, q(XDSB, "mimeType")).text = "text/plain"
            doc = etree.SubElement(dr, q(XDSB, "Document"))
            data = f"doc:{uid}".encode()
            if inline:
                doc.text = base64.b64encode(data).decode()
            else:
                path = spool / f"part{n}"
                path.write_bytes(data)
                cid = f"p{n}@remote"
                etree.SubElement(doc, q(XOP, "Include"), href=f"cid:{cid}")
                attachments[cid] = Attachment(cid, path, len(data), "text/plain")
        return reply(parse_xml(etree.tostring(resp)), attachments)
    return respond


def local_repository(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> list[str]:
    """Replaces the built-in repository: serves OWN_REPO, XDSUnknownRepositoryId otherwise."""
    asked: list[str] = []

    def retrieve(_services: Any, request: RetrieveDocumentSetRequest
                 ) -> tuple[str, list[RetrievedDocument], list[XdsError]]:
        docs, errors = [], []
        for r in request.documents:
            asked.append(r.document_unique_id)
            if r.repository_unique_id != OWN_REPO:
                errors.append(XdsError(ErrorCode.UNKNOWN_REPOSITORY_ID, "unknown",
                                       location=r.document_unique_id))
                continue
            path = tmp / f"local-{r.document_unique_id}"
            path.write_bytes(f"local:{r.document_unique_id}".encode())
            docs.append(RetrievedDocument(r.repository_unique_id, r.document_unique_id,
                                          "text/plain", path, path.stat().st_size,
                                          r.home_community_id))
        return ResponseStatus.SUCCESS, docs, errors
    monkeypatch.setattr(responding.repository, "retrieve", retrieve)
    return asked


def retrieve(services: Services, tmp: Path, *requests_: DocumentRequest):
    body = parse_xml(etree.tostring(render_retrieve_document_set_request(
        RetrieveDocumentSetRequest(tuple(requests_)))))
    resp = responding.cross_gateway_retrieve(
        services, ctx(tmp, "/xca/responding", Action.ITI39), body)  # type: ignore[arg-type]
    assert_valid(resp.body)
    parsed = parse_retrieve_document_set_response(resp.body)
    by_cid = {a.content_id: a for a in resp.attachments}
    contents = {d.document_unique_id: by_cid[d.content_id or ""].path.read_bytes()
                for d in parsed.documents}
    return resp, parsed, contents


def test_iti39_is_routed_per_repository_and_merged(pool: FakePool, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    asked_locally = local_repository(monkeypatch, tmp_path)
    pool.responders["r"] = repository_answering()
    pool.responders["x"] = refusing
    services = Services(config(tmp_path))
    _resp, parsed, contents = retrieve(
        services, tmp_path,
        DocumentRequest(OWN_REPO, "1.1", HOME),
        DocumentRequest(REPO_R, "2.1", HOME),
        DocumentRequest(REPO_R, "2.2.404", HOME),
        DocumentRequest(REPO_X, "3.1", HOME),
        DocumentRequest(REPO_R, "2.3", "urn:oid:9.9"),  # another community: not sent
        DocumentRequest("1.2.3.4.1.99", "4.1", HOME))  # nobody's: the built-in one says so
    assert parsed.status == ResponseStatus.PARTIAL_SUCCESS
    assert contents == {"1.1": b"local:1.1", "2.1": b"doc:2.1"}
    assert {(d.document_unique_id, d.repository_unique_id, d.home_community_id)
            for d in parsed.documents} == {("1.1", OWN_REPO, HOME), ("2.1", REPO_R, HOME)}
    assert sorted((e.code, e.location) for e in parsed.errors) == sorted([
        (ErrorCode.MISSING_DOCUMENT, HOME), (ErrorCode.REPOSITORY_ERROR, HOME),
        (ErrorCode.UNKNOWN_COMMUNITY, HOME), (ErrorCode.UNKNOWN_REPOSITORY_ID, HOME)])
    [down] = [e for e in parsed.errors if e.code == ErrorCode.REPOSITORY_ERROR]
    assert "3.1" in down.context and REPO_X in down.context
    assert asked_locally == ["1.1", "4.1"]
    sent = {url: body for url, _a, body in pool.calls}
    assert {a for _u, a, _b in pool.calls} == {Action.ITI43}
    r_body = sent["https://r.example/xds/repository"]
    assert [d.findtext(q(XDSB, "DocumentUniqueId")) for d in
            r_body.iter(q(XDSB, "DocumentRequest"))] == ["2.1", "2.2.404"]
    assert r_body.find(f".//{q(XDSB, 'HomeCommunityId')}") is None
    assert sorted(services.audit.records) == [
        ("ITI-43", "https://r.example/xds/repository", None),
        ("ITI-43", "https://x.example/xds/repository", 8)]


def test_iti39_inline_answers_become_files(pool: FakePool, tmp_path: Path) -> None:
    pool.responders["r"] = repository_answering(inline=True)
    resp, parsed, contents = retrieve(Services(config(tmp_path)), tmp_path,
                                      DocumentRequest(REPO_R, "2.1", HOME))
    assert parsed.status == ResponseStatus.SUCCESS
    assert contents == {"2.1": b"doc:2.1"}
    assert resp.attachments[0].content_type == "text/plain"


def test_iti39_every_remote_failing_is_a_failure(pool: FakePool, tmp_path: Path) -> None:
    pool.responders["r"] = lambda *_a: reply(etree.Element(q(SOAP12, "Fault")))
    pool.responders["x"] = refusing
    _resp, parsed, _c = retrieve(Services(config(tmp_path)), tmp_path,
                                 DocumentRequest(REPO_R, "2.1", HOME),
                                 DocumentRequest(REPO_X, "3.1", HOME))
    assert parsed.status == ResponseStatus.FAILURE
    assert sorted((e.code, e.location) for e in parsed.errors) == [
        (ErrorCode.REPOSITORY_ERROR, HOME)] * 2


def test_iti39_content_missing_from_the_answer(pool: FakePool, tmp_path: Path) -> None:
    answer = repository_answering()

    def lose_parts(url: str, action: str, body: etree._Element, spool: Path | None
                   ) -> SoapReply:
        r = answer(url, action, body, spool)
        r.attachments.clear()
        return r
    pool.responders["r"] = lose_parts
    _resp, parsed, _c = retrieve(Services(config(tmp_path)), tmp_path,
                                 DocumentRequest(REPO_R, "2.1", HOME))
    assert parsed.status == ResponseStatus.FAILURE
    assert [(e.code, e.location) for e in parsed.errors] == [(ErrorCode.REPOSITORY_ERROR, HOME)]


# --- RAD-75 -> built-in source + RAD-69 to remote imaging sources ----------------------------

STUDY, SERIES, SERIES2 = "1.2.3.1", "1.2.3.2", "1.2.3.3"


def rad75(*docs: tuple[str, str, str, str | None]) -> etree._Element:
    """(series, SOP Instance UID, RepositoryUniqueId, HomeCommunityId) of study STUDY."""
    root = etree.Element(q(XDSI, "RetrieveImagingDocumentSetRequest"),
                         nsmap={"xdsi": XDSI, "xdsb": XDSB})
    study = etree.SubElement(root, q(XDSI, "StudyRequest"), studyInstanceUID=STUDY)
    series: dict[str, etree._Element] = {}
    for ser, sop, repo, home in docs:
        if ser not in series:
            series[ser] = etree.SubElement(study, q(XDSI, "SeriesRequest"),
                                           seriesInstanceUID=ser)
        dr = etree.SubElement(series[ser], q(XDSB, "DocumentRequest"))
        if home:
            etree.SubElement(dr, q(XDSB, "HomeCommunityId")).text = home
        etree.SubElement(dr, q(XDSB, "RepositoryUniqueId")).text = repo
        etree.SubElement(dr, q(XDSB, "DocumentUniqueId")).text = sop
    tsl = etree.SubElement(root, q(XDSI, "TransferSyntaxUIDList"))
    etree.SubElement(tsl, q(XDSI, "TransferSyntaxUID")).text = EXPLICIT_LE
    return root


@pytest.fixture
def pacs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The built-in source's PACS steps replaced: every instance is found and fetched."""
    asked: list[str] = []

    def resolve(_pacs: object, docs: list[ImagingDocumentRequest]) -> Resolution:
        from gateway.dicom.retrieve import InstanceRef
        out = Resolution()
        for d in docs:
            asked.append(d.document_unique_id)
            out.found.append((InstanceRef(d.study_uid, d.series_uid, d.document_unique_id,
                                          "1.2.840.10008.5.1.4.1.1.1"), d))
        return out

    def fetch(_services: object, resolution: Resolution, syntaxes: tuple[str, ...],
              spool: Path) -> tuple[list[RetrievedDocument], list[XdsError]]:
        spool.mkdir(parents=True, exist_ok=True)
        docs = []
        for ref, d in resolution.found:
            path = spool / ref.sop_instance_uid
            path.write_bytes(b"PACS" + ref.sop_instance_uid.encode())
            docs.append(RetrievedDocument(d.repository_unique_id, d.document_unique_id,
                                          "application/dicom", path, path.stat().st_size))
        return docs, []
    monkeypatch.setattr(rad69, "resolve", resolve)
    monkeypatch.setattr(rad69, "fetch", fetch)
    return asked


def retrieve_imaging(services: Services, tmp: Path, body: etree._Element):
    c = ctx(tmp, "/xcai/responding", Action.RAD75)
    resp = responding_imaging.cross_gateway_retrieve_imaging(
        services, c, parse_xml(etree.tostring(body)))  # type: ignore[arg-type]
    assert_valid(resp.body)
    assert resp.cleanup == [c.spool_dir / "rad75"]
    parsed = parse_retrieve_document_set_response(resp.body)
    by_cid = {a.content_id: a for a in resp.attachments}
    contents = {d.document_unique_id: by_cid[d.content_id or ""].path.read_bytes()
                for d in parsed.documents}
    assert all(a.content_type == "application/dicom" for a in resp.attachments)
    assert all(str(a.path).startswith(str(c.spool_dir / "rad75")) for a in resp.attachments)
    return parsed, contents


def test_rad75_is_routed_per_imaging_source_and_consolidated(
        pool: FakePool, tmp_path: Path, pacs: list[str]) -> None:
    pool.responders["i"] = repository_answering()
    pool.responders["s"] = sleeping(5)  # beyond retrieve_timeout_seconds = 1
    services = Services(config(tmp_path, retrieve_timeout=1))
    started = time.monotonic()
    parsed, contents = retrieve_imaging(services, tmp_path, rad75(
        (SERIES, "1.2.3.2.1", OWN_SOURCE, HOME),
        (SERIES, "1.2.3.2.2", SOURCE_I, HOME),
        (SERIES2, "1.2.3.3.1", SOURCE_I, HOME),
        (SERIES2, "1.2.3.3.404", SOURCE_I, HOME),
        (SERIES, "1.2.3.2.3", SOURCE_S, HOME),
        (SERIES, "1.2.3.2.4", SOURCE_I, None)))
    assert time.monotonic() - started < 4
    assert parsed.status == ResponseStatus.PARTIAL_SUCCESS
    assert contents == {"1.2.3.2.1": b"PACS1.2.3.2.1", "1.2.3.2.2": b"doc:1.2.3.2.2",
                        "1.2.3.3.1": b"doc:1.2.3.3.1"}
    assert all(d.home_community_id == HOME for d in parsed.documents)
    assert {d.document_unique_id: d.repository_unique_id for d in parsed.documents} == {
        "1.2.3.2.1": OWN_SOURCE, "1.2.3.2.2": SOURCE_I, "1.2.3.3.1": SOURCE_I}
    assert sorted((e.code, e.location) for e in parsed.errors) == sorted([
        (ErrorCode.MISSING_DOCUMENT, HOME), (ErrorCode.REPOSITORY_ERROR, HOME),
        (ErrorCode.MISSING_HOME_COMMUNITY_ID, HOME)])
    [slow] = [e for e in parsed.errors if e.code == ErrorCode.REPOSITORY_ERROR]
    assert "1.2.3.2.3" in slow.context and "did not answer within 1 s" in slow.context
    assert pacs == ["1.2.3.2.1"]
    sent = {url: body for url, _a, body in pool.calls}
    assert {a for _u, a, _b in pool.calls} == {Action.RAD69}
    i_request = parse_request(sent["https://i.example/xdsi/imaging-source"])
    assert [(d.study_uid, d.series_uid, d.document_unique_id, d.home_community_id)
            for d in i_request.documents] == [
        (STUDY, SERIES, "1.2.3.2.2", None), (STUDY, SERIES2, "1.2.3.3.1", None),
        (STUDY, SERIES2, "1.2.3.3.404", None)]
    assert i_request.transfer_syntaxes == (EXPLICIT_LE,)
    assert sorted(services.audit.records) == [
        ("RAD-69", "https://i.example/xdsi/imaging-source", None),
        ("RAD-69", "https://s.example/xdsi/imaging-source", 8)]


def test_rad75_only_remote_sources_do_not_touch_the_pacs(pool: FakePool, tmp_path: Path,
                                                         pacs: list[str]) -> None:
    pool.responders["i"] = repository_answering()
    parsed, contents = retrieve_imaging(Services(config(tmp_path)), tmp_path, rad75(
        (SERIES, "1.2.3.2.2", SOURCE_I, HOME)))
    assert parsed.status == ResponseStatus.SUCCESS
    assert contents == {"1.2.3.2.2": b"doc:1.2.3.2.2"}
    assert pacs == []


def test_rad75_invalid_document_is_not_sent_to_a_remote(pool: FakePool, tmp_path: Path,
                                                        pacs: list[str]) -> None:
    body = rad69_request([(STUDY, SERIES, "not-a-uid")], [EXPLICIT_LE], repository=SOURCE_I,
                         home_community_id=HOME)
    parsed, _contents = retrieve_imaging(Services(config(tmp_path)), tmp_path, body)
    assert parsed.status == ResponseStatus.FAILURE
    assert [(e.code, e.location) for e in parsed.errors] == [("urn:dicom:wado:0012", HOME)]
    assert pool.calls == []


def test_rad69_request_groups_by_study_and_series() -> None:
    docs = [ImagingDocumentRequest("1.1", "1.1.1", SOURCE_I, "1.1.1.1", HOME),
            ImagingDocumentRequest("1.2", "1.2.1", SOURCE_I, "1.2.1.1"),
            ImagingDocumentRequest("1.1", "1.1.1", SOURCE_I, "1.1.1.2"),
            ImagingDocumentRequest("1.1", "1.1.2", SOURCE_I, "1.1.2.1")]
    el = responding_imaging.rad69_request(docs, (EXPLICIT_LE, "1.2.840.10008.1.2"))
    assert_valid(el)
    studies = [(s.get("studyInstanceUID"), [(r.get("seriesInstanceUID"), [
        d.findtext(q(XDSB, "DocumentUniqueId")) for d in r.iter(q(XDSB, "DocumentRequest"))])
        for r in s.iter(q(XDSI, "SeriesRequest"))]) for s in el.iter(q(XDSI, "StudyRequest"))]
    assert studies == [("1.1", [("1.1.1", ["1.1.1.1", "1.1.1.2"]), ("1.1.2", ["1.1.2.1"])]),
                       ("1.2", [("1.2.1", ["1.2.1.1"])])]
    assert el.find(f".//{q(XDSB, 'HomeCommunityId')}") is None
    assert parse_request(el).transfer_syntaxes == (EXPLICIT_LE, "1.2.840.10008.1.2")


# --- in_background ---------------------------------------------------------------------------

def test_in_background_returns_the_value_or_raises_the_error() -> None:
    caller = threading.get_ident()
    assert remote_retrieve.in_background(lambda: threading.get_ident() != caller).result()

    def fail() -> None:
        raise ValueError("boom")
    with pytest.raises(ValueError, match="boom"):
        remote_retrieve.in_background(fail).result()
