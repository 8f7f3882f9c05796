"""The XDS-I.b imaging manifest: a DICOM Key Object Selection document for one study.

`build_manifest` takes the headers of the study's instances and returns a KOS (Key Object
Selection Document Storage, title "Manifest" (DCM 113030)) that references every instance in
its content tree and in the Current Requested Procedure Evidence Sequence, with the Retrieve
Location UID of the Imaging Document Source on each series (RAD TF-3 4.68.4.1.2.3) and, as the
IHE-Europe multi-country working group recommends, the Patient ID with its issuer, Modalities
in Study, the Series Description of each series and a WADO-RS Retrieve URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


@dataclass(frozen=True)
class ManifestOptions:
    retrieve_location_uid: str  # [community] imaging_source_unique_id
    issuer_of_patient_id: str = ""  # the affinity domain's assigning authority
    patient_id: str | None = None  # the national/regional id; default: the instances' own
    wado_rs_base: str = ""  # e.g. https://pacs.example.org/dicom-web ; empty: no Retrieve URL
    institution_name: str = ""


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    ds = Dataset()
    ds.CodeValue = value
    ds.CodingSchemeDesignator = scheme
    ds.CodeMeaning = meaning
    return ds


def _group(instances: Sequence[Dataset]) -> dict[str, list[Dataset]]:
    series: dict[str, list[Dataset]] = {}
    for ds in instances:
        series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return series


def build_manifest(instances: Sequence[Dataset], options: ManifestOptions) -> Dataset:
    """A KOS manifest for the instances of ONE study (ValueError for none or several)."""
    if not instances:
        raise ValueError("a manifest needs at least one instance")
    studies = {str(ds.StudyInstanceUID) for ds in instances}
    if len(studies) != 1:
        raise ValueError(f"a manifest covers one study; got {len(studies)}")
    first = instances[0]
    study_uid = studies.pop()
    now = datetime.now(UTC)

    kos = Dataset()
    kos.file_meta = FileMetaDataset()
    kos.file_meta.MediaStorageSOPClassUID = UID(KOS_SOP_CLASS)
    kos.SOPInstanceUID = generate_uid()
    kos.file_meta.MediaStorageSOPInstanceUID = kos.SOPInstanceUID
    kos.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    kos.SpecificCharacterSet = "ISO_IR 192"
    kos.SOPClassUID = KOS_SOP_CLASS
    kos.Modality = "KO"
    kos.ContentDate = now.strftime("%Y%m%d")
    kos.ContentTime = now.strftime("%H%M%S")
    kos.InstanceCreationDate = kos.ContentDate
    kos.InstanceCreationTime = kos.ContentTime

    # Patient and study: copied from the instances, the patient id as the domain knows it.
    kos.PatientName = first.get("PatientName", "")
    kos.PatientID = options.patient_id or str(first.get("PatientID", ""))
    if options.issuer_of_patient_id:
        kos.IssuerOfPatientID = options.issuer_of_patient_id
    kos.PatientBirthDate = first.get("PatientBirthDate", "")
    kos.PatientSex = first.get("PatientSex", "")
    kos.StudyInstanceUID = study_uid
    kos.StudyDate = first.get("StudyDate", "")
    kos.StudyTime = first.get("StudyTime", "")
    kos.StudyID = first.get("StudyID", "")
    kos.AccessionNumber = first.get("AccessionNumber", "")
    kos.ReferringPhysicianName = first.get("ReferringPhysicianName", "")
    if "StudyDescription" in first:
        kos.StudyDescription = first.StudyDescription
    modalities = sorted({str(ds.Modality) for ds in instances if "Modality" in ds})
    kos.ModalitiesInStudy = modalities
    if options.institution_name:
        kos.InstitutionName = options.institution_name
    kos.Manufacturer = "xdsi-gateway"

    # The KOS series of its own.
    kos.SeriesInstanceUID = generate_uid()
    kos.SeriesNumber = 9999
    kos.InstanceNumber = 1
    kos.ReferencedPerformedProcedureStepSequence = DicomSequence()

    # Evidence: every referenced instance, by series, with where to get it.
    evidence_series = []
    content_items = []
    for series_uid, members in _group(instances).items():
        ser = Dataset()
        ser.SeriesInstanceUID = series_uid
        ser.RetrieveLocationUID = options.retrieve_location_uid
        if "SeriesDescription" in members[0]:
            ser.SeriesDescription = members[0].SeriesDescription
        if options.wado_rs_base:
            ser.RetrieveURL = (f"{options.wado_rs_base.rstrip('/')}/studies/{study_uid}"
                               f"/series/{series_uid}")
        sops = []
        for ds in members:
            ref = Dataset()
            ref.ReferencedSOPClassUID = ds.SOPClassUID
            ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            sops.append(ref)
            item = Dataset()
            item.RelationshipType = "CONTAINS"
            item.ValueType = "IMAGE" if "Rows" in ds else "COMPOSITE"
            item.ReferencedSOPSequence = DicomSequence([ref])
            content_items.append(item)
        ser.ReferencedSOPSequence = DicomSequence(sops)
        evidence_series.append(ser)
    study = Dataset()
    study.StudyInstanceUID = study_uid
    study.ReferencedSeriesSequence = DicomSequence(evidence_series)
    kos.CurrentRequestedProcedureEvidenceSequence = DicomSequence([study])
    if options.wado_rs_base:
        kos.RetrieveURL = f"{options.wado_rs_base.rstrip('/')}/studies/{study_uid}"

    # SR document content: the "Manifest" container (TID 2010).
    kos.ValueType = "CONTAINER"
    kos.ConceptNameCodeSequence = DicomSequence([_code("113030", "DCM", "Manifest")])
    kos.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2010"
    kos.ContentTemplateSequence = DicomSequence([template])
    kos.ContentSequence = DicomSequence(content_items)
    return kos
