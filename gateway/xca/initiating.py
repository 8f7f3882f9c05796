"""The Initiating Gateway (XCA, ITI TF-2b 3.38 / 3.39) at /xca/initiating.

ITI-18 from a local Document Consumer becomes ITI-38 Cross Gateway Query:
- queries by patient (FindDocuments, FindSubmissionSets, FindFolders, GetAll,
  FindDocumentsByReferenceId) go to every configured community with a query_url, in
  parallel ([xca] max_parallel), with the patient id translated per community by its
  cross-reference ([[communities]] patient_id_map / patient_ids; a community whose
  cross-reference does not list the patient is not asked);
- every other (Get*) query goes only to the community named by AdhocQuery/@home or the
  $homeCommunityId parameter; without one: the single configured community, or
  XDSMissingHomeCommunityId when there are several (ITI TF-2a 3.18.4.1.2.3.8); a home that is
  not configured: XDSUnknownCommunity.
Each community is bounded by [xca] query_timeout_seconds. The answers are merged: every
returned object keeps the home its responder set (set to the community's homeCommunityId when
missing), the responders' errors are kept (location set to the community when missing), and a
community that failed or did not answer in time adds XDSUnavailableCommunity with location =
its homeCommunityId; some answers plus such errors make PartialSuccess.

Patient ids in the answers: the patientId of every returned DocumentEntry, SubmissionSet and
Folder is translated back into the local id the consumer asked with, by the same
cross-reference (gateway.xca.patient_ids, which says which TF text this follows: ITI TF-2a
3.18.2, ITI TF-1 18.2.1 XDS Affinity Domain Option, ITI TF-2b 3.38); sourcePatientId is left
alone; an id the cross-reference cannot map back is left as returned (DEBUG log, no id).

Size and paging of the merged answer: more than [registry] max_results objects from all
communities together is a Failure with XDSTooManyResults and no objects, as the local registry
answers (ITI TF-3 Table 4.2.4.1-2: "the request cannot be satisfied due to being overly broad
or having a response that is too large"). Otherwise the consumer's startIndex / maxResults
(ebRS 3.0 iterative query, gateway.ebrim.paging) select the slice it gets, in a stable order
(communities in configuration order, each community's objects in its order), with startIndex
and totalResultCount on the answer when it paged. The communities are never sent the paging
attributes: each is asked for everything.

ITI-43 becomes ITI-39 Cross Gateway Retrieve: the DocumentRequests are grouped by
HomeCommunityId, one request per community, in parallel, bounded by
retrieve_timeout_seconds. The remote documents arrive as MTOM parts spooled to files in the
request's spool folder (gateway.soap.client); the response references those files, so the edge
streams them on without holding a document in memory. Unknown community: XDSUnknownCommunity
per document; failed community: XDSUnavailableCommunity per document (PartialSuccess when
others answered). `retrieve_routed` is shared with the imaging gateway (RAD-69 -> RAD-75).

Streaming through (one community routed, the common case): the gateway's own MTOM reply
order is [xca] response_order (empty: [pacs] response_order). Root-last: the community is
asked with the streaming client (`OutboundPool.stream`, read in a thread of this request)
and the consumer gets a `SoapResponse.live`: each part of the community's reply is passed on
as soon as its closing delimiter is read (whatever the community's own order; Content-IDs
rewritten doc0, doc1, ... in arrival order), and the root last, merged as above from the
community's root and the routing errors; when the community fails mid-way, cuts its reply
or passes retrieve_timeout_seconds, the root lists the documents whose parts were sent and
gives XDSUnavailableCommunity for the rest (PartialSuccess). Without the community's root
a part is matched to its DocumentRequest by the caller's `identify` (RAD-75: the SOP Instance
UID of the DICOM file meta header); a part nothing identifies is sent but not referenced.
Root-first (the default: zeep reads the first part as the envelope) stores and forwards, so
that a community failing mid-way is an XDSUnavailableCommunity in a complete answer, unless
[xca] pipe_root_first is set: then, when the community's reply is root-first too (every
ITI-39, a RAD-75 by default), A's root is merged from it at once and written first, then the
parts are piped as they arrive (`LiveAttachments` with `root_first`), chunk by chunk from the
community's connection to the consumer's without a spool file (`StreamedAttachment`; `_Relay`
with `pipe` hands the chunks over through a bounded queue). That root has promised every
document, so when the community then fails, cuts its reply or passes the timeout, the response
is broken off (no closing boundary, the chunked body not terminated: the consumer sees a
failed transfer, never a root naming parts that do not follow); the failure is logged and
audited. When the community's root comes last, or it fails before anything arrives, A stores
and forwards as described above (a clean answer with XDSUnavailableCommunity). Several
communities: store and forward.

Every outbound transaction is offered to `services.audit.record_outbound` when it exists, and
carries the consumer's wsse:Security header (XUA), or `[xua] outbound_assertion` when it sent
none (gateway.xca.outbound.security_headers).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import requests
from lxml import etree
from urllib3.exceptions import ProtocolError

from gateway.config import ROOT_FIRST, ROOT_LAST, GatewayConfig, RemoteCommunity
from gateway.ebrim.paging import Paging, page, paging_of, response_attributes
from gateway.ebrim.parse import (
    content_id_from_href,
    parse_adhoc_query_request,
    parse_registry_error,
    parse_retrieve_document_set_request,
)
from gateway.ebrim.render import render_adhoc_query_response, render_registry_response
from gateway.errors import XdsError, XdsFailure, status_for
from gateway.ns import (
    QUERY,
    RIM,
    RS,
    SOAP12,
    XDSB,
    XOP,
    Action,
    ErrorCode,
    ResponseStatus,
    StoredQuery,
    q,
)
from gateway.soap.client import ReplyTimeout, SoapReply
from gateway.soap.mtom import AttachmentMap, MultipartError, resolve_cid
from gateway.soap.multipart import PartStream
from gateway.transactions import (
    Attachment,
    LiveAttachments,
    RequestContext,
    SoapResponse,
    StreamedAttachment,
)
from gateway.xca.outbound import (
    OutboundPool,
    Outcome,
    pool_for,
    run_bounded,
    security_headers,
)
from gateway.xca.patient_ids import (
    NO_REVERSE,
    ReverseMap,
    localize_patient_ids,
    patient_ids_of,
    query_slots,
    reverse_map,
    slot_values,
    translate_patient_ids,
    unquote,
)

log = logging.getLogger(__name__)

CONTENT_ID_DOMAIN = "xca.xdsi-gateway"

# Stored queries that name a patient: fanned out to every community (ITI TF-2a 3.18.4.1.2.3.8:
# the others need a homeCommunityId).
PATIENT_QUERIES = frozenset({
    StoredQuery.FIND_DOCUMENTS, StoredQuery.FIND_SUBMISSION_SETS, StoredQuery.FIND_FOLDERS,
    StoredQuery.GET_ALL, StoredQuery.FIND_DOCUMENTS_BY_REFERENCE_ID,
})
KNOWN_QUERIES = frozenset(v for k, v in vars(StoredQuery).items() if not k.startswith("_"))
HOME_PARAMETER = "$homeCommunityId"

# ATNA EventOutcomeIndicator for a community that failed (serious failure).
OUTCOME_SERIOUS_FAILURE = 8


# --- shared helpers ---------------------------------------------------------------------------

def communities(config: GatewayConfig) -> dict[str, RemoteCommunity]:
    return {c.home_community_id: c for c in config.communities}


def audit_outbound(services: Any, transaction: str, url: str,
                   request_body: etree._Element | None, response_body: etree._Element | None,
                   outcome: int | None, ctx: RequestContext | None = None) -> None:
    """Offer one outbound transaction to the audit service, when it records them."""
    record = getattr(getattr(services, "audit", None), "record_outbound", None)
    if not callable(record):
        return
    try:
        record(transaction, endpoint_url=url, request_body=request_body,
               response_body=response_body, outcome=outcome,
               human=getattr(ctx, "xua_subject", None))
    except Exception as exc:  # the audit never breaks a transaction
        log.warning("audit of outbound %s failed: %s", transaction, type(exc).__name__)


def failure_reason(outcome: Outcome[SoapReply], timeout: float) -> str:
    """Why a community's answer is unusable (no patient data: errors name no request values)."""
    if outcome.timed_out:
        return f"did not answer within {timeout:g} s"
    exc = outcome.error
    if isinstance(exc, requests.Timeout):
        return f"did not answer within {timeout:g} s ({type(exc).__name__})"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS handshake failed"
    if isinstance(exc, requests.ConnectionError):
        return "could not be reached (connection failed)"
    if isinstance(exc, (ProtocolError, MultipartError, requests.exceptions.ChunkedEncodingError)):
        return f"broke its answer off mid-way ({type(exc).__name__})"
    if exc is not None:
        return f"could not be asked ({type(exc).__name__})"
    reply = outcome.value
    if reply is None or reply.body is None:
        return "answered without a SOAP body"
    if reply.is_fault:
        code = reply.body.findtext(f"{{{SOAP12}}}Code/{{{SOAP12}}}Value") or ""
        text = reply.body.findtext(f"{{{SOAP12}}}Reason/{{{SOAP12}}}Text") or ""
        return f"answered a SOAP fault {code.strip()} {text.strip()[:200]}".rstrip()
    return f"answered an unexpected {etree.QName(reply.body).localname} (HTTP {reply.http_status})"


