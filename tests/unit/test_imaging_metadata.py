"""XDS-I.b DocumentEntry metadata of a KOS manifest: codes, reference ids, times, patient,
and the Body Part Examined -> SNOMED CT (CID 4031) map checked against PS3.16 as pydicom
ships it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.sr._cid_dict import cid_concepts
from pydicom.sr._concepts_dict import concepts

from gateway.ebrim import build
from gateway.ebrim.build import CodeValue
from gateway.ebrim.model import SubmitObjectsRequest
from gateway.ebrim.validation import validate_submission
from gateway.imaging.kos import ManifestOptions, build_manifest
from gateway.imaging.metadata import (
    BODY_PART_REGIONS,
    KOS_FORMAT,
    MetadataOptions,
    manifest_entry,
    parse_code,
    region_for_body_part,
    submission_set_values,
)

AUTHORITY = "1.3.6.1.4.1.21367.13.20.1000"
OPTIONS = MetadataOptions(patient_id_authority=AUTHORITY,
                          accession_number_authority="1.2.3.4.6",
                          placer_order_authority="1.2.3.4.7")


def _kos(conformance: Path, **changes: str):
    ct = dcmread(conformance / "dicom" / "pydicom" / "CT_small.dcm", stop_before_pixels=True)
    ct.AccessionNumber = "ACC-1"
    ct.StudyDate, ct.StudyTime = "20240115", "101530.123"
    ct.PlacerOrderNumberImagingServiceRequest = "PLC-7"
    for k, v in changes.items():
        setattr(ct, k, v)
    return build_manifest([ct], ManifestOptions(
        retrieve_location_uid="1.2.3.9", now=datetime(2024, 2, 1, tzinfo=UTC))), ct


def test_cid_4031_codes_are_real() -> None:
    """Every mapped code is in CID 4031 with that meaning (PS3.16, as pydicom embeds it)."""
    sct = concepts["SCT"]
    in_cid = {}
    for name in cid_concepts[4031]["SCT"]:
        for code, (meaning, _cids) in sct[name].items():
            in_cid[code] = meaning
    assert len(BODY_PART_REGIONS) >= 60
    for part, (code, meaning) in BODY_PART_REGIONS.items():
        assert in_cid.get(code) == meaning, part


def test_entry_values(conformance: Path) -> None:
    kos, ct = _kos(conformance)
    v = manifest_entry(kos, OPTIONS, body_parts=["chest", "NOSUCHPART"],
                       creation_time="20240201000000")
    assert v.unique_id == str(kos.SOPInstanceUID)
    assert v.mime_type == "application/dicom"
    assert v.format_code == KOS_FORMAT
    assert v.format_code.scheme == "1.2.840.10008.2.6.1"
    assert v.patient_id == f"{ct.PatientID}^^^&{AUTHORITY}&ISO"
    assert CodeValue("CT", "DCM", "Computed Tomography") in v.event_codes
    assert CodeValue("816094009", "SCT", "Chest") in v.event_codes
    assert len(v.event_codes) == 2  # the unknown body part is not mapped
    assert v.reference_ids == (
        "ACC-1^^^&1.2.3.4.6&ISO^urn:ihe:iti:xds:2013:accession",
        f"{ct.StudyInstanceUID}^^^^urn:ihe:iti:xds:2016:studyInstanceUID",
        "PLC-7^^^&1.2.3.4.7&ISO^urn:ihe:iti:xds:2013:order")
    assert v.service_start_time == "20240115101530"
    assert v.service_stop_time == "20240115101530"
    assert v.source_patient_info[0] == f"PID-3|{v.source_patient_id}"
    assert any(i.startswith("PID-5|") for i in v.source_patient_info)


def test_service_stop_never_before_start(conformance: Path) -> None:
    kos, _ = _kos(conformance)
    v = manifest_entry(kos, OPTIONS, service_stop="20240116")
    assert v.service_stop_time == "20240116"
    v = manifest_entry(kos, OPTIONS, service_stop="20230101")
    assert v.service_stop_time == v.service_start_time


def test_no_accession_no_placer(conformance: Path) -> None:
    kos, ct = _kos(conformance, AccessionNumber="", PlacerOrderNumberImagingServiceRequest="")
    v = manifest_entry(kos, OPTIONS)
    assert v.reference_ids == (f"{ct.StudyInstanceUID}^^^^urn:ihe:iti:xds:2016:studyInstanceUID",)


def test_entry_passes_the_registry_validation(conformance: Path) -> None:
    kos, _ = _kos(conformance)
    v = manifest_entry(kos, OPTIONS, body_parts=["CHEST"])
    entry = build.document_entry(v)
    sub: SubmitObjectsRequest = build.submission(
        submission_set_values("1.2.3.4.5.6", "1.2.3.9", v.patient_id, OPTIONS), (entry,))
    errors = [e for e in validate_submission(sub, repository=False) if e.is_error]
    assert errors == []


def test_overrides_and_schemes() -> None:
    opts = MetadataOptions(patient_id_authority=AUTHORITY, region_scheme="2.16.840.1.113883.6.96",
                           body_part_overrides={"HEAD": CodeValue("1", "X", "Mine"),
                                                "BRAIN": CodeValue("12738006", "SCT", "Brain")})
    assert region_for_body_part("head", opts) == CodeValue("1", "X", "Mine")
    assert region_for_body_part("BRAIN", opts) == CodeValue("12738006", "SCT", "Brain")
    assert region_for_body_part("KNEE", opts) == CodeValue("72696002", "2.16.840.1.113883.6.96",
                                                           "Knee")
    assert region_for_body_part("", opts) is None


def test_parse_code() -> None:
    assert parse_code("A | 1.2 | Alpha") == CodeValue("A", "1.2", "Alpha")
    assert parse_code("A | Alpha", default_scheme="SCT") == CodeValue("A", "SCT", "Alpha")
    for bad in ("A", "A | | x", "A | B"):
        with pytest.raises(ValueError):
            parse_code(bad)
