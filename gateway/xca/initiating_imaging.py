"""The Initiating Imaging Gateway (XCA-I, RAD TF-3 4.75) at /xcai/initiating.

RAD-69 Retrieve Imaging Document Set from a local Imaging Document Consumer becomes RAD-75
Cross Gateway Retrieve Imaging Document Set: every xds-b:DocumentRequest goes to the
community its HomeCommunityId names (its [[communities]] imaging_retrieve_url); each community
gets one request holding its share of the StudyRequest/SeriesRequest tree and the original
TransferSyntaxUIDList, all communities in parallel, each bounded by
[xca] retrieve_timeout_seconds. The instances come back as MTOM parts spooled to files in the
request's spool folder and go out again from those files (`gateway.xca.initiating
.retrieve_routed`), so a study is never held in memory. A DocumentRequest without a
HomeCommunityId goes to the only community with an imaging_retrieve_url, or gets
XDSMissingHomeCommunityId; an unknown community XDSUnknownCommunity; a community that fails
XDSUnavailableCommunity for each of its documents (PartialSuccess when others answered).

With one community and a root-last reply order ([xca] response_order, else [pacs]
response_order) the instances are streamed through as they arrive instead
(`gateway.xca.initiating`, "Streaming through"); should the community fail before its root
part, an instance already passed on is matched to its DocumentRequest by the SOP Instance UID
of its DICOM file meta header (`sop_instance_uid_of`).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from lxml import etree

from gateway.config import GatewayConfig
from gateway.errors import XdsError
from gateway.ns import XDSB, XDSI, Action, ErrorCode, q
from gateway.transactions import Attachment, RequestContext, SoapResponse
from gateway.xca.initiating import (
    RetrieveRouting,
    RoutedRequest,
    communities,
    failure_response,
    retrieve_routed,
    route_homes,
)

log = logging.getLogger(__name__)


def sop_instance_uid_of(part: Attachment) -> str | None:
    """The Media Storage SOP Instance UID of a DICOM Part 10 file (its meta header only),
    None when the part is not one."""
    from pydicom.filereader import read_file_meta_info

    try:
        meta = read_file_meta_info(part.path)
        uid = str(getattr(meta, "MediaStorageSOPInstanceUID", "") or "").strip()
    except Exception as exc:  # not DICOM, truncated: unidentified
        log.debug("part %s is not a DICOM file: %s", part.content_id, type(exc).__name__)
        return None
    return uid or None


def _prune(tree: etree._Element, keep: set[int]) -> None:
    """Drop the DocumentRequests (by document-order index) not in `keep`, then the Series and
    Study requests left empty."""
    for i, d in enumerate(list(tree.iter(q(XDSB, "DocumentRequest")))):
        if i not in keep:
            parent = d.getparent()
            if parent is not None:
                parent.remove(d)
    for series in list(tree.iter(q(XDSI, "SeriesRequest"))):
        if series.find(q(XDSB, "DocumentRequest")) is None:
            parent = series.getparent()
            if parent is not None:
                parent.remove(series)
    for study in list(tree.iter(q(XDSI, "StudyRequest"))):
        if study.find(q(XDSI, "SeriesRequest")) is None:
            parent = study.getparent()
            if parent is not None:
                parent.remove(study)


def imaging_routing(config: GatewayConfig, body: etree._Element) -> RetrieveRouting:
    """Split a RAD-69 request into one RAD-75 request per community, and the errors of the
    DocumentRequests that cannot be routed."""
    if body.tag != q(XDSI, "RetrieveImagingDocumentSetRequest"):
        return RetrieveRouting([], [XdsError(
            ErrorCode.REPOSITORY_ERROR,
            f"expected xdsi:RetrieveImagingDocumentSetRequest, got {etree.QName(body).localname}")])
    requests = list(body.iter(q(XDSB, "DocumentRequest")))
    if not requests:
        return RetrieveRouting([], [XdsError(
            ErrorCode.REPOSITORY_ERROR, "RetrieveImagingDocumentSetRequest: no DocumentRequest")])
    homes = [(d.findtext(q(XDSB, "HomeCommunityId")) or "").strip() or None for d in requests]
    uids = [(d.findtext(q(XDSB, "DocumentUniqueId")) or "").strip() for d in requests]
    targets, errors = route_homes(config, homes, uids, lambda c: c.imaging_retrieve_url)
    known = communities(config)
    routed: list[RoutedRequest] = []
    for home in dict.fromkeys(t for t in targets if t is not None):
        out = copy.deepcopy(body)
        _prune(out, {i for i, t in enumerate(targets) if t == home})
        for d in out.iter(q(XDSB, "DocumentRequest")):
            if d.find(q(XDSB, "HomeCommunityId")) is None:
                hc = etree.Element(q(XDSB, "HomeCommunityId"))
                hc.text = home
                d.insert(0, hc)
        community = known[home]
        routed.append(RoutedRequest(community, community.imaging_retrieve_url, out))
    return RetrieveRouting(routed, errors)


def retrieve_imaging_document_set(services: Any, ctx: RequestContext,
                                  body: etree._Element) -> SoapResponse:
    """RAD-69 at the initiating imaging gateway: RAD-75 per community, instances streamed."""
    routing = imaging_routing(services.config, body)
    if not routing.routed:
        return failure_response(routing.errors)
    return retrieve_routed(services, ctx, routing, action=Action.RAD75, transaction="RAD-75",
                           identify=sop_instance_uid_of)


__all__ = ["imaging_routing", "retrieve_imaging_document_set", "sop_instance_uid_of"]
