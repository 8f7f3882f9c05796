"""The Responding Gateway (/xca/responding) over real HTTPS with mutual TLS, called by zeep
from the OFFICIAL XCA Responding Gateway WSDLs (XCARespondingGatewayQuery.wsdl,
XCARespondingGatewayRetrieve.wsdl), after NIST KOS submissions went in through ITI-41 (zeep
over the official repository WSDL, as tests/integration/test_repository_zeep.py does).

Every response body validates against the official schemas; every returned object carries our
homeCommunityId; every RegistryError is located at it; ITI-39 answers MTOM, byte-exact.
"""

from __future__ import annotations

import tomllib
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from zeep.plugins import HistoryPlugin

from gateway.ns import RIM, RS, AvailabilityStatus, ErrorCode, ResponseStatus, StoredQuery
from tests.integration.conftest import LiveGateway
from tests.integration.test_repository_zeep import (
    NO_COMMENTS,
    PAIRS,
    PATIENT_ID_SCHEME,
    REPOSITORY_BINDING,
    UNIQUE_ID_SCHEME,
    _fresh_set_unique_id,
    values,
)
from tests.support.xsd import assert_valid
from tests.support.zeep_client import call_with_element, mtls_session, official_client

pytestmark = pytest.mark.integration

QUERY_BINDING = "{urn:ihe:iti:xds-b:2007}RespondingGatewayQuery_Binding_Soap12"
RETRIEVE_BINDING = "{urn:ihe:iti:xds-b:2007}RespondingGatewayRetrieve_Binding_Soap12"
OTHER_COMMUNITY = "urn:oid:1.2.555.6.7.8"


@dataclass
class Submitted:
    unique_id: str
    patient_id: str
    data: bytes


@dataclass
class Xca:
    query: Any
    retrieve: Any
    history: HistoryPlugin
    home: str
    repository_id: str
    docs: list[Submitted]

    def last_body(self) -> etree._Element:
        last = self.history.last_received
        assert last is not None
        env = last["envelope"]
        body = env.find("{http://www.w3.org/2003/05/soap-envelope}Body")
        assert body is not None and len(body) == 1
        return body[0]


def _submit(repo_client: Any, base_url: str, history: HistoryPlugin, metadata_path: Path,
            kos_path: Path) -> Submitted:
    """ITI-41 with a fresh DocumentEntry uniqueId (the same NIST pair may already be in this
    session's registry, submitted by test_repository_zeep)."""
    metadata = etree.parse(str(metadata_path), NO_COMMENTS).getroot()
    _fresh_set_unique_id(metadata)
    [entry] = list(metadata.iter(f"{{{RIM}}}ExtrinsicObject"))
    unique_id = f"2.25.{uuid.uuid4().int}"
    patient_id = ""
    for ei in entry.iter(f"{{{RIM}}}ExternalIdentifier"):
        if ei.get("identificationScheme") == UNIQUE_ID_SCHEME:
            ei.set("value", unique_id)
        elif ei.get("identificationScheme") == PATIENT_ID_SCHEME:
            patient_id = str(ei.get("value"))
    kos = kos_path.read_bytes()
    result = call_with_element(
        repo_client, REPOSITORY_BINDING, base_url + "/xds/repository",
        "DocumentRepository_ProvideAndRegisterDocumentSet-b", metadata,
        SubmitObjectsRequest={"RegistryObjectList": {}},
        Document=[{"id": entry.get("id"), "_value_1": kos}])
    assert result.status == ResponseStatus.SUCCESS, result
    return Submitted(unique_id, patient_id, kos)


@pytest.fixture(scope="module")
def xca(live_gateway: LiveGateway) -> Xca:
    session = mtls_session(live_gateway.pki.ca_cert, live_gateway.pki.client_cert,
                           live_gateway.pki.client_key)
    history = HistoryPlugin()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        repo = official_client("ihe-iti/XDS.b_DocumentRepository.wsdl", session)
        query = official_client("ihe-iti/XCARespondingGatewayQuery.wsdl", session)
        retrieve = official_client("ihe-iti/XCARespondingGatewayRetrieve.wsdl", session)
    for c in (repo, query, retrieve):
        c.plugins.append(history)
    base = live_gateway.base_url
    docs = [_submit(repo, base, history, m, k) for m, k in PAIRS[:2]]
    community = tomllib.loads(live_gateway.config.read_text())["community"]
    return Xca(query.create_service(QUERY_BINDING, base + "/xca/responding"),
               retrieve.create_service(RETRIEVE_BINDING, base + "/xca/responding"),
               history, community["home_community_id"], community["repository_unique_id"],
               docs)


def _codes(body: etree._Element) -> list[str]:
    return [str(e.get("errorCode")) for e in body.iter(f"{{{RS}}}RegistryError")]


def _locations(body: etree._Element) -> set[str | None]:
    return {e.get("location") for e in body.iter(f"{{{RS}}}RegistryError")}


