"""The initiating gateway's merged ITI-18 answer, against a fake outbound pool: patient ids back
in the consumer's terms, [registry] max_results on the whole merge (XDSTooManyResults), and
the consumer's startIndex / maxResults applied to the merged list (never sent on)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from gateway.config import GatewayConfig
from gateway.ebrim.model import AdhocQueryResponse
from gateway.ebrim.parse import parse_adhoc_query_response
from gateway.ns import RIM, DocumentEntryScheme, ErrorCode, ResponseStatus, q
from gateway.xca import initiating
from tests.support.xsd import schema_errors
from tests.unit.test_xca_initiating import (
    PATIENT,
    PATIENT_IN_C,
    FakePool,
    Services,
    answering,
    config,
    ctx,
    entry,
    find_documents,
    refusing,
)

B = "urn:oid:1.2.3.4.2"
C = "urn:oid:1.2.3.4.3"
D = "urn:oid:1.2.3.4.4"


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakePool]:
    fake = FakePool({})
    monkeypatch.setattr(initiating, "pool_for", lambda _cfg: fake)
    yield fake


def with_pid(entry_id: str, pid: str) -> etree._Element:
    el = entry(entry_id)
    etree.SubElement(el, q(RIM, "ExternalIdentifier"), id=f"{entry_id}-pid",
                     registryObject=entry_id, identificationScheme=DocumentEntryScheme.PATIENT_ID,
                     value=pid)
    return el


def limited(cfg: GatewayConfig, max_results: int) -> GatewayConfig:
    return dataclasses.replace(cfg, registry=dataclasses.replace(cfg.registry,
                                                                 max_results=max_results))


def ask(pool: FakePool, cfg: GatewayConfig, tmp_path: Path, *, start: int | None = None,
        limit: int | None = None, patient: str = PATIENT) -> tuple[AdhocQueryResponse,
                                                                  etree._Element]:
    body = find_documents(patient)
    if start is not None:
        body.set("startIndex", str(start))
    if limit is not None:
        body.set("maxResults", str(limit))
    out = initiating.stored_query(Services(cfg), ctx(tmp_path), body).body
    return parse_adhoc_query_response(out), out


def ids(resp: AdhocQueryResponse) -> list[str]:
    return [o.id for o in resp.objects]


def pids(out: etree._Element) -> dict[str, str]:
    return {str(x.get("registryObject")): str(x.get("value"))
            for x in out.iter(q(RIM, "ExternalIdentifier"))
            if x.get("identificationScheme") == DocumentEntryScheme.PATIENT_ID}


FOUR = {"2": answering(entry("urn:uuid:b1"), entry("urn:uuid:b2")),
        "3": answering(entry("urn:uuid:c1"), entry("urn:uuid:c2"))}


# --- patient ids ------------------------------------------------------------------------------

def test_merged_answer_carries_the_consumers_patient_id(pool: FakePool, tmp_path: Path) -> None:
    pool.responders = {"2": answering(with_pid("urn:uuid:b1", PATIENT)),
                       "3": answering(with_pid("urn:uuid:c1", PATIENT_IN_C))}
    cfg = config(B, C, patient_ids={C: {PATIENT: PATIENT_IN_C}})
    resp, out = ask(pool, cfg, tmp_path)
    assert resp.status == ResponseStatus.SUCCESS
    assert pids(out) == {"urn:uuid:b1": PATIENT, "urn:uuid:c1": PATIENT}
    sent = {c[0][8]: initiating.patient_ids_of(c[2]) for c in pool.calls}
    assert sent == {"2": [PATIENT], "3": [PATIENT_IN_C]}  # and C was asked in its own id


def test_shared_remote_id_is_mapped_back_to_the_id_asked_with(
        pool: FakePool, tmp_path: Path) -> None:
    other = "P2^^^&1.2.3.9&ISO"
    pool.responders = {"3": answering(with_pid("urn:uuid:c1", PATIENT_IN_C))}
    cfg = config(C, patient_ids={C: {PATIENT: PATIENT_IN_C, other: PATIENT_IN_C}})
    _, out = ask(pool, cfg, tmp_path, patient=other)
    assert pids(out) == {"urn:uuid:c1": other}


def test_unmappable_patient_id_is_left_and_never_logged_above_debug(
        pool: FakePool, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stranger = "STRANGER-9^^^&1.2.3.10&ISO"
    pool.responders = {"3": answering(with_pid("urn:uuid:c1", stranger),
                                      with_pid("urn:uuid:c2", PATIENT_IN_C))}
    cfg = config(C, patient_ids={C: {PATIENT: PATIENT_IN_C}})
    caplog.set_level(logging.DEBUG)
    resp, out = ask(pool, cfg, tmp_path)
    assert resp.status == ResponseStatus.SUCCESS
    assert pids(out) == {"urn:uuid:c1": stranger, "urn:uuid:c2": PATIENT}
    assert any("left as returned" in r.getMessage() for r in caplog.records)
    for r in caplog.records:
        if r.levelno >= logging.INFO:
            assert "STRANGER" not in r.getMessage() and "P1^" not in r.getMessage()
        assert "STRANGER" not in r.getMessage()  # not even at DEBUG


# --- [registry] max_results on the merged answer ----------------------------------------------

def test_merged_answer_over_the_limit_is_too_many_results(pool: FakePool,
                                                         tmp_path: Path) -> None:
    pool.responders = dict(FOUR)
    resp, _ = ask(pool, limited(config(B, C), 3), tmp_path)
    assert resp.status == ResponseStatus.FAILURE
    assert [e.code for e in resp.errors] == [ErrorCode.TOO_MANY_RESULTS]
    assert "4" in resp.errors[0].context and "3" in resp.errors[0].context
    assert resp.objects == ()
    assert len(pool.calls) == 2  # each community alone was under the limit


def test_merged_answer_at_the_limit_is_whole(pool: FakePool, tmp_path: Path) -> None:
    pool.responders = dict(FOUR)
    resp, _ = ask(pool, limited(config(B, C), 4), tmp_path)
    assert resp.status == ResponseStatus.SUCCESS
    assert ids(resp) == ["urn:uuid:b1", "urn:uuid:b2", "urn:uuid:c1", "urn:uuid:c2"]


def test_too_many_results_keeps_the_unavailable_community(pool: FakePool,
                                                          tmp_path: Path) -> None:
    pool.responders = {**FOUR, "4": refusing}
    resp, _ = ask(pool, limited(config(B, C, D), 3), tmp_path)
    assert resp.status == ResponseStatus.FAILURE
    assert sorted((e.code, e.location or "") for e in resp.errors) == sorted([
        (ErrorCode.UNAVAILABLE_COMMUNITY, D), (ErrorCode.TOO_MANY_RESULTS, "")])


def test_the_limit_holds_whatever_page_is_asked(pool: FakePool, tmp_path: Path) -> None:
    pool.responders = dict(FOUR)
    resp, _ = ask(pool, limited(config(B, C), 3), tmp_path, start=0, limit=2)
    assert [e.code for e in resp.errors] == [ErrorCode.TOO_MANY_RESULTS]
    assert resp.total_result_count is None


# --- startIndex / maxResults ------------------------------------------------------------------

def test_pages_of_the_merged_answer(pool: FakePool, tmp_path: Path) -> None:
    pool.responders = dict(FOUR)
    cfg = config(B, C)
    seen = []
    for start in (0, 2):
        resp, out = ask(pool, cfg, tmp_path, start=start, limit=2)
        assert resp.status == ResponseStatus.SUCCESS
        assert (resp.start_index, resp.total_result_count) == (start, 4)
        assert schema_errors(out) == []
        seen.extend(ids(resp))
    assert seen == ["urn:uuid:b1", "urn:uuid:b2", "urn:uuid:c1", "urn:uuid:c2"]
    resp, _ = ask(pool, cfg, tmp_path, start=1, limit=2)
    assert ids(resp) == ["urn:uuid:b2", "urn:uuid:c1"]  # a page across two communities


def test_paging_attributes_are_not_sent_to_the_communities(pool: FakePool,
                                                           tmp_path: Path) -> None:
    pool.responders = dict(FOUR)
    ask(pool, config(B, C), tmp_path, start=1, limit=1)
    assert len(pool.calls) == 2
    for _url, _action, body in pool.calls:
        assert body.get("startIndex") is None and body.get("maxResults") is None


def test_no_paging_asked_leaves_the_answer_as_before(pool: FakePool, tmp_path: Path) -> None:
    pool.responders = dict(FOUR)
    resp, out = ask(pool, config(B, C), tmp_path)
    assert len(resp.objects) == 4
    assert out.get("startIndex") is None and out.get("totalResultCount") is None


def test_page_past_the_end_and_max_results_zero(pool: FakePool, tmp_path: Path) -> None:
    pool.responders = dict(FOUR)
    resp, _ = ask(pool, config(B, C), tmp_path, start=9)
    assert (resp.status, resp.objects, resp.total_result_count) == (
        ResponseStatus.SUCCESS, (), 4)
    resp, _ = ask(pool, config(B, C), tmp_path, limit=0)
    assert (resp.objects, resp.start_index, resp.total_result_count) == ((), 0, 4)


def test_paging_with_an_unavailable_community_is_partial(pool: FakePool,
                                                         tmp_path: Path) -> None:
    pool.responders = {**FOUR, "4": refusing}
    resp, out = ask(pool, config(B, C, D), tmp_path, start=3, limit=5)
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert ids(resp) == ["urn:uuid:c2"] and resp.total_result_count == 4
    assert [(e.code, e.location) for e in resp.errors] == [
        (ErrorCode.UNAVAILABLE_COMMUNITY, D)]
    assert schema_errors(out) == []


def test_bad_paging_is_refused_before_anyone_is_asked(pool: FakePool, tmp_path: Path) -> None:
    for start, limit in ((-1, None), (None, -3)):
        resp, _ = ask(pool, config(B, C), tmp_path, start=start, limit=limit)
        assert resp.status == ResponseStatus.FAILURE
        assert [e.code for e in resp.errors] == [ErrorCode.REGISTRY_ERROR]
    assert pool.calls == []
