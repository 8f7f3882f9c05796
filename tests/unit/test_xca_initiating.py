"""The initiating gateways without a network: routing, patient id cross-reference, merging,
partial success and the bounded fan-out, against a fake outbound pool."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from gateway.config import GatewayConfig, from_dict
from gateway.ebrim.model import AdhocQuery, DocumentRequest, ObjectRef, RetrieveDocumentSetRequest
from gateway.ebrim.model import Slot as RimSlot
from gateway.ebrim.parse import parse_adhoc_query_response, parse_retrieve_document_set_response
from gateway.ebrim.render import (
    render_adhoc_query_request,
    render_adhoc_query_response,
    render_retrieve_document_set_request,
)
from gateway.errors import XdsError
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
from gateway.xca import initiating, initiating_imaging
from gateway.xca.outbound import run_bounded, split_url
from tests.support.config import plain_community
from tests.support.outbound import Audit, FakePool, Responder, refusing, reply

B = "urn:oid:1.2.3.4.2"
C = "urn:oid:1.2.3.4.3"
D = "urn:oid:1.2.3.4.4"  # configured, never answers
PATIENT = "P1^^^&1.2.3.9&ISO"
PATIENT_IN_C = "C-77^^^&1.2.3.10&ISO"


def config(*homes: str, patient_ids: dict[str, dict[str, str]] | None = None,
           **xca: int) -> GatewayConfig:
    raw: dict[str, Any] = {
        **plain_community(),
        "xca": {"query_timeout_seconds": 2, "retrieve_timeout_seconds": 2, **xca},
        "communities": [{
            "home_community_id": h,
            "query_url": f"https://{h[-1]}.example/xca/responding",
            "retrieve_url": f"https://{h[-1]}.example/xca/responding",
            "imaging_retrieve_url": f"https://{h[-1]}.example/xcai/responding",
            **({"patient_ids": (patient_ids or {})[h]} if h in (patient_ids or {}) else {}),
        } for h in homes],
    }
    return from_dict(raw, Path("/tmp"))


class Services:
    def __init__(self, cfg: GatewayConfig):
        self.config = cfg
        self.audit = Audit()


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakePool]:
    fake = FakePool({})
    monkeypatch.setattr(initiating, "pool_for", lambda _cfg: fake)
    yield fake


def ctx(tmp_path: Path) -> RequestContext:
    return RequestContext("/xca/initiating", Action.ITI18, None, None, {}, tmp_path)


def entry(entry_id: str, home: str | None = None) -> etree._Element:
    el = etree.Element(q(RIM, "ExtrinsicObject"), id=entry_id,
                       objectType="urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1",
                       mimeType="text/plain")
    if home:
        el.set("home", home)
    return el


def answering(*objects: etree._Element, errors: list[XdsError] | None = None,
              status: str = ResponseStatus.SUCCESS) -> Responder:
    def respond(url: str, action: str, body: etree._Element, spool: Path | None) -> SoapReply:
        resp = render_adhoc_query_response(status, [], errors or [])
        rol = resp.find(q(RIM, "RegistryObjectList"))
        assert rol is not None
        for o in objects:
            rol.append(etree.fromstring(etree.tostring(o)))
        return reply(resp)
    return respond


def sleeping(seconds: float) -> Responder:
    def respond(url: str, action: str, body: etree._Element, spool: Path | None) -> SoapReply:
        time.sleep(seconds)
        return answering()(url, action, body, spool)
    return respond


def find_documents(patient: str = PATIENT, home: str | None = None) -> etree._Element:
    return render_adhoc_query_request(AdhocQuery(
        query_id=StoredQuery.FIND_DOCUMENTS, home=home, return_type="LeafClass", parameters=(
            RimSlot("$XDSDocumentEntryPatientId", (f"'{patient}'",)),
            RimSlot("$XDSDocumentEntryStatus",
                    ("('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')",)))))


def get_documents(home: str | None = None, slot_home: str | None = None) -> etree._Element:
    params = [RimSlot("$XDSDocumentEntryUniqueId", ("('1.2.3.99')",))]
    if slot_home:
        params.append(RimSlot("$homeCommunityId", (f"'{slot_home}'",)))
    return render_adhoc_query_request(AdhocQuery(
        query_id=StoredQuery.GET_DOCUMENTS, home=home, parameters=tuple(params)))


def home_sent(body: etree._Element) -> str | None:
    aq = body.find(q(RIM, "AdhocQuery"))
    assert aq is not None
    return aq.get("home")


def sent_patient(body: etree._Element) -> list[str]:
    return initiating.patient_ids_of(body)


# --- ITI-18 -> ITI-38 -------------------------------------------------------------------------

def test_find_documents_fans_out_to_every_community_and_merges_with_homes(
        pool: FakePool, tmp_path: Path) -> None:
    pool.responders = {"2": answering(entry("urn:uuid:b1"), entry("urn:uuid:b2")),
                       "3": answering(entry("urn:uuid:c1", home="urn:oid:9.9.9"))}
    services = Services(config(B, C))
    out = initiating.stored_query(services, ctx(tmp_path), find_documents())
    resp = parse_adhoc_query_response(out.body)
    assert resp.status == ResponseStatus.SUCCESS
    homes = {o.id: o.home for o in resp.objects}
    # the responder's home is kept; a missing one is set to the community that returned it
    assert homes == {"urn:uuid:b1": B, "urn:uuid:b2": B, "urn:uuid:c1": "urn:oid:9.9.9"}
    assert sorted(c[0] for c in pool.calls) == ["https://2.example/xca/responding",
                                                 "https://3.example/xca/responding"]
    assert {c[1] for c in pool.calls} == {Action.ITI38}
    assert all(home_sent(c[2]) is None for c in pool.calls)
    assert sorted(services.audit.records) == [
        ("ITI-38", "https://2.example/xca/responding", None),
        ("ITI-38", "https://3.example/xca/responding", None)]


def test_a_failing_community_gives_partial_success_with_its_location(
        pool: FakePool, tmp_path: Path) -> None:
    pool.responders = {"2": answering(entry("urn:uuid:b1")), "3": refusing}
    services = Services(config(B, C))
    resp = parse_adhoc_query_response(
        initiating.stored_query(services, ctx(tmp_path), find_documents()).body)
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert [o.id for o in resp.objects] == ["urn:uuid:b1"]
    assert [(e.code, e.location) for e in resp.errors] == [
        (ErrorCode.UNAVAILABLE_COMMUNITY, C)]
    assert "could not be reached" in resp.errors[0].context
    assert ("ITI-38", "https://3.example/xca/responding",
            initiating.OUTCOME_SERIOUS_FAILURE) in services.audit.records


def test_a_slow_community_is_cut_off_at_its_timeout(pool: FakePool, tmp_path: Path) -> None:
    pool.responders = {"2": answering(entry("urn:uuid:b1")), "3": sleeping(30)}
    services = Services(config(B, C, query_timeout_seconds=1))
    t0 = time.monotonic()
    resp = parse_adhoc_query_response(
        initiating.stored_query(services, ctx(tmp_path), find_documents()).body)
    assert time.monotonic() - t0 < 10  # bounded by the 1 s timeout, not the 30 s sleep
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert [(e.code, e.location) for e in resp.errors] == [
        (ErrorCode.UNAVAILABLE_COMMUNITY, C)]
    assert "did not answer within 1 s" in resp.errors[0].context


def test_every_community_failing_is_a_failure(pool: FakePool, tmp_path: Path) -> None:
    pool.responders = {"2": refusing, "3": refusing}
    resp = parse_adhoc_query_response(
        initiating.stored_query(Services(config(B, C)), ctx(tmp_path), find_documents()).body)
    assert resp.status == ResponseStatus.FAILURE
    assert sorted(e.location or "" for e in resp.errors) == [B, C]


def test_responder_errors_are_kept_and_located(pool: FakePool, tmp_path: Path) -> None:
    pool.responders = {
        "2": answering(errors=[XdsError(ErrorCode.REGISTRY_ERROR, "boom")],
                       status=ResponseStatus.FAILURE),
        "3": answering(entry("urn:uuid:c1")),
    }
    resp = parse_adhoc_query_response(
        initiating.stored_query(Services(config(B, C)), ctx(tmp_path), find_documents()).body)
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert [(e.code, e.context, e.location) for e in resp.errors] == [
        (ErrorCode.REGISTRY_ERROR, "boom", B)]


def test_soap_fault_and_wrong_body_are_unavailable(pool: FakePool, tmp_path: Path) -> None:
    def fault(url: str, action: str, body: etree._Element, spool: Path | None) -> SoapReply:
        f = etree.Element(q(SOAP12, "Fault"))
        code = etree.SubElement(f, q(SOAP12, "Code"))
        etree.SubElement(code, q(SOAP12, "Value")).text = "env:Receiver"
        reason = etree.SubElement(f, q(SOAP12, "Reason"))
        etree.SubElement(reason, q(SOAP12, "Text")).text = "not implemented yet"
        return reply(f)

    def wrong(url: str, action: str, body: etree._Element, spool: Path | None) -> SoapReply:
        return reply(etree.Element("{urn:x}Other"))

    pool.responders = {"2": fault, "3": wrong}
    resp = parse_adhoc_query_response(
        initiating.stored_query(Services(config(B, C)), ctx(tmp_path), find_documents()).body)
    assert resp.status == ResponseStatus.FAILURE
    contexts = sorted(e.context for e in resp.errors)
    assert "SOAP fault env:Receiver not implemented yet" in contexts[0]
    assert "unexpected Other" in contexts[1]


def test_patient_id_is_translated_per_community(pool: FakePool, tmp_path: Path) -> None:
    pool.responders = {"2": answering(), "3": answering()}
    cfg = config(B, C, patient_ids={C: {PATIENT: PATIENT_IN_C}})
    initiating.stored_query(Services(cfg), ctx(tmp_path), find_documents())
    sent = {c[0][8]: sent_patient(c[2]) for c in pool.calls}
    assert sent == {"2": [PATIENT], "3": [PATIENT_IN_C]}


def test_community_whose_cross_reference_lacks_the_patient_is_not_asked(
        pool: FakePool, tmp_path: Path) -> None:
    pool.responders = {"2": answering(entry("urn:uuid:b1")), "3": answering()}
    cfg = config(B, C, patient_ids={C: {"OTHER^^^&1.2.3.9&ISO": PATIENT_IN_C}})
    resp = parse_adhoc_query_response(
        initiating.stored_query(Services(cfg), ctx(tmp_path), find_documents()).body)
    assert [c[0][8] for c in pool.calls] == ["2"]
    assert resp.status == ResponseStatus.SUCCESS and len(resp.objects) == 1


def test_get_documents_goes_only_to_the_named_home(pool: FakePool, tmp_path: Path) -> None:
    pool.responders = {"2": answering(), "3": answering(entry("urn:uuid:c1"))}
    for body in (get_documents(home=C), get_documents(slot_home=C)):
        pool.calls.clear()
        resp = parse_adhoc_query_response(
            initiating.stored_query(Services(config(B, C)), ctx(tmp_path), body).body)
        assert [c[0][8] for c in pool.calls] == ["3"]
        assert home_sent(pool.calls[0][2]) == C
        assert [(o.id, o.home) for o in resp.objects] == [("urn:uuid:c1", C)]


def test_get_documents_without_home_among_several_is_missing_home(
        pool: FakePool, tmp_path: Path) -> None:
    resp = parse_adhoc_query_response(initiating.stored_query(
        Services(config(B, C)), ctx(tmp_path), get_documents()).body)
    assert resp.status == ResponseStatus.FAILURE
    assert [e.code for e in resp.errors] == [ErrorCode.MISSING_HOME_COMMUNITY_ID]
    assert pool.calls == []


def test_get_documents_without_home_and_one_community_goes_there(
        pool: FakePool, tmp_path: Path) -> None:
    pool.responders = {"2": answering(entry("urn:uuid:b1"))}
    resp = parse_adhoc_query_response(initiating.stored_query(
        Services(config(B)), ctx(tmp_path), get_documents()).body)
    assert resp.status == ResponseStatus.SUCCESS
    assert home_sent(pool.calls[0][2]) == B


@pytest.mark.parametrize("body", [get_documents(home="urn:oid:7.7.7"),
                                  find_documents(home="urn:oid:7.7.7")])
def test_an_unconfigured_home_is_unknown_community(pool: FakePool, tmp_path: Path,
                                                   body: etree._Element) -> None:
    resp = parse_adhoc_query_response(
        initiating.stored_query(Services(config(B, C)), ctx(tmp_path), body).body)
    assert resp.status == ResponseStatus.FAILURE
    assert [(e.code, e.location) for e in resp.errors] == [
        (ErrorCode.UNKNOWN_COMMUNITY, "urn:oid:7.7.7")]
    assert pool.calls == []


def test_conflicting_homes_and_unknown_query_are_errors(pool: FakePool, tmp_path: Path) -> None:
    resp = parse_adhoc_query_response(initiating.stored_query(
        Services(config(B, C)), ctx(tmp_path), get_documents(home=B, slot_home=C)).body)
    assert [e.code for e in resp.errors] == [ErrorCode.REGISTRY_ERROR]
    unknown = render_adhoc_query_request(AdhocQuery(query_id="urn:uuid:0000"))
    resp = parse_adhoc_query_response(
        initiating.stored_query(Services(config(B, C)), ctx(tmp_path), unknown).body)
    assert [e.code for e in resp.errors] == [ErrorCode.UNKNOWN_STORED_QUERY]


def test_object_refs_get_their_home_too(pool: FakePool, tmp_path: Path) -> None:
    def refs(url: str, action: str, body: etree._Element, spool: Path | None) -> SoapReply:
        return reply(render_adhoc_query_response(ResponseStatus.SUCCESS,
                                                 [ObjectRef("urn:uuid:r1")]))
    pool.responders = {"2": refs}
    resp = parse_adhoc_query_response(
        initiating.stored_query(Services(config(B)), ctx(tmp_path), find_documents()).body)
    assert resp.objects == (ObjectRef("urn:uuid:r1", home=B),)


# --- ITI-43 -> ITI-39 -------------------------------------------------------------------------

def retrieve_responder(tmp_path: Path, home_in_response: bool = True) -> Responder:
    """Answers each DocumentRequest with a spooled file holding '<uid> from <host>'."""
    def respond(url: str, action: str, body: etree._Element, spool: Path | None) -> SoapReply:
        assert spool is not None and spool.is_dir()
        out = etree.Element(q(XDSB, "RetrieveDocumentSetResponse"))
        etree.SubElement(out, "{urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0}RegistryResponse",
                         status=ResponseStatus.SUCCESS)
        atts: dict[str, Attachment] = {}
        for i, d in enumerate(body.iter(q(XDSB, "DocumentRequest"))):
            uid = d.findtext(q(XDSB, "DocumentUniqueId")) or ""
            path = spool / f"part{i}"
            path.write_bytes(f"{uid} from {url}".encode())
            dr = etree.SubElement(out, q(XDSB, "DocumentResponse"))
            if home_in_response:
                etree.SubElement(dr, q(XDSB, "HomeCommunityId")).text = \
                    d.findtext(q(XDSB, "HomeCommunityId"))
            etree.SubElement(dr, q(XDSB, "RepositoryUniqueId")).text = \
                d.findtext(q(XDSB, "RepositoryUniqueId"))
            etree.SubElement(dr, q(XDSB, "DocumentUniqueId")).text = uid
            etree.SubElement(dr, q(XDSB, "mimeType")).text = "text/plain"
            doc = etree.SubElement(dr, q(XDSB, "Document"))
            etree.SubElement(doc, q(XOP, "Include"), href=f"cid:p{i}@remote")
            atts[f"p{i}@remote"] = Attachment(f"p{i}@remote", path, path.stat().st_size)
        return reply(out, atts)
    return respond


def retrieve_body(*docs: tuple[str | None, str]) -> etree._Element:
    return render_retrieve_document_set_request(RetrieveDocumentSetRequest(tuple(
        DocumentRequest("1.2.3.4.5", uid, home) for home, uid in docs)))


def test_iti43_is_routed_per_community_with_documents_as_files(
        pool: FakePool, tmp_path: Path) -> None:
    pool.responders = {"2": retrieve_responder(tmp_path),
                       "3": retrieve_responder(tmp_path, home_in_response=False)}
    services = Services(config(B, C))
    out = initiating.retrieve_document_set(
        services, ctx(tmp_path), retrieve_body((B, "1.1"), (C, "2.1"), (B, "1.2")))
    resp = parse_retrieve_document_set_response(out.body)
    assert resp.status == ResponseStatus.SUCCESS
    # one request per community, holding that community's documents only
    per_host = {c[0][8]: [d.findtext(q(XDSB, "DocumentUniqueId"))
                          for d in c[2].iterfind(q(XDSB, "DocumentRequest"))]
                for c in pool.calls}
    assert per_host == {"2": ["1.1", "1.2"], "3": ["2.1"]}
    assert {c[1] for c in pool.calls} == {Action.ITI39}
    by_cid = {a.content_id: a for a in out.attachments}
    got = {d.document_unique_id: (d.home_community_id,
                                  by_cid[d.content_id or ""].path.read_text())
           for d in resp.documents}
    assert got == {"1.1": (B, "1.1 from https://2.example/xca/responding"),
                   "1.2": (B, "1.2 from https://2.example/xca/responding"),
                   "2.1": (C, "2.1 from https://3.example/xca/responding")}
    # the files are the spooled ones inside the request's folder: nothing copied to memory
    assert all(tmp_path in a.path.parents for a in out.attachments)
    assert len({a.content_id for a in out.attachments}) == 3


def test_iti43_unknown_and_failing_communities_per_document(
        pool: FakePool, tmp_path: Path) -> None:
    pool.responders = {"2": retrieve_responder(tmp_path), "3": refusing}
    out = initiating.retrieve_document_set(
        Services(config(B, C)), ctx(tmp_path),
        retrieve_body((B, "1.1"), (C, "2.1"), (C, "2.2"), ("urn:oid:7.7", "3.1")))
    resp = parse_retrieve_document_set_response(out.body)
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert [d.document_unique_id for d in resp.documents] == ["1.1"]
    errs = sorted((e.code, e.location or "", e.context.split(":")[0]) for e in resp.errors)
    assert errs == [(ErrorCode.UNAVAILABLE_COMMUNITY, C, "document 2.1"),
                    (ErrorCode.UNAVAILABLE_COMMUNITY, C, "document 2.2"),
                    (ErrorCode.UNKNOWN_COMMUNITY, "urn:oid:7.7", "document 3.1")]


def test_iti43_without_home_among_several_is_missing_home(
        pool: FakePool, tmp_path: Path) -> None:
    out = initiating.retrieve_document_set(Services(config(B, C)), ctx(tmp_path),
                                           retrieve_body((None, "1.1")))
    resp = parse_retrieve_document_set_response(out.body)
    assert resp.status == ResponseStatus.FAILURE
    assert [e.code for e in resp.errors] == [ErrorCode.MISSING_HOME_COMMUNITY_ID]
    assert pool.calls == []


def test_iti43_bad_request_is_a_failure_not_a_trace(pool: FakePool, tmp_path: Path) -> None:
    bad = etree.Element(q(XDSB, "RetrieveDocumentSetRequest"))
    resp = parse_retrieve_document_set_response(
        initiating.retrieve_document_set(Services(config(B)), ctx(tmp_path), bad).body)
    assert resp.status == ResponseStatus.FAILURE and resp.errors


# --- RAD-69 -> RAD-75 -------------------------------------------------------------------------

def rad69_body(*docs: tuple[str, str, str | None, str]) -> etree._Element:
    """(study, series, home, sop) tuples -> RetrieveImagingDocumentSetRequest."""
    root = etree.Element(q(XDSI, "RetrieveImagingDocumentSetRequest"),
                         nsmap={"xdsi": XDSI, "xdsb": XDSB})
    studies: dict[str, etree._Element] = {}
    series_els: dict[tuple[str, str], etree._Element] = {}
    for study, series, home, sop in docs:
        st = studies.get(study)
        if st is None:
            st = studies[study] = etree.SubElement(root, q(XDSI, "StudyRequest"),
                                                   studyInstanceUID=study)
        se = series_els.get((study, series))
        if se is None:
            se = series_els[(study, series)] = etree.SubElement(
                st, q(XDSI, "SeriesRequest"), seriesInstanceUID=series)
        d = etree.SubElement(se, q(XDSB, "DocumentRequest"))
        if home:
            etree.SubElement(d, q(XDSB, "HomeCommunityId")).text = home
        etree.SubElement(d, q(XDSB, "RepositoryUniqueId")).text = "1.2.3.4.5"
        etree.SubElement(d, q(XDSB, "DocumentUniqueId")).text = sop
    tsl = etree.SubElement(root, q(XDSI, "TransferSyntaxUIDList"))
    etree.SubElement(tsl, q(XDSI, "TransferSyntaxUID")).text = "1.2.840.10008.1.2.1"
    return root


def test_rad69_is_split_per_community_keeping_the_tree(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    fake = FakePool({"2": retrieve_responder(tmp_path), "3": retrieve_responder(tmp_path)})
    monkeypatch.setattr(initiating, "pool_for", lambda _cfg: fake)
    body = rad69_body(("1.1", "1.1.1", B, "9.1"), ("1.1", "1.1.2", C, "9.2"),
                      ("1.2", "1.2.1", B, "9.3"), ("1.2", "1.2.1", "urn:oid:7.7", "9.4"))
    out = initiating_imaging.retrieve_imaging_document_set(
        Services(config(B, C)), ctx(tmp_path), body)
    resp = parse_retrieve_document_set_response(out.body)
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert sorted(d.document_unique_id for d in resp.documents) == ["9.1", "9.2", "9.3"]
    assert [(e.code, e.location) for e in resp.errors] == [
        (ErrorCode.UNKNOWN_COMMUNITY, "urn:oid:7.7")]
    sent = {c[0]: c[2] for c in fake.calls}
    assert {c[1] for c in fake.calls} == {Action.RAD75}
    to_b = sent["https://2.example/xcai/responding"]
    assert [(s.get("studyInstanceUID"), [x.get("seriesInstanceUID") for x in s])
            for s in to_b.iterfind(q(XDSI, "StudyRequest"))] == [
        ("1.1", ["1.1.1"]), ("1.2", ["1.2.1"])]
    to_c = sent["https://3.example/xcai/responding"]
    assert [d.findtext(q(XDSB, "DocumentUniqueId"))
            for d in to_c.iter(q(XDSB, "DocumentRequest"))] == ["9.2"]
    assert to_c.findtext(f"{q(XDSI, 'TransferSyntaxUIDList')}/{q(XDSI, 'TransferSyntaxUID')}") \
        == "1.2.840.10008.1.2.1"
    assert all(a.path.is_file() for a in out.attachments) and len(out.attachments) == 3


def test_rad69_not_a_rad69_request(tmp_path: Path) -> None:
    resp = parse_retrieve_document_set_response(initiating_imaging.retrieve_imaging_document_set(
        Services(config(B)), ctx(tmp_path), etree.Element("{urn:x}Nope")).body)
    assert resp.status == ResponseStatus.FAILURE
    assert resp.errors[0].code == ErrorCode.REPOSITORY_ERROR


# --- run_bounded and the pool -----------------------------------------------------------------

def test_run_bounded_limits_parallelism_and_reports_errors() -> None:
    lock = threading.Lock()
    active = [0, 0]  # now, peak

    def work(i: int) -> Callable[[], int]:
        def run() -> int:
            with lock:
                active[0] += 1
                active[1] = max(active[1], active[0])
            time.sleep(0.05)
            with lock:
                active[0] -= 1
            if i == 3:
                raise RuntimeError("three")
            return i * 10
        return run

    out = run_bounded([(i, work(i)) for i in range(8)], max_parallel=3, timeout=5)
    assert active[1] <= 3
    assert {k: o.value for k, o in out.items() if o.ok} == {
        i: i * 10 for i in range(8) if i != 3}
    assert isinstance(out[3].error, RuntimeError) and not out[3].timed_out


def test_run_bounded_abandons_a_hung_call_and_frees_its_slot() -> None:
    release = threading.Event()

    def hang() -> str:
        release.wait(30)
        return "late"

    t0 = time.monotonic()
    out = run_bounded([("hung", hang), ("a", lambda: "a"), ("b", lambda: "b")],
                      max_parallel=1, timeout=0.3)
    elapsed = time.monotonic() - t0
    release.set()
    assert out["hung"].timed_out and out["hung"].value is None
    assert out["a"].value == "a" and out["b"].value == "b"  # ran after the slot was freed
    assert elapsed < 5


def test_split_url() -> None:
    assert split_url("https://h:8443/xca/responding?x=1") == ("https://h:8443",
                                                              "/xca/responding?x=1")
    with pytest.raises(ValueError):
        split_url("ftp://h/x")
