"""ITI-18 stored query semantics, on data built to tell right from almost-right: every one of
the fourteen queries through the real handler (`stored_query`), on SQLite and PostgreSQL
(`registry_store`), each response checked against the official schemas.

Coverage: AND/OR code slots, time ranges (From inclusive, To exclusive, common DTM
precision), AuthorPerson wildcards, status and objectType, reference ids (CXi with assigning
authority and type), the imaging filters (modality / anatomic region in eventCodeList,
accession / Study Instance UID in referenceIdList), both return types, the lifecycle
associations, and the error codes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from lxml import etree

from gateway.config import CommunityConfig, GatewayConfig, RegistryConfig
from gateway.ebrim import build
from gateway.ebrim.model import (
    Association,
    Classification,
    ExternalIdentifier,
    ExtrinsicObject,
    Identifiable,
    RegistryPackage,
    Slot,
)
from gateway.ns import (
    QUERY,
    RIM,
    RS,
    AssociationType,
    AvailabilityStatus,
    ErrorCode,
    FolderScheme,
    ObjectType,
    ResponseStatus,
    StoredQuery,
)
from gateway.registry import handlers
from gateway.registry.store import RegistryStore
from gateway.services import Services
from gateway.transactions import RequestContext
from tests.support.xsd import assert_valid

AUTH = "1.3.6.1.4.1.21367.13.20.1000"
PID = f"P1^^^&{AUTH}&ISO"
PID2 = f"P2^^^&{AUTH}&ISO"
REPO = "1.3.6.1.4.1.21367.2010.1.2.1125"
DCM = "1.2.840.10008.2.16.4"  # DICOM coding scheme (modality), PS3.16
SNOMED = "2.16.840.1.113883.6.96"
CT = build.CodeValue("CT", DCM, "CT")
MR = build.CodeValue("MR", DCM, "MR")
CHEST = build.CodeValue("51185008", SNOMED, "Chest")
HEAD = build.CodeValue("69536005", SNOMED, "Head")
IMAGES = build.CodeValue("IMAGES", "1.3.6.1.4.1.19376.1.2.6.1", "Images")
REPORTS = build.CodeValue("REPORTS", "1.3.6.1.4.1.19376.1.2.6.1", "Reports")
NORMAL = build.CodeValue("N", "2.16.840.1.113883.5.25", "Normal")
RESTRICTED = build.CodeValue("R", "2.16.840.1.113883.5.25", "Restricted")
KOS_FORMAT = build.CodeValue("1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.2.6.1", "KOS")
PDF_FORMAT = build.CodeValue("urn:ihe:iti:xds-sd:pdf:2008", "1.3.6.1.4.1.19376.1.2.3", "PDF")
ACCESSION = "urn:ihe:iti:xds:2013:accession"
STUDY_UID = "urn:ihe:iti:xds:2016:studyInstanceUID"
APPROVED = f"('{AvailabilityStatus.APPROVED}')"
DEPRECATED = f"('{AvailabilityStatus.DEPRECATED}')"
BOTH = f"('{AvailabilityStatus.APPROVED}', '{AvailabilityStatus.DEPRECATED}')"
NS = {"rim": RIM, "rs": RS, "query": QUERY}

_n = itertools.count(1)


# --- building metadata -----------------------------------------------------------------------

def doc(*, pid: str = PID, cls: build.CodeValue = IMAGES, events: Sequence[build.CodeValue] = (),
        refs: Sequence[str] = (), creation: str = "20240115103000", start: str | None = None,
        stop: str | None = None, author: str = "^Welby^Marcus^^^Dr", conf=NORMAL,
        fmt=KOS_FORMAT, on_demand: bool = False) -> ExtrinsicObject:
    n = next(_n)
    de = build.document_entry(build.DocumentEntryValues(
        unique_id=f"2.25.{n}00{n}", patient_id=pid, source_patient_id="L1^^^&1.2.3&ISO",
        mime_type="application/dicom", title=f"doc {n}", class_code=cls,
        type_code=build.CodeValue("18748-4", "2.16.840.1.113883.6.1", "Imaging study"),
        format_code=fmt, confidentiality_code=conf,
        healthcare_facility_type_code=build.CodeValue("22232009", SNOMED, "Hospital"),
        practice_setting_code=build.CodeValue("394914008", SNOMED, "Radiology"),
        creation_time=creation, service_start_time=start, service_stop_time=stop,
        event_codes=tuple(events), reference_ids=tuple(refs),
        authors=(build.Author(person=author),)))
    slots = [*de.slots, Slot("size", ("10",)), Slot("repositoryUniqueId", (REPO,))]
    if not on_demand:
        slots.append(Slot("hash", (f"{n:040x}",)))
    return replace(de, slots=tuple(slots), object_type=ObjectType.ON_DEMAND_DOCUMENT_ENTRY
                   if on_demand else ObjectType.STABLE_DOCUMENT_ENTRY)


def folder(*, pid: str = PID, codes: Sequence[build.CodeValue] = ()) -> RegistryPackage:
    fid = build.new_uuid()
    n = next(_n)
    return RegistryPackage(
        id=fid,
        classifications=(
            Classification(id=build.new_uuid(), classified_object=fid,
                           classification_node=FolderScheme.NODE),
            *(Classification(id=build.new_uuid(), classified_object=fid,
                             classification_scheme=FolderScheme.CODE_LIST,
                             node_representation=c.code,
                             slots=(Slot("codingScheme", (c.scheme,)),)) for c in codes)),
        external_identifiers=(
            ExternalIdentifier(id=build.new_uuid(), registry_object=fid,
                               identification_scheme=FolderScheme.PATIENT_ID, value=pid),
            ExternalIdentifier(id=build.new_uuid(), registry_object=fid,
                               identification_scheme=FolderScheme.UNIQUE_ID,
                               value=f"2.25.9{n}")))


def link(kind: str, source: str, target: str) -> Association:
    return Association(id=build.new_uuid(), association_type=kind, source_object=source,
                       target_object=target)


def submit(store: RegistryStore, *entries: ExtrinsicObject, pid: str = PID,
           folders: Sequence[RegistryPackage] = (), extra: Sequence[Identifiable] = (),
           source_id: str = "1.2.9", submission_time: str = "20240115120000",
           author: str = "^Smith^John", content: build.CodeValue = IMAGES) -> RegistryPackage:
    sub = build.submission(build.SubmissionSetValues(
        unique_id=f"2.25.8{next(_n)}", source_id=source_id, patient_id=pid,
        content_type_code=content, submission_time=submission_time,
        authors=(build.Author(person=author),)), tuple(entries))
    package = next(o for o in sub.objects if isinstance(o, RegistryPackage))
    objects: list[Identifiable] = list(sub.objects)
    for f in folders:
        objects += [f, build.has_member(package.id, f.id)]
    store.submit([*objects, *extra])
    return package


# --- querying through the handler --------------------------------------------------------------

class Registry:
    def __init__(self, store: RegistryStore, tmp_path: Path, max_results: int = 100):
        self.store = store
        self.services = Services(
            config=GatewayConfig(
                community=CommunityConfig(home_community_id="urn:oid:1.2.3.4",
                                          repository_unique_id=REPO,
                                          imaging_source_unique_id="1.2.3.5",
                                          patient_id_assigning_authority=AUTH),
                registry=RegistryConfig(database=store.database_url, max_results=max_results)),
            registry=store, documents=None)  # type: ignore[arg-type]
        self.ctx = RequestContext(endpoint="/xds/registry", action="urn:ihe:iti:2007:"
                                  "RegistryStoredQuery", message_id="urn:uuid:t",
                                  client_subject=None, attachments={}, spool_dir=tmp_path)

    def ask(self, query_id: str, slots: Sequence[tuple[str, Sequence[str]]],
            return_type: str = "LeafClass") -> tuple[str, list[str], etree._Element]:
        root = etree.Element(f"{{{QUERY}}}AdhocQueryRequest", nsmap={"query": QUERY, "rim": RIM})
        etree.SubElement(root, f"{{{QUERY}}}ResponseOption", returnType=return_type,
                         returnComposedObjects="true")
        aq = etree.SubElement(root, f"{{{RIM}}}AdhocQuery", id=query_id)
        for name, values in slots:
            vl = etree.SubElement(etree.SubElement(aq, f"{{{RIM}}}Slot", name=name),
                                  f"{{{RIM}}}ValueList")
            for v in values:
                etree.SubElement(vl, f"{{{RIM}}}Value").text = v
        resp = handlers.stored_query(self.services, self.ctx, root).body
        assert_valid(resp)
        codes = [str(e.get("errorCode")) for e in resp.iterfind(".//rs:RegistryError", NS)]
        return str(resp.get("status")), codes, resp

    def ids(self, query_id: str, *slots: tuple[str, Sequence[str]],
            return_type: str = "LeafClass") -> list[str]:
        status, codes, resp = self.ask(query_id, slots, return_type)
        assert (status, codes) == (ResponseStatus.SUCCESS, []), codes
        objs = resp.find("rim:RegistryObjectList", NS)
        assert objs is not None
        if return_type == "ObjectRef":
            assert all(o.tag == f"{{{RIM}}}ObjectRef" for o in objs)
        else:
            assert all(o.tag != f"{{{RIM}}}ObjectRef" for o in objs)
        return [str(o.get("id")) for o in objs]

    def errors(self, query_id: str, *slots: tuple[str, Sequence[str]],
               return_type: str = "LeafClass") -> tuple[list[str], str]:
        status, codes, resp = self.ask(query_id, slots, return_type)
        assert status == ResponseStatus.FAILURE
        context = " ".join(str(e.get("codeContext")) for e in resp.iterfind(".//rs:RegistryError",
                                                                                NS))
        return codes, context

    def find(self, *slots: tuple[str, Sequence[str]], pid: str = PID, status: str = APPROVED,
             return_type: str = "LeafClass") -> set[str]:
        return set(self.ids(StoredQuery.FIND_DOCUMENTS,
                            ("$XDSDocumentEntryPatientId", [f"'{pid}'"]),
                            ("$XDSDocumentEntryStatus", [status]), *slots,
                            return_type=return_type))


@pytest.fixture
def reg(registry_store: RegistryStore, tmp_path: Path) -> Registry:
    return Registry(registry_store, tmp_path)


def code(c: build.CodeValue) -> str:
    return f"{c.code}^^^{c.scheme}"


def codes(*cs: build.CodeValue) -> str:
    return "(" + ", ".join(f"'{code(c)}'" for c in cs) + ")"


# --- FindDocuments ----------------------------------------------------------------------------

def test_event_codes_or_within_a_slot_and_across_slots(reg: Registry) -> None:
    ct_chest, ct_head, mr_chest = doc(events=[CT, CHEST]), doc(events=[CT, HEAD]), \
        doc(events=[MR, CHEST])
    submit(reg.store, ct_chest, ct_head, mr_chest)
    ev = "$XDSDocumentEntryEventCodeList"
    # Level-1 imaging filters: modality AND anatomic region.
    assert reg.find((ev, [codes(CT)]), (ev, [codes(CHEST)])) == {ct_chest.id}
    # OR inside one slot (one Value with a list, or several Values).
    assert reg.find((ev, [codes(CT, MR)])) == {ct_chest.id, ct_head.id, mr_chest.id}
    assert reg.find((ev, [codes(HEAD), codes(MR)])) == {ct_head.id, mr_chest.id}
    assert reg.find((ev, [codes(CT, MR)]), (ev, [codes(HEAD)])) == {ct_head.id}
    # The same code with another coding scheme is another code.
    other = build.CodeValue("CT", "9.9.9", "CT elsewhere")
    assert reg.find((ev, [codes(other)])) == set()
    assert reg.find((ev, [codes(other)]), (ev, [codes(CHEST)])) == set()


def test_confidentiality_codes_and_or(reg: Registry) -> None:
    normal = doc(conf=NORMAL)
    restricted = doc(conf=RESTRICTED)
    submit(reg.store, normal, restricted)
    cc = "$XDSDocumentEntryConfidentialityCode"
    assert reg.find((cc, [codes(NORMAL)])) == {normal.id}
    assert reg.find((cc, [codes(NORMAL, RESTRICTED)])) == {normal.id, restricted.id}
    assert reg.find((cc, [codes(NORMAL)]), (cc, [codes(RESTRICTED)])) == set()


def test_single_code_parameters_are_or_only(reg: Registry) -> None:
    img, rep = doc(cls=IMAGES), doc(cls=REPORTS)
    submit(reg.store, img, rep)
    assert reg.find(("$XDSDocumentEntryClassCode", [codes(IMAGES)])) == {img.id}
    assert reg.find(("$XDSDocumentEntryClassCode", [codes(IMAGES, REPORTS)])) == {img.id, rep.id}
    codes_, context = reg.errors(
        StoredQuery.FIND_DOCUMENTS, ("$XDSDocumentEntryPatientId", [f"'{PID}'"]),
        ("$XDSDocumentEntryStatus", [APPROVED]),
        ("$XDSDocumentEntryClassCode", [codes(IMAGES)]),
        ("$XDSDocumentEntryClassCode", [codes(REPORTS)]))
    assert codes_ == [ErrorCode.STORED_QUERY_PARAM_NUMBER]
    assert "$XDSDocumentEntryClassCode" in context


@pytest.mark.parametrize("param, attr", [
    ("CreationTime", "creation"), ("ServiceStartTime", "start"), ("ServiceStopTime", "stop")])
def test_time_range_from_inclusive_to_exclusive(reg: Registry, param: str, attr: str) -> None:
    before = doc(**{attr: "20240101095959"})
    at_from = doc(**{attr: "20240101100000"})
    inside = doc(**{attr: "20240101103000"})
    at_to = doc(**{attr: "20240101110000"})
    submit(reg.store, before, at_from, inside, at_to)
    found = reg.find((f"$XDSDocumentEntry{param}From", ["20240101100000"]),
                     (f"$XDSDocumentEntry{param}To", ["20240101110000"]))
    assert found == {at_from.id, inside.id}


def test_time_range_at_the_common_precision(reg: Registry) -> None:
    day = doc(creation="20240101")  # stored shorter than the query values
    second = doc(creation="20240102000000")
    year_before = doc(creation="2023")
    submit(reg.store, day, second, year_before)
    # A stored day compared with a query second: at day precision, 20240101 >= 20240101.
    assert reg.find(("$XDSDocumentEntryCreationTimeFrom", ["20240101120000"])) == \
        {day.id, second.id}
    # Query shorter than the stored value: the stored value is truncated.
    assert reg.find(("$XDSDocumentEntryCreationTimeFrom", ["2024"]),
                    ("$XDSDocumentEntryCreationTimeTo", ["202401020000"])) == {day.id}
    assert reg.find(("$XDSDocumentEntryCreationTimeTo", ["2024"])) == {year_before.id}
    # An entry without the attribute never matches a range on it.
    assert reg.find(("$XDSDocumentEntryServiceStartTimeFrom", ["1900"])) == set()


@pytest.mark.parametrize("bad", ["2024-01-01", "202401011", "20241301", "'yesterday'",
                                 "20240132"])
def test_malformed_time_names_the_parameter(reg: Registry, bad: str) -> None:
    codes_, context = reg.errors(
        StoredQuery.FIND_DOCUMENTS, ("$XDSDocumentEntryPatientId", [f"'{PID}'"]),
        ("$XDSDocumentEntryStatus", [APPROVED]), ("$XDSDocumentEntryCreationTimeFrom", [bad]))
    assert codes_ == [ErrorCode.REGISTRY_ERROR]
    assert "$XDSDocumentEntryCreationTimeFrom" in context


def test_author_person_wildcards(reg: Registry) -> None:
    welby = doc(author="^Welby^Marcus^^^Dr")
    welsh = doc(author="^Welsh^Anna")
    percent = doc(author="^100%^Literal")
    submit(reg.store, welby, welsh, percent)
    ap = "$XDSDocumentEntryAuthorPerson"
    assert reg.find((ap, ["'^Welby^Marcus^^^Dr'"])) == {welby.id}
    assert reg.find((ap, ["'^Wel%'"])) == {welby.id, welsh.id}
    assert reg.find((ap, ["'^Wel_y%'"])) == {welby.id}
    assert reg.find((ap, ["'^Welby'"])) == set()  # no implicit wildcard
    assert reg.find((ap, ["('^Welsh%', '%Marcus%')"])) == {welby.id, welsh.id}
    assert reg.find((ap, ["'%100%'"])) == {percent.id}


def test_status_and_replacement_lifecycle(reg: Registry) -> None:
    original = doc()
    submit(reg.store, original)
    new = doc()
    submit(reg.store, new, extra=[link(AssociationType.RPLC, new.id, original.id)])
    assert reg.find() == {new.id}
    assert reg.find(status=DEPRECATED) == {original.id}
    assert reg.find(status=BOTH) == {new.id, original.id}
    # XFRM_RPLC deprecates too; APND and XFRM do not.
    xr, ap, xf = doc(), doc(), doc()
    submit(reg.store, xr, extra=[link(AssociationType.XFRM_RPLC, xr.id, new.id)])
    submit(reg.store, ap, extra=[link(AssociationType.APND, ap.id, xr.id)])
    submit(reg.store, xf, extra=[link(AssociationType.XFRM, xf.id, xr.id)])
    assert reg.find() == {xr.id, ap.id, xf.id}
    codes_, context = reg.errors(
        StoredQuery.FIND_DOCUMENTS, ("$XDSDocumentEntryPatientId", [f"'{PID}'"]),
        ("$XDSDocumentEntryStatus", ["('urn:oasis:names:tc:ebxml-regrep:StatusType:Gone')"]))
    assert codes_ == [ErrorCode.REGISTRY_ERROR] and "$XDSDocumentEntryStatus" in context


def test_object_type_stable_by_default(reg: Registry) -> None:
    stable, on_demand = doc(), doc(on_demand=True)
    submit(reg.store, stable, on_demand)
    t = "$XDSDocumentEntryType"
    assert reg.find() == {stable.id}
    assert reg.find((t, [f"('{ObjectType.ON_DEMAND_DOCUMENT_ENTRY}')"])) == {on_demand.id}
    assert reg.find((t, [f"('{ObjectType.STABLE_DOCUMENT_ENTRY}', "
                         f"'{ObjectType.ON_DEMAND_DOCUMENT_ENTRY}')"])) == \
        {stable.id, on_demand.id}
    codes_, context = reg.errors(
        StoredQuery.FIND_DOCUMENTS, ("$XDSDocumentEntryPatientId", [f"'{PID}'"]),
        ("$XDSDocumentEntryStatus", [APPROVED]), (t, ["('urn:uuid:not-a-type')"]))
    assert codes_ == [ErrorCode.REGISTRY_ERROR] and t in context


def test_patient_and_return_types(reg: Registry) -> None:
    mine, theirs = doc(), doc(pid=PID2)
    submit(reg.store, mine)
    submit(reg.store, theirs, pid=PID2)
    assert reg.find() == {mine.id}
    assert reg.find(return_type="ObjectRef") == {mine.id}
    assert reg.find(pid=PID2, return_type="ObjectRef") == {theirs.id}


@pytest.mark.parametrize("bad", ["('a'", "'open", "('a' 'b')", "()"])
def test_unbalanced_values_name_the_parameter(reg: Registry, bad: str) -> None:
    codes_, context = reg.errors(
        StoredQuery.FIND_DOCUMENTS, ("$XDSDocumentEntryPatientId", [f"'{PID}'"]),
        ("$XDSDocumentEntryStatus", [APPROVED]), ("$XDSDocumentEntryClassCode", [bad]))
    assert codes_ == [ErrorCode.REGISTRY_ERROR] and "$XDSDocumentEntryClassCode" in context


def test_code_without_scheme_is_malformed(reg: Registry) -> None:
    codes_, context = reg.errors(
        StoredQuery.FIND_DOCUMENTS, ("$XDSDocumentEntryPatientId", [f"'{PID}'"]),
        ("$XDSDocumentEntryStatus", [APPROVED]), ("$XDSDocumentEntryClassCode", ["('IMAGES')"]))
    assert codes_ == [ErrorCode.REGISTRY_ERROR] and "$XDSDocumentEntryClassCode" in context


def test_too_many_results(registry_store: RegistryStore, tmp_path: Path) -> None:
    reg = Registry(registry_store, tmp_path, max_results=2)
    submit(reg.store, doc(), doc())
    assert len(reg.find()) == 2
    submit(reg.store, doc())
    codes_, _ = reg.errors(StoredQuery.FIND_DOCUMENTS,
                           ("$XDSDocumentEntryPatientId", [f"'{PID}'"]),
                           ("$XDSDocumentEntryStatus", [APPROVED]))
    assert codes_ == [ErrorCode.TOO_MANY_RESULTS]


def test_missing_required_parameters(reg: Registry) -> None:
    codes_, context = reg.errors(StoredQuery.FIND_DOCUMENTS,
                                 ("$XDSDocumentEntryPatientId", [f"'{PID}'"]))
    assert codes_ == [ErrorCode.STORED_QUERY_MISSING_PARAM]
    assert "$XDSDocumentEntryStatus" in context
    codes_, _ = reg.errors(StoredQuery.FIND_DOCUMENTS_BY_REFERENCE_ID,
                           ("$XDSDocumentEntryPatientId", [f"'{PID}'"]),
                           ("$XDSDocumentEntryStatus", [APPROVED]))
    assert codes_ == [ErrorCode.STORED_QUERY_MISSING_PARAM]
    codes_, _ = reg.errors(StoredQuery.GET_RELATED_DOCUMENTS,
                           ("$XDSDocumentEntryEntryUUID", ["'urn:uuid:x'"]))
    assert codes_ == [ErrorCode.STORED_QUERY_MISSING_PARAM]


# --- FindDocumentsByReferenceId -----------------------------------------------------------------

def test_reference_ids_accession_and_study_uid(reg: Registry) -> None:
    acc = f"A100^^^&1.2.840.99&ISO^{ACCESSION}"
    study = f"1.2.3.4.5^^^^{STUDY_UID}"
    one = doc(refs=[acc, study])
    # The same number from another assigning authority, and as another id type.
    other_authority = doc(refs=[f"A100^^^&1.2.840.77&ISO^{ACCESSION}"])
    other_type = doc(refs=["A100^^^&1.2.840.99&ISO^urn:ihe:iti:xds:2013:order"])
    submit(reg.store, one, other_authority, other_type)

    def by_ref(*values: str) -> set[str]:
        return set(reg.ids(StoredQuery.FIND_DOCUMENTS_BY_REFERENCE_ID,
                           ("$XDSDocumentEntryPatientId", [f"'{PID}'"]),
                           ("$XDSDocumentEntryStatus", [APPROVED]),
                           ("$XDSDocumentEntryReferenceIdList",
                            ["(" + ", ".join(f"'{v}'" for v in values) + ")"])))

    assert by_ref(acc) == {one.id}
    assert by_ref(study) == {one.id}
    assert by_ref(f"A100^^^&1.2.840.77&ISO^{ACCESSION}") == {other_authority.id}
    assert by_ref(acc, f"A100^^^&1.2.840.77&ISO^{ACCESSION}") == {one.id, other_authority.id}
    assert by_ref(f"A100^^^&1.2.840.99&ISO^{STUDY_UID}") == set()


# --- FindSubmissionSets, FindFolders -------------------------------------------------------------

def test_find_submission_sets(reg: Registry) -> None:
    early = submit(reg.store, doc(), submission_time="20240101100000", source_id="1.1",
                   author="^Smith^John", content=IMAGES)
    at_to = submit(reg.store, doc(), submission_time="20240102100000", source_id="1.2",
                   author="^Jones^Ann", content=REPORTS)
    submit(reg.store, doc(pid=PID2), pid=PID2, submission_time="20240101100000")
    ss = "$XDSSubmissionSet"

    def find(*slots: tuple[str, Sequence[str]], rt: str = "LeafClass") -> set[str]:
        return set(reg.ids(StoredQuery.FIND_SUBMISSION_SETS, (f"{ss}PatientId", [f"'{PID}'"]),
                           (f"{ss}Status", [APPROVED]), *slots, return_type=rt))

    assert find() == {early.id, at_to.id}
    assert find(rt="ObjectRef") == {early.id, at_to.id}
    assert find((f"{ss}SourceId", ["('1.2', '9.9')"])) == {at_to.id}
    assert find((f"{ss}SubmissionTimeFrom", ["20240101100000"]),
                (f"{ss}SubmissionTimeTo", ["20240102100000"])) == {early.id}
    assert find((f"{ss}SubmissionTimeFrom", ["20240101100001"])) == {at_to.id}
    assert find((f"{ss}AuthorPerson", ["'^Jo%'"])) == {at_to.id}
    assert find((f"{ss}ContentType", [codes(IMAGES)])) == {early.id}


def test_find_folders(reg: Registry) -> None:
    both = folder(codes=[CT, CHEST])
    ct_only = folder(codes=[CT])
    submit(reg.store, doc(), folders=[both, ct_only])
    fol = "$XDSFolder"

    def find(*slots: tuple[str, Sequence[str]]) -> set[str]:
        return set(reg.ids(StoredQuery.FIND_FOLDERS, (f"{fol}PatientId", [f"'{PID}'"]),
                           (f"{fol}Status", [APPROVED]), *slots))

    assert find() == {both.id, ct_only.id}
    assert find((f"{fol}CodeList", [codes(CT)]), (f"{fol}CodeList", [codes(CHEST)])) == \
        {both.id}
    assert find((f"{fol}CodeList", [codes(CHEST, MR)])) == {both.id}
    # lastUpdateTime is set by the registry at submission: now.
    assert find((f"{fol}LastUpdateTimeFrom", ["2000"]), (f"{fol}LastUpdateTimeTo", ["2999"])) \
        == {both.id, ct_only.id}
    assert find((f"{fol}LastUpdateTimeTo", ["2000"])) == set()


# --- GetAll and the Get queries -------------------------------------------------------------

def test_get_all_returns_everything_of_the_patient(reg: Registry) -> None:
    a, b, od = doc(fmt=KOS_FORMAT), doc(fmt=PDF_FORMAT, conf=RESTRICTED), doc(on_demand=True)
    f = folder()
    ss = submit(reg.store, a, b, od, folders=[f])
    submit(reg.store, doc(pid=PID2), pid=PID2)

    def get_all(*slots: tuple[str, Sequence[str]]) -> set[str]:
        return set(reg.ids(StoredQuery.GET_ALL, ("$patientId", [f"'{PID}'"]),
                           ("$XDSDocumentEntryStatus", [APPROVED]),
                           ("$XDSSubmissionSetStatus", [APPROVED]),
                           ("$XDSFolderStatus", [APPROVED]), *slots))

    everything = get_all()
    assoc_ids = {x.id for x in reg.store.associations(sources=[ss.id])}
    assert everything == {a.id, b.id, ss.id, f.id} | {
        x.id for x in reg.store.associations(sources=[ss.id]) if x.target_object != od.id}
    assert len(assoc_ids) == 4
    assert get_all(("$XDSDocumentEntryFormatCode", [codes(PDF_FORMAT)])) & {a.id, b.id} == {b.id}
    assert get_all(("$XDSDocumentEntryConfidentialityCode", [codes(NORMAL)])) & \
        {a.id, b.id} == {a.id}
    assert od.id in get_all(("$XDSDocumentEntryType",
                             [f"('{ObjectType.ON_DEMAND_DOCUMENT_ENTRY}')"]))


def test_get_documents_and_not_single_patient(reg: Registry) -> None:
    mine, theirs = doc(), doc(pid=PID2)
    submit(reg.store, mine)
    submit(reg.store, theirs, pid=PID2)
    uuids = f"('{mine.id}', '{theirs.id}')"
    q = StoredQuery.GET_DOCUMENTS
    assert reg.ids(q, ("$XDSDocumentEntryEntryUUID", [f"('{mine.id}')"])) == [mine.id]
    uid = next(x.value for x in mine.external_identifiers if x.value.startswith("2.25."))
    assert reg.ids(q, ("$XDSDocumentEntryUniqueId", [f"('{uid}')"])) == [mine.id]
    codes_, _ = reg.errors(q, ("$XDSDocumentEntryEntryUUID", [uuids]))
    assert codes_ == [ErrorCode.RESULT_NOT_SINGLE_PATIENT]
    assert set(reg.ids(q, ("$XDSDocumentEntryEntryUUID", [uuids]), return_type="ObjectRef")) \
        == {mine.id, theirs.id}
    codes_, _ = reg.errors(q, ("$XDSDocumentEntryEntryUUID", [f"('{mine.id}')"]),
                           ("$XDSDocumentEntryUniqueId", [f"('{uid}')"]))
    assert codes_ == [ErrorCode.STORED_QUERY_PARAM_NUMBER]
    codes_, _ = reg.errors(q, ("$homeCommunityId", ["'urn:oid:1.2.3.4'"]))
    assert codes_ == [ErrorCode.STORED_QUERY_MISSING_PARAM]


def test_folders_queries(reg: Registry) -> None:
    d1, d2 = doc(fmt=KOS_FORMAT), doc(fmt=PDF_FORMAT)
    f = folder()
    ss = submit(reg.store, d1, d2, folders=[f])
    fd1 = link(AssociationType.HAS_MEMBER, f.id, d1.id)
    fd2 = link(AssociationType.HAS_MEMBER, f.id, d2.id)
    reg.store.submit([*build.submission(build.SubmissionSetValues(
        unique_id="2.25.777", source_id="1.2.9", patient_id=PID, content_type_code=IMAGES),
        ()).objects, fd1, fd2])
    fuid = next(x.value for x in f.external_identifiers
                if x.identification_scheme == FolderScheme.UNIQUE_ID)
    assert reg.ids(StoredQuery.GET_FOLDERS, ("$XDSFolderEntryUUID", [f"('{f.id}')"])) == [f.id]
    assert reg.ids(StoredQuery.GET_FOLDERS, ("$XDSFolderUniqueId", [f"('{fuid}')"])) == [f.id]
    contents = reg.ids(StoredQuery.GET_FOLDER_AND_CONTENTS, ("$XDSFolderEntryUUID", [f"'{f.id}'"]))
    assert set(contents) == {f.id, d1.id, d2.id, fd1.id, fd2.id}
    kos_only = reg.ids(StoredQuery.GET_FOLDER_AND_CONTENTS, ("$XDSFolderUniqueId", [f"'{fuid}'"]),
                       ("$XDSDocumentEntryFormatCode", [codes(KOS_FORMAT)]))
    assert set(kos_only) == {f.id, d1.id, fd1.id}
    assert reg.ids(StoredQuery.GET_FOLDERS_FOR_DOCUMENT,
                   ("$XDSDocumentEntryEntryUUID", [f"'{d2.id}'"])) == [f.id]
    assert ss.id  # the first SubmissionSet holds the folder itself


def test_submission_set_queries(reg: Registry) -> None:
    d1, d2 = doc(conf=NORMAL), doc(conf=RESTRICTED)
    f = folder()
    ss = submit(reg.store, d1, d2, folders=[f])
    members = reg.store.associations(sources=[ss.id])
    contents = reg.ids(StoredQuery.GET_SUBMISSION_SET_AND_CONTENTS,
                       ("$XDSSubmissionSetEntryUUID", [f"'{ss.id}'"]))
    assert set(contents) == {ss.id, d1.id, d2.id, f.id} | {a.id for a in members}
    filtered = reg.ids(StoredQuery.GET_SUBMISSION_SET_AND_CONTENTS,
                       ("$XDSSubmissionSetEntryUUID", [f"'{ss.id}'"]),
                       ("$XDSDocumentEntryConfidentialityCode", [codes(RESTRICTED)]))
    assert set(filtered) == {ss.id, d2.id, f.id} | {a.id for a in members
                                                    if a.target_object != d1.id}
    sets = reg.ids(StoredQuery.GET_SUBMISSION_SETS, ("$uuid", [f"('{d1.id}', '{f.id}')"]))
    assert set(sets) == {ss.id} | {a.id for a in members if a.target_object in (d1.id, f.id)}
    codes_, _ = reg.errors(StoredQuery.GET_SUBMISSION_SET_AND_CONTENTS,
                           ("$XDSSubmissionSetEntryUUID", [f"'{ss.id}'"]),
                           ("$XDSSubmissionSetUniqueId", ["'2.25.1'"]))
    assert codes_ == [ErrorCode.STORED_QUERY_PARAM_NUMBER]
    codes_, _ = reg.errors(StoredQuery.GET_SUBMISSION_SET_AND_CONTENTS,
                           ("$XDSSubmissionSetEntryUUID", [f"('{ss.id}', 'urn:uuid:x')"]))
    assert codes_ == [ErrorCode.STORED_QUERY_PARAM_NUMBER]


def test_related_documents_and_associations(reg: Registry) -> None:
    original = doc()
    submit(reg.store, original)
    new, appendix, signature, snapshot = doc(), doc(), doc(), doc()
    rplc = link(AssociationType.RPLC, new.id, original.id)
    apnd = link(AssociationType.APND, appendix.id, new.id)
    signs = link(AssociationType.SIGNS, signature.id, new.id)
    snap = link(AssociationType.IS_SNAPSHOT_OF, snapshot.id, new.id)
    submit(reg.store, new, extra=[rplc])
    submit(reg.store, appendix, signature, snapshot, extra=[apnd, signs, snap])

    def related(*types: str, uuid: str = new.id) -> set[str]:
        return set(reg.ids(StoredQuery.GET_RELATED_DOCUMENTS,
                           ("$XDSDocumentEntryEntryUUID", [f"'{uuid}'"]),
                           ("$AssociationTypes", ["(" + ", ".join(f"'{t}'" for t in types)
                                                  + ")"])))

    assert related(AssociationType.RPLC) == {new.id, original.id, rplc.id}  # deprecated too
    assert related(AssociationType.APND, AssociationType.SIGNS) == \
        {new.id, appendix.id, signature.id, apnd.id, signs.id}
    assert related(AssociationType.IS_SNAPSHOT_OF) == {new.id, snapshot.id, snap.id}
    assert related(AssociationType.XFRM) == set()
    assocs = set(reg.ids(StoredQuery.GET_ASSOCIATIONS, ("$uuid", [f"('{new.id}')"])))
    assert {rplc.id, apnd.id, signs.id, snap.id} <= assocs
    assert all(a.association_type != AssociationType.HAS_MEMBER or a.target_object == new.id
               for a in reg.store.get_objects(list(assocs)) if isinstance(a, Association))
    both = set(reg.ids(StoredQuery.GET_DOCUMENTS_AND_ASSOCIATIONS,
                       ("$XDSDocumentEntryEntryUUID", [f"('{new.id}')"])))
    assert both == {new.id} | assocs
