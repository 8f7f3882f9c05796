"""The retrieve module's pieces that need no PACS: what an unfinished job had already
spooled, and the background warm-up's failure handling."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from gateway.dicom import retrieve
from gateway.dicom.retrieve import InstanceRef, Received, _Job, _JobResult, _spooled

CT = "1.2.840.10008.5.1.4.1.1.2"


def _part10(path: Path, sop: str) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(CT)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CT, sop
    ds.save_as(path, enforce_file_format=True)


def test_spooled_reports_whole_files_of_unfinished_jobs(tmp_path: Path) -> None:
    refs = [InstanceRef("1.1", "1.1.1", f"1.1.1.{k}", CT) for k in range(1, 5)]
    job = _Job(tuple(refs), (ExplicitVRLittleEndian,), str(tmp_path), "c-get", 5)
    _part10(tmp_path / "1.1.1.1.dcm", "1.1.1.1")  # arrived, reported by a finished job
    _part10(tmp_path / "1.1.1.2.dcm", "1.1.1.2")  # arrived, its job never reported
    (tmp_path / "1.1.1.3.dcm").write_bytes(b"not DICOM")  # unreadable: not received
    (tmp_path / "tmpabc.dcm").write_bytes(b"partial")  # a temp file still being written
    finished = _JobResult(received=[Received("1.1.1.1", tmp_path / "1.1.1.1.dcm",
                                             ExplicitVRLittleEndian, 1)])
    out = _spooled([job], tmp_path, [finished])
    assert [(r.sop_instance_uid, r.transfer_syntax) for r in out.received] == [
        ("1.1.1.2", ExplicitVRLittleEndian)]
    assert out.received[0].size == (tmp_path / "1.1.1.2.dcm").stat().st_size


def test_spooled_reads_the_segment_indexes_of_unfinished_jobs(tmp_path: Path) -> None:
    """The built-in engine's instances of a job given up on: the complete ones its segment
    index lists (an instance still being written has no line yet), once each, only those
    asked for."""
    refs = [InstanceRef("1.1", "1.1.1", f"1.1.1.{k}", CT) for k in range(1, 4)]
    job = _Job(tuple(refs), (ExplicitVRLittleEndian,), str(tmp_path), "c-get", 5)
    (tmp_path / "a.seg").write_bytes(b"x" * 300)
    (tmp_path / "a.idx").write_text(f"1.1.1.1 0 100 {ExplicitVRLittleEndian}\n"
                                    f"1.1.1.2 100 150 {ExplicitVRLittleEndian}\n"
                                    f"9.9.9 250 50 {ExplicitVRLittleEndian}\n"  # not ours
                                    "1.1.1.3 250 50 1.2.840.10")  # still being written
    finished = _JobResult(received=[Received("1.1.1.1", tmp_path / "a.seg",
                                             ExplicitVRLittleEndian, 100, 0)])
    out = _spooled([job], tmp_path, [finished])
    assert [(r.sop_instance_uid, r.path.name, r.offset, r.size) for r in out.received] == [
        ("1.1.1.2", "a.seg", 100, 150)]
    assert out.received[0].read_bytes() == b"x" * 150


def test_warm_up_failure_is_logged_not_raised(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    def broken(_n: int) -> None:
        raise OSError("no forkserver")

    monkeypatch.setattr(retrieve, "warm_up", broken)
    thread = retrieve.warm_up_in_background(2)
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert "warm-up failed: OSError" in caplog.text


@pytest.mark.parametrize("source_id", ["1.2.3.4", ""])
def test_app_factory_warms_the_pool_only_for_an_imaging_source(
        source_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config import (
        CommunityConfig,
        GatewayConfig,
        PacsConfig,
        RegistryConfig,
        RepositoryConfig,
        ServerConfig,
    )
    from gateway.soap.application import app_factory

    calls: list[int] = []
    monkeypatch.setattr(retrieve, "warm_up_in_background", calls.append)
    config = GatewayConfig(
        server=ServerConfig(spool_directory=tmp_path / "spool"),
        registry=RegistryConfig(database=f"sqlite:///{tmp_path / 'registry.db'}"),
        repository=RepositoryConfig(directory=tmp_path / "repository"),
        community=CommunityConfig(imaging_source_unique_id=source_id),
        pacs=PacsConfig(associations=5))
    (tmp_path / "spool").mkdir()
    app_factory(config)
    assert calls == ([5] if source_id else [])


def _long_uids(n: int) -> list[str]:
    return [f"1.2.826.0.1.3680043.8.498.{10**37 + k}" for k in range(n)]  # 64 characters


def test_uid_lists_fit_one_explicit_vr_identifier() -> None:
    """A long SOP Instance UID list is cut so that each identifier keeps (0008,0018) as UI
    in explicit VR (a 16-bit length), in order and without loss."""
    import warnings

    from pynetdicom.dsutils import encode

    from gateway.dicom.cget import uid_batches

    uids = _long_uids(2500)
    batches = uid_batches(uids)
    assert [u for b in batches for u in b] == uids
    assert len(batches) == 3  # 1008 x 65 bytes fit in 0xFFFE, not 1009
    for batch in batches:
        ds = Dataset()
        ds.SOPInstanceUID = batch
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # pydicom warns when it falls back to UN
            raw = encode(ds, False, True)
        assert raw is not None and raw[4:6] == b"UI"
    assert uid_batches(uids[:10]) == [uids[:10]]
    assert uid_batches([]) == []


def test_resolve_queries_long_uid_lists_in_several_c_finds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config import PacsConfig
    from gateway.imaging import plan
    from gateway.imaging.request import ImagingDocumentRequest

    uids = _long_uids(1500)
    queries: list[list[str]] = []

    def find(pacs: object, level: str, keys: dict[str, object], **_kw: object
             ) -> list[Dataset]:
        if level in ("STUDY", "SERIES"):  # SOP classes, series counts (gateway.imaging.plan)
            return []
        assert level == "IMAGE"
        asked = keys["SOPInstanceUID"]
        assert isinstance(asked, list)
        queries.append(asked)
        out = []
        for uid in asked:
            ds = Dataset()
            ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID = uid, "1.9.1", CT
            out.append(ds)
        return out

    monkeypatch.setattr(plan, "find", find)
    docs = [ImagingDocumentRequest("1.9", "1.9.1", "1.3.6", uid) for uid in uids]
    resolution = plan.resolve(PacsConfig(), docs)
    assert len(queries) == 2 and sorted(u for q in queries for u in q) == sorted(uids)
    assert resolution.errors == []
    assert [ref.sop_instance_uid for ref, _d in resolution.found] == uids


def test_reports_go_in_batches_and_none_waits_long(monkeypatch: pytest.MonkeyPatch) -> None:
    """The built-in engine's progress reports: REPORT_BATCH instances per message, and a
    lone instance is sent by the timer within REPORT_DELAY, not held until the job ends."""
    import time

    sent: list[list[str]] = []
    monkeypatch.setattr(retrieve, "_report_many",
                        lambda _t, recs: sent.append([r.sop_instance_uid for r in recs]))
    batcher = retrieve._Batcher("token")
    try:
        for k in range(retrieve.REPORT_BATCH + 1):
            batcher.add(Received(f"1.{k}", Path("x.seg"), ExplicitVRLittleEndian, 1, k))
        assert sent[0] == [f"1.{k}" for k in range(retrieve.REPORT_BATCH)]
        for _ in range(200):  # the last one goes by the timer
            if len(sent) == 2:
                break
            time.sleep(0.005)
        assert sent[1:] == [[f"1.{retrieve.REPORT_BATCH}"]]
    finally:
        batcher.close()
    assert sum(len(b) for b in sent) == retrieve.REPORT_BATCH + 1  # each once
