"""RegistryStore on a temporary SQLite file and on a private PostgreSQL server: atomic
submissions, uniqueId conflicts, the RPLC lifecycle and the FindDocuments filters,
on metadata made by gateway.ebrim.build."""

from __future__ import annotations

import multiprocessing
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.ebrim import build
from gateway.ebrim.model import (
    Association,
    ExtrinsicObject,
    Identifiable,
    RegistryPackage,
    Slot,
)
from gateway.errors import XdsFailure
from gateway.ns import (
    AssociationType,
    AvailabilityStatus,
    DocumentEntryScheme,
    ErrorCode,
    ObjectType,
)
from gateway.registry import codec
from gateway.registry.store import Kind, RegistryStore, engine_url

PID = "P1^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
OTHER_PID = "P2^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
REPO = "1.3.6.1.4.1.21367.2010.1.2.1125"
IMAGES = build.CodeValue("IMAGES", "1.3.6.1.4.1.19376.1.2.6.1", "Images")
REPORTS = build.CodeValue("REPORTS", "1.3.6.1.4.1.19376.1.2.6.1", "Reports")


@pytest.fixture
def store(registry_store: RegistryStore) -> RegistryStore:
    """A fresh registry on SQLite and on PostgreSQL (tests/unit/conftest.py)."""
    return registry_store


_counter = iter(range(1, 1_000_000))


def entry(*, pid: str = PID, class_code: build.CodeValue = IMAGES, uid: str | None = None,
          hash_: str = "da39a3ee5e6b4b0d3255bfef95601890afd80709", creation: str = "20240102",
          events: tuple[build.CodeValue, ...] = (), refs: tuple[str, ...] = (),
          author: str = "^Smitty^Gerald^^^") -> ExtrinsicObject:
    n = next(_counter)
    de = build.document_entry(build.DocumentEntryValues(
        unique_id=uid or f"2.25.{uuid.uuid4().int}", patient_id=pid, source_patient_id=pid,
        mime_type="application/dicom", title=f"Study {n}", class_code=class_code,
        type_code=build.CodeValue("18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging"),
        format_code=build.CodeValue("1.2.840.10008.5.1.4.1.1.88.59",
                                    "1.2.840.10008.2.6.1", "KOS"),
        confidentiality_code=build.CodeValue("N", "2.16.840.1.113883.5.25", "Normal"),
        healthcare_facility_type_code=build.CodeValue("22232009", "2.16.840.1.113883.6.96",
                                                      "Hospital"),
        practice_setting_code=build.CodeValue("Practice-A", "1.3.6.1.4.1.21367.2017.3", "A"),
        creation_time=creation, event_codes=events, reference_ids=refs,
        authors=(build.Author(person=author),)))
    return replace(de, slots=(*de.slots, Slot("hash", (hash_,)), Slot("size", ("10",)),
                              Slot("repositoryUniqueId", (REPO,))))


def submission(*entries: ExtrinsicObject, pid: str = PID,
               extra: tuple[Identifiable, ...] = ()) -> list[Identifiable]:
    sub = build.submission(build.SubmissionSetValues(
        unique_id=f"2.25.{uuid.uuid4().int}", source_id="1.2.9", patient_id=pid,
        content_type_code=build.CodeValue("Imaging", "1.2.3", "Imaging")), entries)
    return [*sub.objects, *extra]


def rplc(new: ExtrinsicObject, old_id: str) -> Association:
    return Association(id=build.new_uuid(), association_type=AssociationType.RPLC,
                       source_object=new.id, target_object=old_id)


def codes_of(exc: pytest.ExceptionInfo[XdsFailure]) -> set[str]:
    return {e.code for e in exc.value.errors}


def approved(o: ExtrinsicObject) -> ExtrinsicObject:
    return replace(o, status=AvailabilityStatus.APPROVED)


# --- tests ---------------------------------------------------------------------------------

def test_engine_url_maps_postgresql_to_psycopg() -> None:
    assert engine_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert engine_url("sqlite:///x.db") == "sqlite:///x.db"


def test_codec_round_trip_of_a_document_entry() -> None:
    de = entry(refs=("A1^^^&1.2&ISO^urn:ihe:iti:xds:2013:accession",))
    assert codec.decode(codec.encode(de)) == de
    pkg = next(o for o in submission(de) if isinstance(o, RegistryPackage))
    assert codec.decode(codec.encode(pkg)) == pkg


def test_submit_stores_every_object_and_reads_it_back(store: RegistryStore) -> None:
    de = entry()
    objs = submission(de)
    store.submit(objs)
    assert store.count() == 3  # DocumentEntry, SubmissionSet, HasMember
    assert store.count(Kind.DOCUMENT_ENTRY) == 1
    assert store.get_objects([de.id]) == [approved(de)]
    pkg = next(o for o in objs if isinstance(o, RegistryPackage))
    stored_pkg = store.get_objects([pkg.id])[0]
    # The loose SubmissionSet classification is folded into the package.
    assert any(c.classification_node for c in stored_pkg.classifications)
    assert store.find_documents_by_unique_id([de.external_identifiers[1].value]) == \
        [approved(de)]
    assert store.document_for_retrieve(de.external_identifiers[1].value, REPO) == approved(de)
    assert store.document_for_retrieve(de.external_identifiers[1].value, "1.9.9") is None
    assert store.has_document_with_hash("DA39A3EE5E6B4B0D3255BFEF95601890AFD80709")
    assert not store.has_document_with_hash("0" * 40)
    assocs = store.associations_for([de.id])
    assert [(a.source_object, a.target_object) for a in assocs] == [(pkg.id, de.id)]


