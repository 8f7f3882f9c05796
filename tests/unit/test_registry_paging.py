"""ebRS 3.0 iterative queries: startIndex / maxResults of an AdhocQueryRequest, in the pure
helper (gateway.ebrim.paging) and in the registry's ITI-18, with [registry] max_results."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from gateway.ebrim import build
from gateway.ebrim.metadata import unique_id
from gateway.ebrim.model import AdhocQuery, ExtrinsicObject, Slot
from gateway.ebrim.paging import NO_LIMIT, Paging, page, paging_of, response_attributes
from gateway.ebrim.parse import parse_adhoc_query_request, parse_adhoc_query_response
from gateway.ebrim.render import render_adhoc_query_request
from gateway.errors import XdsFailure
from gateway.ns import Action, ErrorCode, ResponseStatus, StoredQuery
from gateway.registry import handlers
from gateway.services import Services
from gateway.transactions import RequestContext
from tests.support.services import NIST_XCA_AUTHORITY, community_services
from tests.support.xsd import schema_errors

PID = f"PAGE-1^^^&{NIST_XCA_AUTHORITY}&ISO"
ROOT = "1.3.6.1.4.1.21367.2017.9.77"


# --- the pure helper -------------------------------------------------------------------------

@pytest.mark.parametrize(("start", "limit", "expected"), [
    (0, NO_LIMIT, [0, 1, 2, 3, 4]),
    (0, 2, [0, 1]),
    (2, 2, [2, 3]),
    (3, 10, [3, 4]),
    (4, NO_LIMIT, [4]),
    (5, 1, []),
    (99, NO_LIMIT, []),
    (1, 0, []),
])
def test_page_slices(start: int, limit: int, expected: list[int]) -> None:
    assert page(list(range(5)), Paging(start, limit)) == expected


def test_paging_is_read_from_the_request_and_checked() -> None:
    def parsed(**attrs: str) -> AdhocQuery:
        body = render_adhoc_query_request(AdhocQuery(query_id=StoredQuery.FIND_DOCUMENTS))
        for k, v in attrs.items():
            body.set(k, v)
        return parse_adhoc_query_request(body)

    assert paging_of(parsed()) == Paging(0, NO_LIMIT)
    assert not paging_of(parsed()).requested
    assert paging_of(parsed(startIndex="3", maxResults="7")) == Paging(3, 7)
    assert paging_of(parsed(maxResults="0")).requested
    for attrs in ({"startIndex": "-1"}, {"maxResults": "-2"}):
        with pytest.raises(XdsFailure) as info:
            paging_of(parsed(**attrs))
        assert [e.code for e in info.value.errors] == [ErrorCode.REGISTRY_ERROR]
    with pytest.raises(XdsFailure):  # not an integer: the parser's own error
        parsed(startIndex="first")


def test_response_attributes_only_when_paged() -> None:
    assert response_attributes(Paging(), 12) == (None, None)
    assert response_attributes(Paging(0, 5), 12) == (0, 12)
    assert response_attributes(Paging(10, NO_LIMIT), 12) == (10, 12)


# --- the registry's ITI-18 -------------------------------------------------------------------

CODE = build.CodeValue("X", "1.2.3", "x")


def entry_values(n: int) -> build.DocumentEntryValues:
    return build.DocumentEntryValues(
        unique_id=f"{ROOT}.{n}", patient_id=PID, source_patient_id="S-1^^^&1.2.3&ISO",
        mime_type="text/plain", title=f"doc {n}", class_code=CODE, type_code=CODE,
        format_code=CODE, confidentiality_code=CODE, healthcare_facility_type_code=CODE,
        practice_setting_code=CODE, creation_time=f"2020010100000{n}")


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    services, _spool = community_services(tmp_path, "urn:oid:1.2.3.4.1", "1.2.3.4.1.1")
    entries = []
    for n in range(5):
        e = build.document_entry(entry_values(n))
        slots = (*e.slots, Slot("hash", (f"{n:040x}",)), Slot("size", ("10",)),
                 Slot("repositoryUniqueId", ("1.2.3.4.1.1",)))
        entries.append(dataclasses.replace(e, slots=slots))
    sub = build.submission(build.SubmissionSetValues(
        unique_id=f"{ROOT}.100", source_id=ROOT, patient_id=PID, content_type_code=CODE),
        tuple(entries))
    assert handlers.register(services, sub) == []
    yield services
    services.registry.close()


def ctx(tmp_path: Path) -> RequestContext:
    return RequestContext("/xds/registry", Action.ITI18, None, None, {}, tmp_path)


def find(start: int | None = None, limit: int | None = None) -> etree._Element:
    body = render_adhoc_query_request(AdhocQuery(
        query_id=StoredQuery.FIND_DOCUMENTS, return_type="LeafClass", parameters=(
            Slot("$XDSDocumentEntryPatientId", (f"'{PID}'",)),
            Slot("$XDSDocumentEntryStatus",
                 ("('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')",)))))
    if start is not None:
        body.set("startIndex", str(start))
    if limit is not None:
        body.set("maxResults", str(limit))
    return body


def uids(resp_el: etree._Element) -> list[str]:
    resp = parse_adhoc_query_response(resp_el)
    return [unique_id(o) or "" for o in resp.objects if isinstance(o, ExtrinsicObject)]


def test_registry_without_paging_answers_everything_as_before(
        services: Services, tmp_path: Path) -> None:
    body = handlers.stored_query(services, ctx(tmp_path), find()).body
    assert len(uids(body)) == 5
    assert body.get("startIndex") is None and body.get("totalResultCount") is None


def test_registry_pages_in_a_stable_order(services: Services, tmp_path: Path) -> None:
    everything = uids(handlers.stored_query(services, ctx(tmp_path), find()).body)
    pages = []
    for start in (0, 2, 4):
        body = handlers.stored_query(services, ctx(tmp_path), find(start, 2)).body
        resp = parse_adhoc_query_response(body)
        assert resp.status == ResponseStatus.SUCCESS
        assert (resp.start_index, resp.total_result_count) == (start, 5)
        assert schema_errors(body) == []
        pages.append(uids(body))
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [u for p in pages for u in p] == everything  # the pages put together: the whole


def test_registry_page_past_the_end_and_zero_results(services: Services,
                                                     tmp_path: Path) -> None:
    body = handlers.stored_query(services, ctx(tmp_path), find(7, 3)).body
    resp = parse_adhoc_query_response(body)
    assert (resp.status, resp.objects, resp.total_result_count) == (
        ResponseStatus.SUCCESS, (), 5)
    body = handlers.stored_query(services, ctx(tmp_path), find(None, 0)).body
    resp = parse_adhoc_query_response(body)
    assert (resp.objects, resp.start_index, resp.total_result_count) == ((), 0, 5)


def test_registry_bad_paging_is_a_registry_error(services: Services, tmp_path: Path) -> None:
    for body in (find(-1, None), find(None, -5)):
        resp = parse_adhoc_query_response(
            handlers.stored_query(services, ctx(tmp_path), body).body)
        assert resp.status == ResponseStatus.FAILURE
        assert [e.code for e in resp.errors] == [ErrorCode.REGISTRY_ERROR]


def test_registry_limit_applies_to_the_whole_result_not_the_page(
        services: Services, tmp_path: Path) -> None:
    limited = dataclasses.replace(services, config=dataclasses.replace(
        services.config, registry=dataclasses.replace(services.config.registry,
                                                      max_results=4)))
    resp = parse_adhoc_query_response(
        handlers.stored_query(limited, ctx(tmp_path), find(0, 2)).body)
    assert resp.status == ResponseStatus.FAILURE
    assert [e.code for e in resp.errors] == [ErrorCode.TOO_MANY_RESULTS]
    assert resp.objects == () and resp.total_result_count is None
