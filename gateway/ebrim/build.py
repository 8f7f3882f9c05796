"""Builders of well-formed XDS metadata: a DocumentEntry, a SubmissionSet and the HasMember
associations of one submission, from plain values (used by the demo and the KOS publisher).

Codes are `CodeValue(code, scheme, display)`; the builders place each in the classification
scheme ITI TF-3 4.2.5 assigns it and add every attribute a Register transaction requires.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from gateway.ebrim.model import (
    Association,
    Classification,
    ExternalIdentifier,
    ExtrinsicObject,
    Identifiable,
    LocalizedString,
    RegistryPackage,
    Slot,
    SubmitObjectsRequest,
)
from gateway.ns import (
    AssociationType,
    DocumentEntryScheme,
    ObjectType,
    SubmissionSetScheme,
)


@dataclass(frozen=True)
class CodeValue:
    code: str
    scheme: str
    display: str


@dataclass(frozen=True)
class Author:
    person: str = ""  # XCN
    institutions: tuple[str, ...] = ()  # XON
    roles: tuple[str, ...] = ()
    specialties: tuple[str, ...] = ()


@dataclass(frozen=True)
class DocumentEntryValues:
    unique_id: str
    patient_id: str  # CX, e.g. "123^^^&1.2.3&ISO"
    source_patient_id: str
    mime_type: str
    title: str
    class_code: CodeValue
    type_code: CodeValue
    format_code: CodeValue
    confidentiality_code: CodeValue
    healthcare_facility_type_code: CodeValue
    practice_setting_code: CodeValue
    creation_time: str  # DTM
    language_code: str = "en-US"
    event_codes: tuple[CodeValue, ...] = ()
    reference_ids: tuple[str, ...] = ()  # CXi values for urn:ihe:iti:xds:2013:referenceIdList
    service_start_time: str | None = None
    service_stop_time: str | None = None
    source_patient_info: tuple[str, ...] = ()
    authors: tuple[Author, ...] = ()
    entry_uuid: str = field(default_factory=lambda: new_uuid())


@dataclass(frozen=True)
class SubmissionSetValues:
    unique_id: str
    source_id: str
    patient_id: str
    content_type_code: CodeValue
    submission_time: str = field(default_factory=lambda: dtm_now())
    title: str = ""
    authors: tuple[Author, ...] = ()
    set_uuid: str = field(default_factory=lambda: new_uuid())


def new_uuid() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def dtm_now() -> str:
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S")


def _name(text: str) -> tuple[LocalizedString, ...]:
    return (LocalizedString(text),) if text else ()


def _code(scheme_uuid: str, obj_id: str, value: CodeValue) -> Classification:
    return Classification(
        id=new_uuid(), classified_object=obj_id, classification_scheme=scheme_uuid,
        node_representation=value.code, name=_name(value.display),
        slots=(Slot("codingScheme", (value.scheme,)),))


def _authors(scheme_uuid: str, obj_id: str, authors: tuple[Author, ...]) -> \
        tuple[Classification, ...]:
    out = []
    for a in authors:
        slots = tuple(Slot(n, v) for n, v in (
            ("authorPerson", (a.person,) if a.person else ()),
            ("authorInstitution", a.institutions), ("authorRole", a.roles),
            ("authorSpecialty", a.specialties)) if v)
        out.append(Classification(id=new_uuid(), classified_object=obj_id,
                                  classification_scheme=scheme_uuid, node_representation="",
                                  slots=slots))
    return tuple(out)


def document_entry(v: DocumentEntryValues) -> ExtrinsicObject:
    s = DocumentEntryScheme
    slots = [Slot("creationTime", (v.creation_time,)), Slot("languageCode", (v.language_code,)),
             Slot("sourcePatientId", (v.source_patient_id,))]
    if v.service_start_time:
        slots.append(Slot("serviceStartTime", (v.service_start_time,)))
    if v.service_stop_time:
        slots.append(Slot("serviceStopTime", (v.service_stop_time,)))
    if v.source_patient_info:
        slots.append(Slot("sourcePatientInfo", v.source_patient_info))
    if v.reference_ids:
        slots.append(Slot("urn:ihe:iti:xds:2013:referenceIdList", v.reference_ids))
    eid = v.entry_uuid
    classifications = (
        *_authors(s.AUTHOR, eid, v.authors),
        _code(s.CLASS_CODE, eid, v.class_code),
        _code(s.CONFIDENTIALITY_CODE, eid, v.confidentiality_code),
        *(_code(s.EVENT_CODE_LIST, eid, c) for c in v.event_codes),
        _code(s.FORMAT_CODE, eid, v.format_code),
        _code(s.HEALTHCARE_FACILITY_TYPE_CODE, eid, v.healthcare_facility_type_code),
        _code(s.PRACTICE_SETTING_CODE, eid, v.practice_setting_code),
        _code(s.TYPE_CODE, eid, v.type_code),
    )
    identifiers = (
        ExternalIdentifier(id=new_uuid(), registry_object=eid,
                           identification_scheme=s.PATIENT_ID, value=v.patient_id,
                           name=_name("XDSDocumentEntry.patientId")),
        ExternalIdentifier(id=new_uuid(), registry_object=eid,
                           identification_scheme=s.UNIQUE_ID, value=v.unique_id,
                           name=_name("XDSDocumentEntry.uniqueId")),
    )
    return ExtrinsicObject(id=eid, object_type=ObjectType.STABLE_DOCUMENT_ENTRY,
                           mime_type=v.mime_type, name=_name(v.title), slots=tuple(slots),
                           classifications=classifications,
                           external_identifiers=identifiers)


def submission_set(v: SubmissionSetValues) -> tuple[RegistryPackage, Classification]:
    """The SubmissionSet package and its top-level Classification to the SubmissionSet node."""
    s = SubmissionSetScheme
    sid = v.set_uuid
    package = RegistryPackage(
        id=sid, name=_name(v.title),
        slots=(Slot("submissionTime", (v.submission_time,)),),
        classifications=(*_authors(s.AUTHOR, sid, v.authors),
                         _code(s.CONTENT_TYPE_CODE, sid, v.content_type_code)),
        external_identifiers=(
            ExternalIdentifier(id=new_uuid(), registry_object=sid,
                               identification_scheme=s.UNIQUE_ID, value=v.unique_id,
                               name=_name("XDSSubmissionSet.uniqueId")),
            ExternalIdentifier(id=new_uuid(), registry_object=sid,
                               identification_scheme=s.SOURCE_ID, value=v.source_id,
                               name=_name("XDSSubmissionSet.sourceId")),
            ExternalIdentifier(id=new_uuid(), registry_object=sid,
                               identification_scheme=s.PATIENT_ID, value=v.patient_id,
                               name=_name("XDSSubmissionSet.patientId")),
        ))
    node = Classification(id=new_uuid(), classified_object=sid, classification_node=s.NODE)
    return package, node


def has_member(set_uuid: str, member_uuid: str) -> Association:
    return Association(id=new_uuid(), association_type=AssociationType.HAS_MEMBER,
                       source_object=set_uuid, target_object=member_uuid,
                       slots=(Slot("SubmissionSetStatus", ("Original",)),))


def submission(set_values: SubmissionSetValues,
               entries: tuple[ExtrinsicObject, ...]) -> SubmitObjectsRequest:
    """One SubmitObjectsRequest: the entries, the SubmissionSet, and a HasMember for each."""
    package, node = submission_set(set_values)
    objects: list[Identifiable] = [*entries, package, node]
    objects.extend(has_member(package.id, e.id) for e in entries)
    return SubmitObjectsRequest(objects=tuple(objects))
