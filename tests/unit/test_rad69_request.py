"""RAD-69 request parsing and the checks made before the PACS is asked (no PACS here)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.config import from_dict
from gateway.ebrim.xmlsafe import parse_xml_file
from gateway.errors import XdsFailure
from gateway.imaging.rad69 import check_documents
from gateway.imaging.request import ImagingRequest, Wado, parse_request
from tests.support.rad69 import NIST_SOURCE, rad69_request

NIST = Path("messages") / "rad-69" / "nist"


def services(tmp_path: Path) -> Any:
    cfg = from_dict({
        "tls": {"enabled": False, "require_client_certificate": False},
        "community": {"home_community_id": "urn:oid:1.3.6.1.4.1.21367.13.70.101",
                      "repository_unique_id": "1.2.3.4",
                      "imaging_source_unique_id": NIST_SOURCE,
                      "patient_id_assigning_authority": "1.2.3.5"},
        "registry": {"database": f"sqlite:///{tmp_path / 'r.db'}"},
    }, base=tmp_path)
    return SimpleNamespace(config=cfg)


def test_every_nist_request_parses(conformance: Path) -> None:
    files = [p for p in (conformance / NIST).iterdir() if "Response" not in p.name]
    assert len(files) > 30
    for path in files:
        req = parse_request(parse_xml_file(path))
        assert req.documents, path.name


def test_multi_study_request(conformance: Path) -> None:
    req = parse_request(parse_xml_file(
        conformance / NIST / "iig_2018-5405b_Rad69RetrieveRequest_RAD-69Request.xml"))
    assert [d.document_unique_id[-6:] for d in req.documents] == ["8036.1", ".1.999"]
    assert req.documents[0].home_community_id == "urn:oid:1.3.6.1.4.1.21367.13.70.101"
    assert req.documents[1].repository_unique_id == "1.3.6.1.4.1.21367.13.71.102"
    assert req.transfer_syntaxes == ("1.2.840.10008.1.2.1",)
    assert all(d.valid for d in req.documents)


@pytest.mark.parametrize("name, problem", [
    ("ids_2018-4811_case-05_Empty_Study_Instance_UID_rad69-request.xml", "studyInstanceUID"),
    ("ids_2018-4811_case-06_Empty_Series_Instance_UID_rad69-request.xml", "seriesInstanceUID"),
])
def test_empty_uids_are_per_document_problems(conformance: Path, name: str,
                                              problem: str) -> None:
    req = parse_request(parse_xml_file(conformance / NIST / name))
    assert not req.documents[0].valid
    assert problem in str(req.documents[0].problem)


def test_not_a_rad69_request() -> None:
    from lxml import etree
    with pytest.raises(XdsFailure):
        parse_request(etree.fromstring(b"<a/>"))


def _check(tmp_path: Path, req: ImagingRequest) -> tuple[list[Any], list[str]]:
    ok, errors, _ts = check_documents(services(tmp_path), req)
    return ok, [e.code for e in errors]


def test_checks(tmp_path: Path) -> None:
    doc = [("1.2.3", "1.2.3.4", "1.2.3.4.5")]
    ok, codes = _check(tmp_path, parse_request(rad69_request(doc, ["1.2.840.10008.1.2.1"])))
    assert len(ok) == 1 and codes == []
    ok, codes = _check(tmp_path, parse_request(rad69_request(doc, ["1.2.840.10008.1.2.1"],
                                                             repository="9.9.9")))
    assert ok == [] and codes == ["XDSUnknownRepositoryId"]
    ok, codes = _check(tmp_path, parse_request(rad69_request(doc, ["1.2.840.10008.1.2.1.999"])))
    assert ok == [] and codes == [Wado.TS_NOT_SUPPORTED]
    ok, codes = _check(tmp_path, parse_request(rad69_request(doc, [])))
    assert ok == [] and codes == [Wado.INVALID_PARAMETER]
    # one known syntax among unknown ones is enough
    ok, codes = _check(tmp_path, parse_request(rad69_request(
        doc, ["1.2.840.10008.1.2.1.999", "1.2.840.10008.1.2.4.80"])))
    assert len(ok) == 1 and codes == []
