"""The 14 ITI-18 stored queries: their parameters (ITI TF-2a 3.18.4.1.2.3.7) and, for the
ones this registry answers, how they run against the `RegistryStore`.

`QUERIES` maps each stored query id to a `StoredQueryDef`. A definition whose `run` is None
is a known query the registry does not answer yet (the handler says so with
XDSRegistryError); an id that is not in `QUERIES` is XDSUnknownStoredQuery. `run(store,
params, limit)` returns the matching objects (LeafClass order); it reads at most `limit`
objects per object list so the caller can detect XDSTooManyResults without loading a
whole patient's history.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from gateway.ebrim.model import Association, ExtrinsicObject, RegistryPackage, Slot
from gateway.errors import XdsError, XdsFailure
from gateway.ns import DocumentEntryScheme, ErrorCode, ObjectType, StoredQuery
from gateway.registry.query_params import Param, ParamKind, QueryParams
from gateway.registry.store import RegistryStore

RegistryResult = ExtrinsicObject | RegistryPackage | Association
Runner = Callable[[RegistryStore, QueryParams, int], list[RegistryResult]]

S, C, N, ST = ParamKind.STRING, ParamKind.CODE, ParamKind.NUMBER, ParamKind.STATUS


@dataclass(frozen=True)
class StoredQueryDef:
    name: str
    query_id: str
    params: Mapping[str, Param]
    # Groups of parameters of which exactly one must be given (GetDocuments: uuid or uid).
    one_of: tuple[tuple[str, ...], ...] = ()
    run: Runner | None = field(default=None, compare=False)

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


def _params(*ps: Param) -> dict[str, Param]:
    return {p.name: p for p in ps}


# --- DocumentEntry filters shared by FindDocuments and FindDocumentsByReferenceId ----------

_DE = "$XDSDocumentEntry"
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
    Param(f"{_DE}CreationTimeFrom", kind=N),
    Param(f"{_DE}CreationTimeTo", kind=N),
    Param(f"{_DE}ServiceStartTimeFrom", kind=N),
    Param(f"{_DE}ServiceStartTimeTo", kind=N),
    Param(f"{_DE}ServiceStopTimeFrom", kind=N),
    Param(f"{_DE}ServiceStopTimeTo", kind=N),
    Param(f"{_DE}AuthorPerson", multiple=True),
    Param(f"{_DE}Status", required=True, multiple=True, kind=ST),
    Param(f"{_DE}Type", multiple=True),
    Param("$MetadataLevel", kind=N),
)


def _find_documents(store: RegistryStore, p: QueryParams, limit: int,
                    reference_ids: list[str] | None = None) -> list[RegistryResult]:
    patient = p.single(f"{_DE}PatientId") or ""
    codes = {scheme: p.code_groups(name) for name, scheme in _DE_CODE_PARAMS.items()
             if p.has(name)}
    # ITI TF-2a 3.18.4.1.2.3.6.2: without $XDSDocumentEntryType only stable entries.
    types = p.values(f"{_DE}Type") or [ObjectType.STABLE_DOCUMENT_ENTRY]
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


def run_get_documents(store: RegistryStore, p: QueryParams, limit: int
                      ) -> list[RegistryResult]:
    if p.has(f"{_DE}EntryUUID"):
        found = store.get_objects(p.values(f"{_DE}EntryUUID"))
        return [o for o in found if isinstance(o, ExtrinsicObject)]
    if p.has(f"{_DE}UniqueId"):
        return list(store.find_documents_by_unique_id(p.values(f"{_DE}UniqueId")))
    return list(store.find_documents_by_lid(p.values(f"{_DE}LogicalID")))


_SS = "$XDSSubmissionSet"
_FOL = "$XDSFolder"

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
            Param(f"{_SS}SubmissionTimeFrom", kind=N),
            Param(f"{_SS}SubmissionTimeTo", kind=N),
            Param(f"{_SS}AuthorPerson"),
            Param(f"{_SS}ContentType", multiple=True, kind=C),
            Param(f"{_SS}Status", required=True, multiple=True, kind=ST))),
        StoredQueryDef("FindFolders", StoredQuery.FIND_FOLDERS, _params(
            Param(f"{_FOL}PatientId", required=True),
            Param(f"{_FOL}LastUpdateTimeFrom", kind=N),
            Param(f"{_FOL}LastUpdateTimeTo", kind=N),
            Param(f"{_FOL}CodeList", multiple=True, and_or=True, kind=C),
            Param(f"{_FOL}Status", required=True, multiple=True, kind=ST),
            Param("$MetadataLevel", kind=N))),
        StoredQueryDef("GetAll", StoredQuery.GET_ALL, _params(
            Param("$patientId", required=True),
            Param(f"{_DE}Status", required=True, multiple=True, kind=ST),
            Param(f"{_SS}Status", required=True, multiple=True, kind=ST),
            Param(f"{_FOL}Status", required=True, multiple=True, kind=ST),
            Param(f"{_DE}FormatCode", multiple=True, kind=C),
            Param(f"{_DE}ConfidentialityCode", multiple=True, and_or=True, kind=C),
            Param(f"{_DE}Type", multiple=True),
            Param("$MetadataLevel", kind=N))),
        StoredQueryDef("GetDocuments", StoredQuery.GET_DOCUMENTS, _params(
            Param(f"{_DE}EntryUUID", multiple=True),
            Param(f"{_DE}UniqueId", multiple=True),
            Param(f"{_DE}LogicalID", multiple=True),
            Param("$homeCommunityId"),
            Param("$MetadataLevel", kind=N)),
            one_of=((f"{_DE}EntryUUID", f"{_DE}UniqueId", f"{_DE}LogicalID"),),
            run=run_get_documents),
        StoredQueryDef("GetFolders", StoredQuery.GET_FOLDERS, _params(
            Param(f"{_FOL}EntryUUID", multiple=True),
            Param(f"{_FOL}UniqueId", multiple=True),
            Param(f"{_FOL}LogicalID", multiple=True),
            Param("$homeCommunityId"),
            Param("$MetadataLevel", kind=N)),
            one_of=((f"{_FOL}EntryUUID", f"{_FOL}UniqueId", f"{_FOL}LogicalID"),)),
        StoredQueryDef("GetAssociations", StoredQuery.GET_ASSOCIATIONS, _params(
            Param("$uuid", required=True, multiple=True),
            Param("$homeCommunityId"),
            Param("$MetadataLevel", kind=N))),
        StoredQueryDef("GetDocumentsAndAssociations",
                       StoredQuery.GET_DOCUMENTS_AND_ASSOCIATIONS, _params(
                           Param(f"{_DE}EntryUUID", multiple=True),
                           Param(f"{_DE}UniqueId", multiple=True),
                           Param("$homeCommunityId"),
                           Param("$MetadataLevel", kind=N)),
                       one_of=((f"{_DE}EntryUUID", f"{_DE}UniqueId"),)),
        StoredQueryDef("GetSubmissionSets", StoredQuery.GET_SUBMISSION_SETS, _params(
            Param("$uuid", required=True, multiple=True),
            Param("$homeCommunityId"),
            Param("$MetadataLevel", kind=N))),
        StoredQueryDef("GetSubmissionSetAndContents",
                       StoredQuery.GET_SUBMISSION_SET_AND_CONTENTS, _params(
                           Param(f"{_SS}EntryUUID"),
                           Param(f"{_SS}UniqueId"),
                           Param(f"{_DE}FormatCode", multiple=True, kind=C),
                           Param(f"{_DE}ConfidentialityCode", multiple=True, and_or=True,
                                 kind=C),
                           Param(f"{_DE}Type", multiple=True),
                           Param("$homeCommunityId"),
                           Param("$MetadataLevel", kind=N)),
                       one_of=((f"{_SS}EntryUUID", f"{_SS}UniqueId"),)),
        StoredQueryDef("GetFolderAndContents", StoredQuery.GET_FOLDER_AND_CONTENTS, _params(
            Param(f"{_FOL}EntryUUID"),
            Param(f"{_FOL}UniqueId"),
            Param(f"{_DE}FormatCode", multiple=True, kind=C),
            Param(f"{_DE}ConfidentialityCode", multiple=True, and_or=True, kind=C),
            Param(f"{_DE}Type", multiple=True),
            Param("$homeCommunityId"),
            Param("$MetadataLevel", kind=N)),
            one_of=((f"{_FOL}EntryUUID", f"{_FOL}UniqueId"),)),
        StoredQueryDef("GetFoldersForDocument", StoredQuery.GET_FOLDERS_FOR_DOCUMENT, _params(
            Param(f"{_DE}EntryUUID"),
            Param(f"{_DE}UniqueId"),
            Param("$homeCommunityId"),
            Param("$MetadataLevel", kind=N)),
            one_of=((f"{_DE}EntryUUID", f"{_DE}UniqueId"),)),
        StoredQueryDef("GetRelatedDocuments", StoredQuery.GET_RELATED_DOCUMENTS, _params(
            Param(f"{_DE}EntryUUID"),
            Param(f"{_DE}UniqueId"),
            Param("$AssociationTypes", required=True, multiple=True),
            Param(f"{_DE}Type", multiple=True),
            Param("$homeCommunityId"),
            Param("$MetadataLevel", kind=N)),
            one_of=((f"{_DE}EntryUUID", f"{_DE}UniqueId"),)),
    )
}
