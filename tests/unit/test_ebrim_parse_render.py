"""parse(render(x)) == x over the conformance corpus, rendered XML valid against the official
schemas, documents of ITI-41 from MTOM parts or inline base64, and clear XDS errors for
malformed metadata."""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from lxml import etree

from gateway.ebrim import metadata as M
from gateway.ebrim.model import (
    AdhocQuery,
    AdhocQueryResponse,
    Classification,
    DocumentContent,
    DocumentRequest,
    ObjectRef,
    ProvideAndRegisterRequest,
    RegistryPackage,
    RetrievedDocument,
    RetrieveDocumentSetRequest,
    Slot,
    SubmitObjectsRequest,
)
from gateway.ebrim.parse import (
    parse_adhoc_query_request,
    parse_adhoc_query_response,
    parse_provide_and_register,
    parse_registry_object_list,
    parse_registry_response,
    parse_retrieve_document_set_request,
    parse_retrieve_document_set_response,
    parse_submit_objects_request,
)
from gateway.ebrim.render import (
    render_adhoc_query_request,
    render_adhoc_query_response,
    render_provide_and_register,
    render_registry_object_list,
    render_registry_response,
    render_retrieve_document_set_request,
    render_retrieve_document_set_response,
    render_submit_objects_request,
)
from gateway.ebrim.xmlsafe import parse_xml, parse_xml_file
from gateway.errors import XdsError, XdsFailure
from gateway.ns import (
    LCM,
    QUERY,
    RS,
    XDSB,
    XOP,
    DocumentEntryScheme,
    ErrorCode,
    ResponseStatus,
    Severity,
    StoredQuery,
    SubmissionSetScheme,
    q,
)
from gateway.transactions import Attachment
from tests.conftest import CONFORMANCE
from tests.support.xsd import assert_valid, schema_errors

ITI41 = CONFORMANCE / "messages" / "iti-41"


def _provenance_invalid() -> set[str]:
    bad: set[str] = set()
    for line in (CONFORMANCE / "PROVENANCE.tsv").read_text().splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) >= 6 and ("INVALID" in cols[5] or "NOT WELL-FORMED" in cols[5]):
            bad.add(cols[0])
    return bad


def corpus_files() -> list[Path]:
    invalid = _provenance_invalid()
    files = sorted([*ITI41.glob("nist/*.xml"), *ITI41.glob("nist-kos/*.xml"),
                    *ITI41.glob("ihe/*Request*.xml"), *ITI41.glob("ipf/*.xml"),
                    *ITI41.glob("nist-metadata/*.xml")])
    return [f for f in files
            if str(f.relative_to(CONFORMANCE)) not in invalid]


def fill_placeholders(data: bytes) -> bytes:
    """NIST templates: $rtN$ -> LeafClass, $patient_id$ -> a valid CX, other $name$ -> a
    urn:uuid (the same one for the same name)."""
    names: dict[bytes, bytes] = {}

    def sub(m: re.Match[bytes]) -> bytes:
        name = m.group(1).lower()
        if re.fullmatch(rb"rt[0-9]*|returntype", name):
            return b"LeafClass"
        if b"patient" in name:
            return b"P0924175725.3^^^&amp;1.3.6.1.4.1.21367.13.20.1000&amp;ISO"
        return names.setdefault(m.group(0), f"urn:uuid:{uuid.uuid4()}".encode())

    return re.sub(rb"\$([A-Za-z0-9_]+)\$", sub, data)


def load_body(path: Path) -> etree._Element:
    root = parse_xml(fill_placeholders(path.read_bytes()))
    for tag in (q(XDSB, "ProvideAndRegisterDocumentSetRequest"), q(LCM, "SubmitObjectsRequest")):
        found = next(root.iter(tag), None)
        if found is not None:
            return found
    raise AssertionError(f"no submission in {path}")


def must(el: etree._Element | None) -> etree._Element:
    assert el is not None
    return el


