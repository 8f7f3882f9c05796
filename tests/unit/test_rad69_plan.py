"""RAD-69 resolution against a fake C-FIND, and the split of a retrieve into jobs."""

from __future__ import annotations

import sys
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


def fake_find(pacs: PacsConfig, level: str, keys: Mapping[str, Any], **kw: Any) -> list[Dataset]:
    QUERIES.append((level, tuple(kw.get("without", ()))))
    out = []
    if level == "STUDY":
        if STUDY_CLASSES and keys.get("StudyInstanceUID") in PACS:
            row = build_query("STUDY", {"StudyInstanceUID": keys["StudyInstanceUID"]})
            row.SOPClassesInStudy = STUDY_CLASSES[0]
            out.append(row)
        return out
    want = keys.get("SOPInstanceUID")
    wanted = set(want) if isinstance(want, list) else ({want} if want else None)
    for study, series_map in PACS.items():
        if keys.get("StudyInstanceUID") not in (None, "", study):
            continue
        for series, sops in series_map.items():
            if level == "SERIES":
                row = build_query("SERIES", {"StudyInstanceUID": study,
                                             "SeriesInstanceUID": series})
                if COUNTS:
                    row.NumberOfSeriesRelatedInstances = str(len(sops))
                out.append(row)
                continue
            for sop in sops:
                if wanted is None or sop in wanted:
                    ds = build_query("IMAGE", {"StudyInstanceUID": study,
                                               "SeriesInstanceUID": series,
                                               "SOPInstanceUID": sop, "SOPClassUID": CT})
                    if "SOPClassUID" in kw.get("without", ()):
                        del ds.SOPClassUID
                    out.append(ds)
    return out


COUNTS: list[bool] = []  # non-empty: the fake PACS reports Number of Series Related Instances
STUDY_CLASSES: list[Any] = []  # non-empty: the fake PACS's SOP Classes in Study, [0]
QUERIES: list[tuple[str, tuple[str, ...]]] = []  # (level, default keys left out)


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


@pytest.mark.parametrize("counts", [True, False])
def test_whole_series_are_those_requested_in_full(counts: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "COUNTS", [True] if counts else [])
    res = plan.resolve(PacsConfig(), [
        doc("1.1", "1.1.1", "1.1.1.1"), doc("1.1", "1.1.1", "1.1.1.2"),  # all of 1.1.1
        doc("1.1", "1.1.2", "1.1.2.1"),  # all of 1.1.2 (one instance)
        doc("2.2", "2.2.1", "2.2.1.1"),  # all of 2.2.1, another study
    ])
    assert len(res.found) == 4 and res.errors == []
    assert res.whole_series == ({("1.1", "1.1.1"), ("1.1", "1.1.2"), ("2.2", "2.2.1")}
                                if counts else set())
    part = plan.resolve(PacsConfig(), [doc("1.1", "1.1.1", "1.1.1.1"),
                                       doc("1.1", "1.1.2", "1.1.2.1")])
    assert part.whole_series == ({("1.1", "1.1.2")} if counts else set())


@pytest.mark.parametrize("classes, single", [
    ([CT], True),
    (CT, True),
    ([CT, "1.2.840.10008.5.1.4.1.1.4"], False),  # two classes: asked per instance
    ([], False),
    (None, False),  # the PACS does not report it
])
def test_sop_class_from_the_study_when_it_has_one(classes: Any, single: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """SOP Classes in Study naming exactly one class: the IMAGE-level C-FIND leaves SOP
    Class UID out and each instance gets the study's class; otherwise it asks for it."""
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "STUDY_CLASSES", [] if classes is None else [classes])
    monkeypatch.setattr(module, "QUERIES", [])
    monkeypatch.setattr(plan, "STUDY_QUERIES_MIN", 2)
    res = plan.resolve(PacsConfig(), [doc("1.1", "1.1.1", "1.1.1.1"),
                                      doc("1.1", "1.1.2", "1.1.2.1")])
    assert [(r.sop_instance_uid, r.sop_class_uid) for r, _d in res.found] == [
        ("1.1.1.1", CT), ("1.1.2.1", CT)]
    assert res.errors == []
    image = [without for level, without in module.QUERIES if level == "IMAGE"]
    assert image == [("SOPClassUID",) if single else ()]


def test_few_instances_are_looked_up_without_the_study_query(
        monkeypatch: pytest.MonkeyPatch) -> None:
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "STUDY_CLASSES", [CT])
    monkeypatch.setattr(module, "QUERIES", [])
    plan.resolve(PacsConfig(), [doc("1.1", "1.1.1", "1.1.1.1")])
    assert [level for level, _w in module.QUERIES] == ["SERIES", "IMAGE"]
    module.QUERIES.clear()
    plan.resolve(PacsConfig(dimse_engine="pynetdicom"), [doc("1.1", "1.1.1", "1.1.1.1")])
    assert [level for level, _w in module.QUERIES] == ["IMAGE"]  # no series-level fetch


@pytest.mark.parametrize("config", [
    PacsConfig(), PacsConfig(series_level_retrieve=False), PacsConfig(retrieve="c-move"),
    PacsConfig(dimse_engine="pynetdicom")])
