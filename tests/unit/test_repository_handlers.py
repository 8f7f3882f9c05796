"""ITI-41 and ITI-43 handlers of the Document Repository, driven with NIST ITI-41 messages,
a real RegistryStore (SQLite in tmp_path) and a real DocumentStore (tmp_path)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from gateway.ebrim.metadata import slot_value
from gateway.ebrim.xmlsafe import parse_xml
from gateway.ns import (
    LCM,
    RIM,
    RS,
    XDSB,
    XOP,
    Action,
    AvailabilityStatus,
    ErrorCode,
    ResponseStatus,
    q,
)
from gateway.repository.handlers import provide_and_register, retrieve_document_set
from gateway.repository.references import hash_is_referenced
from gateway.services import Services
from gateway.soap.mtom import mtom_response, parse_multipart
from gateway.transactions import Attachment, RequestContext, SoapResponse
from tests.support.services import community_services

HOME = "urn:oid:1.3.6.1.4.1.21367.13.70.200"
REPO = "1.3.6.1.4.1.21367.13.71.200"
NIST_AUTHORITY = "1.3.6.1.4.1.21367.13.20.1000"
KOS_AUTHORITY = "1.3.6.1.4.1.21367.2005.13.20.1000"

SINGLE_DOC = "messages/iti-41/nist/ReposAcceptanceTest-1111_SubmitSingleDoc_single_doc.xml"
TWO_DOCS = "messages/iti-41/nist/ReposAcceptanceTest-1113_SubmitTwoDocs_two_doc.xml"
RPLC = "messages/iti-41/nist/ReposAcceptanceTest-1111_SubmitRplc_single_doc.xml"
KOS_PAIRS = [
    ("messages/iti-41/nist-kos/testdata_IDCDEPT001_metadata.xml",
     "dicom/kos/nist/testdata_IDCDEPT001_kos.dcm"),
    ("messages/iti-41/nist-kos/idc_init_XDS-I-idc-a_metadata-IDCDEPT011-a.xml",
     "dicom/kos/nist/idc_init_kos-IDCDEPT011-a.dcm"),
    ("messages/iti-41/nist-kos/ids_4801_SelftestPnR_metadata.xml",
     "dicom/kos/nist/ids_4801_SelftestPnR_kos_modified.dcm"),
]


# --- fixtures and helpers ------------------------------------------------------------------

@dataclass
class Env:
    services: Services
    tmp: Path
    spool: Path

    def ctx(self, action: str, attachments: Mapping[str, Attachment] | None = None
            ) -> RequestContext:
        return RequestContext(endpoint="/xds/repository", action=action,
                              message_id=f"urn:uuid:{uuid.uuid4()}", client_subject=None,
                              attachments=attachments or {}, spool_dir=self.spool)

    def stored_files(self) -> list[Path]:
        root = self.services.documents.directory
        return sorted(p for p in root.rglob("*") if p.is_file()
                      and ".staging" not in p.parts and ".locks" not in p.parts)


def make_env(tmp_path: Path, authority: str = NIST_AUTHORITY) -> Env:
    services, spool = community_services(tmp_path, HOME, REPO, authority=authority)
    return Env(services, tmp_path, spool)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = make_env(tmp_path)
    yield e
    e.services.registry.close()


def load_message(path: Path, substitutions: Mapping[str, str] | None = None) -> etree._Element:
    """A NIST message as a ProvideAndRegisterDocumentSetRequest without documents."""
    text = path.read_text(encoding="utf-8")
    for key, value in (substitutions or {}).items():
        text = text.replace(f"${key}$", value)
    assert "$" not in text.replace("$$", ""), "unfilled template placeholder"
    root = parse_xml(text.encode("utf-8"))
    if root.tag == q(LCM, "SubmitObjectsRequest"):
        pnr = etree.Element(q(XDSB, "ProvideAndRegisterDocumentSetRequest"),
                            nsmap={"xdsb": XDSB})
        pnr.append(root)
        root = pnr
    assert root.tag == q(XDSB, "ProvideAndRegisterDocumentSetRequest")
    _as_nist_would_send(root)
    return root


SS_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


def _as_nist_would_send(root: etree._Element) -> None:
    """What the NIST toolkit does to its templates before sending them: a symbolic
    SubmissionSet uniqueId ("SubmissionSet01") becomes an OID, and ids that the template
    reuses across objects (id_1 in two DocumentEntries) become unique."""
    for x in root.iter(q(RIM, "ExternalIdentifier")):
        if x.get("identificationScheme") == SS_UNIQUE_ID and not OID.match(x.get("value", "")):
            x.set("value", f"2.25.{uuid.uuid4().int}")
    seen: set[str] = set()
    for el in root.iter(q(RIM, "Classification"), q(RIM, "ExternalIdentifier")):
        i = el.get("id", "")
        if i in seen and not i.startswith("urn:uuid:"):
            el.set("id", f"{i}_{uuid.uuid4().hex[:8]}")
        seen.add(el.get("id", ""))


def entries(pnr: etree._Element) -> list[etree._Element]:
    return list(pnr.iter(q(RIM, "ExtrinsicObject")))


def eid(eo: etree._Element) -> str:
    value = eo.get("id")
    assert value
    return value


def entry_unique_id(eo: etree._Element) -> str:
    for x in eo.iter(q(RIM, "ExternalIdentifier")):
        if x.get("identificationScheme") == "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab":
            return x.get("value", "")
    raise AssertionError("no uniqueId")


def set_unique_id(eo: etree._Element, value: str) -> None:
    for x in eo.iter(q(RIM, "ExternalIdentifier")):
        if x.get("identificationScheme") == "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab":
            x.set("value", value)


def add_slot(eo: etree._Element, name: str, value: str) -> None:
    slot = etree.Element(q(RIM, "Slot"), name=name)
    etree.SubElement(etree.SubElement(slot, q(RIM, "ValueList")), q(RIM, "Value")).text = value
    eo.insert(0, slot)


def attach(env: Env, pnr: etree._Element, contents: Mapping[str, bytes], *, mtom: bool = True
           ) -> dict[str, Attachment]:
    """Add one xds-b:Document per entry id: an xop:Include to a spooled MIME part, or base64."""
    attachments: dict[str, Attachment] = {}
    for i, (entry_id, data) in enumerate(contents.items()):
        doc = etree.SubElement(pnr, q(XDSB, "Document"), id=entry_id)
        if mtom:
            cid = f"part{i}.{uuid.uuid4().hex}@nist.example"
            path = env.spool / f"att-{i}-{uuid.uuid4().hex}.bin"
            path.write_bytes(data)
            attachments[cid] = Attachment(cid, path, len(data), "application/octet-stream")
            etree.SubElement(doc, q(XOP, "Include"), nsmap={"xop": XOP}).set(
                "href", f"cid:{cid}")
        else:
            doc.text = base64.b64encode(data).decode("ascii")
    return attachments


def submit(env: Env, pnr: etree._Element, attachments: Mapping[str, Attachment] | None = None
           ) -> SoapResponse:
    # Round-trip through bytes: the handler gets what the edge's parser produces.
    body = parse_xml(etree.tostring(pnr))
    return provide_and_register(env.services, env.ctx(Action.ITI41, attachments), body)


def status_of(resp: SoapResponse) -> str:
    el = resp.body if resp.body.tag == q(RS, "RegistryResponse") else \
        resp.body.find(q(RS, "RegistryResponse"))
    assert el is not None
    return el.get("status", "")


def errors_of(resp: SoapResponse) -> list[tuple[str, str | None, str]]:
    return [(e.get("errorCode", ""), e.get("location"), e.get("codeContext", ""))
            for e in resp.body.iter(q(RS, "RegistryError"))]


def retrieve_body(*requests: tuple[str, str, str | None]) -> etree._Element:
    root = etree.Element(q(XDSB, "RetrieveDocumentSetRequest"), nsmap={"xdsb": XDSB})
    for repo, uid, home in requests:
        r = etree.SubElement(root, q(XDSB, "DocumentRequest"))
        if home is not None:
            etree.SubElement(r, q(XDSB, "HomeCommunityId")).text = home
        etree.SubElement(r, q(XDSB, "RepositoryUniqueId")).text = repo
        etree.SubElement(r, q(XDSB, "DocumentUniqueId")).text = uid
    return parse_xml(etree.tostring(root))


def retrieve(env: Env, *requests: tuple[str, str, str | None]) -> SoapResponse:
    return retrieve_document_set(env.services, env.ctx(Action.ITI43), retrieve_body(*requests))


@dataclass
class Returned:
    unique_id: str
    repository: str
    mime_type: str
    home: str | None
    data: bytes
    content_id: str


def returned_documents(resp: SoapResponse) -> list[Returned]:
    by_cid = {a.content_id: a for a in resp.attachments}
    assert len(by_cid) == len(resp.attachments), "content ids must be unique"
    out = []
    for dr in resp.body.iter(q(XDSB, "DocumentResponse")):
        include = dr.find(f"{q(XDSB, 'Document')}/{q(XOP, 'Include')}")
        assert include is not None
        href = include.get("href", "")
        assert href.startswith("cid:")
        att = by_cid[href[4:]]
        out.append(Returned(
            unique_id=dr.findtext(q(XDSB, "DocumentUniqueId")) or "",
            repository=dr.findtext(q(XDSB, "RepositoryUniqueId")) or "",
            mime_type=dr.findtext(q(XDSB, "mimeType")) or "",
            home=dr.findtext(q(XDSB, "HomeCommunityId")),
            data=att.path.read_bytes(),
            content_id=att.content_id,
        ))
        assert att.size == len(out[-1].data)
        assert att.content_type == out[-1].mime_type
    return out


# --- ITI-41 then ITI-43 --------------------------------------------------------------------

def test_mtom_document_comes_back_byte_exact(env: Env, conformance: Path) -> None:
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    uid = entry_unique_id(eo)
    data = os.urandom(2 * 1024 * 1024 + 333)
    attachments = attach(env, pnr, {eid(eo): data})

    resp = submit(env, pnr, attachments)
    assert status_of(resp) == ResponseStatus.SUCCESS, errors_of(resp)
    assert errors_of(resp) == []

    entry = env.services.registry.document_for_retrieve(uid, REPO)
    assert entry is not None
    assert slot_value(entry, "hash") == hashlib.sha1(data).hexdigest()
    assert slot_value(entry, "size") == str(len(data))
    assert slot_value(entry, "repositoryUniqueId") == REPO
    assert env.stored_files() == [env.services.documents.path_for(hashlib.sha1(data).hexdigest())]

    out = retrieve(env, (REPO, uid, None))
    assert status_of(out) == ResponseStatus.SUCCESS
    (doc,) = returned_documents(out)
    assert doc.data == data
    assert (doc.unique_id, doc.repository, doc.mime_type, doc.home) == (
        uid, REPO, "text/plain", None)
    # The attachment is the store's own file, not a copy.
    assert out.attachments[0].path == env.services.documents.path_for(
        hashlib.sha1(data).hexdigest())


def test_inline_base64_documents_and_home_community_echoed(env: Env, conformance: Path) -> None:
    pnr = load_message(conformance / TWO_DOCS)
    eos = entries(pnr)
    assert len(eos) == 2
    contents = {eid(eo): f"document {i}\n".encode() * (100 + i) for i, eo in enumerate(eos)}
    attach(env, pnr, contents, mtom=False)

    resp = submit(env, pnr)
    assert status_of(resp) == ResponseStatus.SUCCESS, errors_of(resp)

    uids = [entry_unique_id(eo) for eo in eos]
    out = retrieve(env, *[(REPO, u, HOME) for u in uids])
    assert status_of(out) == ResponseStatus.SUCCESS
    docs = returned_documents(out)
    assert [d.unique_id for d in docs] == uids
    assert [d.data for d in docs] == list(contents.values())
    assert all(d.home == HOME for d in docs)
    assert len({d.content_id for d in docs}) == 2


def test_submitted_hash_and_size_that_match_are_accepted(env: Env, conformance: Path) -> None:
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    data = b"exact content"
    add_slot(eo, "hash", hashlib.sha1(data).hexdigest().upper())
    add_slot(eo, "size", str(len(data)))
    resp = submit(env, pnr, attach(env, pnr, {eid(eo): data}))
    assert status_of(resp) == ResponseStatus.SUCCESS, errors_of(resp)
    (doc,) = returned_documents(retrieve(env, (REPO, entry_unique_id(eo), None)))
    assert doc.data == data


def test_wrong_hash_is_refused_and_leaves_no_file(env: Env, conformance: Path) -> None:
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    uid = entry_unique_id(eo)
    add_slot(eo, "hash", hashlib.sha1(b"other bytes").hexdigest())
    resp = submit(env, pnr, attach(env, pnr, {eid(eo): b"the real bytes"}))

    assert status_of(resp) == ResponseStatus.FAILURE
    errs = errors_of(resp)
    assert [(c, loc) for c, loc, _ in errs] == [(ErrorCode.NON_IDENTICAL_HASH, uid)]
    assert env.stored_files() == []
    assert env.services.registry.document_for_retrieve(uid, REPO) is None


def test_wrong_size_is_refused(env: Env, conformance: Path) -> None:
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    add_slot(eo, "size", "999")
    resp = submit(env, pnr, attach(env, pnr, {eid(eo): b"twelve bytes"}))
    assert status_of(resp) == ResponseStatus.FAILURE
    assert [c for c, _, _ in errors_of(resp)] == [ErrorCode.NON_IDENTICAL_SIZE]
    assert env.stored_files() == []


def test_failed_registration_leaves_no_orphan_file(tmp_path: Path, conformance: Path) -> None:
    # The registry only accepts patient ids of another assigning authority.
    env = make_env(tmp_path, authority="1.2.3.4.5.6.7")
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    resp = submit(env, pnr, attach(env, pnr, {eid(eo): b"never registered"}))
    assert status_of(resp) == ResponseStatus.FAILURE
    assert ErrorCode.UNKNOWN_PATIENT_ID in [c for c, _, _ in errors_of(resp)]
    assert env.stored_files() == []
    env.services.registry.close()


def test_rejected_resubmission_keeps_the_original_file(env: Env, conformance: Path) -> None:
    original = b"original content"
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    uid = entry_unique_id(eo)
    assert status_of(submit(env, pnr, attach(env, pnr, {eid(eo): original}))) == \
        ResponseStatus.SUCCESS
    files_before = env.stored_files()
    assert len(files_before) == 1

    # Same uniqueIds, other bytes: the registry refuses it; the new file goes, the old stays.
    pnr2 = load_message(conformance / SINGLE_DOC)
    (eo2,) = entries(pnr2)
    resp = submit(env, pnr2, attach(env, pnr2, {eid(eo2): b"conflicting content"}))
    assert status_of(resp) == ResponseStatus.FAILURE
    assert errors_of(resp)
    assert env.stored_files() == files_before

    # Same bytes again (the file existed before this request): refused, and the file stays.
    pnr3 = load_message(conformance / SINGLE_DOC)
    (eo3,) = entries(pnr3)
    resp = submit(env, pnr3, attach(env, pnr3, {eid(eo3): original}))
    assert status_of(resp) == ResponseStatus.FAILURE
    assert env.stored_files() == files_before

    (doc,) = returned_documents(retrieve(env, (REPO, uid, None)))
    assert doc.data == original


def test_same_content_under_two_unique_ids_shares_one_file(env: Env, conformance: Path) -> None:
    data = b"identical report"
    uids = []
    for n in range(2):
        pnr = load_message(conformance / SINGLE_DOC)
        (eo,) = entries(pnr)
        set_unique_id(eo, f"{entry_unique_id(eo)}.{n}")
        uids.append(entry_unique_id(eo))
        for x in pnr.iter(q(RIM, "ExternalIdentifier")):  # a fresh SubmissionSet uniqueId
            if x.get("identificationScheme") == SS_UNIQUE_ID:
                x.set("value", f"{x.get('value')}.{n}")
        resp = submit(env, pnr, attach(env, pnr, {eid(eo): data}))
        assert status_of(resp) == ResponseStatus.SUCCESS, errors_of(resp)
    assert len(env.stored_files()) == 1
    docs = returned_documents(retrieve(env, *[(REPO, u, None) for u in uids]))
    assert [d.data for d in docs] == [data, data]


def test_missing_document_for_an_entry(env: Env, conformance: Path) -> None:
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    resp = submit(env, pnr)
    assert status_of(resp) == ResponseStatus.FAILURE
    assert [(c, loc) for c, loc, _ in errors_of(resp)] == [
        (ErrorCode.MISSING_DOCUMENT, entry_unique_id(eo))]
    assert env.stored_files() == []


def test_xop_include_to_an_absent_part_is_an_error_value(env: Env, conformance: Path) -> None:
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    attach(env, pnr, {eid(eo): b"x"})  # the attachments mapping is not passed on
    resp = submit(env, pnr, {})
    assert status_of(resp) == ResponseStatus.FAILURE
    assert [c for c, _, _ in errors_of(resp)] == [ErrorCode.MISSING_DOCUMENT]
    assert env.stored_files() == []


def test_replaced_document_is_still_retrievable(env: Env, conformance: Path) -> None:
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    uid = entry_unique_id(eo)
    assert status_of(submit(env, pnr, attach(env, pnr, {eid(eo): b"version 1"}))) == \
        ResponseStatus.SUCCESS
    (original,) = env.services.registry.find_documents_by_unique_id([uid])

    rplc = load_message(conformance / RPLC, {"original_doc_uuid": original.id})
    (eo2,) = entries(rplc)
    uid2 = entry_unique_id(eo2)
    assert uid2 != uid
    resp = submit(env, rplc, attach(env, rplc, {eid(eo2): b"version 2"}))
    assert status_of(resp) == ResponseStatus.SUCCESS, errors_of(resp)
    (deprecated,) = env.services.registry.find_documents_by_unique_id([uid])
    assert deprecated.status == AvailabilityStatus.DEPRECATED

    docs = returned_documents(retrieve(env, (REPO, uid, None), (REPO, uid2, None)))
    assert [d.data for d in docs] == [b"version 1", b"version 2"]


# --- RAD-68 KOS ----------------------------------------------------------------------------

@pytest.mark.parametrize(("message", "kos"), KOS_PAIRS)
def test_kos_manifest_comes_back_identical(tmp_path: Path, conformance: Path,
                                           message: str, kos: str) -> None:
    env = make_env(tmp_path, authority=KOS_AUTHORITY)
    pnr = load_message(conformance / message)
    (eo,) = entries(pnr)
    assert eo.get("mimeType") == "application/dicom"
    data = (conformance / kos).read_bytes()
    resp = submit(env, pnr, attach(env, pnr, {eid(eo): data}))
    assert status_of(resp) == ResponseStatus.SUCCESS, errors_of(resp)

    (doc,) = returned_documents(retrieve(env, (REPO, entry_unique_id(eo), None)))
    assert doc.data == data
    assert doc.mime_type == "application/dicom"
    env.services.registry.close()


def test_kos_that_is_not_dicom_is_refused(tmp_path: Path, conformance: Path) -> None:
    env = make_env(tmp_path, authority=KOS_AUTHORITY)
    message, _ = KOS_PAIRS[0]
    pnr = load_message(conformance / message)
    (eo,) = entries(pnr)
    uid = entry_unique_id(eo)
    resp = submit(env, pnr, attach(env, pnr, {eid(eo): b"%PDF-1.4 not a DICOM file"}))
    assert status_of(resp) == ResponseStatus.FAILURE
    assert [(c, loc) for c, loc, _ in errors_of(resp)] == [
        (ErrorCode.REPOSITORY_METADATA_ERROR, uid)]
    assert env.stored_files() == []
    env.services.registry.close()


# --- ITI-43 errors -------------------------------------------------------------------------

@pytest.fixture
def registered(env: Env, conformance: Path) -> tuple[str, bytes]:
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    data = b"registered document"
    assert status_of(submit(env, pnr, attach(env, pnr, {eid(eo): data}))) == \
        ResponseStatus.SUCCESS
    return entry_unique_id(eo), data


def test_partial_success_with_one_unknown_unique_id(env: Env,
                                                    registered: tuple[str, bytes]) -> None:
    uid, data = registered
    unknown = "1.2.3.999.42"
    out = retrieve(env, (REPO, uid, None), (REPO, unknown, None))
    assert status_of(out) == ResponseStatus.PARTIAL_SUCCESS
    (doc,) = returned_documents(out)
    assert (doc.unique_id, doc.data) == (uid, data)
    (err,) = errors_of(out)
    assert err[0] == ErrorCode.MISSING_DOCUMENT
    assert err[1] == unknown
    assert unknown in err[2]


def test_only_unknown_documents_is_failure(env: Env) -> None:
    out = retrieve(env, (REPO, "1.2.3.4", None), (REPO, "1.2.3.5", None))
    assert status_of(out) == ResponseStatus.FAILURE
    assert [(c, loc) for c, loc, _ in errors_of(out)] == [
        (ErrorCode.MISSING_DOCUMENT, "1.2.3.4"), (ErrorCode.MISSING_DOCUMENT, "1.2.3.5")]
    assert out.attachments == ()


def test_unknown_repository_id(env: Env, registered: tuple[str, bytes]) -> None:
    uid, _ = registered
    out = retrieve(env, ("1.2.3.4.5.6.7.8", uid, None))
    assert status_of(out) == ResponseStatus.FAILURE
    assert [(c, loc) for c, loc, _ in errors_of(out)] == [(ErrorCode.UNKNOWN_REPOSITORY_ID, uid)]
    assert out.attachments == ()

    mixed = retrieve(env, (REPO, uid, None), ("1.2.3.4.5.6.7.8", uid, None))
    assert status_of(mixed) == ResponseStatus.PARTIAL_SUCCESS
    assert len(returned_documents(mixed)) == 1


def test_unknown_community(env: Env, registered: tuple[str, bytes]) -> None:
    uid, _ = registered
    out = retrieve(env, (REPO, uid, "urn:oid:1.2.3.4.5.6.7.9"))
    assert status_of(out) == ResponseStatus.FAILURE
    assert [(c, loc) for c, loc, _ in errors_of(out)] == [(ErrorCode.UNKNOWN_COMMUNITY, uid)]


def test_registered_document_whose_file_is_gone(env: Env, registered: tuple[str, bytes]) -> None:
    uid, data = registered
    env.services.documents.path_for(hashlib.sha1(data).hexdigest()).unlink()
    out = retrieve(env, (REPO, uid, None))
    assert status_of(out) == ResponseStatus.FAILURE
    assert [(c, loc) for c, loc, _ in errors_of(out)] == [(ErrorCode.MISSING_DOCUMENT, uid)]


def test_malformed_retrieve_request_is_an_error_value(env: Env) -> None:
    body = parse_xml(f'<xdsb:RetrieveDocumentSetRequest xmlns:xdsb="{XDSB}"/>'.encode())
    out = retrieve_document_set(env.services, env.ctx(Action.ITI43), body)
    assert status_of(out) == ResponseStatus.FAILURE
    assert errors_of(out)
    assert out.attachments == ()


# --- storing without copying ----------------------------------------------------------------

def spool_through_mtom(env: Env, pnr: etree._Element, contents: Mapping[str, bytes], *,
                       sha1: bool = False) -> dict[str, Attachment]:
    """Attach documents the way the edge does: framed as MTOM, then stream-parsed into the
    request's spool folder (with `sha1`, hashing each part as it is written)."""
    sources = env.tmp / "client-files"
    sources.mkdir(exist_ok=True)
    outgoing = []
    for i, (entry_id, data) in enumerate(contents.items()):
        cid = f"part{i}.{uuid.uuid4().hex}@client.example"
        path = sources / f"{cid}.bin"
        path.write_bytes(data)
        outgoing.append(Attachment(cid, path, len(data)))
        doc = etree.SubElement(pnr, q(XDSB, "Document"), id=entry_id)
        etree.SubElement(doc, q(XOP, "Include"), nsmap={"xop": XOP}).set("href", f"cid:{cid}")
    ctype, length, body = mtom_response(b"<e/>", outgoing)
    _root, spooled = parse_multipart(io.BytesIO(b"".join(body)), ctype, env.spool,
                                     max_envelope_bytes=1 << 20, max_total_bytes=1 << 30,
                                     content_length=length, early_writeback=True, sha1=sha1)
    return dict(spooled)


