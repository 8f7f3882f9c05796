"""gateway.registry.bulk writes exactly the rows RegistryStore.submit() writes, on both stores,
and the registry it builds answers queries with its indexes rebuilt."""

from __future__ import annotations

import uuid
from dataclasses import replace

from sqlalchemy import create_engine, inspect, select

from gateway.ebrim import build
from gateway.ebrim.model import ExtrinsicObject, Slot
from gateway.ns import AvailabilityStatus, DocumentEntryScheme
from gateway.registry import bulk
from gateway.registry.schema import author, metadata, object_code, reference_id
from gateway.registry.schema import registry_object as ro
from gateway.registry.store import RegistryStore, engine_url

AUTH = "1.3.6.1.4.1.21367.13.20.1000"
IMAGES = build.CodeValue("IMAGES", "1.3.6.1.4.1.19376.1.2.6.1", "Images")
REPORTS = build.CodeValue("REPORTS", "1.3.6.1.4.1.19376.1.2.6.1", "Reports")
CT = build.CodeValue("CT", "DCM", "CT")
MR = build.CodeValue("MR", "DCM", "MR")
HEAD = build.CodeValue("69536005", "2.16.840.1.113883.6.96", "Head")


def entry(n: int, pid: str, cls: build.CodeValue, modality: build.CodeValue) -> ExtrinsicObject:
    de = build.document_entry(build.DocumentEntryValues(
        unique_id=f"2.25.{uuid.uuid4().int}", patient_id=pid, source_patient_id=pid,
        mime_type="application/dicom", title=f"Study {n}", class_code=cls,
        type_code=build.CodeValue("18748-4", "2.16.840.1.113883.6.1", "Imaging"),
        format_code=build.CodeValue("1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.2.6.1",
                                    "KOS"),
        confidentiality_code=build.CodeValue("N", "2.16.840.1.113883.5.25", "Normal"),
        healthcare_facility_type_code=build.CodeValue("RADDX", "2.16.840.1.113883.5.10588",
                                                      "Radiology"),
        practice_setting_code=build.CodeValue("R-3027B", "SNOMED-RT", "Radiology"),
        creation_time=f"2024010{n % 9 + 1}", event_codes=(modality, HEAD),
        reference_ids=(f"ACC{n}^^^&1.2.3&ISO^urn:ihe:iti:xds:2013:accession",
                       f"1.2.3.{n}^^^^urn:ihe:iti:xds:2016:studyInstanceUID"),
        authors=(build.Author(person=f"^Doctor^D{n}"),)))
    return replace(de, slots=(*de.slots, Slot("hash", (f"{n:040x}",)), Slot("size", ("10",)),
                              Slot("repositoryUniqueId", ("1.2.3.4",))))


def entries() -> list[ExtrinsicObject]:
    out = []
    for n in range(12):
        pid = f"P{n % 3}^^^&{AUTH}&ISO"
        out.append(entry(n, pid, IMAGES if n % 2 else REPORTS, CT if n % 4 < 2 else MR))
    return out


def table_rows(url: str) -> dict[str, list[tuple[object, ...]]]:
    engine = create_engine(engine_url(url))
    try:
        with engine.connect() as conn:
            cols = [c for c in ro.c if c.name != "seq"]
            return {
                "objects": sorted(tuple(r) for r in conn.execute(select(*cols))),
                "codes": sorted(tuple(r) for r in conn.execute(select(object_code))),
                "authors": sorted(tuple(r) for r in conn.execute(select(author))),
                "refs": sorted(tuple(r) for r in conn.execute(select(reference_id))),
            }
    finally:
        engine.dispose()


def test_bulk_rows_equal_the_rows_submit_writes(registry_url: str, tmp_path) -> None:
    objs = entries()
    reference = f"sqlite:///{tmp_path / 'submitted.db'}"
    store = RegistryStore(reference)
    for obj in objs:  # one submission per entry, like a stream of ITI-42s
        sub = build.submission(build.SubmissionSetValues(
            unique_id=f"2.25.{uuid.uuid4().int}", source_id="1.2.9",
            patient_id=obj.external_identifiers[0].value,
            content_type_code=build.CodeValue("Imaging", "1.2.3", "Imaging")), (obj,))
        store.submit(list(sub.objects))
    store.close()
    assert bulk.load(registry_url, objs, batch_size=5) == len(objs)

    submitted, loaded = table_rows(reference), table_rows(registry_url)
    entry_ids = {o.id for o in objs}
    # the submitted registry also holds SubmissionSets; compare the DocumentEntries' rows
    for key in submitted:
        submitted[key] = [r for r in submitted[key] if r[0] in entry_ids]
    assert loaded == submitted
    assert len(loaded["codes"]) == 12 * 8 and len(loaded["refs"]) == 24


def test_bulk_loaded_registry_is_queried_with_its_indexes_rebuilt(registry_url: str) -> None:
    objs = entries()
    with bulk.BulkLoader(registry_url) as loader:
        loader.prepare(defer_indexes=True)
        assert loader.deferred
        engine = create_engine(engine_url(registry_url))
        with engine.connect() as conn:
            assert not inspect(conn).get_indexes(object_code.name)
        rows = bulk.Rows()
        for obj in objs:
            bulk.entry_rows(obj, rows=rows)
        loader.add(rows)
    with engine.connect() as conn:
        names = {i["name"] for t in metadata.sorted_tables
                 for i in inspect(conn).get_indexes(t.name)}
    engine.dispose()
    assert {i.name for t in metadata.sorted_tables for i in t.indexes} <= names

    store = RegistryStore(registry_url)
    try:
        pid = f"P1^^^&{AUTH}&ISO"
        found = store.find_documents(
            pid, [AvailabilityStatus.APPROVED],
            codes={DocumentEntryScheme.CLASS_CODE: [[("IMAGES", IMAGES.scheme)]],
                   DocumentEntryScheme.EVENT_CODE_LIST: [[("CT", "DCM")]]})
        expected = [o for n, o in enumerate(objs) if n % 3 == 1 and n % 2 and n % 4 < 2]
        assert expected and {o.id for o in found} == {o.id for o in expected}
        assert store.get_objects([objs[0].id]) == [
            replace(objs[0], status=AvailabilityStatus.APPROVED)]
    finally:
        store.close()


def test_prepare_keeps_the_indexes_of_a_registry_that_holds_data(registry_url: str) -> None:
    bulk.load(registry_url, entries()[:2], defer_indexes=False)
    with bulk.BulkLoader(registry_url) as loader:
        loader.prepare(defer_indexes=True)
        assert not loader.deferred