def load_sor(path: Path) -> SubmitObjectsRequest:
    body = load_body(path)
    if body.tag == q(LCM, "SubmitObjectsRequest"):
        return parse_submit_objects_request(body)
    return parse_submit_objects_request(must(body.find(q(LCM, "SubmitObjectsRequest"))))


def _docs(tmp_path: Path) -> Iterator[Path]:
    n = 0
    while True:
        n += 1
        d = tmp_path / f"spool{n}"
        d.mkdir()
        yield d


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_submission_roundtrips_and_validates(path: Path, tmp_path: Path) -> None:
    body = load_body(path)
    spool = _docs(tmp_path)
    if body.tag == q(XDSB, "ProvideAndRegisterDocumentSetRequest"):
        atts: dict[str, Attachment] = {}
        for inc in body.iter(q(XOP, "Include")):  # MTOM captures: stand-in parts
            cid = inc.get("href", "")[4:]
            f = tmp_path / f"att{len(atts)}"
            f.write_bytes(b"part " + cid.encode())
            atts[cid] = Attachment(cid, f, f.stat().st_size)
        pnr = parse_provide_and_register(body, atts, next(spool))
        rendered = render_provide_and_register(pnr)  # inline base64
        assert_valid(rendered)
        again = parse_provide_and_register(rendered, {}, next(spool))
        assert again.submission == pnr.submission
        assert [(d.id, d.path.read_bytes()) for d in again.documents] == \
            [(d.id, d.path.read_bytes()) for d in pnr.documents]
        sub = pnr.submission
    else:
        sub = parse_submit_objects_request(body)
        rendered = render_submit_objects_request(sub)
        assert_valid(rendered)
        assert parse_submit_objects_request(rendered) == sub
    # the registry object list on its own, too
    rol = render_registry_object_list(sub.objects)
    assert parse_registry_object_list(rol) == sub.objects
    # nothing was lost: every ExtrinsicObject / RegistryPackage / Association of the source
    src_ids = {e.get("id") for e in body.iter() if isinstance(e.tag, str)
               and etree.QName(e).localname in ("ExtrinsicObject", "RegistryPackage",
                                               "Association", "Classification",
                                               "ExternalIdentifier")}
    got: set[str | None] = set(M_ids(sub.objects))
    assert src_ids == got


def M_ids(objects: tuple[object, ...]) -> Iterator[str]:
    for o in objects:
        yield o.id  # type: ignore[attr-defined]
        for c in getattr(o, "classifications", ()):
            yield c.id
        for x in getattr(o, "external_identifiers", ()):
            yield x.id


def test_rendered_element_order_follows_rim(tmp_path: Path) -> None:
    sub = load_sor(ITI41 / "nist" / "ReposAcceptanceTest-1113_SubmitFolderwDoc_fol_doc.xml")
    el = render_submit_objects_request(sub)
    order = ["Slot", "Name", "Description", "VersionInfo", "Classification",
             "ExternalIdentifier", "ContentVersionInfo"]
    for obj in el.iter():
        if etree.QName(obj).localname in ("ExtrinsicObject", "RegistryPackage"):
            names = [etree.QName(c).localname for c in obj]
            assert names == sorted(names, key=order.index), names


# --- ITI-41 documents ---------------------------------------------------------------------------


def _ihe_pnr() -> etree._Element:
    return load_body(ITI41 / "ihe" / "ProvideAndRegisterDocumentSet-bRequest.xml")


def test_inline_base64_document_is_decoded_to_spool(tmp_path: Path) -> None:
    body = _ihe_pnr()
    text = must(body.find(q(XDSB, "Document"))).text or ""
    pnr = parse_provide_and_register(body, {}, tmp_path)
    (doc,) = pnr.documents
    assert doc.id == "Document01"
    assert doc.path.parent == tmp_path
    assert doc.path.read_bytes() == base64.b64decode(text)
    assert doc.size == len(base64.b64decode(text))
    assert doc.sha1 == hashlib.sha1(base64.b64decode(text)).hexdigest()


