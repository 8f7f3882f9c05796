"""Responding Gateway (XCA): ITI-38 Cross Gateway Query and ITI-39 Cross Gateway Retrieve,
answered from this community's built-in registry and repository.

ITI-38 is the ITI-18 stored query of the local registry
(`gateway.registry.handlers.execute_stored_query`, no stored query logic here) behind the
homeCommunityId rules of `gateway.xca.home`; every returned ExtrinsicObject, RegistryPackage,
Association and ObjectRef carries home = our homeCommunityId. ITI-39 is the ITI-43 retrieve of
the local repository (`gateway.repository.handlers.retrieve`) for the DocumentRequests that
name our community; the others get XDSMissingHomeCommunityId / XDSUnknownCommunity, one error
each, and the answer is PartialSuccess when some documents come back. Documents go out as MTOM
attachments (the store's files, streamed by the edge). Every RegistryError's location is our
homeCommunityId (ITI TF-2b 3.38.4.1.3, 3.39.4.1.3).

Not here yet: a remote registry (ITI-18) or remote repositories (ITI-43) behind the gateway.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from lxml import etree

from gateway.ebrim.model import DocumentRequest, RetrievedDocument, RetrieveDocumentSetRequest
from gateway.ebrim.parse import parse_adhoc_query_request, parse_retrieve_document_set_request
from gateway.ebrim.render import (
    render_adhoc_query_response,
    render_retrieve_document_set_response,
)
from gateway.errors import XdsError, XdsFailure, status_for
from gateway.ns import ErrorCode, ResponseStatus
from gateway.registry.handlers import execute_stored_query
from gateway.registry.stored_queries import QUERIES
from gateway.repository import handlers as repository
from gateway.transactions import Attachment, RequestContext, SoapResponse
from gateway.xca.home import (
    check_query_home,
    check_request_home,
    located,
    stamp_home,
    without_home_parameter,
)

if TYPE_CHECKING:
    from gateway.services import Services

log = logging.getLogger(__name__)

CONTENT_ID_DOMAIN = "responding.xdsi-gateway"


def _home(services: Services) -> str:
    return services.config.community.home_community_id


# --- ITI-38 ---------------------------------------------------------------------------------

def cross_gateway_query(services: Services, ctx: RequestContext,
                        body: etree._Element) -> SoapResponse:
    """ITI-38: query:AdhocQueryRequest -> query:AdhocQueryResponse from the local registry."""
    home = _home(services)
    errors: list[XdsError]
    try:
        query = parse_adhoc_query_request(body)
        definition = QUERIES.get(query.query_id)
        problem = check_query_home(query, home,
                                   definition.params if definition is not None else None)
        if problem is not None:
            raise XdsFailure(problem)
        found = execute_stored_query(services, without_home_parameter(query))
        return SoapResponse(render_adhoc_query_response(
            ResponseStatus.SUCCESS, stamp_home(found, home), [], location=home))
    except XdsFailure as failure:
        errors = list(failure.errors)
    except Exception as exc:  # an error value, never a trace to the edge
        log.error("ITI-38 failed: %s", type(exc).__name__)
        log.debug("ITI-38 failed", exc_info=exc)
        errors = [XdsError(ErrorCode.REGISTRY_ERROR,
                           "ITI-38 failed: internal error of the responding gateway")]
    return SoapResponse(render_adhoc_query_response(
        status_for(errors), [], located(errors, home), location=home))


# --- ITI-39 ---------------------------------------------------------------------------------

def split_by_home(requests: tuple[DocumentRequest, ...], home: str
                  ) -> tuple[list[DocumentRequest], list[XdsError]]:
    """The DocumentRequests for our community, and the errors of the others."""
    ours: list[DocumentRequest] = []
    errors: list[XdsError] = []
    for r in requests:
        problem = check_request_home(r.home_community_id, home, r.document_unique_id)
        if problem is None:
            ours.append(r)
        else:
            errors.append(problem)
    return ours, errors


def retrieve_local(services: Services, request: RetrieveDocumentSetRequest
                   ) -> tuple[str, list[RetrievedDocument], list[XdsError]]:
    """The documents and errors of one ITI-39 request from the local repository, and the
    status; errors located at our homeCommunityId."""
    home = _home(services)
    ours, errors = split_by_home(request.documents, home)
    documents: list[RetrievedDocument] = []
    if ours:
        _status, documents, found_errors = repository.retrieve(
            services, RetrieveDocumentSetRequest(documents=tuple(ours)))
        errors.extend(found_errors)
    errors = located(errors, home)
    status = status_for(errors, partial_possible=True, any_success=bool(documents))
    return status, documents, errors


def cross_gateway_retrieve(services: Services, ctx: RequestContext,
                           body: etree._Element) -> SoapResponse:
    """ITI-39: the requested documents of this community as MTOM attachments."""
    home = _home(services)
    try:
        request = parse_retrieve_document_set_request(body)
        status, documents, errors = retrieve_local(services, request)
    except XdsFailure as failure:
        status, documents, errors = (ResponseStatus.FAILURE, [],
                                     located(failure.errors, home))
    except Exception as exc:  # an error value, never a trace to the edge
        log.error("ITI-39 failed: %s", type(exc).__name__)
        log.debug("ITI-39 failed", exc_info=exc)
        status, documents, errors = (ResponseStatus.FAILURE, [], [XdsError(
            ErrorCode.REPOSITORY_ERROR, "ITI-39 failed: internal error of the responding "
            "gateway", location=home)])
    content_ids = {id(d): f"doc{i}@{CONTENT_ID_DOMAIN}" for i, d in enumerate(documents)}
    body_el = render_retrieve_document_set_response(
        status, documents, errors, content_id_for=lambda d: content_ids[id(d)],
        location=home)
    attachments = tuple(Attachment(content_ids[id(d)], d.path, d.size, d.mime_type)
                        for d in documents)
    return SoapResponse(body=body_el, attachments=attachments)