def _located(errors: Sequence[XdsError], home: str) -> list[XdsError]:
    return [e if e.location else replace(e, location=home) for e in errors]


def _response_errors(status_holder: etree._Element) -> list[XdsError]:
    lst = status_holder.find(q(RS, "RegistryErrorList"))
    if lst is None:
        return []
    return [parse_registry_error(e) for e in lst.iterfind(q(RS, "RegistryError"))]


# --- ITI-18 -> ITI-38 -------------------------------------------------------------------------

def _home_of_query(request: etree._Element, query_home: str | None) -> str | None:
    homes = {query_home.strip()} if query_home and query_home.strip() else set()
    for slot in query_slots(request):
        if slot.get("name") == HOME_PARAMETER:
            homes.update(unquote(v.text or "")[1].strip() for v in slot_values(slot))
    homes.discard("")
    if len(homes) > 1:
        raise XdsFailure(XdsError(
            ErrorCode.REGISTRY_ERROR,
            "AdhocQuery/@home and $homeCommunityId name different communities"))
    return homes.pop() if homes else None


# Paging attributes of the consumer's request: applied to the merged answer, never sent on
# (each community is asked for everything; a page of each would not be a page of the whole).
PAGING_ATTRIBUTES = ("startIndex", "maxResults")


@dataclass(frozen=True)
class _Target:
    community: RemoteCommunity
    body: etree._Element
    reverse: ReverseMap = NO_REVERSE


