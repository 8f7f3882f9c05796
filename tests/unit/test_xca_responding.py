"""Responding Gateway handlers (ITI-38, ITI-39) and the homeCommunityId rules, against a real
RegistryStore and DocumentStore filled through the real ITI-41 handler with NIST KOS
submissions; every response body validated against the official schemas."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from lxml import etree

from gateway.ebrim.model import (
    AdhocQuery,
    AdhocQueryResponse,
    DocumentRequest,
    ObjectRef,
    RetrieveDocumentSetRequest,
    Slot,
)
from gateway.ebrim.parse import parse_adhoc_query_response, parse_retrieve_document_set_response
from gateway.ebrim.render import render_adhoc_query_request, render_retrieve_document_set_request
from gateway.ebrim.xmlsafe import parse_xml
from gateway.ns import (
    LCM,
    QUERY,
    RIM,
    RS,
    XDSB,
    Action,
    AvailabilityStatus,
    ErrorCode,
    ResponseStatus,
    StoredQuery,
    q,
)
from gateway.registry.stored_queries import QUERIES
from gateway.repository.handlers import provide_and_register
from gateway.services import Services
from gateway.transactions import ENDPOINTS_BY_PATH, RequestContext
from gateway.xca import home as xhome
from gateway.xca.responding import cross_gateway_query, cross_gateway_retrieve
from tests.conftest import CONFORMANCE
from tests.support.services import community_services
from tests.support.xsd import assert_valid

HOME = "urn:oid:1.3.6.1.4.1.21367.13.70.200"
OTHER = "urn:oid:1.2.555.6.7.8"
REPO = "1.3.6.1.4.1.21367.13.71.200"
DE_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
DE_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
SS_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
KOS_PAIRS = [
    ("messages/iti-41/nist-kos/testdata_IDCDEPT001_metadata.xml",
     "dicom/kos/nist/testdata_IDCDEPT001_kos.dcm"),
    ("messages/iti-41/nist-kos/idc_init_XDS-I-idc-a_metadata-IDCDEPT011-a.xml",
     "dicom/kos/nist/idc_init_kos-IDCDEPT011-a.dcm"),
]
APPROVED = f"('{AvailabilityStatus.APPROVED}')"


@dataclass
class Doc:
    entry_uuid: str
    unique_id: str
    patient_id: str
    data: bytes


@dataclass
class Env:
    services: Services
    spool: Path
    docs: list[Doc]

    def ctx(self, action: str) -> RequestContext:
        return RequestContext(endpoint="/xca/responding", action=action,
                              message_id=f"urn:uuid:{uuid.uuid4()}", client_subject=None,
                              attachments={}, spool_dir=self.spool)


def _ext(eo: etree._Element, scheme: str) -> str:
    return next(str(x.get("value")) for x in eo.iter(q(RIM, "ExternalIdentifier"))
                if x.get("identificationScheme") == scheme)


def _submit(services: Services, spool: Path, metadata: Path, kos: Path) -> None:
    sor = parse_xml(metadata.read_bytes())
    assert sor.tag == q(LCM, "SubmitObjectsRequest")
    for x in sor.iter(q(RIM, "ExternalIdentifier")):
        if x.get("identificationScheme") == SS_UNIQUE_ID:
            x.set("value", f"2.25.{uuid.uuid4().int}")
    pnr = etree.Element(q(XDSB, "ProvideAndRegisterDocumentSetRequest"), nsmap={"xdsb": XDSB})
    pnr.append(sor)
    [eo] = list(sor.iter(q(RIM, "ExtrinsicObject")))
    doc = etree.SubElement(pnr, q(XDSB, "Document"), id=str(eo.get("id")))

    doc.text = base64.b64encode(kos.read_bytes()).decode("ascii")
    ctx = RequestContext(endpoint="/xds/repository", action=Action.ITI41, message_id=None,
                         client_subject=None, attachments={}, spool_dir=spool)
    resp = provide_and_register(services, ctx, parse_xml(etree.tostring(pnr)))
    assert resp.body.get("status") == ResponseStatus.SUCCESS, etree.tostring(resp.body)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("xca-responding")
    services, spool = community_services(tmp, HOME, REPO)
    docs: list[Doc] = []
    for meta_rel, kos_rel in KOS_PAIRS:
        _submit(services, spool, CONFORMANCE / meta_rel, CONFORMANCE / kos_rel)
        eo = next(parse_xml((CONFORMANCE / meta_rel).read_bytes()).iter(q(RIM, "ExtrinsicObject")))
        unique_id = _ext(eo, DE_UNIQUE_ID)
        pid = _ext(eo, DE_PATIENT_ID)
        [stored] = [d for d in services.registry.find_documents(pid, [AvailabilityStatus.APPROVED])
                    if any(x.value == unique_id for x in d.external_identifiers)]
        docs.append(Doc(stored.id, unique_id, pid, (CONFORMANCE / kos_rel).read_bytes()))
    yield Env(services, spool, docs)
    services.registry.close()


def _query(env: Env, query: AdhocQuery) -> tuple[etree._Element, AdhocQueryResponse]:
    body = parse_xml(etree.tostring(render_adhoc_query_request(query)))
    resp = cross_gateway_query(env.services, env.ctx(Action.ITI38), body).body
    assert_valid(resp)
    return resp, parse_adhoc_query_response(resp)


def _find(pid: str, home: str | None = None, return_type: str = "LeafClass") -> AdhocQuery:
    return AdhocQuery(StoredQuery.FIND_DOCUMENTS, (
        Slot("$XDSDocumentEntryPatientId", (f"'{pid}'",)),
        Slot("$XDSDocumentEntryStatus", (APPROVED,))), return_type=return_type, home=home)


def _get(uid: str, home: str | None = None, extra: tuple[Slot, ...] = ()) -> AdhocQuery:
    return AdhocQuery(StoredQuery.GET_DOCUMENTS, (
        Slot("$XDSDocumentEntryUniqueId", (f"('{uid}')",)), *extra), home=home)


def _locations(resp: etree._Element) -> set[str | None]:
    return {e.get("location") for e in resp.iter(q(RS, "RegistryError"))}


# --- handlers are wired --------------------------------------------------------------------

def test_transactions_point_at_the_responding_handlers() -> None:
    xca = ENDPOINTS_BY_PATH["/xca/responding"]
    iti38, iti39 = xca.transaction_for(Action.ITI38), xca.transaction_for(Action.ITI39)
    assert iti38 is not None and iti39 is not None
    assert iti38.handler == "gateway.xca.responding:cross_gateway_query"
    assert iti39.handler == "gateway.xca.responding:cross_gateway_retrieve"
    assert iti39.mtom_response
    rad75 = ENDPOINTS_BY_PATH["/xcai/responding"].transaction_for(Action.RAD75)
    assert rad75 is not None and rad75.mtom_response
    assert rad75.response_action == Action.RAD75_RESPONSE
    assert rad75.handler == "gateway.xca.responding_imaging:cross_gateway_retrieve_imaging"


# --- ITI-38 ----------------------------------------------------------------------------------

def test_find_documents_stamps_home_on_every_object(env: Env) -> None:
    doc = env.docs[0]
    resp, parsed = _query(env, _find(doc.patient_id))
    assert parsed.status == ResponseStatus.SUCCESS
    listed = resp.find(q(RIM, "RegistryObjectList"))
    assert listed is not None and len(listed) >= 1
    assert doc.entry_uuid in {o.get("id") for o in listed}
    for obj in listed:
        assert obj.get("home") == HOME, etree.tostring(obj)[:200]


def test_find_documents_pages_with_start_index_and_max_results(env: Env) -> None:
    pid = env.docs[0].patient_id
    resp, whole = _query(env, _find(pid, return_type="ObjectRef"))
    assert resp.get("totalResultCount") is None  # not paged: answered as before
    ids = [o.get("id") for o in resp.find(q(RIM, "RegistryObjectList"))]
    pages: list[str | None] = []
    for start in range(0, len(ids) + 1):
        page_resp, parsed = _query(env, replace(_find(pid, return_type="ObjectRef"),
                                                start_index=start, max_results=1))
        assert parsed.status == ResponseStatus.SUCCESS
        assert page_resp.get("startIndex") == str(start)
        assert page_resp.get("totalResultCount") == str(len(ids))
        listed = page_resp.find(q(RIM, "RegistryObjectList"))
        pages.extend(o.get("id") for o in (listed if listed is not None else []))
        for obj in (listed if listed is not None else []):
            assert obj.get("home") == HOME
    assert pages == ids and whole.status == ResponseStatus.SUCCESS


def test_bad_paging_is_a_registry_error_at_our_home(env: Env) -> None:
    resp, parsed = _query(env, replace(_find(env.docs[0].patient_id), start_index=-1))
    assert parsed.status == ResponseStatus.FAILURE
    assert [e.code for e in parsed.errors] == [ErrorCode.REGISTRY_ERROR]
    assert _locations(resp) == {HOME}


def test_get_all_stamps_packages_and_associations(env: Env) -> None:
    doc = env.docs[0]
    statuses = Slot("$XDSDocumentEntryStatus", (APPROVED,))
    resp, parsed = _query(env, AdhocQuery(StoredQuery.GET_ALL, (
        Slot("$patientId", (f"'{doc.patient_id}'",)), statuses,
        Slot("$XDSSubmissionSetStatus", (APPROVED,)), Slot("$XDSFolderStatus", (APPROVED,)))))
    assert parsed.status == ResponseStatus.SUCCESS, parsed
    listed = resp.find(q(RIM, "RegistryObjectList"))
    assert listed is not None
    kinds = {etree.QName(o).localname for o in listed}
    assert {"ExtrinsicObject", "RegistryPackage", "Association"} <= kinds
    assert {o.get("home") for o in listed} == {HOME}


def test_find_documents_with_our_home_and_object_refs(env: Env) -> None:
    doc = env.docs[1]
    resp, parsed = _query(env, _find(doc.patient_id, HOME, "ObjectRef"))
    assert parsed.status == ResponseStatus.SUCCESS
    refs = parsed.objects
    assert refs and all(isinstance(r, ObjectRef) and r.home == HOME for r in refs)
    assert doc.entry_uuid in {r.id for r in refs}
    assert all(o.tag == q(RIM, "ObjectRef") for o in resp.iter(q(RIM, "ObjectRef")))


def test_get_documents_with_home(env: Env) -> None:
    doc = env.docs[0]
    _resp, parsed = _query(env, _get(doc.unique_id, HOME))
    assert parsed.status == ResponseStatus.SUCCESS
    ids = [o.id for o in parsed.objects]
    assert ids == [doc.entry_uuid]
    assert parsed.objects[0].home == HOME


def test_get_documents_without_home_is_missing_home_community_id(env: Env) -> None:
    resp, parsed = _query(env, _get(env.docs[0].unique_id))
    assert parsed.status == ResponseStatus.FAILURE
    assert [e.code for e in parsed.errors] == [
        ErrorCode.MISSING_HOME_COMMUNITY_ID]
    assert _locations(resp) == {HOME}
    assert parsed.objects == ()


@pytest.mark.parametrize("query_home,slot", [(OTHER, None), (None, OTHER), (OTHER, HOME)])
def test_another_community_is_unknown(env: Env, query_home: str | None,
                                      slot: str | None) -> None:
    extra = (Slot("$homeCommunityId", (f"'{slot}'",)),) if slot else ()
    resp, parsed = _query(env, _get(env.docs[0].unique_id, query_home, extra))
    assert parsed.status == ResponseStatus.FAILURE
    assert [e.code for e in parsed.errors] == [
        ErrorCode.UNKNOWN_COMMUNITY]
    assert _locations(resp) == {HOME}


def test_home_community_parameter_names_us(env: Env) -> None:
    doc = env.docs[1]
    extra = (Slot("$homeCommunityId", (f"'{HOME}'",)),)
    _resp, parsed = _query(env, _get(doc.unique_id, None, extra))
    assert parsed.status == ResponseStatus.SUCCESS
    assert [o.id for o in parsed.objects] == [doc.entry_uuid]


def test_find_documents_naming_another_community(env: Env) -> None:
    resp, parsed = _query(env, _find(env.docs[0].patient_id, OTHER))
    assert [e.code for e in parsed.errors] == [
        ErrorCode.UNKNOWN_COMMUNITY]
    assert _locations(resp) == {HOME}


def test_registry_errors_are_located_at_our_home(env: Env) -> None:
    resp, parsed = _query(env, AdhocQuery("urn:uuid:00000000-0000-0000-0000-000000000000",
                                          home=HOME))
    assert [e.code for e in parsed.errors] == [
        ErrorCode.UNKNOWN_STORED_QUERY]
    assert _locations(resp) == {HOME}
    # a missing required parameter (the registry's own check), located at our home
    resp, parsed = _query(env, AdhocQuery(StoredQuery.FIND_DOCUMENTS, (
        Slot("$XDSDocumentEntryStatus", (APPROVED,)),)))
    assert parsed.status == ResponseStatus.FAILURE
    assert ErrorCode.STORED_QUERY_MISSING_PARAM in {
        e.code for e in parsed.errors}
    assert _locations(resp) == {HOME}


def test_not_a_query_is_an_error_value(env: Env) -> None:
    body = etree.Element(q(QUERY, "AdhocQueryRequest"))
    resp = cross_gateway_query(env.services, env.ctx(Action.ITI38), body).body
    assert_valid(resp)
    assert resp.get("status") == ResponseStatus.FAILURE
    assert _locations(resp) == {HOME}


# --- ITI-39 ----------------------------------------------------------------------------------

def _retrieve(env: Env, *requests: DocumentRequest):
    body = parse_xml(etree.tostring(render_retrieve_document_set_request(
        RetrieveDocumentSetRequest(documents=requests))))
    resp = cross_gateway_retrieve(env.services, env.ctx(Action.ITI39), body)
    assert_valid(resp.body)
    return resp, parse_retrieve_document_set_response(resp.body)


def test_retrieve_our_documents(env: Env) -> None:
    resp, parsed = _retrieve(env, *(DocumentRequest(REPO, d.unique_id, HOME) for d in env.docs))
    assert parsed.status == ResponseStatus.SUCCESS
    assert [d.document_unique_id for d in parsed.documents] == [d.unique_id for d in env.docs]
    assert all(d.home_community_id == HOME for d in parsed.documents)
    by_cid = {a.content_id: a for a in resp.attachments}
    for got, want in zip(parsed.documents, env.docs, strict=True):
        assert got.mime_type == "application/dicom"
        assert got.content_id is not None
        assert by_cid[got.content_id].path.read_bytes() == want.data


def test_retrieve_without_home_community_id(env: Env) -> None:
    resp, parsed = _retrieve(env, DocumentRequest(REPO, env.docs[0].unique_id))
    assert parsed.status == ResponseStatus.FAILURE
    assert [e.code for e in parsed.errors] == [ErrorCode.MISSING_HOME_COMMUNITY_ID]
    assert {e.location for e in parsed.errors} == {HOME}
    assert resp.attachments == ()


def test_retrieve_mixed_is_partial_success_with_errors_at_our_home(env: Env) -> None:
    doc = env.docs[0]
    resp, parsed = _retrieve(
        env,
        DocumentRequest(REPO, doc.unique_id, HOME),
        DocumentRequest(REPO, doc.unique_id, OTHER),
        DocumentRequest(REPO, doc.unique_id),
        DocumentRequest("1.2.3.4.5.999", doc.unique_id, HOME),
        DocumentRequest(REPO, "1.2.3.4.5.404", HOME))
    assert parsed.status == ResponseStatus.PARTIAL_SUCCESS
    assert sorted(e.code for e in parsed.errors) == sorted([
        ErrorCode.UNKNOWN_COMMUNITY, ErrorCode.MISSING_HOME_COMMUNITY_ID,
        ErrorCode.UNKNOWN_REPOSITORY_ID, ErrorCode.MISSING_DOCUMENT])
    assert {e.location for e in parsed.errors} == {HOME}
    assert [d.document_unique_id for d in parsed.documents] == [doc.unique_id]
    assert len(resp.attachments) == 1


def test_retrieve_request_without_document_request(env: Env) -> None:
    body = etree.Element(q(XDSB, "RetrieveDocumentSetRequest"))
    resp = cross_gateway_retrieve(env.services, env.ctx(Action.ITI39), body)
    assert_valid(resp.body)
    parsed = parse_retrieve_document_set_response(resp.body)
    assert parsed.status == ResponseStatus.FAILURE
    assert {e.location for e in parsed.errors} == {HOME}


# --- the home rules --------------------------------------------------------------------------

def test_patient_queries_are_the_find_queries_and_get_all() -> None:
    patient = {d.name for d in QUERIES.values() if xhome.is_patient_query(d.params)}
    assert patient == {"FindDocuments", "FindSubmissionSets", "FindFolders", "GetAll",
                       "FindDocumentsByReferenceId"}


@pytest.mark.parametrize("values,want", [
    (("'urn:oid:1.2.3'",), "urn:oid:1.2.3"),
    (("('urn:oid:1.2.3')",), "urn:oid:1.2.3"),
    (("urn:oid:1.2.3",), "urn:oid:1.2.3"),
    (("",), None),
])
def test_requested_home_from_the_parameter(values: tuple[str, ...], want: str | None) -> None:
    query = AdhocQuery("x", (Slot("$homeCommunityId", values),))
    assert xhome.requested_home(query) == want
    assert xhome.without_home_parameter(query).parameters == ()


def test_requested_home_prefers_the_attribute() -> None:
    query = AdhocQuery("x", (Slot("$homeCommunityId", ("'urn:oid:9'",)),), home=" urn:oid:1 ")
    assert xhome.requested_home(query) == "urn:oid:1"
