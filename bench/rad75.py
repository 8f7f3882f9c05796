"""RAD-75 through two gateways against RAD-69 straight at the source, same run.

    .venv/bin/python bench/rad75.py [--instances 200] [--associations 3] [--workers 2]
                                    [--repeat 3]

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

Measured on a 2-core machine (2026-11-24, other helpers' work running), 200 instances,
105 MB, 2 workers each, 3 associations, medians of 5: direct 0.87 s, via A 1.07 s, RAD-75
straight at B 0.85 s: ratio 0.81 (single runs 0.73-0.99). RAD-75 at B costs the same as
RAD-69; the ~0.2 s is A's hop: B's whole MTOM reply is spooled to A's disk before A's reply
starts (store and forward, about 0.5 GB/s through A). Peak RSS: 82 MB the largest process of
either gateway (A: 82, 70, 46, 46, 40, then 37-13; B the same within 2 MB).
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

from bench._common import descendants, load_synthetic_study, vm_hwm_mb  # noqa: E402
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


def peaks(gateway: RunningGateway) -> list[float]:
    return sorted((vm_hwm_mb(p) for p in descendants(gateway.process.pid)), reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--associations", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
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
        gw_b = start_gateway(cfg_b, pki, pb, log_level=args.log_level)
        running.append(gw_b)
        extra = (f"\n[xca]\nretrieve_timeout_seconds = 600\n"
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
        for run in range(args.repeat):
            order = list(paths) if run % 2 == 0 else list(reversed(paths))
            line = []
            for name in order:
                c, path, action, body = paths[name]
                dt, n, size, status = retrieve(c, path, action, body,
                                               work / f"{name.replace(' ', '')}-{run}")
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
