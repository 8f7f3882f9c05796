"""RAD-69 Retrieve Imaging Document Set: the Imaging Document Source in front of a PACS.

request (gateway.imaging.request) -> checks (repository id, UIDs, transfer syntaxes) ->
C-FIND to resolve and check every requested instance (gateway.imaging.plan) -> C-GET or C-MOVE
into the request's spool folder (gateway.dicom.retrieve) -> RetrieveDocumentSetResponse with
one DocumentResponse per instance, its Part 10 file as an MTOM attachment, streamed by the edge
from the spool file; the spool folder is removed after the response (SoapResponse.cleanup).

The response starts only once the retrieve has ended. Its root part must come first (zeep,
with the official XDS-I.b WSDL, takes the first MIME part as the envelope whatever `start`
says: tests/unit/test_rad69_part_order.py), and the root carries the RegistryResponse status
and the list of DocumentResponses, which are known only when every instance has arrived or
failed; streaming attachments ahead of a root written last would not be readable by such
clients, and writing the root first from the C-FIND plan would misreport instances that then
fail. The throughput work is therefore in the retrieve (gateway.dicom.retrieve).

Each instance is returned as the PACS sent it (the dataset bytes untouched, behind a file meta
header) and only in one of the requested transfer syntaxes; the gateway never converts pixel
data itself. Errors are per document, as WADO-WS codes (DICOM PS3.18 6.4) plus
XDSMissingDocument for unknown or inconsistent identifiers; some documents failing gives
PartialSuccess, all failing Failure.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lxml import etree
from pydicom.uid import AllTransferSyntaxes

from gateway.dicom.errors import PacsError
from gateway.ebrim.model import RetrievedDocument
from gateway.ebrim.render import render_retrieve_document_set_response
from gateway.errors import XdsError, XdsFailure, status_for
from gateway.imaging.plan import Resolution, resolve
from gateway.imaging.request import ImagingDocumentRequest, ImagingRequest, Wado, parse_request
from gateway.ns import ErrorCode, ResponseStatus
from gateway.services import Services
from gateway.transactions import Attachment, RequestContext, SoapResponse

log = logging.getLogger(__name__)

MIME_DICOM = "application/dicom"
CONTENT_ID_DOMAIN = "imaging-source.xdsi-gateway"
KNOWN_SYNTAXES = frozenset(str(u) for u in AllTransferSyntaxes)


def _doc_error(code: str, context: str, doc: ImagingDocumentRequest) -> XdsError:
    return XdsError(code, context, location=doc.document_unique_id or None)


def check_documents(services: Services, request: ImagingRequest
                    ) -> tuple[list[ImagingDocumentRequest], list[XdsError], tuple[str, ...]]:
    """The documents worth asking the PACS for, the errors of the others, and the transfer
    syntaxes to ask for."""
    own_id = services.config.community.imaging_source_unique_id
    syntaxes = tuple(t for t in request.transfer_syntaxes if t in KNOWN_SYNTAXES)
    unknown = [t for t in request.transfer_syntaxes if t not in KNOWN_SYNTAXES]
    errors: list[XdsError] = []
    ok: list[ImagingDocumentRequest] = []
    for doc in request.documents:
        if doc.problem is not None:
            errors.append(_doc_error(Wado.INVALID_PARAMETER, doc.problem, doc))
        elif doc.repository_unique_id != own_id:
            errors.append(_doc_error(
                ErrorCode.UNKNOWN_REPOSITORY_ID,
                f"RepositoryUniqueId {doc.repository_unique_id} is not this Imaging Document "
                f"Source ({own_id})", doc))
        elif not request.transfer_syntaxes:
            errors.append(_doc_error(Wado.INVALID_PARAMETER,
                                     "TransferSyntaxUIDList lists no transfer syntax", doc))
        elif not syntaxes:
            errors.append(_doc_error(
                Wado.TS_NOT_SUPPORTED,
                "none of the requested transfer syntaxes is supported: " + " ".join(unknown),
                doc))
        else:
            ok.append(doc)
    return ok, errors, syntaxes


def _response(status: str, documents: list[RetrievedDocument], errors: list[XdsError],
              cleanup: list[Path]) -> SoapResponse:
    content_ids = {id(d): f"doc{i}@{CONTENT_ID_DOMAIN}" for i, d in enumerate(documents)}
    body = render_retrieve_document_set_response(
        status, documents, errors, content_id_for=lambda d: content_ids[id(d)])
    attachments = tuple(Attachment(content_ids[id(d)], d.path, d.size, MIME_DICOM)
                        for d in documents)
    return SoapResponse(body=body, attachments=attachments, cleanup=cleanup)


def retrieve_imaging_document_set(services: Services, ctx: RequestContext,
                                  body: etree._Element) -> SoapResponse:
    try:
        request = parse_request(body)
    except XdsFailure as failure:
        return _response(ResponseStatus.FAILURE, [], list(failure.errors), [])
    spool = ctx.spool_dir / "rad69"
    documents, errors = retrieve_request(services, request, spool)
    status = status_for(errors, partial_possible=True, any_success=bool(documents))
    return _response(status, documents, errors, [spool])


def retrieve_request(services: Services, request: ImagingRequest, spool: Path, *,
                     transaction: str = "RAD-69"
                     ) -> tuple[list[RetrievedDocument], list[XdsError]]:
    """The Imaging Document Source's work for one request: check the documents, resolve them
    with C-FIND, retrieve what was found into `spool`. RAD-69 and RAD-75 (for the documents
    of our community) both answer with it."""
    candidates, errors, syntaxes = check_documents(services, request)
    documents: list[RetrievedDocument] = []
    if candidates:
        started = time.monotonic()
        try:
            resolution = resolve(services.config.pacs, candidates)
        except PacsError as exc:
            log.warning("%s: C-FIND failed: %s", transaction, exc)
            errors.extend(_doc_error(ErrorCode.REPOSITORY_ERROR,
                                     f"the PACS could not be queried: {exc}", d)
                          for d in candidates)
            resolution = Resolution()
        errors.extend(resolution.errors)
        found_at = time.monotonic()
        if resolution.found:
            documents, retrieve_errors = fetch(services, resolution, syntaxes, spool)
            errors.extend(retrieve_errors)
        log.info("%s: %d requested, %d found by C-FIND in %.2f s, %d retrieved in %.2f s",
                 transaction, len(request.documents), len(resolution.found),
                 found_at - started, len(documents), time.monotonic() - found_at)
    return documents, errors


def fetch(services: Services, resolution: Resolution, syntaxes: tuple[str, ...],
          spool: Path) -> tuple[list[RetrievedDocument], list[XdsError]]:
    from gateway.dicom.retrieve import retrieve

    pacs = services.config.pacs
    refs = [ref for ref, _doc in resolution.found]
    outcome = retrieve(pacs, refs, syntaxes, spool, method=pacs.retrieve,
                       associations=pacs.associations, timeout=pacs.timeout_seconds)
    if outcome.error is not None:
        log.warning("RAD-69: retrieve from the PACS incomplete: %s", outcome.error)
    documents: list[RetrievedDocument] = []
    errors: list[XdsError] = []
    for ref, doc in resolution.found:
        got = outcome.received.get(ref.sop_instance_uid)
        if got is not None and got.transfer_syntax in syntaxes:
            documents.append(RetrievedDocument(
                repository_unique_id=doc.repository_unique_id,
                document_unique_id=doc.document_unique_id, mime_type=MIME_DICOM,
                path=got.path, size=got.size, home_community_id=doc.home_community_id))
            continue
        if got is not None:
            got.path.unlink(missing_ok=True)
            errors.append(_doc_error(
                Wado.TS_NOT_PROVIDED,
                f"the PACS holds this instance in {got.transfer_syntax}, not in a requested "
                "transfer syntax", doc))
        elif outcome.error is not None and outcome.error.kind != "failed":
            errors.append(_doc_error(Wado.PROCESSING_FAILURE,
                                     f"retrieve from the PACS failed: {outcome.error}", doc))
        else:
            errors.append(_doc_error(
                Wado.TS_NOT_PROVIDED,
                "the PACS could not provide this instance in a requested transfer syntax ("
                + ", ".join(syntaxes) + ")", doc))
    return documents, errors
