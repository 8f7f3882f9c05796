"""ITI-42 and ITI-18 through the registry handlers, with real NIST submissions and NIST
stored-query messages from the conformance corpus, on a temporary SQLite registry."""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

import pytest
from lxml import etree

from gateway.config import CommunityConfig, GatewayConfig, RegistryConfig
from gateway.ebrim.xmlsafe import parse_xml
from gateway.ns import (
    LCM,
    RIM,
    AvailabilityStatus,
    DocumentEntryScheme,
    ErrorCode,
    ResponseStatus,
    StoredQuery,
)
from gateway.registry import handlers
from gateway.registry.query_params import ParamSyntaxError, parse_code, parse_value
from gateway.registry.store import Kind, RegistryStore
from gateway.services import Services
from gateway.transactions import RequestContext

NIST_AUTHORITY = "1.3.6.1.4.1.21367.13.20.1000"
NIST_PID = f"P0924175725.3^^^&{NIST_AUTHORITY}&ISO"
REPO = "1.3.6.1.4.1.21367.2010.1.2.1125"
SINGLE = "iti-41/nist/ReposAcceptanceTest-1111_SubmitSingleDoc_single_doc.xml"
RPLC = "iti-41/nist/ReposAcceptanceTest-1111_SubmitRplc_single_doc.xml"
TWO = "iti-41/nist/ReposAcceptanceTest-1113_SubmitTwoDocs_two_doc.xml"
ASSOCIATE = ("iti-41/nist/"
             "ReposAcceptanceTest-1113_AssociateExistingDEwithExistingFolder_associate.xml")
KOS = "iti-41/nist-kos/idc_init_XDS-I-idc-a_metadata-IDCDEPT001-a.xml"
SQ = "iti-18/nist/stored-queries"
FIND_APPROVED_LEAF = f"{SQ}/FindDocuments/FindDocuments-21__11897_expired_approved_query.xml"
FIND_APPROVED_REF = f"{SQ}/FindDocuments/FindDocuments-22__12342_pid_query2.xml"
FIND_DEPRECATED = f"{SQ}/FindDocuments/FindDocuments-11__11897_deprecated_query.xml"
FIND_BOTH_TYPES = (f"{SQ}/FindDocuments/"
                   "FindDocuments-23__15805_Query_Both_FindDocuments_fd_query.xml")
GET_BY_UUID_LEAF = f"{SQ}/GetDocuments/GetDocuments-09__12368_doc_leafclass_query.xml"
GET_BY_UUID_REF = f"{SQ}/GetDocuments/GetDocuments-10__12368_doc_objectref_query.xml"
GET_BY_UID = f"{SQ}/GetDocuments/GetDocuments-06__15800_query_by_uniqueid_query.xml"

NS = {"rim": RIM, "rs": "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0",
      "query": "urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"}


# --- fixtures and helpers --------------------------------------------------------------------

def make_services(tmp_path: Path, *, authority: str = NIST_AUTHORITY,
                  max_results: int = 100) -> Services:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    config = GatewayConfig(
        community=CommunityConfig(home_community_id="urn:oid:1.2.3.4",
                                  repository_unique_id=REPO,
                                  imaging_source_unique_id="1.2.3.5",
                                  patient_id_assigning_authority=authority),
        registry=RegistryConfig(database=url, max_results=max_results))
    return Services(config=config, registry=RegistryStore(url), documents=None)  # type: ignore[arg-type]


@pytest.fixture
def services(tmp_path: Path):
    s = make_services(tmp_path)
    yield s
    s.registry.close()


@pytest.fixture
def ctx(tmp_path: Path) -> RequestContext:
    return RequestContext(endpoint="/xds/registry", action="urn:ihe:iti:2007:RegisterDocumentSet-b",
                          message_id="urn:uuid:test", client_subject=None, attachments={},
                          spool_dir=tmp_path)


def load(conformance: Path, rel: str, **subs: str) -> etree._Element:
    text = (conformance / "messages" / rel).read_text(encoding="utf-8")
    for key, value in subs.items():
        text = text.replace(f"${key}$", xml_escape(value, {"'": "&apos;", '"': "&quot;"}))
    return parse_xml(text.encode("utf-8"))