def query_targets(config: GatewayConfig, body: etree._Element) -> list[_Target]:
    """The communities to ask and the ITI-38 body for each; raises XdsFailure."""
    query = parse_adhoc_query_request(body)
    if query.query_id not in KNOWN_QUERIES:
        raise XdsFailure(XdsError(ErrorCode.UNKNOWN_STORED_QUERY,
                                  f"unknown stored query id {query.query_id!r}"))
    known = communities(config)
    home = _home_of_query(body, query.home)
    askable = [c for c in config.communities if c.query_url]
    if home is not None:
        chosen = known.get(home)
        if chosen is None or not chosen.query_url:
            raise XdsFailure(XdsError(
                ErrorCode.UNKNOWN_COMMUNITY,
                f"homeCommunityId {home} is not a community this gateway can query",
                location=home))
        selected = [chosen]
    elif query.query_id in PATIENT_QUERIES:
        selected = askable
    elif len(askable) == 1:
        selected = askable
        home = askable[0].home_community_id
    else:
        raise XdsFailure(XdsError(
            ErrorCode.MISSING_HOME_COMMUNITY_ID,
            "this stored query names no patient: AdhocQuery/@home (or $homeCommunityId) must "
            "name the community to ask"))
    if not selected:
        raise XdsFailure(XdsError(
            ErrorCode.REGISTRY_ERROR, "no remote community with a query_url is configured"))
    targets = []
    asked = patient_ids_of(body)
    for community in selected:
        out = translate_patient_ids(body, community)
        if out is None:
            log.debug("ITI-38: community %s has no cross-reference for the patient",
                      community.home_community_id)
            continue
        for attribute in PAGING_ATTRIBUTES:
            if attribute in out.attrib:
                del out.attrib[attribute]
        if home is not None:
            aq = out.find(q(RIM, "AdhocQuery"))
            if aq is not None:
                aq.set("home", community.home_community_id)
        targets.append(_Target(community, out, reverse_map(community, asked)))
    return targets


@dataclass
class _Merged:
    """The communities' answers put together, before the limit and the page are applied."""

    objects: list[etree._Element]
    errors: list[XdsError]
    answered: list[str]
    any_success: bool


def _merge_answers(targets: Sequence[_Target], outcomes: Mapping[str, Outcome[SoapReply]],
                   timeout: float) -> _Merged:
    """Every community's objects (home stamped, patient ids in local terms) and errors."""
    errors: list[XdsError] = []
    objects: list[etree._Element] = []
    answered: list[str] = []
    any_success = False
    for t in targets:
        home = t.community.home_community_id
        outcome = outcomes[home]
        reply = outcome.value
        body = reply.body if outcome.ok and reply is not None else None
        if body is None or body.tag != q(QUERY, "AdhocQueryResponse") or not body.get("status"):
            reason = failure_reason(outcome, timeout)
            log.warning("ITI-38 to community %s: %s", home, reason)
            errors.append(XdsError(ErrorCode.UNAVAILABLE_COMMUNITY,
                                   f"community {home} {reason}", location=home))
            continue
        answered.append(home)
        status = body.get("status")
        if status in (ResponseStatus.SUCCESS, ResponseStatus.PARTIAL_SUCCESS):
            any_success = True
        errors.extend(_located(_response_errors(body), home))
        rol = body.find(q(RIM, "RegistryObjectList"))
        returned = [o for o in (list(rol) if rol is not None else [])
                    if isinstance(o.tag, str)]  # not comments, processing instructions
        for obj in returned:
            if not obj.get("home"):
                obj.set("home", home)
        done = localize_patient_ids(returned, t.reverse, home)
        if done.unmapped:
            log.debug("ITI-38 to community %s: %d patient id(s) without a local id left as "
                      "returned", home, done.unmapped)
        objects.extend(returned)
    return _Merged(objects, errors, answered, any_success)


def _too_many(count: int, limit: int) -> XdsError:
    # ITI TF-3 Table 4.2.4.1-2: XDSTooManyResults, "the request cannot be satisfied due to
    # being overly broad or having a response that is too large": an error, no partial list
    # (as the local registry answers, gateway.registry.handlers.execute_stored_query).
    return XdsError(ErrorCode.TOO_MANY_RESULTS,
                    f"the communities answered {count} objects together, more than the "
                    f"{limit} one answer may hold; narrow the query")


def _merged_response(merged: _Merged, targets: Sequence[_Target], paging: Paging,
                     limit: int) -> etree._Element:
    """The consumer's AdhocQueryResponse: [registry] max_results on the whole merged list,
    then the page it asked for (startIndex / maxResults)."""
    errors = list(merged.errors)
    objects = merged.objects
    any_success = merged.any_success
    if len(objects) > limit:
        errors.append(_too_many(len(objects), limit))
        objects, any_success = [], False
    status = status_for(errors, partial_possible=True, any_success=any_success)
    if not targets:
        status = ResponseStatus.SUCCESS  # no community knows the patient: nothing found
    start_index, total = (response_attributes(paging, len(objects))
                          if status != ResponseStatus.FAILURE else (None, None))
    response = render_adhoc_query_response(status, [], errors, start_index=start_index,
                                           total_result_count=total)
    rol = response.find(q(RIM, "RegistryObjectList"))
    assert rol is not None
    for obj in page(objects, paging):
        rol.append(obj)
    return response


def _merge_query(targets: Sequence[_Target], outcomes: Mapping[str, Outcome[SoapReply]],
                 timeout: float, paging: Paging | None = None, limit: int = 1000
                 ) -> tuple[etree._Element, list[str]]:
    """The merged AdhocQueryResponse, and the communities that answered usably."""
    merged = _merge_answers(targets, outcomes, timeout)
    return _merged_response(merged, targets, paging or Paging(), limit), merged.answered


