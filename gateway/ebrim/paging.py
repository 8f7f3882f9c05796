"""Iterative queries (ebRS 3.0): the startIndex / maxResults of a query:AdhocQueryRequest
applied to a result list, and the startIndex / totalResultCount of the answer.

ebRS 3.0 (query.xsd) gives AdhocQueryRequest two optional attributes: startIndex (default 0,
the zero-based index of the first result to return) and maxResults (default -1: no limit set
by the client). The AdhocQueryResponse says which slice it holds with startIndex and the size
of the whole result with totalResultCount (optional). Pure: no I/O; the registry's ITI-18 and
the initiating gateway's merged ITI-18 both use it, after their own [registry] max_results
bound (XDSTooManyResults) on the whole result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from gateway.ebrim.model import AdhocQuery
from gateway.errors import XdsError, XdsFailure
from gateway.ns import ErrorCode

T = TypeVar("T")

NO_LIMIT = -1


@dataclass(frozen=True)
class Paging:
    """The slice a client asked for; `requested` is False when it named neither attribute."""

    start_index: int = 0
    max_results: int = NO_LIMIT

    @property
    def requested(self) -> bool:
        return self.start_index != 0 or self.max_results != NO_LIMIT


def paging_of(query: AdhocQuery) -> Paging:
    """The validated paging of a parsed request; raises XdsFailure (XDSRegistryError) for a
    negative startIndex or a maxResults below -1."""
    if query.start_index < 0:
        raise XdsFailure(XdsError(
            ErrorCode.REGISTRY_ERROR,
            f"AdhocQueryRequest startIndex={query.start_index}: expected 0 or more"))
    if query.max_results < NO_LIMIT:
        raise XdsFailure(XdsError(
            ErrorCode.REGISTRY_ERROR,
            f"AdhocQueryRequest maxResults={query.max_results}: expected -1 (no limit) or "
            "0 or more"))
    return Paging(query.start_index, query.max_results)


def page(items: Sequence[T], paging: Paging) -> list[T]:
    """The items from startIndex on, at most maxResults of them (all with -1); a startIndex
    past the end gives none."""
    start = paging.start_index
    if paging.max_results == NO_LIMIT:
        return list(items[start:])
    return list(items[start:start + paging.max_results])


def response_attributes(paging: Paging, total: int) -> tuple[int | None, int | None]:
    """The answer's (startIndex, totalResultCount) for `render_adhoc_query_response`: both
    set when the client paged, (None, None) otherwise (the answer then looks as it always
    did)."""
    if not paging.requested:
        return None, None
    return paging.start_index, total


__all__ = ["NO_LIMIT", "Paging", "page", "paging_of", "response_attributes"]
