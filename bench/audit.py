"""ATNA audit cost: ITI-18 throughput over HTTPS with audit on against audit off, same run,
and how fast the spool takes records in and drains them to a real repository.

Starts a private rsyslog (tests/support/rsyslog.py: RFC 5425 over mutual TLS) and two
gateways on loopback with the same settings (2 worker processes each), one with [audit]
transport = "tls", one with "none"; registers one document, then runs ITI-18 FindDocuments
from CLIENTS threads for SECONDS against each gateway, alternating off/on ROUNDS times, and
prints transactions per second (medians) and the share audit costs. Then, in this process:
appends RECORDS real ITI-18 audit messages to a fresh spool (fsync'd, records/s), and times a
forwarder draining them to rsyslog over TLS (records/s until the spool is empty and until
rsyslog has written them all). Figures only; no assertions.

    .venv/bin/python bench/audit.py [--seconds 5] [--clients 8] [--rounds 2] [--records 5000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import demo
from gateway.ebrim.model import AdhocQuery, Slot
from gateway.ebrim.render import render_adhoc_query_request
from gateway.ns import Action, StoredQuery
from gateway.security.audit import events
from gateway.security.audit.messages import render
from gateway.security.audit.service import Forwarder
from gateway.security.audit.spool import AuditSpool
from gateway.security.audit.transport import TlsSender, syslog_message
from gateway.security.pki import create_dev_pki
from gateway.security.tls import client_context
from gateway.soap.client import SoapClient
from tests.support.rsyslog import start_rsyslog


def query_body() -> object:
    return render_adhoc_query_request(AdhocQuery(StoredQuery.FIND_DOCUMENTS, (
        Slot("$XDSDocumentEntryPatientId", (f"'{demo.PATIENT}'",)),
        Slot("$XDSDocumentEntryStatus",
             ("('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')",)))))


def throughput(base_url: str, pki: demo.DevPki, clients: int,
               seconds: float) -> tuple[float, int]:
    count = [0] * clients
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        client = SoapClient(base_url, ca_bundle=pki.ca_cert, certificate=pki.client_cert,
                            private_key=pki.client_key, timeout=60)
        body = query_body()
        while time.monotonic() < stop:
            reply = client.call("/xds/registry", Action.ITI18, body)  # type: ignore[arg-type]
            assert reply.body is not None
            count[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(count) / (time.monotonic() - start), sum(count)


def start_gateway(workdir: Path, pki: demo.DevPki, audit: str) -> demo.RunningGateway:
    workdir.mkdir(parents=True)
    port = demo.free_port()
    config = demo.write_config(workdir, pki, port, workers=2)
    with config.open("a") as fh:
        fh.write("\n[audit]\n" + audit)
    gw = demo.start_gateway(config, pki, port)
    client = SoapClient(gw.base_url, ca_bundle=pki.ca_cert, certificate=pki.client_cert,
                        private_key=pki.client_key)
    ok = demo.exercise(client, workdir, lambda _l: None)  # one document set to find
    if not ok:
        raise SystemExit("the gateway did not pass the ITI-41/18/43 round trip")
    return gw


def spool_figures(root: Path, pki: demo.DevPki, port: int, records: int,
                  rsyslog_count: object) -> None:
    node = events.Node("urn:oid:1.3.6.1.4.1.21367.2017.2.6.19", "bench", "1")
    peer = events.Peer("http://www.w3.org/2005/08/addressing/anonymous", "127.0.0.1")
    body = query_body()
    payloads = []
    for n in range(records):
        msg = events.answered_event("ITI-18", "Registry Stored Query", node=node,
                                    endpoint_url="https://bench/xds/registry", requestor=peer,
                                    request=body, response=None, outcome=0)  # type: ignore[arg-type]
        payloads.append(syslog_message(render(msg), hostname="bench",
                                       app_name=f"bench-{n % 1}", procid="1"))
    size = sum(len(p) for p in payloads) / len(payloads)
    spool = AuditSpool(root / "spool", max_records=records + 1)
    t0 = time.monotonic()
    for p in payloads:
        spool.append(p)
    append_rate = records / (time.monotonic() - t0)
    before = rsyslog_count()  # type: ignore[operator]
    ctx = client_context(pki.ca_cert, pki.server_cert, pki.server_key)
    fw = Forwarder(spool, lambda: TlsSender("127.0.0.1", port, ctx, server_hostname="localhost"),
                   target="rsyslog")
    t0 = time.monotonic()
    fw.start()
    while spool.count():
        time.sleep(0.01)
    drained = time.monotonic() - t0
    while rsyslog_count() - before < records and time.monotonic() - t0 < 120:  # type: ignore[operator]
        time.sleep(0.01)
    arrived = time.monotonic() - t0
    fw.stop()
    print(f"spool: {records} ITI-18 records of {size:.0f} bytes")
    print(f"  append (fsync'd SQLite):      {append_rate:8.0f} records/s")
    print(f"  drain to rsyslog over TLS:    {records / drained:8.0f} records/s "
          f"(spool empty after {drained:.2f} s)")
    print(f"  written out by rsyslog:       {records / arrived:8.0f} records/s "
          f"({rsyslog_count() - before} of {records} after {arrived:.2f} s)")  # type: ignore[operator]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--records", type=int, default=5000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="xdsi-bench-audit-") as tmp:
        root = Path(tmp)
        pki = create_dev_pki(root / "pki")
        repo = start_rsyslog(root / "rsyslog", ca=pki.ca_cert, certificate=pki.server_cert,
                             private_key=pki.server_key)
        gateways = {}
        try:
            gateways["off"] = start_gateway(root / "off", pki, 'transport = "none"\n')
            gateways["on"] = start_gateway(
                root / "on", pki, f'transport = "tls"\nhost = "127.0.0.1"\n'
                                  f"port = {repo.tcp_port}\n")
            figures: dict[str, list[float]] = {"off": [], "on": []}
            throughput(gateways["off"].base_url, pki, args.clients, 1.0)  # warm up
            audited = 3 + throughput(gateways["on"].base_url, pki, args.clients, 1.0)[1]
            for _ in range(args.rounds):
                for mode in ("off", "on"):
                    rate, n = throughput(gateways[mode].base_url, pki, args.clients,
                                         args.seconds)
                    figures[mode].append(round(rate, 1))
                    audited += n if mode == "on" else 0
            off, on = (statistics.median(figures[m]) for m in ("off", "on"))
            print(f"ITI-18 over HTTPS, {args.clients} clients, 2 workers, "
                  f"{args.rounds} x {args.seconds:.0f} s each:")
            print(f"  audit off: {off:7.1f} transactions/s   {figures['off']}")
            print(f"  audit on:  {on:7.1f} transactions/s   {figures['on']}")
            print(f"  audit costs {100 * (off - on) / off:5.1f} % of the throughput")
            deadline = time.monotonic() + 30
            while len(repo.lines()) < audited and time.monotonic() < deadline:
                time.sleep(0.1)
            print(f"  audited transactions {audited}, records received by rsyslog "
                  f"{len(repo.lines())}")
        finally:
            for gw in gateways.values():
                gw.stop()
        spool_figures(root, pki, repo.tcp_port, args.records, lambda: len(repo.lines()))
        repo.stop()


if __name__ == "__main__":
    main()