def stored_query(services: Any, ctx: RequestContext, body: etree._Element) -> SoapResponse:
    """ITI-18 at the initiating gateway: ITI-38 to the communities, answers merged."""
    config: GatewayConfig = services.config
    try:
        paging = paging_of(parse_adhoc_query_request(body))
        targets = query_targets(config, body)
    except XdsFailure as failure:
        errors = list(failure.errors)
        return SoapResponse(render_adhoc_query_response(status_for(errors), [], errors))
    pool = pool_for(config)
    timeout = float(config.xca.query_timeout_seconds)
    security = security_headers(config, ctx.headers)  # XUA: the consumer's assertion passed on

    def ask(t: _Target) -> Callable[[], SoapReply]:
        headers = tuple(copy.deepcopy(h) for h in security)  # one copy per thread
        return lambda: pool.call(t.community.query_url, Action.ITI38, t.body,
                                 read_timeout=timeout, headers=headers)

    outcomes = run_bounded([(t.community.home_community_id, ask(t)) for t in targets],
                           max_parallel=config.xca.max_parallel, timeout=timeout)
    for t in targets:
        o = outcomes[t.community.home_community_id]
        audit_outbound(services, "ITI-38", t.community.query_url, t.body,
                       o.value.body if o.ok and o.value is not None else None,
                       None if o.ok else OUTCOME_SERIOUS_FAILURE, ctx)
    response, answered = _merge_query(targets, outcomes, timeout, paging,
                                      config.registry.max_results)
    log.debug("ITI-38: %d of %d communities answered", len(answered), len(targets))
    return SoapResponse(response)


# --- ITI-43 -> ITI-39 (and RAD-69 -> RAD-75) --------------------------------------------------

@dataclass(frozen=True)
class RoutedRequest:
    """One community's share of a retrieve: the URL and the body to send there."""

    community: RemoteCommunity
    url: str
    body: etree._Element


@dataclass
class RetrieveRouting:
    routed: list[RoutedRequest]
    errors: list[XdsError]  # per-document errors found before sending anything


def route_homes(config: GatewayConfig, homes: Sequence[str | None], doc_uids: Sequence[str],
                url_of: Callable[[RemoteCommunity], str]) -> tuple[list[str | None],
                                                                   list[XdsError]]:
    """For each document request, the community it goes to (None: an error instead)."""
    known = communities(config)
    reachable = [c for c in config.communities if url_of(c)]
    targets: list[str | None] = []
    errors: list[XdsError] = []
    for home, uid in zip(homes, doc_uids, strict=True):
        if not home:
            if len(reachable) == 1:
                targets.append(reachable[0].home_community_id)
                continue
            errors.append(XdsError(
                ErrorCode.MISSING_HOME_COMMUNITY_ID,
                f"document {uid}: the DocumentRequest has no HomeCommunityId", location=uid))
            targets.append(None)
            continue
        c = known.get(home)
        if c is None or not url_of(c):
            errors.append(XdsError(
                ErrorCode.UNKNOWN_COMMUNITY,
                f"document {uid}: homeCommunityId {home} is not a community this gateway "
                "retrieves from", location=home))
            targets.append(None)
            continue
        targets.append(home)
    return targets, errors


def _retrieve_routing(config: GatewayConfig, body: etree._Element) -> RetrieveRouting:
    request = parse_retrieve_document_set_request(body)  # raises XdsFailure
    homes = [d.home_community_id for d in request.documents]
    uids = [d.document_unique_id for d in request.documents]
    targets, errors = route_homes(config, homes, uids, lambda c: c.retrieve_url)
    elements = list(body.iterfind(q(XDSB, "DocumentRequest")))
    known = communities(config)
    routed: list[RoutedRequest] = []
    for home in dict.fromkeys(t for t in targets if t is not None):
        out = etree.Element(q(XDSB, "RetrieveDocumentSetRequest"), nsmap={"xdsb": XDSB})
        for el, target in zip(elements, targets, strict=True):
            if target == home:
                doc = copy.deepcopy(el)
                if doc.find(q(XDSB, "HomeCommunityId")) is None:
                    hc = etree.Element(q(XDSB, "HomeCommunityId"))
                    hc.text = home
                    doc.insert(0, hc)
                out.append(doc)
        community = known[home]
        routed.append(RoutedRequest(community, community.retrieve_url, out))
    return RetrieveRouting(routed, errors)


def _document_uids(body: etree._Element) -> list[str]:
    return [(d.findtext(q(XDSB, "DocumentUniqueId")) or "").strip()
            for d in body.iter(q(XDSB, "DocumentRequest"))]


def _merge_retrieve(routed: Sequence[RoutedRequest], outcomes: Mapping[str, Outcome[SoapReply]],
                    early_errors: Sequence[XdsError], timeout: float, transaction: str
                    ) -> SoapResponse:
    errors: list[XdsError] = list(early_errors)
    documents: list[etree._Element] = []
    attachments: list[Attachment] = []
    for r in routed:
        home = r.community.home_community_id
        outcome = outcomes[home]
        reply = outcome.value
        body = reply.body if outcome.ok and reply is not None else None
        status_el = body.find(q(RS, "RegistryResponse")) if body is not None else None
        if (body is None or body.tag != q(XDSB, "RetrieveDocumentSetResponse")
                or status_el is None or not status_el.get("status")):
            reason = failure_reason(outcome, timeout)
            log.warning("%s to community %s: %s", transaction, home, reason)
            for uid in _document_uids(r.body):
                errors.append(XdsError(ErrorCode.UNAVAILABLE_COMMUNITY,
                                       f"document {uid}: community {home} {reason}",
                                       location=home))
            continue
        assert reply is not None
        got = reply.attachments

        def renamed(dr: etree._Element, inc: etree._Element, uid: str, home: str = home,
                    got: Mapping[str, Attachment] = got) -> XdsError | None:
            found = resolve_cid(got, content_id_from_href(inc.get("href", "")))
            if found is None:
                return XdsError(
                    ErrorCode.REPOSITORY_ERROR,
                    f"document {uid}: community {home} returned it without its content",
                    location=home)
            cid = f"doc{len(attachments)}@{CONTENT_ID_DOMAIN}"
            inc.set("href", f"cid:{cid}")
            mime = (dr.findtext(q(XDSB, "mimeType")) or "").strip()
            attachments.append(Attachment(cid, found.path, found.size,
                                          mime or found.content_type, found.sha1))
            return None

        _take_documents(body, status_el, home, renamed, errors, documents)
    return SoapResponse(_retrieve_response(errors, documents),
                        attachments=tuple(attachments))


