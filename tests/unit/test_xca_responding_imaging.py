"""Responding Imaging Gateway (RAD-75) without a PACS: the homeCommunityId and repository
checks, and the consolidation of what the RAD-69 machinery returns (its C-FIND resolution and
retrieve are replaced here by fakes; the real ones run against Orthanc in
tests/conformance/test_xca_nist.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from lxml import etree

from gateway.config import from_dict
from gateway.dicom.errors import PacsError
from gateway.dicom.retrieve import InstanceRef
from gateway.ebrim.model import RetrievedDocument
from gateway.ebrim.parse import parse_retrieve_document_set_response
from gateway.ebrim.xmlsafe import parse_xml
from gateway.errors import XdsError
from gateway.imaging import rad69
from gateway.imaging.plan import Resolution
from gateway.imaging.request import ImagingDocumentRequest
from gateway.ns import XDSI, Action, ErrorCode, ResponseStatus, q
from gateway.services import Services
from gateway.transactions import RequestContext
from gateway.xca import responding_imaging
from tests.support.rad69 import EXPLICIT_LE, rad69_request
from tests.support.xsd import assert_valid

HOME = "urn:oid:1.3.6.1.4.1.21367.13.70.201"
SOURCE = "1.3.6.1.4.1.21367.13.71.201.1"
OTHER_SOURCE = "1.3.6.1.4.1.21367.13.71.201.2"
STUDY, SERIES = "1.2.3.1", "1.2.3.2"


def _services(tmp_path: Path) -> Services:
    cfg = from_dict({
        "tls": {"enabled": False, "require_client_certificate": False},
        "community": {"home_community_id": HOME, "repository_unique_id": "1.2.3.9",
                      "imaging_source_unique_id": SOURCE,
                      "patient_id_assigning_authority": "1.2.3.10"},
        "registry": {"database": f"sqlite:///{tmp_path / 'registry.db'}"},
        "repository": {"directory": str(tmp_path / "repository")},
    }, base=tmp_path)
    return Services(config=cfg, registry=None, documents=None)  # type: ignore[arg-type]


def _call(tmp_path: Path, body: etree._Element):
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    ctx = RequestContext(endpoint="/xcai/responding", action=Action.RAD75,
                         message_id=f"urn:uuid:{uuid.uuid4()}", client_subject=None,
                         attachments={}, spool_dir=spool)
    resp = responding_imaging.cross_gateway_retrieve_imaging(
        _services(tmp_path), ctx, parse_xml(etree.tostring(body)))
    assert_valid(resp.body)
    assert resp.cleanup == [spool / "rad75"]
    return resp, parse_retrieve_document_set_response(resp.body)


class FakePacs:
    """resolve() finds every instance whose SOP Instance UID does not end in .404; fetch()
    writes a small file for each found one."""

    def __init__(self) -> None:
        self.resolved: list[str] = []

    def resolve(self, _pacs: object, docs: list[ImagingDocumentRequest]) -> Resolution:
        out = Resolution()
        for d in docs:
            self.resolved.append(d.document_unique_id)
            if d.document_unique_id.endswith(".404"):
                out.errors.append(XdsError(ErrorCode.MISSING_DOCUMENT, "not known",
                                           location=d.document_unique_id))
            else:
                out.found.append((InstanceRef(d.study_uid, d.series_uid, d.document_unique_id,
                                              "1.2.840.10008.5.1.4.1.1.1"), d))
        return out

    def fetch(self, _services: object, resolution: Resolution, syntaxes: tuple[str, ...],
              spool: Path) -> tuple[list[RetrievedDocument], list[XdsError]]:
        assert syntaxes == (EXPLICIT_LE,)
        spool.mkdir(parents=True, exist_ok=True)
        docs = []
        for ref, d in resolution.found:
            path = spool / ref.sop_instance_uid
            path.write_bytes(b"DICM" + ref.sop_instance_uid.encode())
            docs.append(RetrievedDocument(d.repository_unique_id, d.document_unique_id,
                                          "application/dicom", path, path.stat().st_size,
                                          d.home_community_id))
        return docs, []


@pytest.fixture
def pacs(monkeypatch: pytest.MonkeyPatch) -> FakePacs:
    fake = FakePacs()
    monkeypatch.setattr(rad69, "resolve", fake.resolve)  # the local source's steps
    monkeypatch.setattr(rad69, "fetch", fake.fetch)
    return fake


def _request(*docs: tuple[str, str, str | None]) -> etree._Element:
    """(SOP Instance UID, RepositoryUniqueId, HomeCommunityId) in one series."""
    parts = [rad69_request([(STUDY, SERIES, sop)], [EXPLICIT_LE], repository=repo,
                           home_community_id=home) for sop, repo, home in docs]
    root = parts[0]
    series = root.find(f"{q(XDSI, 'StudyRequest')}/{q(XDSI, 'SeriesRequest')}")
    assert series is not None
    for other in parts[1:]:
        series.extend(other.iter("{urn:ihe:iti:xds-b:2007}DocumentRequest"))
    return root


def test_all_ours_success(tmp_path: Path, pacs: FakePacs) -> None:
    resp, parsed = _call(tmp_path, _request(("1.2.3.3.1", SOURCE, HOME),
                                            ("1.2.3.3.2", SOURCE, HOME)))
    assert parsed.status == ResponseStatus.SUCCESS
    assert [d.document_unique_id for d in parsed.documents] == ["1.2.3.3.1", "1.2.3.3.2"]
    assert all(d.home_community_id == HOME and d.repository_unique_id == SOURCE
               for d in parsed.documents)
    assert [a.path.read_bytes() for a in resp.attachments] == [b"DICM1.2.3.3.1",
                                                               b"DICM1.2.3.3.2"]
    assert all(a.content_type == "application/dicom" for a in resp.attachments)


def test_consolidated_partial_success_errors_at_our_home(tmp_path: Path,
                                                         pacs: FakePacs) -> None:
    _resp, parsed = _call(tmp_path, _request(
        ("1.2.3.3.1", SOURCE, HOME),           # found
        ("1.2.3.3.404", SOURCE, HOME),         # not in the PACS
        ("1.2.3.3.3", OTHER_SOURCE, HOME),     # another Imaging Document Source
        ("1.2.3.3.4", SOURCE, "urn:oid:9.9"),  # another community
        ("1.2.3.3.5", SOURCE, None)))          # no HomeCommunityId
    assert parsed.status == ResponseStatus.PARTIAL_SUCCESS
    assert [d.document_unique_id for d in parsed.documents] == ["1.2.3.3.1"]
    assert sorted(e.code for e in parsed.errors) == sorted([
        ErrorCode.MISSING_DOCUMENT, ErrorCode.UNKNOWN_REPOSITORY_ID,
        ErrorCode.UNKNOWN_COMMUNITY, ErrorCode.MISSING_HOME_COMMUNITY_ID])
    assert {e.location for e in parsed.errors} == {HOME}
    # only our community's documents for our source went to the PACS
    assert pacs.resolved == ["1.2.3.3.1", "1.2.3.3.404"]


def test_unknown_source_only_never_asks_the_pacs(tmp_path: Path, pacs: FakePacs) -> None:
    _resp, parsed = _call(tmp_path, _request(("1.2.3.3.1", OTHER_SOURCE + ".999", HOME)))
    assert parsed.status == ResponseStatus.FAILURE
    assert [e.code for e in parsed.errors] == [ErrorCode.UNKNOWN_REPOSITORY_ID]
    assert pacs.resolved == []


def test_pacs_down_is_a_failure_at_our_home(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def down(*_a: object) -> Resolution:
        raise PacsError("unreachable", "cannot connect to the PACS")
    monkeypatch.setattr(rad69, "resolve", down)
    _resp, parsed = _call(tmp_path, _request(("1.2.3.3.1", SOURCE, HOME)))
    assert parsed.status == ResponseStatus.FAILURE
    assert [e.code for e in parsed.errors] == [ErrorCode.REPOSITORY_ERROR]
    assert "could not be queried" in parsed.errors[0].context
    assert {e.location for e in parsed.errors} == {HOME}


def test_not_a_rad75_request(tmp_path: Path) -> None:
    _resp, parsed = _call(tmp_path, etree.Element(q(XDSI, "Nonsense")))
    assert parsed.status == ResponseStatus.FAILURE
    assert {e.location for e in parsed.errors} == {HOME}
