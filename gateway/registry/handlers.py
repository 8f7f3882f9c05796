"""Document Registry transactions: ITI-42 Register Document Set-b and ITI-18 Registry Stored
Query, as handlers of the SOAP edge (`handler(services, ctx, body) -> SoapResponse`).

Both answer XDS errors as values: whatever fails (parse, validation, a conflict in the
store) becomes a response with status Failure and its RegistryErrorList, never an exception
to the edge. The plain functions behind them are for other actors of this process:
`register(services, submission)` (ITI-41 after the repository stored the documents) and
`execute_stored_query(services, query)` (the responding gateway of ITI-38).

ITI-18 applies the request's startIndex / maxResults (ebRS 3.0 iterative query,
`gateway.ebrim.paging`) after the [registry] max_results bound: a query matching more than
max_results objects fails with XDSTooManyResults whatever page it asks for; otherwise the
answer holds the asked slice, with startIndex and totalResultCount when the client paged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from lxml import etree

from gateway.ebrim.metadata import classify_submission, patient_id
from gateway.ebrim.model import (
    AdhocQuery,
    Association,
    ExtrinsicObject,
    Identifiable,
    ObjectRef,
    RegistryPackage,
    SubmitObjectsRequest,
)
from gateway.ebrim.paging import page, paging_of, response_attributes
from gateway.ebrim.parse import parse_adhoc_query_request, parse_submit_objects_request
from gateway.ebrim.render import render_adhoc_query_response, render_registry_response
from gateway.ebrim.validation import assign_uuids, validate_submission
from gateway.errors import XdsError, XdsFailure, status_for
from gateway.ns import AvailabilityStatus, ErrorCode, ResponseStatus, ReturnType
from gateway.registry.stored_queries import QUERIES
from gateway.transactions import RequestContext, SoapResponse

if TYPE_CHECKING:
    from gateway.services import Services

log = logging.getLogger(__name__)


def _internal_error(what: str, exc: BaseException) -> XdsError:
    # No message text: it may carry patient data. The type and traceback go to DEBUG.
    log.error("%s failed: %s", what, type(exc).__name__)
    log.debug("%s failed", what, exc_info=exc)
    return XdsError(ErrorCode.REGISTRY_ERROR, f"{what} failed: internal registry error")


# --- ITI-42 ---------------------------------------------------------------------------------

def assigning_authority(cx: str) -> str | None:
    """The universal id (OID) of a CX patient id `id^^^&OID&ISO`, or None."""
    parts = cx.split("^")
    if len(parts) < 4:
        return None
    hd = parts[3].split("&")
    return hd[1] if len(hd) > 1 and hd[1] else None


def _check_patient_ids(services: Services, sub: SubmitObjectsRequest) -> list[XdsError]:
    authority = services.config.community.patient_id_assigning_authority
    if not authority:
        return []
    classified = classify_submission(sub.objects)
    objs: list[ExtrinsicObject | RegistryPackage] = []
    if classified.submission_set is not None:
        objs.append(classified.submission_set)
    objs.extend(classified.document_entries)
    objs.extend(classified.folders)
    errors: list[XdsError] = []
    for obj in objs:
        pid = patient_id(obj)
        if pid and assigning_authority(pid) != authority:
            errors.append(XdsError(
                ErrorCode.UNKNOWN_PATIENT_ID,
                f"the patient id of {obj.id} is not issued by this affinity domain's "
                f"assigning authority {authority}"))
    return errors


def _approve(objects: Sequence[Identifiable]) -> list[Identifiable]:
    out: list[Identifiable] = []
    for o in objects:
        if isinstance(o, (ExtrinsicObject, RegistryPackage, Association)):
            o = replace(o, status=AvailabilityStatus.APPROVED)
        out.append(o)
    return out


def register(services: Services, sub: SubmitObjectsRequest) -> list[XdsError]:
    """Validate (registry rules) and store one submission; the errors and warnings.

    Any error in the result means nothing was stored. Raises nothing for XDS problems.
    """
    try:
        found = validate_submission(sub, repository=False)
        if any(e.is_error for e in found):
            return list(found)
        pid_errors = _check_patient_ids(services, sub)
        if pid_errors:
            return [*found, *pid_errors]
        sub = assign_uuids(sub)
        services.registry.submit(_approve(sub.objects))
        return list(found)
    except XdsFailure as failure:
        return list(failure.errors)
    except Exception as exc:  # an error value, never a trace to the edge
        return [_internal_error("registration", exc)]


def register_document_set(services: Services, ctx: RequestContext,
                          body: etree._Element) -> SoapResponse:
    """ITI-42: lcm:SubmitObjectsRequest -> rs:RegistryResponse."""
    try:
        sub = parse_submit_objects_request(body)
        errors = register(services, sub)
    except XdsFailure as failure:
        errors = list(failure.errors)
    except Exception as exc:
        errors = [_internal_error("ITI-42", exc)]
    return SoapResponse(render_registry_response(status_for(errors), errors))


# --- ITI-18 ---------------------------------------------------------------------------------

def execute_stored_query(services: Services, query: AdhocQuery) -> list[Identifiable]:
    """Run one stored query; the objects (LeafClass) or ObjectRefs. Raises XdsFailure."""
    definition = QUERIES.get(query.query_id)
    if definition is None:
        raise XdsFailure(XdsError(ErrorCode.UNKNOWN_STORED_QUERY,
                                  f"unknown stored query id {query.query_id!r}"))
    if definition.run is None:
        raise XdsFailure(XdsError(
            ErrorCode.REGISTRY_ERROR,
            f"stored query {definition.name} ({definition.query_id}) is not supported by "
            "this registry yet"))
    return_type = query.return_type
    if return_type == "RegistryObject":  # the ebRS default when ResponseOption omits it
        return_type = ReturnType.LEAF_CLASS
    if return_type not in (ReturnType.LEAF_CLASS, ReturnType.OBJECT_REF):
        raise XdsFailure(XdsError(
            ErrorCode.REGISTRY_ERROR,
            f"returnType {query.return_type!r} is not supported (LeafClass or ObjectRef)"))
    params = definition.parse(query.parameters)
    max_results = services.config.registry.max_results
    found = definition.run(services.registry, params, max_results + 1)
    if len(found) > max_results:
        raise XdsFailure(XdsError(
            ErrorCode.TOO_MANY_RESULTS,
            f"{definition.name} matches more than {max_results} objects; narrow the query"))
    if definition.single_patient and return_type == ReturnType.LEAF_CLASS:
        patients = {pid for o in found if not isinstance(o, Association)
                    and (pid := patient_id(o)) is not None}
        if len(patients) > 1:
            raise XdsFailure(XdsError(
                ErrorCode.RESULT_NOT_SINGLE_PATIENT,
                f"{definition.name}: the objects asked for belong to {len(patients)} "
                "patients; ask for ObjectRef or for one patient's objects"))
    if return_type == ReturnType.OBJECT_REF:
        return [ObjectRef(o.id, o.home) for o in found]
    return list(found)


def stored_query(services: Services, ctx: RequestContext,
                 body: etree._Element) -> SoapResponse:
    """ITI-18: query:AdhocQueryRequest -> query:AdhocQueryResponse."""
    errors: list[XdsError]
    try:
        query = parse_adhoc_query_request(body)
        paging = paging_of(query)  # before the store is asked: a bad value costs nothing
        found = execute_stored_query(services, query)
        start_index, total = response_attributes(paging, len(found))
        return SoapResponse(render_adhoc_query_response(
            ResponseStatus.SUCCESS, page(found, paging), [], start_index=start_index,
            total_result_count=total))
    except XdsFailure as failure:
        errors = list(failure.errors)
    except Exception as exc:
        errors = [_internal_error("ITI-18", exc)]
    return SoapResponse(render_adhoc_query_response(status_for(errors), [], errors))