def submission(conformance: Path, rel: str, *, edit=None, **subs: str) -> etree._Element:
    """The lcm:SubmitObjectsRequest of a NIST ITI-41 message, made an ITI-42 one: each
    DocumentEntry gets the hash, size and repositoryUniqueId the repository would add."""
    root = load(conformance, rel, **subs)
    sor = root if root.tag == f"{{{LCM}}}SubmitObjectsRequest" else root.find(
        f"{{{LCM}}}SubmitObjectsRequest")
    assert sor is not None
    for i, eo in enumerate(sor.iter(f"{{{RIM}}}ExtrinsicObject")):
        have = {s.get("name") for s in eo.findall(f"{{{RIM}}}Slot")}
        for name, value in (("hash", f"{i:040x}"), ("size", "1234"),
                            ("repositoryUniqueId", REPO)):
            if name not in have:
                slot = etree.Element(f"{{{RIM}}}Slot", name=name)
                vl = etree.SubElement(slot, f"{{{RIM}}}ValueList")
                etree.SubElement(vl, f"{{{RIM}}}Value").text = value
                eo.insert(0, slot)
    if edit is not None:
        edit(sor)
    return sor


def register(services: Services, ctx: RequestContext, body: etree._Element
             ) -> tuple[str, list[str]]:
    resp = handlers.register_document_set(services, ctx, body).body
    assert resp.tag == "{urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0}RegistryResponse"
    codes = [str(e.get("errorCode")) for e in resp.iterfind(".//rs:RegistryError", NS)]
    return str(resp.get("status")), codes


def query(services: Services, ctx: RequestContext, body: etree._Element
          ) -> tuple[str, list[str], etree._Element]:
    resp = handlers.stored_query(services, ctx, body).body
    assert resp.tag == "{urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0}AdhocQueryResponse"
    codes = [str(e.get("errorCode")) for e in resp.iterfind(".//rs:RegistryError", NS)]
    return str(resp.get("status")), codes, resp


def entries(resp: etree._Element) -> list[etree._Element]:
    return resp.findall(".//rim:RegistryObjectList/rim:ExtrinsicObject", NS)


def refs(resp: etree._Element) -> list[str]:
    return [str(r.get("id")) for r in resp.findall(".//rim:RegistryObjectList/rim:ObjectRef", NS)]


def uid_of(eo: etree._Element) -> str:
    return next(str(x.get("value")) for x in eo.iterfind("rim:ExternalIdentifier", NS)
                if x.get("identificationScheme") == DocumentEntryScheme.UNIQUE_ID)


def adhoc(query_id: str, slots: list[tuple[str, list[str]]],
          return_type: str = "LeafClass") -> etree._Element:
    ns_q = NS["query"]
    root = etree.Element(f"{{{ns_q}}}AdhocQueryRequest", nsmap={"query": ns_q, "rim": RIM})
    etree.SubElement(root, f"{{{ns_q}}}ResponseOption", returnType=return_type,
                     returnComposedObjects="true")
    aq = etree.SubElement(root, f"{{{RIM}}}AdhocQuery", id=query_id)
    for name, values in slots:
        slot = etree.SubElement(aq, f"{{{RIM}}}Slot", name=name)
        vl = etree.SubElement(slot, f"{{{RIM}}}ValueList")
        for v in values:
            etree.SubElement(vl, f"{{{RIM}}}Value").text = v
    return root


APPROVED = f"('{AvailabilityStatus.APPROVED}')"


def find_documents(*extra: tuple[str, list[str]], pid: str = NIST_PID,
                   return_type: str = "LeafClass") -> etree._Element:
    return adhoc(StoredQuery.FIND_DOCUMENTS, [
        ("$XDSDocumentEntryPatientId", [f"'{pid}'"]),
        ("$XDSDocumentEntryStatus", [APPROVED]), *extra], return_type)


SS_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"


def kos_unique_id(sor: etree._Element) -> None:
    """The NIST KOS metadata leaves the SubmissionSet uniqueId for the toolkit to fill."""
    for x in sor.iterfind(".//rim:ExternalIdentifier", NS):
        if x.get("identificationScheme") == SS_UNIQUE_ID and x.get("value") == "SubmissionSet01":
            x.set("value", "1.3.6.1.4.1.21367.2005.3.7.99")


