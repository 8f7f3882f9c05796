"""ITI-41, ITI-43, ITI-42 and ITI-18 over real HTTPS with mutual TLS, called by zeep from the
OFFICIAL IHE WSDLs, with the NIST KOS submissions (RAD-68 style) as the data.

Each NIST metadata file is wrapped into a ProvideAndRegisterDocumentSetRequest with its paired
KOS (PROVENANCE.tsv names the pair), sent by zeep (inline base64: zeep cannot send MTOM),
found again with ITI-18, and retrieved with ITI-43 (the gateway answers MTOM; zeep resolves
the xop:Include) byte-exact. Every response body validates against the official schemas.
"""

from __future__ import annotations

import csv
import hashlib
import uuid
import warnings
from pathlib import Path

import pytest
from lxml import etree
from zeep.plugins import HistoryPlugin

from gateway.ns import RIM, AvailabilityStatus, ResponseStatus, StoredQuery
from tests.conftest import CONFORMANCE
from tests.support.xsd import assert_valid
from tests.support.zeep_client import call_with_element, mtls_session, official_client

pytestmark = pytest.mark.integration

LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
REPOSITORY_BINDING = "{urn:ihe:iti:xds-b:2007}DocumentRepository_Binding"
REGISTRY_BINDING = "{urn:ihe:iti:xds-b:2007}DocumentRegistry_Binding_Soap12"
UNIQUE_ID_SCHEME = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
PATIENT_ID_SCHEME = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
SET_UNIQUE_ID_SCHEME = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"


def kos_pairs() -> list[tuple[Path, Path]]:
    """(metadata, KOS) pairs that PROVENANCE.tsv says are expected to succeed."""
    pairs = []
    with (CONFORMANCE / "PROVENANCE.tsv").open() as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            note = row["note"]
            if (row["local_path"].startswith("messages/iti-41/nist-kos/")
                    and "paired KOS: " in note and "expected=Success" in note):
                kos = note.split("paired KOS: ", 1)[1].split("'", 1)[0]
                pairs.append((CONFORMANCE / row["local_path"], CONFORMANCE / kos))
    return pairs


PAIRS = kos_pairs()
NO_COMMENTS = etree.XMLParser(remove_comments=True, resolve_entities=False, no_network=True)


def _fresh_set_unique_id(metadata: etree._Element) -> None:
    """NIST files share SubmissionSet uniqueIds between tests; give each run its own."""
    for ei in metadata.iter(f"{{{RIM}}}ExternalIdentifier"):
        if ei.get("identificationScheme") == SET_UNIQUE_ID_SCHEME:
            ei.set("value", f"2.25.{uuid.uuid4().int}")


