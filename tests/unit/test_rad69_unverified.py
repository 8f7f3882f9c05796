"""RAD-69's unverified whole series and second round (gateway.imaging.plan, rad69.gather)
and C-MOVE's expectations, in the cases a review found wrong: an instance claimed under a
series it is not in, a verified whole series refused at SERIES level, a UID listed twice."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom import Dataset

from gateway.config import PacsConfig
from gateway.dicom.find import build_query
from gateway.dicom.retrieve import InstanceRef, Received, RetrieveOutcome
from gateway.imaging import plan, rad69
from gateway.imaging.plan import Resolution
from gateway.imaging.request import ImagingDocumentRequest, Wado

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
# study -> series -> instances held by the fake PACS (one SOP class: CT)
PACS = {"1.1": {"1.1.1": ["1.1.1.1", "1.1.1.2"], "1.1.2": ["1.1.2.1"]}}


def fake_find(_pacs: PacsConfig, level: str, keys: Mapping[str, Any], **kw: Any
              ) -> list[Dataset]:
    """A PACS that honours every key: SOP Classes in Study, series counts, instances."""
    study_key = keys.get("StudyInstanceUID")
    if level == "STUDY":
        if study_key not in PACS:
            return []
        row = build_query("STUDY", {"StudyInstanceUID": study_key})
        row.SOPClassesInStudy = CT
        return [row]
    want = keys.get("SOPInstanceUID")
    wanted = set(want) if isinstance(want, list) else ({want} if want else None)
    out = []
    for study, series_map in PACS.items():
        if study_key not in (None, "", study):
            continue
        for series, sops in series_map.items():
            if level == "SERIES":
                row = build_query("SERIES", {"StudyInstanceUID": study,
                                             "SeriesInstanceUID": series})
                row.NumberOfSeriesRelatedInstances = str(len(sops))
                out.append(row)
                continue
            for sop in sops:
                if wanted is None or sop in wanted:
                    out.append(build_query("IMAGE", {
                        "StudyInstanceUID": study, "SeriesInstanceUID": series,
                        "SOPInstanceUID": sop, "SOPClassUID": CT}))
    return out


def faithful_retrieve(_pacs: Any, refs: list[InstanceRef], _syntaxes: Any, spool: Path,
                      **kw: Any) -> RetrieveOutcome:
    """Like run_c_get against a PACS that honours study and series: a series in
    `whole_series` brings every instance the PACS has of it, an IMAGE-level group the listed
    instances that are in that series; an instance is accepted when its UID is one of the
    job's (`wanted`, as CGetSession does)."""
    spool.mkdir(parents=True, exist_ok=True)
    wanted = {r.sop_instance_uid for r in refs}
    whole = set(kw.get("whole_series", ()))
    out = RetrieveOutcome()
    groups: dict[tuple[str, str], list[str]] = {}
    for r in refs:
        groups.setdefault((r.study_uid, r.series_uid), []).append(r.sop_instance_uid)
    for (study, series), uids in groups.items():
        held = PACS.get(study, {}).get(series, [])
        sent = held if (study, series) in whole else [u for u in uids if u in held]
        for uid in sent:
            if uid in wanted and uid not in out.received:
                p = spool / f"{uid}.dcm"
                p.write_bytes(b"x" * 10)
                out.received[uid] = Received(uid, p, EXPLICIT_LE, 10)
    for r in refs:
        if r.sop_instance_uid not in out.received:
            out.missing[r.sop_instance_uid] = "the PACS did not send this instance"
    return out


def doc(study: str, series: str, sop: str) -> ImagingDocumentRequest:
    return ImagingDocumentRequest(study, series, "1.2.3", sop)


def _services(config: PacsConfig) -> Any:
    return SimpleNamespace(config=SimpleNamespace(pacs=config))


