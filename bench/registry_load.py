"""Build a big registry quickly: N DocumentEntries over P patients, on SQLite or PostgreSQL.

Every patient has a handful of imaging studies; each study gets a KOS manifest (classCode
IMAGES) and most get a report (classCode REPORTS). Every entry carries a typeCode, eventCodes
(the modality in DCM and the anatomic region in SNOMED CT), and referenceIdList values (the
accession number as CXi with an assigning authority, and the Study Instance UID). The data is
a pure function of (seed, patient number), so the query benchmark can rebuild any patient's
entries to know what to ask for. Entries are made with gateway.ebrim.build, turned into rows by
gateway.registry.bulk (the store's codec) in worker processes and written with COPY
(PostgreSQL) or executemany (SQLite); the secondary indexes are built at the end.

    .venv/bin/python bench/registry_load.py sqlite:////tmp/registry.db --documents 1000000
    .venv/bin/python bench/registry_load.py postgresql://postgres@127.0.0.1:5432/xdsi
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.ebrim import build
from gateway.ebrim.model import ExtrinsicObject, Slot
from gateway.registry.bulk import BulkLoader, Rows, entry_rows

AUTHORITY = "1.3.6.1.4.1.21367.2005.13.20.1000"
ACCESSION_AUTHORITY = "1.3.6.1.4.1.21367.2017.2.99.1"
REPOSITORY = "1.3.6.1.4.1.21367.2017.2.3.19"
UID_ROOT = "1.3.6.1.4.1.21367.2017.2.99.7"
CLASS_SCHEME = "1.3.6.1.4.1.19376.1.2.6.1"
IMAGES = build.CodeValue("IMAGES", CLASS_SCHEME, "Images")
REPORTS = build.CodeValue("REPORTS", CLASS_SCHEME, "Reports")
LOINC = "2.16.840.1.113883.6.1"
SNOMED = "2.16.840.1.113883.6.96"
MODALITIES = [("CT", "Computed Tomography"), ("MR", "Magnetic Resonance"),
              ("CR", "Computed Radiography"), ("DX", "Digital Radiography"),
              ("US", "Ultrasound"), ("MG", "Mammography"), ("PT", "Positron emission tomography"),
              ("NM", "Nuclear Medicine"), ("XA", "X-Ray Angiography")]
MODALITY_WEIGHTS = [25, 15, 20, 15, 12, 5, 3, 3, 2]
REGIONS = [("69536005", "Head"), ("51185008", "Chest"), ("818983003", "Abdomen"),
           ("12738006", "Brain"), ("421060004", "Spine"), ("76752008", "Breast"),
           ("12921003", "Pelvis"), ("72696002", "Knee"), ("85050009", "Humerus"),
           ("80891009", "Heart")]
TYPES = [("18748-4", "Diagnostic imaging study"), ("18747-6", "CT study"),
         ("18755-9", "MR study"), ("18782-3", "Radiology study observation")]
KOS_FORMAT = build.CodeValue("1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.2.6.1",
                             "Key Object Selection Document")
TEXT_FORMAT = build.CodeValue("urn:ihe:rad:TEXT", "1.3.6.1.4.1.19376.1.2.3", "Report text")
NORMAL = build.CodeValue("N", "2.16.840.1.113883.5.25", "normal")
FACILITY = build.CodeValue("RADDX", "2.16.840.1.113883.5.10588", "Radiology unit")
PRACTICE = build.CodeValue("R-3027B", "SNOMED-RT", "Radiology")


def patient_id(n: int) -> str:
    return f"BENCH{n:08d}^^^&{AUTHORITY}&ISO"


def accession(n: int, study: int) -> str:
    return (f"A{n:08d}{study:02d}^^^&{ACCESSION_AUTHORITY}&ISO"
            "^urn:ihe:iti:xds:2013:accession")


@dataclass(frozen=True)
class Study:
    number: int
    modality: build.CodeValue
    region: build.CodeValue
    time: str
    with_report: bool
    study_uid: str


def studies_of(seed: int, n: int, documents_per_patient: float) -> list[Study]:
    """Patient n's studies; about `documents_per_patient` entries on average."""
    rng = random.Random(seed * 1_000_003 + n)
    # Each study gives 1.8 entries on average (a KOS, a report 80 % of the time).
    mean_studies = documents_per_patient / 1.8
    count = max(1, min(60, round(rng.expovariate(1 / mean_studies)) if mean_studies > 1
                        else 1))
    out = []
    for s in range(count):
        mod = rng.choices(MODALITIES, MODALITY_WEIGHTS)[0]
        reg = rng.choice(REGIONS)
        year = rng.randint(2008, 2024)
        stamp = (f"{year}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
                 f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}")
        out.append(Study(s, build.CodeValue(mod[0], "DCM", mod[1]),
                         build.CodeValue(reg[0], SNOMED, reg[1]), stamp,
                         rng.random() < 0.8, f"2.25.{rng.getrandbits(120)}"))
    return out