def test_duplicate_unique_id_is_rejected(store: RegistryStore) -> None:
    first = entry(uid="1.2.3.99")
    store.submit(submission(first))
    with pytest.raises(XdsFailure) as exc:
        store.submit(submission(entry(uid="1.2.3.99")))
    assert codes_of(exc) == {ErrorCode.DUPLICATE_UNIQUE_ID}
    with pytest.raises(XdsFailure) as exc:
        store.submit(submission(entry(uid="1.2.3.99", hash_="0" * 40)))
    assert codes_of(exc) == {ErrorCode.NON_IDENTICAL_HASH}
    assert store.count(Kind.DOCUMENT_ENTRY) == 1


def test_failed_submission_leaves_nothing_stored(store: RegistryStore) -> None:
    before = store.count()
    de = entry()
    bad = Association(id=build.new_uuid(), association_type=AssociationType.HAS_MEMBER,
                      source_object=de.id, target_object=build.new_uuid())
    with pytest.raises(XdsFailure) as exc:
        store.submit(submission(de, extra=(bad,)))
    assert ErrorCode.UNRESOLVED_REFERENCE in codes_of(exc) or \
        ErrorCode.REGISTRY_METADATA_ERROR in codes_of(exc)
    assert store.count() == before


def test_failure_after_the_inserts_rolls_everything_back(
        store: RegistryStore, monkeypatch: pytest.MonkeyPatch) -> None:
    old = entry()
    store.submit(submission(old))
    before = store.count()
    new = entry()

    def fail(*_args: object) -> None:
        raise XdsFailure([])

    monkeypatch.setattr(store, "_deprecate", fail)
    with pytest.raises(XdsFailure):
        store.submit(submission(new, extra=(rplc(new, old.id),)))
    assert store.count() == before
    assert store.get_objects([new.id]) == []
    assert store.get_objects([old.id])[0].status == AvailabilityStatus.APPROVED


def test_rplc_deprecates_the_original(store: RegistryStore) -> None:
    old = entry()
    store.submit(submission(old))
    new = entry()
    store.submit(submission(new, extra=(rplc(new, old.id),)))
    assert store.get_objects([old.id])[0].status == AvailabilityStatus.DEPRECATED
    assert store.get_objects([new.id])[0].status == AvailabilityStatus.APPROVED
    approved_now = store.find_documents(PID, [AvailabilityStatus.APPROVED])
    assert [d.id for d in approved_now] == [new.id]
    deprecated = store.find_documents(PID, [AvailabilityStatus.DEPRECATED])
    assert [d.id for d in deprecated] == [old.id]
    # Replacing the deprecated one again fails and stores nothing.
    count = store.count()
    newer = entry()
    with pytest.raises(XdsFailure) as exc:
        store.submit(submission(newer, extra=(rplc(newer, old.id),)))
    assert codes_of(exc) == {ErrorCode.REPLACE_FAILED}
    assert store.count() == count


def test_rplc_of_an_unknown_document_is_unresolved(store: RegistryStore) -> None:
    new = entry()
    with pytest.raises(XdsFailure) as exc:
        store.submit(submission(new, extra=(rplc(new, build.new_uuid()),)))
    assert codes_of(exc) == {ErrorCode.UNRESOLVED_REFERENCE}


def test_rplc_across_patients_is_refused(store: RegistryStore) -> None:
    old = entry()
    store.submit(submission(old))
    new = entry(pid=OTHER_PID)
    with pytest.raises(XdsFailure) as exc:
        store.submit(submission(new, pid=OTHER_PID, extra=(rplc(new, old.id),)))
    assert codes_of(exc) == {ErrorCode.PATIENT_ID_DOES_NOT_MATCH}


