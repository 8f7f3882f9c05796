"""RAD-75 through two gateways against RAD-69 straight at the source, same run.

    .venv/bin/python bench/rad75.py [--instances 200] [--associations 3] [--workers 2]
                                    [--repeat 3] [--response-order root-first|root-last]

Builds the synthetic CT study of bench/_common.py (about 0.5 MB per instance) and
loads it into a private Orthanc: the PACS of community B. Starts gateway B (its Imaging
Document Source over that Orthanc, /xcai/responding) and gateway A (community A, whose
[[communities]] lists B with imaging_retrieve_url = B's /xcai/responding; A presents a node
certificate, mutual TLS both hops). Then, alternating per run so neither path always goes
first: one RAD-69 of every instance straight at B's /xdsi/imaging-source ("direct"), the same
RAD-69 (each DocumentRequest naming B's HomeCommunityId) at A's /xcai/initiating, which routes
it as RAD-75 to B ("via A"), and, to split the cost, that RAD-75 sent straight to B's
/xcai/responding; every reply spooled to disk by SoapClient. Prints each run's times, the
throughput ratio (direct time / via-A time: 1.0 = the extra hop costs nothing, goal at least
0.8) and the peak RSS (VmHWM) of every process of each gateway (gunicorn master, workers,
retrieve pool processes; B served all three paths). Asserts nothing beyond every path
returning every instance.

--response-order sets B's [pacs] response_order (its RAD-69 and RAD-75 replies) and A's
[xca] response_order. root-first (default): A reads B's root, writes its own root at once
and pipes B's parts to the consumer as they arrive, chunk by chunk without a spool file
(gateway.xca.initiating, "Streaming through"; A is run with [xca] pipe_root_first = true,
which the gateway's own default leaves off; --store-and-forward measures that default);
root-last: A passes each part of B's root-last reply on as it completes (spooled) and
writes its root last. Also prints the CPU seconds each gateway used per retrieve (all its
processes), a figure that does not depend on the other load of the machine.

Measured on a 2-core machine (2026-11-24, other helpers' benchmarks running: load average
2-4, so single runs vary by +-30 %), 200 instances, 105 MB, 2 workers each, 3 associations,
medians of 7, the three runs one after the other:
  before (store and forward, the gateway of commit 9dc6a6b): direct 0.50 s, via A
    0.74 s, ratio 0.68 (0.79 and 0.86 in two quieter runs of 5);
  root-first, piped: direct 0.50 s, via A 0.63 s, ratio 0.79 (0.72-0.83 over four runs);
  root-last, streamed: direct 0.42 s, via A 0.57 s, ratio 0.74 (0.61-0.74; the direct
    root-last RAD-69 is itself faster, so the ratio is taken against a faster reference).
  root-first, piped chunk by chunk (no spool file per part; 2026-11-24, load average
    0.6-1): before, with a spool file per part, direct 0.46 s, via A 0.62 s, ratio 0.75
    (single runs 0.73-0.86), A 0.34 CPU s per retrieve; after, three runs of 7: ratio 0.87,
    0.84, 0.81 (via A 0.48, 0.54, 0.55 s; direct 0.41, 0.45, 0.44 s; single runs 0.60-1.22),
    A 0.19-0.21 CPU s per retrieve (B 0.18-0.21 in the same runs, 0.26-0.28 before: part
    of the drop is the quieter machine, CPU time inflating with the load), peak RSS 86-87 MB
    the largest process of A (84 before: the pipe holds at most 8 chunks of at most about
    320 KiB per retrieve).
RAD-75 straight at B costs the same as RAD-69 (0.44-0.53 s). A's hop no longer waits for B's
whole reply, but it is CPU work on a saturated 2-core machine: A used 0.27-0.33 CPU seconds
per retrieve streaming through spool files (TLS in, spool file, TLS out, chunked MTOM out;
0.19-0.21 piped without them), 0.19-0.29 storing and forwarding in the same windows (CPU
time itself inflates with the load), B 0.26-0.30; with Orthanc and the client on the same
two cores the extra hop cannot be free here (relaying in a thread or in the response's own
thread measured the same; reading the reply with read1, a TLS record at a time, was no
cheaper). Peak RSS: 84 MB the largest process of either gateway (A: 84, 70, 46, 46, 40, then
38-13; B the same within 1 MB), the same as before.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lxml import etree  # noqa: E402

from bench._common import cpu_seconds, descendants, load_synthetic_study, vm_hwm_mb  # noqa: E402
from gateway.demo import RunningGateway, free_port, start_gateway  # noqa: E402
from gateway.ebrim.parse import parse_retrieve_document_set_response  # noqa: E402
from gateway.ns import Action  # noqa: E402
from gateway.security.pki import create_dev_pki  # noqa: E402
from gateway.soap.client import SoapClient  # noqa: E402
from tests.support.communities import (  # noqa: E402
    community_config,
)
from tests.support.orthanc import start_orthanc  # noqa: E402
from tests.support.rad69 import EXPLICIT_LE, configure_pacs, rad69_request  # noqa: E402

HA = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.201"
HB = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.202"


def retrieve(client: SoapClient, path: str, action: str, body: etree._Element, spool: Path
             ) -> tuple[float, int, int, str]:
    """Seconds, documents, bytes spooled and status of one RAD-69 or RAD-75."""
    spool.mkdir()
    t = time.monotonic()
    reply = client.call(path, action, body, spool_dir=spool)
    dt = time.monotonic() - t
    assert reply.body is not None and not reply.is_fault, reply.envelope
    resp = parse_retrieve_document_set_response(reply.body)
    size = sum(p.stat().st_size for p in spool.iterdir())
    shutil.rmtree(spool)
    return dt, len(resp.documents), size, resp.status.rsplit(":", 1)[1]


def cpu(gateway: RunningGateway) -> float:
    """CPU seconds used so far by every process of `gateway`."""
    return sum(cpu_seconds(p) for p in descendants(gateway.process.pid))


def peaks(gateway: RunningGateway) -> list[float]:
    return sorted((vm_hwm_mb(p) for p in descendants(gateway.process.pid)), reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--associations", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--response-order", choices=("root-first", "root-last"),
                    default="root-first",
                    help="[pacs] response_order of B (its RAD-69 and RAD-75 replies) and "
                         "[xca] response_order of A (root-last: A streams B's parts through)")
    ap.add_argument("--store-and-forward", action="store_true",
                    help="root-first: A reads B's whole reply before answering ([xca] "
                         "pipe_root_first = false, the gateway's default) instead of piping "
                         "B's parts through as they arrive (pipe_root_first = true)")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-rad75-"))
    orthanc = start_orthanc(work / "orthanc", dicom_port=free_port(), http_port=free_port())
    running: list[RunningGateway] = []
    clients: list[SoapClient] = []
    try:
        docs = load_synthetic_study(orthanc, args.instances)

        pki = create_dev_pki(work / "pki")
        pb, pa = free_port(), free_port()
        cfg_b = community_config(work / "b", pki, pb, HB, workers=args.workers)
        configure_pacs(cfg_b, port=orthanc.dicom_port, associations=args.associations,
                       timeout_seconds=60)
        cfg_b.write_text(cfg_b.read_text()
                         + f'response_order = "{args.response_order}"\n')  # in [pacs]
        gw_b = start_gateway(cfg_b, pki, pb, log_level=args.log_level)
        running.append(gw_b)
        extra = (f"\n[xca]\nretrieve_timeout_seconds = 600\n"
                 f"response_order = \"{args.response_order}\"\n"
                 f"pipe_root_first = {'false' if args.store_and_forward else 'true'}\n"
                 f"\n[[communities]]\nhome_community_id = \"{HB}\"\n"
                 f"imaging_retrieve_url = \"https://localhost:{pb}/xcai/responding\"\n")
        cfg_a = community_config(work / "a", pki, pa, HA, extra, workers=args.workers)
        gw_a = start_gateway(cfg_a, pki, pa, log_level=args.log_level)
        running.append(gw_a)

        def client(gw: RunningGateway) -> SoapClient:
            c = SoapClient(gw.base_url, ca_bundle=pki.ca_cert, certificate=pki.client_cert,
                           private_key=pki.client_key, timeout=600)
            clients.append(c)
            return c

        direct, via = client(gw_b), client(gw_a)
        body_direct = rad69_request(docs, [EXPLICIT_LE])
        body_via = rad69_request(docs, [EXPLICIT_LE], home_community_id=HB)
        paths = {"direct": (direct, "/xdsi/imaging-source", Action.RAD69, body_direct),
                 "via A": (via, "/xcai/initiating", Action.RAD69, body_via),
                 "RAD-75 at B": (direct, "/xcai/responding", Action.RAD75, body_via)}
        # warm-up: both paths once (Orthanc's cache, the gateways' connections and workers)
        for name, (c, path, action, body) in paths.items():
            retrieve(c, path, action, body, work / f"warm-{name.replace(' ', '')}")
        times: dict[str, list[float]] = {k: [] for k in paths}
        # CPU seconds of A and of B per retrieve, per path (robust to other load)
        cpus: dict[str, list[tuple[float, float]]] = {k: [] for k in paths}
        for run in range(args.repeat):
            order = list(paths) if run % 2 == 0 else list(reversed(paths))
            line = []
            for name in order:
                c, path, action, body = paths[name]
                cpu0 = cpu(gw_a), cpu(gw_b)
                dt, n, size, status = retrieve(c, path, action, body,
                                               work / f"{name.replace(' ', '')}-{run}")
                cpus[name].append((cpu(gw_a) - cpu0[0], cpu(gw_b) - cpu0[1]))
                assert n == args.instances, f"{name}: {n} documents, {status}"
                times[name].append(dt)
                line.append(f"{name} {status} {n} docs {size / 1e6:.0f} MB in {dt:.2f} s "
                            f"({size / 1e6 / dt:.0f} MB/s)")
            print(f"run {run + 1}: " + "; ".join(line)
                  + f"; ratio {times['direct'][-1] / times['via A'][-1]:.2f}")
        md, mv = statistics.median(times["direct"]), statistics.median(times["via A"])
        m75 = statistics.median(times["RAD-75 at B"])
        print(f"median: direct {md:.2f} s, via A -> B {mv:.2f} s, throughput ratio "
              f"{md / mv:.2f} (goal >= 0.8); RAD-75 straight at B {m75:.2f} s")
        print("CPU seconds per retrieve (median), A / B: " + "; ".join(
            f"{name} {statistics.median(a for a, _ in v):.2f} / "
            f"{statistics.median(b for _, b in v):.2f}" for name, v in cpus.items()))
        for name, gw in (("A (initiating)", gw_a), ("B (responding + source)", gw_b)):
            p = peaks(gw)
            print(f"gateway {name} peak RSS (VmHWM) per process, MB: "
                  + ", ".join(f"{v:.0f}" for v in p) + f"; max {p[0]:.0f} MB")
    finally:
        for c in clients:
            c.close()
        for r in running:
            r.stop()
        orthanc.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
