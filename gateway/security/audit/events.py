"""Which audit message each transaction gets: pure functions from the exchange to a record.

Owns the mapping transaction -> (EventID, EventActionCode, who is source and who is
destination) of ITI TF-2a/2b and RAD TF-3 "Security Considerations" sections, the
extraction of the participant objects from the request and response bodies (patient id,
submission set unique id, document unique ids with their repository and community, the stored
query with its parameters base64-encoded, Study Instance UIDs), the outcome derived from the
response status, and the human requestor the XUA check leaves on the request context.

`answered_event()` builds the record of a transaction this gateway answers,
`sent_event()` the record of one it sends. Nothing here does I/O and nothing raises on odd
input: a record is written for every exchange, with what could be found.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from lxml import etree

from gateway.ns import (
    RIM,
    RS,
    XDSB,
    XDSI,
    DocumentEntryScheme,
    ResponseStatus,
    SubmissionSetScheme,
    q,
)
from gateway.security.audit import messages as m
from gateway.security.audit.messages import (
    ActiveParticipant,
    AuditMessage,
    CodedValue,
    ParticipantObject,
)

WSA_ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"
XCA_HOME_DETAIL = "urn:ihe:iti:xca:2010:homeCommunityId"
REPOSITORY_DETAIL = "Repository Unique Id"
HOME_DETAIL = "ihe:homeCommunityID"

PATIENT_SLOTS = ("$XDSDocumentEntryPatientId", "$XDSSubmissionSetPatientId",
                 "$XDSFolderPatientId", "$patientId")


@dataclass(frozen=True)
class Kind:
    """How a transaction is audited from one side."""

    event_id: CodedValue
    action: str
    # True when the data flows from the requestor to the responder (queries count as such:
    # the requestor is the Source of ITI-18's record). Retrieves flow the other way.
    requestor_is_source: bool
    objects: str  # "query", "submission", "documents", "study"


# Records of the transactions this gateway answers (its actor is the responder).
ANSWERED: Mapping[str, Kind] = {
    "ITI-18": Kind(m.QUERY, m.ACTION_EXECUTE, True, "query"),
    "ITI-38": Kind(m.QUERY, m.ACTION_EXECUTE, True, "query"),
    "ITI-41": Kind(m.IMPORT, m.ACTION_CREATE, True, "submission"),
    "ITI-42": Kind(m.IMPORT, m.ACTION_CREATE, True, "submission"),
    "ITI-43": Kind(m.EXPORT, m.ACTION_READ, False, "documents"),
    "ITI-39": Kind(m.EXPORT, m.ACTION_READ, False, "documents"),
    "RAD-69": Kind(m.INSTANCES_TRANSFERRED, m.ACTION_READ, False, "study"),
    "RAD-75": Kind(m.INSTANCES_TRANSFERRED, m.ACTION_READ, False, "study"),
}
# Records of the transactions this gateway sends (its actor is the requestor).
SENT: Mapping[str, Kind] = {
    "ITI-18": Kind(m.QUERY, m.ACTION_EXECUTE, True, "query"),
    "ITI-38": Kind(m.QUERY, m.ACTION_EXECUTE, True, "query"),
    "ITI-41": Kind(m.EXPORT, m.ACTION_READ, True, "submission"),
    "ITI-42": Kind(m.EXPORT, m.ACTION_READ, True, "submission"),
    "ITI-43": Kind(m.IMPORT, m.ACTION_CREATE, False, "documents"),
    "ITI-39": Kind(m.IMPORT, m.ACTION_CREATE, False, "documents"),
    "RAD-69": Kind(m.INSTANCES_ACCESSED, m.ACTION_READ, False, "study"),
    "RAD-75": Kind(m.INSTANCES_ACCESSED, m.ACTION_READ, False, "study"),
}


@dataclass(frozen=True)
class Node:
    """This gateway as an audit participant and audit source."""

    audit_source_id: str  # AuditSourceID (the home community id by default)
    host: str  # NetworkAccessPointID of this node (machine name or IP)
    process_id: str  # AlternativeUserID of this node's participant
    enterprise_site_id: str | None = None


@dataclass(frozen=True)
class Peer:
    """The other system of the exchange."""

    user_id: str  # wsa:ReplyTo of a requestor, or the endpoint URL of a responder
    network_access_point: str | None = None
    tls_subject: str | None = None


@dataclass(frozen=True)
class HumanRequestor:
    """The person the XUA assertion names (ITI-40 audit: UserID the NameID, UserName
    alias<user@issuer>, AlternativeUserID the subject-id attribute, roles as RoleIDCode,
    purposes of use in EventIdentification)."""

    user_id: str
    user_name: str | None = None
    alternative_user_id: str | None = None
    roles: tuple[CodedValue, ...] = ()
    purpose_of_use: tuple[CodedValue, ...] = ()


def _coded_values(values: Any) -> tuple[CodedValue, ...]:
    out: list[CodedValue] = []
    for v in values or ():
        if isinstance(v, CodedValue):
            out.append(v)
        elif isinstance(v, tuple | list) and len(v) >= 1:
            code = str(v[0])
            out.append(CodedValue(code, str(v[1]) if len(v) > 1 else "",
                                  str(v[2]) if len(v) > 2 and v[2] else code))
        elif isinstance(v, Mapping) and v.get("code"):
            out.append(CodedValue(str(v["code"]), str(v.get("system") or ""),
                                  str(v.get("text") or v.get("display") or v["code"])))
        elif getattr(v, "code", None):
            code = str(v.code)
            system = getattr(v, "code_system", None) or getattr(v, "system", None) or ""
            text = (getattr(v, "display_name", None) or getattr(v, "text", None)
                    or getattr(v, "display", None) or code)
            out.append(CodedValue(code, str(system), str(text)))
        elif isinstance(v, str) and v:
            out.append(CodedValue(v, "", v))
    return tuple(out)


def human_requestor_of(subject: Any) -> HumanRequestor | None:
    """The human requestor from what the XUA check left on the request context
    (`ctx.xua_subject`, a gateway.security.xua.XuaSubject): `name_id`, `issuer`,
    `subject_id`, `roles`, `purposes_of_use`. Also takes a plain string (the NameID), a
    HumanRequestor or a mapping with the same keys."""
    if subject is None:
        return None
    if isinstance(subject, HumanRequestor):
        return subject
    if isinstance(subject, str):
        return HumanRequestor(subject) if subject else None
    get = subject.get if isinstance(subject, Mapping) else (
        lambda k, d=None: getattr(subject, k, d))
    user_id = get("name_id") or get("user_id")
    if not user_id:
        return None
    issuer = get("issuer")
    alias = get("sp_provided_id") or ""
    user_name = f"{alias}<{user_id}@{issuer}>" if issuer else None
    purposes = get("purposes_of_use") or get("purpose_of_use")
    subject_id = get("subject_id")
    return HumanRequestor(str(user_id), user_name, str(subject_id) if subject_id else None,
                          _coded_values(get("roles")), _coded_values(purposes))


# --- what the bodies tell ----------------------------------------------------------------------

def _local(el: etree._Element) -> str:
    tag = el.tag
    return etree.QName(tag).localname if isinstance(tag, str) else ""


def outcome_of(response_body: etree._Element | None) -> int:
    """EventOutcomeIndicator from a response body: Success 0, PartialSuccess 4, Failure 8;
    a body without a status (or none at all) counts as a serious failure."""
    if response_body is None:
        return m.SERIOUS_FAILURE
    status = response_body.get("status")
    if status is None:
        inner = response_body.find(q(RS, "RegistryResponse"))
        status = inner.get("status") if inner is not None else None
    if status == ResponseStatus.SUCCESS:
        return m.SUCCESS
    if status == ResponseStatus.PARTIAL_SUCCESS:
        return m.MINOR_FAILURE
    return m.SERIOUS_FAILURE


def _slot_values(body: etree._Element, names: Iterable[str]) -> Iterator[tuple[str, str]]:
    wanted = set(names)
    for slot in body.iter(q(RIM, "Slot")):
        name = slot.get("name") or ""
        if name in wanted:
            for v in slot.iter(q(RIM, "Value")):
                if v.text:
                    yield name, v.text.strip()


def _unquote(value: str) -> str:
    """'a^^^&1.2&ISO' -> a^^^&1.2&ISO; ('a','b') -> a (first of a list)."""
    v = value.strip()
    if v.startswith("(") and v.endswith(")"):
        v = v[1:-1].split(",")[0].strip()
    if len(v) >= 2 and v[0] == v[-1] == "'":
        v = v[1:-1].replace("''", "'")
    return v


def query_patient_id(body: etree._Element) -> str | None:
    for _name, value in _slot_values(body, PATIENT_SLOTS):
        pid = _unquote(value)
        if pid:
            return pid
    return None


def _external_ids(body: etree._Element, scheme: str) -> list[str]:
    return [ei.get("value") or "" for ei in body.iter(q(RIM, "ExternalIdentifier"))
            if ei.get("identificationScheme") == scheme and ei.get("value")]


def submission_patient_id(body: etree._Element) -> str | None:
    ids = (_external_ids(body, SubmissionSetScheme.PATIENT_ID)
           or _external_ids(body, DocumentEntryScheme.PATIENT_ID))
    return ids[0] if ids else None


def submission_set_unique_ids(body: etree._Element) -> list[str]:
    return _external_ids(body, SubmissionSetScheme.UNIQUE_ID)


@dataclass(frozen=True)
class DocumentRef:
    document_unique_id: str
    repository_unique_id: str | None = None
    home_community_id: str | None = None
    study_instance_uid: str | None = None


def _child_text(el: etree._Element, local: str) -> str | None:
    child = el.find(q(XDSB, local))
    return child.text.strip() if child is not None and child.text else None


def document_requests(body: etree._Element) -> list[DocumentRef]:
    """xds-b:DocumentRequest of ITI-43/39 and of RAD-69/75 (with their study)."""
    out: list[DocumentRef] = []
    for dr in body.iter(q(XDSB, "DocumentRequest")):
        uid = _child_text(dr, "DocumentUniqueId")
        if not uid:
            continue
        study = None
        for anc in dr.iterancestors(q(XDSI, "StudyRequest")):
            study = anc.get("studyInstanceUID")
            break
        out.append(DocumentRef(uid, _child_text(dr, "RepositoryUniqueId"),
                               _child_text(dr, "HomeCommunityId"), study))
    return out


def document_responses(body: etree._Element) -> list[DocumentRef]:
    """The documents a RetrieveDocumentSetResponse returned."""
    out: list[DocumentRef] = []
    for dr in body.iter(q(XDSB, "DocumentResponse")):
        uid = _child_text(dr, "DocumentUniqueId")
        if uid:
            out.append(DocumentRef(uid, _child_text(dr, "RepositoryUniqueId"),
                                   _child_text(dr, "HomeCommunityId")))
    return out


def study_instance_uids(body: etree._Element) -> list[str]:
    seen: list[str] = []
    for study in body.iter(q(XDSI, "StudyRequest")):
        uid = study.get("studyInstanceUID")
        if uid and uid not in seen:
            seen.append(uid)
    return seen


def query_id(body: etree._Element) -> str:
    for aq in body.iter(q(RIM, "AdhocQuery")):
        return aq.get("id") or ""
    return ""


def query_home_community_id(body: etree._Element) -> str | None:
    for aq in body.iter(q(RIM, "AdhocQuery")):
        return aq.get("home")
    return None


# --- participant objects -----------------------------------------------------------------------

def patient_object(patient_id: str) -> ParticipantObject:
    return ParticipantObject(patient_id, m.PATIENT_NUMBER, m.TYPE_PERSON, m.ROLE_PATIENT)


def query_object(transaction: str, title: str, body: etree._Element) -> ParticipantObject:
    details: list[tuple[str, bytes]] = [("QueryEncoding", b"UTF-8")]
    home = query_home_community_id(body)
    if home:
        details.append((XCA_HOME_DETAIL, home.encode("utf-8")))
    return ParticipantObject(
        query_id(body), m.transaction_code(transaction, title), m.TYPE_SYSTEM_OBJECT,
        m.ROLE_QUERY, query=etree.tostring(body, encoding="utf-8"), details=tuple(details))


def submission_object(unique_id: str) -> ParticipantObject:
    return ParticipantObject(unique_id, m.SUBMISSION_SET_NODE, m.TYPE_SYSTEM_OBJECT,
                             m.ROLE_JOB)


def document_object(ref: DocumentRef) -> ParticipantObject:
    details: list[tuple[str, bytes]] = []
    if ref.repository_unique_id:
        details.append((REPOSITORY_DETAIL, ref.repository_unique_id.encode("utf-8")))
    if ref.home_community_id:
        details.append((HOME_DETAIL, ref.home_community_id.encode("utf-8")))
    return ParticipantObject(ref.document_unique_id, m.REPORT_NUMBER, m.TYPE_SYSTEM_OBJECT,
                             m.ROLE_REPORT, details=tuple(details))


def study_object(study_uid: str, refs: Iterable[DocumentRef] = ()) -> ParticipantObject:
    sops = [r.document_unique_id for r in refs if r.study_instance_uid == study_uid]
    return ParticipantObject(study_uid, m.STUDY_INSTANCE_UID, m.TYPE_SYSTEM_OBJECT,
                             m.ROLE_REPORT,
                             description=(f"{len(sops)} instance(s) requested" if sops else None))


def participant_objects(kind: Kind, transaction: str, title: str,
                        request: etree._Element | None,
                        response: etree._Element | None) -> tuple[ParticipantObject, ...]:
    """Patient, query, submission set, documents or studies of one exchange."""
    objs: list[ParticipantObject] = []
    if request is None:
        return ()
    if kind.objects == "query":
        pid = query_patient_id(request)
        if pid:
            objs.append(patient_object(pid))
        objs.append(query_object(transaction, title, request))
    elif kind.objects == "submission":
        pid = submission_patient_id(request)
        if pid:
            objs.append(patient_object(pid))
        objs.extend(submission_object(u) for u in submission_set_unique_ids(request))
    elif kind.objects == "documents":
        refs = document_requests(request)
        if not refs and response is not None:
            refs = document_responses(response)
        objs.extend(document_object(r) for r in refs)
    elif kind.objects == "study":
        refs = document_requests(request)
        objs.extend(study_object(uid, refs) for uid in study_instance_uids(request))
    return tuple(objs)


# --- whole records -----------------------------------------------------------------------------

def _participants(kind: Kind, *, requestor: ActiveParticipant, responder: ActiveParticipant,
                  human: HumanRequestor | None) -> tuple[ActiveParticipant, ...]:
    source, destination = (requestor, responder) if kind.requestor_is_source else (
        responder, requestor)
    source = _with_role(source, m.SOURCE_ROLE)
    destination = _with_role(destination, m.DESTINATION_ROLE)
    parts = [source]
    if human is not None:
        parts.append(ActiveParticipant(human.user_id, None, True,
                                       alternative_user_id=human.alternative_user_id,
                                       user_name=human.user_name, extra_roles=human.roles))
    parts.append(destination)
    return tuple(parts)


def _with_role(p: ActiveParticipant, role: CodedValue) -> ActiveParticipant:
    return ActiveParticipant(p.user_id, role, p.user_is_requestor, p.alternative_user_id,
                             p.user_name, p.network_access_point_id,
                             p.network_access_point_type, p.extra_roles)


def _nap_type(address: str | None) -> int:
    if not address:
        return 2
    try:
        ipaddress.ip_address(address.strip("[]"))
        return 2
    except ValueError:
        return 1


def _system(user_id: str, *, requestor: bool, address: str | None,
            alternative: str | None = None, user_name: str | None = None) -> ActiveParticipant:
    return ActiveParticipant(user_id or WSA_ANONYMOUS, None, requestor, alternative, user_name,
                             address, _nap_type(address) if address else None)


def _kind(table: Mapping[str, Kind], transaction: str) -> Kind:
    kind = table.get(transaction)
    if kind is None:
        raise KeyError(f"no audit record defined for {transaction}")
    return kind


def _message(kind: Kind, transaction: str, title: str, *, node: Node,
             requestor: ActiveParticipant, responder: ActiveParticipant,
             request: etree._Element | None, response: etree._Element | None,
             outcome: int | None, human: HumanRequestor | None,
             when: dt.datetime | None) -> AuditMessage:
    """The audit message of one transaction, answered or sent: the two differ only in who
    the requestor and the responder are."""
    return AuditMessage(
        event_id=kind.event_id, action=kind.action,
        outcome=outcome_of(response) if outcome is None else outcome,
        event_type=m.transaction_code(transaction, title),
        participants=_participants(kind, requestor=requestor, responder=responder,
                                   human=human),
        audit_source_id=node.audit_source_id, enterprise_site_id=node.enterprise_site_id,
        objects=participant_objects(kind, transaction, title, request, response),
        event_time=when or dt.datetime.now(dt.UTC),
        purpose_of_use=human.purpose_of_use if human else ())


def answered_event(transaction: str, title: str, *, node: Node, endpoint_url: str,
                   requestor: Peer, request: etree._Element | None,
                   response: etree._Element | None, outcome: int | None = None,
                   human: HumanRequestor | None = None,
                   when: dt.datetime | None = None) -> AuditMessage:
    """The record of `transaction` answered by this gateway at `endpoint_url`."""
    kind = _kind(ANSWERED, transaction)
    req = _system(requestor.user_id, requestor=True, address=requestor.network_access_point,
                  user_name=requestor.tls_subject)
    me = _system(endpoint_url, requestor=False, address=node.host,
                 alternative=node.process_id)
    return _message(kind, transaction, title, node=node, requestor=req, responder=me,
                    request=request, response=response, outcome=outcome, human=human,
                    when=when)


def sent_event(transaction: str, title: str, *, node: Node, endpoint_url: str,
               request: etree._Element | None, response: etree._Element | None,
               outcome: int | None = None, reply_to: str | None = None,
               responder_address: str | None = None, responder_subject: str | None = None,
               human: HumanRequestor | None = None,
               when: dt.datetime | None = None) -> AuditMessage:
    """The record of `transaction` sent by this gateway to `endpoint_url`."""
    kind = _kind(SENT, transaction)
    me = _system(reply_to or WSA_ANONYMOUS, requestor=True, address=node.host,
                 alternative=node.process_id)
    them = _system(endpoint_url, requestor=False, address=responder_address,
                   user_name=responder_subject)
    return _message(kind, transaction, title, node=node, requestor=me, responder=them,
                    request=request, response=response, outcome=outcome, human=human,
                    when=when)
