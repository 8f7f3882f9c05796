"""The KOS manifest builder: structure against the NIST and MADO manifests of the corpus,
MCWG extensions, and readability by pydicom and dcmtk's dcmdump."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from gateway.imaging.kos import (
    KOS_SOP_CLASS,
    ManifestOptions,
    body_parts,
    build_manifest,
    is_image_sop_class,
    manifest_bytes,
    manifest_instance_uids,
    merge_levels,
    read_manifest,
)

OPTIONS = ManifestOptions(retrieve_location_uid="1.3.6.1.4.1.21367.13.80.200",
                          retrieve_ae_title="ORTHANC", issuer_of_patient_id="1.2.3.4.5",
                          patient_id="NAT-42", wado_rs_base="https://pacs.example.org/rs/",
                          accession_number_issuer="1.2.3.4.6", placer_order_issuer="1.2.3.4.7",
                          now=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC))

# Attributes every KOS of the corpus carries (Patient, General Study, KO Series, Key Object
# Document, SR Document Content, SOP Common): ours must carry them too.
REQUIRED = ("SOPClassUID", "SOPInstanceUID", "PatientID", "PatientName", "StudyInstanceUID",
            "SeriesInstanceUID", "Modality", "InstanceNumber", "ContentDate", "ContentTime",
            "ValueType", "ConceptNameCodeSequence", "ContinuityOfContent",
            "CurrentRequestedProcedureEvidenceSequence", "ContentSequence",
            "ReferencedPerformedProcedureStepSequence", "AccessionNumber", "StudyDate")


def _images(conformance: Path) -> list[Dataset]:
    root = conformance / "dicom"
    files = [root / "pydicom" / "CT_small.dcm", root / "pydicom" / "MR_small.dcm",
             *sorted((root / "images" / "nist-expected").rglob("*.dcm"))]
    return [dcmread(p, stop_before_pixels=True) for p in files]


def _one_study(conformance: Path) -> list[Dataset]:
    """The NIST images of one study plus CT_small re-parented into it (two series)."""
    nist = dcmread(sorted((conformance / "dicom" / "images" / "nist-expected" / "iig-5401")
                          .glob("*.dcm"))[0], stop_before_pixels=True)
    ct = dcmread(conformance / "dicom" / "pydicom" / "CT_small.dcm", stop_before_pixels=True)
    ct.StudyInstanceUID = nist.StudyInstanceUID
    ct.PatientID = nist.PatientID
    ct.BodyPartExamined = "CHEST"
    ct.SeriesDescription = "Axial"
    nist.PlacerOrderNumberImagingServiceRequest = "PLACER-9"
    return [nist, ct]


def _corpus_kos(conformance: Path) -> list[Dataset]:
    kos = conformance / "dicom" / "kos"
    return [dcmread(p) for p in sorted(kos.rglob("*.dcm"))]


def test_required_attributes_match_the_corpus_manifests(conformance: Path) -> None:
    ours = build_manifest(_one_study(conformance), OPTIONS)
    for theirs in _corpus_kos(conformance):
        assert str(theirs.SOPClassUID) == KOS_SOP_CLASS
        for keyword in REQUIRED:
            if keyword in theirs:
                assert keyword in ours, keyword
    assert ours.SOPClassUID == KOS_SOP_CLASS and ours.Modality == "KO"


def _tree_shape(kos: Dataset) -> tuple[object, ...]:
    root = kos.ConceptNameCodeSequence[0]
    items = {(i.RelationshipType, i.ValueType) for i in kos.ContentSequence}
    refs = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for i in kos.ContentSequence if "ReferencedSOPSequence" in i}
    return kos.ValueType, root.CodingSchemeDesignator, items, refs


def test_content_tree_shape_like_nist(conformance: Path) -> None:
    ours = build_manifest(_one_study(conformance), OPTIONS)
    nist = [k for k in _corpus_kos(conformance) if "nist" in str(k.filename)]
    assert nist
    value_type, scheme, items, refs = _tree_shape(ours)
    for theirs in nist:
        t_value_type, t_scheme, t_items, t_refs = _tree_shape(theirs)
        assert (value_type, scheme) == (t_value_type, t_scheme) == ("CONTAINER", "DCM")
        assert theirs.ConceptNameCodeSequence[0].CodeValue == \
            ours.ConceptNameCodeSequence[0].CodeValue == "113030"
        assert {vt for _, vt in items} <= {vt for _, vt in t_items} | {"COMPOSITE"}
        # every content reference is in the evidence, in theirs and in ours
        assert t_refs <= manifest_instance_uids(theirs)
    assert refs == manifest_instance_uids(ours)
    assert ours.ContentTemplateSequence[0].TemplateIdentifier == "2010"


def test_evidence_lists_every_instance_with_retrieve_information(conformance: Path) -> None:
    instances = _one_study(conformance)
    kos = build_manifest(instances, OPTIONS)
    assert manifest_instance_uids(kos) == {str(i.SOPInstanceUID) for i in instances}
    study = kos.CurrentRequestedProcedureEvidenceSequence[0]
    assert study.StudyInstanceUID == instances[0].StudyInstanceUID
    assert len(study.ReferencedSeriesSequence) == 2
    for series in study.ReferencedSeriesSequence:
        assert series.RetrieveAETitle == "ORTHANC"
        assert series.RetrieveLocationUID == OPTIONS.retrieve_location_uid
        assert series.RetrieveURL == (f"https://pacs.example.org/rs/studies/"
                                      f"{study.StudyInstanceUID}/series/"
                                      f"{series.SeriesInstanceUID}")
    described = [s for s in study.ReferencedSeriesSequence if "SeriesDescription" in s]
    assert [s.SeriesDescription for s in described] == ["Axial"]


def test_mcwg_patient_and_order_attributes(conformance: Path) -> None:
    instances = _one_study(conformance)
    kos = build_manifest(instances, OPTIONS)
    assert kos.PatientID == "NAT-42" and kos.IssuerOfPatientID == "1.2.3.4.5"
    assert kos.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == "1.2.3.4.5"
    assert kos.OtherPatientIDsSequence[0].PatientID == instances[0].PatientID
    assert list(kos.ModalitiesInStudy) == sorted({str(i.Modality) for i in instances})
    request = kos.ReferencedRequestSequence[0]
    assert request.AccessionNumber == instances[0].AccessionNumber
    assert request.PlacerOrderNumberImagingServiceRequest == "PLACER-9"
    assert request.OrderPlacerIdentifierSequence[0].UniversalEntityID == "1.2.3.4.7"
    assert request.StudyInstanceUID == kos.StudyInstanceUID


def test_no_wado_base_no_retrieve_url(conformance: Path) -> None:
    kos = build_manifest(_one_study(conformance),
                         ManifestOptions(retrieve_location_uid="1.2.3"))
    for series in kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence:
        assert "RetrieveURL" not in series and "RetrieveAETitle" not in series
    assert "RetrieveURL" not in kos


def test_roundtrip_pydicom_and_dcmdump(conformance: Path, tmp_path: Path) -> None:
    kos = build_manifest(_one_study(conformance), OPTIONS)
    data = manifest_bytes(kos)
    assert data[128:132] == b"DICM"
    again = read_manifest(data)
    assert manifest_instance_uids(again) == manifest_instance_uids(kos)
    dcmdump = shutil.which("dcmdump")
    if dcmdump is None:
        pytest.fail("dcmdump is not installed (Debian dcmtk; `make test` installs it)")
    path = tmp_path / "kos.dcm"
    path.write_bytes(data)
    out = subprocess.run([dcmdump, "-q", str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert "=KeyObjectSelectionDocumentStorage" in out
    assert "(0040,e011)" in out and "(0008,0054)" in out and "(0008,1190)" in out


def test_one_study_only(conformance: Path) -> None:
    with pytest.raises(ValueError, match="one study"):
        build_manifest(_images(conformance), OPTIONS)
    with pytest.raises(ValueError, match="at least one"):
        build_manifest([], OPTIONS)


def test_merge_levels_and_image_classes() -> None:
    study, series, inst = Dataset(), Dataset(), Dataset()
    study.StudyInstanceUID, study.PatientID, study.AccessionNumber = "1.2", "P1", ""
    series.SeriesInstanceUID, series.Modality, series.BodyPartExamined = "1.2.3", "CT", "HEAD"
    inst.StudyInstanceUID, inst.SeriesInstanceUID = "1.2", "1.2.3"
    inst.SOPInstanceUID, inst.SOPClassUID = "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2"
    merged = merge_levels(study, series, inst)
    assert merged.PatientID == "P1" and merged.Modality == "CT"
    assert "AccessionNumber" not in merged  # empty values are not copied
    assert body_parts([merged, merged]) == ["HEAD"]
    assert is_image_sop_class("1.2.840.10008.5.1.4.1.1.2")
    assert not is_image_sop_class("1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    kos = build_manifest([merged], OPTIONS)
    assert kos.ContentSequence[-1].ValueType == "IMAGE"