def _take_documents(body: etree._Element, status_el: etree._Element, home: str,
                    include: Callable[[etree._Element, etree._Element, str], XdsError | None],
                    errors: list[XdsError], documents: list[etree._Element]) -> None:
    """One community's usable RetrieveDocumentSetResponse `body` taken into A's answer: its
    errors located at `home`, each DocumentResponse given its HomeCommunityId and appended to
    `documents`; `include(dr, xop_include, uid)` points an xop:Include at A's part (or returns
    the error that drops the document)."""
    errors.extend(_located(_response_errors(status_el), home))
    for dr in list(body.iterfind(q(XDSB, "DocumentResponse"))):
        uid = (dr.findtext(q(XDSB, "DocumentUniqueId")) or "").strip()
        if dr.find(q(XDSB, "HomeCommunityId")) is None:
            hc = etree.Element(q(XDSB, "HomeCommunityId"))
            hc.text = home
            dr.insert(0, hc)
        inc = dr.find(f"{q(XDSB, 'Document')}/{q(XOP, 'Include')}")
        if inc is not None:
            error = include(dr, inc, uid)
            if error is not None:
                errors.append(error)
                continue
        elif dr.find(q(XDSB, "Document")) is None:
            errors.append(XdsError(
                ErrorCode.REPOSITORY_ERROR,
                f"document {uid}: community {home} returned a DocumentResponse without a "
                "Document", location=home))
            continue
        documents.append(dr)


def _retrieve_response(errors: Sequence[XdsError],
                       documents: Sequence[etree._Element]) -> etree._Element:
    """A's RetrieveDocumentSetResponse: the status of `errors` and `documents`, then them."""
    status = status_for(errors, partial_possible=True, any_success=bool(documents))
    response = etree.Element(q(XDSB, "RetrieveDocumentSetResponse"),
                             nsmap={"xdsb": XDSB, "xop": XOP})
    render_registry_response(status, errors, parent=response)
    for dr in documents:
        response.append(dr)
    return response


def reply_order(config: GatewayConfig) -> str:
    """The order of this gateway's own MTOM replies: [xca] response_order, else [pacs]
    response_order, else root-first."""
    order = str(getattr(config.xca, "response_order", "") or "")
    if not order:
        order = str(getattr(getattr(config, "pacs", None), "response_order", "") or "")
    return order or ROOT_FIRST


def retrieve_routed(services: Any, ctx: RequestContext, routing: RetrieveRouting, *,
                    action: str, transaction: str,
                    identify: Callable[[Attachment], str | None] | None = None
                    ) -> SoapResponse:
    """Send each community its share in parallel; merge the answers (documents as spooled
    files). Used for ITI-39 and RAD-75. One community and a root-last reply order, or
    [xca] pipe_root_first: streamed through (module docstring; `identify` names the document
    a part holds when the community's root never came)."""
    config: GatewayConfig = services.config
    pool = pool_for(config)
    timeout = float(config.xca.retrieve_timeout_seconds)
    security = security_headers(config, ctx.headers)  # XUA: the consumer's assertion passed on
    if len(routing.routed) == 1 and (reply_order(config) == ROOT_LAST
                                     or getattr(config.xca, "pipe_root_first", False)):
        streamer = _retrieve_live if reply_order(config) == ROOT_LAST else _retrieve_piped
        return streamer(services, ctx, routing, pool, security, timeout,
                        action=action, transaction=transaction, identify=identify)

    def fetch(i: int, r: RoutedRequest) -> Callable[[], SoapReply]:
        headers = tuple(copy.deepcopy(h) for h in security)  # one copy per thread

        def run() -> SoapReply:
            spool = Path(ctx.spool_dir) / f"xca-{i}"
            spool.mkdir(parents=True, exist_ok=True)
            return pool.call(r.url, action, r.body, read_timeout=timeout, spool_dir=spool,
                             headers=headers)
        return run

    outcomes = run_bounded(
        [(r.community.home_community_id, fetch(i, r)) for i, r in enumerate(routing.routed)],
        max_parallel=config.xca.max_parallel, timeout=timeout)
    for r in routing.routed:
        o = outcomes[r.community.home_community_id]
        audit_outbound(services, transaction, r.url, r.body,
                       o.value.body if o.ok and o.value is not None else None,
                       None if o.ok else OUTCOME_SERIOUS_FAILURE, ctx)
    return _merge_retrieve(routing.routed, outcomes, routing.errors, timeout, transaction)


# --- streaming through one community ----------------------------------------------------------

_END = object()  # the reply has ended (read, failed or abandoned)
_PART_END = object()  # the piped part's last chunk has been queued
_TIMEOUT = object()  # nothing came before the deadline