# --- ITI-42 ----------------------------------------------------------------------------------

def test_register_nist_single_document_then_find_it(services, ctx, conformance) -> None:
    assert register(services, ctx, submission(conformance, SINGLE)) == \
        (ResponseStatus.SUCCESS, [])
    assert services.registry.count(Kind.DOCUMENT_ENTRY) == 1
    status, codes, resp = query(services, ctx,
                                load(conformance, FIND_APPROVED_LEAF, patient_id=NIST_PID))
    assert (status, codes) == (ResponseStatus.SUCCESS, [])
    [eo] = entries(resp)
    assert uid_of(eo) == "1.2.42.20180925.1.777.200"
    assert str(eo.get("id")).startswith("urn:uuid:")  # symbolic id replaced
    assert eo.get("status") == AvailabilityStatus.APPROVED
    # ObjectRef: the same entry, by id only.
    status, _, resp = query(services, ctx,
                            load(conformance, FIND_APPROVED_REF, patientid=NIST_PID))
    assert status == ResponseStatus.SUCCESS
    assert refs(resp) == [eo.get("id")]
    assert entries(resp) == []


def test_register_the_same_submission_twice_is_a_duplicate(services, ctx, conformance) -> None:
    assert register(services, ctx, submission(conformance, SINGLE))[0] == ResponseStatus.SUCCESS
    count = services.registry.count()
    status, codes = register(services, ctx, submission(conformance, SINGLE))
    assert status == ResponseStatus.FAILURE
    assert ErrorCode.DUPLICATE_UNIQUE_ID in codes
    assert services.registry.count() == count


def test_same_unique_id_with_another_hash(services, ctx, conformance) -> None:
    assert register(services, ctx, submission(conformance, SINGLE))[0] == ResponseStatus.SUCCESS

    def other_hash(sor: etree._Element) -> None:
        for slot in sor.iterfind(".//rim:Slot[@name='hash']", NS):
            slot.findall(".//rim:Value", NS)[0].text = "f" * 40
        for x in sor.iterfind(".//rim:ExternalIdentifier", NS):  # a new SubmissionSet uid
            if x.get("identificationScheme") == SS_UNIQUE_ID:
                x.set("value", "1.2.42.99")

    status, codes = register(services, ctx, submission(conformance, SINGLE, edit=other_hash))
    assert (status, codes) == (ResponseStatus.FAILURE, [ErrorCode.NON_IDENTICAL_HASH])


def test_rplc_deprecates_the_original(services, ctx, conformance) -> None:
    assert register(services, ctx, submission(conformance, SINGLE))[0] == ResponseStatus.SUCCESS
    _, _, resp = query(services, ctx, find_documents(return_type="ObjectRef"))
    [original] = refs(resp)
    assert register(services, ctx, submission(conformance, RPLC, original_doc_uuid=original)) \
        == (ResponseStatus.SUCCESS, [])
    _, _, resp = query(services, ctx, load(conformance, FIND_DEPRECATED, patient_id=NIST_PID))
    assert refs(resp) == [original]
    _, _, resp = query(services, ctx, find_documents())
    assert [uid_of(e) for e in entries(resp)] == ["1.2.42.20181016.777.200.1"]
    # Both statuses in one query, in the ('a', 'b') syntax.
    _, _, resp = query(services, ctx, adhoc(StoredQuery.FIND_DOCUMENTS, [
        ("$XDSDocumentEntryPatientId", [f"'{NIST_PID}'"]),
        ("$XDSDocumentEntryStatus", [f"('{AvailabilityStatus.APPROVED}', "
                                     f"'{AvailabilityStatus.DEPRECATED}')"])]))
    assert len(entries(resp)) == 2


