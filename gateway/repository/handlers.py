"""The Document Repository's transactions: ITI-41 Provide and Register Document Set-b (RAD-68
KOS submissions included) and ITI-43 Retrieve Document Set.

ITI-41: the edge has already spooled every document to a file (MTOM part or decoded base64);
the submission is validated with the repository's rules, each document is stored by content
(`DocumentStore.put`: a document spooled into the request's own folder is hashed in one read
pass and hard-linked into the store, so its bytes are written to disk once - with the SHA-1
the spooler computed, when it did, not even read; anything else is copied, size and SHA-1 in
one streaming pass), hash and size are checked against
the submitted slots or added to the DocumentEntry together with our repositoryUniqueId, and
the metadata goes to the registry (`gateway.registry.handlers.register`). When anything fails
after files were stored, the files this request created are removed unless a registered
DocumentEntry references them, so a failed request leaves no orphan and a file that existed
before stays.

ITI-43: each DocumentRequest is answered on its own (PartialSuccess when some fail); the
document's bytes are the store's file itself, handed to the edge as an MTOM attachment.
XDS errors are values in the response; no exception leaves these handlers for bad input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from lxml import etree

from gateway.ebrim import metadata
from gateway.ebrim.model import (
    DocumentContent,
    DocumentRequest,
    ExtrinsicObject,
    Identifiable,
    ProvideAndRegisterRequest,
    RetrievedDocument,
    RetrieveDocumentSetRequest,
)
from gateway.ebrim.parse import parse_provide_and_register, parse_retrieve_document_set_request
from gateway.ebrim.render import render_registry_response, render_retrieve_document_set_response
from gateway.ebrim.validation import sha1_file, validate_submission, with_repository_attributes
from gateway.errors import XdsError, XdsFailure, status_for
from gateway.ns import ErrorCode, MimeType, ObjectType, ResponseStatus
from gateway.registry import handlers as registry_handlers
from gateway.repository.references import hash_is_referenced
from gateway.repository.store import DocumentStore, StoredDocument
from gateway.services import Services
from gateway.transactions import Attachment, RequestContext, SoapResponse

log = logging.getLogger(__name__)

CONTENT_ID_DOMAIN = "xdsi-gateway"
DICOM_PREAMBLE = 128
DICOM_MAGIC = b"DICM"


# --- ITI-41 -------------------------------------------------------------------------------

@dataclass
class _Stored:
    """One document this request put into the store."""

    entry_id: str
    source: Path
    stored: StoredDocument
    # The source is the request's own spool file: the store may hard-link it.
    link: bool = False


def _failure(errors: Sequence[XdsError]) -> SoapResponse:
    return SoapResponse(body=render_registry_response(status_for(errors), list(errors)))


def _is_document_entry(obj: Identifiable) -> bool:
    return isinstance(obj, ExtrinsicObject) and obj.object_type in (
        None, ObjectType.STABLE_DOCUMENT_ENTRY, ObjectType.ON_DEMAND_DOCUMENT_ENTRY)


def _uid(entry: ExtrinsicObject) -> str:
    return metadata.unique_id(entry) or entry.id


def is_dicom_file(path: Path) -> bool:
    """True when the file has the DICOM Part 10 'DICM' prefix after the 128-byte preamble."""
    try:
        with path.open("rb") as fh:
            head = fh.read(DICOM_PREAMBLE + len(DICOM_MAGIC))
    except OSError:
        return False
    return head[DICOM_PREAMBLE:] == DICOM_MAGIC


def _is_spooled(path: Path, spool_dir: Path) -> bool:
    """True when `path` is a file of the request's own spool folder (private to the request,
    written once by the edge or the base64 decoder, removed with the folder)."""
    try:
        return path.resolve().parent == spool_dir.resolve()
    except OSError:
        return False


def _locate(errors: Sequence[XdsError], entries: Sequence[ExtrinsicObject]) -> list[XdsError]:
    """Errors without a location get the uniqueId of the DocumentEntry their context names."""
    out: list[XdsError] = []
    for err in errors:
        if err.location is None:
            for entry in entries:
                who = f"DocumentEntry {entry.id}"
                if (f"{who} " in err.context or err.context.endswith(who)) and _uid(entry):
                    err = replace(err, location=_uid(entry))
                    break
        out.append(err)
    return out


def _precheck(entries: Sequence[ExtrinsicObject],
              documents: dict[str, DocumentContent]) -> list[XdsError]:
    """Errors the repository can find before storing anything."""
    errors: list[XdsError] = []
    for entry in entries:
        uid = _uid(entry)
        doc = documents.get(entry.id)
        if doc is None:
            errors.append(XdsError(
                ErrorCode.MISSING_DOCUMENT,
                f"DocumentEntry {uid} has no Document in the request", location=uid))
            continue
        if entry.mime_type == MimeType.DICOM and not is_dicom_file(doc.path):
            errors.append(XdsError(
                ErrorCode.REPOSITORY_METADATA_ERROR,
                f"DocumentEntry {uid} has mimeType {MimeType.DICOM} but its document is not a "
                "DICOM Part 10 file (no 'DICM' after the 128-byte preamble)", location=uid))
    entry_ids = {e.id for e in entries}
    for doc_id in documents:
        if doc_id not in entry_ids:
            errors.append(XdsError(
                ErrorCode.MISSING_DOCUMENT_METADATA,
                f"Document {doc_id} has no DocumentEntry in the submission", location=doc_id))
    return errors


def _check_submitted(entry: ExtrinsicObject, stored: StoredDocument) -> list[XdsError]:
    """Submitted hash / size slots must match what the repository computed."""
    uid = _uid(entry)
    errors: list[XdsError] = []
    submitted_hash = metadata.slot_value(entry, "hash")
    if submitted_hash is not None and submitted_hash.strip().lower() != stored.sha1_hex:
        errors.append(XdsError(
            ErrorCode.NON_IDENTICAL_HASH,
            f"DocumentEntry {uid}: submitted hash {submitted_hash.strip()} differs from the "
            f"SHA-1 of the document {stored.sha1_hex}", location=uid))
    submitted_size = metadata.slot_value(entry, "size")
    if submitted_size is not None:
        try:
            size = int(submitted_size.strip())
        except ValueError:
            errors.append(XdsError(
                ErrorCode.REPOSITORY_METADATA_ERROR,
                f"DocumentEntry {uid}: size slot {submitted_size!r} is not a number",
                location=uid))
        else:
            if size != stored.size:
                errors.append(XdsError(
                    ErrorCode.NON_IDENTICAL_SIZE,
                    f"DocumentEntry {uid}: submitted size {size} differs from the size of the "
                    f"document {stored.size}", location=uid))
    return errors


def _rollback(services: Services, stored: Sequence[_Stored]) -> None:
    """Remove the files this request created unless a registered entry references them."""
    store: DocumentStore = services.documents
    for item in stored:
        if not item.stored.created:
            continue  # it existed before this request: it stays
        try:
            store.remove_if_unreferenced(
                item.stored.sha1_hex, lambda h: hash_is_referenced(services.registry, h))
        except OSError as exc:
            log.warning("repository rollback: cannot remove %s: %s",
                        item.stored.sha1_hex, exc.strerror)


def provide_and_register(services: Services, ctx: RequestContext,
                         body: etree._Element) -> SoapResponse:
    """ITI-41 (and RAD-68): store the documents, register the metadata."""
    stored: list[_Stored] = []
    try:
        return _provide_and_register(services, ctx, body, stored)
    except Exception as exc:  # an error value, never a trace to the edge
        # No message text in the log: it may carry patient data.
        log.error("ITI-41 failed: %s", type(exc).__name__)
        log.debug("ITI-41 failed", exc_info=exc)
        _rollback(services, stored)
        return _failure([XdsError(ErrorCode.REPOSITORY_ERROR,
                                  "the repository could not process the request")])


def _provide_and_register(services: Services, ctx: RequestContext, body: etree._Element,
                          stored: list[_Stored]) -> SoapResponse:
    """The work of `provide_and_register`; `stored` collects the files put, for rollback."""
    try:
        request: ProvideAndRegisterRequest = parse_provide_and_register(
            body, ctx.attachments, ctx.spool_dir)
    except XdsFailure as failure:
        return _failure(failure.errors)

    documents = {d.id: d for d in request.documents}
    submission = request.submission
    entries = [o for o in submission.objects
               if isinstance(o, ExtrinsicObject) and _is_document_entry(o)]
    # A document whose entry carries a hash slot is hashed once, here: validation compares
    # that digest and the store takes it instead of reading the file again.
    for entry in entries:
        doc = documents.get(entry.id)
        if doc is not None and doc.sha1 is None and metadata.slot_value(entry, "hash"):
            documents[entry.id] = replace(doc, sha1=sha1_file(doc.path))
    errors = _locate(validate_submission(submission, documents=documents, repository=True),
                     entries)
    if any(e.is_error for e in errors):
        return _failure(errors)

    pre = _precheck(entries, documents)
    if pre:
        return _failure(errors + pre)

    repository_uid = services.config.community.repository_unique_id
    replaced: dict[str, ExtrinsicObject] = {}
    for entry in entries:
        doc = documents[entry.id]
        spooled = _is_spooled(doc.path, ctx.spool_dir)
        try:
            result = services.documents.put(
                doc.path, sha1=doc.sha1, size=doc.size if doc.sha1 else None, link=spooled)
        except OSError as exc:
            log.warning("repository: cannot store a document: %s", exc.strerror or exc)
            _rollback(services, stored)
            uid = _uid(entry)
            return _failure([*errors, XdsError(
                ErrorCode.REPOSITORY_ERROR,
                f"DocumentEntry {uid}: the repository could not store the document",
                location=uid)])
        stored.append(_Stored(entry.id, doc.path, result, spooled))
        if result.size != doc.size:
            log.warning("repository: spooled size %d differs from stored size %d",
                        doc.size, result.size)
        mismatch = _check_submitted(entry, result)
        if mismatch:
            errors.extend(mismatch)
            continue
        replaced[entry.id] = with_repository_attributes(
            entry, result.size, result.sha1_hex, repository_uid)
    if any(e.is_error for e in errors):
        _rollback(services, stored)
        return _failure(errors)

    to_register = replace(submission, objects=tuple(
        replaced.get(o.id, o) if isinstance(o, ExtrinsicObject) else o
        for o in submission.objects))
    try:
        reg_errors = list(registry_handlers.register(services, to_register))
    except XdsFailure as failure:
        reg_errors = list(failure.errors)
    errors.extend(_locate(reg_errors, entries))
    if any(e.is_error for e in errors):
        _rollback(services, stored)
        return _failure(errors)

    # Registered. A concurrent request with the same content may have rolled back and removed
    # a file we did not create between our put and our registration: put it back.
    for item in stored:
        try:
            services.documents.ensure(item.stored.sha1_hex, item.source, link=item.link)
        except OSError as exc:  # pragma: no cover - disk failure right after a success
            log.error("repository: registered document %s could not be re-stored: %s",
                      item.stored.sha1_hex, exc)
    log.debug("ITI-41: stored and registered %d document(s)", len(stored))
    return SoapResponse(body=render_registry_response(status_for(errors), errors))


# --- ITI-43 -------------------------------------------------------------------------------

def _retrieve_one(services: Services, request: DocumentRequest
                  ) -> RetrievedDocument | XdsError:
    community = services.config.community
    uid = request.document_unique_id
    if request.home_community_id and request.home_community_id != community.home_community_id:
        return XdsError(ErrorCode.UNKNOWN_COMMUNITY,
                        f"document {uid}: homeCommunityId {request.home_community_id} is not "
                        "this community", location=uid)
    if request.repository_unique_id != community.repository_unique_id:
        return XdsError(ErrorCode.UNKNOWN_REPOSITORY_ID,
                        f"document {uid}: repositoryUniqueId {request.repository_unique_id} is "
                        "not this repository", location=uid)
    try:
        entry = services.registry.document_for_retrieve(uid, request.repository_unique_id)
    except XdsFailure as failure:
        first = failure.errors[0] if failure.errors else None
        code = first.code if first else ErrorCode.REPOSITORY_ERROR
        return XdsError(code, f"document {uid}: {first.context if first else 'lookup failed'}",
                        location=uid)
    if entry is None:
        return XdsError(ErrorCode.MISSING_DOCUMENT,
                        f"document {uid} is not known to this repository", location=uid)
    sha1 = metadata.slot_value(entry, "hash")
    try:
        path = services.documents.path_for(sha1 or "")
        size = path.stat().st_size
    except (ValueError, OSError):
        log.warning("ITI-43: registered document has no stored content (hash %s)", sha1)
        return XdsError(ErrorCode.MISSING_DOCUMENT,
                        f"document {uid}: its content is not available in this repository",
                        location=uid)
    registered_size = metadata.slot_value(entry, "size")
    if registered_size is not None and registered_size.strip() != str(size):
        log.error("ITI-43: stored document %s has size %d, registered %s", sha1, size,
                  registered_size)
        return XdsError(ErrorCode.REPOSITORY_ERROR,
                        f"document {uid}: the stored content is damaged", location=uid)
    return RetrievedDocument(
        repository_unique_id=request.repository_unique_id,
        document_unique_id=uid,
        mime_type=entry.mime_type or "application/octet-stream",
        path=path,
        size=size,
        home_community_id=request.home_community_id or None,
    )


def retrieve(services: Services, request: RetrieveDocumentSetRequest
             ) -> tuple[str, list[RetrievedDocument], list[XdsError]]:
    """The documents and errors of one ITI-43 request, and the response status."""
    documents: list[RetrievedDocument] = []
    errors: list[XdsError] = []
    for doc_request in request.documents:
        try:
            result = _retrieve_one(services, doc_request)
        except Exception as exc:  # an error value for this document, never a trace
            log.error("ITI-43 lookup failed: %s", type(exc).__name__)
            log.debug("ITI-43 lookup failed", exc_info=exc)
            uid = doc_request.document_unique_id
            result = XdsError(ErrorCode.REPOSITORY_ERROR,
                              f"document {uid}: the repository could not read it", location=uid)
        if isinstance(result, XdsError):
            errors.append(result)
        else:
            documents.append(result)
    status = status_for(errors, partial_possible=True, any_success=bool(documents))
    return status, documents, errors


def retrieve_document_set(services: Services, ctx: RequestContext,
                          body: etree._Element) -> SoapResponse:
    """ITI-43: the requested documents as MTOM attachments, errors per document."""
    try:
        request = parse_retrieve_document_set_request(body)
    except XdsFailure as failure:
        body_el = render_retrieve_document_set_response(
            ResponseStatus.FAILURE, [], list(failure.errors), content_id_for=lambda _d: "")
        return SoapResponse(body=body_el)

    status, documents, errors = retrieve(services, request)
    content_ids = {id(d): f"doc{i}@{CONTENT_ID_DOMAIN}" for i, d in enumerate(documents)}

    def content_id_for(doc: RetrievedDocument) -> str:
        return content_ids[id(doc)]

    body_el = render_retrieve_document_set_response(
        status, documents, errors, content_id_for=content_id_for)
    attachments = tuple(
        Attachment(content_ids[id(d)], d.path, d.size, d.mime_type, offset=d.offset)
        for d in documents)
    return SoapResponse(body=body_el, attachments=attachments)
