"""Responding Gateway (XCA): ITI-38 Cross Gateway Query and ITI-39 Cross Gateway Retrieve,
answered from this community's registry and repositories, built-in or remote.

ITI-38 is an ITI-18 stored query behind the homeCommunityId rules of `gateway.xca.home`: of
the built-in registry (`gateway.registry.handlers.execute_stored_query`, no stored query
logic here), or, when `[community] registry_url` is set, of the community's remote registry
(`gateway.xca.remote_registry`). Every returned ExtrinsicObject, RegistryPackage, Association
and ObjectRef carries home = our homeCommunityId. The request's startIndex / maxResults
(ebRS 3.0 iterative query, `gateway.ebrim.paging`) select the slice of the built-in registry's
result; a remote registry gets them in the forwarded query and pages itself.

ITI-39: the DocumentRequests that name our community are served per RepositoryUniqueId: the
built-in repository's (`gateway.repository.handlers.retrieve`, which also answers
XDSUnknownRepositoryId for ids nobody serves), or a remote repository's from [[repositories]],
asked with ITI-43 (`gateway.xca.remote_retrieve`, all remote repositories in parallel and
while the built-in one is read, each bounded by [xca] retrieve_timeout_seconds; one that fails
gives XDSRepositoryError for each of its documents). The DocumentRequests naming no or another
community get XDSMissingHomeCommunityId / XDSUnknownCommunity, one error each. The answer is
PartialSuccess when some documents come back and some fail. Documents go out as MTOM
attachments (the store's files, or the remote answers' spooled parts, streamed by the edge),
each DocumentResponse carrying our HomeCommunityId. Every RegistryError's location is our
homeCommunityId (ITI TF-2b 3.38.4.1.3, 3.39.4.1.3).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from lxml import etree

from gateway.ebrim.model import DocumentRequest, RetrievedDocument, RetrieveDocumentSetRequest
from gateway.ebrim.paging import page, paging_of, response_attributes
from gateway.ebrim.parse import parse_adhoc_query_request, parse_retrieve_document_set_request
from gateway.ebrim.render import (
    render_adhoc_query_response,
    render_retrieve_document_set_request,
    render_retrieve_document_set_response,
)
from gateway.errors import XdsError, XdsFailure, status_for
from gateway.ns import Action, ErrorCode, ResponseStatus
from gateway.registry.handlers import execute_stored_query
from gateway.registry.stored_queries import QUERIES
from gateway.repository import handlers as repository
from gateway.transactions import Attachment, RequestContext, SoapResponse
from gateway.xca.home import (
    check_query_home,
    located,
    split_by_home,
    stamp_home,
    without_home_parameter,
)
from gateway.xca.remote_registry import query_remote_registry
from gateway.xca.remote_retrieve import RemoteShare, with_shares

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
        if services.config.community.registry_url:
            answer = query_remote_registry(services, ctx, body)
            return SoapResponse(render_adhoc_query_response(
                answer.status, stamp_home(answer.objects, home), located(answer.errors, home),
                location=home, start_index=answer.start_index,
                total_result_count=answer.total_result_count))
        paging = paging_of(query)  # before the store is asked: a bad value costs nothing
        found = execute_stored_query(services, without_home_parameter(query))
        start_index, total = response_attributes(paging, len(found))
        return SoapResponse(render_adhoc_query_response(
            ResponseStatus.SUCCESS, stamp_home(page(found, paging), home), [], location=home,
            start_index=start_index, total_result_count=total))
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

def remote_shares(services: Services, requests: list[DocumentRequest]
                  ) -> tuple[list[DocumentRequest], list[RemoteShare]]:
    """The DocumentRequests for the built-in repository (its own id, or an id no remote
    repository has: it reports those), and one ITI-43 share per remote repository (the
    requests without HomeCommunityId: the repository is in our community, not a gateway)."""
    remotes = {r.unique_id: r.retrieve_url for r in services.config.repositories}
    local: list[DocumentRequest] = []
    grouped: dict[str, list[DocumentRequest]] = {}
    for r in requests:
        if r.repository_unique_id in remotes:
            grouped.setdefault(r.repository_unique_id, []).append(
                replace(r, home_community_id=None))
        else:
            local.append(r)
    shares = [RemoteShare(
        uid, remotes[uid],
        render_retrieve_document_set_request(RetrieveDocumentSetRequest(tuple(docs))),
        tuple(d.document_unique_id for d in docs)) for uid, docs in grouped.items()]
    return local, shares


def retrieve_local(services: Services, request: RetrieveDocumentSetRequest,
                   ctx: RequestContext | None = None
                   ) -> tuple[str, list[RetrievedDocument], list[XdsError]]:
    """The documents and errors of one ITI-39 request from this community's repositories
    (built-in and, with `ctx` for the spool folder and XUA header, the remote ones), and the
    status; every document carries our HomeCommunityId, every error our location."""
    home = _home(services)
    ours, errors = split_by_home(request.documents, home)
    local, shares = remote_shares(services, ours) if ctx is not None else (ours, [])

    def built_in() -> tuple[list[RetrievedDocument], list[XdsError]]:
        _status, documents, found_errors = repository.retrieve(
            services, RetrieveDocumentSetRequest(documents=tuple(local)))
        return documents, found_errors

    return with_shares(services, ctx, shares, built_in if local else None, home=home,
                       errors=errors, action=Action.ITI43, transaction="ITI-43",
                       spool=ctx.spool_dir / "iti39" if ctx is not None else None,
                       what="document repository")


def cross_gateway_retrieve(services: Services, ctx: RequestContext,
                           body: etree._Element) -> SoapResponse:
    """ITI-39: the requested documents of this community as MTOM attachments."""
    home = _home(services)
    try:
        request = parse_retrieve_document_set_request(body)
        status, documents, errors = retrieve_local(services, request, ctx)
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
    attachments = tuple(Attachment(content_ids[id(d)], d.path, d.size, d.mime_type,
                                   offset=d.offset)
                        for d in documents)
    return SoapResponse(body=body_el, attachments=attachments)