def test_find_documents_filters(store: RegistryStore) -> None:
    ct = build.CodeValue("CT", "1.2.840.10008.2.16.4", "CT")
    mr = build.CodeValue("MR", "1.2.840.10008.2.16.4", "MR")
    chest = build.CodeValue("T-D3000", "SRT", "Chest")
    a = entry(class_code=IMAGES, creation="20240105", events=(ct, chest),
              refs=("ACC1^^^&1.2.3&ISO^urn:ihe:iti:xds:2013:accession",))
    b = entry(class_code=REPORTS, creation="20230101120000", events=(mr,),
              author="^Ford^Harrison^^^")
    c = entry(pid=OTHER_PID, class_code=IMAGES)
    store.submit(submission(a, b))
    store.submit(submission(c, pid=OTHER_PID))
    approved_ = [AvailabilityStatus.APPROVED]

    def ids(**kw: object) -> list[str]:
        return sorted(d.id for d in store.find_documents(PID, approved_, **kw))  # type: ignore[arg-type]

    assert ids() == sorted([a.id, b.id])
    assert ids(codes={DocumentEntryScheme.CLASS_CODE: [[("IMAGES", IMAGES.scheme)]]}) == [a.id]
    assert ids(codes={DocumentEntryScheme.CLASS_CODE: [[("IMAGES", None)]]}) == [a.id]
    assert ids(codes={DocumentEntryScheme.CLASS_CODE: [[("IMAGES", "9.9")]]}) == []
    assert ids(codes={DocumentEntryScheme.CLASS_CODE: [[("IMAGES", None),
                                                        ("REPORTS", None)]]}) == \
        sorted([a.id, b.id])
    # Event codes: groups ANDed, members ORed.
    ev = DocumentEntryScheme.EVENT_CODE_LIST
    assert ids(codes={ev: [[("CT", None)], [("T-D3000", "SRT")]]}) == [a.id]
    assert ids(codes={ev: [[("MR", None)], [("T-D3000", "SRT")]]}) == []
    assert ids(codes={ev: [[("MR", None), ("CT", None)]]}) == sorted([a.id, b.id])
    assert ids(creation_time=("2024", None)) == [a.id]
    assert ids(creation_time=("20230101", "20240101")) == [b.id]
    assert ids(author_persons=["%Ford%"]) == [b.id]
    assert ids(reference_ids=["ACC1^^^&1.2.3&ISO^urn:ihe:iti:xds:2013:accession"]) == [a.id]
    assert ids(object_types=[ObjectType.ON_DEMAND_DOCUMENT_ENTRY]) == []
    assert ids(object_types=[ObjectType.STABLE_DOCUMENT_ENTRY]) == sorted([a.id, b.id])
    assert store.find_documents(PID, [AvailabilityStatus.DEPRECATED]) == []
    assert len(store.find_documents(PID, approved_, limit=1)) == 1


def test_has_member_to_an_existing_folder_is_allowed(store: RegistryStore) -> None:
    de = entry()
    store.submit(submission(de))
    folder = RegistryPackage(
        id=build.new_uuid(),
        classifications=(),
        external_identifiers=(),
    )
    from gateway.ebrim.model import Classification, ExternalIdentifier
    from gateway.ns import FolderScheme
    folder = replace(folder, external_identifiers=(
        ExternalIdentifier(build.new_uuid(), folder.id, FolderScheme.PATIENT_ID, PID),
        ExternalIdentifier(build.new_uuid(), folder.id, FolderScheme.UNIQUE_ID, "1.2.77")))
    node = Classification(build.new_uuid(), folder.id, classification_node=FolderScheme.NODE)
    store.submit(submission(extra=(folder, node)))
    assert store.count(Kind.FOLDER) == 1
    link = Association(id=build.new_uuid(), association_type=AssociationType.HAS_MEMBER,
                       source_object=folder.id, target_object=de.id)
    store.submit(submission(extra=(link,)))
    assert any(a.id == link.id for a in store.associations_for([folder.id]))
    # A folder of another patient may not take this patient's document.
    with pytest.raises(XdsFailure):
        store.submit(submission(pid=OTHER_PID, extra=(replace(
            link, id=build.new_uuid()),)))


def _submit_many(url: str, n: int, tag: str) -> None:
    store = RegistryStore(url)
    for i in range(n):
        store.submit(submission(entry(uid=f"1.2.5.{tag}.{i}")))
    store.close()


def test_concurrent_processes_on_one_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    parent = RegistryStore(url)
    assert parent.count() == 0  # engine created before the fork
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_submit_many, args=(url, 15, str(k))) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert parent.count(Kind.DOCUMENT_ENTRY) == 45
    parent.close()


def test_replacement_joins_the_folders_of_the_original(store: RegistryStore) -> None:
    from gateway.ebrim.model import Classification, ExternalIdentifier
    from gateway.ns import FolderScheme

    old = entry()
    fid = build.new_uuid()
    folder = RegistryPackage(id=fid, external_identifiers=(
        ExternalIdentifier(build.new_uuid(), fid, FolderScheme.PATIENT_ID, PID),
        ExternalIdentifier(build.new_uuid(), fid, FolderScheme.UNIQUE_ID, "1.2.78")))
    node = Classification(build.new_uuid(), fid, classification_node=FolderScheme.NODE)
    member = Association(id=build.new_uuid(), association_type=AssociationType.HAS_MEMBER,
                         source_object=fid, target_object=old.id)
    store.submit(submission(old, extra=(folder, node, member)))
    [stored_folder] = store.get_objects([fid])
    first_update = next(s.values for s in stored_folder.slots if s.name == "lastUpdateTime")
    assert first_update and first_update[0].isdigit()
    new = entry()
    store.submit(submission(new, extra=(rplc(new, old.id),)))
    members = {a.target_object for a in store.associations_for([fid])
               if a.source_object == fid and a.association_type == AssociationType.HAS_MEMBER}
    assert members == {old.id, new.id}
