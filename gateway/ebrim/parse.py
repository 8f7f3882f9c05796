"""lxml elements -> ebRIM model objects (gateway.ebrim.model).

Reads RegistryObjectLists, lcm:SubmitObjectsRequest, xds-b:ProvideAndRegisterDocumentSetRequest
(documents as MTOM attachments or inline base64, decoded in chunks to a spool file),
query:AdhocQueryRequest, xds-b:RetrieveDocumentSetRequest, and the responses clients read.
Missing required attributes or unexpected elements raise `XdsFailure` with an error whose
context names the element, the attribute and the object id. Element input comes from the
hardened parser (gateway.ebrim.xmlsafe); this module does no I/O except writing inline
documents to the spool folder it is given.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from lxml import etree

from gateway.ebrim.model import (
    AdhocQuery,
    AdhocQueryResponse,
    Association,
    Classification,
    DocumentContent,
    DocumentRequest,
    DocumentResponseRef,
    ExternalIdentifier,
    ExtrinsicObject,
    Identifiable,
    LocalizedString,
    ObjectRef,
    ProvideAndRegisterRequest,
    RegistryPackage,
    RegistryResponse,
    RetrieveDocumentSetRequest,
    RetrieveDocumentSetResponse,
    Slot,
    SubmitObjectsRequest,
    VersionInfo,
)
from gateway.errors import XdsError, XdsFailure
from gateway.ns import LCM, QUERY, RIM, RS, XDSB, XOP, ErrorCode, Severity, q

if TYPE_CHECKING:
    from gateway.transactions import Attachment

XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"

# Base64 characters per decoding step: a multiple of 4, about 3 MB of output.
_B64_CHUNK = 4 * 1024 * 1024
_B64_WS = re.compile(r"\s+")
_B64_OK = re.compile(r"[A-Za-z0-9+/]*={0,2}")

# --- errors ------------------------------------------------------------------------------------


def _fail(context: str, code: str = ErrorCode.REGISTRY_METADATA_ERROR) -> XdsFailure:
    return XdsFailure(XdsError(code, context))


def _where(el: etree._Element) -> str:
    name = etree.QName(el).localname
    oid = el.get("id")
    line = f" (line {el.sourceline})" if el.sourceline else ""
    return f"{name} id={oid!r}{line}" if oid else f"{name}{line}"


def _req(el: etree._Element, attr: str, code: str = ErrorCode.REGISTRY_METADATA_ERROR,
         owner: str | None = None) -> str:
    v = el.get(attr)
    if v is None or (attr == "id" and not v.strip()):
        of = f" of {owner}" if owner else ""
        raise _fail(f"{_where(el)}{of}: required attribute {attr} is missing", code)
    return v


def _bool(el: etree._Element, attr: str, default: bool) -> bool:
    v = el.get(attr)
    if v is None:
        return default
    v = v.strip().lower()
    if v in ("true", "1"):
        return True
    if v in ("false", "0"):
        return False
    raise _fail(f"{_where(el)}: attribute {attr}={v!r} is not a boolean (true/false)",
                ErrorCode.REGISTRY_ERROR)


def _int(el: etree._Element, attr: str, default: int | None,
         code: str = ErrorCode.REGISTRY_ERROR) -> int | None:
    v = el.get(attr)
    if v is None:
        return default
    try:
        return int(v.strip())
    except ValueError:
        raise _fail(f"{_where(el)}: attribute {attr}={v!r} is not an integer", code) from None


def _text(el: etree._Element | None) -> str:
    return (el.text or "").strip() if el is not None else ""


def _tag(el: etree._Element) -> str:
    return el.tag if isinstance(el.tag, str) else ""


def _children(el: etree._Element) -> list[etree._Element]:
    """Element children (comments and processing instructions skipped)."""
    return [c for c in el if isinstance(c.tag, str)]


def _expect(el: etree._Element, ns: str, local: str,
            code: str = ErrorCode.REGISTRY_ERROR) -> None:
    if _tag(el) != q(ns, local):
        raise _fail(f"expected element {{{ns}}}{local}, found {_tag(el) or el!r}", code)


# --- RIM building blocks -----------------------------------------------------------------------


def parse_slot(el: etree._Element, owner: str | None = None) -> Slot:
    name = _req(el, "name", owner=owner)
    values: list[str] = []
    vl = el.find(q(RIM, "ValueList"))
    if vl is not None:
        values = [(v.text or "") for v in vl.iterfind(q(RIM, "Value"))]
    return Slot(name=name, values=tuple(values), slot_type=el.get("slotType"))


def _slots(el: etree._Element, owner: str | None = None) -> tuple[Slot, ...]:
    return tuple(parse_slot(s, owner) for s in el.iterfind(q(RIM, "Slot")))


def _istring(el: etree._Element, local: str) -> tuple[LocalizedString, ...]:
    holder = el.find(q(RIM, local))
    if holder is None:
        return ()
    return tuple(
        LocalizedString(value=ls.get("value", ""), lang=ls.get(XML_LANG),
                        charset=ls.get("charset"))
        for ls in holder.iterfind(q(RIM, "LocalizedString")))


def _version(el: etree._Element, local: str) -> VersionInfo | None:
    v = el.find(q(RIM, local))
    if v is None:
        return None
    return VersionInfo(version_name=v.get("versionName"), comment=v.get("comment"))


def parse_classification(el: etree._Element, parent_id: str | None = None) -> Classification:
    owner = f"object {parent_id!r}" if parent_id else None
    cid = _req(el, "id", owner=owner)
    return Classification(
        id=cid,
        classified_object=_req(el, "classifiedObject", owner=owner),
        classification_scheme=el.get("classificationScheme"),
        classification_node=el.get("classificationNode"),
        node_representation=el.get("nodeRepresentation"),
        name=_istring(el, "Name"),
        description=_istring(el, "Description"),
        slots=_slots(el, f"Classification {cid!r}"),
        home=el.get("home"),
        object_type=el.get("objectType"),
    )


def parse_external_identifier(el: etree._Element,
                              parent_id: str | None = None) -> ExternalIdentifier:
    owner = f"object {parent_id!r}" if parent_id else None
    eid = _req(el, "id", owner=owner)
    return ExternalIdentifier(
        id=eid,
        registry_object=_req(el, "registryObject", owner=owner),
        identification_scheme=_req(el, "identificationScheme", owner=owner),
        value=_req(el, "value", owner=owner),
        name=_istring(el, "Name"),
        description=_istring(el, "Description"),
        slots=_slots(el, f"ExternalIdentifier {eid!r}"),
        home=el.get("home"),
        object_type=el.get("objectType"),
    )


def _registry_object_fields(el: etree._Element) -> dict[str, object]:
    oid = _req(el, "id")
    if el.find(q(RIM, "RegistryObjectList")) is not None:
        raise _fail(f"{_where(el)}: a nested RegistryObjectList is not supported; "
                    "submit the members at the top level with HasMember associations")
    return {
        "id": oid,
        "home": el.get("home"),
        "lid": el.get("lid"),
        "status": el.get("status"),
        "name": _istring(el, "Name"),
        "description": _istring(el, "Description"),
        "version_info": _version(el, "VersionInfo"),
        "slots": _slots(el, f"{etree.QName(el).localname} {oid!r}"),
        "classifications": tuple(parse_classification(c, oid)
                                 for c in el.iterfind(q(RIM, "Classification"))),
        "external_identifiers": tuple(parse_external_identifier(x, oid)
                                      for x in el.iterfind(q(RIM, "ExternalIdentifier"))),
    }


def parse_extrinsic_object(el: etree._Element) -> ExtrinsicObject:
    f = _registry_object_fields(el)
    opaque = el.get("isOpaque")
    return ExtrinsicObject(
        **f,  # type: ignore[arg-type]
        object_type=el.get("objectType"),
        mime_type=el.get("mimeType"),
        is_opaque=None if opaque is None else _bool(el, "isOpaque", False),
        content_version_info=_version(el, "ContentVersionInfo"),
    )


def parse_registry_package(el: etree._Element) -> RegistryPackage:
    f = _registry_object_fields(el)
    return RegistryPackage(**f, object_type=el.get("objectType"))  # type: ignore[arg-type]


def parse_association(el: etree._Element) -> Association:
    f = _registry_object_fields(el)
    owner = f"Association {f['id']!r}"
    return Association(
        **f,  # type: ignore[arg-type]
        object_type=el.get("objectType"),
        association_type=_req(el, "associationType", owner=owner),
        source_object=_req(el, "sourceObject", owner=owner),
        target_object=_req(el, "targetObject", owner=owner),
    )


def parse_object_ref(el: etree._Element) -> ObjectRef:
    return ObjectRef(id=_req(el, "id"), home=el.get("home"))


_PARSERS: dict[str, Callable[[etree._Element], Identifiable]] = {
    q(RIM, "ExtrinsicObject"): parse_extrinsic_object,
    q(RIM, "RegistryPackage"): parse_registry_package,
    q(RIM, "Association"): parse_association,
    q(RIM, "Classification"): parse_classification,
    q(RIM, "ExternalIdentifier"): parse_external_identifier,
    q(RIM, "ObjectRef"): parse_object_ref,
}


def parse_identifiable(el: etree._Element) -> Identifiable:
    fn = _PARSERS.get(_tag(el))
    if fn is None:
        raise _fail(f"{_where(el)}: element {_tag(el)} is not supported in a "
                    "RegistryObjectList (expected ExtrinsicObject, RegistryPackage, "
                    "Association, Classification, ExternalIdentifier or ObjectRef)")
    return fn(el)


def parse_registry_object_list(el: etree._Element) -> tuple[Identifiable, ...]:
    """rim:RegistryObjectList -> its objects, in document order."""
    _expect(el, RIM, "RegistryObjectList", ErrorCode.REGISTRY_METADATA_ERROR)
    return tuple(parse_identifiable(c) for c in _children(el))


def _slot_list(el: etree._Element, local: str, ns: str) -> tuple[Slot, ...]:
    holder = el.find(q(ns, local))
    return _slots(holder, local) if holder is not None else ()


def parse_submit_objects_request(el: etree._Element) -> SubmitObjectsRequest:
    """lcm:SubmitObjectsRequest (ITI-42 body, the metadata of ITI-41)."""
    _expect(el, LCM, "SubmitObjectsRequest", ErrorCode.REGISTRY_METADATA_ERROR)
    rol = el.find(q(RIM, "RegistryObjectList"))
    if rol is None:
        raise _fail("SubmitObjectsRequest: required element rim:RegistryObjectList is missing")
    return SubmitObjectsRequest(
        objects=parse_registry_object_list(rol),
        slots=_slot_list(el, "RequestSlotList", RS),
        id=el.get("id"),
        comment=el.get("comment"),
    )


# --- ITI-41 documents --------------------------------------------------------------------------


def content_id_from_href(href: str) -> str:
    """`cid:abc%40example.org` -> `abc@example.org` (no "cid:", no <>, URL-decoded)."""
    h = href.strip()
    if h[:4].lower() == "cid:":
        h = h[4:]
    h = unquote(h).strip()
    if h.startswith("<") and h.endswith(">"):
        h = h[1:-1]
    return h


def decode_base64_to_file(text: str, target: Path, *, document_id: str = "",
                          digest: hashlib._Hash | None = None) -> int:
    """Decode base64 `text` (whitespace allowed) into `target` chunk by chunk; return the size.

    `digest` (a hashlib object), when given, is updated with the decoded bytes as they are
    written. Raises `XdsFailure(XDSRepositoryError)` when the text is not valid base64.
    """
    size = 0
    carry = ""
    ended = False  # padding seen: no more data may follow
    with open(target, "wb") as out:
        for start in range(0, len(text), _B64_CHUNK):
            part = carry + _B64_WS.sub("", text[start:start + _B64_CHUNK])
            cut = len(part) - len(part) % 4
            chunk, carry = part[:cut], part[cut:]
            if not chunk:
                continue
            if ended or not _B64_OK.fullmatch(chunk):
                raise _fail(f"Document {document_id!r}: content is not valid base64",
                            ErrorCode.REPOSITORY_ERROR)
            ended = chunk.endswith("=")
            try:
                data = base64.b64decode(chunk, validate=True)
            except (binascii.Error, ValueError):
                raise _fail(f"Document {document_id!r}: content is not valid base64",
                            ErrorCode.REPOSITORY_ERROR) from None
            out.write(data)
            if digest is not None:
                digest.update(data)
            size += len(data)
    if carry:
        raise _fail(f"Document {document_id!r}: base64 content is truncated "
                    f"({len(carry)} characters left over after the last full quantum)",
                    ErrorCode.REPOSITORY_ERROR)
    return size


def parse_document(el: etree._Element, attachments: Mapping[str, Attachment],
                   spool_dir: Path) -> DocumentContent:
    """One xds-b:Document: an MTOM attachment by xop:Include, or inline base64 spooled."""
    doc_id = _req(el, "id", ErrorCode.REPOSITORY_ERROR, owner="ProvideAndRegister request")
    include = el.find(q(XOP, "Include"))
    if include is not None:
        href = include.get("href")
        if not href:
            raise _fail(f"Document {doc_id!r}: xop:Include has no href attribute",
                        ErrorCode.REPOSITORY_ERROR)
        cid = content_id_from_href(href)
        att = attachments.get(cid)
        if att is None:
            raise _fail(f"Document {doc_id!r}: xop:Include href={href!r} refers to MIME "
                        f"part <{cid}>, which is not in the message "
                        f"({len(attachments)} attachment(s) received)",
                        ErrorCode.MISSING_DOCUMENT)
        return DocumentContent(id=doc_id, path=att.path, size=att.size, sha1=att.sha1)
    if _children(el):
        raise _fail(f"Document {doc_id!r}: unexpected child element "
                    f"{_tag(_children(el)[0])} (expected base64 text or xop:Include)",
                    ErrorCode.REPOSITORY_ERROR)
    target = spool_dir / f"inline-{uuid.uuid4().hex}.bin"
    digest = hashlib.sha1(usedforsecurity=False)
    size = decode_base64_to_file(el.text or "", target, document_id=doc_id, digest=digest)
    return DocumentContent(id=doc_id, path=target, size=size, sha1=digest.hexdigest())


def parse_provide_and_register(el: etree._Element, attachments: Mapping[str, Attachment],
                               spool_dir: Path) -> ProvideAndRegisterRequest:
    """xds-b:ProvideAndRegisterDocumentSetRequest (ITI-41)."""
    _expect(el, XDSB, "ProvideAndRegisterDocumentSetRequest", ErrorCode.REPOSITORY_ERROR)
    sor = el.find(q(LCM, "SubmitObjectsRequest"))
    if sor is None:
        raise _fail("ProvideAndRegisterDocumentSetRequest: required element "
                    "lcm:SubmitObjectsRequest is missing", ErrorCode.REPOSITORY_METADATA_ERROR)
    submission = parse_submit_objects_request(sor)
    docs: list[DocumentContent] = []
    seen: set[str] = set()
    for d in el.iterfind(q(XDSB, "Document")):
        doc = parse_document(d, attachments, spool_dir)
        if doc.id in seen:
            raise _fail(f"Document id {doc.id!r} appears more than once in the request",
                        ErrorCode.REPOSITORY_ERROR)
        seen.add(doc.id)
        docs.append(doc)
    return ProvideAndRegisterRequest(submission=submission, documents=tuple(docs))


# --- queries and retrieves ---------------------------------------------------------------------


def parse_adhoc_query_request(el: etree._Element) -> AdhocQuery:
    """query:AdhocQueryRequest (ITI-18, ITI-38)."""
    _expect(el, QUERY, "AdhocQueryRequest")
    ro = el.find(q(QUERY, "ResponseOption"))
    aq = el.find(q(RIM, "AdhocQuery"))
    if ro is None or aq is None:
        missing = "ResponseOption" if ro is None else "rim:AdhocQuery"
        raise _fail(f"AdhocQueryRequest: required element {missing} is missing",
                    ErrorCode.REGISTRY_ERROR)
    query_id = aq.get("id")
    if not query_id:
        raise _fail("AdhocQuery: required attribute id (the stored query id) is missing",
                    ErrorCode.UNKNOWN_STORED_QUERY)
    return AdhocQuery(
        query_id=query_id.strip(),
        parameters=_slots(aq, "AdhocQuery"),
        return_type=ro.get("returnType", "RegistryObject"),
        home=aq.get("home"),
        return_composed_objects=_bool(ro, "returnComposedObjects", False),
        start_index=_int(el, "startIndex", 0) or 0,
        max_results=_maxr if (_maxr := _int(el, "maxResults", -1)) is not None else -1,
        federated=_bool(el, "federated", False),
    )


def parse_document_request(el: etree._Element) -> DocumentRequest:
    """xds-b:DocumentRequest (ITI-43, ITI-39, and inside RAD-69 SeriesRequest)."""
    rep = el.find(q(XDSB, "RepositoryUniqueId"))
    doc = el.find(q(XDSB, "DocumentUniqueId"))
    hc = el.find(q(XDSB, "HomeCommunityId"))
    if rep is None or not _text(rep):
        raise _fail(f"DocumentRequest{_line(el)}: RepositoryUniqueId is missing or empty",
                    ErrorCode.REPOSITORY_ERROR)
    if doc is None or not _text(doc):
        raise _fail(f"DocumentRequest{_line(el)}: DocumentUniqueId is missing or empty",
                    ErrorCode.REPOSITORY_ERROR)
    return DocumentRequest(repository_unique_id=_text(rep), document_unique_id=_text(doc),
                           home_community_id=_text(hc) or None)


def _line(el: etree._Element) -> str:
    return f" (line {el.sourceline})" if el.sourceline else ""


def parse_retrieve_document_set_request(el: etree._Element) -> RetrieveDocumentSetRequest:
    """xds-b:RetrieveDocumentSetRequest (ITI-43, ITI-39)."""
    _expect(el, XDSB, "RetrieveDocumentSetRequest", ErrorCode.REPOSITORY_ERROR)
    reqs = tuple(parse_document_request(d) for d in el.iterfind(q(XDSB, "DocumentRequest")))
    if not reqs:
        raise _fail("RetrieveDocumentSetRequest: no DocumentRequest", ErrorCode.REPOSITORY_ERROR)
    return RetrieveDocumentSetRequest(documents=reqs)


# --- responses (clients, tests) ----------------------------------------------------------------


def parse_registry_error(el: etree._Element) -> XdsError:
    return XdsError(code=el.get("errorCode", ""), context=el.get("codeContext", ""),
                    severity=el.get("severity", Severity.ERROR), location=el.get("location"))


def _errors(el: etree._Element) -> tuple[XdsError, ...]:
    lst = el.find(q(RS, "RegistryErrorList"))
    if lst is None:
        return ()
    return tuple(parse_registry_error(e) for e in lst.iterfind(q(RS, "RegistryError")))


def _status(el: etree._Element) -> str:
    return _req(el, "status", ErrorCode.REGISTRY_ERROR)


def parse_registry_response(el: etree._Element) -> RegistryResponse:
    """rs:RegistryResponse (ITI-41/42 responses, and inside retrieve responses)."""
    _expect(el, RS, "RegistryResponse")
    return RegistryResponse(status=_status(el), errors=_errors(el),
                            request_id=el.get("requestId"))


def parse_adhoc_query_response(el: etree._Element) -> AdhocQueryResponse:
    """query:AdhocQueryResponse (ITI-18, ITI-38)."""
    _expect(el, QUERY, "AdhocQueryResponse")
    rol = el.find(q(RIM, "RegistryObjectList"))
    return AdhocQueryResponse(
        status=_status(el),
        objects=parse_registry_object_list(rol) if rol is not None else (),
        errors=_errors(el),
        start_index=_int(el, "startIndex", None),
        total_result_count=_int(el, "totalResultCount", None),
    )


def _opt_text(el: etree._Element, local: str) -> str | None:
    c = el.find(q(XDSB, local))
    return _text(c) if c is not None else None


def parse_document_response(el: etree._Element) -> DocumentResponseRef:
    doc = el.find(q(XDSB, "Document"))
    content_id: str | None = None
    data: bytes | None = None
    if doc is not None:
        inc = doc.find(q(XOP, "Include"))
        if inc is not None:
            content_id = content_id_from_href(inc.get("href", ""))
        else:
            try:
                data = base64.b64decode(_B64_WS.sub("", doc.text or ""), validate=True)
            except (binascii.Error, ValueError):
                raise _fail("DocumentResponse: Document content is not valid base64",
                            ErrorCode.REPOSITORY_ERROR) from None
    return DocumentResponseRef(
        repository_unique_id=_opt_text(el, "RepositoryUniqueId") or "",
        document_unique_id=_opt_text(el, "DocumentUniqueId") or "",
        mime_type=_opt_text(el, "mimeType") or "",
        home_community_id=_opt_text(el, "HomeCommunityId"),
        new_repository_unique_id=_opt_text(el, "NewRepositoryUniqueId"),
        new_document_unique_id=_opt_text(el, "NewDocumentUniqueId"),
        content_id=content_id,
        data=data,
    )


def parse_retrieve_document_set_response(el: etree._Element) -> RetrieveDocumentSetResponse:
    """xds-b:RetrieveDocumentSetResponse (ITI-43, ITI-39, RAD-69, RAD-75)."""
    _expect(el, XDSB, "RetrieveDocumentSetResponse")
    rr = el.find(q(RS, "RegistryResponse"))
    if rr is None:
        raise _fail("RetrieveDocumentSetResponse: rs:RegistryResponse is missing")
    resp = parse_registry_response(rr)
    docs = tuple(parse_document_response(d) for d in el.iterfind(q(XDSB, "DocumentResponse")))
    return RetrieveDocumentSetResponse(status=resp.status, documents=docs, errors=resp.errors)


__all__ = [
    "content_id_from_href",
    "decode_base64_to_file",
    "parse_adhoc_query_request",
    "parse_adhoc_query_response",
    "parse_association",
    "parse_classification",
    "parse_document",
    "parse_document_request",
    "parse_document_response",
    "parse_external_identifier",
    "parse_extrinsic_object",
    "parse_identifiable",
    "parse_object_ref",
    "parse_provide_and_register",
    "parse_registry_error",
    "parse_registry_object_list",
    "parse_registry_package",
    "parse_registry_response",
    "parse_retrieve_document_set_request",
    "parse_retrieve_document_set_response",
    "parse_slot",
    "parse_submit_objects_request",
]
