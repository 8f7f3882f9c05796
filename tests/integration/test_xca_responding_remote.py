"""The Responding Gateways in front of remote backends, with real peers on loopback.

Gateway B is the affinity domain behind A's community: its /xds/registry answers A's ITI-18,
its /xds/repository A's ITI-43 and its /xdsi/imaging-source (over a private Orthanc holding
pydicom's CT_small and MR_small) A's RAD-69. Gateway A is the Responding Gateway: [community]
registry_url points at B's registry; [[repositories]] and [[imaging_sources]] list B's and one
more of each on a closed port (down). A also holds a document in its own built-in repository.
Everything runs over HTTPS with mutual TLS (the development PKI).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from lxml import etree

from gateway.demo import AUTHORITY, IMAGING_SOURCE, REPOSITORY, free_port, start_gateway
from gateway.ebrim.model import (
    AdhocQuery,
    DocumentRequest,
    ExtrinsicObject,
    RetrieveDocumentSetRequest,
    Slot,
)
from gateway.ebrim.parse import parse_adhoc_query_response, parse_retrieve_document_set_response
from gateway.ebrim.render import render_adhoc_query_request, render_retrieve_document_set_request
from gateway.ns import RS, Action, ErrorCode, ResponseStatus, StoredQuery, q
from gateway.security.pki import create_dev_pki
from gateway.soap.client import SoapClient
from tests.support.communities import community_config, gateway_client, shut_down, submit
from tests.support.orthanc import RunningOrthanc, load_files, start_orthanc
from tests.support.rad69 import EXPLICIT_LE, configure_pacs, rad69_request

HA = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.111"  # the responding community
HB = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.112"  # B's own id (unused by A's callers)
REPO_A = "1.3.6.1.4.1.21367.2017.2.3.111"  # A's built-in repository
SOURCE_A = "1.3.6.1.4.1.21367.2017.2.3.112"  # A's built-in imaging source (no PACS)
REPO_B, SOURCE_B = REPOSITORY, IMAGING_SOURCE  # B keeps the demo's ids
REPO_DOWN = "1.3.6.1.4.1.21367.2017.2.3.113"
SOURCE_DOWN = "1.3.6.1.4.1.21367.2017.2.3.114"
PATIENT = f"XCAR-0001^^^&{AUTHORITY}&ISO"
IMAGES = ("CT_small.dcm", "MR_small.dcm")


@dataclass
class Setup:
    a: SoapClient
    b: SoapClient
    b_docs: dict[str, Path]
    a_docs: dict[str, Path]
    images: list[tuple[str, str, str]]  # (study, series, SOP instance) in Orthanc
    b_url: str
    workdir: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, conformance: Path) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("xca-remote")
    pki = create_dev_pki(root / "pki")
    pa, pb, down = free_port(), free_port(), free_port()
    orthanc: RunningOrthanc | None = None
    running = []
    clients: list[SoapClient] = []
    try:
        orthanc = start_orthanc(root / "orthanc", dicom_port=free_port(),
                                http_port=free_port())
        files = [conformance / "dicom" / "pydicom" / name for name in IMAGES]
        load_files(orthanc, files)
        images = []
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            images.append((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                           str(ds.SOPInstanceUID)))

        cfg_b = community_config(root / "b", pki, pb, HB)
        configure_pacs(cfg_b, port=orthanc.dicom_port, imaging_source_unique_id=SOURCE_B,
                       associations=1)
        running.append(start_gateway(cfg_b, pki, pb))

        b = f"https://localhost:{pb}"
        gone = f"https://localhost:{down}"
        extra = f"""
[xca]
connect_timeout_seconds = 2
query_timeout_seconds = 10
retrieve_timeout_seconds = 20

[[repositories]]
unique_id = "{REPO_B}"
retrieve_url = "{b}/xds/repository"

[[repositories]]
unique_id = "{REPO_DOWN}"
retrieve_url = "{gone}/xds/repository"

[[imaging_sources]]
unique_id = "{SOURCE_B}"
retrieve_url = "{b}/xdsi/imaging-source"