def test_replacing_a_deprecated_document_fails_and_stores_nothing(
        services, ctx, conformance) -> None:
    assert register(services, ctx, submission(conformance, SINGLE))[0] == ResponseStatus.SUCCESS
    _, _, resp = query(services, ctx, find_documents(return_type="ObjectRef"))
    [original] = refs(resp)
    assert register(services, ctx, submission(conformance, RPLC, original_doc_uuid=original)) \
        == (ResponseStatus.SUCCESS, [])
    count = services.registry.count()

    def fresh_ids(sor: etree._Element) -> None:
        for x in sor.iterfind(".//rim:ExternalIdentifier", NS):
            if x.get("identificationScheme") in (
                    DocumentEntryScheme.UNIQUE_ID, SS_UNIQUE_ID):
                x.set("value", f"{x.get('value')}.2")

    status, codes = register(services, ctx, submission(
        conformance, RPLC, original_doc_uuid=original, edit=fresh_ids))
    assert (status, codes) == (ResponseStatus.FAILURE, [ErrorCode.REPLACE_FAILED])
    assert services.registry.count() == count


def test_association_to_unknown_objects_leaves_nothing_stored(
        services, ctx, conformance) -> None:
    body = submission(conformance, ASSOCIATE,
                      fol_uuid="urn:uuid:00000000-0000-4000-8000-000000000001",
                      doc1_uuid="urn:uuid:00000000-0000-4000-8000-000000000002")
    status, codes = register(services, ctx, body)
    assert status == ResponseStatus.FAILURE
    assert codes and set(codes) <= {ErrorCode.UNRESOLVED_REFERENCE,
                                    ErrorCode.REGISTRY_METADATA_ERROR}
    assert services.registry.count() == 0


def test_patient_id_of_another_assigning_authority(services, ctx, conformance) -> None:
    status, codes = register(services, ctx, submission(conformance, KOS, edit=kos_unique_id))
    assert status == ResponseStatus.FAILURE
    assert ErrorCode.UNKNOWN_PATIENT_ID in codes
    assert services.registry.count() == 0


def test_kos_submission_in_its_own_domain(tmp_path, ctx, conformance) -> None:
    services = make_services(tmp_path, authority="1.3.6.1.4.1.21367.2005.13.20.1000")
    try:
        status, codes = register(services, ctx, submission(conformance, KOS, edit=kos_unique_id))
        assert (status, codes) == (ResponseStatus.SUCCESS, [])
        pid = "IDCAD001-a^^^&1.3.6.1.4.1.21367.2005.13.20.1000&ISO"
        body = load(conformance,
                    f"{SQ}/FindDocuments/FindDocuments-01__idc_2018-4831a_validate-iti-18_query.xml")
        status, codes, resp = query(services, ctx, body)
        assert (status, codes) == (ResponseStatus.SUCCESS, [])
        [eo] = entries(resp)
        assert eo.get("mimeType") == "application/dicom"
        # Event code CT (modality) as a filter.
        ct = "('CT^^1.2.840.10008.2.16.4')"
        _, _, resp = query(services, ctx, find_documents(
            ("$XDSDocumentEntryEventCodeList", [ct]), pid=pid))
        assert len(entries(resp)) == 1
        _, _, resp = query(services, ctx, find_documents(
            ("$XDSDocumentEntryEventCodeList", [ct]),
            ("$XDSDocumentEntryEventCodeList", ["('MR^^1.2.840.10008.2.16.4')"]), pid=pid))
        assert entries(resp) == []
    finally:
        services.registry.close()


def test_not_a_submit_objects_request_is_a_failure_value(services, ctx) -> None:
    status, codes = register(services, ctx, etree.Element("{urn:x}Nonsense"))
    assert status == ResponseStatus.FAILURE
    assert codes


# --- ITI-18 ----------------------------------------------------------------------------------

def _two_docs_one_report(sor: etree._Element) -> None:
    second = sor.findall(".//rim:ExtrinsicObject", NS)[1]
    for c in second.iterfind("rim:Classification", NS):
        if c.get("classificationScheme") == DocumentEntryScheme.CLASS_CODE:
            c.set("nodeRepresentation", "REPORTS")


