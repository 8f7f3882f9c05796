"""The initiating gateways across real communities on loopback.

Three gateway processes, each its own community (home, registry, repository): A initiates;
B and C hold documents (submitted with ITI-41); A's [[communities]] also lists D, a closed
port (down), and S, a local HTTPS server that accepts and then says nothing (slow). Patient
ids differ per community: C knows our patient under another id (A's cross-reference maps it),
and D and S are only asked for the patients their cross-reference lists, so each case below
chooses who is asked by the patient it queries for. A fourth gateway ("small") initiates to B
and C with [registry] max_results = 3, for XDSTooManyResults on the merged answer. The merged
answers carry A's own patient id (C's translated back) and are paged by startIndex /
maxResults. Most calls use the gateway's own client; the last tests call A with zeep from the
official XCA Initiating Gateway Query WSDL and validate every answer against the official
schemas.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from zeep.plugins import HistoryPlugin

from gateway.demo import (
    AUTHORITY,
    free_port,
    start_gateway,
)
from gateway.ebrim.metadata import patient_id, slot_value, unique_id
from gateway.ebrim.model import (
    AdhocQuery,
    AdhocQueryResponse,
    DocumentRequest,
    ExtrinsicObject,
    RetrieveDocumentSetRequest,
    Slot,
)
from gateway.ebrim.parse import parse_adhoc_query_response, parse_retrieve_document_set_response
from gateway.ebrim.render import (
    render_adhoc_query_request,
    render_retrieve_document_set_request,
)
from gateway.ns import (
    RIM,
    XDSB,
    XDSI,
    Action,
    AvailabilityStatus,
    ErrorCode,
    ResponseStatus,
    StoredQuery,
    q,
)
from gateway.security.pki import (
    DevPki,
    create_dev_pki,
)
from gateway.soap.client import SoapClient
from gateway.xca.outbound import OutboundPool, OutboundSettings
from tests.integration.test_repository_zeep import PATIENT_ID_SCHEME, UNIQUE_ID_SCHEME, values
from tests.support.communities import (
    PeerServer,
    QuietHandler,
    community_config,
    gateway_client,
    shut_down,
    submit,
)
from tests.support.xsd import assert_valid
from tests.support.zeep_client import mtls_session, official_client

HA = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.101"
HB = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.102"
HC = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.103"
HD = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.104"  # down: nothing listens
HS = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.105"  # slow: accepts, never answers in time
HA_SMALL = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.106"  # initiates, [registry] max_results = 3
SMALL_LIMIT = 3
PATIENT_ONLY_IN_C = f"XCA-0009^^^&{AUTHORITY}&ISO"  # the small gateway's id of C's patient
PATIENT = f"XCA-0001^^^&{AUTHORITY}&ISO"  # A's and B's id of the patient
PATIENT_IN_C = f"C-0042^^^&{AUTHORITY}&ISO"  # C's id of the same patient
PATIENT_DOWN = f"XCA-0002^^^&{AUTHORITY}&ISO"  # D's cross-reference lists only this one
PATIENT_SLOW = f"XCA-0003^^^&{AUTHORITY}&ISO"  # S's cross-reference lists only this one
QUERY_TIMEOUT = 2
SLOW_SLEEP = 60  # the slow server's silence; the test must finish long before it


class SlowServer(PeerServer):
    """HTTPS with mutual TLS on loopback that reads a request and stays silent until released
    (at most SLOW_SLEEP seconds)."""

    def __init__(self, pki: DevPki):
        release = self.release = threading.Event()
        hits = self.hits = [0]

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                hits[0] += 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                release.wait(SLOW_SLEEP)
                try:
                    self.send_error(503)
                except OSError:  # the caller gave up long ago
                    pass

        super().__init__(pki, Handler)

    def stop(self) -> None:
        self.release.set()
        super().stop()


@dataclass
class Federation:
    pki: DevPki
    a: SoapClient
    b_docs: dict[str, Path]
    c_docs: dict[str, Path]
    slow: SlowServer
    workdir: Path
    b_url: str
    c_url: str
    small: SoapClient  # an initiating gateway to B and C whose answers hold at most 3 objects


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("xca")
    pki = create_dev_pki(root / "pki")
    pa, pb, pc, pd, ps = (free_port() for _ in range(5))
    slow = SlowServer(pki)
    running = []
    clients: list[SoapClient] = []
    try:
        for port, home, name in ((pb, HB, "b"), (pc, HC, "c")):
            cfg = community_config(root / name, pki, port, home)
            running.append(start_gateway(cfg, pki, port))

        def community(home: str, port: int, patients: dict[str, str] | None = None,
                      path: str = "/xca/responding") -> str:
            url = f"https://localhost:{port}"
            table = ""
            if patients:
                table = "patient_ids = { " + ", ".join(
                    f'"{k}" = "{v}"' for k, v in patients.items()) + " }\n"
            return (f"\n[[communities]]\nhome_community_id = \"{home}\"\n"
                    f"query_url = \"{url}{path}\"\nretrieve_url = \"{url}{path}\"\n"
                    f"imaging_retrieve_url = \"{url}/xcai/responding\"\n{table}")

        extra = (f"\n[xca]\nconnect_timeout_seconds = 2\nquery_timeout_seconds = "
                 f"{QUERY_TIMEOUT}\nretrieve_timeout_seconds = 20\nmax_parallel = 4\n"
                 + community(HB, pb)
                 + community(HC, pc, {PATIENT: PATIENT_IN_C, PATIENT_DOWN: PATIENT_IN_C,
                                      PATIENT_SLOW: PATIENT_IN_C})
                 + community(HD, pd, {PATIENT_DOWN: PATIENT_DOWN})
                 + community(HS, slow.port, {PATIENT_SLOW: PATIENT_SLOW}))
        cfg_a = community_config(root / "a", pki, pa, HA, extra)
        running.append(start_gateway(cfg_a, pki, pa))
        cfg_small = community_config(root / "small", pki, ps, HA_SMALL,
                                     community(HB, pb) + community(
                                         HC, pc, {PATIENT: PATIENT_IN_C,
                                                  PATIENT_ONLY_IN_C: PATIENT_IN_C}))
        text = cfg_small.read_text()
        assert "\n[registry]\n" in text
        cfg_small.write_text(text.replace("\n[registry]\n",
                                          f"\n[registry]\nmax_results = {SMALL_LIMIT}\n"))
        running.append(start_gateway(cfg_small, pki, ps))

        def client(port: int) -> SoapClient:
            return gateway_client(pki, port, clients)

        b_docs = submit(client(pb), root / "docs-b", PATIENT, "2")
        c_docs = submit(client(pc), root / "docs-c", PATIENT_IN_C, "3")
        yield Federation(pki, client(pa), b_docs, c_docs, slow, root,
                         f"https://localhost:{pb}/xca/responding",
                         f"https://localhost:{pc}/xca/responding", client(ps))
    finally:
        shut_down(clients, slow, *running)


def find(fed: Federation, patient: str, *, start_index: int = 0, max_results: int = -1,
         via: SoapClient | None = None
         ) -> tuple[list[ExtrinsicObject], AdhocQueryResponse, float]:
    query = AdhocQuery(query_id=StoredQuery.FIND_DOCUMENTS, parameters=(
        Slot("$XDSDocumentEntryPatientId", (f"'{patient}'",)),
        Slot("$XDSDocumentEntryStatus", ("('urn:oasis:names:tc:ebxml-regrep:StatusType:"
                                         "Approved')",))),
        start_index=start_index, max_results=max_results)
    t0 = time.monotonic()
    reply = (via or fed.a).call("/xca/initiating", Action.ITI18,
                                render_adhoc_query_request(query))
    elapsed = time.monotonic() - t0
    assert reply.body is not None, etree.tostring(reply.envelope)
    resp = parse_adhoc_query_response(reply.body)
    entries = [o for o in resp.objects if isinstance(o, ExtrinsicObject)]
    return entries, resp, elapsed


def homes_by_uid(entries: list[ExtrinsicObject]) -> dict[str, str | None]:
    return {unique_id(e) or "": e.home for e in entries}


def test_find_documents_fans_out_and_merges_with_homes(federation: Federation) -> None:
    entries, resp, _ = find(federation, PATIENT)
    assert resp.status == ResponseStatus.SUCCESS, resp.errors
    expected = {**{u: HB for u in federation.b_docs}, **{u: HC for u in federation.c_docs}}
    assert homes_by_uid(entries) == expected
    assert federation.slow.hits[0] == 0  # S's cross-reference does not list this patient


def test_the_consumer_sees_its_own_patient_id_in_merged_results(
        federation: Federation) -> None:
    entries, resp, _ = find(federation, PATIENT)
    assert resp.status == ResponseStatus.SUCCESS, resp.errors
    assert {e.home for e in entries} == {HB, HC}
    assert {unique_id(e): patient_id(e) for e in entries} == {
        u: PATIENT for u in [*federation.b_docs, *federation.c_docs]}
    # C itself still holds them under its own id, and their sourcePatientId is C's source's
    c_own = direct_find(federation, federation.c_url, PATIENT_IN_C)
    assert {unique_id(e): patient_id(e) for e in c_own} == {
        u: PATIENT_IN_C for u in federation.c_docs}
    c_source = {unique_id(e): slot_value(e, "sourcePatientId") for e in c_own}
    assert {unique_id(e): slot_value(e, "sourcePatientId") for e in entries
            if e.home == HC} == c_source
    # C maps three of our ids to one of its own: the answer names the one we asked with
    entries, _, _ = find(federation, PATIENT_DOWN)
    assert {patient_id(e) for e in entries} == {PATIENT_DOWN}


def direct_find(fed: Federation, url: str, patient: str) -> list[ExtrinsicObject]:
    """ITI-38 straight to a responding gateway (no initiating gateway in between)."""
    pool = OutboundPool(OutboundSettings(fed.pki.server_cert, fed.pki.server_key,
                                         fed.pki.ca_cert, 2.0))
    try:
        reply = pool.call(url, Action.ITI38, render_adhoc_query_request(AdhocQuery(
            query_id=StoredQuery.FIND_DOCUMENTS, parameters=(
                Slot("$XDSDocumentEntryPatientId", (f"'{patient}'",)),
                Slot("$XDSDocumentEntryStatus",
                     ("('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')",))))),
            read_timeout=10)
    finally:
        pool.close()
    assert reply.body is not None
    return [o for o in parse_adhoc_query_response(reply.body).objects
            if isinstance(o, ExtrinsicObject)]


def test_merged_results_are_paged_by_the_initiating_gateway(federation: Federation) -> None:
    everything, _, _ = find(federation, PATIENT)
    total = len(federation.b_docs) + len(federation.c_docs)
    assert len(everything) == total == 4
    pages = []
    for start in range(0, total, 3):
        entries, resp, _ = find(federation, PATIENT, start_index=start, max_results=3)
        assert resp.status == ResponseStatus.SUCCESS
        assert (resp.start_index, resp.total_result_count) == (start, total)
        pages.append([unique_id(e) for e in entries])
    assert [len(p) for p in pages] == [3, 1]
    assert [u for p in pages for u in p] == [unique_id(e) for e in everything]
    entries, resp, _ = find(federation, PATIENT, start_index=1, max_results=2)
    assert [unique_id(e) for e in entries] == [unique_id(e) for e in everything[1:3]]


def test_too_many_merged_results_and_paging_under_the_limit(federation: Federation) -> None:
    # B and C answer 2 objects each (each alone under the limit of 3): 4 together is too many
    entries, resp, _ = find(federation, PATIENT, via=federation.small)
    assert resp.status == ResponseStatus.FAILURE
    assert [e.code for e in resp.errors] == [ErrorCode.TOO_MANY_RESULTS]
    assert entries == []
    # a page does not get round the limit: it bounds the whole answer
    entries, resp, _ = find(federation, PATIENT, via=federation.small, max_results=1)
    assert [e.code for e in resp.errors] == [ErrorCode.TOO_MANY_RESULTS]
    # a patient only C has documents for (2 objects) is under it, and pages as usual
    entries, resp, _ = find(federation, PATIENT_ONLY_IN_C, via=federation.small,
                            start_index=1, max_results=5)
    assert resp.status == ResponseStatus.SUCCESS, resp.errors
    assert (len(entries), resp.start_index, resp.total_result_count) == (1, 1, 2)
    assert [(e.home, patient_id(e)) for e in entries] == [(HC, PATIENT_ONLY_IN_C)]


def test_a_community_that_is_down_gives_partial_success(federation: Federation) -> None:
    entries, resp, _ = find(federation, PATIENT_DOWN)
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    # C knows PATIENT_DOWN (cross-reference) and answers; B has nothing for it; D is down
    assert homes_by_uid(entries) == {u: HC for u in federation.c_docs}
    errors = resp.errors
    assert [(e.code, e.location) for e in errors] == [(ErrorCode.UNAVAILABLE_COMMUNITY, HD)]


def test_a_slow_community_is_cut_off_at_its_timeout(federation: Federation) -> None:
    before = federation.slow.hits[0]
    entries, resp, elapsed = find(federation, PATIENT_SLOW)
    assert federation.slow.hits[0] == before + 1  # it was asked, and kept silent
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert homes_by_uid(entries) == {u: HC for u in federation.c_docs}
    errors = resp.errors
    assert [(e.code, e.location) for e in errors] == [(ErrorCode.UNAVAILABLE_COMMUNITY, HS)]
    assert f"within {QUERY_TIMEOUT} s" in errors[0].context
    assert elapsed < SLOW_SLEEP / 2  # bounded by the query timeout, not by the silence


def get_documents(fed: Federation, home: str | None,
                  uids: list[str]) -> AdhocQueryResponse:
    params = [Slot("$XDSDocumentEntryUniqueId", ("(" + ",".join(f"'{u}'" for u in uids) + ")",))]
    if home:
        params.append(Slot("$homeCommunityId", (f"'{home}'",)))
    reply = fed.a.call("/xca/initiating", Action.ITI18, render_adhoc_query_request(
        AdhocQuery(query_id=StoredQuery.GET_DOCUMENTS, parameters=tuple(params))))
    assert reply.body is not None
    return parse_adhoc_query_response(reply.body)


def test_get_documents_goes_only_to_the_named_community(federation: Federation) -> None:
    everything = [*federation.b_docs, *federation.c_docs]
    hits = federation.slow.hits[0]
    resp = get_documents(federation, HC, everything)
    assert resp.status == ResponseStatus.SUCCESS
    found = [o for o in resp.objects if isinstance(o, ExtrinsicObject)]
    assert homes_by_uid(found) == {u: HC for u in federation.c_docs}  # B's are not asked
    resp = get_documents(federation, HB, everything)
    found = [o for o in resp.objects if isinstance(o, ExtrinsicObject)]
    assert homes_by_uid(found) == {u: HB for u in federation.b_docs}
    assert federation.slow.hits[0] == hits


def test_get_documents_without_or_with_unknown_home(federation: Federation) -> None:
    resp = get_documents(federation, None, list(federation.b_docs))
    assert resp.status == ResponseStatus.FAILURE
    assert [e.code for e in resp.errors] == [ErrorCode.MISSING_HOME_COMMUNITY_ID]
    resp = get_documents(federation, "urn:oid:1.2.3.999", list(federation.b_docs))
    assert [(e.code, e.location) for e in resp.errors] == [
        (ErrorCode.UNKNOWN_COMMUNITY, "urn:oid:1.2.3.999")]


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_iti43_through_a_retrieves_from_b_and_c_byte_exact(federation: Federation) -> None:
    entries, _, _ = find(federation, PATIENT)
    requests_ = [DocumentRequest(slot_value(e, "repositoryUniqueId") or "", unique_id(e) or "",
                                 e.home) for e in entries]
    requests_.append(DocumentRequest("1.2.3", "1.2.3.4", "urn:oid:1.2.3.999"))
    spool = federation.workdir / "retrieved"
    spool.mkdir(exist_ok=True)
    reply = federation.a.call("/xca/initiating", Action.ITI43,
                              render_retrieve_document_set_request(
                                  RetrieveDocumentSetRequest(tuple(requests_))),
                              spool_dir=spool)
    assert reply.body is not None, etree.tostring(reply.envelope)
    resp = parse_retrieve_document_set_response(reply.body)
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert [(e.code, e.location) for e in resp.errors] == [
        (ErrorCode.UNKNOWN_COMMUNITY, "urn:oid:1.2.3.999")]
    originals = {**federation.b_docs, **federation.c_docs}
    got = {}
    for d in resp.documents:
        path = reply.attachment_path(d.content_id)
        assert path is not None
        got[d.document_unique_id] = (d.home_community_id, _sha1(path))
    assert got == {u: (HB if u in federation.b_docs else HC, _sha1(p))
                   for u, p in originals.items()}


def test_rad69_through_a_is_routed_as_rad75_to_the_named_community(
        federation: Federation) -> None:
    """B has no PACS here: B answers its own errors; A must have reached B (no
    XDSUnavailableCommunity) and answered XDSUnknownCommunity for the unknown home."""
    body = etree.Element(q(XDSI, "RetrieveImagingDocumentSetRequest"),
                         nsmap={"xdsi": XDSI, "xdsb": XDSB})
    study = etree.SubElement(body, q(XDSI, "StudyRequest"), studyInstanceUID="1.2.3.4")
    series = etree.SubElement(study, q(XDSI, "SeriesRequest"), seriesInstanceUID="1.2.3.4.5")
    for home, sop in ((HB, "1.2.3.4.5.6"), ("urn:oid:1.2.3.999", "1.2.3.4.5.7")):
        d = etree.SubElement(series, q(XDSB, "DocumentRequest"))
        etree.SubElement(d, q(XDSB, "HomeCommunityId")).text = home
        etree.SubElement(d, q(XDSB, "RepositoryUniqueId")).text = "1.3.6.1.4.1.21367.2017.2.3.20"
        etree.SubElement(d, q(XDSB, "DocumentUniqueId")).text = sop
    tsl = etree.SubElement(body, q(XDSI, "TransferSyntaxUIDList"))
    etree.SubElement(tsl, q(XDSI, "TransferSyntaxUID")).text = "1.2.840.10008.1.2.1"
    spool = federation.workdir / "rad69"
    spool.mkdir(exist_ok=True)
    reply = federation.a.call("/xcai/initiating", Action.RAD69, body, spool_dir=spool)
    assert reply.body is not None and not reply.is_fault, etree.tostring(reply.envelope)
    resp = parse_retrieve_document_set_response(reply.body)
    codes = [(e.code, e.location) for e in resp.errors]
    assert (ErrorCode.UNKNOWN_COMMUNITY, "urn:oid:1.2.3.999") in codes
    assert all(c != ErrorCode.UNAVAILABLE_COMMUNITY for c, _ in codes), codes
    assert len(codes) >= 2  # B's own answer for its document is in there too


def test_outbound_pool_reuses_its_client_over_mutual_tls(federation: Federation) -> None:
    pki = federation.pki
    # The dev PKI's node certificate serves and is the client certificate of outbound calls.
    pool = OutboundPool(OutboundSettings(pki.server_cert, pki.server_key, pki.ca_cert, 2.0))
    body = render_adhoc_query_request(AdhocQuery(
        query_id=StoredQuery.FIND_DOCUMENTS,
        parameters=(Slot("$XDSDocumentEntryPatientId", (f"'{PATIENT}'",)),
                    Slot("$XDSDocumentEntryStatus",
                         ("('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')",)))))
    try:
        for _ in range(3):
            reply = pool.call(federation.b_url, Action.ITI38, body, read_timeout=10)
            assert reply.body is not None
            resp = parse_adhoc_query_response(reply.body)
            assert resp.status == ResponseStatus.SUCCESS
            assert {unique_id(o) for o in resp.objects
                    if isinstance(o, ExtrinsicObject)} == set(federation.b_docs)
            assert all(o.home == HB for o in resp.objects)  # the responder stamps its home
        assert pool.created == 1
    finally:
        pool.close()


# --- zeep, from the official XCA Initiating Gateway Query WSDL ------------------------------

ZEEP_BINDING = "{urn:ihe:iti:xds-b:2007}InitiatingGatewayQuery_Binding_Soap"


@pytest.fixture(scope="module")
def zeep_query(federation: Federation) -> Iterator[tuple[Any, HistoryPlugin]]:
    pki = federation.pki
    session = mtls_session(pki.ca_cert, pki.client_cert, pki.client_key)
    history = HistoryPlugin()
    client = official_client("ihe-iti/XCAInitiatingGatewayQuery.wsdl", session)
    client.plugins.append(history)
    yield client.create_service(ZEEP_BINDING, federation.a.base_url + "/xca/initiating"), history
    session.close()


def _find(service: Any, history: HistoryPlugin, **paging: int) -> etree._Element:
    service.DocumentRegistry_RegistryStoredQuery(
        ResponseOption={"returnType": "LeafClass", "returnComposedObjects": True},
        AdhocQuery={"id": StoredQuery.FIND_DOCUMENTS, "Slot": [
            {"name": "$XDSDocumentEntryPatientId", "ValueList": values(f"'{PATIENT}'")},
            {"name": "$XDSDocumentEntryStatus",
             "ValueList": values(f"('{AvailabilityStatus.APPROVED}')")},
        ]}, **paging)
    last = history.last_received
    assert last is not None
    body = last["envelope"].find("{http://www.w3.org/2003/05/soap-envelope}Body")
    assert body is not None and len(body) == 1
    assert_valid(body[0])
    return body[0]


def _entries(body: etree._Element) -> list[tuple[str, str | None, str]]:
    """(uniqueId, home, patientId) of each ExtrinsicObject, in answer order."""
    out = []
    for eo in body.iter(f"{{{RIM}}}ExtrinsicObject"):
        ids = {ei.get("identificationScheme"): ei.get("value")
               for ei in eo.findall(f"{{{RIM}}}ExternalIdentifier")}
        out.append((ids[UNIQUE_ID_SCHEME] or "", eo.get("home"), ids[PATIENT_ID_SCHEME] or ""))
    return out


def test_zeep_find_documents_merges_homes_and_local_patient_ids(
        federation: Federation, zeep_query: tuple[Any, HistoryPlugin]) -> None:
    body = _find(*zeep_query)
    assert body.get("status") == ResponseStatus.SUCCESS
    found = _entries(body)
    homes = {uid: home for uid, home, _pid in found}
    assert homes == {**{u: HB for u in federation.b_docs}, **{u: HC for u in federation.c_docs}}
    # C holds the patient under its own id; the consumer sees the id it asked with.
    assert {pid for _uid, _home, pid in found} == {PATIENT}


def test_zeep_pages_of_the_merged_answer_add_up_to_it(
        zeep_query: tuple[Any, HistoryPlugin]) -> None:
    whole = [uid for uid, _h, _p in _entries(_find(*zeep_query))]
    paged: list[str] = []
    for start in range(0, len(whole), 2):
        body = _find(*zeep_query, startIndex=start, maxResults=2)
        assert body.get("startIndex") == str(start)
        assert body.get("totalResultCount") == str(len(whole))
        paged.extend(uid for uid, _h, _p in _entries(body))
    assert paged == whole and len(whole) >= 3