[[imaging_sources]]
unique_id = "{SOURCE_DOWN}"
retrieve_url = "{gone}/xdsi/imaging-source"
"""
        cfg_a = community_config(root / "a", pki, pa, HA, extra)
        text = cfg_a.read_text()
        text = re.sub(r'(?m)^repository_unique_id = ".*"$',
                      f'repository_unique_id = "{REPO_A}"', text)
        text = re.sub(r'(?m)^imaging_source_unique_id = ".*"$',
                      f'imaging_source_unique_id = "{SOURCE_A}"\n'
                      f'registry_url = "{b}/xds/registry"', text)
        cfg_a.write_text(text)
        running.append(start_gateway(cfg_a, pki, pa))

        def client(port: int) -> SoapClient:
            return gateway_client(pki, port, clients)

        b_docs = submit(client(pb), root / "docs-b", PATIENT, "21")
        a_docs = submit(client(pa), root / "docs-a", PATIENT, "22")
        yield Setup(client(pa), client(pb), b_docs, a_docs, images, b, root)
    finally:
        shut_down(clients, *running)
        if orthanc is not None:
            orthanc.stop()


def spool(setup: Setup, name: str) -> Path:
    folder = setup.workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def locations(body: etree._Element) -> set[str | None]:
    return {e.get("location") for e in body.iter(q(RS, "RegistryError"))}


def test_iti38_is_answered_by_the_remote_registry_with_our_home(setup: Setup) -> None:
    query = render_adhoc_query_request(AdhocQuery(StoredQuery.FIND_DOCUMENTS, (
        Slot("$XDSDocumentEntryPatientId", (f"'{PATIENT}'",)),
        Slot("$XDSDocumentEntryStatus",
             ("('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')",))),
        return_type="LeafClass", home=HA))
    reply = setup.a.call("/xca/responding", Action.ITI38, query)
    assert reply.body is not None and not reply.is_fault, etree.tostring(reply.envelope)
    parsed = parse_adhoc_query_response(reply.body)
    assert parsed.status == ResponseStatus.SUCCESS, parsed.errors
    entries = [o for o in parsed.objects if isinstance(o, ExtrinsicObject)]
    found = {x.value for e in entries for x in e.external_identifiers
             if x.identification_scheme == "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"}
    # B's registry answered: B's documents; A's built-in registry is not asked. (The KOS
    # manifest has the same uniqueId in both; the report's differs.)
    assert found == set(setup.b_docs)
    assert {o.home for o in parsed.objects if hasattr(o, "home")} == {HA}
    assert all(e.home == HA for e in entries)


def test_iti38_errors_of_the_remote_registry_are_located_at_our_home(setup: Setup) -> None:
    query = render_adhoc_query_request(AdhocQuery(
        StoredQuery.FIND_DOCUMENTS, (Slot("$XDSDocumentEntryStatus", ("('x')",)),), home=HA))
    reply = setup.a.call("/xca/responding", Action.ITI38, query)
    assert reply.body is not None
    parsed = parse_adhoc_query_response(reply.body)
    assert parsed.status == ResponseStatus.FAILURE
    assert parsed.errors and locations(reply.body) == {HA}
    assert ErrorCode.STORED_QUERY_MISSING_PARAM in {e.code for e in parsed.errors}


def test_iti39_from_remote_and_built_in_repositories(setup: Setup) -> None:
    requests = [DocumentRequest(REPO_B, uid, HA) for uid in setup.b_docs]
    requests += [DocumentRequest(REPO_A, uid, HA) for uid in setup.a_docs]
    requests += [DocumentRequest(REPO_DOWN, "1.2.3.4.5.6", HA),
                 DocumentRequest(REPO_B, "1.2.3.4.5.404", HA)]
    reply = setup.a.call("/xca/responding", Action.ITI39, render_retrieve_document_set_request(
        RetrieveDocumentSetRequest(tuple(requests))), spool_dir=spool(setup, "iti39"))
    assert reply.body is not None and not reply.is_fault, etree.tostring(reply.envelope)
    parsed = parse_retrieve_document_set_response(reply.body)
    assert parsed.status == ResponseStatus.PARTIAL_SUCCESS
    got = {}
    for d in parsed.documents:
        assert d.home_community_id == HA
        path = reply.attachment_path(d.content_id)
        assert path is not None
        got[(d.repository_unique_id, d.document_unique_id)] = path.read_bytes()
    want = {(REPO_B, uid): p.read_bytes() for uid, p in setup.b_docs.items()}
    want.update({(REPO_A, uid): p.read_bytes() for uid, p in setup.a_docs.items()})
    assert got == want  # byte-exact, from both repositories
    assert sorted(e.code for e in parsed.errors) == [ErrorCode.MISSING_DOCUMENT,
                                                      ErrorCode.REPOSITORY_ERROR]
    assert locations(reply.body) == {HA}
    [down] = [e for e in parsed.errors if e.code == ErrorCode.REPOSITORY_ERROR]
    assert REPO_DOWN in down.context and "1.2.3.4.5.6" in down.context


def test_rad75_from_the_remote_imaging_source(setup: Setup) -> None:
    docs = [(st, se, sop) for st, se, sop in setup.images]
    direct = setup.b.call("/xdsi/imaging-source", Action.RAD69,
                          rad69_request(docs, [EXPLICIT_LE], repository=SOURCE_B),
                          spool_dir=spool(setup, "rad69-direct"))
    assert direct.body is not None
    direct_parsed = parse_retrieve_document_set_response(direct.body)
    assert direct_parsed.status == ResponseStatus.SUCCESS, direct_parsed.errors
    reference = {}
    for d in direct_parsed.documents:
        path = direct.attachment_path(d.content_id)
        assert path is not None
        reference[d.document_unique_id] = path.read_bytes()

    body = rad69_request(docs, [EXPLICIT_LE], repository=SOURCE_B, home_community_id=HA)
    down = rad69_request([("1.2.3.1", "1.2.3.2", "1.2.3.3")], [EXPLICIT_LE],
                         repository=SOURCE_DOWN, home_community_id=HA)
    body.extend(down.findall("{*}StudyRequest"))
    tsl = body.find("{*}TransferSyntaxUIDList")
    assert tsl is not None
    body.append(tsl)  # after the added StudyRequest, as the schema wants
    reply = setup.a.call("/xcai/responding", Action.RAD75, body,
                         spool_dir=spool(setup, "rad75"))
    assert reply.body is not None and not reply.is_fault, etree.tostring(reply.envelope)
    parsed = parse_retrieve_document_set_response(reply.body)
    assert parsed.status == ResponseStatus.PARTIAL_SUCCESS, parsed.errors
    got = {}
    for d in parsed.documents:
        assert d.home_community_id == HA
        assert d.repository_unique_id == SOURCE_B
        assert d.mime_type == "application/dicom"
        path = reply.attachment_path(d.content_id)
        assert path is not None
        got[d.document_unique_id] = path.read_bytes()
    assert got == reference and len(got) == len(IMAGES)  # byte-exact, as B sent them
    assert [(e.code, e.location) for e in parsed.errors] == [(ErrorCode.REPOSITORY_ERROR, HA)]
    assert SOURCE_DOWN in parsed.errors[0].context