def test_inline_base64_with_line_breaks_over_chunks(tmp_path: Path, monkeypatch) -> None:
    import gateway.ebrim.parse as P
    monkeypatch.setattr(P, "_B64_CHUNK", 8)  # force many chunk boundaries
    payload = bytes(range(256)) * 3 + b"tail"
    wrapped = "\n".join(re.findall(".{1,7}", base64.b64encode(payload).decode()))
    body = _ihe_pnr()
    must(body.find(q(XDSB, "Document"))).text = wrapped
    (doc,) = parse_provide_and_register(body, {}, tmp_path).documents
    assert doc.path.read_bytes() == payload
    # Hashed chunk by chunk while decoding: the hash of the whole file.
    assert doc.sha1 == hashlib.sha1(doc.path.read_bytes()).hexdigest()


@pytest.mark.parametrize("bad", ["abc", "ab!d", "YQ==YWJj", "YW Jj=a"])
def test_bad_base64_is_a_repository_error(bad: str, tmp_path: Path) -> None:
    body = _ihe_pnr()
    must(body.find(q(XDSB, "Document"))).text = bad
    with pytest.raises(XdsFailure) as info:
        parse_provide_and_register(body, {}, tmp_path)
    (err,) = info.value.errors
    assert err.code == ErrorCode.REPOSITORY_ERROR
    assert "Document01" in err.context and "base64" in err.context


def _with_include(href: str) -> etree._Element:
    body = _ihe_pnr()
    doc = must(body.find(q(XDSB, "Document")))
    doc.text = None
    etree.SubElement(doc, q(XOP, "Include"), href=href)
    return body


@pytest.mark.parametrize("href", ["cid:part1@example.org", "cid:part1%40example.org",
                                  "cid:%3Cpart1@example.org%3E"])
def test_xop_include_resolves_attachment(href: str, tmp_path: Path) -> None:
    f = tmp_path / "p1"
    f.write_bytes(b"hello")
    att = Attachment("part1@example.org", f, 5, sha1=hashlib.sha1(b"hello").hexdigest())
    (doc,) = parse_provide_and_register(_with_include(href), {att.content_id: att},
                                        tmp_path).documents
    assert (doc.id, doc.path, doc.size, doc.sha1) == ("Document01", f, 5, att.sha1)


def test_missing_attachment_is_missing_document(tmp_path: Path) -> None:
    with pytest.raises(XdsFailure) as info:
        parse_provide_and_register(_with_include("cid:nothere@x"), {}, tmp_path)
    (err,) = info.value.errors
    assert err.code == ErrorCode.MISSING_DOCUMENT
    assert "nothere@x" in err.context and "Document01" in err.context


def test_pnr_with_xop_renders_valid_and_roundtrips(tmp_path: Path) -> None:
    f = tmp_path / "d"
    f.write_bytes(b"data")
    pnr = parse_provide_and_register(_ihe_pnr(), {}, tmp_path)
    pnr = replace(pnr, documents=(DocumentContent("Document01", f, 4),))
    el = render_provide_and_register(pnr, content_id_for=lambda d: f"{d.id}@gw")
    assert_valid(el)
    att = Attachment("Document01@gw", f, 4)
    back = parse_provide_and_register(el, {"Document01@gw": att}, tmp_path)
    assert back == pnr


# --- malformed metadata ---------------------------------------------------------------------------


def test_missing_classified_object_names_element_and_object() -> None:
    body = _ihe_pnr()
    c = next(body.iter("{*}Classification"))
    del c.attrib["classifiedObject"]
    with pytest.raises(XdsFailure) as info:
        parse_provide_and_register(body, {}, Path("/nonexistent"))
    (err,) = info.value.errors
    assert err.code == ErrorCode.REGISTRY_METADATA_ERROR
    assert "Classification" in err.context and "classifiedObject" in err.context
    assert str(c.get("id")) in err.context


def test_unknown_element_in_object_list() -> None:
    rol = parse_xml(b'<rim:RegistryObjectList xmlns:rim="urn:oasis:names:tc:ebxml-regrep:'
                    b'xsd:rim:3.0"><rim:Organization id="o1"/></rim:RegistryObjectList>')
    with pytest.raises(XdsFailure) as info:
        parse_registry_object_list(rol)
    assert info.value.errors[0].code == ErrorCode.REGISTRY_METADATA_ERROR
    assert "Organization" in info.value.errors[0].context


