"""Metadata rules of a Register / Provide and Register submission (ITI TF-3 4.1, 4.2, 4.3).

`validate_submission` returns every problem as an `XdsError` value (never raises for bad
metadata): one SubmissionSet; the required attributes, slots, classifications and external
identifiers of DocumentEntries, the SubmissionSet and Folders; value formats (DTM, OID,
OID^extension, CX with an ISO assigning authority, SHA-1, size); one patient across the
submission; HasMember associations with SubmissionSetStatus; references that resolve; for
ITI-41 the pairing of Documents and DocumentEntries and the hash/size a source may supply.
Every context names the object (id and uniqueId), the attribute, what was found and what was
expected. Also `assign_uuids` (symbolic ids -> urn:uuid) and `with_repository_attributes`.
Only file reads: the SHA-1 of spooled documents, streamed.
"""

from __future__ import annotations

import calendar
import hashlib
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

from gateway.ebrim.metadata import (
    DOCUMENT_ENTRY_TYPES,
    classifications,
    classify_submission,
    external_ids,
    slot_values,
    unique_id,
)
from gateway.ebrim.model import (
    Association,
    Classification,
    DocumentContent,
    ExternalIdentifier,
    ExtrinsicObject,
    Identifiable,
    ObjectRef,
    RegistryObject,
    RegistryPackage,
    Slot,
    SubmitObjectsRequest,
)
from gateway.errors import XdsError
from gateway.ns import (
    AssociationType,
    DocumentEntryScheme,
    ErrorCode,
    FolderScheme,
    ObjectType,
    SubmissionSetScheme,
)

UUID_PREFIX = "urn:uuid:"
OID_MAX = 64
EXTENSION_MAX = 16

