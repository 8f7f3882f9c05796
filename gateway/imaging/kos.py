"""The XDS-I.b imaging manifest: a DICOM Key Object Selection document for one study.

`build_manifest` takes the headers of the study's instances (one pydicom Dataset per instance
carrying its patient, study, series and instance attributes, as read from files or merged from
C-FIND results with `merge_levels`) and returns a KOS (Key Object Selection Document Storage,
document title "Manifest" (113030, DCM), TID 2010) that references every instance in its
content tree and in the Current Requested Procedure Evidence Sequence. Each series of the
evidence carries the Retrieve AE Title and the Retrieve Location UID of the Imaging Document
Source (RAD TF-3 4.68.4.1.2.3).

The IHE-Europe multi-country working group (MCWG) extensions are added as well: the regional
or national Patient ID with Issuer of Patient ID (and its qualifiers when the issuer is an
OID), the PACS's own id in Other Patient IDs Sequence, Modalities in Study, Series Description
(and Modality) in each evidence series item, a WADO-RS Retrieve URL per series when a base is
configured, the Accession Number with its issuer, and the order references (Referenced
Request Sequence: Accession Number, Requested Procedure ID, Placer Order Number).

`manifest_instance_uids` reads back the set of referenced SOP Instance UIDs (used by the
publisher to tell an unchanged study from a changed one). No I/O here.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
MANIFEST_TITLE = ("113030", "DCM", "Manifest")
KEY_OBJECT_DESCRIPTION = ("113012", "DCM", "Key Object Description")
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")

# Attributes taken from the instances at each level (when present and not empty).
PATIENT_KEYS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                "PatientSex")
STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
              "ReferringPhysicianName", "StudyDescription", "RequestedProcedureID",
              "PlacerOrderNumberImagingServiceRequest")
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesDescription", "SeriesNumber",
               "BodyPartExamined", "SeriesDate", "SeriesTime")


@dataclass(frozen=True)
class ManifestOptions:
    retrieve_location_uid: str  # [community] imaging_source_unique_id
    retrieve_ae_title: str = ""  # the AE title the images are retrieved from; "" omits it
    issuer_of_patient_id: str = ""  # the affinity domain's assigning authority (OID or name)
    patient_id: str | None = None  # the national/regional id; default: the instances' own
    wado_rs_base: str = ""  # e.g. https://pacs.example.org/dicom-web ; empty: no Retrieve URL
    institution_name: str = ""
    accession_number_issuer: str = ""  # OID of the accession number's assigning authority
    placer_order_issuer: str = ""  # OID of the placer order number's assigning authority
    manufacturer: str = "xdsi-gateway"
    # Fixed values for reproducible output (tests); default: a new UID and the current time.
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    now: datetime | None = None


def _code(value: tuple[str, str, str]) -> Dataset:
    ds = Dataset()
    ds.CodeValue, ds.CodingSchemeDesignator, ds.CodeMeaning = value
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    """The attribute as a stripped string; "" when absent or empty."""
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip()


def _issuer_sequence(oid: str) -> DicomSequence:
    """An HL7v2 Hierarchic Designator Macro item (UniversalEntityID + ISO)."""
    item = Dataset()
    item.UniversalEntityID = oid
    item.UniversalEntityIDType = "ISO"
    return DicomSequence([item])


def is_image_sop_class(sop_class_uid: str) -> bool:
    """True for the Image Storage SOP classes (content item IMAGE, not COMPOSITE)."""
    name = UID(sop_class_uid).name
    return "Image Storage" in name and "Presentation" not in name


def merge_levels(patient_study: Dataset, series: Dataset, instance: Dataset) -> Dataset:
    """One instance header from C-FIND results at study, series and image level."""
    merged = Dataset()
    for source, keys in ((patient_study, PATIENT_KEYS + STUDY_KEYS),
                         (series, SERIES_KEYS)):
        for keyword in keys:
            if keyword in source and source[keyword].value not in (None, ""):
                setattr(merged, keyword, source[keyword].value)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                    "InstanceNumber", "Rows"):
        if keyword in instance and instance[keyword].value not in (None, ""):
            setattr(merged, keyword, instance[keyword].value)
    return merged


def _group(instances: Sequence[Dataset]) -> dict[str, list[Dataset]]:
    series: dict[str, list[Dataset]] = {}
    for ds in instances:
        series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return series


def _instance_order(ds: Dataset) -> tuple[int, str]:
    try:
        number = int(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    return number, str(ds.SOPInstanceUID)


def _series_order(item: tuple[str, list[Dataset]]) -> tuple[int, str]:
    try:
        number = int(item[1][0].get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    return number, item[0]


def _check(instances: Sequence[Dataset]) -> str:
    if not instances:
        raise ValueError("a manifest needs at least one instance")
    studies = {str(ds.StudyInstanceUID) for ds in instances}
    if len(studies) != 1:
        raise ValueError(f"a manifest covers one study; got {len(studies)}")
    for ds in instances:
        for keyword in ("SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not _text(ds, keyword):
                raise ValueError(f"an instance lacks {keyword}")
    return studies.pop()


def _patient(kos: Dataset, first: Dataset, options: ManifestOptions) -> None:
    kos.PatientName = first.get("PatientName", "")
    local_id = _text(first, "PatientID")
    local_issuer = _text(first, "IssuerOfPatientID")
    kos.PatientID = options.patient_id or local_id
    issuer = options.issuer_of_patient_id
    if issuer:
        kos.IssuerOfPatientID = issuer[:64]
        if _OID.match(issuer):
            kos.IssuerOfPatientIDQualifiersSequence = _issuer_sequence(issuer)
    elif local_issuer and not options.patient_id:
        kos.IssuerOfPatientID = local_issuer
    kos.PatientBirthDate = first.get("PatientBirthDate", "")
    kos.PatientSex = first.get("PatientSex", "")
    if local_id and local_id != str(kos.PatientID):
        other = Dataset()
        other.PatientID = local_id
        if local_issuer:
            other.IssuerOfPatientID = local_issuer
        other.TypeOfPatientID = "TEXT"
        kos.OtherPatientIDsSequence = DicomSequence([other])


def _referenced_request(first: Dataset, study_uid: str,
                        options: ManifestOptions) -> Dataset | None:
    accession = _text(first, "AccessionNumber")
    procedure = _text(first, "RequestedProcedureID")
    placer = _text(first, "PlacerOrderNumberImagingServiceRequest")
    if not (accession or procedure or placer):
        return None
    req = Dataset()
    req.AccessionNumber = accession
    if accession and options.accession_number_issuer:
        req.IssuerOfAccessionNumberSequence = _issuer_sequence(
            options.accession_number_issuer)
    req.ReferencedStudySequence = DicomSequence()
    req.StudyInstanceUID = study_uid
    req.RequestedProcedureDescription = first.get("StudyDescription", "")
    req.RequestedProcedureCodeSequence = DicomSequence()
    if placer and options.placer_order_issuer:
        req.OrderPlacerIdentifierSequence = _issuer_sequence(options.placer_order_issuer)
    else:
        req.OrderPlacerIdentifierSequence = DicomSequence()
    req.RequestedProcedureID = procedure
    req.PlacerOrderNumberImagingServiceRequest = placer
    req.FillerOrderNumberImagingServiceRequest = ""
    req.OrderFillerIdentifierSequence = DicomSequence()
    return req


def build_manifest(instances: Sequence[Dataset], options: ManifestOptions) -> Dataset:
    """A KOS manifest for the instances of ONE study (ValueError for none or several)."""
    study_uid = _check(instances)
    first = instances[0]
    now = options.now or datetime.now(UTC)

    kos = Dataset()
    kos.file_meta = FileMetaDataset()
    kos.file_meta.MediaStorageSOPClassUID = UID(KOS_SOP_CLASS)
    kos.SOPInstanceUID = options.sop_instance_uid or generate_uid()
    kos.file_meta.MediaStorageSOPInstanceUID = kos.SOPInstanceUID
    kos.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # SOP Common
    kos.SpecificCharacterSet = "ISO_IR 192"
    kos.SOPClassUID = KOS_SOP_CLASS
    kos.InstanceCreationDate = now.strftime("%Y%m%d")
    kos.InstanceCreationTime = now.strftime("%H%M%S")
    kos.TimezoneOffsetFromUTC = now.strftime("%z") or "+0000"

    # Patient: the id as the affinity domain knows it (MCWG: regional/national id + issuer).
    _patient(kos, first, options)

    # General Study
    kos.StudyInstanceUID = study_uid
    kos.StudyDate = first.get("StudyDate", "")
    kos.StudyTime = first.get("StudyTime", "")
    kos.StudyID = first.get("StudyID", "")
    kos.AccessionNumber = first.get("AccessionNumber", "")
    if _text(first, "AccessionNumber") and options.accession_number_issuer:
        kos.IssuerOfAccessionNumberSequence = _issuer_sequence(
            options.accession_number_issuer)
    kos.ReferringPhysicianName = first.get("ReferringPhysicianName", "")
    if _text(first, "StudyDescription"):
        kos.StudyDescription = first.StudyDescription
    # MCWG: Modalities in Study.
    kos.ModalitiesInStudy = sorted({_text(ds, "Modality") for ds in instances
                                    if _text(ds, "Modality")})

    # Key Object Document Series
    kos.Modality = "KO"
    kos.SeriesInstanceUID = options.series_instance_uid or generate_uid()
    kos.SeriesNumber = 9999
    kos.SeriesDescription = "Imaging manifest"
    kos.ReferencedPerformedProcedureStepSequence = DicomSequence()

    # General Equipment
    kos.Manufacturer = options.manufacturer
    if options.institution_name:
        kos.InstitutionName = options.institution_name

    # Key Object Document
    kos.InstanceNumber = 1
    kos.ContentDate = kos.InstanceCreationDate
    kos.ContentTime = kos.InstanceCreationTime
    request = _referenced_request(first, study_uid, options)
    if request is not None:
        kos.ReferencedRequestSequence = DicomSequence([request])

    evidence_series = []
    content_items = []
    base = options.wado_rs_base.rstrip("/")
    for series_uid, members in sorted(_group(instances).items(), key=_series_order):
        lead = members[0]
        ser = Dataset()
        if options.retrieve_ae_title:
            ser.RetrieveAETitle = options.retrieve_ae_title
        if _text(lead, "SeriesDescription"):  # MCWG extension
            ser.SeriesDescription = lead.SeriesDescription
        if _text(lead, "Modality"):  # MCWG extension
            ser.Modality = lead.Modality
        if base:
            ser.RetrieveURL = f"{base}/studies/{study_uid}/series/{series_uid}"
        sops = []
        for ds in sorted(members, key=_instance_order):
            ref = Dataset()
            ref.ReferencedSOPClassUID = ds.SOPClassUID
            ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            sops.append(ref)
            item = Dataset()
            item.RelationshipType = "CONTAINS"
            item.ValueType = "IMAGE" if is_image_sop_class(str(ds.SOPClassUID)) \
                else "COMPOSITE"
            content_ref = Dataset()
            content_ref.ReferencedSOPClassUID = ds.SOPClassUID
            content_ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            item.ReferencedSOPSequence = DicomSequence([content_ref])
            content_items.append(item)
        ser.ReferencedSOPSequence = DicomSequence(sops)
        ser.SeriesInstanceUID = series_uid
        ser.RetrieveLocationUID = options.retrieve_location_uid
        evidence_series.append(ser)
    study = Dataset()
    study.ReferencedSeriesSequence = DicomSequence(evidence_series)
    study.StudyInstanceUID = study_uid
    kos.CurrentRequestedProcedureEvidenceSequence = DicomSequence([study])

    # SR Document Content: the "Manifest" container (TID 2010).
    kos.ValueType = "CONTAINER"
    kos.ConceptNameCodeSequence = DicomSequence([_code(MANIFEST_TITLE)])
    kos.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2010"
    kos.ContentTemplateSequence = DicomSequence([template])
    if _text(first, "StudyDescription"):
        description = Dataset()
        description.RelationshipType = "CONTAINS"
        description.ValueType = "TEXT"
        description.ConceptNameCodeSequence = DicomSequence([_code(KEY_OBJECT_DESCRIPTION)])
        description.TextValue = _text(first, "StudyDescription")
        content_items.insert(0, description)
    kos.ContentSequence = DicomSequence(content_items)
    return kos


def manifest_bytes(kos: Dataset) -> bytes:
    """The manifest as a DICOM Part 10 file (preamble, 'DICM', file meta, data set)."""
    buf = io.BytesIO()
    kos.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def read_manifest(data: bytes) -> Dataset:
    return dcmread(io.BytesIO(data))


def manifest_instance_uids(kos: Dataset) -> frozenset[str]:
    """The SOP Instance UIDs the evidence sequence references."""
    uids: set[str] = set()
    for study in kos.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for ref in series.get("ReferencedSOPSequence", []):
                uids.add(str(ref.ReferencedSOPInstanceUID))
    return frozenset(uids)


def body_parts(instances: Iterable[Dataset]) -> list[str]:
    """The distinct Body Part Examined values of the instances, in first-seen order."""
    seen: dict[str, None] = {}
    for ds in instances:
        value = _text(ds, "BodyPartExamined").upper()
        if value:
            seen.setdefault(value, None)
    return list(seen)


def series_by_uid(series: Iterable[Dataset]) -> Mapping[str, Dataset]:
    return {str(s.SeriesInstanceUID): s for s in series if "SeriesInstanceUID" in s}