class _Relay:
    """One community's reply read part by part in a thread of this request
    (`OutboundPool.stream`); `events()` hands over each part, and the root, as it is read,
    and ends when the reply ends, fails or passes the deadline (then `timed_out`).

    With `pipe`, every part after the root is not spooled: `events()` yields it as a
    `StreamedAttachment` whose chunks come from the reading thread through a bounded queue
    (`PIPE_QUEUE` chunks of at most about 256 KiB: memory stays flat, and a consumer that
    reads slowly slows the reading down). Read a part's chunks before the next event (what
    is left of a part is dropped when the next event is asked for). When the reply ends
    inside a part (broken, malformed, deadline), its chunks stop early and `cut` is set."""

    PIPE_QUEUE = 8
    CLOSE_WAIT = 1.0

    def __init__(self, pool: OutboundPool, r: RoutedRequest, action: str,
                 headers: tuple[etree._Element, ...], timeout: float, spool: Path, *,
                 pipe: bool = False):
        self._pool, self._r, self._action, self._headers = pool, r, action, headers
        self.timeout = timeout
        self.spool = spool
        self.pipe = pipe
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self._queue: queue.Queue[Any] = queue.Queue(self.PIPE_QUEUE if pipe else 0)
        self._held: Any = None  # an item taken from the queue and put back
        self.root: SoapReply | None = None
        self.error: BaseException | None = None
        self.timed_out = False
        self.complete = False
        self.cut = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xca-relay", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        """Queue `item` (waiting while the queue is full); False once the relay is stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            with self._pool.stream(self._r.url, self._action, self._r.body,
                                   read_timeout=self.timeout, spool_dir=self.spool,
                                   deadline=self.deadline, headers=self._headers,
                                   pipe_after_root=self.pipe) as reply:
                for event in reply.events():
                    if self._stop.is_set():
                        return
                    if isinstance(event, PartStream):
                        if not self._put(event):
                            return
                        for chunk in event.chunks:
                            if not self._put(chunk):
                                return
                        if not self._put(_PART_END):
                            return
                    elif not self._put(event):
                        return
                self.complete = True
        except BaseException as exc:  # reported through outcome()
            self.error = exc
        finally:
            if self._stop.is_set():  # the response is gone: nobody else may be left
                with contextlib.suppress(queue.Full):
                    self._queue.put_nowait(_END)
                shutil.rmtree(self.spool, ignore_errors=True)
            else:
                self._put(_END)

    def _get(self) -> Any:
        """The next item of the queue, or _TIMEOUT past the deadline (plus a second)."""
        if self._held is not None:
            item, self._held = self._held, None
            return item
        try:
            return self._queue.get(timeout=max(0.0, self.deadline - time.monotonic()) + 1)
        except queue.Empty:
            return _TIMEOUT

    def events(self) -> Iterator[Attachment | StreamedAttachment | SoapReply]:
        while True:
            item = self._get()
            if item is _TIMEOUT:
                self.timed_out = True
                return
            if item is _END:
                if isinstance(self.error, ReplyTimeout):  # the whole-reply deadline
                    self.timed_out, self.error = True, None
                return
            if item is _PART_END or isinstance(item, bytes):
                continue  # what the consumer left of a piped part
            if isinstance(item, PartStream):
                yield StreamedAttachment(item.content_id, self._chunks(),
                                         item.content_type)
                continue
            if isinstance(item, SoapReply):
                self.root = item
            yield item

    def _chunks(self) -> Iterator[bytes]:
        """The chunks of the piped part being read; stops early (`cut`) when the reply ends
        inside it."""
        while True:
            item = self._get()
            if isinstance(item, bytes):
                yield item
            elif item is _PART_END:
                return
            else:  # the reply ended (or the deadline passed) inside the part
                self.cut = True
                if item is _TIMEOUT:
                    self.timed_out = True
                else:
                    self._held = item  # events() ends on it
                    if item is _END and isinstance(self.error, ReplyTimeout):
                        self.timed_out, self.error = True, None
                return

    def outcome(self) -> Outcome[SoapReply]:
        if self.timed_out:
            return Outcome(timed_out=True, seconds=time.monotonic() - self.started)
        if self.error is not None or not self.complete:
            return Outcome(self.root, self.error or RuntimeError("reply ended early"))
        return Outcome(self.root, seconds=time.monotonic() - self.started)

    def close(self) -> None:
        """Stop reading. A reading thread that has ended (`events()` ended on the end of the
        reply) is joined; one still reading (the response is gone, or the deadline passed)
        is not waited for beyond `CLOSE_WAIT` seconds, so the web server's thread is freed:
        it stops at the next chunk or part and then removes its spool folder (which the edge
        removes too)."""
        self._stop.set()
        self._thread.join(self.CLOSE_WAIT)
        if self._thread.is_alive():
            log.warning("XCA: a community's reply is still being read after the response "
                        "ended; its spool folder is removed when it ends")


def _document_requests(body: etree._Element) -> dict[str, etree._Element]:
    return {(d.findtext(q(XDSB, "DocumentUniqueId")) or "").strip(): d
            for d in body.iter(q(XDSB, "DocumentRequest"))}


def _identified_response(request: etree._Element | None, uid: str, home: str,
                         att: Attachment) -> etree._Element:
    """A DocumentResponse for a part sent before the community's root came (built from its
    DocumentRequest)."""
    dr = etree.Element(q(XDSB, "DocumentResponse"))
    etree.SubElement(dr, q(XDSB, "HomeCommunityId")).text = home
    repo = (request.findtext(q(XDSB, "RepositoryUniqueId")) or "").strip() \
        if request is not None else ""
    etree.SubElement(dr, q(XDSB, "RepositoryUniqueId")).text = repo
    etree.SubElement(dr, q(XDSB, "DocumentUniqueId")).text = uid
    etree.SubElement(dr, q(XDSB, "mimeType")).text = att.content_type
    doc = etree.SubElement(dr, q(XDSB, "Document"))
    etree.SubElement(doc, q(XOP, "Include"), href=f"cid:{att.content_id}")
    return dr


