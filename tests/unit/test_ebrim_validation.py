"""ITI TF-3 metadata rules: valid NIST submissions pass with zero errors; changing one thing
yields exactly the expected error code; uuid assignment and repository attributes."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.ebrim import metadata as M
from gateway.ebrim.model import (
    Association,
    Classification,
    DocumentContent,
    ExternalIdentifier,
    ExtrinsicObject,
    Identifiable,
    RegistryPackage,
    Slot,
    SubmitObjectsRequest,
)
from gateway.ebrim.validation import (
    assign_uuids,
    assign_uuids_map,
    cx_problem,
    is_dtm,
    unique_id_problem,
    validate_submission,
    with_repository_attributes,
)
from gateway.ns import (
    AssociationType,
    DocumentEntryScheme,
    ErrorCode,
    FolderScheme,
    SubmissionSetScheme,
)
from tests.unit.test_ebrim_parse_render import ITI41, load_sor

VALID = sorted([*ITI41.glob("nist/ReposAcceptanceTest-*.xml"),
                *ITI41.glob("nist-kos/idc_init_*.xml"), *ITI41.glob("nist-kos/testdata_*.xml"),
                *ITI41.glob("nist-kos/ids_480?_SelftestPnR_metadata.xml"),
                *ITI41.glob("nist-kos/ids_480?_ValidateMetadata_metadata.xml")])


def load(path: Path) -> SubmitObjectsRequest:
    sub = load_sor(path)
    # NIST leaves the SubmissionSet uniqueId as a placeholder ("SubmissionSet01") for the
    # toolkit to fill: give it a real OID.
    def fix(o: Identifiable) -> Identifiable:
        if not isinstance(o, RegistryPackage):
            return o
        xs = tuple(replace(x, value="1.3.6.1.4.1.21367.2005.3.7.99")
                   if x.identification_scheme == SubmissionSetScheme.UNIQUE_ID
                   and unique_id_problem(x.value, extension_allowed=False) else x
                   for x in o.external_identifiers)
        return replace(o, external_identifiers=xs)
    return replace(sub, objects=tuple(fix(o) for o in sub.objects))


BASE = ITI41 / "nist" / "ReposAcceptanceTest-1113_SubmitFolderwDoc_fol_doc.xml"


@pytest.fixture
def sub() -> SubmitObjectsRequest:
    return load(BASE)


def codes_of(errors) -> list[str]:
    return sorted(e.code for e in errors)


def change(sub: SubmitObjectsRequest, pred: Callable[[Any], bool],
           fn: Callable[[Any], Any]) -> SubmitObjectsRequest:
    out: list[Identifiable] = []
    hit = 0
    for o in sub.objects:
        if pred(o):
            hit += 1
            n = fn(o)
            if n is not None:
                out.append(n)
        else:
            out.append(o)
    assert hit, "mutation matched nothing"
    return replace(sub, objects=tuple(out))


def entry(o: Identifiable) -> bool:
    return M.is_document_entry(o)


def ss(sub: SubmitObjectsRequest) -> Callable[[Identifiable], bool]:
    return lambda o: M.is_submission_set(o, sub.objects)


def folder(sub: SubmitObjectsRequest) -> Callable[[Identifiable], bool]:
    return lambda o: M.is_folder(o, sub.objects)


def set_slot(o, name: str, values: tuple[str, ...] | None):
    slots = tuple(s for s in o.slots if s.name != name)
    if values is not None:
        slots += (Slot(name, values),)
    return replace(o, slots=slots)


def drop_cls(scheme: str):
    return lambda o: replace(o, classifications=tuple(
        c for c in o.classifications if c.classification_scheme != scheme))


def set_xid(scheme: str, value: str):
    return lambda o: replace(o, external_identifiers=tuple(
        replace(x, value=value) if x.identification_scheme == scheme else x
        for x in o.external_identifiers))


# --- valid material ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_nist_submission_has_no_errors(path: Path) -> None:
    assert validate_submission(load(path)) == []


def test_valid_set_is_not_empty() -> None:
    assert len(VALID) >= 20


# --- one change, one error -----------------------------------------------------------------------


@pytest.mark.parametrize("scheme,label", [
    (DocumentEntryScheme.CLASS_CODE, "classCode"),
    (DocumentEntryScheme.CONFIDENTIALITY_CODE, "confidentialityCode"),
    (DocumentEntryScheme.FORMAT_CODE, "formatCode"),
    (DocumentEntryScheme.HEALTHCARE_FACILITY_TYPE_CODE, "healthcareFacilityTypeCode"),
    (DocumentEntryScheme.PRACTICE_SETTING_CODE, "practiceSettingCode"),
    (DocumentEntryScheme.TYPE_CODE, "typeCode"),
])
def test_missing_entry_code(sub: SubmitObjectsRequest, scheme: str, label: str) -> None:
    errs = validate_submission(change(sub, entry, drop_cls(scheme)))
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]
    assert label in errs[0].context and "occurs 0" in errs[0].context
    assert "Document" in errs[0].context and "1.2.42.20181005.1504.2.777.300" in errs[0].context


def test_repository_flag_selects_repository_code(sub: SubmitObjectsRequest) -> None:
    bad = change(sub, entry, drop_cls(DocumentEntryScheme.TYPE_CODE))
    assert codes_of(validate_submission(bad, repository=True)) == [
        ErrorCode.REPOSITORY_METADATA_ERROR]


def test_duplicate_single_code(sub: SubmitObjectsRequest) -> None:
    def dup(o):
        c = next(c for c in o.classifications
                 if c.classification_scheme == DocumentEntryScheme.CLASS_CODE)
        return replace(o, classifications=(*o.classifications, replace(c, id="dupcls")))
    errs = validate_submission(change(sub, entry, dup))
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]
    assert "occurs 2" in errs[0].context


def test_code_without_coding_scheme(sub: SubmitObjectsRequest) -> None:
    def strip(o):
        return replace(o, classifications=tuple(
            replace(c, slots=()) if c.classification_scheme == DocumentEntryScheme.TYPE_CODE
            else c for c in o.classifications))
    errs = validate_submission(change(sub, entry, strip))
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]
    assert "codingScheme" in errs[0].context


@pytest.mark.parametrize("slot", ["creationTime", "languageCode", "sourcePatientId"])
def test_missing_required_entry_slot(sub: SubmitObjectsRequest, slot: str) -> None:
    errs = validate_submission(change(sub, entry, lambda o: set_slot(o, slot, None)))
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]
    assert slot in errs[0].context


@pytest.mark.parametrize("value,ok", [
    ("2004", True), ("200412", True), ("20041224", True), ("2004122408", True),
    ("200412240815", True), ("20041224081559", True),
    ("20041324", False), ("20040230", False), ("2004122424", False), ("20041224081", False),
    ("2004-12-24", False), ("20041224081560", False), ("", False), ("200412240815590", False),
])
def test_creation_time_format(sub: SubmitObjectsRequest, value: str, ok: bool) -> None:
    assert is_dtm(value) is ok
    errs = validate_submission(change(sub, entry, lambda o: set_slot(o, "creationTime",
                                                                     (value,))))
    assert codes_of(errs) == ([] if ok else [ErrorCode.REGISTRY_METADATA_ERROR])


def test_single_valued_slot_with_two_values(sub: SubmitObjectsRequest) -> None:
    errs = validate_submission(change(sub, entry, lambda o: set_slot(
        o, "creationTime", ("20041224", "20041225"))))
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]
    assert "2 values" in errs[0].context


def test_service_time_format(sub: SubmitObjectsRequest) -> None:
    errs = validate_submission(change(sub, entry, lambda o: set_slot(
        o, "serviceStartTime", ("2004122308000",))))
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]


@pytest.mark.parametrize("value,ok", [
    ("1.2.840.113619.2.62", True), ("1.2.3^ext", True), ("1.2.3^" + "x" * 16, True),
    ("1.2.3^" + "x" * 17, False), ("1.2.3^", False), ("1." + "2." * 30 + "33", True),
    ("1." + "2." * 31 + "3", False), ("1.02.3", False), ("abc", False), ("1", False),
])
def test_entry_unique_id_format(sub: SubmitObjectsRequest, value: str, ok: bool) -> None:
    assert (len(value.partition("^")[0]) <= 64) or not ok
    errs = validate_submission(change(sub, entry, set_xid(DocumentEntryScheme.UNIQUE_ID,
                                                          value)))
    assert codes_of(errs) == ([] if ok else [ErrorCode.REGISTRY_METADATA_ERROR])


def test_submission_set_unique_id_has_no_extension(sub: SubmitObjectsRequest) -> None:
    errs = validate_submission(change(sub, ss(sub), set_xid(SubmissionSetScheme.UNIQUE_ID,
                                                            "1.2.3^x")))
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]
    assert "without extension" in errs[0].context


@pytest.mark.parametrize("value,problem", [
    ("P1^^^&1.2.3&ISO", False), ("P1^^^&1.2.3&L", True), ("P1^^^1.2.3", True),
    ("^^^&1.2.3&ISO", True), ("P1^x^^&1.2.3&ISO", True), ("P1", True),
])
def test_cx_format(value: str, problem: bool) -> None:
    assert (cx_problem(value) is not None) is problem


def test_malformed_patient_id_everywhere_consistent(sub: SubmitObjectsRequest) -> None:
    bad = "P1005125143.2^^^&1.3.6.1.4.1.21367.13.20.1000&L"
    s = change(sub, entry, set_xid(DocumentEntryScheme.PATIENT_ID, bad))
    s = change(s, ss(s), set_xid(SubmissionSetScheme.PATIENT_ID, bad))
    s = change(s, folder(s), set_xid(FolderScheme.PATIENT_ID, bad))
    errs = validate_submission(s)
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR] * 3
    assert all("&ISO" in e.context for e in errs)


@pytest.mark.parametrize("which", ["entry", "folder"])
def test_patient_id_mismatch(sub: SubmitObjectsRequest, which: str) -> None:
    other = "OTHER1^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
    if which == "entry":
        s = change(sub, entry, set_xid(DocumentEntryScheme.PATIENT_ID, other))
    else:
        s = change(sub, folder(sub), set_xid(FolderScheme.PATIENT_ID, other))
    errs = validate_submission(s)
    assert codes_of(errs) == [ErrorCode.PATIENT_ID_DOES_NOT_MATCH]
    assert "OTHER1" in errs[0].context


def test_missing_submission_set_patient_id(sub: SubmitObjectsRequest) -> None:
    s = change(sub, ss(sub), lambda o: replace(o, external_identifiers=tuple(
        x for x in o.external_identifiers
        if x.identification_scheme != SubmissionSetScheme.PATIENT_ID)))
    errs = validate_submission(s)
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]
    assert "XDSSubmissionSet.patientId" in errs[0].context


@pytest.mark.parametrize("scheme,label", [
    (SubmissionSetScheme.SOURCE_ID, "sourceId"), (SubmissionSetScheme.UNIQUE_ID, "uniqueId")])
def test_missing_submission_set_identifier(sub: SubmitObjectsRequest, scheme: str,
                                           label: str) -> None:
    s = change(sub, ss(sub), lambda o: replace(o, external_identifiers=tuple(
        x for x in o.external_identifiers if x.identification_scheme != scheme)))
    errs = validate_submission(s)
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]
    assert label in errs[0].context


def test_missing_content_type_code(sub: SubmitObjectsRequest) -> None:
    errs = validate_submission(change(sub, ss(sub),
                                      drop_cls(SubmissionSetScheme.CONTENT_TYPE_CODE)))
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]
    assert "contentTypeCode" in errs[0].context


def test_missing_submission_time(sub: SubmitObjectsRequest) -> None:
    errs = validate_submission(change(sub, ss(sub), lambda o: set_slot(o, "submissionTime",
                                                                       None)))
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]
    assert "submissionTime" in errs[0].context


def test_folder_code_list_required(sub: SubmitObjectsRequest) -> None:
    errs = validate_submission(change(sub, folder(sub), drop_cls(FolderScheme.CODE_LIST)))
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]
    assert "codeList" in errs[0].context


def test_two_submission_sets(sub: SubmitObjectsRequest) -> None:
    pkg = next(o for o in sub.objects if M.is_submission_set(o, sub.objects))
    assert isinstance(pkg, RegistryPackage)
    twin = replace(pkg, id="SS2", classifications=(
        *(replace(c, classified_object="SS2", id=c.id + "b") for c in pkg.classifications),
        Classification("nodeSS2", "SS2", classification_node=SubmissionSetScheme.NODE)),
        external_identifiers=tuple(replace(x, registry_object="SS2", id=x.id + "b")
                                   for x in pkg.external_identifiers))
    errs = validate_submission(replace(sub, objects=(*sub.objects, twin)))
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]
    assert "2 SubmissionSet" in errs[0].context


def test_no_submission_set(sub: SubmitObjectsRequest) -> None:
    s = replace(sub, objects=tuple(o for o in sub.objects
                                   if not (isinstance(o, Classification)
                                           and o.classification_node
                                           == SubmissionSetScheme.NODE)))
    errs = validate_submission(s)
    assert ErrorCode.REGISTRY_METADATA_ERROR in codes_of(errs)
    assert any("0 SubmissionSet" in e.context for e in errs)


def _has_member_to(target: str) -> Callable[[Any], bool]:
    return lambda o: (isinstance(o, Association)
                      and o.association_type == AssociationType.HAS_MEMBER
                      and o.target_object == target)


def _entry_id(sub: SubmitObjectsRequest) -> str:
    return next(o.id for o in sub.objects if M.is_document_entry(o))


def test_missing_has_member_for_entry(sub: SubmitObjectsRequest) -> None:
    from_ss = _has_member_to(_entry_id(sub))
    errs = validate_submission(change(
        sub, lambda o: from_ss(o) and o.source_object == _ss_id(sub), lambda o: None))
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]
    assert "HasMember" in errs[0].context


@pytest.mark.parametrize("status", [(), ("Reference",), ("original",)])
def test_submission_set_status(sub: SubmitObjectsRequest, status: tuple[str, ...]) -> None:
    s = change(sub, lambda o: _has_member_to(_entry_id(sub))(o)
               and o.source_object == _ss_id(sub),
               lambda o: set_slot(o, "SubmissionSetStatus", status or None))
    errs = validate_submission(s)
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]
    assert "SubmissionSetStatus" in errs[0].context


def test_unresolved_symbolic_reference(sub: SubmitObjectsRequest) -> None:
    s = change(sub, lambda o: isinstance(o, Association) and o.target_object == _entry_id(sub)
               and o.source_object != _ss_id(sub),
               lambda o: replace(o, target_object="NoSuchDoc"))
    errs = validate_submission(s)
    assert codes_of(errs) == [ErrorCode.UNRESOLVED_REFERENCE]
    assert "NoSuchDoc" in errs[0].context


def _ss_id(sub: SubmitObjectsRequest) -> str:
    return next(o.id for o in sub.objects if M.is_submission_set(o, sub.objects))


def test_uuid_reference_to_registered_object_is_fine(sub: SubmitObjectsRequest) -> None:
    s = change(sub, lambda o: isinstance(o, Association) and o.target_object == _entry_id(sub)
               and o.source_object != _ss_id(sub),
               lambda o: replace(o, target_object="urn:uuid:0b4c6bcd-1f1e-4d1c-8a8a-1d2b8e7f0a11"))
    assert validate_submission(s) == []


def test_nested_classification_pointing_elsewhere(sub: SubmitObjectsRequest) -> None:
    def move(o):
        cs = list(o.classifications)
        cs[0] = replace(cs[0], classified_object="elsewhere")
        return replace(o, classifications=tuple(cs))
    errs = validate_submission(change(sub, entry, move))
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]
    assert "elsewhere" in errs[0].context


def test_duplicate_top_level_id(sub: SubmitObjectsRequest) -> None:
    a = next(o for o in sub.objects if isinstance(o, Association))
    errs = validate_submission(replace(sub, objects=(*sub.objects, a)))
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]
    assert a.id in errs[0].context


def test_home_community(sub: SubmitObjectsRequest) -> None:
    assert validate_submission(sub, home_community_id="urn:oid:1.2.3") == []
    s = change(sub, entry, lambda o: replace(o, home="urn:oid:9.9"))
    errs = validate_submission(s, home_community_id="urn:oid:1.2.3")
    assert codes_of(errs) == [ErrorCode.REGISTRY_METADATA_ERROR]


# --- ITI-41 documents ---------------------------------------------------------------------------


@pytest.fixture
def doc(tmp_path: Path, sub: SubmitObjectsRequest) -> DocumentContent:
    f = tmp_path / "doc.txt"
    f.write_bytes(b"document content\n" * 1000)
    return DocumentContent(_entry_id(sub), f, f.stat().st_size)


def test_pnr_with_its_document_is_valid(sub: SubmitObjectsRequest,
                                        doc: DocumentContent) -> None:
    assert validate_submission(sub, documents={doc.id: doc}, repository=True) == []


def test_missing_document(sub: SubmitObjectsRequest) -> None:
    errs = validate_submission(sub, documents={}, repository=True)
    assert codes_of(errs) == [ErrorCode.MISSING_DOCUMENT]


def test_document_without_metadata(sub: SubmitObjectsRequest, doc: DocumentContent) -> None:
    extra = replace(doc, id="Orphan")
    errs = validate_submission(sub, documents={doc.id: doc, "Orphan": extra}, repository=True)
    assert codes_of(errs) == [ErrorCode.MISSING_DOCUMENT_METADATA]
    assert "Orphan" in errs[0].context


def test_supplied_hash_and_size_must_match(sub: SubmitObjectsRequest,
                                           doc: DocumentContent) -> None:
    sha1 = hashlib.sha1(doc.path.read_bytes()).hexdigest()
    docs = {doc.id: doc}
    good = change(sub, entry, lambda o: set_slot(set_slot(o, "hash", (sha1.upper(),)),
                                                 "size", (str(doc.size),)))
    assert validate_submission(good, documents=docs, repository=True) == []
    off_hash = "0" + sha1[1:] if sha1[0] != "0" else "1" + sha1[1:]
    bad_hash = change(sub, entry, lambda o: set_slot(o, "hash", (off_hash,)))
    assert codes_of(validate_submission(bad_hash, documents=docs, repository=True)) == [
        ErrorCode.NON_IDENTICAL_HASH]
    bad_size = change(sub, entry, lambda o: set_slot(o, "size", (str(doc.size + 1),)))
    assert codes_of(validate_submission(bad_size, documents=docs, repository=True)) == [
        ErrorCode.NON_IDENTICAL_SIZE]
    not_hex = change(sub, entry, lambda o: set_slot(o, "hash", ("xyz",)))
    assert codes_of(validate_submission(not_hex, documents=docs, repository=True)) == [
        ErrorCode.REPOSITORY_METADATA_ERROR]


# --- uuid assignment, repository attributes ------------------------------------------------------


def _all_refs(sub: SubmitObjectsRequest) -> list[str]:
    out = []
    o: Any
    for o in sub.objects:
        out.append(o.id)
        if isinstance(o, Association):
            out += [o.source_object, o.target_object]
        if isinstance(o, Classification):
            out.append(o.classified_object)
        if isinstance(o, ExternalIdentifier):
            out.append(o.registry_object)
        for c in getattr(o, "classifications", ()):
            out += [c.id, c.classified_object]
        for x in getattr(o, "external_identifiers", ()):
            out += [x.id, x.registry_object]
    return out


@pytest.mark.parametrize("path", [BASE, ITI41 / "nist" /
                                  "ReposAcceptanceTest-1113_SubmitTwoDocs_two_doc.xml"],
                         ids=lambda p: p.name)
def test_assign_uuids(path: Path) -> None:
    sub = load(path)
    out, mapping = assign_uuids_map(sub)
    assert all(r.startswith("urn:uuid:") for r in _all_refs(out))
    ids = [o.id for o in out.objects] + [c.id for o in out.objects
                                         for c in getattr(o, "classifications", ())]
    assert len(ids) == len(set(ids))  # NIST reuses "id_1" per entry: split apart
    assert validate_submission(out) == []
    assert M.classify_submission(out.objects).submission_set is not None
    e = next(o for o in sub.objects if M.is_document_entry(o))
    assert any(o.id == mapping[e.id] for o in out.objects)
    assert assign_uuids(out) == out  # idempotent on urn:uuid ids


def test_with_repository_attributes(sub: SubmitObjectsRequest) -> None:
    e = next(o for o in sub.objects if isinstance(o, ExtrinsicObject))
    e2 = with_repository_attributes(set_slot(e, "size", ("1",)), 42, "AB" * 20, "1.2.3.4")
    assert M.slot_values(e2, "size") == ("42",)
    assert M.slot_values(e2, "hash") == ("ab" * 20,)
    assert M.slot_values(e2, "repositoryUniqueId") == ("1.2.3.4",)
    assert M.slot_value(e2, "creationTime") == M.slot_value(e, "creationTime")