def patient_entries(seed: int, n: int, documents_per_patient: float) -> list[ExtrinsicObject]:
    """The DocumentEntries of patient n (deterministic for one seed)."""
    rng = random.Random(seed * 7_000_003 + n)
    pid = patient_id(n)
    entries = []
    for st in studies_of(seed, n, documents_per_patient):
        refs = (accession(n, st.number),
                f"{st.study_uid}^^^^urn:ihe:iti:xds:2016:studyInstanceUID")
        kinds = [(IMAGES, KOS_FORMAT, "application/dicom")]
        if st.with_report:
            kinds.append((REPORTS, TEXT_FORMAT, "text/plain"))
        for k, (cls, fmt, mime) in enumerate(kinds):
            t = rng.choice(TYPES)
            de = build.document_entry(build.DocumentEntryValues(
                unique_id=f"{UID_ROOT}.{n}.{st.number}.{k}", patient_id=pid,
                source_patient_id=f"L{n}^^^&1.2.3.4&ISO", mime_type=mime,
                title=f"{st.modality.display} {st.region.display}", class_code=cls,
                type_code=build.CodeValue(t[0], LOINC, t[1]), format_code=fmt,
                confidentiality_code=NORMAL, healthcare_facility_type_code=FACILITY,
                practice_setting_code=PRACTICE, creation_time=st.time,
                service_start_time=st.time, service_stop_time=st.time,
                event_codes=(st.modality, st.region), reference_ids=refs,
                authors=(build.Author(person=f"^Radiologist^R{rng.randint(1, 300)}"),),
                entry_uuid=f"urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}"))
            entries.append(replace(de, slots=(
                *de.slots, Slot("hash", (f"{rng.getrandbits(160):040x}",)),
                Slot("size", (str(rng.randint(2_000, 90_000)),)),
                Slot("repositoryUniqueId", (REPOSITORY,)))))
    return entries


def _rows_for(args: tuple[int, int, int, float]) -> Rows:
    seed, first, last, per_patient = args
    rows = Rows()
    for n in range(first, last):
        for obj in patient_entries(seed, n, per_patient):
            entry_rows(obj, rows=rows)
    return rows


def load(database_url: str, *, documents: int, patients: int, seed: int = 1,
         processes: int | None = None, chunk_patients: int = 500,
         progress: bool = True) -> tuple[int, float]:
    """Load the registry; returns (DocumentEntries written, seconds)."""
    per_patient = documents / patients
    started = time.monotonic()
    jobs = [(seed, first, min(first + chunk_patients, patients), per_patient)
            for first in range(0, patients, chunk_patients)]
    with BulkLoader(database_url) as loader:
        loader.prepare(defer_indexes=True)
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            for rows in pool.imap(_rows_for, jobs):
                loader.add(rows)
                if progress and loader.loaded // 50_000 != (loader.loaded - len(rows)) // 50_000:
                    rate = loader.loaded / (time.monotonic() - started)
                    print(f"  {loader.loaded:>9,} entries  {rate:,.0f}/s", flush=True)
        if progress:
            print(f"  rows written in {time.monotonic() - started:.0f} s; building indexes",
                  flush=True)
    return loader.loaded, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("database", help="sqlite:///path or postgresql://user@host:port/db")
    ap.add_argument("--documents", type=int, default=1_000_000,
                    help="about this many DocumentEntries (default 1,000,000)")
    ap.add_argument("--patients", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--processes", type=int, default=None,
                    help="row-building worker processes (default: one per core)")
    args = ap.parse_args(argv)
    count, seconds = load(args.database, documents=args.documents, patients=args.patients,
                          seed=args.seed, processes=args.processes)
    print(f"loaded {count:,} DocumentEntries over {args.patients:,} patients in {seconds:.0f} s "
          f"({count / seconds:,.0f}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