def test_find_documents_by_class_code(services, ctx, conformance) -> None:
    assert register(services, ctx, submission(conformance, TWO, edit=_two_docs_one_report)) \
        == (ResponseStatus.SUCCESS, [])
    _, _, resp = query(services, ctx, find_documents())
    assert len(entries(resp)) == 2
    images = "('IMAGES^^1.3.6.1.4.1.19376.1.2.6.1')"
    _, _, resp = query(services, ctx, find_documents(("$XDSDocumentEntryClassCode", [images])))
    assert [uid_of(e) for e in entries(resp)] == ["1.2.42.20180925.1.777.200"]
    # code^^^scheme (three carets) means the same.
    _, _, resp = query(services, ctx, find_documents(
        ("$XDSDocumentEntryClassCode", ["('IMAGES^^^1.3.6.1.4.1.19376.1.2.6.1')"])))
    assert len(entries(resp)) == 1
    # Two Values of one Slot are ORed.
    _, _, resp = query(services, ctx, find_documents(
        ("$XDSDocumentEntryClassCode", [images, "('REPORTS^^1.3.6.1.4.1.19376.1.2.6.1')"])))
    assert len(entries(resp)) == 2
    _, _, resp = query(services, ctx, find_documents(
        ("$XDSDocumentEntryClassCode", ["('IMAGES^^9.9.9')"])))
    assert entries(resp) == []
    # Type code and format code filters from the NIST metadata.
    _, _, resp = query(services, ctx, find_documents(
        ("$XDSDocumentEntryTypeCode", ["('11502-2^^2.16.840.1.113883.6.1')"]),
        ("$XDSDocumentEntryFormatCode", ["('urn:ihe:pcc:xphr:2007^^1.3.6.1.4.1.19376.1.2.3')"])))
    assert len(entries(resp)) == 2
    # Only stable entries unless asked: on-demand only gives nothing.
    _, _, resp = query(services, ctx, find_documents(
        ("$XDSDocumentEntryType", ["('urn:uuid:34268e47-fdf5-41a6-ba33-82133c465248')"])))
    assert entries(resp) == []
    _, _, resp = query(services, ctx, load(conformance, FIND_BOTH_TYPES, patientid=NIST_PID))
    assert len(entries(resp)) == 2


def test_status_filter(services, ctx, conformance) -> None:
    assert register(services, ctx, submission(conformance, SINGLE))[0] == ResponseStatus.SUCCESS
    _, _, resp = query(services, ctx, load(conformance, FIND_DEPRECATED, patient_id=NIST_PID))
    assert refs(resp) == []
    _, _, resp = query(services, ctx, find_documents(pid=f"OTHER^^^&{NIST_AUTHORITY}&ISO"))
    assert entries(resp) == []


def test_get_documents_nist_messages(services, ctx, conformance) -> None:
    assert register(services, ctx, submission(conformance, TWO))[0] == ResponseStatus.SUCCESS
    _, _, resp = query(services, ctx, find_documents(return_type="ObjectRef"))
    ids = refs(resp)
    assert len(ids) == 2
    status, codes, resp = query(services, ctx, load(conformance, GET_BY_UUID_LEAF,
                                                    uuid1=ids[0], uuid2=ids[1]))
    assert (status, codes) == (ResponseStatus.SUCCESS, [])
    assert sorted(str(e.get("id")) for e in entries(resp)) == sorted(ids)
    _, _, resp = query(services, ctx, load(conformance, GET_BY_UUID_REF,
                                           uuid1=ids[0], uuid2=ids[1]))
    assert sorted(refs(resp)) == sorted(ids) and entries(resp) == []
    _, _, resp = query(services, ctx, load(conformance, GET_BY_UID,
                                           uid="1.2.42.20180925.2.777.200"))
    assert [uid_of(e) for e in entries(resp)] == ["1.2.42.20180925.2.777.200"]
    _, _, resp = query(services, ctx, load(conformance, GET_BY_UID, uid="1.2.999"))
    assert entries(resp) == []


def test_get_documents_needs_exactly_one_identifier_kind(services, ctx) -> None:
    status, codes, _ = query(services, ctx, adhoc(StoredQuery.GET_DOCUMENTS, []))
    assert (status, codes) == (ResponseStatus.FAILURE, [ErrorCode.STORED_QUERY_MISSING_PARAM])
    status, codes, _ = query(services, ctx, adhoc(StoredQuery.GET_DOCUMENTS, [
        ("$XDSDocumentEntryEntryUUID", ["('urn:uuid:a')"]),
        ("$XDSDocumentEntryUniqueId", ["('1.2')"])]))
    assert (status, codes) == (ResponseStatus.FAILURE, [ErrorCode.STORED_QUERY_PARAM_NUMBER])