@pytest.fixture(scope="module")
def clients(live_gateway):  # type: ignore[no-untyped-def]
    session = mtls_session(live_gateway.pki.ca_cert, live_gateway.pki.client_cert,
                           live_gateway.pki.client_key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HL7 V3 parts of the registry WSDL (see zeep_client)
        repo = official_client("ihe-iti/XDS.b_DocumentRepository.wsdl", session)
        reg = official_client("ihe-iti/XDS.b_DocumentRegistry.wsdl", session)
    history = HistoryPlugin()
    repo.plugins.append(history)
    reg.plugins.append(history)
    return {
        "repo": repo.create_service(REPOSITORY_BINDING, live_gateway.base_url + "/xds/repository"),
        "reg": reg.create_service(REGISTRY_BINDING, live_gateway.base_url + "/xds/registry"),
        "repo_client": repo,
        "history": history,
        "base_url": live_gateway.base_url,
    }


def values(*texts: str) -> dict[str, list[dict[str, str]]]:
    """A rim:ValueList as zeep takes it (a repeated sequence of Value)."""
    return {"_value_1": [{"Value": t} for t in texts]}


def _last_body(history: HistoryPlugin) -> etree._Element:
    env = history.last_received["envelope"]
    body = env.find("{http://www.w3.org/2003/05/soap-envelope}Body")
    assert body is not None and len(body) == 1
    return body[0]


def test_pairs_found() -> None:
    assert len(PAIRS) >= 15


@pytest.mark.parametrize("metadata_path,kos_path", PAIRS, ids=[m.stem for m, _ in PAIRS])
def test_nist_kos_submission_roundtrip(clients, metadata_path: Path, kos_path: Path) -> None:  # type: ignore[no-untyped-def]
    metadata = etree.parse(str(metadata_path), NO_COMMENTS).getroot()
    _fresh_set_unique_id(metadata)
    entries = list(metadata.iter(f"{{{RIM}}}ExtrinsicObject"))
    assert len(entries) == 1
    entry = entries[0]
    unique_id = next(ei.get("value") for ei in entry.iter(f"{{{RIM}}}ExternalIdentifier")
                     if ei.get("identificationScheme") == UNIQUE_ID_SCHEME)
    patient_id = next(ei.get("value") for ei in entry.iter(f"{{{RIM}}}ExternalIdentifier")
                      if ei.get("identificationScheme") == PATIENT_ID_SCHEME)
    kos = kos_path.read_bytes()

    # ITI-41 by zeep from the official repository WSDL.
    result = call_with_element(
        clients["repo_client"], REPOSITORY_BINDING,
        clients["base_url"] + "/xds/repository",
        "DocumentRepository_ProvideAndRegisterDocumentSet-b", metadata,
        SubmitObjectsRequest={"RegistryObjectList": {}},
        Document=[{"id": entry.get("id"), "_value_1": kos}])
    assert_valid(_last_body(clients["history"]))
    assert result.status == ResponseStatus.SUCCESS, result

    # ITI-18 FindDocuments by zeep from the official registry WSDL: the entry is there, with
    # the size, hash and repositoryUniqueId the repository computed.
    found = clients["reg"].DocumentRegistry_RegistryStoredQuery(
        ResponseOption={"returnType": "LeafClass", "returnComposedObjects": True},
        AdhocQuery={"id": StoredQuery.FIND_DOCUMENTS, "Slot": [
            {"name": "$XDSDocumentEntryPatientId", "ValueList": values(f"'{patient_id}'")},
            {"name": "$XDSDocumentEntryStatus",
             "ValueList": values(f"('{AvailabilityStatus.APPROVED}')")},
        ]})
    body = _last_body(clients["history"])
    assert_valid(body)
    assert found.status == ResponseStatus.SUCCESS
    mine = [eo for eo in body.iter(f"{{{RIM}}}ExtrinsicObject")
            if any(ei.get("value") == unique_id for ei in eo.iter(f"{{{RIM}}}ExternalIdentifier"))]
    assert len(mine) == 1
    slots = {s.get("name"): [v.text for v in s.iter(f"{{{RIM}}}Value")]
             for s in mine[0].findall(f"{{{RIM}}}Slot")}
    assert slots["size"] == [str(len(kos))]
    assert slots["hash"] == [hashlib.sha1(kos).hexdigest()]
    repository_id = slots["repositoryUniqueId"][0]

    # ITI-43 by zeep: MTOM back, byte-exact.
    retrieved = clients["repo"]["DocumentRepository_RetrieveDocumentSet"](
        DocumentRequest=[{"RepositoryUniqueId": repository_id, "DocumentUniqueId": unique_id}])
    assert_valid(_last_body(clients["history"]))
    assert retrieved.RegistryResponse.status == ResponseStatus.SUCCESS
    assert len(retrieved.DocumentResponse) == 1
    doc = retrieved.DocumentResponse[0]
    assert doc.DocumentUniqueId == unique_id
    assert doc.mimeType == "application/dicom"
    assert doc.Document == kos


def test_retrieve_unknown_and_known_is_partial_success(clients, live_gateway) -> None:  # type: ignore[no-untyped-def]
    metadata_path, kos_path = PAIRS[0]
    kos = kos_path.read_bytes()
    metadata = etree.parse(str(metadata_path)).getroot()
    unique_id = next(ei.get("value") for ei in metadata.iter(f"{{{RIM}}}ExternalIdentifier")
                     if ei.get("identificationScheme") == UNIQUE_ID_SCHEME)
    from tomllib import loads
    repository_id = loads(live_gateway.config.read_text())["community"]["repository_unique_id"]
    retrieved = clients["repo"]["DocumentRepository_RetrieveDocumentSet"](DocumentRequest=[
        {"RepositoryUniqueId": repository_id, "DocumentUniqueId": unique_id},
        {"RepositoryUniqueId": repository_id, "DocumentUniqueId": "1.2.3.4.5.404"},
        {"RepositoryUniqueId": "1.2.3.4.5.999", "DocumentUniqueId": unique_id},
    ])
    assert_valid(_last_body(clients["history"]))
    assert retrieved.RegistryResponse.status == ResponseStatus.PARTIAL_SUCCESS
    codes = sorted(e.errorCode for e in retrieved.RegistryResponse.RegistryErrorList.RegistryError)
    assert codes == ["XDSMissingDocument", "XDSUnknownRepositoryId"]
    assert [d.Document for d in retrieved.DocumentResponse] == [kos]
