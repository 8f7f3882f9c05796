"""Responding Imaging Gateway (XCA-I): RAD-75 Cross Gateway Retrieve Imaging Document Set,
answered by RAD-69 to the Imaging Document Sources of this community, built-in or remote.

Per DocumentRequest: HomeCommunityId must name our community (XDSMissingHomeCommunityId /
XDSUnknownCommunity otherwise, `gateway.xca.home`). The RepositoryUniqueId then names the
Imaging Document Source: a remote one from [[imaging_sources]] is sent RAD-69 with its share
of the request (the StudyRequest/SeriesRequest tree of its documents, no HomeCommunityId: the
source is in our community, and the request's TransferSyntaxUIDList) by
`gateway.xca.remote_retrieve`, all remote sources in parallel and while the built-in one
works, each bounded by [xca] retrieve_timeout_seconds; a source that fails gives
XDSRepositoryError for each of its documents. Every other document goes through the RAD-69
machinery of the built-in source over its PACS (`gateway.imaging.rad69`: the same checks,
XDSUnknownRepositoryId for an id nobody serves, C-FIND resolution and C-GET/C-MOVE into the
request's spool folder). The results of all sources are consolidated into one
RetrieveDocumentSetResponse (RAD TF-3 4.75.4.1.3): PartialSuccess when some documents come
back and some fail, every RegistryError located at our homeCommunityId, each DocumentResponse
carrying HomeCommunityId. The instances go out as MTOM attachments streamed from the spool
files, removed after the response.

With a root-last reply order ([xca] response_order, else [pacs] response_order) and no remote
Imaging Document Source involved, the built-in source's instances are streamed as the
retrieve places them in the spool folder, the root part last (`gateway.imaging.rad69
.live_response`, its root then given our homeCommunityId, every error located there and the
home-check errors added), so that an initiating gateway can pass them on as they come.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from lxml import etree

from gateway.config import ROOT_LAST
from gateway.ebrim.model import RetrievedDocument
from gateway.ebrim.parse import parse_registry_error
from gateway.ebrim.render import render_registry_response, render_retrieve_document_set_response
from gateway.errors import XdsError, XdsFailure, status_for
from gateway.imaging.rad69 import MIME_DICOM, live_response, retrieve_request
from gateway.imaging.request import ImagingDocumentRequest, ImagingRequest, parse_request
from gateway.ns import RS, XDSB, XDSI, XOP, Action, ErrorCode, ResponseStatus, q
from gateway.transactions import Attachment, LiveAttachments, RequestContext, SoapResponse
from gateway.xca.home import located, split_by_home
from gateway.xca.initiating import reply_order
from gateway.xca.remote_retrieve import RemoteShare, with_shares

if TYPE_CHECKING:
    from gateway.services import Services

log = logging.getLogger(__name__)

CONTENT_ID_DOMAIN = "responding-imaging.xdsi-gateway"


def _home(services: Services) -> str:
    return services.config.community.home_community_id


def rad69_request(documents: list[ImagingDocumentRequest], syntaxes: tuple[str, ...]
                  ) -> etree._Element:
    """xdsi:RetrieveImagingDocumentSetRequest for `documents` (grouped by study, then series,
    in request order; without HomeCommunityId) asking for `syntaxes`."""
    root = etree.Element(q(XDSI, "RetrieveImagingDocumentSetRequest"),
                         nsmap={"xdsi": XDSI, "xdsb": XDSB})
    studies: dict[str, etree._Element] = {}
    series: dict[tuple[str, str], etree._Element] = {}
    for d in documents:
        study = studies.get(d.study_uid)
        if study is None:
            study = studies[d.study_uid] = etree.SubElement(
                root, q(XDSI, "StudyRequest"), studyInstanceUID=d.study_uid)
        key = (d.study_uid, d.series_uid)
        ser = series.get(key)
        if ser is None:
            ser = series[key] = etree.SubElement(
                study, q(XDSI, "SeriesRequest"), seriesInstanceUID=d.series_uid)
        dr = etree.SubElement(ser, q(XDSB, "DocumentRequest"))
        etree.SubElement(dr, q(XDSB, "RepositoryUniqueId")).text = d.repository_unique_id
        etree.SubElement(dr, q(XDSB, "DocumentUniqueId")).text = d.document_unique_id
    tsl = etree.SubElement(root, q(XDSI, "TransferSyntaxUIDList"))
    for t in syntaxes:
        etree.SubElement(tsl, q(XDSI, "TransferSyntaxUID")).text = t
    return root


def remote_imaging_shares(services: Services, request: ImagingRequest,
                          documents: list[ImagingDocumentRequest]
                          ) -> tuple[list[ImagingDocumentRequest], list[RemoteShare]]:
    """The documents for the built-in Imaging Document Source (its own id, an id no remote
    source has, or a request it must reject as written) and one RAD-69 share per remote
    source of [[imaging_sources]]."""
    remotes = {s.unique_id: s.retrieve_url for s in services.config.imaging_sources}
    local: list[ImagingDocumentRequest] = []
    grouped: dict[str, list[ImagingDocumentRequest]] = {}
    for d in documents:
        if d.valid and d.repository_unique_id in remotes:
            grouped.setdefault(d.repository_unique_id, []).append(d)
        else:
            local.append(d)
    shares = [RemoteShare(uid, remotes[uid], rad69_request(docs, request.transfer_syntaxes),
                          tuple(d.document_unique_id for d in docs))
              for uid, docs in grouped.items()]
    return local, shares


def retrieve_local_imaging(services: Services, request: ImagingRequest, spool: Path,
                           ctx: RequestContext | None = None
                           ) -> tuple[str, list[RetrievedDocument], list[XdsError]]:
    """RAD-69 to this community's Imaging Document Sources (the built-in one and, with `ctx`
    for the XUA header, the remote ones) for the documents of our community; the consolidated
    status, documents (files under `spool`) and errors (located at our homeCommunityId)."""
    home = _home(services)
    ours, errors = split_by_home(request.documents, home)
    local, shares = (remote_imaging_shares(services, request, ours) if ctx is not None
                     else (ours, []))

    def built_in() -> tuple[list[RetrievedDocument], list[XdsError]]:
        return retrieve_request(services, replace(request, documents=tuple(local)), spool,
                                transaction="RAD-75")

    return with_shares(services, ctx, shares, built_in if local else None, home=home,
                       errors=errors, action=Action.RAD69, transaction="RAD-69",
                       spool=spool / "remote", what="imaging document source")


def _as_responding(root: etree._Element, home: str, early: list[XdsError]) -> etree._Element:
    """A RAD-69 root made RAD-75's: `early` errors first, every error located at `home`, each
    DocumentResponse with HomeCommunityId, the status recomputed."""
    status_el = root.find(q(RS, "RegistryResponse"))
    errors = list(early)
    if status_el is not None:
        lst = status_el.find(q(RS, "RegistryErrorList"))
        if lst is not None:
            errors.extend(parse_registry_error(e) for e in lst.iterfind(q(RS, "RegistryError")))
    errors = located(errors, home)
    documents = list(root.iterfind(q(XDSB, "DocumentResponse")))
    for dr in documents:
        hc = dr.find(q(XDSB, "HomeCommunityId"))
        if hc is None:
            hc = etree.Element(q(XDSB, "HomeCommunityId"))
            dr.insert(0, hc)
        hc.text = home
    status = status_for(errors, partial_possible=True, any_success=bool(documents))
    out = etree.Element(q(XDSB, "RetrieveDocumentSetResponse"), nsmap={"xdsb": XDSB, "xop": XOP})
    render_registry_response(status, errors, parent=out)
    for dr in documents:
        out.append(dr)
    return out


def _live_local(services: Services, ctx: RequestContext, request: ImagingRequest,
                spool: Path) -> SoapResponse | None:
    """RAD-75 root-last over the built-in source, or None when a remote Imaging Document
    Source takes part (then the consolidated store-and-forward answer)."""
    home = _home(services)
    ours, errors = split_by_home(request.documents, home)
    _local, shares = remote_imaging_shares(services, request, ours)
    if shares:
        return None
    if not ours:
        body = _as_responding(render_retrieve_document_set_response(
            ResponseStatus.FAILURE, [], [], content_id_for=lambda _d: ""), home, errors)
        return SoapResponse(body=body, cleanup=[spool])
    inner = live_response(services, replace(request, documents=tuple(ours)), spool)
    live = inner.live
    if live is None:  # nothing to stream: the plain answer
        return SoapResponse(body=_as_responding(inner.body, home, errors),
                            attachments=inner.attachments, cleanup=inner.cleanup)

    def finish() -> etree._Element:
        return _as_responding(live.finish(), home, errors)

    return SoapResponse(body=_as_responding(inner.body, home, errors), cleanup=inner.cleanup,
                        live=LiveAttachments(live.parts, finish, live.close))


def cross_gateway_retrieve_imaging(services: Services, ctx: RequestContext,
                                   body: etree._Element) -> SoapResponse:
    """RAD-75: xdsi:RetrieveImagingDocumentSetRequest -> xds-b:RetrieveDocumentSetResponse
    with the instances as MTOM attachments (streamed, root last, when so configured)."""
    home = _home(services)
    spool = ctx.spool_dir / "rad75"
    if reply_order(services.config) == ROOT_LAST:
        try:
            streamed = _live_local(services, ctx, parse_request(body), spool)
        except XdsFailure:
            streamed = None  # answered below, as always
        except Exception as exc:  # an error value, never a trace to the edge
            log.error("RAD-75 failed: %s", type(exc).__name__)
            log.debug("RAD-75 failed", exc_info=exc)
            streamed = None
        if streamed is not None:
            return streamed
    try:
        request = parse_request(body)
        status, documents, errors = retrieve_local_imaging(services, request, spool, ctx)
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
    attachments = tuple(Attachment(content_ids[id(d)], d.path, d.size, MIME_DICOM,
                                   offset=d.offset)
                        for d in documents)
    return SoapResponse(body=body_el, attachments=attachments, cleanup=[spool])
