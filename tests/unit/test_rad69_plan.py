"""RAD-69 resolution against a fake C-FIND, and the split of a retrieve into jobs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from pydicom import Dataset

from gateway.config import PacsConfig
from gateway.dicom.find import build_query
from gateway.dicom.retrieve import MAX_CONTEXTS, InstanceRef, plan_jobs
from gateway.imaging import plan
from gateway.imaging.request import ImagingDocumentRequest, Wado

CT = "1.2.840.10008.5.1.4.1.1.2"
# study -> series -> instances held by the fake PACS
PACS = {"1.1": {"1.1.1": ["1.1.1.1", "1.1.1.2"], "1.1.2": ["1.1.2.1"]},
        "2.2": {"2.2.1": ["2.2.1.1"]}}


def fake_find(pacs: PacsConfig, level: str, keys: Mapping[str, Any], **_: Any) -> list[Dataset]:
    out = []
    want = keys.get("SOPInstanceUID")
    wanted = set(want) if isinstance(want, list) else ({want} if want else None)
    for study, series_map in PACS.items():
        if keys.get("StudyInstanceUID") not in (None, "", study):
            continue
        for series, sops in series_map.items():
            if level == "SERIES":
                out.append(build_query("SERIES", {"StudyInstanceUID": study,
                                                  "SeriesInstanceUID": series}))
                continue
            for sop in sops:
                if wanted is None or sop in wanted:
                    ds = build_query("IMAGE", {"StudyInstanceUID": study,
                                               "SeriesInstanceUID": series,
                                               "SOPInstanceUID": sop, "SOPClassUID": CT})
                    out.append(ds)
    return out


def doc(study: str, series: str, sop: str) -> ImagingDocumentRequest:
    return ImagingDocumentRequest(study, series, "1.2.3", sop)


@pytest.fixture(autouse=True)
def _fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan, "find", fake_find)


def codes_for(res: plan.Resolution, uid: str) -> list[str]:
    return [e.code for e in res.errors if e.location == uid]


def test_consistent_request_resolves() -> None:
    res = plan.resolve(PacsConfig(), [doc("1.1", "1.1.1", "1.1.1.1"),
                                      doc("1.1", "1.1.2", "1.1.2.1")])
    assert [r.sop_instance_uid for r, _d in res.found] == ["1.1.1.1", "1.1.2.1"]
    assert all(r.sop_class_uid == CT for r, _d in res.found)
    assert res.errors == []


@pytest.mark.parametrize("request_, code", [
    (("1.1", "1.1.2", "1.1.1.1"), Wado.INCONSISTENT),  # instance in another series
    (("1.1", "1.1.1", "2.2.1.1"), Wado.INCONSISTENT),  # instance in another study
    (("9.9", "1.1.1", "1.1.1.1"), Wado.INCONSISTENT),  # unknown study, instance elsewhere
    (("9.9", "9.9.1", "9.9.1.1"), Wado.STUDY_UNKNOWN),
    (("1.1", "9.9.1", "9.9.1.1"), Wado.SERIES_UNKNOWN),
    (("1.1", "1.1.1", "1.1.1.9"), Wado.DOCUMENT_UNKNOWN),
])
def test_bad_identifiers(request_: tuple[str, str, str], code: str) -> None:
    res = plan.resolve(PacsConfig(), [doc(*request_), doc("1.1", "1.1.1", "1.1.1.2")])
    assert [r.sop_instance_uid for r, _d in res.found] == ["1.1.1.2"]
    assert codes_for(res, request_[2]) == [code, "XDSMissingDocument"]


def test_jobs_split_evenly_and_respect_the_context_limit() -> None:
    refs = [InstanceRef("1", "1.1", f"1.1.{i}", CT) for i in range(10)]
    jobs = plan_jobs(refs, ["1.2.840.10008.1.2.1"], 3)
    assert [len(j) for j in jobs] == [4, 3, 3]
    assert sorted(r.sop_instance_uid for j in jobs for r in j) == sorted(
        r.sop_instance_uid for r in refs)
    many = [InstanceRef("1", "1.1", f"1.1.{i}", f"1.2.3.{i}") for i in range(100)]
    jobs = plan_jobs(many, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"], 1)
    for j in jobs:
        assert 1 + 2 * len({r.sop_class_uid for r in j}) <= MAX_CONTEXTS
    assert sum(len(j) for j in jobs) == 100 and len(jobs) == 2


def test_build_query_list_match() -> None:
    ds = build_query("IMAGE", {"StudyInstanceUID": "1.2", "SOPInstanceUID": ["1.2.3", "1.2.4"]})
    assert ds.QueryRetrieveLevel == "IMAGE"
    assert list(ds.SOPInstanceUID) == ["1.2.3", "1.2.4"]
    assert ds.SeriesInstanceUID == "" and ds.SOPClassUID == ""
    with pytest.raises(ValueError):
        build_query("PATIENT", {})
    with pytest.raises(ValueError):
        build_query("STUDY", {"NoSuchKeyword": "x"})
