"""ITI-18 latency and throughput over real HTTPS with mutual TLS against a big registry.

For each database given (a registry built by bench/registry_load.py, same --seed, --documents
and --patients) and each worker count, starts a real gateway (gateway.demo.start_gateway with
that database) and measures two queries with 1, 4 and 16 concurrent clients (threads, each with
its own TLS session):

- FindDocuments: a random patient + classCode IMAGES + the modality eventCode of one of the
  patient's studies (status Approved);
- FindDocumentsByReferenceId: a random patient + the accession number (CXi) of one of its
  studies.

The query targets are rebuilt from the loader's deterministic data, so every query has
answers (checked: HTTP 200, a Success status, at least one ExtrinsicObject). Prints p50 / p95
latency and throughput per row. Figures only, no assertions; never part of the test suite.

    .venv/bin/python bench/registry_queries.py --database sqlite:////tmp/registry.db \
        --database postgresql://postgres@127.0.0.1:5432/xdsi --workers 1 2 --seconds 8
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests
from lxml import etree

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from registry_load import IMAGES, accession, patient_id, studies_of

from gateway.demo import free_port, start_gateway, write_config
from gateway.ebrim.model import AdhocQuery, Slot
from gateway.ebrim.render import render_adhoc_query_request
from gateway.ns import Action, AvailabilityStatus, StoredQuery
from gateway.security.pki import DevPki, create_dev_pki
from gateway.soap.client import envelope

APPROVED = f"('{AvailabilityStatus.APPROVED}')"
SUCCESS = b"urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"


@dataclass(frozen=True)
class Target:
    seed: int
    patients: int
    per_patient: float

    def find_documents(self, rng: random.Random) -> etree._Element:
        n = rng.randrange(self.patients)
        study = rng.choice(studies_of(self.seed, n, self.per_patient))
        return render_adhoc_query_request(AdhocQuery(
            query_id=StoredQuery.FIND_DOCUMENTS, parameters=(
                Slot("$XDSDocumentEntryPatientId", (f"'{patient_id(n)}'",)),
                Slot("$XDSDocumentEntryStatus", (APPROVED,)),
                Slot("$XDSDocumentEntryClassCode", (f"('{IMAGES.code}^^{IMAGES.scheme}')",)),
                Slot("$XDSDocumentEntryEventCodeList",
                     (f"('{study.modality.code}^^{study.modality.scheme}')",)))))

    def by_reference_id(self, rng: random.Random) -> etree._Element:
        n = rng.randrange(self.patients)
        study = rng.choice(studies_of(self.seed, n, self.per_patient))
        return render_adhoc_query_request(AdhocQuery(
            query_id=StoredQuery.FIND_DOCUMENTS_BY_REFERENCE_ID, parameters=(
                Slot("$XDSDocumentEntryPatientId", (f"'{patient_id(n)}'",)),
                Slot("$XDSDocumentEntryStatus", (APPROVED,)),
                Slot("$XDSDocumentEntryReferenceIdList",
                     (f"('{accession(n, study.number)}')",)))))


@dataclass
class Result:
    latencies: list[float]
    seconds: float
    errors: int
    first_error: str = ""

    def row(self) -> tuple[float, float, float]:
        lat = sorted(self.latencies)
        if not lat:
            return (float("nan"),) * 3
        p50 = statistics.median(lat) * 1000
        p95 = lat[min(len(lat) - 1, int(len(lat) * 0.95))] * 1000
        return p50, p95, len(lat) / self.seconds


def run_clients(base_url: str, pki: DevPki, make_body: Callable[[random.Random], etree._Element],
                clients: int, seconds: float) -> Result:
    url = base_url + "/xds/registry"
    headers = {"Content-Type":
               f'application/soap+xml; charset=UTF-8; action="{Action.ITI18}"'}
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(number: int) -> None:
        rng = random.Random(number * 7919 + clients)
        session = requests.Session()
        session.trust_env = False
        session.verify = str(pki.ca_cert)
        session.cert = (str(pki.client_cert), str(pki.client_key))
        # the TLS session is up before the timing starts
        session.post(url, data=envelope(Action.ITI18, url, make_body(rng))[0],
                     headers=headers, timeout=60).close()
        mine: list[float] = []
        failures: list[str] = []
        start_gate.wait()
        while time.perf_counter() < stop_at[0]:
            data = envelope(Action.ITI18, url, make_body(rng))[0]
            t0 = time.perf_counter()
            resp = session.post(url, data=data, headers=headers, timeout=60)
            body = resp.content
            elapsed = time.perf_counter() - t0
            if resp.status_code == 200 and SUCCESS in body and b"ExtrinsicObject" in body:
                mine.append(elapsed)
            else:
                status = re.search(rb'status="([^"]+)"', body)
                failures.append(f"HTTP {resp.status_code} "
                                f"{status.group(1).decode() if status else body[:300]!r}")
        session.close()
        with lock:
            latencies.extend(mine)
            errors.extend(failures)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds + 0.5  # set before the gate opens
    start_gate.wait()
    began = time.perf_counter()
    stop_at[0] = began + seconds
    for t in threads:
        t.join()
    return Result(latencies, time.perf_counter() - began, len(errors),
                  errors[0] if errors else "")


def database_label(url: str) -> str:
    return "PostgreSQL" if url.startswith("postgres") else "SQLite"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--database", action="append", required=True,
                    help="registry database URL (repeat for several)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=8, help="threads per worker process")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    ap.add_argument("--documents", type=int, default=1_000_000)
    ap.add_argument("--patients", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    target = Target(args.seed, args.patients, args.documents / args.patients)
    queries = [("FindDocuments patient+class+event", target.find_documents),
               ("FindDocumentsByReferenceId accession", target.by_reference_id)]
    workdir = Path(tempfile.mkdtemp(prefix="xdsi-regbench-"))
    rows: list[tuple[str, int, str, int, Result]] = []
    try:
        pki = create_dev_pki(workdir / "pki")
        for database in args.database:
            for workers in args.workers:
                port = free_port()
                cfg = write_config(workdir, pki, port, workers=workers)
                text = cfg.read_text()
                text = re.sub(r'(?m)^database = ".*"$', f'database = "{database}"', text)
                text = re.sub(r"(?m)^threads = \d+$", f"threads = {args.threads}", text)
                cfg.write_text(text)
                gateway = start_gateway(cfg, pki, port, timeout=120)
                try:
                    for name, make in queries:
                        run_clients(gateway.base_url, pki, make, 4, 2.0)  # warm-up
                        for clients in args.clients:
                            res = run_clients(gateway.base_url, pki, make, clients,
                                              args.seconds)
                            rows.append((database_label(database), workers, name, clients, res))
                            p50, p95, rate = res.row()
                            print(f"{database_label(database):10} workers={workers} "
                                  f"{name:38} clients={clients:2}  p50 {p50:6.1f} ms  "
                                  f"p95 {p95:6.1f} ms  {rate:7.1f} q/s"
                                  + (f"  errors {res.errors}: {res.first_error}"
                                     if res.errors else ""), flush=True)
                finally:
                    gateway.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print("| store | workers | query | clients | p50 ms | p95 ms | queries/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, workers, name, clients, res in rows:
        p50, p95, rate = res.row()
        print(f"| {label} | {workers} | {name} | {clients} | {p50:.1f} | {p95:.1f} | "
              f"{rate:.0f} |" + (f" ({res.errors} errors)" if res.errors else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