def test_association_without_target_object() -> None:
    rol = parse_xml(b'<rim:RegistryObjectList xmlns:rim="urn:oasis:names:tc:ebxml-regrep:'
                    b'xsd:rim:3.0"><rim:Association id="a1" associationType="x" '
                    b'sourceObject="s"/></rim:RegistryObjectList>')
    with pytest.raises(XdsFailure) as info:
        parse_registry_object_list(rol)
    ctx = info.value.errors[0].context
    assert "targetObject" in ctx and "a1" in ctx


# --- responses and queries -----------------------------------------------------------------------


ERRS = (XdsError(ErrorCode.REGISTRY_METADATA_ERROR, "DocumentEntry d1: classCode missing"),
        XdsError(ErrorCode.EXTRA_METADATA_NOT_SAVED, "slot x", Severity.WARNING, "1.2.3"))


@pytest.mark.parametrize("errors", [(), ERRS])
def test_registry_response(errors: tuple[XdsError, ...]) -> None:
    status = ResponseStatus.FAILURE if errors else ResponseStatus.SUCCESS
    el = render_registry_response(status, errors)
    assert_valid(el)
    assert el.tag == q(RS, "RegistryResponse")
    back = parse_registry_response(el)
    assert (back.status, back.errors) == (status, errors)


def test_registry_response_location_override() -> None:
    el = render_registry_response(ResponseStatus.FAILURE, ERRS, location="urn:oid:1.2.3.4")
    assert {e.location for e in parse_registry_response(el).errors} == {"urn:oid:1.2.3.4"}


def test_corpus_registry_responses_parse() -> None:
    base = CONFORMANCE / "messages" / "iti-41" / "connect"
    parsed = []
    for f in sorted([*base.glob("errors/*.xml"), *base.glob("responses/*.xml")]):
        el = next(parse_xml_file(f).iter(q(RS, "RegistryResponse")))
        parsed.append(parse_registry_response(el))
    assert len(parsed) >= 4
    with_errors = [r for r in parsed if r.errors]
    assert with_errors and all(e.code and e.severity for r in with_errors for e in r.errors)
    assert any(r.status == ResponseStatus.SUCCESS and not r.errors for r in parsed)


def _nist_queries() -> list[Path]:
    base = CONFORMANCE / "messages" / "iti-18"
    return sorted([*base.glob("nist/stored-queries/*/*.xml"),
                   base / "ihe" / "RegistryStoredQueryRequest.xml"])


@pytest.mark.parametrize("path", _nist_queries(), ids=lambda p: p.name)
def test_corpus_queries_roundtrip(path: Path) -> None:
    root = parse_xml(fill_placeholders(path.read_bytes()))
    el = next(root.iter(q(QUERY, "AdhocQueryRequest")), None)
    if el is None:
        pytest.skip("not an AdhocQueryRequest")
    query = parse_adhoc_query_request(el)
    assert query.query_id.startswith("urn:uuid:")
    again = render_adhoc_query_request(query)
    assert_valid(again)
    assert parse_adhoc_query_request(again) == query
    assert len(query.parameters) == len(el.findall(".//{*}AdhocQuery/{*}Slot"))


def test_query_request_defaults_and_options() -> None:
    query = AdhocQuery(StoredQuery.FIND_DOCUMENTS, (Slot("$XDSDocumentEntryPatientId",
                                                         ("'p^^^&1.2&ISO'",)),),
                       return_type="ObjectRef", home="urn:oid:1.2", return_composed_objects=False,
                       start_index=5, max_results=10, federated=True)
    el = render_adhoc_query_request(query)
    assert_valid(el)
    assert parse_adhoc_query_request(el) == query


