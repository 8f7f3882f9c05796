"""ITI-38 fan-out through the initiating gateway: the latency it adds over one direct call, and
the cost of one community that never answers.

    .venv/bin/python bench/xca_fanout.py [--communities 20] [--responders 4] [--repeat 20]
                                         [--timeout 2]

Starts `--responders` gateway processes on loopback (each its own community, holding the
demo's two documents for one patient) and lists them `--communities` times in total in the
initiating gateway's [[communities]], round-robin, under distinct homeCommunityIds (the
responding gateway stamps its own home on the objects; the initiating gateway keeps it, so the
merged result has responders x 2 objects per listing). A listing of a silent HTTPS server
(accepts, never answers) is added with a cross-reference that only names a second patient, so
one query is fanned out to N communities and the other to N + 1 with one that never answers.
Times (medians over --repeat, after a warm-up): ITI-38 straight at one responder; ITI-18 at
/xca/initiating fanned out to N; the same plus the silent one (bounded by --timeout). Also
the CPU seconds per fan-out request of the responders and of the initiating gateway (from
/proc, all their processes) and the initiating gateway's established connections to the
responders (ss), which shows whether its pool reuses connections. Asserts nothing.

Measured on a 2-core machine (2026-11-24, quieter), medians of 20, direct ITI-38 3.2-3.3 ms:
fan-out to 1 adds 1.9 ms, to 5 adds 9.5 ms, to 20 adds 43-45 ms; the silent community costs
1.96-2.0 s (timeout 2 s). Before `gateway.xca.outbound.Workers` (a new thread per call, whose
start() waited ~2 ms for the GIL behind the other calls): 20 added 66-72 ms, 5 added 10-14 ms.
What is left is CPU: a 20-way fan-out costs ~60 ms of the responders' CPU and ~28 ms of the
initiating gateway's on 2 CPUs. Connections are reused (20 open for 20 communities, pool
`created` stays flat); Nagle is off on both sides (urllib3 and gunicorn's listener set
TCP_NODELAY, accepted sockets inherit it). The ~150 ms once seen for 5 communities was CPU
contention from other work on the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import descendants  # noqa: E402
from gateway.demo import RunningGateway, free_port, start_gateway  # noqa: E402
from gateway.ebrim.model import AdhocQuery, Slot  # noqa: E402
from gateway.ebrim.parse import parse_adhoc_query_response  # noqa: E402
from gateway.ebrim.render import render_adhoc_query_request  # noqa: E402
from gateway.ns import Action, StoredQuery  # noqa: E402
from gateway.security.pki import create_dev_pki  # noqa: E402
from gateway.soap.client import SoapClient  # noqa: E402
from tests.integration.test_xca_initiating import (  # noqa: E402
    PATIENT,
    PATIENT_SLOW,
    SlowServer,
    submit,
)
from tests.support.communities import (  # noqa: E402
    community_config,
    shut_down,
)


def query(patient: str) -> AdhocQuery:
    return AdhocQuery(query_id=StoredQuery.FIND_DOCUMENTS, parameters=(
        Slot("$XDSDocumentEntryPatientId", (f"'{patient}'",)),
        Slot("$XDSDocumentEntryStatus",
             ("('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')",))))


def cpu_seconds(gateways: list[RunningGateway]) -> float:
    """User + system CPU seconds used so far by the processes of `gateways`."""
    total = 0
    for gw in gateways:
        for pid in descendants(gw.process.pid):
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def connections(gateway: RunningGateway, ports: list[int]) -> int:
    """Established TCP connections from the processes of `gateway` to `ports`."""
    pids = {str(p) for p in descendants(gateway.process.pid)}
    out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True,
                         text=True, check=False).stdout
    n = 0
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 4 and cols[3].rsplit(":", 1)[-1] in {str(p) for p in ports} \
                and any(f"pid={p}," in line for p in pids):
            n += 1
    return n


def timed(client: SoapClient, path: str, action: str, patient: str, repeat: int
          ) -> tuple[float, int, str, int]:
    """Median seconds, objects, status and errors of the last answer."""
    times = []
    objects, status, errors = 0, "", 0
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        reply = client.call(path, action, render_adhoc_query_request(query(patient)))
        dt = time.perf_counter() - t0
        assert reply.body is not None
        resp = parse_adhoc_query_response(reply.body)
        objects, status, errors = len(resp.objects), resp.status.rsplit(":", 1)[-1], \
            len(resp.errors)
        if i:  # the first call warms connections up
            times.append(dt)
    return statistics.median(times), objects, status, errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--communities", type=int, default=20)
    ap.add_argument("--responders", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--timeout", type=int, default=2, help="[xca] query_timeout_seconds")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="xca-bench-"))
    pki = create_dev_pki(root / "pki")
    slow = SlowServer(pki)
    running = []
    clients: list[SoapClient] = []

    def client(port: int) -> SoapClient:
        c = SoapClient(f"https://localhost:{port}", ca_bundle=pki.ca_cert,
                       certificate=pki.client_cert, private_key=pki.client_key, timeout=120)
        clients.append(c)
        return c

    try:
        ports = [free_port() for _ in range(args.responders)]
        for i, port in enumerate(ports):
            cfg = community_config(root / f"r{i}", pki, port,
                                   f"urn:oid:1.3.6.1.4.1.21367.2017.2.7.{i + 1}")
            cfg.write_text(cfg.read_text().replace("workers = 1", "workers = 2")
                           .replace("threads = 4", "threads = 8"))
            running.append(start_gateway(cfg, pki, port))
            submit(client(port), root / f"docs{i}", PATIENT, str(i + 2))
        extra = (f"\n[xca]\nquery_timeout_seconds = {args.timeout}\n"
                 f"max_parallel = {args.communities + 1}\n")
        for n in range(args.communities):
            url = f"https://localhost:{ports[n % len(ports)]}/xca/responding"
            extra += (f"\n[[communities]]\nhome_community_id = "
                      f"\"urn:oid:1.3.6.1.4.1.21367.2017.2.8.{n + 1}\"\n"
                      f"query_url = \"{url}\"\n")
        extra += (f"\n[[communities]]\nhome_community_id = \"urn:oid:1.3.6.1.4.1.21367.2017.2.9\"\n"
                  f"query_url = \"https://localhost:{slow.port}/xca/responding\"\n"
                  f"patient_ids = {{ \"{PATIENT_SLOW}\" = \"{PATIENT_SLOW}\" }}\n")
        pa = free_port()
        cfg_a = community_config(root / "a", pki, pa, "urn:oid:1.3.6.1.4.1.21367.2017.2.7.100",
                                 extra)
        cfg_a.write_text(cfg_a.read_text().replace("threads = 4", "threads = 8"))
        running.append(start_gateway(cfg_a, pki, pa))
        a = client(pa)
        direct = client(ports[0])
        print(f"xca fan-out: {args.communities} communities on {args.responders} responder "
              f"processes, median of {args.repeat}, query timeout {args.timeout} s")
        d, objs, st, _ = timed(direct, "/xca/responding", Action.ITI38, PATIENT, args.repeat)
        print(f"  ITI-38 direct to one responder:        {d * 1000:8.1f} ms  "
              f"({objs} objects, {st})")
        responders, initiating = running[:-1], running[-1:]
        cpu_r0, cpu_a0 = cpu_seconds(responders), cpu_seconds(initiating)
        f, objs, st, errs = timed(a, "/xca/initiating", Action.ITI18, PATIENT, args.repeat)
        cpu_r, cpu_a = ((cpu_seconds(responders) - cpu_r0) / (args.repeat + 1),
                        (cpu_seconds(initiating) - cpu_a0) / (args.repeat + 1))
        print(f"  ITI-18 via initiating, fan-out to {args.communities:3}: {f * 1000:8.1f} ms  "
              f"({objs} objects, {st}, {errs} errors)  added: {(f - d) * 1000:.1f} ms")
        print(f"    CPU per fan-out request: responders {cpu_r * 1000:.0f} ms, initiating "
              f"{cpu_a * 1000:.0f} ms ({os.cpu_count()} CPUs); initiating's open connections "
              f"to the responders: {connections(running[-1], ports)}")
        reps = max(2, args.repeat // 5)
        s, objs, st, errs = timed(a, "/xca/initiating", Action.ITI18, PATIENT_SLOW, reps)
        print(f"  same + 1 silent community (median of {reps}): {s * 1000:8.1f} ms  "
              f"({objs} objects, {st}, {errs} errors)  cost of the silent one: "
              f"{(s - f) * 1000:.0f} ms (timeout {args.timeout * 1000} ms)")
    finally:
        shut_down(clients, slow, *running)
    return 0


if __name__ == "__main__":
    sys.exit(main())
