"""The Responding Gateway's remote Document Registry: ITI-38 answered by ITI-18 Registry
Stored Query to this community's registry at `[community] registry_url`.

What this module owns: the ITI-18 request sent for one Cross Gateway Query (the consumer's
AdhocQueryRequest unchanged, less what only a gateway reads: the AdhocQuery `home`
attribute and the `$homeCommunityId` parameter, `gateway.xca.home`), sending it over the
process's outbound pool (mutual TLS, the request's XUA header passed on, bounded by [xca]
connect_timeout_seconds and query_timeout_seconds), the ATNA record of the sent ITI-18, and
reading the registry's AdhocQueryResponse back into model objects. The caller
(`gateway.xca.responding`) stamps our homeCommunityId on the objects and locates the errors.

A registry that cannot be reached, times out, answers a SOAP fault or something that is not
an AdhocQueryResponse gives one XDSRegistryError (ITI TF-3 4.2.4.1: the internal registry
error code, for want of a more specific one); its context says why, never a request value.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from lxml import etree

from gateway.ebrim.model import AdhocQueryResponse
from gateway.ebrim.parse import parse_adhoc_query_response
from gateway.errors import XdsError
from gateway.ns import QUERY, RIM, Action, ErrorCode, ResponseStatus, q
from gateway.soap.client import SoapReply
from gateway.transactions import RequestContext
from gateway.xca.home import HOME_COMMUNITY_PARAM
from gateway.xca.initiating import OUTCOME_SERIOUS_FAILURE, audit_outbound, failure_reason
from gateway.xca.outbound import Outcome, pool_for, run_bounded, security_headers

log = logging.getLogger(__name__)



def iti18_request(body: etree._Element) -> etree._Element:
    """A copy of an ITI-38 AdhocQueryRequest fit for the community's registry: without
    AdhocQuery/@home and the $homeCommunityId parameter."""
    out = copy.deepcopy(body)
    aq = out.find(q(RIM, "AdhocQuery"))
    if aq is not None:
        if "home" in aq.attrib:
            del aq.attrib["home"]
        for slot in list(aq.iterfind(q(RIM, "Slot"))):
            if slot.get("name") == HOME_COMMUNITY_PARAM:
                aq.remove(slot)
    return out


def read_reply(outcome: Outcome[SoapReply], timeout: float) -> AdhocQueryResponse:
    """The registry's answer as a model, or a Failure with one XDSRegistryError."""
    reply = outcome.value
    body = reply.body if outcome.ok and reply is not None else None
    reason = None
    if body is None or body.tag != q(QUERY, "AdhocQueryResponse"):
        reason = failure_reason(outcome, timeout)
    elif body.get("status") not in ResponseStatus.ALL:
        reason = "answered an AdhocQueryResponse without a known status"
    else:
        try:
            return parse_adhoc_query_response(body)
        except Exception as exc:  # an unusable answer is an error value, never a trace
            log.debug("ITI-18 answer unreadable", exc_info=exc)
            reason = f"answered an AdhocQueryResponse that cannot be read ({type(exc).__name__})"
    log.warning("ITI-18 to the community's registry: %s", reason)
    return AdhocQueryResponse(ResponseStatus.FAILURE, (), (XdsError(
        ErrorCode.REGISTRY_ERROR, f"the community's document registry {reason}"),))


def query_remote_registry(services: Any, ctx: RequestContext, body: etree._Element
                          ) -> AdhocQueryResponse:
    """ITI-18 of the Cross Gateway Query `body` to `[community] registry_url`; its answer
    (objects as the registry returned them, errors unlocated)."""
    config = services.config
    url = config.community.registry_url
    timeout = float(config.xca.query_timeout_seconds)
    request = iti18_request(body)
    headers = security_headers(config, ctx.headers)  # XUA: the consumer's assertion passed on
    pool = pool_for(config)
    outcome = run_bounded(
        [("registry", lambda: pool.call(url, Action.ITI18, request, read_timeout=timeout,
                                        headers=headers))],
        max_parallel=1, timeout=timeout)["registry"]
    audit_outbound(services, "ITI-18", url, request,
                   outcome.value.body if outcome.ok and outcome.value is not None else None,
                   None if outcome.ok else OUTCOME_SERIOUS_FAILURE, ctx)
    return read_reply(outcome, timeout)


__all__ = ["iti18_request", "query_remote_registry", "read_reply"]