def test_an_instance_claimed_in_a_series_it_is_not_in_is_never_a_success(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The request names 1.1.1.1 twice: in its own series 1.1.1 (with all of that
    series) and in series 1.1.2, which it is not in (1.1.2 holds one instance, 1.1.2.1, and
    the request names one there). Both series are taken unverified; the SERIES-level fetch of
    1.1.1 brings 1.1.1.1, and because received instances are matched by SOP Instance UID
    only, the document claiming series 1.1.2 is returned as a success. The IMAGE-level path
    (series_level_retrieve = false) says urn:dicom:wado:0010 for it, as it should."""
    monkeypatch.setattr(plan, "find", fake_find)
    monkeypatch.setattr(plan, "STUDY_QUERIES_MIN", 1)
    monkeypatch.setattr("gateway.dicom.retrieve.retrieve", faithful_retrieve)
    docs = [doc("1.1", "1.1.1", "1.1.1.1"), doc("1.1", "1.1.1", "1.1.1.2"),
            doc("1.1", "1.1.2", "1.1.1.1")]

    # Control: looked up instance by instance, the third document is inconsistent.
    checked = plan.resolve(PacsConfig(series_level_retrieve=False), docs)
    assert [(e.location, e.code) for e in checked.errors][:1] == [
        ("1.1.1.1", Wado.INCONSISTENT)]

    config = PacsConfig()
    resolution = plan.resolve(config, docs)
    documents, errors = rad69.fetch(_services(config), resolution, (EXPLICIT_LE,),
                                    tmp_path / "spool")
    errors = resolution.errors + errors
    # Expected: 1.1.1.1 once (for the document of series 1.1.1) and 1.1.1.2; the document
    # claiming series 1.1.2 gets INCONSISTENT + XDSMissingDocument.
    assert sorted(d.document_unique_id for d in documents) == ["1.1.1.1", "1.1.1.2"]
    assert [e.code for e in errors] == [Wado.INCONSISTENT, "XDSMissingDocument"]


def test_a_verified_whole_series_refused_at_series_level_is_fetched_instance_by_instance(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Instances looked up by C-FIND that form a whole series (a study with
    several SOP classes, or fewer than STUDY_QUERIES_MIN instances) are fetched with one
    SERIES-level C-GET. Before 78b229d..HEAD a failure status of that C-GET was retried
    instance by instance (cget._get_group); now cget leaves that to gather(), and gather()
    only retries the *unverified* instances: verified ones all fail, e.g. a PACS that fails
    the whole C-GET because it cannot convert one instance."""
    calls: list[set[tuple[str, str]]] = []

    def series_level_fails(_pacs: Any, refs: list[InstanceRef], _syntaxes: Any, spool: Path,
                           **kw: Any) -> RetrieveOutcome:
        whole = set(kw.get("whole_series", ()))
        calls.append(whole)
        spool.mkdir(parents=True, exist_ok=True)
        out = RetrieveOutcome()
        for r in refs:
            if (r.study_uid, r.series_uid) in whole:
                out.missing[r.sop_instance_uid] = "SERIES-level C-GET failed with status 0xC000"
            else:
                p = spool / f"{r.sop_instance_uid}.dcm"
                p.write_bytes(b"x" * 10)
                out.received[r.sop_instance_uid] = Received(r.sop_instance_uid, p,
                                                            EXPLICIT_LE, 10)
        return out

    monkeypatch.setattr("gateway.dicom.retrieve.retrieve", series_level_fails)
    docs = [doc("1.1", "1.1.1", "1.1.1.1"), doc("1.1", "1.1.1", "1.1.1.2")]
    resolution = Resolution(
        found=[(InstanceRef(d.study_uid, d.series_uid, d.document_unique_id, CT), d)
               for d in docs],
        whole_series={("1.1", "1.1.1")})  # verified: unverified is empty
    config = PacsConfig()
    documents, _errors = rad69.fetch(_services(config), resolution, (EXPLICIT_LE,),
                                     tmp_path / "spool")
    assert calls[0] == {("1.1", "1.1.1")}
    assert sorted(d.document_unique_id for d in documents) == ["1.1.1.1", "1.1.1.2"]


def test_c_move_expect_tolerates_a_uid_listed_twice(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A document listed twice in a series taken whole (both copies go to the
    same job) makes storescp.expect() raise FileExistsError (the second symlink of the same
    token): _run_move fails, the whole job's instances are missing, and since the error
    kind is "failed" they are reported as urn:dicom:wado:0013 "transfer syntax"
    errors."""
    import tempfile

    from gateway.dicom import storescp

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    spool = tmp_path / "spool"
    spool.mkdir()
    with storescp.expect(PacsConfig(move_port=1), spool, ["1.2.3", "1.2.3"]):
        assert storescp.is_expected(storescp.spool_root(PacsConfig(move_port=1)), "1.2.3")


def test_an_unverified_document_listed_twice_gets_its_errors_once_per_listing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same wrong document listed twice in a series taken whole: each
    listing should carry one wado error and one XDSMissingDocument, as the IMAGE-level path
    gives; gather() files explain()'s errors by location, so each listing gets all of
    them (4 per listing, 8 in all)."""
    monkeypatch.setattr(plan, "find", fake_find)
    monkeypatch.setattr(plan, "STUDY_QUERIES_MIN", 1)
    monkeypatch.setattr("gateway.dicom.retrieve.retrieve", faithful_retrieve)
    # Series 1.1.1 holds two instances; the request names 1.1.1.1 and a wrong one, twice.
    docs = [doc("1.1", "1.1.1", "1.1.1.1"), doc("1.1", "1.1.1", "1.1.1.9"),
            doc("1.1", "1.1.1", "1.1.1.9")]
    checked = plan.resolve(PacsConfig(series_level_retrieve=False), docs)
    assert len(checked.errors) == 4  # the IMAGE-level path: 2 per listing

    config = PacsConfig()
    resolution = plan.resolve(config, docs)
    assert resolution.unverified == {"1.1.1.1", "1.1.1.9"}
    _documents, errors = rad69.fetch(_services(config), resolution, (EXPLICIT_LE,),
                                     tmp_path / "spool")
    assert len(errors) == 4
