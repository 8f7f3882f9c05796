"""The KOS publisher against a real Orthanc (the session `orthanc` fixture) and the built-in
registry/repository: `xdsi-gateway publish --all`, then ITI-18 finds the manifests by the MCWG
filters (eventCodeList modality and region, referenceIdList accession and study UID); a second
run creates nothing; a study that gained an instance is replaced (RPLC, old one Deprecated)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from gateway import cli
from gateway.config import GatewayConfig, load
from gateway.ebrim.metadata import codes, slot_values, unique_id
from gateway.ebrim.model import AdhocQuery, ExtrinsicObject, Slot
from gateway.ebrim.parse import parse_adhoc_query_response
from gateway.ebrim.render import render_adhoc_query_request
from gateway.imaging.kos import manifest_instance_uids, read_manifest
from gateway.imaging.publish import LocalTarget, Selection, publish
from gateway.ns import Action, AvailabilityStatus, DocumentEntryScheme, StoredQuery
from gateway.registry.handlers import stored_query
from gateway.repository.handlers import retrieve
from gateway.transactions import RequestContext
from tests.integration.conftest import OrthancFixture
from tests.support.orthanc import load_files

AUTHORITY = "1.3.6.1.4.1.21367.13.20.1000"
ACCESSION_AUTHORITY = "1.2.3.4.5.6.7"
PATIENT = "PUBTEST-0001"
PATIENT_CX = f"{PATIENT}^^^&{AUTHORITY}&ISO"
ACCESSION = "ACCPUB0001"


@dataclass
class PublishEnv:
    config_path: Path
    config: GatewayConfig
    study_uid: str
    series_uid: str
    first_instance: str
    template: Path
    workdir: Path
    orthanc: OrthancFixture


def _instance(template: Path, target: Path, study: str, series: str, sop: str) -> Path:
    ds = dcmread(template)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.PatientID, ds.PatientName = PATIENT, "PUBLISH^TEST"
    ds.AccessionNumber = ACCESSION
    ds.BodyPartExamined = "CHEST"
    ds.Modality = "CT"
    ds.StudyDate, ds.StudyTime = "20240115", "101500"
    ds.StudyDescription = "CT chest"
    ds.SeriesDescription = "Axial 5mm"
    ds.save_as(target, enforce_file_format=True)
    return target


@pytest.fixture(scope="module")
def env(orthanc: OrthancFixture, conformance: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[PublishEnv]:
    workdir = tmp_path_factory.mktemp("publish")
    template = conformance / "dicom" / "pydicom" / "CT_small.dcm"
    study, series, first = generate_uid(), generate_uid(), generate_uid()
    load_files(orthanc.running, [_instance(template, workdir / "one.dcm", study, series, first)])
    cfg = workdir / "gateway.toml"
    cfg.write_text(f"""\
[tls]
enabled = false
require_client_certificate = false

[community]
home_community_id = "urn:oid:1.3.6.1.4.1.21367.13.70.200"
repository_unique_id = "1.3.6.1.4.1.21367.13.71.200"
imaging_source_unique_id = "1.3.6.1.4.1.21367.13.80.200"
patient_id_assigning_authority = "{AUTHORITY}"

[pacs]
port = {orthanc.dicom_port}
called_ae_title = "{orthanc.aet}"

[publish]
wado_rs_base = "https://pacs.example.org/dicom-web"
accession_number_authority = "{ACCESSION_AUTHORITY}"
institution_name = "Publisher Test Hospital"
""")
    yield PublishEnv(cfg, load(cfg), study, series, first, template, workdir, orthanc)


def _query(target: LocalTarget, query_id: str, *params: tuple[str, str]) -> list[ExtrinsicObject]:
    """ITI-18 through the registry's handler: request and response as XML."""
    body = render_adhoc_query_request(AdhocQuery(
        query_id=query_id, parameters=tuple(Slot(n, (v,)) for n, v in params)))
    ctx = RequestContext("/xds/registry", Action.ITI18, None, None, {}, Path("/nonexistent"))
    parsed = parse_adhoc_query_response(stored_query(target.services, ctx, body).body)
    assert parsed.status.endswith(":Success"), parsed.errors
    return [o for o in parsed.objects if isinstance(o, ExtrinsicObject)]


APPROVED = ("$XDSDocumentEntryStatus", f"('{AvailabilityStatus.APPROVED}')")
ANY_STATUS = ("$XDSDocumentEntryStatus",
              f"('{AvailabilityStatus.APPROVED}','{AvailabilityStatus.DEPRECATED}')")


