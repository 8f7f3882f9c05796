"""Query plans of the common registry queries on a big registry (built by registry_load.py).

Runs FindDocuments (patient + class + event code, + type, + creation time range, + status)
and FindDocumentsByReferenceId (accession) through RegistryStore, captures every SQL
statement the store sends, and prints each statement's plan: EXPLAIN QUERY PLAN on SQLite,
EXPLAIN (ANALYZE, BUFFERS) on PostgreSQL. Lines that scan a big table without an index are
flagged with "<-- SCAN". Figures only.

    .venv/bin/python bench/registry_plans.py sqlite:////tmp/registry.db
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from registry_load import IMAGES, accession, patient_id, studies_of

from gateway.ns import AvailabilityStatus, DocumentEntryScheme
from gateway.registry.store import RegistryStore

APPROVED = [AvailabilityStatus.APPROVED]


def cases(seed: int, patients: int, per_patient: float
          ) -> list[tuple[str, Callable[[RegistryStore], list[Any]]]]:
    rng = random.Random(seed + 99)
    n = rng.randrange(patients)
    study = studies_of(seed, n, per_patient)[0]
    pid = patient_id(n)
    cls = {DocumentEntryScheme.CLASS_CODE: [[(IMAGES.code, IMAGES.scheme)]]}
    event_ = {DocumentEntryScheme.EVENT_CODE_LIST: [[(study.modality.code, "DCM")],
                                                    [(study.region.code, None)]]}
    type_ = {DocumentEntryScheme.TYPE_CODE: [[("18748-4", None), ("18747-6", None),
                                              ("18755-9", None), ("18782-3", None)]]}
    return [
        ("FindDocuments patient+status",
         lambda s: s.find_documents(pid, APPROVED)),
        ("FindDocuments patient+class+event(2 ANDed)",
         lambda s: s.find_documents(pid, APPROVED, codes={**cls, **event_})),
        ("FindDocuments patient+class+type+creationTime",
         lambda s: s.find_documents(pid, APPROVED, codes={**cls, **type_},
                                    creation_time=(study.time[:4], None))),
        ("FindDocuments patient+all statuses+serviceStart range",
         lambda s: s.find_documents(pid, [AvailabilityStatus.APPROVED,
                                          AvailabilityStatus.DEPRECATED],
                                    service_start_time=("2008", "2030"))),
        ("FindDocumentsByReferenceId accession",
         lambda s: s.find_documents(pid, APPROVED,
                                    reference_ids=[accession(n, study.number)])),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("database")
    ap.add_argument("--documents", type=int, default=1_000_000)
    ap.add_argument("--patients", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    store = RegistryStore(args.database)
    captured: list[tuple[str, Any]] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def _capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                 executemany: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            captured.append((statement, parameters))

    bad = 0
    for name, run in cases(args.seed, args.patients, args.documents / args.patients):
        captured.clear()
        run(store)  # warm the cache
        captured.clear()
        t0 = time.perf_counter()
        found = run(store)
        ms = (time.perf_counter() - t0) * 1000
        print(f"\n== {name}: {len(found)} entries in {ms:.1f} ms")
        statements = list(captured)
        with store.engine.connect() as conn:
            for statement, params in statements:
                print("  SQL:", " ".join(statement.split())[:160])
                if store.is_sqlite:
                    rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)
                    lines = [str(r[3]) for r in rows]
                else:
                    rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement,
                                                params)
                    lines = [str(r[0]) for r in rows]
                for line in lines:
                    scan = ("SCAN " in line and "USING" not in line and "CONSTANT" not in line
                            and "LIST SUBQUERY" not in line) or "Seq Scan" in line
                    bad += scan
                    print("    " + line + ("   <-- SCAN" if scan else ""))
    store.close()
    print(f"\n{bad} plan line(s) scan a table without an index")
    return 0


if __name__ == "__main__":
    sys.exit(main())