def test_adhoc_query_response_leafclass_and_objectref() -> None:
    sub = load_sor(ITI41 / "nist" / "ReposAcceptanceTest-1113_SubmitFolderwDoc_fol_doc.xml")
    for objs in (sub.objects, tuple(ObjectRef(o.id, "urn:oid:1.2.3") for o in sub.objects)):
        el = render_adhoc_query_response(ResponseStatus.SUCCESS, objs, ())
        assert_valid(el)
        back = parse_adhoc_query_response(el)
        assert back == AdhocQueryResponse(ResponseStatus.SUCCESS, objs, ())
    empty = render_adhoc_query_response(ResponseStatus.FAILURE, (), ERRS)
    assert_valid(empty)  # RegistryObjectList is required even when empty
    assert parse_adhoc_query_response(empty).errors == ERRS


def test_corpus_query_response_parses() -> None:
    root = parse_xml_file(CONFORMANCE / "messages/iti-18/ihe/RegistryStoredQueryResponse.xml")
    resp = parse_adhoc_query_response(next(root.iter(q(QUERY, "AdhocQueryResponse"))))
    assert resp.status.endswith("Success")  # the IHE sample uses the short form
    assert any(M.is_document_entry(o) for o in resp.objects)


def test_retrieve_request_roundtrip() -> None:
    root = parse_xml_file(CONFORMANCE / "messages/iti-43/ihe/RetrieveDocumentSetRequest.xml")
    req = parse_retrieve_document_set_request(next(root.iter(q(XDSB,
                                                               "RetrieveDocumentSetRequest"))))
    assert req.documents and all(d.repository_unique_id for d in req.documents)
    el = render_retrieve_document_set_request(req)
    assert_valid(el)
    assert parse_retrieve_document_set_request(el) == req
    req2 = RetrieveDocumentSetRequest((DocumentRequest("1.2", "1.2.3", "urn:oid:9"),))
    assert parse_retrieve_document_set_request(render_retrieve_document_set_request(req2)) == req2


def test_retrieve_request_missing_document_unique_id() -> None:
    el = parse_xml(b'<x:RetrieveDocumentSetRequest xmlns:x="urn:ihe:iti:xds-b:2007">'
                   b'<x:DocumentRequest><x:RepositoryUniqueId>1.2</x:RepositoryUniqueId>'
                   b'</x:DocumentRequest></x:RetrieveDocumentSetRequest>')
    with pytest.raises(XdsFailure) as info:
        parse_retrieve_document_set_request(el)
    assert "DocumentUniqueId" in info.value.errors[0].context


def test_retrieve_response_order_validity_roundtrip(tmp_path: Path) -> None:
    docs = [RetrievedDocument("1.2.3", "1.2.3.4", "application/dicom", tmp_path / "a", 10,
                              home_community_id="urn:oid:1.1", new_repository_unique_id="9.8",
                              new_document_unique_id="9.8.7"),
            RetrievedDocument("1.2.3", "1.2.3.5", "text/xml", tmp_path / "b", 3)]
    el = render_retrieve_document_set_response(
        ResponseStatus.PARTIAL_SUCCESS, docs, ERRS[:1],
        content_id_for=lambda d: f"{d.document_unique_id}@gw")
    assert_valid(el)
    first = must(el.find(q(XDSB, "DocumentResponse")))
    assert [etree.QName(c).localname for c in first] == [
        "HomeCommunityId", "RepositoryUniqueId", "DocumentUniqueId", "NewRepositoryUniqueId",
        "NewDocumentUniqueId", "mimeType", "Document"]
    assert must(first.find(q(XDSB, "Document")))[0].get("href") == "cid:1.2.3.4@gw"
    back = parse_retrieve_document_set_response(el)
    assert back.status == ResponseStatus.PARTIAL_SUCCESS and back.errors == ERRS[:1]
    assert [(d.document_unique_id, d.content_id, d.mime_type, d.home_community_id)
            for d in back.documents] == [("1.2.3.4", "1.2.3.4@gw", "application/dicom",
                                          "urn:oid:1.1"),
                                         ("1.2.3.5", "1.2.3.5@gw", "text/xml", None)]