def test_unknown_and_unsupported_stored_queries(services, ctx, conformance) -> None:
    status, codes, _ = query(services, ctx, adhoc("urn:uuid:00000000-0000-0000-0000-000000000000",
                                                  []))
    assert (status, codes) == (ResponseStatus.FAILURE, [ErrorCode.UNKNOWN_STORED_QUERY])
    # The one well-known misspelling of FindDocumentsByReferenceId is not accepted.
    status, codes, _ = query(services, ctx, adhoc("urn:uuid:12941a89-e02e-4be5-967c-ce4bfc8fe49",
                                                  []))
    assert codes == [ErrorCode.UNKNOWN_STORED_QUERY]
    # Every one of the fourteen is answered.
    from gateway.registry.stored_queries import QUERIES
    assert len(QUERIES) == 14 and all(q.run is not None for q in QUERIES.values())


def test_missing_and_repeated_parameters(services, ctx) -> None:
    status, codes, _ = query(services, ctx, adhoc(StoredQuery.FIND_DOCUMENTS, [
        ("$XDSDocumentEntryStatus", [APPROVED])]))
    assert (status, codes) == (ResponseStatus.FAILURE, [ErrorCode.STORED_QUERY_MISSING_PARAM])
    status, codes, _ = query(services, ctx, adhoc(StoredQuery.FIND_DOCUMENTS, [
        ("$XDSDocumentEntryPatientId", [f"'{NIST_PID}'"])]))
    assert (status, codes) == (ResponseStatus.FAILURE, [ErrorCode.STORED_QUERY_MISSING_PARAM])
    status, codes, _ = query(services, ctx, find_documents(
        ("$XDSDocumentEntryPatientId", [f"'{NIST_PID}'"])))
    assert (status, codes) == (ResponseStatus.FAILURE, [ErrorCode.STORED_QUERY_PARAM_NUMBER])
    status, codes, _ = query(services, ctx, adhoc(StoredQuery.FIND_DOCUMENTS, [
        ("$XDSDocumentEntryPatientId", [f"('{NIST_PID}', 'X^^^&1.2&ISO')"]),
        ("$XDSDocumentEntryStatus", [APPROVED])]))
    assert (status, codes) == (ResponseStatus.FAILURE, [ErrorCode.STORED_QUERY_PARAM_NUMBER])
    # A class code given in two Slots (not an AND/OR parameter).
    status, codes, _ = query(services, ctx, find_documents(
        ("$XDSDocumentEntryClassCode", ["('A^^1')"]),
        ("$XDSDocumentEntryClassCode", ["('B^^1')"])))
    assert (status, codes) == (ResponseStatus.FAILURE, [ErrorCode.STORED_QUERY_PARAM_NUMBER])


def test_too_many_results(tmp_path, ctx, conformance) -> None:
    services = make_services(tmp_path, max_results=1)
    try:
        assert register(services, ctx, submission(conformance, TWO))[0] == \
            ResponseStatus.SUCCESS
        status, codes, resp = query(services, ctx, find_documents())
        assert (status, codes) == (ResponseStatus.FAILURE, [ErrorCode.TOO_MANY_RESULTS])
        assert entries(resp) == []
        _, codes, resp = query(services, ctx, find_documents(
            ("$XDSDocumentEntryClassCode", ["('IMAGES^^1.3.6.1.4.1.19376.1.2.6.1')"]),
            ("$XDSDocumentEntryCreationTimeFrom", ["20041224"])))
        assert codes == [ErrorCode.TOO_MANY_RESULTS]
    finally:
        services.registry.close()