def _merge_streamed(r: RoutedRequest, outcome: Outcome[SoapReply], root: SoapReply | None,
                    sent: AttachmentMap, early_errors: Sequence[XdsError], timeout: float,
                    transaction: str,
                    identify: Callable[[Attachment], str | None] | None) -> etree._Element:
    """A's root for a reply streamed through: `sent` maps the community's Content-IDs to the
    parts already sent (new Content-IDs). The rules of `_merge_retrieve`, plus: when the
    community failed after some parts were sent, those are listed and every other document
    gets XDSUnavailableCommunity."""
    home = r.community.home_community_id
    errors: list[XdsError] = list(early_errors)
    documents: list[etree._Element] = []
    body = root.body if root is not None else None
    status_el = body.find(q(RS, "RegistryResponse")) if body is not None else None
    usable = (body is not None and body.tag == q(XDSB, "RetrieveDocumentSetResponse")
              and status_el is not None and bool(status_el.get("status")))
    reason = None if outcome.ok else failure_reason(outcome, timeout)
    if reason is not None:
        log.warning("%s to community %s: %s (%d parts passed on)", transaction, home,
                    reason, len(sent))
    if usable:
        assert body is not None and status_el is not None

        def passed_on(dr: etree._Element, inc: etree._Element, uid: str) -> XdsError | None:
            found = resolve_cid(sent, content_id_from_href(inc.get("href", "")))
            if found is None:
                return XdsError(
                    ErrorCode.UNAVAILABLE_COMMUNITY if reason else ErrorCode.REPOSITORY_ERROR,
                    f"document {uid}: community {home} {reason} before its content came"
                    if reason else
                    f"document {uid}: community {home} returned it without its content",
                    location=home)
            inc.set("href", f"cid:{found.content_id}")
            return None

        _take_documents(body, status_el, home, passed_on, errors, documents)
    else:
        reason = reason or failure_reason(outcome, timeout)
        if outcome.ok:
            log.warning("%s to community %s: %s", transaction, home, reason)
        requests_by_uid = _document_requests(r.body)
        done: set[str] = set()
        for att in sent.values():
            found_uid = identify(att) if identify is not None else None
            if found_uid and found_uid in requests_by_uid and found_uid not in done:
                done.add(found_uid)
                documents.append(_identified_response(requests_by_uid[found_uid], found_uid,
                                                      home, att))
            else:
                log.warning("%s to community %s: a part passed on cannot be matched to a "
                            "document", transaction, home)
        for uid in requests_by_uid:
            if uid not in done:
                errors.append(XdsError(ErrorCode.UNAVAILABLE_COMMUNITY,
                                       f"document {uid}: community {home} {reason}",
                                       location=home))
    return _retrieve_response(errors, documents)


def _retrieve_live(services: Any, ctx: RequestContext, routing: RetrieveRouting,
                   pool: OutboundPool, security: tuple[etree._Element, ...], timeout: float,
                   *, action: str, transaction: str,
                   identify: Callable[[Attachment], str | None] | None) -> SoapResponse:
    """One community, root-last: its reply's parts passed on as they arrive, A's root last."""
    r = routing.routed[0]
    spool = Path(ctx.spool_dir) / "xca-0"
    spool.mkdir(parents=True, exist_ok=True)
    headers = tuple(copy.deepcopy(h) for h in security)
    relay = _Relay(pool, r, action, headers, timeout, spool)
    sent = AttachmentMap()
    audited = threading.Lock()
    state = {"audited": False}

    def audit(body: etree._Element | None, ok: bool) -> None:
        with audited:
            if state["audited"]:
                return
            state["audited"] = True
        audit_outbound(services, transaction, r.url, r.body, body,
                       None if ok else OUTCOME_SERIOUS_FAILURE, ctx)

    def parts() -> Iterator[Attachment]:
        for event in relay.events():
            if isinstance(event, Attachment):
                out = Attachment(f"doc{len(sent)}@{CONTENT_ID_DOMAIN}", event.path, event.size,
                                 event.content_type or "application/octet-stream", event.sha1)
                sent[event.content_id] = out
                yield out

    def finish() -> etree._Element:
        outcome = relay.outcome()
        root = relay.root
        audit(root.body if root is not None else None, outcome.ok)
        return _merge_streamed(r, outcome, root, sent, routing.errors, timeout, transaction,
                               identify)

    def close() -> None:
        relay.close()
        audit(None, False)

    fallback = etree.Element(q(XDSB, "RetrieveDocumentSetResponse"), nsmap={"xdsb": XDSB})
    render_registry_response(ResponseStatus.FAILURE, [XdsError(
        ErrorCode.REPOSITORY_ERROR, "the gateway could not complete the response")],
        parent=fallback)
    return SoapResponse(body=fallback, cleanup=[spool],
                        live=LiveAttachments(parts(), finish, close))


class BrokenOff(ConnectionResetError):
    """A root-first response cannot be completed: its root names a part that will not come.

    Raised from the response's parts, it ends the HTTP response without its closing boundary
    and closes the connection. A connection reset (errno ECONNRESET) is what the web server
    treats as an ended connection, not as a failure of its own to log with a traceback; the
    reason is logged here, at WARNING, before it is raised."""

    def __init__(self, reason: str):
        super().__init__(errno.ECONNRESET, reason)


def _spool_piped(part: StreamedAttachment, path: Path) -> Attachment:
    """A piped part written to a file (store and forward)."""
    size = 0
    with open(path, "xb", buffering=0) as f:
        for chunk in part.chunks:
            f.write(chunk)
            size += len(chunk)
    return Attachment(part.content_id, path, size, part.content_type)


