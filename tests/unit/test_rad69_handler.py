"""The RAD-69 handler with the PACS replaced by fakes: response shape, statuses, errors per
document, spool cleanup."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.dicom.errors import PacsError
from gateway.dicom.retrieve import InstanceRef, Received, RetrieveOutcome
from gateway.ebrim.parse import parse_retrieve_document_set_response
from gateway.imaging import rad69
from gateway.imaging.plan import Resolution
from gateway.imaging.request import ImagingDocumentRequest, Wado
from gateway.ns import ResponseStatus
from gateway.transactions import RequestContext
from tests.support.rad69 import EXPLICIT_LE, NIST_SOURCE, rad69_request
from tests.unit.test_rad69_request import services

HOME = "urn:oid:1.3.6.1.4.1.21367.13.70.101"
DOCS = [("1.1", "1.1.1", "1.1.1.1"), ("1.1", "1.1.1", "1.1.1.2"), ("1.1", "1.1.1", "1.1.1.3")]


def ctx(tmp_path: Path) -> RequestContext:
    spool = tmp_path / "req"
    spool.mkdir()
    return RequestContext("/xdsi/imaging-source", "a", None, None, {}, spool)


def fake_resolve(_pacs: Any, docs: list[ImagingDocumentRequest], **_: Any) -> Resolution:
    return Resolution(found=[(InstanceRef(d.study_uid, d.series_uid, d.document_unique_id,
                                          "1.2.840.10008.5.1.4.1.1.2"), d) for d in docs])


def install(monkeypatch: pytest.MonkeyPatch, received_ts: dict[str, str],
            error: PacsError | None = None) -> list[Path]:
    made: list[Path] = []

    def fake_retrieve(_pacs: Any, refs: list[InstanceRef], syntaxes: Any, spool: Path,
                      **_: Any) -> RetrieveOutcome:
        spool.mkdir(parents=True, exist_ok=True)
        out = RetrieveOutcome(error=error)
        for r in refs:
            ts = received_ts.get(r.sop_instance_uid)
            if ts is None:
                out.missing[r.sop_instance_uid] = "not sent"
                continue
            p = spool / f"{r.sop_instance_uid}.dcm"
            p.write_bytes(b"x" * 10)
            made.append(p)
            out.received[r.sop_instance_uid] = Received(r.sop_instance_uid, p, ts, 10)
        return out

    monkeypatch.setattr(rad69, "resolve", fake_resolve)
    monkeypatch.setattr("gateway.dicom.retrieve.retrieve", fake_retrieve)
    return made


def run(tmp_path: Path, body: Any) -> Any:
    resp = rad69.retrieve_imaging_document_set(services(tmp_path), ctx(tmp_path), body)
    return resp, parse_retrieve_document_set_response(resp.body)


def test_success_with_home_community_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, {d[2]: EXPLICIT_LE for d in DOCS})
    resp, parsed = run(tmp_path, rad69_request(DOCS, [EXPLICIT_LE], home_community_id=HOME))
    assert parsed.status == ResponseStatus.SUCCESS
    assert [d.document_unique_id for d in parsed.documents] == [d[2] for d in DOCS]
    for d in parsed.documents:
        assert d.home_community_id == HOME
        assert d.repository_unique_id == NIST_SOURCE
        assert d.mime_type == "application/dicom"
    assert {a.content_id for a in resp.attachments} == {d.content_id for d in parsed.documents}
    assert resp.cleanup == [tmp_path / "req" / "rad69"]


def test_partial_success_and_transfer_syntax_errors(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    made = install(monkeypatch, {"1.1.1.1": EXPLICIT_LE, "1.1.1.2": "1.2.840.10008.1.2.4.91"})
    _resp, parsed = run(tmp_path, rad69_request(DOCS, [EXPLICIT_LE]))
    assert parsed.status == ResponseStatus.PARTIAL_SUCCESS
    assert [d.document_unique_id for d in parsed.documents] == ["1.1.1.1"]
    assert parsed.documents[0].home_community_id is None
    errors = {e.location: e.code for e in parsed.errors}
    assert errors == {"1.1.1.2": Wado.TS_NOT_PROVIDED, "1.1.1.3": Wado.TS_NOT_PROVIDED}
    assert not made[1].exists()  # the instance in the wrong syntax is not kept


def test_pacs_aborts_mid_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, {"1.1.1.1": EXPLICIT_LE}, PacsError("aborted", "association aborted"))
    _resp, parsed = run(tmp_path, rad69_request(DOCS, [EXPLICIT_LE]))
    assert parsed.status == ResponseStatus.PARTIAL_SUCCESS
    assert {e.code for e in parsed.errors} == {Wado.PROCESSING_FAILURE}
    assert all("aborted" in e.context for e in parsed.errors)


def test_pacs_unreachable_for_cfind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(*_a: Any, **_k: Any) -> Resolution:
        raise PacsError("unreachable", "cannot connect to 127.0.0.1:1")

    monkeypatch.setattr(rad69, "resolve", down)
    _resp, parsed = run(tmp_path, rad69_request(DOCS, [EXPLICIT_LE]))
    assert parsed.status == ResponseStatus.FAILURE
    assert {e.code for e in parsed.errors} == {"XDSRepositoryError"}
    assert len(parsed.errors) == 3


def test_wrong_repository_is_failure_without_pacs(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*_a: Any, **_k: Any) -> Resolution:
        raise AssertionError("the PACS must not be asked")

    monkeypatch.setattr(rad69, "resolve", never)
    _resp, parsed = run(tmp_path, rad69_request(DOCS[:1], [EXPLICIT_LE], repository="1.2.9"))
    assert parsed.status == ResponseStatus.FAILURE
    assert [e.code for e in parsed.errors] == ["XDSUnknownRepositoryId"]


@pytest.mark.parametrize("order", ["root-first", "root-last"])
def test_unverified_documents_that_do_not_come_are_looked_up(
        order: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Documents taken without a C-FIND (a whole series, gateway.imaging.plan) that the PACS
    did not send at SERIES level while it answered normally: looked up then; one that is
    where the request says (here: of a SOP class the study query did not list) is fetched
    again at IMAGE level with the class the lookup gave, one that is not (here: unknown) gets
    the error of its identifiers instead of a transfer syntax error."""
    calls: list[tuple[list[str], list[str], set[Any]]] = []

    def fake_retrieve(_pacs: Any, refs: list[InstanceRef], syntaxes: Any, spool: Path,
                      **kw: Any) -> RetrieveOutcome:
        calls.append(([r.sop_instance_uid for r in refs], [r.sop_class_uid for r in refs],
                      set(kw.get("whole_series", ()))))
        spool.mkdir(parents=True, exist_ok=True)
        out = RetrieveOutcome()
        for r in refs:
            # Round 1 (SERIES level) brings 1.1.1.1 only; round 2 brings 1.1.1.3.
            if r.sop_instance_uid == ("1.1.1.1" if len(calls) == 1 else "1.1.1.3"):
                p = spool / f"{r.sop_instance_uid}.dcm"
                p.write_bytes(b"x" * 10)
                rec = Received(r.sop_instance_uid, p, EXPLICIT_LE, 10)
                out.received[r.sop_instance_uid] = rec
                if kw.get("on_received") is not None:
                    kw["on_received"](rec)
            else:
                out.missing[r.sop_instance_uid] = "SERIES-level C-GET failed with status 0xA900"
        return out

    def unverified_resolve(_pacs: Any, docs: list[ImagingDocumentRequest],
                           **_: Any) -> Resolution:
        res = fake_resolve(_pacs, docs)
        res.unverified = {d.document_unique_id for d in docs}
        res.whole_series = {("1.1", "1.1.1")}
        return res

    looked_up: list[list[str]] = []

    def fake_explain(_pacs: Any, docs: list[ImagingDocumentRequest], *_a: Any) -> Resolution:
        from gateway.imaging.plan import _missing

        looked_up.append([d.document_unique_id for d in docs])
        return Resolution(
            found=[(InstanceRef(d.study_uid, d.series_uid, d.document_unique_id, "1.2.3"), d)
                   for d in docs if d.document_unique_id == "1.1.1.3"],
            errors=[e for d in docs if d.document_unique_id == "1.1.1.2"
                    for e in _missing(d, Wado.DOCUMENT_UNKNOWN, "SOP Instance UID not known")])

    monkeypatch.setattr(rad69, "resolve", unverified_resolve)
    monkeypatch.setattr(rad69, "explain", fake_explain)
    monkeypatch.setattr("gateway.dicom.retrieve.retrieve", fake_retrieve)
    svc = services(tmp_path)
    svc.config.pacs.__dict__["response_order"] = order  # frozen dataclass: test only
    resp = rad69.retrieve_imaging_document_set(svc, ctx(tmp_path),
                                               rad69_request(DOCS, [EXPLICIT_LE]))
    assert (resp.live is not None) == (order == "root-last")
    if resp.live is not None:
        sent = [att.content_id for att in resp.live.parts]
        body = resp.live.finish()
        resp.live.close()
        assert len(sent) == 2
    else:
        body = resp.body
    parsed = parse_retrieve_document_set_response(body)
    assert parsed.status == ResponseStatus.PARTIAL_SUCCESS
    assert sorted(d.document_unique_id for d in parsed.documents) == ["1.1.1.1", "1.1.1.3"]
    assert looked_up == [["1.1.1.2", "1.1.1.3"]]
    assert calls == [([d[2] for d in DOCS], ["1.2.840.10008.5.1.4.1.1.2"] * 3,
                      {("1.1", "1.1.1")}),
                     (["1.1.1.3"], ["1.2.3"], set())]  # IMAGE level, the looked-up class
    assert {(e.location, e.code) for e in parsed.errors} == {
        ("1.1.1.2", Wado.DOCUMENT_UNKNOWN), ("1.1.1.2", "XDSMissingDocument")}


def test_unverified_documents_are_not_looked_up_after_a_pacs_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The retrieve failed at association level: nothing more is asked of that PACS (it may
    hang); the documents that did not come are processing failures."""
    install(monkeypatch, {"1.1.1.1": EXPLICIT_LE}, PacsError("aborted", "connection reset"))

    def unverified_resolve(_pacs: Any, docs: list[ImagingDocumentRequest],
                           **_: Any) -> Resolution:
        res = fake_resolve(_pacs, docs)
        res.unverified = {d.document_unique_id for d in docs}
        return res

    def no_explain(*_a: Any) -> Resolution:
        raise AssertionError("looked up after a PACS failure")

    monkeypatch.setattr(rad69, "resolve", unverified_resolve)
    monkeypatch.setattr(rad69, "explain", no_explain)
    _resp, parsed = run(tmp_path, rad69_request(DOCS, [EXPLICIT_LE]))
    assert parsed.status == ResponseStatus.PARTIAL_SUCCESS
    assert {(e.location, e.code) for e in parsed.errors} == {
        ("1.1.1.2", Wado.PROCESSING_FAILURE), ("1.1.1.3", Wado.PROCESSING_FAILURE)}
