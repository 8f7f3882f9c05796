"""Memory of the gateway's worker processes under large (but within the limits) envelopes.

    .venv/bin/python bench/worker_memory.py [--requests N] [--concurrency C] [--workers W]

Starts a gateway (mutual TLS on loopback, 4 MiB envelope limit as in the integration tests),
sends N envelopes of 3.5 to 4 MiB that lxml has to parse (900,000 elements, a 3.5 MB text, 30,000
namespaces, 50,000 attributes), C at a time, and prints the VmRSS of the master and of each
worker before, after the first round (every thread has met a big envelope) and at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from gateway.demo import free_port, start_gateway, write_config  # noqa: E402
from gateway.security.pki import create_dev_pki  # noqa: E402
from tests.support import fuzz  # noqa: E402

SOAP_CT = "application/soap+xml; charset=UTF-8"


def envelopes() -> list[bytes]:
    body = fuzz.ITI18_BODY
    return [
        fuzz.envelope(b"<x>" + b"<y/>" * 900_000 + b"</x>"),
        fuzz.envelope(body.replace(b"fuzz^^^", b"9" * 3_500_000)),
        fuzz.envelope(b"<x " + b" ".join(b'xmlns:p%d="urn:%d"' % (i, i)
                                         for i in range(30_000)) + b"/>"),
        fuzz.envelope(body.replace(b"<query:ResponseOption ", b"<query:ResponseOption "
                                   + b" ".join(b'a%d="x"' % i for i in range(50_000)) + b" ")),
    ]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def workers(master: int) -> list[int]:
    text = Path(f"/proc/{master}/task/{master}/children").read_text()
    return sorted(int(p) for p in text.split())


def snapshot(label: str, master: int) -> int:
    pids = workers(master)
    sizes = [rss_kib(p) for p in pids]
    total = rss_kib(master) + sum(sizes)
    print(f"{label:>12}: master {rss_kib(master) / 1024:6.1f} MiB, workers "
          + ", ".join(f"{s / 1024:6.1f}" for s in sizes) + f" MiB; total {total / 1024:6.1f} MiB",
          flush=True)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki = create_dev_pki(work / "pki")
        port = free_port()
        config = write_config(work, pki, port, workers=args.workers,
                              max_request_bytes=8 << 20, max_envelope_bytes=4 << 20)
        running = start_gateway(config, pki, port)
        try:
            master = running.process.pid
            session = requests.Session()
            session.trust_env = False
            session.verify = str(pki.ca_cert)
            session.cert = (str(pki.client_cert), str(pki.client_key))
            session.mount("https://", requests.adapters.HTTPAdapter(
                pool_connections=args.concurrency, pool_maxsize=args.concurrency))
            bodies = envelopes()

            def post(i: int) -> int:
                r = session.post(running.base_url + "/xds/registry", data=bodies[i % len(bodies)],
                                 headers={"Content-Type": SOAP_CT}, timeout=120)
                return r.status_code

            snapshot("start", master)
            started = time.monotonic()
            with cf.ThreadPoolExecutor(args.concurrency) as pool:
                first = args.concurrency * len(bodies)
                list(pool.map(post, range(first)))
                time.sleep(0.5)
                snapshot(f"{first} sent", master)
                statuses = list(pool.map(post, range(args.requests)))
            time.sleep(0.5)
            snapshot(f"{first + args.requests} sent", master)
            print(f"statuses {sorted(set(statuses))}, {time.monotonic() - started:.1f} s")
        finally:
            running.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