def _retrieve_piped(services: Any, ctx: RequestContext, routing: RetrieveRouting,
                    pool: OutboundPool, security: tuple[etree._Element, ...], timeout: float,
                    *, action: str, transaction: str,
                    identify: Callable[[Attachment], str | None] | None) -> SoapResponse:
    """One community, root-first: when the community's root comes first, A's root is written
    from it at once and the parts are piped as they arrive, chunk by chunk from the
    community's connection to the consumer's, without a spool file (`_Relay` with `pipe`);
    otherwise (its root last, or no usable answer) everything is read first, then merged
    (store and forward)."""
    r = routing.routed[0]
    home = r.community.home_community_id
    spool = Path(ctx.spool_dir) / "xca-0"
    spool.mkdir(parents=True, exist_ok=True)
    headers = tuple(copy.deepcopy(h) for h in security)
    relay = _Relay(pool, r, action, headers, timeout, spool, pipe=True)
    events = relay.events()
    first = next(events, None)
    root = first if isinstance(first, SoapReply) else None
    body = root.body if root is not None else None
    if (root is None or body is None or body.tag != q(XDSB, "RetrieveDocumentSetResponse")
            or not any(True for _ in body.iter(q(XOP, "Include")))):
        # store and forward: the community's root last, a failure, or nothing to pipe
        received = AttachmentMap()
        if isinstance(first, Attachment):
            received[first.content_id] = first
        for event in events:
            if isinstance(event, Attachment):
                received[event.content_id] = event
            elif isinstance(event, StreamedAttachment):  # a part after a root in the middle
                received[event.content_id] = _spool_piped(event, spool / f"piped-{len(received)}")
        relay.close()  # ended with the reply; or still reading past the deadline: stopped
        outcome = relay.outcome()
        reply = relay.root
        audit_outbound(services, transaction, r.url, r.body,
                       reply.body if outcome.ok and reply is not None else None,
                       None if outcome.ok else OUTCOME_SERIOUS_FAILURE, ctx)
        if reply is not None:
            reply = SoapReply(reply.http_status, reply.envelope, reply.body, received)
        return _merge_retrieve(routing.routed, {home: Outcome(
            reply, outcome.error, outcome.timed_out, outcome.seconds)},
            routing.errors, timeout, transaction)

    # The community's root first: A's root now, each part piped as it arrives.
    assert root is not None and body is not None
    planned = AttachmentMap()
    for inc in body.iter(q(XOP, "Include")):
        cid = content_id_from_href(inc.get("href", ""))
        if cid and cid not in planned:
            planned[cid] = Attachment(f"doc{len(planned)}@{CONTENT_ID_DOMAIN}", spool, 0)
    a_root = _merge_streamed(r, Outcome(root), root, planned, routing.errors, timeout,
                             transaction, identify)
    expected = {a.content_id for a in planned.values()}
    state = {"audited": False}

    def audit(ok: bool) -> None:
        if not state["audited"]:
            state["audited"] = True
            audit_outbound(services, transaction, r.url, r.body, body,
                           None if ok else OUTCOME_SERIOUS_FAILURE, ctx)

    def broken_off(delivered: int) -> BrokenOff:
        outcome = relay.outcome()
        audit(False)
        reason = failure_reason(outcome, timeout) if not outcome.ok else \
            "left out parts its root names"
        log.warning("%s to community %s: %s after %d of %d parts; the root-first "
                    "response is broken off", transaction, home, reason, delivered,
                    len(expected))
        return BrokenOff(f"community {home} {reason}")

    def piped(chunks: Iterator[bytes], delivered: set[str]) -> Iterator[bytes]:
        yield from chunks
        if relay.cut:  # the community's reply ended inside the part
            raise broken_off(len(delivered) - 1)

    def parts() -> Iterator[Attachment | StreamedAttachment]:
        delivered: set[str] = set()
        for event in events:
            if isinstance(event, SoapReply):
                continue
            plan = planned.get(event.content_id)
            if plan is None or plan.content_id in delivered:
                if isinstance(event, Attachment):
                    event.path.unlink(missing_ok=True)  # a part nothing references
                continue  # (a piped one's chunks are dropped by events())
            delivered.add(plan.content_id)
            ctype = event.content_type or "application/octet-stream"
            if isinstance(event, StreamedAttachment):
                yield StreamedAttachment(plan.content_id, piped(event.chunks, delivered),
                                         ctype)
            else:
                yield Attachment(plan.content_id, event.path, event.size, ctype, event.sha1)
        outcome = relay.outcome()
        if not outcome.ok or delivered != expected:
            raise broken_off(len(delivered))
        audit(True)

    def close() -> None:
        relay.close()
        audit(False)

    return SoapResponse(body=a_root, cleanup=[spool],
                        live=LiveAttachments(parts(), lambda: a_root, close, root_first=True))


def failure_response(errors: Sequence[XdsError]) -> SoapResponse:
    response = etree.Element(q(XDSB, "RetrieveDocumentSetResponse"), nsmap={"xdsb": XDSB})
    render_registry_response(status_for(errors), list(errors), parent=response)
    return SoapResponse(response)


def retrieve_document_set(services: Any, ctx: RequestContext,
                          body: etree._Element) -> SoapResponse:
    """ITI-43 at the initiating gateway: ITI-39 per community, documents streamed through."""
    try:
        routing = _retrieve_routing(services.config, body)
    except XdsFailure as failure:
        return failure_response(failure.errors)
    if not routing.routed:
        return failure_response(routing.errors)
    return retrieve_routed(services, ctx, routing, action=Action.ITI39, transaction="ITI-39")


__all__ = [
    "PATIENT_QUERIES",
    "RetrieveRouting",
    "RoutedRequest",
    "audit_outbound",
    "failure_response",
    "patient_ids_of",
    "query_targets",
    "reply_order",
    "retrieve_document_set",
    "retrieve_routed",
    "route_homes",
    "stored_query",
    "translate_patient_ids",
]
