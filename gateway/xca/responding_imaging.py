"""Responding Imaging Gateway (XCA-I): RAD-75 Cross Gateway Retrieve Imaging Document Set,
answered by RAD-69 to this community's built-in Imaging Document Source.

Per DocumentRequest: HomeCommunityId must name our community (XDSMissingHomeCommunityId /
XDSUnknownCommunity otherwise, `gateway.xca.home`); the RepositoryUniqueId must be our
imaging_source_unique_id, else XDSUnknownRepositoryId for that document. The documents that
pass go through the RAD-69 machinery of `gateway.imaging.rad69` (the same checks, C-FIND
resolution and C-GET/C-MOVE into the request's spool folder); the results of all documents
are consolidated into one RetrieveDocumentSetResponse (RAD TF-3 4.75.4.1.3): PartialSuccess
when some documents come back and some fail, every RegistryError located at our
homeCommunityId, each DocumentResponse carrying HomeCommunityId. The instances go out as MTOM
attachments streamed from the spool files, removed after the response.

Not here yet: remote Imaging Document Sources of this community reached over RAD-69 (their
RepositoryUniqueIds answer XDSUnknownRepositoryId until the configuration can name them).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from lxml import etree

from gateway.ebrim.model import RetrievedDocument
from gateway.ebrim.render import render_retrieve_document_set_response
from gateway.errors import XdsError, XdsFailure, status_for
from gateway.imaging.rad69 import MIME_DICOM, retrieve_request
from gateway.imaging.request import ImagingDocumentRequest, ImagingRequest, parse_request
from gateway.ns import ErrorCode, ResponseStatus
from gateway.transactions import Attachment, RequestContext, SoapResponse
from gateway.xca.home import check_request_home, located

if TYPE_CHECKING:
    from gateway.services import Services

log = logging.getLogger(__name__)

CONTENT_ID_DOMAIN = "responding-imaging.xdsi-gateway"


def _home(services: Services) -> str:
    return services.config.community.home_community_id


def retrieve_local_imaging(services: Services, request: ImagingRequest, spool: Path
                           ) -> tuple[str, list[RetrievedDocument], list[XdsError]]:
    """RAD-69 to the local Imaging Document Source for the documents of our community; the
    consolidated status, documents (files under `spool`) and errors (located at our
    homeCommunityId)."""
    home = _home(services)
    errors: list[XdsError] = []
    ours: list[ImagingDocumentRequest] = []
    for doc in request.documents:
        problem = check_request_home(doc.home_community_id, home, doc.document_unique_id)
        if problem is None:
            ours.append(doc)
        else:
            errors.append(problem)
    documents: list[RetrievedDocument] = []
    if ours:
        documents, local_errors = retrieve_request(
            services, replace(request, documents=tuple(ours)), spool, transaction="RAD-75")
        errors.extend(local_errors)
    documents = [replace(d, home_community_id=home) for d in documents]
    errors = located(errors, home)
    status = status_for(errors, partial_possible=True, any_success=bool(documents))
    return status, documents, errors


def cross_gateway_retrieve_imaging(services: Services, ctx: RequestContext,
                                   body: etree._Element) -> SoapResponse:
    """RAD-75: xdsi:RetrieveImagingDocumentSetRequest -> xds-b:RetrieveDocumentSetResponse
    with the instances as MTOM attachments."""
    home = _home(services)
    spool = ctx.spool_dir / "rad75"
    try:
        request = parse_request(body)
        status, documents, errors = retrieve_local_imaging(services, request, spool)
    except XdsFailure as failure:
        status, documents, errors = ResponseStatus.FAILURE, [], located(failure.errors, home)
    except Exception as exc:  # an error value, never a trace to the edge
        log.error("RAD-75 failed: %s", type(exc).__name__)
        log.debug("RAD-75 failed", exc_info=exc)
        status, documents, errors = ResponseStatus.FAILURE, [], [XdsError(
            ErrorCode.REPOSITORY_ERROR, "RAD-75 failed: internal error of the responding "
            "imaging gateway", location=home)]
    content_ids = {id(d): f"doc{i}@{CONTENT_ID_DOMAIN}" for i, d in enumerate(documents)}
    body_el = render_retrieve_document_set_response(
        status, documents, errors, content_id_for=lambda d: content_ids[id(d)],
        location=home)
    attachments = tuple(Attachment(content_ids[id(d)], d.path, d.size, MIME_DICOM)
                        for d in documents)
    return SoapResponse(body=body_el, attachments=attachments, cleanup=[spool])
