"""homeCommunityId rules of a Responding Gateway (ITI TF-2b 3.38, 3.39; RAD TF-3 4.75).

What this module owns, and nothing else:
- which community a Cross Gateway Query names (`AdhocQuery/@home`, or the older
  `$homeCommunityId` parameter) and whether the query needs one at all: ITI TF-2b 3.38.4.1.2.1
  requires it on every query that has no patient id parameter (the Get* queries); a Responding
  Gateway answers XDSMissingHomeCommunityId when it is missing there (3.38.4.1.3) and
  XDSUnknownCommunity when it names a community that is not ours;
- the same check for one DocumentRequest of ITI-39 / RAD-75, where HomeCommunityId is required
  (ITI TF-2b 3.39.1: "the homeCommunityId parameter which is optional on the Retrieve Document
  Set transaction is required by this transaction"; RAD-75 has the semantics of RAD-69 across
  communities, RAD TF-3 4.75);
- splitting the DocumentRequests of ITI-39 / RAD-75 into ours and the errors of the others;
- stamping our homeCommunityId as the `home` attribute of every object a query returns.
Every RegistryError of a responding gateway's answer carries our homeCommunityId as its
location; the renderers do that with their `location=` argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Protocol, TypeVar

from gateway.ebrim.model import (
    AdhocQuery,
    Association,
    ExtrinsicObject,
    Identifiable,
    ObjectRef,
    RegistryPackage,
)
from gateway.errors import XdsError
from gateway.ns import ErrorCode
from gateway.registry.query_params import ParamSyntaxError, parse_value

HOME_COMMUNITY_PARAM = "$homeCommunityId"


class _Requested(Protocol):
    @property
    def home_community_id(self) -> str | None: ...
    @property
    def document_unique_id(self) -> str: ...


D = TypeVar("D", bound=_Requested)


def requested_home(query: AdhocQuery) -> str | None:
    """The homeCommunityId a query names: `@home`, else the `$homeCommunityId` parameter
    (its first value, quotes and parentheses removed); None when it names none."""
    if query.home and query.home.strip():
        return query.home.strip()
    for slot in query.parameters:
        if slot.name != HOME_COMMUNITY_PARAM:
            continue
        for raw in slot.values:
            try:
                values = parse_value(raw)
            except ParamSyntaxError:
                values = (raw.strip().strip("()").strip().strip("'"),)
            for v in values:
                if v.strip():
                    return v.strip()
    return None


def without_home_parameter(query: AdhocQuery) -> AdhocQuery:
    """The query without its `$homeCommunityId` parameter (the registry does not know it)."""
    kept = tuple(s for s in query.parameters if s.name != HOME_COMMUNITY_PARAM)
    return query if len(kept) == len(query.parameters) else replace(query, parameters=kept)


def is_patient_query(parameter_names: Iterable[str]) -> bool:
    """True when a stored query takes a patient id ($XDS...PatientId or GetAll's $patientId)."""
    return any(n == "$patientId" or n.endswith("PatientId") for n in parameter_names)


def check_query_home(query: AdhocQuery, ours: str,
                     parameters: Mapping[str, object] | None) -> XdsError | None:
    """The homeCommunityId error of a Cross Gateway Query, or None.

    `parameters` are the parameter definitions of the stored query (None when the id is not a
    known stored query: then only a wrong community is reported; the registry reports the id).
    """
    home = requested_home(query)
    if home is not None:
        if home != ours:
            return XdsError(ErrorCode.UNKNOWN_COMMUNITY,
                            f"homeCommunityId {home} is not this community ({ours})",
                            location=ours)
        return None
    if parameters is not None and not is_patient_query(parameters):
        return XdsError(ErrorCode.MISSING_HOME_COMMUNITY_ID,
                        "a Cross Gateway Query without a patient id parameter must name the "
                        "community in AdhocQuery/@home (ITI TF-2b 3.38.4.1.2.1)", location=ours)
    return None


def check_request_home(home_community_id: str | None, ours: str,
                       document_unique_id: str) -> XdsError | None:
    """The homeCommunityId error of one DocumentRequest of ITI-39 / RAD-75, or None."""
    if not home_community_id or not home_community_id.strip():
        return XdsError(ErrorCode.MISSING_HOME_COMMUNITY_ID,
                        f"document {document_unique_id}: DocumentRequest has no "
                        "HomeCommunityId; a cross-gateway retrieve requires it", location=ours)
    if home_community_id.strip() != ours:
        return XdsError(ErrorCode.UNKNOWN_COMMUNITY,
                        f"document {document_unique_id}: homeCommunityId "
                        f"{home_community_id.strip()} is not this community ({ours})",
                        location=ours)
    return None


def split_by_home(requests: Iterable[D], home: str) -> tuple[list[D], list[XdsError]]:
    """The DocumentRequests (ITI-39 or RAD-75) for our community, and the errors of the
    others (`check_request_home`)."""
    ours: list[D] = []
    errors: list[XdsError] = []
    for r in requests:
        problem = check_request_home(r.home_community_id, home, r.document_unique_id)
        if problem is None:
            ours.append(r)
        else:
            errors.append(problem)
    return ours, errors


def stamp_home(objects: Iterable[Identifiable], home: str) -> list[Identifiable]:
    """Every ExtrinsicObject, RegistryPackage, Association and ObjectRef with home=`home`."""
    out: list[Identifiable] = []
    for o in objects:
        if isinstance(o, (ExtrinsicObject, RegistryPackage, Association, ObjectRef)):
            o = replace(o, home=home)
        out.append(o)
    return out


def located(errors: Iterable[XdsError], home: str) -> list[XdsError]:
    """The errors with location = our homeCommunityId (each one's own location is dropped;
    its context names the document it is about)."""
    return [replace(e, location=home) for e in errors]
