"""DICOM PS3.15 A.5 audit messages: the data model and its XML rendering.

Owns the frozen dataclasses of one audit message (`AuditMessage`, `ActiveParticipant`,
`ParticipantObject`, `CodedValue`), the code constants the gateway's records use (event ids,
role ids, participant object id types, outcomes), `render(message) -> bytes` (the
AuditMessage XML, UTF-8, one line, no XML declaration) and `parse(data)` (back to an lxml
element with the hardened parser, for tests and tools). Pure: no I/O, nothing of the gateway
beyond the hardened XML parser.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass, field

from lxml import etree


@dataclass(frozen=True)
class CodedValue:
    """A DICOM CodedValueType: csd-code, codeSystemName, originalText (displayName unused)."""

    code: str
    system: str
    text: str


DCM = "DCM"
RFC3881 = "RFC-3881"
IHE_TRANSACTIONS = "IHE Transactions"

# EventID (DESIGN.md; DICOM PS3.15 A.5.3)
QUERY = CodedValue("110112", DCM, "Query")
EXPORT = CodedValue("110106", DCM, "Export")
IMPORT = CodedValue("110107", DCM, "Import")
INSTANCES_ACCESSED = CodedValue("110103", DCM, "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = CodedValue("110104", DCM, "DICOM Instances Transferred")

# ActiveParticipant RoleIDCode
SOURCE_ROLE = CodedValue("110153", DCM, "Source Role ID")
DESTINATION_ROLE = CodedValue("110152", DCM, "Destination Role ID")

# ParticipantObjectIDTypeCode
PATIENT_NUMBER = CodedValue("2", RFC3881, "Patient Number")
REPORT_NUMBER = CodedValue("9", RFC3881, "Report Number")
STUDY_INSTANCE_UID = CodedValue("110180", DCM, "Study Instance UID")
SUBMISSION_SET_NODE = CodedValue("urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd",
                                 "IHE XDS Metadata", "submission set classificationNode")

# EventActionCode
ACTION_CREATE = "C"
ACTION_READ = "R"
ACTION_EXECUTE = "E"

# EventOutcomeIndicator
SUCCESS = 0
MINOR_FAILURE = 4
SERIOUS_FAILURE = 8
MAJOR_FAILURE = 12
OUTCOMES = (SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE)

# ParticipantObjectTypeCode / ParticipantObjectTypeCodeRole (RFC 3881)
TYPE_PERSON = 1
TYPE_SYSTEM_OBJECT = 2
ROLE_PATIENT = 1
ROLE_REPORT = 3
ROLE_JOB = 20
ROLE_QUERY = 24

# AuditSourceTypeCode 4: application server process tier in a multi-tier system
AUDIT_SOURCE_APPLICATION_SERVER = CodedValue(
    "4", DCM, "Application Server process tier in a multi-tier system")


def transaction_code(transaction: str, name: str) -> CodedValue:
    """EventTypeCode / IDTypeCode of an IHE transaction: (ITI-18, IHE Transactions, name)."""
    return CodedValue(transaction, IHE_TRANSACTIONS, name)


@dataclass(frozen=True)
class ActiveParticipant:
    user_id: str
    role: CodedValue | None = None
    user_is_requestor: bool = False
    alternative_user_id: str | None = None
    user_name: str | None = None
    # NetworkAccessPointTypeCode: 1 machine name, 2 IP address
    network_access_point_id: str | None = None
    network_access_point_type: int | None = None
    extra_roles: tuple[CodedValue, ...] = ()


@dataclass(frozen=True)
class ParticipantObject:
    object_id: str
    id_type: CodedValue
    type_code: int
    role: int
    name: str | None = None
    query: bytes | None = None  # ParticipantObjectQuery, written base64
    details: tuple[tuple[str, bytes], ...] = ()  # ParticipantObjectDetail type, value
    description: str | None = None


@dataclass(frozen=True)
class AuditMessage:
    event_id: CodedValue
    action: str  # C R U D E
    outcome: int
    event_type: CodedValue
    participants: tuple[ActiveParticipant, ...]
    audit_source_id: str
    objects: tuple[ParticipantObject, ...] = ()
    event_time: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    enterprise_site_id: str | None = None
    purpose_of_use: tuple[CodedValue, ...] = ()


def _coded(parent: etree._Element, tag: str, value: CodedValue) -> etree._Element:
    el = etree.SubElement(parent, tag)
    el.set("csd-code", value.code)
    el.set("codeSystemName", value.system)
    el.set("originalText", value.text)
    return el


def _time(t: dt.datetime) -> str:
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clean(text: str) -> str:
    """XML 1.0 cannot carry control characters; an attacker-supplied value may hold some."""
    return "".join(ch if ch in "\t\n\r" or ord(ch) >= 0x20 else "\ufffd" for ch in text
                   if not 0xD800 <= ord(ch) <= 0xDFFF and ch not in "\ufffe\uffff")


def to_element(message: AuditMessage) -> etree._Element:
    """The AuditMessage element (DICOM PS3.15 A.5.1 schema order)."""
    if message.outcome not in OUTCOMES:
        raise ValueError(f"EventOutcomeIndicator {message.outcome} is not 0, 4, 8 or 12")
    root = etree.Element("AuditMessage")
    ev = etree.SubElement(root, "EventIdentification")
    ev.set("EventActionCode", message.action)
    ev.set("EventDateTime", _time(message.event_time))
    ev.set("EventOutcomeIndicator", str(message.outcome))
    _coded(ev, "EventID", message.event_id)
    _coded(ev, "EventTypeCode", message.event_type)
    for purpose in message.purpose_of_use:
        _coded(ev, "PurposeOfUse", purpose)
    for p in message.participants:
        ap = etree.SubElement(root, "ActiveParticipant")
        ap.set("UserID", _clean(p.user_id))
        if p.alternative_user_id:
            ap.set("AlternativeUserID", _clean(p.alternative_user_id))
        if p.user_name:
            ap.set("UserName", _clean(p.user_name))
        ap.set("UserIsRequestor", "true" if p.user_is_requestor else "false")
        if p.network_access_point_id:
            ap.set("NetworkAccessPointID", _clean(p.network_access_point_id))
            ap.set("NetworkAccessPointTypeCode", str(p.network_access_point_type or 2))
        for role in ((p.role,) if p.role else ()) + p.extra_roles:
            _coded(ap, "RoleIDCode", role)
    src = etree.SubElement(root, "AuditSourceIdentification")
    if message.enterprise_site_id:
        src.set("AuditEnterpriseSiteID", _clean(message.enterprise_site_id))
    src.set("AuditSourceID", _clean(message.audit_source_id))
    _coded(src, "AuditSourceTypeCode", AUDIT_SOURCE_APPLICATION_SERVER)
    for o in message.objects:
        po = etree.SubElement(root, "ParticipantObjectIdentification")
        po.set("ParticipantObjectID", _clean(o.object_id))
        po.set("ParticipantObjectTypeCode", str(o.type_code))
        po.set("ParticipantObjectTypeCodeRole", str(o.role))
        _coded(po, "ParticipantObjectIDTypeCode", o.id_type)
        if o.name:
            etree.SubElement(po, "ParticipantObjectName").text = _clean(o.name)
        if o.query is not None:
            etree.SubElement(po, "ParticipantObjectQuery").text = (
                base64.b64encode(o.query).decode("ascii"))
        for kind, value in o.details:
            d = etree.SubElement(po, "ParticipantObjectDetail")
            d.set("type", kind)
            d.set("value", base64.b64encode(value).decode("ascii"))
        if o.description:
            etree.SubElement(po, "ParticipantObjectDescription").text = _clean(o.description)
    return root


def render(message: AuditMessage) -> bytes:
    """The AuditMessage XML as UTF-8 bytes on one line (a syslog MSG body)."""
    return etree.tostring(to_element(message), encoding="utf-8", xml_declaration=False)


def parse(data: bytes) -> etree._Element:
    """An AuditMessage read back with the hardened parser (tests, tools)."""
    from gateway.ebrim.xmlsafe import parse_xml

    root = parse_xml(data)
    if root.tag != "AuditMessage":
        raise ValueError(f"not an AuditMessage: {root.tag}")
    return root