def test_find_documents_every_object_has_our_home(xca: Xca) -> None:
    doc = xca.docs[0]
    result = xca.query.RespondingGateway_CrossGatewayQuery(
        ResponseOption={"returnType": "LeafClass", "returnComposedObjects": True},
        AdhocQuery={"id": StoredQuery.FIND_DOCUMENTS, "Slot": [
            {"name": "$XDSDocumentEntryPatientId", "ValueList": values(f"'{doc.patient_id}'")},
            {"name": "$XDSDocumentEntryStatus",
             "ValueList": values(f"('{AvailabilityStatus.APPROVED}')")}]})
    body = xca.last_body()
    assert_valid(body)
    assert result.status == ResponseStatus.SUCCESS
    listed = body.find(f"{{{RIM}}}RegistryObjectList")
    assert listed is not None and len(listed) >= 1
    assert {o.get("home") for o in listed} == {xca.home}
    uids = {ei.get("value") for ei in listed.iter(f"{{{RIM}}}ExternalIdentifier")
            if ei.get("identificationScheme") == UNIQUE_ID_SCHEME}
    assert doc.unique_id in uids


def test_get_documents_with_and_without_home(xca: Xca) -> None:
    doc = xca.docs[1]
    slots = [{"name": "$XDSDocumentEntryUniqueId", "ValueList": values(f"('{doc.unique_id}')")}]
    option = {"returnType": "ObjectRef", "returnComposedObjects": True}
    result = xca.query.RespondingGateway_CrossGatewayQuery(
        ResponseOption=option,
        AdhocQuery={"id": StoredQuery.GET_DOCUMENTS, "home": xca.home, "Slot": slots})
    body = xca.last_body()
    assert_valid(body)
    assert result.status == ResponseStatus.SUCCESS
    refs = list(body.iter(f"{{{RIM}}}ObjectRef"))
    assert len(refs) == 1 and refs[0].get("home") == xca.home

    result = xca.query.RespondingGateway_CrossGatewayQuery(
        ResponseOption=option, AdhocQuery={"id": StoredQuery.GET_DOCUMENTS, "Slot": slots})
    body = xca.last_body()
    assert_valid(body)
    assert result.status == ResponseStatus.FAILURE
    assert _codes(body) == [ErrorCode.MISSING_HOME_COMMUNITY_ID]
    assert _locations(body) == {xca.home}

    result = xca.query.RespondingGateway_CrossGatewayQuery(
        ResponseOption=option,
        AdhocQuery={"id": StoredQuery.GET_DOCUMENTS, "home": OTHER_COMMUNITY, "Slot": slots})
    body = xca.last_body()
    assert_valid(body)
    assert _codes(body) == [ErrorCode.UNKNOWN_COMMUNITY]
    assert _locations(body) == {xca.home}


def test_cross_gateway_retrieve_byte_exact(xca: Xca) -> None:
    result = xca.retrieve.RespondingGateway_CrossGatewayRetrieve(DocumentRequest=[
        {"HomeCommunityId": xca.home, "RepositoryUniqueId": xca.repository_id,
         "DocumentUniqueId": d.unique_id} for d in xca.docs])
    assert_valid(xca.last_body())
    assert result.RegistryResponse.status == ResponseStatus.SUCCESS
    assert [d.DocumentUniqueId for d in result.DocumentResponse] == [
        d.unique_id for d in xca.docs]
    assert [d.HomeCommunityId for d in result.DocumentResponse] == [xca.home] * len(xca.docs)
    assert [d.Document for d in result.DocumentResponse] == [d.data for d in xca.docs]
    assert all(d.mimeType == "application/dicom" for d in result.DocumentResponse)


def test_cross_gateway_retrieve_partial_success(xca: Xca) -> None:
    doc = xca.docs[0]
    result = xca.retrieve.RespondingGateway_CrossGatewayRetrieve(DocumentRequest=[
        {"HomeCommunityId": xca.home, "RepositoryUniqueId": xca.repository_id,
         "DocumentUniqueId": doc.unique_id},
        {"RepositoryUniqueId": xca.repository_id, "DocumentUniqueId": doc.unique_id},
        {"HomeCommunityId": OTHER_COMMUNITY, "RepositoryUniqueId": xca.repository_id,
         "DocumentUniqueId": doc.unique_id},
        {"HomeCommunityId": xca.home, "RepositoryUniqueId": xca.repository_id,
         "DocumentUniqueId": "1.2.3.4.5.404"}])
    body = xca.last_body()
    assert_valid(body)
    assert result.RegistryResponse.status == ResponseStatus.PARTIAL_SUCCESS
    assert sorted(_codes(body)) == sorted([ErrorCode.MISSING_HOME_COMMUNITY_ID,
                                           ErrorCode.UNKNOWN_COMMUNITY,
                                           ErrorCode.MISSING_DOCUMENT])
    assert _locations(body) == {xca.home}
    assert [d.Document for d in result.DocumentResponse] == [doc.data]