def test_malformed_query_is_a_failure_value(services, ctx) -> None:
    status, codes, _ = query(services, ctx, adhoc(StoredQuery.FIND_DOCUMENTS, [
        ("$XDSDocumentEntryPatientId", ["'unterminated"]),
        ("$XDSDocumentEntryStatus", [APPROVED])]))
    assert status == ResponseStatus.FAILURE and codes == [ErrorCode.REGISTRY_ERROR]
    status, codes, _ = query(services, ctx, etree.Element("{urn:x}Nonsense"))
    assert status == ResponseStatus.FAILURE and codes


# --- the value syntax (ITI TF-2a 3.18.4.1.2.3.5) --------------------------------------------

@pytest.mark.parametrize(("text", "values"), [
    ("'abc'", ("abc",)),
    ("  'a b'  ", ("a b",)),
    ("20040101", ("20040101",)),
    ("('a')", ("a",)),
    ("('a','b')", ("a", "b")),
    ("( 'a' , 'b' )", ("a", "b")),
    ("('it''s', 'x,y', '(z)')", ("it's", "x,y", "(z)")),
    (r"('it\'s')", ("it's",)),
    ("('P1^^^&1.2.3&ISO')", ("P1^^^&1.2.3&ISO",)),
])
def test_parse_value(text: str, values: tuple[str, ...]) -> None:
    assert parse_value(text) == values


@pytest.mark.parametrize("text", ["", "'open", "('a'", "('a' 'b')", "()", "'a' x", "('a',)"])
def test_parse_value_rejects(text: str) -> None:
    with pytest.raises(ParamSyntaxError):
        parse_value(text)


def test_parse_code() -> None:
    assert parse_code("IMAGES^^1.3.6") == ("IMAGES", "1.3.6")
    assert parse_code("IMAGES^^^1.3.6") == ("IMAGES", "1.3.6")
    for bad in ("Dialysis", "a^^", "^^^1.2", "a^x^1.2"):
        with pytest.raises(ParamSyntaxError):
            parse_code(bad)


def test_nist_folder_flow_links_existing_objects(services, ctx, conformance) -> None:
    base = "iti-41/nist/ReposAcceptanceTest-1113_"
    assert register(services, ctx, submission(conformance, base + "SubmitFolder_single_fol.xml")) \
        == (ResponseStatus.SUCCESS, [])
    assert register(services, ctx, submission(conformance, base + "SubmitFolderwDoc_fol_doc.xml")
                    ) == (ResponseStatus.SUCCESS, [])
    [folder] = services.registry.find_by_unique_ids(Kind.FOLDER, ["1.2.42.20181005.777.200"])
    [doc] = services.registry.find_documents_by_unique_id(["1.2.42.20181005.1504.2.777.300"])
    # A new DocumentEntry into the existing folder.
    assert register(services, ctx, submission(
        conformance, base + "AssociateNewDEwithExistingFolder_associate_fol.xml",
        fol_uuid=folder.id)) == (ResponseStatus.SUCCESS, [])
    # The existing DocumentEntry into the existing folder.
    assert register(services, ctx, submission(
        conformance, ASSOCIATE, fol_uuid=folder.id, doc1_uuid=doc.id)) == \
        (ResponseStatus.SUCCESS, [])
    members = {a.target_object for a in services.registry.associations_for([folder.id])
               if a.source_object == folder.id}
    [new_doc] = services.registry.find_documents_by_unique_id(["1.2.42.20181005.1515.777.200"])
    assert members == {doc.id, new_doc.id}
    # The same link again in a submission of another patient is refused.
    other = f"P9^^^&{NIST_AUTHORITY}&ISO"

    def other_patient(sor: etree._Element) -> None:
        for x in sor.iterfind(".//rim:ExternalIdentifier", NS):
            if x.get("identificationScheme") == SS_UNIQUE_ID:
                x.set("value", "1.2.42.20181005.1521.777.101")
            elif "P1005125143.2" in str(x.get("value")):
                x.set("value", other)

    count = services.registry.count()
    status, codes = register(services, ctx, submission(
        conformance, ASSOCIATE, fol_uuid=folder.id, doc1_uuid=doc.id, edit=other_patient))
    assert status == ResponseStatus.FAILURE
    assert set(codes) == {ErrorCode.PATIENT_ID_DOES_NOT_MATCH}  # one per referenced object
    assert services.registry.count() == count
