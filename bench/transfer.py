"""ITI-41 upload and ITI-43 retrieve of one large document over HTTPS with mutual TLS.

Starts a gateway on loopback (2 worker processes), uploads a SIZE MB document with ITI-41 as
MTOM, retrieves it with ITI-43 (MTOM), checks the bytes, and prints MB/s for each direction,
a same-run baseline (the same bytes through a plain TLS socket copy: what the machine's TLS
can do), and the peak RSS (VmHWM) of every gateway process. Figures only; no assertions.
With --repeat N the round trip runs N times, each with new random content and new unique ids
(so every upload really stores a new file), and the medians are printed.

    .venv/bin/python bench/transfer.py [--size-mb 200] [--repeat 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config import TlsConfig
from gateway.demo import (
    ORG_ROOT,
    free_port,
    provide_and_register_body,
    sample_documents,
    sha1,
    start_gateway,
    write_config,
)
from gateway.ebrim.model import DocumentRequest, RetrieveDocumentSetRequest
from gateway.ebrim.parse import parse_retrieve_document_set_response
from gateway.ebrim.render import render_retrieve_document_set_request
from gateway.ns import Action, ResponseStatus
from gateway.security.pki import create_dev_pki
from gateway.security.tls import client_context, server_context
from gateway.soap.client import SoapClient


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def peak_rss_mb(pids: list[int]) -> dict[int, float]:
    out = {}
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out[p] = int(line.split()[1]) / 1024
        except OSError:
            pass
    return out


def make_file(path: Path, size: int) -> str:
    h = hashlib.sha1()
    block = os.urandom(1 << 20)
    with path.open("wb") as fh:
        written = 0
        while written < size:
            chunk = block[: min(len(block), size - written)]
            fh.write(chunk)
            h.update(chunk)
            written += len(chunk)
    return h.hexdigest()


def tls_baseline(pki, path: Path) -> float:  # type: ignore[no-untyped-def]
    """MB/s of a plain mutual-TLS socket copy of the same file on loopback (the ceiling)."""
    sctx = server_context(TlsConfig(certificate=pki.server_cert, private_key=pki.server_key,
                                    ca_bundle=pki.ca_cert))
    cctx = client_context(pki.ca_cert, pki.client_cert, pki.client_key)
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    received = 0

    def serve() -> None:
        nonlocal received
        conn, _ = lsock.accept()
        with sctx.wrap_socket(conn, server_side=True) as s:
            while data := s.recv(1 << 20):
                received += len(data)

    t = threading.Thread(target=serve)
    t.start()
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            cctx.wrap_socket(raw, server_hostname="localhost") as s, path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            s.sendall(chunk)
    t.join()
    lsock.close()
    return received / (1 << 20) / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=1,
                    help="round trips, each with new content; medians are printed")
    args = ap.parse_args()
    size = args.size_mb * (1 << 20)
    work = Path(tempfile.mkdtemp(prefix="xdsi-bench-"))
    try:
        pki = create_dev_pki(work / "pki")
        port = free_port()
        config = write_config(work, pki, port, max_request_bytes=2 * size + (64 << 20))
        gw = start_gateway(config, pki, port)
        try:
            client = SoapClient(gw.base_url, ca_bundle=pki.ca_cert,
                                certificate=pki.client_cert, private_key=pki.client_key)
            big = work / "big.bin"
            (sample_values, _), _ = sample_documents(work)
            mb = size / (1 << 20)
            baselines: list[float] = []
            ups: list[float] = []
            downs: list[float] = []
            same = True
            for run in range(max(1, args.repeat)):
                digest = make_file(big, size)
                baselines.append(tls_baseline(pki, big))
                report_values = dataclasses.replace(
                    sample_values, unique_id=f"{sample_values.unique_id}.{run}",
                    entry_uuid=f"urn:uuid:{uuid.uuid4()}")
                body, attachments = provide_and_register_body(
                    [(report_values, big)], f"{ORG_ROOT}.30.{int(time.time())}.{run}")
                start = time.perf_counter()
                reply = client.call("/xds/repository", Action.ITI41, body,
                                    attachments=attachments)
                up = time.perf_counter() - start
                assert reply.body is not None
                if reply.body.get("status") != ResponseStatus.SUCCESS:
                    print("ITI-41 failed:", reply.body.get("status"),
                          [e.get("codeContext") for e in reply.body.iter() if e.get("codeContext")])
                    return 1

                spool = work / f"spool-{run}"
                spool.mkdir()
                req = render_retrieve_document_set_request(RetrieveDocumentSetRequest(
                    documents=(DocumentRequest(
                        repository_unique_id="1.3.6.1.4.1.21367.2017.2.3.19",
                        document_unique_id=report_values.unique_id),)))
                start = time.perf_counter()
                reply = client.call("/xds/repository", Action.ITI43, req, spool_dir=spool)
                down = time.perf_counter() - start
                assert reply.body is not None
                result = parse_retrieve_document_set_response(reply.body)
                path = (reply.attachment_path(result.documents[0].content_id)
                        if len(result.documents) == 1 else None)
                same = same and path is not None and sha1(path) == digest
                shutil.rmtree(spool)
                ups.append(mb / up)
                downs.append(mb / down)
                if args.repeat > 1:
                    print(f"run {run + 1}: baseline {baselines[-1]:7.1f}  up {ups[-1]:7.1f}  "
                          f"down {downs[-1]:7.1f} MB/s")
            rss = peak_rss_mb(descendants(gw.process.pid))
        finally:
            gw.stop()
        baseline = statistics.median(baselines)
        up_rate, down_rate = statistics.median(ups), statistics.median(downs)
        what = f"median of {len(ups)} runs" if len(ups) > 1 else "one run"
        print(f"document: {mb:.0f} MB, byte-exact after round trip: {same} ({what})")
        print(f"baseline  mutual-TLS socket copy : {baseline:7.1f} MB/s")
        print(f"ITI-41    upload (MTOM)          : {up_rate:7.1f} MB/s "
              f"({up_rate / baseline:.2f} of baseline)")
        print(f"ITI-43    retrieve (MTOM)        : {down_rate:7.1f} MB/s "
              f"({down_rate / baseline:.2f} of baseline)")
        print("gateway processes, peak RSS (VmHWM): " +
              ", ".join(f"pid {p}: {v:.0f} MB" for p, v in sorted(rss.items())))
        print(f"largest gateway process peak RSS: {max(rss.values()):.0f} MB")
        return 0 if same else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