def test_spooled_document_is_linked_not_copied_nor_rehashed_by_the_store(
        env: Env, conformance: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.repository.store as store_module

    def no_reading(_fh: object) -> tuple[str, int]:
        raise AssertionError("the store read the document again")

    monkeypatch.setattr(store_module, "_hash_stream", no_reading)
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    data = os.urandom(1024 * 1024 + 17)
    digest = hashlib.sha1(data).hexdigest()
    add_slot(eo, "hash", digest)
    add_slot(eo, "size", str(len(data)))
    attachments = spool_through_mtom(env, pnr, {eid(eo): data}, sha1=True)
    (att,) = attachments.values()
    assert att.sha1 == digest

    resp = submit(env, pnr, attachments)
    assert status_of(resp) == ResponseStatus.SUCCESS, errors_of(resp)
    stored = env.services.documents.path_for(digest)
    assert env.stored_files() == [stored]
    assert stored.stat().st_ino == att.path.stat().st_ino
    entry = env.services.registry.document_for_retrieve(entry_unique_id(eo), REPO)
    assert entry is not None
    assert (slot_value(entry, "hash"), slot_value(entry, "size")) == (digest, str(len(data)))
    att.path.unlink()  # the edge removes the request's spool folder
    (doc,) = returned_documents(retrieve(env, (REPO, entry_unique_id(eo), None)))
    assert doc.data == data


def test_spooled_document_is_hashed_once_and_linked(env: Env, conformance: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.repository.store as store_module

    passes: list[int] = []
    real = store_module._hash_stream

    def counting(fh: io.BufferedReader) -> tuple[str, int]:
        passes.append(1)
        return real(fh)

    monkeypatch.setattr(store_module, "_hash_stream", counting)
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    data = os.urandom(2 * 1024 * 1024 + 1)
    attachments = spool_through_mtom(env, pnr, {eid(eo): data})  # as the edge spools
    (att,) = attachments.values()
    assert att.sha1 is None
    resp = submit(env, pnr, attachments)
    assert status_of(resp) == ResponseStatus.SUCCESS, errors_of(resp)
    assert passes == [1]
    stored = env.services.documents.path_for(hashlib.sha1(data).hexdigest())
    assert stored.stat().st_ino == att.path.stat().st_ino
    assert stored.read_bytes() == data


def test_spooled_document_with_a_hash_slot_is_read_once(env: Env, conformance: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The submitted hash is checked against one SHA-1 pass; the store reuses it."""
    import gateway.ebrim.validation as validation_module
    import gateway.repository.handlers as handlers_module
    import gateway.repository.store as store_module

    passes: list[str] = []
    real_stream, real_file = store_module._hash_stream, validation_module.sha1_file

    def counting_stream(fh: io.BufferedReader) -> tuple[str, int]:
        passes.append("store")
        return real_stream(fh)

    def counting_file(path: Path, chunk: int = 1 << 20) -> str:
        passes.append("file")
        return real_file(path, chunk)

    monkeypatch.setattr(store_module, "_hash_stream", counting_stream)
    monkeypatch.setattr(validation_module, "sha1_file", counting_file)
    monkeypatch.setattr(handlers_module, "sha1_file", counting_file)
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    data = os.urandom(1024 * 1024 + 3)
    add_slot(eo, "hash", hashlib.sha1(data).hexdigest())
    resp = submit(env, pnr, spool_through_mtom(env, pnr, {eid(eo): data}))
    assert status_of(resp) == ResponseStatus.SUCCESS, errors_of(resp)
    assert passes == ["file"]
    stored = env.services.documents.path_for(hashlib.sha1(data).hexdigest())
    assert stored.read_bytes() == data


def test_wrong_hash_of_a_spooled_document_leaves_no_file(env: Env, conformance: Path) -> None:
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    add_slot(eo, "hash", hashlib.sha1(b"what the source meant to send").hexdigest())
    attachments = spool_through_mtom(env, pnr, {eid(eo): b"what arrived"})
    resp = submit(env, pnr, attachments)
    assert [c for c, _, _ in errors_of(resp)] == [ErrorCode.NON_IDENTICAL_HASH]
    assert env.stored_files() == []
    assert _staging_files(env) == []


def test_registry_crash_after_linking_leaves_no_orphan(env: Env, conformance: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _crash_registry(env, monkeypatch)
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    attachments = spool_through_mtom(env, pnr, {eid(eo): b"linked, then rolled back"})
    resp = submit(env, pnr, attachments)
    assert status_of(resp) == ResponseStatus.FAILURE
    assert env.stored_files() == []
    assert _staging_files(env) == []
    (att,) = attachments.values()
    assert att.path.read_bytes() == b"linked, then rolled back"  # spool intact, edge's job


def test_inline_base64_document_is_hashed_while_decoded_and_linked(env: Env,
                                                                   conformance: Path) -> None:
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    data = os.urandom(70_001)
    attach(env, pnr, {eid(eo): data}, mtom=False)
    resp = submit(env, pnr)
    assert status_of(resp) == ResponseStatus.SUCCESS, errors_of(resp)
    stored = env.services.documents.path_for(hashlib.sha1(data).hexdigest())
    assert stored.read_bytes() == data
    (spooled,) = env.spool.glob("inline-*.bin")
    assert spooled.stat().st_ino == stored.stat().st_ino


def test_document_outside_the_spool_folder_is_copied(env: Env, conformance: Path) -> None:
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    elsewhere = env.tmp / "not-the-spool"
    elsewhere.mkdir()
    path = elsewhere / "doc.bin"
    path.write_bytes(b"a file someone else owns")
    doc = etree.SubElement(pnr, q(XDSB, "Document"), id=eid(eo))
    etree.SubElement(doc, q(XOP, "Include"), nsmap={"xop": XOP}).set("href", "cid:x@y")
    resp = submit(env, pnr, {"x@y": Attachment("x@y", path, path.stat().st_size)})
    assert status_of(resp) == ResponseStatus.SUCCESS, errors_of(resp)
    (stored,) = env.stored_files()
    assert stored.stat().st_ino != path.stat().st_ino
    assert stored.read_bytes() == b"a file someone else owns"


def _staging_files(env: Env) -> list[Path]:
    return list((env.services.documents.directory / ".staging").iterdir())


def _crash_registry(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the registry's submit raise, as a database failure would."""
    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("database exploded")

    monkeypatch.setattr(env.services.registry, "submit", boom)


# --- failures inside the gateway -----------------------------------------------------------

def test_registry_crash_leaves_no_orphan_file(env: Env, conformance: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _crash_registry(env, monkeypatch)
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    resp = submit(env, pnr, attach(env, pnr, {eid(eo): b"lost in the crash"}))
    assert status_of(resp) == ResponseStatus.FAILURE
    assert [c for c, _, _ in errors_of(resp)] == [ErrorCode.REGISTRY_ERROR]
    assert env.stored_files() == []


def test_store_write_failure_is_a_repository_error(env: Env, conformance: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def full(_src: Path, **_kw: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(env.services.documents, "put", full)
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    resp = submit(env, pnr, attach(env, pnr, {eid(eo): b"no room"}))
    assert status_of(resp) == ResponseStatus.FAILURE
    assert [(c, loc) for c, loc, _ in errors_of(resp)] == [
        (ErrorCode.REPOSITORY_ERROR, entry_unique_id(eo))]
    assert env.services.registry.document_for_retrieve(entry_unique_id(eo), REPO) is None


def test_invalid_inline_base64_is_an_error_value(env: Env, conformance: Path) -> None:
    pnr = load_message(conformance / SINGLE_DOC)
    (eo,) = entries(pnr)
    etree.SubElement(pnr, q(XDSB, "Document"), id=eid(eo)).text = "not*base64!"
    resp = submit(env, pnr)
    assert status_of(resp) == ResponseStatus.FAILURE
    assert [c for c, _, _ in errors_of(resp)] == [ErrorCode.REPOSITORY_ERROR]
    assert env.stored_files() == []


def test_hash_is_referenced_reads_the_registry(env: Env,
                                              registered: tuple[str, bytes]) -> None:
    _, data = registered
    sha1 = hashlib.sha1(data).hexdigest()
    assert hash_is_referenced(env.services.registry, sha1) is True
    assert hash_is_referenced(env.services.registry, sha1.upper()) is True
    assert hash_is_referenced(env.services.registry, hashlib.sha1(b"other").hexdigest()) is False