def test_whole_series_of_one_class_are_taken_without_lookup(
        config: PacsConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A study of one SOP class whose series the request names in full: no IMAGE-level
    C-FIND, the instances are found unverified (the SERIES-level C-GET checks them), with the
    study's class; even a wrong UID counted in (here 2.2.1.1 claimed in 1.1.1, with the
    right number of instances). Only with the built-in engine's C-GET and
    series_level_retrieve (a C-MOVE's storage SCP would hand an instance to whoever expects
    it)."""
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "STUDY_CLASSES", [CT])
    monkeypatch.setattr(module, "COUNTS", [True])
    monkeypatch.setattr(module, "QUERIES", [])
    monkeypatch.setattr(plan, "STUDY_QUERIES_MIN", 1)
    docs = [doc("1.1", "1.1.1", "1.1.1.1"), doc("1.1", "1.1.1", "2.2.1.1"),
            doc("1.1", "1.1.2", "1.1.2.1")]
    res = plan.resolve(config, docs)
    series_level = config.series_level_retrieve and config.dimse_engine == "builtin"
    fast = series_level and config.retrieve == "c-get"  # C-MOVE: every instance looked up
    if fast:
        assert [level for level, _w in module.QUERIES] == ["STUDY", "SERIES"]
        assert [(r.sop_instance_uid, r.sop_class_uid) for r, _d in res.found] == [
            ("1.1.1.1", CT), ("2.2.1.1", CT), ("1.1.2.1", CT)]
        assert res.unverified == {"1.1.1.1", "2.2.1.1", "1.1.2.1"}
        assert res.whole_series == {("1.1", "1.1.1"), ("1.1", "1.1.2")}
        assert res.errors == []
        # What explain() says of the wrong one, once it has not come:
        later = plan.explain(config, [docs[1]])
        assert later.found == [] and [e.code for e in later.errors] == [
            Wado.INCONSISTENT, "XDSMissingDocument"]
    else:
        # The study's classes, the series counts if a whole series may be fetched at SERIES
        # level, the instances, then (for the stray one) which series exist and where it is.
        assert [level for level, _w in module.QUERIES] == (
            ["STUDY"] + ["SERIES"] * series_level + ["IMAGE", "SERIES", "IMAGE"])
        assert res.unverified == set()
        # Looked up: 1.1.2 is found whole, 1.1.1 not (2.2.1.1 is not in it).
        assert res.whole_series == ({("1.1", "1.1.2")} if series_level else set())
        assert [r.sop_instance_uid for r, _d in res.found] == ["1.1.1.1", "1.1.2.1"]
        assert codes_for(res, "2.2.1.1") == [Wado.INCONSISTENT, "XDSMissingDocument"]


def test_series_counts_failing_only_lose_the_whole_series(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from gateway.dicom.errors import PacsError

    def failing_series(pacs: PacsConfig, level: str, keys: Mapping[str, Any],
                       **kw: Any) -> list[Dataset]:
        if level == "SERIES":
            raise PacsError("failed", "C-FIND failed with status 0xA700")
        return fake_find(pacs, level, keys, **kw)

    monkeypatch.setattr(plan, "find", failing_series)
    res = plan.resolve(PacsConfig(), [doc("1.1", "1.1.2", "1.1.2.1")])
    assert [r.sop_instance_uid for r, _d in res.found] == ["1.1.2.1"]
    assert res.errors == [] and res.whole_series == set()


def test_whole_series_stay_in_one_job() -> None:
    from gateway.dicom.retrieve import whole_in

    big = [InstanceRef("1", "1.1", f"1.1.{i}", CT) for i in range(6)]
    small = [InstanceRef("1", "1.2", f"1.2.{i}", CT) for i in range(2)]
    loose = [InstanceRef("1", "1.3", f"1.3.{i}", CT) for i in range(4)]
    refs = big + small + loose
    whole = {("1", "1.1"), ("1", "1.2")}
    jobs = plan_jobs(refs, ["1.2.840.10008.1.2.1"], 3, whole)
    assert sorted(r.sop_instance_uid for j in jobs for r in j) == sorted(
        r.sop_instance_uid for r in refs)
    homes = {key: [k for k, j in enumerate(jobs) if any(
        (r.study_uid, r.series_uid) == key for r in j)] for key in whole}
    assert all(len(h) == 1 for h in homes.values())  # each whole series in one job
    assert homes[("1", "1.1")] != homes[("1", "1.2")]  # spread over the associations
    assert sorted(len(j) for j in jobs) == [3, 3, 6]  # the loose ones to the smaller jobs
    assert [whole_in(j, refs, whole) for j in jobs] == [
        frozenset(k for k in whole if homes[k] == [n]) for n in range(3)]
    # A job split by SOP class holds part of a series: not whole there.
    mixed = [InstanceRef("1", "1.1", f"1.1.{i}", f"1.2.3.{i}") for i in range(100)]
    parts = plan_jobs(mixed, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"], 1, {("1", "1.1")})
    assert len(parts) == 2
    assert [whole_in(p, mixed, {("1", "1.1")}) for p in parts] == [frozenset(), frozenset()]


def test_build_query_list_match() -> None:
    ds = build_query("IMAGE", {"StudyInstanceUID": "1.2", "SOPInstanceUID": ["1.2.3", "1.2.4"]})
    assert ds.QueryRetrieveLevel == "IMAGE"
    assert list(ds.SOPInstanceUID) == ["1.2.3", "1.2.4"]
    assert ds.SeriesInstanceUID == "" and ds.SOPClassUID == ""
    with pytest.raises(ValueError):
        build_query("PATIENT", {})
    with pytest.raises(ValueError):
        build_query("STUDY", {"NoSuchKeyword": "x"})