def test_schema_validator_catches_wrong_order() -> None:
    el = render_registry_response(ResponseStatus.SUCCESS)
    etree.SubElement(el, q(RS, "Bogus"))
    assert schema_errors(el)
    with pytest.raises(AssertionError):
        assert_valid(el)


# --- metadata accessors ---------------------------------------------------------------------------


def test_submission_set_nested_or_top_level_classification() -> None:
    pkg = RegistryPackage(id="ss")
    top = Classification(id="c", classified_object="ss",
                         classification_node=SubmissionSetScheme.NODE)
    assert not M.is_submission_set(pkg)
    assert M.is_submission_set(pkg, (pkg, top))
    nested = replace(pkg, classifications=(top,))
    assert M.is_submission_set(nested)
    assert not M.is_folder(nested)
    other = Classification(id="c2", classified_object="other",
                           classification_node=SubmissionSetScheme.NODE)
    assert not M.is_submission_set(pkg, (pkg, other))


def test_accessors_on_corpus_entry() -> None:
    sub = load_sor(ITI41 / "nist" / "ReposAcceptanceTest-1113_SubmitFolderwDoc_fol_doc.xml")
    s = M.classify_submission(sub.objects)
    (entry,) = s.document_entries
    assert s.submission_set is not None and len(s.folders) == 1
    assert len(s.associations) >= 2
    assert M.unique_id(entry) == "1.2.42.20181005.1504.2.777.300"
    assert M.patient_id(entry) == M.patient_id(s.submission_set)
    assert M.external_id(entry, DocumentEntryScheme.UNIQUE_ID) == M.unique_id(entry)
    assert M.slot_value(entry, "creationTime") == "20041224"
    assert M.slot_value(entry, "nope") is None
    (cls,) = M.codes(entry, DocumentEntryScheme.CLASS_CODE)
    assert cls == M.Code("IMAGES", "1.3.6.1.4.1.19376.1.2.6.1", "Images")
    assert len(M.slot_values(entry, "sourcePatientInfo")) == 5


def test_roundtrip_of_synthetic_everything(tmp_path: Path) -> None:
    """Every optional field of the model survives render -> parse."""
    from gateway.ebrim.model import (
        Association,
        ExternalIdentifier,
        ExtrinsicObject,
        LocalizedString,
        VersionInfo,
    )
    ls = (LocalizedString("Tïtle", "de-CH", "UTF-8"), LocalizedString("T2"))
    c = Classification("c1", "e1", "urn:uuid:s", None, "code", ls, ls, (Slot("a", ("1", "")),),
                       "urn:oid:1", "urn:ot")
    x = ExternalIdentifier("x1", "e1", "urn:uuid:s2", "v", ls, ls, (Slot("b", (), "t"),),
                           "urn:oid:1", "urn:ot2")
    e = ExtrinsicObject("e1", "urn:oid:1", "lid1", "urn:st", "urn:type", ls, ls,
                        VersionInfo("1.1", "c"), (Slot("s", ("v",)),), (c,), (x,),
                        "text/plain", True, VersionInfo("2", None))
    p = RegistryPackage("p1", status="urn:st", version_info=VersionInfo())
    a = Association("a1", slots=(Slot("SubmissionSetStatus", ("Original",)),),
                    association_type="urn:t", source_object="p1", target_object="e1")
    objs = (e, p, a, c, x, ObjectRef("urn:uuid:r", "urn:oid:2"))
    sub = SubmitObjectsRequest(objs, (Slot("req", ("1",)),), "urn:uuid:req", "comment")
    assert parse_submit_objects_request(render_submit_objects_request(sub)) == sub
    f = tmp_path / "doc"
    f.write_bytes(hashlib.sha1(b"x").digest())
    pnr = ProvideAndRegisterRequest(sub, (DocumentContent("e1", f, 20),))
    back = parse_provide_and_register(render_provide_and_register(pnr), {}, tmp_path)
    assert back.submission == sub and back.documents[0].path.read_bytes() == f.read_bytes()