def test_publish_all_then_find_by_mcwg_filters(env: PublishEnv,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # Two corpus studies have no Patient ID: they are reported, and the run goes on (exit 1).
    code = cli.main(["publish", "--config", str(env.config_path), "--all"])
    out = capsys.readouterr().out
    failures = [line for line in out.splitlines() if line.strip().startswith("failed ")]
    assert all("has no Patient ID" in line for line in failures), out
    assert code == (1 if failures else 0)
    summary = out.strip().splitlines()[-1]
    published = int(summary.split("published ")[1].split(",")[0])
    assert published >= 1 and f"failed {len(failures)}" in summary, out

    target = LocalTarget(env.config)
    try:
        by_modality = _query(target, StoredQuery.FIND_DOCUMENTS,
                             ("$XDSDocumentEntryPatientId", f"'{PATIENT_CX}'"), APPROVED,
                             ("$XDSDocumentEntryEventCodeList", "('CT^^DCM')"))
        assert len(by_modality) == 1
        entry = by_modality[0]
        assert entry.mime_type == "application/dicom"
        fmt = codes(entry, DocumentEntryScheme.FORMAT_CODE)[0]
        assert (fmt.code, fmt.scheme_name) == ("1.2.840.10008.5.1.4.1.1.88.59",
                                               "1.2.840.10008.2.6.1")
        assert _query(target, StoredQuery.FIND_DOCUMENTS,
                      ("$XDSDocumentEntryPatientId", f"'{PATIENT_CX}'"), APPROVED,
                      ("$XDSDocumentEntryEventCodeList", "('MR^^DCM')")) == []
        by_region = _query(target, StoredQuery.FIND_DOCUMENTS,
                           ("$XDSDocumentEntryPatientId", f"'{PATIENT_CX}'"), APPROVED,
                           ("$XDSDocumentEntryEventCodeList", "('816094009^^SCT')"))
        assert [unique_id(e) for e in by_region] == [unique_id(entry)]
        accession_ref = (f"{ACCESSION}^^^&{ACCESSION_AUTHORITY}&ISO"
                         "^urn:ihe:iti:xds:2013:accession")
        by_accession = _query(target, StoredQuery.FIND_DOCUMENTS_BY_REFERENCE_ID,
                              ("$XDSDocumentEntryPatientId", f"'{PATIENT_CX}'"), APPROVED,
                              ("$XDSDocumentEntryReferenceIdList", f"('{accession_ref}')"))
        assert [unique_id(e) for e in by_accession] == [unique_id(entry)]
        study_ref = f"{env.study_uid}^^^^urn:ihe:iti:xds:2016:studyInstanceUID"
        by_study = _query(target, StoredQuery.FIND_DOCUMENTS_BY_REFERENCE_ID,
                          ("$XDSDocumentEntryPatientId", f"'{PATIENT_CX}'"), APPROVED,
                          ("$XDSDocumentEntryReferenceIdList", f"('{study_ref}')"))
        assert [unique_id(e) for e in by_study] == [unique_id(entry)]
        assert study_ref in slot_values(entry, "urn:ihe:iti:xds:2013:referenceIdList")

        # The stored manifest: every instance of the study, readable by dcmtk.
        from gateway.ebrim.model import DocumentRequest, RetrieveDocumentSetRequest
        _s, docs, errors = retrieve(target.services, RetrieveDocumentSetRequest(documents=(
            DocumentRequest(env.config.community.repository_unique_id,
                            unique_id(entry) or ""),)))
        assert not errors
        kos = read_manifest(docs[0].path.read_bytes())
        assert manifest_instance_uids(kos) == {env.first_instance}
        series = kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert series.RetrieveAETitle == env.orthanc.aet
        assert series.RetrieveURL.startswith("https://pacs.example.org/dicom-web/studies/")
        dump = subprocess.run(["dcmdump", str(docs[0].path)], capture_output=True, text=True,
                              check=True).stdout
        assert "(0040,e011)" in dump and env.first_instance in dump
    finally:
        target.close()


def test_publish_again_creates_nothing(env: PublishEnv) -> None:
    summary = publish(env.config, Selection())
    assert summary.count("published") == summary.count("replaced") == 0, summary.results
    assert summary.count("unchanged") >= 1
    assert all("no Patient ID" in r.message for r in summary.results if r.outcome == "failed")
    target = LocalTarget(env.config)
    try:
        assert len(_query(target, StoredQuery.FIND_DOCUMENTS,
                          ("$XDSDocumentEntryPatientId", f"'{PATIENT_CX}'"), ANY_STATUS)) == 1
    finally:
        target.close()


def test_changed_study_is_replaced(env: PublishEnv) -> None:
    target = LocalTarget(env.config)
    try:
        before = _query(target, StoredQuery.FIND_DOCUMENTS,
                        ("$XDSDocumentEntryPatientId", f"'{PATIENT_CX}'"), APPROVED)
        assert len(before) == 1
        second = generate_uid()
        load_files(env.orthanc.running, [_instance(env.template, env.workdir / "two.dcm",
                                                   env.study_uid, env.series_uid, second)])
        summary = publish(env.config, Selection(study_uid=env.study_uid), target=target)
        assert [r.outcome for r in summary.results] == ["replaced"], summary.results
        assert summary.results[0].replaced_entry == before[0].id

        everything = _query(target, StoredQuery.FIND_DOCUMENTS,
                            ("$XDSDocumentEntryPatientId", f"'{PATIENT_CX}'"), ANY_STATUS)
        status = {unique_id(e): e.status for e in everything}
        assert status[unique_id(before[0])] == AvailabilityStatus.DEPRECATED
        new_uid = summary.results[0].manifest_uid
        assert status[new_uid] == AvailabilityStatus.APPROVED

        # and once more: unchanged
        again = publish(env.config, Selection(study_uid=env.study_uid), target=target)
        assert [r.outcome for r in again.results] == ["unchanged"]
    finally:
        target.close()


def test_dry_run_registers_nothing(env: PublishEnv, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["publish", "--config", str(env.config_path), "--study", env.study_uid,
                     "--dry-run"]) == 0
    assert "unchanged 1" in capsys.readouterr().out