_OID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
_DTM = re.compile(r"[0-9]{4}([0-9]{2}([0-9]{2}([0-9]{2}([0-9]{2}([0-9]{2})?)?)?)?)?")
_SHA1 = re.compile(r"[0-9a-fA-F]{40}")
_UUID = re.compile(r"urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                   r"[0-9a-fA-F]{12}")

# (label, scheme, min, max) of coded attributes; max None = unbounded.
_DE_CODES = (
    ("classCode", DocumentEntryScheme.CLASS_CODE, 1, 1),
    ("confidentialityCode", DocumentEntryScheme.CONFIDENTIALITY_CODE, 1, None),
    ("eventCodeList", DocumentEntryScheme.EVENT_CODE_LIST, 0, None),
    ("formatCode", DocumentEntryScheme.FORMAT_CODE, 1, 1),
    ("healthcareFacilityTypeCode", DocumentEntryScheme.HEALTHCARE_FACILITY_TYPE_CODE, 1, 1),
    ("practiceSettingCode", DocumentEntryScheme.PRACTICE_SETTING_CODE, 1, 1),
    ("typeCode", DocumentEntryScheme.TYPE_CODE, 1, 1),
)
_SS_CODES = (("contentTypeCode", SubmissionSetScheme.CONTENT_TYPE_CODE, 1, 1),)
_FD_CODES = (("codeList", FolderScheme.CODE_LIST, 1, None),)

# Single-valued slots and their format checks.
_DE_SINGLE_SLOTS = ("creationTime", "hash", "languageCode", "legalAuthenticator", "size",
                    "serviceStartTime", "serviceStopTime", "sourcePatientId",
                    "repositoryUniqueId", "documentAvailability")

# --- value formats -----------------------------------------------------------------------------


def is_dtm(v: str) -> bool:
    """HL7 V2 DTM as XDS uses it: YYYY[MM[DD[hh[mm[ss]]]]], UTC, every part in range."""
    if not _DTM.fullmatch(v):
        return False
    year = int(v[0:4])
    if len(v) >= 6 and not 1 <= int(v[4:6]) <= 12:
        return False
    if len(v) >= 8 and not 1 <= int(v[6:8]) <= calendar.monthrange(year, int(v[4:6]))[1]:
        return False
    if len(v) >= 10 and int(v[8:10]) > 23:
        return False
    if len(v) >= 12 and int(v[10:12]) > 59:
        return False
    return not (len(v) >= 14 and int(v[12:14]) > 59)


def is_oid(v: str) -> bool:
    return len(v) <= OID_MAX and _OID.fullmatch(v) is not None


def unique_id_problem(v: str, *, extension_allowed: bool) -> str | None:
    """None when `v` is a valid uniqueId (OID, or OID^extension for DocumentEntries)."""
    oid, sep, ext = v.partition("^")
    if sep and not extension_allowed:
        return "an OID without extension"
    if not _OID.fullmatch(oid):
        return "an OID (digits separated by dots, no leading zeros)" + (
            " optionally followed by ^extension" if extension_allowed else "")
    if len(oid) > OID_MAX:
        return f"an OID of at most {OID_MAX} characters (found {len(oid)})"
    if sep and not 0 < len(ext) <= EXTENSION_MAX:
        return f"an extension of 1 to {EXTENSION_MAX} characters (found {len(ext)})"
    return None


def cx_problem(v: str, *, require_iso: bool = True) -> str | None:
    """None when `v` is a CX id^^^&OID&ISO (ITI TF-3 Table 4.2.3.1.7-2)."""
    parts = v.split("^")
    if len(parts) != 4 or not parts[0]:
        return "a CX value id^^^&OID&ISO (CX.1 and CX.4 only)"
    if parts[1] or parts[2]:
        return "CX.2 and CX.3 to be empty"
    aa = parts[3].split("&")
    if not require_iso:
        return None if any(aa) else "an assigning authority in CX.4"
    if len(aa) != 3 or aa[2] != "ISO" or not is_oid(aa[1]):
        return "an assigning authority &OID&ISO in CX.4"
    return None


def sha1_file(path: Path, chunk: int = 1 << 20) -> str:
    """Lower-case hex SHA-1 of a file, read in chunks."""
    h = hashlib.sha1()  # noqa: S324 - SHA-1 is what XDS specifies for the hash slot
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- the checker -------------------------------------------------------------------------------


class _Checker:
    def __init__(self, repository: bool, home_community_id: str | None):
        self.meta = (ErrorCode.REPOSITORY_METADATA_ERROR if repository
                     else ErrorCode.REGISTRY_METADATA_ERROR)
        self.home = home_community_id
        self.errors: list[XdsError] = []

    def add(self, context: str, code: str | None = None) -> None:
        self.errors.append(XdsError(code or self.meta, context))

    @staticmethod
    def who(kind: str, obj: RegistryObject) -> str:
        uid = unique_id(obj)
        return f"{kind} {obj.id}" + (f" (uniqueId {uid})" if uid else "")

    # -- building blocks --

    def codes(self, who: str, obj: RegistryObject,
              spec: Iterable[tuple[str, str, int, int | None]]) -> None:
        for label, scheme, lo, hi in spec:
            found = classifications(obj, scheme)
            if len(found) < lo or (hi is not None and len(found) > hi):
                want = f"exactly {lo}" if lo == hi else f"at least {lo}"
                self.add(f"{who}: {label} (classificationScheme {scheme}) occurs "
                         f"{len(found)} time(s); expected {want}")
            for c in found:
                if not c.node_representation:
                    self.add(f"{who}: {label} Classification {c.id} has an empty "
                             "nodeRepresentation; expected the code value")
                cs = slot_values(c, "codingScheme")
                if len(cs) != 1 or not cs[0].strip():
                    self.add(f"{who}: {label} Classification {c.id} "
                             f"(code {c.node_representation!r}) has codingScheme values "
                             f"{list(cs)}; expected exactly one coding scheme")

    def ident(self, who: str, obj: RegistryObject, label: str, scheme: str) -> str | None:
        found = external_ids(obj, scheme)
        if len(found) != 1:
            self.add(f"{who}: {label} (ExternalIdentifier identificationScheme {scheme}) "
                     f"occurs {len(found)} time(s); expected exactly 1")
            return found[0].value if found else None
        return found[0].value

    def single_slot(self, who: str, obj: RegistryObject, name: str,
                    required: bool) -> str | None:
        vals = slot_values(obj, name)
        if not vals:
            if required:
                self.add(f"{who}: required slot {name} is missing; expected one value")
            return None
        if len(vals) != 1:
            self.add(f"{who}: slot {name} has {len(vals)} values {list(vals)}; "
                     "expected exactly one")
        return vals[0]

    def dtm(self, who: str, name: str, v: str | None) -> None:
        if v is not None and not is_dtm(v):
            self.add(f"{who}: slot {name} value {v!r} is not a valid DTM; expected "
                     "YYYY[MM[DD[hh[mm[ss]]]]] in UTC with each part in range")

    def unique(self, who: str, label: str, v: str | None, *, extension: bool) -> None:
        if v is None:
            return
        problem = unique_id_problem(v, extension_allowed=extension)
        if problem:
            self.add(f"{who}: {label} {v!r} is not valid; expected {problem}")

    def cx(self, who: str, label: str, v: str | None, *, iso: bool = True) -> None:
        if v is None:
            return
        problem = cx_problem(v, require_iso=iso)
        if problem:
            self.add(f"{who}: {label} {v!r} is not valid; expected {problem}")

    def owned(self, who: str, obj: RegistryObject) -> None:
        for c in obj.classifications:
            if c.classified_object != obj.id:
                self.add(f"{who}: nested Classification {c.id} has classifiedObject "
                         f"{c.classified_object!r}; expected {obj.id!r} (its parent)")
        for x in obj.external_identifiers:
            if x.registry_object != obj.id:
                self.add(f"{who}: nested ExternalIdentifier {x.id} has registryObject "
                         f"{x.registry_object!r}; expected {obj.id!r} (its parent)")

    # -- objects --

    def document_entry(self, e: ExtrinsicObject) -> str | None:
        who = self.who("DocumentEntry", e)
        self.owned(who, e)
        if not e.mime_type:
            self.add(f"{who}: attribute mimeType is missing; expected a MIME type")
        stable = e.object_type == ObjectType.STABLE_DOCUMENT_ENTRY
        self.codes(who, e, _DE_CODES)
        pid = self.ident(who, e, "XDSDocumentEntry.patientId", DocumentEntryScheme.PATIENT_ID)
        self.cx(who, "XDSDocumentEntry.patientId", pid)
        uid = self.ident(who, e, "XDSDocumentEntry.uniqueId", DocumentEntryScheme.UNIQUE_ID)
        self.unique(who, "XDSDocumentEntry.uniqueId", uid, extension=True)
        for name in _DE_SINGLE_SLOTS:
            required = name in ("languageCode", "sourcePatientId") or (
                name == "creationTime" and stable)
            v = self.single_slot(who, e, name, required)
            if name in ("creationTime", "serviceStartTime", "serviceStopTime"):
                self.dtm(who, name, v)
            elif name == "sourcePatientId":
                self.cx(who, "slot sourcePatientId", v, iso=False)
            elif name == "hash" and v is not None and not _SHA1.fullmatch(v):
                self.add(f"{who}: slot hash value {v!r} is not a SHA-1; expected 40 "
                         "hexadecimal digits")
            elif name == "size" and v is not None and not v.isdigit():
                self.add(f"{who}: slot size value {v!r} is not a size; expected a "
                         "non-negative integer number of bytes")
            elif name == "languageCode" and v is not None and not v.strip():
                self.add(f"{who}: slot languageCode is empty; expected an RFC 5646 tag")
        return pid

    def submission_set(self, s: RegistryPackage) -> str | None:
        who = self.who("SubmissionSet", s)
        self.owned(who, s)
        self.codes(who, s, _SS_CODES)
        pid = self.ident(who, s, "XDSSubmissionSet.patientId", SubmissionSetScheme.PATIENT_ID)
        self.cx(who, "XDSSubmissionSet.patientId", pid)
        uid = self.ident(who, s, "XDSSubmissionSet.uniqueId", SubmissionSetScheme.UNIQUE_ID)
        self.unique(who, "XDSSubmissionSet.uniqueId", uid, extension=False)
        src = self.ident(who, s, "XDSSubmissionSet.sourceId", SubmissionSetScheme.SOURCE_ID)
        if src is not None and not is_oid(src):
            self.add(f"{who}: XDSSubmissionSet.sourceId {src!r} is not valid; expected an "
                     f"OID of at most {OID_MAX} characters")
        self.dtm(who, "submissionTime", self.single_slot(who, s, "submissionTime", True))
        return pid

    def folder(self, f: RegistryPackage) -> str | None:
        who = self.who("Folder", f)
        self.owned(who, f)
        self.codes(who, f, _FD_CODES)
        pid = self.ident(who, f, "XDSFolder.patientId", FolderScheme.PATIENT_ID)
        self.cx(who, "XDSFolder.patientId", pid)
        uid = self.ident(who, f, "XDSFolder.uniqueId", FolderScheme.UNIQUE_ID)
        self.unique(who, "XDSFolder.uniqueId", uid, extension=False)
        return pid


def _all_ids(objects: Iterable[Identifiable]) -> list[str]:
    ids: list[str] = []
    for o in objects:
        ids.append(o.id)
        if isinstance(o, RegistryObject):
            ids.extend(c.id for c in o.classifications)
            ids.extend(x.id for x in o.external_identifiers)
    return ids


def _references(objects: Iterable[Identifiable]) -> Iterable[tuple[str, str, str]]:
    """(describing text, attribute, referenced id) for every top-level reference (nested
    Classifications / ExternalIdentifiers must point at their parent: checked per object)."""
    for o in objects:
        if isinstance(o, Classification):
            yield f"Classification {o.id}", "classifiedObject", o.classified_object
        elif isinstance(o, ExternalIdentifier):
            yield f"ExternalIdentifier {o.id}", "registryObject", o.registry_object
        elif isinstance(o, Association):
            yield f"Association {o.id}", "sourceObject", o.source_object
            yield f"Association {o.id}", "targetObject", o.target_object


def validate_submission(sub: SubmitObjectsRequest, *,
                        documents: Mapping[str, DocumentContent] | None = None,
                        repository: bool = False,
                        home_community_id: str | None = None) -> list[XdsError]:
    """Every metadata problem of `sub` (empty list: valid).

    `documents` (ITI-41) maps xds-b:Document/@id to its spooled content: each DocumentEntry
    needs one and each needs a DocumentEntry; a hash/size the source supplied must match.
    `repository` selects XDSRepositoryMetadataError over XDSRegistryMetadataError.
    `home_community_id`, when given, is the only `home` a submitted object may carry.
    """
    ck = _Checker(repository, home_community_id)
    objects = sub.objects
    s = classify_submission(objects)

    # identity: unique ids, resolvable references
    # Top-level ids must be unique. Nested Classification / ExternalIdentifier ids only
    # need to be when they are urn:uuid ids or referenced (NIST tools reuse "id_1" per entry).
    ids = _all_ids(objects)
    top = [o.id for o in objects]
    referenced = {ref for _d, _a, ref in _references(objects)}
    seen: set[str] = set()
    reported: set[str] = set()
    top_seen: set[str] = set()
    for i in top:
        if i in top_seen and i not in reported:
            ck.add(f"id {i!r} is used by more than one object in the submission; "
                   "expected unique ids")
            reported.add(i)
        top_seen.add(i)
    for i in ids:
        if i in seen and i not in reported and (i.startswith(UUID_PREFIX) or i in referenced
                                                or i in top_seen):
            ck.add(f"id {i!r} is used by more than one object in the submission; "
                   "expected unique ids")
            reported.add(i)
        seen.add(i)
    for desc, attr, ref in _references(objects):
        if ref not in seen and not ref.startswith(UUID_PREFIX):
            ck.add(f"{desc}: {attr} {ref!r} refers to no object of the submission and is not "
                   "a urn:uuid: id of a registered object", ErrorCode.UNRESOLVED_REFERENCE)
        elif ref.startswith(UUID_PREFIX) and ref not in seen and not _UUID.fullmatch(ref):
            ck.add(f"{desc}: {attr} {ref!r} is not a well-formed urn:uuid: id",
                   ErrorCode.UNRESOLVED_REFERENCE)
    if home_community_id is not None:
        for o in objects:
            if o.home is not None and o.home != home_community_id:
                ck.add(f"{type(o).__name__} {o.id}: home {o.home!r} is not this community "
                       f"({home_community_id!r})")

    # submission set
    if len(s.submission_sets) != 1:
        ck.add(f"the submission has {len(s.submission_sets)} SubmissionSet(s) (RegistryPackage "
               f"classified with {SubmissionSetScheme.NODE}); expected exactly 1")
    ss_pid = ck.submission_set(s.submission_set) if s.submission_set is not None else None
    for o in s.other:
        if isinstance(o, ExtrinsicObject):
            ck.add(f"ExtrinsicObject {o.id}: objectType {o.object_type!r} is not a "
                   f"DocumentEntry type; expected one of {list(DOCUMENT_ENTRY_TYPES)}")
        else:
            ck.add(f"RegistryPackage {o.id} is classified neither as SubmissionSet nor as "
                   "Folder; expected a Classification to one of those nodes")

    # entries and folders, one patient
    members: list[tuple[str, RegistryObject, str | None]] = []
    for e in s.document_entries:
        members.append(("DocumentEntry", e, ck.document_entry(e)))
    for f in s.folders:
        members.append(("Folder", f, ck.folder(f)))
    if ss_pid is not None:
        for kind, obj, pid in members:
            if pid is not None and pid != ss_pid:
                ck.add(f"{ck.who(kind, obj)}: patientId {pid!r} does not match the "
                       f"SubmissionSet patientId {ss_pid!r}", ErrorCode.PATIENT_ID_DOES_NOT_MATCH)

    # HasMember from the SubmissionSet to each entry / folder
    if s.submission_set is not None:
        ss_id = s.submission_set.id
        entry_ids = {e.id for e in s.document_entries}
        linked: set[str] = set()
        for a in s.associations:
            if a.association_type != AssociationType.HAS_MEMBER or a.source_object != ss_id:
                continue
            linked.add(a.target_object)
            status = list(slot_values(a, "SubmissionSetStatus"))
            if a.target_object in entry_ids:
                expected: list[str] | None = ["Original"]  # a new DocumentEntry
            elif a.target_object not in seen:
                # an object already registered: a document by reference, or a folder
                expected = ["Reference"] if status else None
            else:
                expected = None  # a Folder or an Association of this submission
            if expected is not None and status != expected:
                ck.add(f"Association {a.id} (HasMember SubmissionSet -> {a.target_object}): "
                       f"slot SubmissionSetStatus is {status}; expected {expected}")
        for kind, obj, _pid in members:
            if obj.id not in linked:
                ck.add(f"{ck.who(kind, obj)} is not a member of the SubmissionSet; expected "
                       f"a HasMember Association from {ss_id} to {obj.id}")

    # ITI-41: documents and entries pair up; hash and size, if supplied, match
    if documents is not None:
        for e in s.document_entries:
            doc = documents.get(e.id)
            if doc is None:
                ck.add(f"{ck.who('DocumentEntry', e)} has no xds-b:Document with id {e.id!r} "
                       "in the request", ErrorCode.MISSING_DOCUMENT)
                continue
            size = slot_values(e, "size")
            if size and size[0].isdigit() and int(size[0]) != doc.size:
                ck.add(f"{ck.who('DocumentEntry', e)}: slot size {size[0]} does not match the "
                       f"document's {doc.size} bytes", ErrorCode.NON_IDENTICAL_SIZE)
            digest = slot_values(e, "hash")
            if digest and _SHA1.fullmatch(digest[0]):
                actual = doc.sha1 or sha1_file(doc.path)
                if digest[0].lower() != actual:
                    ck.add(f"{ck.who('DocumentEntry', e)}: slot hash {digest[0]} does not "
                           f"match the document's SHA-1 {actual}", ErrorCode.NON_IDENTICAL_HASH)
        entry_ids = {e.id for e in s.document_entries}
        for doc_id in documents:
            if doc_id not in entry_ids:
                ck.add(f"xds-b:Document {doc_id!r} has no DocumentEntry (ExtrinsicObject with "
                       "that id) in the metadata", ErrorCode.MISSING_DOCUMENT_METADATA)
    return ck.errors


# --- id assignment and repository attributes ---------------------------------------------------


def new_uuid() -> str:
    return f"{UUID_PREFIX}{uuid.uuid4()}"


def assign_uuids_map(sub: SubmitObjectsRequest) -> tuple[SubmitObjectsRequest, dict[str, str]]:
    """`assign_uuids`, and the mapping symbolic id -> urn:uuid it applied (ITI-41 needs it to
    pair Documents with their entries)."""
    counts: dict[str, int] = {}
    for i in _all_ids(sub.objects):
        counts[i] = counts.get(i, 0) + 1
    mapping = {i: new_uuid() for i in counts if not i.startswith(UUID_PREFIX)}

    def nested(v: str) -> str:
        # a symbolic nested id used more than once gets a fresh urn:uuid per occurrence
        if not v.startswith(UUID_PREFIX) and counts.get(v, 0) > 1:
            return new_uuid()
        return mapping.get(v, v)

    def m(v: str) -> str:
        return mapping.get(v, v)

    def mo(v: str | None) -> str | None:
        return None if v is None else mapping.get(v, v)

    def cls(c: Classification) -> Classification:
        return replace(c, id=nested(c.id), classified_object=m(c.classified_object))

    def xid(x: ExternalIdentifier) -> ExternalIdentifier:
        return replace(x, id=nested(x.id), registry_object=m(x.registry_object))

    def obj(o: Identifiable) -> Identifiable:
        if isinstance(o, Classification):
            return cls(o)
        if isinstance(o, ExternalIdentifier):
            return xid(o)
        if isinstance(o, ObjectRef):
            return replace(o, id=m(o.id))
        r = replace(o, id=m(o.id), lid=mo(o.lid),
                    classifications=tuple(cls(c) for c in o.classifications),
                    external_identifiers=tuple(xid(x) for x in o.external_identifiers))
        if isinstance(r, Association):
            r = replace(r, source_object=m(r.source_object), target_object=m(r.target_object))
        return r

    return replace(sub, objects=tuple(obj(o) for o in sub.objects)), mapping


def assign_uuids(sub: SubmitObjectsRequest) -> SubmitObjectsRequest:
    """Replace every symbolic id (not starting with urn:uuid:) by a fresh urn:uuid:, the same
    one in every reference to it (ITI TF-3 4.2.1.2: the registry assigns entryUUIDs)."""
    return assign_uuids_map(sub)[0]


def _set_slots(slots: tuple[Slot, ...], new: Iterable[Slot]) -> tuple[Slot, ...]:
    new_t = tuple(new)
    names = {s.name for s in new_t}
    return tuple(s for s in slots if s.name not in names) + new_t


def with_repository_attributes(entry: ExtrinsicObject, size: int, sha1: str,
                               repository_unique_id: str) -> ExtrinsicObject:
    """`entry` with its size, hash and repositoryUniqueId slots set (replacing any given)."""
    return replace(entry, slots=_set_slots(entry.slots, (
        Slot("size", (str(size),)), Slot("hash", (sha1.lower(),)),
        Slot("repositoryUniqueId", (repository_unique_id,)))))
