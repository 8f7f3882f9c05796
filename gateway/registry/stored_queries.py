"""The 14 ITI-18 stored queries: their parameters (ITI TF-2a 3.18.4.1.2.3.7) and how each
runs against the `RegistryStore`.

`QUERIES` maps each stored query id to a `StoredQueryDef`; an id that is not in `QUERIES` is
XDSUnknownStoredQuery (a definition whose `run` is None would be answered with
XDSRegistryError "not supported"). `run(store, params, limit)` returns the matching objects
(LeafClass order); it reads at most `limit` objects per object list so the caller can detect
XDSTooManyResults without loading a whole patient's history. `single_patient` marks the Get
queries whose LeafClass result must not span patients (XDSResultNotSinglePatient).

Beyond the base tables: $homeCommunityId is accepted by every query, $MetadataLevel (1 or 2)
and $XDSAssociationStatus (default Approved) from the Metadata Update option are accepted
where the NIST tools send them, and $XDSDocumentEntryType defaults to stable entries only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from gateway.ebrim.metadata import external_id
from gateway.ebrim.model import Association, ExtrinsicObject, RegistryPackage, Slot
from gateway.errors import XdsError, XdsFailure
from gateway.ns import (
    AssociationType,
    AvailabilityStatus,
    DocumentEntryScheme,
    ErrorCode,
    FolderScheme,
    ObjectType,
    StoredQuery,
    SubmissionSetScheme,
)
from gateway.registry.query_params import Param, ParamKind, QueryParams
from gateway.registry.store import Kind, RegistryStore, StoredObject

RegistryResult = ExtrinsicObject | RegistryPackage | Association
Runner = Callable[[RegistryStore, QueryParams, int], list[RegistryResult]]

S, C, N, ST = ParamKind.STRING, ParamKind.CODE, ParamKind.NUMBER, ParamKind.STATUS
T, OT, ML = ParamKind.TIME, ParamKind.OBJECT_TYPE, ParamKind.METADATA_LEVEL


@dataclass(frozen=True)
class StoredQueryDef:
    name: str
    query_id: str
    params: Mapping[str, Param]
    # Groups of parameters of which exactly one must be given (GetDocuments: uuid or uid).
    one_of: tuple[tuple[str, ...], ...] = ()
    run: Runner | None = field(default=None, compare=False)
    single_patient: bool = False

    def parse(self, slots: Sequence[Slot]) -> QueryParams:
        params = QueryParams.from_slots(slots, self.params)
        errors: list[XdsError] = []
        for group in self.one_of:
            given = [n for n in group if params.has(n)]
            if not given:
                errors.append(XdsError(ErrorCode.STORED_QUERY_MISSING_PARAM,
                                       f"{self.name} needs one of {', '.join(group)}"))
            elif len(given) > 1:
                errors.append(XdsError(ErrorCode.STORED_QUERY_PARAM_NUMBER,
                                       f"{self.name} takes only one of {', '.join(given)}"))
        if errors:
            raise XdsFailure(errors)
        return params


_COMMON = (Param("$homeCommunityId"), Param("$MetadataLevel", kind=ML))


def _params(*ps: Param) -> dict[str, Param]:
    return {p.name: p for p in (*ps, *_COMMON)}


# --- DocumentEntry filters shared by FindDocuments and FindDocumentsByReferenceId ----------

_DE = "$XDSDocumentEntry"
_SS = "$XDSSubmissionSet"
_FOL = "$XDSFolder"
_DE_CODE_PARAMS: dict[str, str] = {
    f"{_DE}ClassCode": DocumentEntryScheme.CLASS_CODE,
    f"{_DE}TypeCode": DocumentEntryScheme.TYPE_CODE,
    f"{_DE}PracticeSettingCode": DocumentEntryScheme.PRACTICE_SETTING_CODE,
    f"{_DE}HealthcareFacilityTypeCode": DocumentEntryScheme.HEALTHCARE_FACILITY_TYPE_CODE,
    f"{_DE}EventCodeList": DocumentEntryScheme.EVENT_CODE_LIST,
    f"{_DE}ConfidentialityCode": DocumentEntryScheme.CONFIDENTIALITY_CODE,
    f"{_DE}FormatCode": DocumentEntryScheme.FORMAT_CODE,
}
_AND_OR = {f"{_DE}EventCodeList", f"{_DE}ConfidentialityCode"}

_FIND_DOCUMENT_FILTERS = (
    Param(f"{_DE}PatientId", required=True),
    *(Param(name, multiple=True, and_or=name in _AND_OR, kind=C) for name in _DE_CODE_PARAMS),
    Param(f"{_DE}CreationTimeFrom", kind=T),
    Param(f"{_DE}CreationTimeTo", kind=T),
    Param(f"{_DE}ServiceStartTimeFrom", kind=T),
    Param(f"{_DE}ServiceStartTimeTo", kind=T),
    Param(f"{_DE}ServiceStopTimeFrom", kind=T),
    Param(f"{_DE}ServiceStopTimeTo", kind=T),
    Param(f"{_DE}AuthorPerson", multiple=True),
    Param(f"{_DE}Status", required=True, multiple=True, kind=ST),
    Param(f"{_DE}Type", multiple=True, kind=OT),
)


def _find_documents(store: RegistryStore, p: QueryParams, limit: int,
                    reference_ids: list[str] | None = None) -> list[RegistryResult]:
    patient = p.single(f"{_DE}PatientId") or ""
    codes = {scheme: p.code_groups(name) for name, scheme in _DE_CODE_PARAMS.items()
             if p.has(name)}
    # ITI TF-2a 3.18.4.1.2.3.6.2: without $XDSDocumentEntryType only stable entries.
    types = _types(p)
    return list(store.find_documents(
        patient,
        p.statuses(f"{_DE}Status"),
        object_types=types,
        codes=codes,
        creation_time=(p.single(f"{_DE}CreationTimeFrom"), p.single(f"{_DE}CreationTimeTo")),
        service_start_time=(p.single(f"{_DE}ServiceStartTimeFrom"),
                            p.single(f"{_DE}ServiceStartTimeTo")),
        service_stop_time=(p.single(f"{_DE}ServiceStopTimeFrom"),
                           p.single(f"{_DE}ServiceStopTimeTo")),
        author_persons=[v.replace("\\", "\\\\") for v in p.values(f"{_DE}AuthorPerson")]
        or None,
        reference_ids=reference_ids,
        limit=limit,
    ))


def run_find_documents(store: RegistryStore, p: QueryParams, limit: int
                       ) -> list[RegistryResult]:
    return _find_documents(store, p, limit)


def run_find_documents_by_reference_id(store: RegistryStore, p: QueryParams, limit: int
                                       ) -> list[RegistryResult]:
    return _find_documents(store, p, limit,
                           reference_ids=p.values(f"{_DE}ReferenceIdList"))


def _types(p: QueryParams) -> list[str]:
    # ITI TF-2a 3.18.4.1.2.3.6.2: without $XDSDocumentEntryType only stable entries.
    return p.values(f"{_DE}Type") or [ObjectType.STABLE_DOCUMENT_ENTRY]


def _assoc_statuses(p: QueryParams) -> list[str]:
    return p.statuses("$XDSAssociationStatus") or [AvailabilityStatus.APPROVED]


def _code_matches(obj: ExtrinsicObject, scheme: str,
                  group: Sequence[tuple[str, str | None]]) -> bool:
    for c in obj.classifications:
        if c.classification_scheme != scheme:
            continue
        cs = next((s.values[0] for s in c.slots if s.name == "codingScheme" and s.values), "")
        if any(c.node_representation == code and (want is None or cs == want)
               for code, want in group):
            return True
    return False


def _document_filter(p: QueryParams) -> Callable[[ExtrinsicObject], bool]:
    """$XDSDocumentEntryFormatCode (OR), ConfidentialityCode (AND/OR) and Type of the Get
    queries that return the contents of a SubmissionSet, a Folder or a patient."""
    groups: list[tuple[str, list[list[tuple[str, str]]]]] = [
        (DocumentEntryScheme.FORMAT_CODE, [[c for g in p.code_groups(f"{_DE}FormatCode")
                                            for c in g]] if p.has(f"{_DE}FormatCode") else []),
        (DocumentEntryScheme.CONFIDENTIALITY_CODE, p.code_groups(f"{_DE}ConfidentialityCode")),
    ]
    types = set(_types(p))

    def keep(obj: ExtrinsicObject) -> bool:
        if (obj.object_type or ObjectType.STABLE_DOCUMENT_ENTRY) not in types:
            return False
        return all(_code_matches(obj, scheme, g) for scheme, gs in groups for g in gs)

    return keep


def _one_by_id_or_uid(store: RegistryStore, p: QueryParams, prefix: str, kind: str
                      ) -> list[StoredObject]:
    """The objects named by `{prefix}EntryUUID` or `{prefix}UniqueId` (one of them is given)."""
    if p.has(f"{prefix}EntryUUID"):
        found = store.get_stored(p.values(f"{prefix}EntryUUID"))
        return [found[i] for i in dict.fromkeys(p.values(f"{prefix}EntryUUID"))
                if i in found and found[i].kind == kind]
    return store.find_by_unique_ids(kind, p.values(f"{prefix}UniqueId"))


def run_get_documents(store: RegistryStore, p: QueryParams, limit: int
                      ) -> list[RegistryResult]:
    if p.has(f"{_DE}LogicalID"):
        return [s.obj for s in store.find_by_lids(Kind.DOCUMENT_ENTRY,
                                                  p.values(f"{_DE}LogicalID"))]
    return [s.obj for s in _one_by_id_or_uid(store, p, _DE, Kind.DOCUMENT_ENTRY)]


def run_get_folders(store: RegistryStore, p: QueryParams, limit: int) -> list[RegistryResult]:
    if p.has(f"{_FOL}LogicalID"):
        return [s.obj for s in store.find_by_lids(Kind.FOLDER, p.values(f"{_FOL}LogicalID"))]
    return [s.obj for s in _one_by_id_or_uid(store, p, _FOL, Kind.FOLDER)]


def run_find_submission_sets(store: RegistryStore, p: QueryParams, limit: int
                             ) -> list[RegistryResult]:
    source_ids = set(p.values(f"{_SS}SourceId"))
    author = p.single(f"{_SS}AuthorPerson")
    found = store.find_objects(
        Kind.SUBMISSION_SET, p.single(f"{_SS}PatientId") or "", p.statuses(f"{_SS}Status"),
        codes={SubmissionSetScheme.CONTENT_TYPE_CODE: [
            [c for g in p.code_groups(f"{_SS}ContentType") for c in g]]}
        if p.has(f"{_SS}ContentType") else None,
        time_column="submission_time",
        time_range=(p.single(f"{_SS}SubmissionTimeFrom"), p.single(f"{_SS}SubmissionTimeTo")),
        author_persons=[author.replace("\\", "\\\\")] if author else None,
        limit=None if source_ids else limit)
    if source_ids:
        found = [o for o in found
                 if external_id(o, SubmissionSetScheme.SOURCE_ID) in source_ids][:limit]
    return list(found)


def run_find_folders(store: RegistryStore, p: QueryParams, limit: int) -> list[RegistryResult]:
    return list(store.find_objects(
        Kind.FOLDER, p.single(f"{_FOL}PatientId") or "", p.statuses(f"{_FOL}Status"),
        codes={FolderScheme.CODE_LIST: p.code_groups(f"{_FOL}CodeList")},
        time_column="last_update_time",
        time_range=(p.single(f"{_FOL}LastUpdateTimeFrom"), p.single(f"{_FOL}LastUpdateTimeTo")),
        limit=limit))


def _linking(store: RegistryStore, ids: Sequence[str], statuses: Sequence[str]
             ) -> list[Association]:
    """The associations whose source is one of `ids` and whose target is one of `ids` or one
    of those associations (a SubmissionSet's HasMember to a Folder-DocumentEntry link)."""
    if not ids:
        return []
    own = set(ids)
    candidates = store.associations(sources=ids, statuses=statuses)
    first = [a for a in candidates if a.target_object in own]
    linked = {a.id for a in first}
    return [a for a in candidates if a.target_object in own or a.target_object in linked]


def run_get_all(store: RegistryStore, p: QueryParams, limit: int) -> list[RegistryResult]:
    pid = p.single("$patientId") or ""
    codes: dict[str, list[list[tuple[str, str]]]] = {}
    if p.has(f"{_DE}FormatCode"):
        codes[DocumentEntryScheme.FORMAT_CODE] = [
            [c for g in p.code_groups(f"{_DE}FormatCode") for c in g]]
    if p.has(f"{_DE}ConfidentialityCode"):
        codes[DocumentEntryScheme.CONFIDENTIALITY_CODE] = p.code_groups(
            f"{_DE}ConfidentialityCode")
    docs = store.find_objects(Kind.DOCUMENT_ENTRY, pid, p.statuses(f"{_DE}Status"),
                              object_types=_types(p), codes=codes, limit=limit)
    sets = store.find_objects(Kind.SUBMISSION_SET, pid, p.statuses(f"{_SS}Status"),
                              limit=limit)
    folders = store.find_objects(Kind.FOLDER, pid, p.statuses(f"{_FOL}Status"), limit=limit)
    objects: list[RegistryResult] = [*docs, *sets, *folders]
    return [*objects, *_linking(store, [o.id for o in objects], _assoc_statuses(p))]


def run_get_associations(store: RegistryStore, p: QueryParams, limit: int
                         ) -> list[RegistryResult]:
    return list(store.associations(either=p.values("$uuid"), statuses=_assoc_statuses(p)))


def run_get_documents_and_associations(store: RegistryStore, p: QueryParams, limit: int
                                       ) -> list[RegistryResult]:
    docs = [s.obj for s in _one_by_id_or_uid(store, p, _DE, Kind.DOCUMENT_ENTRY)]
    assocs = store.associations(either=[d.id for d in docs], statuses=_assoc_statuses(p))
    return [*docs, *assocs]


def run_get_submission_sets(store: RegistryStore, p: QueryParams, limit: int
                            ) -> list[RegistryResult]:
    links = store.associations(targets=p.values("$uuid"), types=[AssociationType.HAS_MEMBER],
                               statuses=_assoc_statuses(p))
    sources = store.get_stored([a.source_object for a in links])
    sets = {i: s for i, s in sources.items() if s.kind == Kind.SUBMISSION_SET}
    return [*(s.obj for s in sets.values()), *(a for a in links if a.source_object in sets)]


def _package_and_contents(store: RegistryStore, p: QueryParams, package: StoredObject
                          ) -> list[RegistryResult]:
    """A SubmissionSet or Folder, its member DocumentEntries (filtered), its member Folders
    and the HasMember associations that lead to the returned members."""
    links = store.associations(sources=[package.id], types=[AssociationType.HAS_MEMBER],
                               statuses=_assoc_statuses(p))
    members = store.get_stored([a.target_object for a in links])
    keep_doc = _document_filter(p)
    docs = [s.obj for s in members.values() if s.kind == Kind.DOCUMENT_ENTRY
            and isinstance(s.obj, ExtrinsicObject) and keep_doc(s.obj)]
    folders = [s.obj for s in members.values() if s.kind == Kind.FOLDER]
    kept = {o.id for o in (*docs, *folders)}
    # SubmissionSet -> (Folder -> DocumentEntry) links, when both ends are returned.
    inner = [s.obj for s in members.values() if isinstance(s.obj, Association)
             and s.obj.target_object in kept
             and (s.obj.source_object in kept or s.obj.source_object == package.id)]
    kept |= {a.id for a in inner}
    chosen = [a for a in links if a.target_object in kept]
    return [package.obj, *docs, *folders, *chosen, *inner]


def run_get_submission_set_and_contents(store: RegistryStore, p: QueryParams, limit: int
                                        ) -> list[RegistryResult]:
    found = _one_by_id_or_uid(store, p, _SS, Kind.SUBMISSION_SET)
    return _package_and_contents(store, p, found[0]) if found else []


def run_get_folder_and_contents(store: RegistryStore, p: QueryParams, limit: int
                                ) -> list[RegistryResult]:
    found = _one_by_id_or_uid(store, p, _FOL, Kind.FOLDER)
    return _package_and_contents(store, p, found[0]) if found else []


def run_get_folders_for_document(store: RegistryStore, p: QueryParams, limit: int
                                 ) -> list[RegistryResult]:
    docs = _one_by_id_or_uid(store, p, _DE, Kind.DOCUMENT_ENTRY)
    links = store.associations(targets=[d.id for d in docs],
                               types=[AssociationType.HAS_MEMBER],
                               statuses=_assoc_statuses(p))
    sources = store.get_stored([a.source_object for a in links])
    return [sources[a.source_object].obj for a in links
            if a.source_object in sources and sources[a.source_object].kind == Kind.FOLDER]


def run_get_related_documents(store: RegistryStore, p: QueryParams, limit: int
                              ) -> list[RegistryResult]:
    docs = _one_by_id_or_uid(store, p, _DE, Kind.DOCUMENT_ENTRY)
    if not docs:
        return []
    doc = docs[0]
    links = store.associations(either=[doc.id], types=p.values("$AssociationTypes"),
                               statuses=_assoc_statuses(p))
    others = store.get_stored([a.target_object if a.source_object == doc.id
                               else a.source_object for a in links])
    keep_doc = _document_filter(p)
    related = {i: s.obj for i, s in others.items() if isinstance(s.obj, ExtrinsicObject)
               and i != doc.id and keep_doc(s.obj)}
    chosen = [a for a in links if a.source_object in related or a.target_object in related]
    if not chosen:
        return []
    return [doc.obj, *related.values(), *chosen]


_ASSOC_STATUS = Param("$XDSAssociationStatus", multiple=True, kind=ST)
_DOC_FILTERS = (
    Param(f"{_DE}FormatCode", multiple=True, kind=C),
    Param(f"{_DE}ConfidentialityCode", multiple=True, and_or=True, kind=C),
    Param(f"{_DE}Type", multiple=True, kind=OT),
)

QUERIES: dict[str, StoredQueryDef] = {
    q.query_id: q for q in (
        StoredQueryDef("FindDocuments", StoredQuery.FIND_DOCUMENTS,
                       _params(*_FIND_DOCUMENT_FILTERS), run=run_find_documents),
        StoredQueryDef("FindDocumentsByReferenceId", StoredQuery.FIND_DOCUMENTS_BY_REFERENCE_ID,
                       _params(*_FIND_DOCUMENT_FILTERS,
                               Param(f"{_DE}ReferenceIdList", required=True, multiple=True)),
                       run=run_find_documents_by_reference_id),
        StoredQueryDef("FindSubmissionSets", StoredQuery.FIND_SUBMISSION_SETS, _params(
            Param(f"{_SS}PatientId", required=True),
            Param(f"{_SS}SourceId", multiple=True),
            Param(f"{_SS}SubmissionTimeFrom", kind=T),
            Param(f"{_SS}SubmissionTimeTo", kind=T),
            Param(f"{_SS}AuthorPerson"),
            Param(f"{_SS}ContentType", multiple=True, kind=C),
            Param(f"{_SS}Status", required=True, multiple=True, kind=ST)),
            run=run_find_submission_sets),
        StoredQueryDef("FindFolders", StoredQuery.FIND_FOLDERS, _params(
            Param(f"{_FOL}PatientId", required=True),
            Param(f"{_FOL}LastUpdateTimeFrom", kind=T),
            Param(f"{_FOL}LastUpdateTimeTo", kind=T),
            Param(f"{_FOL}CodeList", multiple=True, and_or=True, kind=C),
            Param(f"{_FOL}Status", required=True, multiple=True, kind=ST)),
            run=run_find_folders),
        StoredQueryDef("GetAll", StoredQuery.GET_ALL, _params(
            Param("$patientId", required=True),
            Param(f"{_DE}Status", required=True, multiple=True, kind=ST),
            Param(f"{_SS}Status", required=True, multiple=True, kind=ST),
            Param(f"{_FOL}Status", required=True, multiple=True, kind=ST),
            *_DOC_FILTERS, _ASSOC_STATUS),
            run=run_get_all),
        StoredQueryDef("GetDocuments", StoredQuery.GET_DOCUMENTS, _params(
            Param(f"{_DE}EntryUUID", multiple=True),
            Param(f"{_DE}UniqueId", multiple=True),
            Param(f"{_DE}LogicalID", multiple=True)),
            one_of=((f"{_DE}EntryUUID", f"{_DE}UniqueId", f"{_DE}LogicalID"),),
            run=run_get_documents, single_patient=True),
        StoredQueryDef("GetFolders", StoredQuery.GET_FOLDERS, _params(
            Param(f"{_FOL}EntryUUID", multiple=True),
            Param(f"{_FOL}UniqueId", multiple=True),
            Param(f"{_FOL}LogicalID", multiple=True)),
            one_of=((f"{_FOL}EntryUUID", f"{_FOL}UniqueId", f"{_FOL}LogicalID"),),
            run=run_get_folders, single_patient=True),
        StoredQueryDef("GetAssociations", StoredQuery.GET_ASSOCIATIONS, _params(
            Param("$uuid", required=True, multiple=True), _ASSOC_STATUS),
            run=run_get_associations, single_patient=True),
        StoredQueryDef("GetDocumentsAndAssociations",
                       StoredQuery.GET_DOCUMENTS_AND_ASSOCIATIONS, _params(
                           Param(f"{_DE}EntryUUID", multiple=True),
                           Param(f"{_DE}UniqueId", multiple=True), _ASSOC_STATUS),
                       one_of=((f"{_DE}EntryUUID", f"{_DE}UniqueId"),),
                       run=run_get_documents_and_associations, single_patient=True),
        StoredQueryDef("GetSubmissionSets", StoredQuery.GET_SUBMISSION_SETS, _params(
            Param("$uuid", required=True, multiple=True), _ASSOC_STATUS),
            run=run_get_submission_sets, single_patient=True),
        StoredQueryDef("GetSubmissionSetAndContents",
                       StoredQuery.GET_SUBMISSION_SET_AND_CONTENTS, _params(
                           Param(f"{_SS}EntryUUID"),
                           Param(f"{_SS}UniqueId"),
                           *_DOC_FILTERS, _ASSOC_STATUS),
                       one_of=((f"{_SS}EntryUUID", f"{_SS}UniqueId"),),
                       run=run_get_submission_set_and_contents, single_patient=True),
        StoredQueryDef("GetFolderAndContents", StoredQuery.GET_FOLDER_AND_CONTENTS, _params(
            Param(f"{_FOL}EntryUUID"),
            Param(f"{_FOL}UniqueId"),
            *_DOC_FILTERS, _ASSOC_STATUS),
            one_of=((f"{_FOL}EntryUUID", f"{_FOL}UniqueId"),),
            run=run_get_folder_and_contents, single_patient=True),
        StoredQueryDef("GetFoldersForDocument", StoredQuery.GET_FOLDERS_FOR_DOCUMENT, _params(
            Param(f"{_DE}EntryUUID"),
            Param(f"{_DE}UniqueId"), _ASSOC_STATUS),
            one_of=((f"{_DE}EntryUUID", f"{_DE}UniqueId"),),
            run=run_get_folders_for_document, single_patient=True),
        StoredQueryDef("GetRelatedDocuments", StoredQuery.GET_RELATED_DOCUMENTS, _params(
            Param(f"{_DE}EntryUUID"),
            Param(f"{_DE}UniqueId"),
            Param("$AssociationTypes", required=True, multiple=True),
            Param(f"{_DE}Type", multiple=True, kind=OT), _ASSOC_STATUS),
            one_of=((f"{_DE}EntryUUID", f"{_DE}UniqueId"),),
            run=run_get_related_documents, single_patient=True),
    )
}
