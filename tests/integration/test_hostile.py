"""A hostile-input run against a real gateway (the `live_gateway` fixture: gunicorn, mutual TLS):
thousands of hand-made and generated hostile requests (entity expansion, deep nesting, huge
attributes, broken MTOM, truncated bodies, fuzzed envelopes) and slow senders, while normal
requests keep being answered; no crash, no 500 with a stack trace, bounded memory growth."""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from lxml import etree

from gateway.ns import SOAP12
from tests.support import fuzz
from tests.support.zeep_client import mtls_session

pytestmark = pytest.mark.integration

SOAP_CT = "application/soap+xml; charset=UTF-8"
REPORT: dict[str, object] = {}


def _pids(base_url: str) -> list[int]:
    """The gateway's master and worker processes: those holding its listening socket."""
    port = int(base_url.rsplit(":", 1)[1])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":
                inodes.add(f"socket:[{f[9]}]")
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                out.append(int(entry.name))
        except OSError:
            continue
    return out


def _rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


@pytest.fixture(scope="module")
def session(live_gateway) -> Iterator[requests.Session]:  # type: ignore[no-untyped-def]
    pki = live_gateway.pki
    s = mtls_session(pki.ca_cert, pki.client_cert, pki.client_key)
    adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=8)
    s.mount("https://", adapter)
    yield s
    s.close()


def normal_query(session: requests.Session, base: str) -> None:
    resp = session.post(base + "/xds/registry", data=fuzz.envelope(),
                        headers={"Content-Type": SOAP_CT}, timeout=30)
    assert resp.status_code == 200, resp.text[:300]
    assert b"AdhocQueryResponse" in resp.content


# --- hostile requests ----------------------------------------------------------------------------

LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
          + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;")
                                                 * 10) for i in range(1, 10)) + b"]>")


def hand_made() -> list[tuple[str, bytes, str]]:
    body = fuzz.ITI18_BODY
    cases = [
        ("entity-expansion", LAUGHS + fuzz.envelope(body.replace(b"fuzz^^^", b"&lol9;"))),
        ("external-entity", b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM '
                            b'"file:///etc/passwd">]>' + fuzz.envelope(body.replace(
                                b"fuzz^^^", b"&e;"))),
        ("deep-nesting", fuzz.envelope(b"<a>" * 5000 + b"</a>" * 5000)),
        ("deep-nesting-unclosed", fuzz.envelope(b"<a>" * 200_000)),
        ("huge-attribute", fuzz.envelope(body.replace(
            b'returnType="ObjectRef"', b'returnType="' + b"x" * 3_000_000 + b'"'))),
        ("many-attributes", fuzz.envelope(body.replace(
            b"<query:ResponseOption ", b"<query:ResponseOption "
            + b" ".join(b'a%d="x"' % i for i in range(50_000)) + b" "))),
        ("many-elements", fuzz.envelope(b"<x>" + b"<y/>" * 900_000 + b"</x>")),
        ("long-name", fuzz.envelope(b"<" + b"n" * 100_000 + b"/>")),
        ("many-namespaces", fuzz.envelope(b"<x " + b" ".join(
            b'xmlns:p%d="urn:%d"' % (i, i) for i in range(30_000)) + b"/>")),
        ("huge-text", fuzz.envelope(body.replace(b"fuzz^^^", b"9" * 3_500_000))),
        ("nul-bytes", fuzz.envelope(body).replace(b"fuzz", b"\x00\x00")),
        ("utf16-bom", b"\xff\xfe" + fuzz.envelope(body)),
        ("xinclude", fuzz.envelope(b'<xi:include xmlns:xi="http://www.w3.org/2001/XInclude" '
                                   b'href="file:///etc/passwd"/>')),
    ]
    out = [(n, d, SOAP_CT) for n, d in cases]
    b = fuzz.BOUNDARY.encode()
    mtom = fuzz.mtom_body()
    out += [
        ("mtom-no-closing", mtom.replace(b"--" + b + b"--", b""), fuzz.MTOM_TYPE),
        ("mtom-wrong-boundary", mtom, fuzz.MTOM_TYPE.replace(fuzz.BOUNDARY, "other")),
        ("mtom-no-boundary", mtom, "multipart/related; type=\"application/xop+xml\""),
        ("mtom-10k-parts", b"".join(b"--" + b + b"\r\nContent-ID: <p%d>\r\n\r\nx\r\n" % i
                                    for i in range(12_000)) + b"--" + b + b"--\r\n",
         fuzz.MTOM_TYPE),
        ("mtom-huge-header", mtom.replace(b"Content-ID: <doc1@fuzz>",
                                          b"X-Pad: " + b"p" * 40_000), fuzz.MTOM_TYPE),
        ("mtom-bad-base64", mtom.replace(b"Content-Transfer-Encoding: binary\r\nContent-ID: "
                                         b"<doc1", b"Content-Transfer-Encoding: base64\r\n"
                                                   b"Content-ID: <doc1"), fuzz.MTOM_TYPE),
        ("mtom-dup-cid-nul", mtom.replace(b"<doc1@fuzz>", b"<root@fuzz\x00>"), fuzz.MTOM_TYPE),
    ]
    return out


def generated(n: int, seed: int = 6) -> list[tuple[str, bytes, str]]:
    """Byte-level mutations of a valid envelope and a valid MTOM body."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        mtom = i % 2 == 1
        data = bytearray(fuzz.mtom_body() if mtom else fuzz.VALID_ENVELOPE)
        for _ in range(rnd.randint(1, 4)):
            pos = rnd.randint(0, len(data))
            kind = rnd.randint(0, 3)
            if kind == 0:
                del data[pos:pos + rnd.randint(1, 200)]
            elif kind == 1:
                data[pos:pos] = rnd.choice(fuzz.HOSTILE_SNIPPETS)
            elif kind == 2:
                data[pos:pos] = rnd.randbytes(rnd.randint(1, 16))
            elif pos < len(data):
                data[pos] = rnd.randint(0, 255)
        out.append(("mtom-fuzz" if mtom else "envelope-fuzz", bytes(data),
                    fuzz.MTOM_TYPE if mtom else SOAP_CT))
    return out


def check_answer(resp: requests.Response) -> str:
    """No stack trace ever; a 500 only for the SOAP 1.2 codes that require it."""
    assert b"Traceback" not in resp.content and b'File "' not in resp.content
    if resp.status_code == 500:
        code = etree.fromstring(resp.content).findtext(
            f"{{{SOAP12}}}Body/{{{SOAP12}}}Fault/{{{SOAP12}}}Code/{{{SOAP12}}}Value")
        assert code in ("env:MustUnderstand", "env:VersionMismatch"), resp.text[:300]
    assert resp.status_code in (200, 400, 413, 415, 500), resp.status_code
    return str(resp.status_code)


# --- raw sockets: truncated bodies and slow senders -------------------------------------------

def tls_socket(live_gateway) -> ssl.SSLSocket:  # type: ignore[no-untyped-def]
    ctx = ssl.create_default_context(cafile=str(live_gateway.pki.ca_cert))
    ctx.load_cert_chain(str(live_gateway.pki.client_cert), str(live_gateway.pki.client_key))
    host, port = live_gateway.base_url.split("//")[1].split(":")
    raw = socket.create_connection((host, int(port)), timeout=30)
    return ctx.wrap_socket(raw, server_hostname=host)


def head(path: str, length: int, ctype: str = SOAP_CT) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def truncated(live_gateway, data: bytes, ctype: str) -> None:  # type: ignore[no-untyped-def]
    """Announce the whole body, send part of it, close."""
    with tls_socket(live_gateway) as s:
        s.sendall(head("/xds/registry", len(data), ctype) + data[: len(data) // 2])


def slow_sender(live_gateway, stop: threading.Event, sent: list[int]) -> None:  # type: ignore[no-untyped-def]
    """A few bytes per second of a valid request head, then body, until `stop`."""
    data = head("/xds/registry", len(fuzz.VALID_ENVELOPE)) + fuzz.VALID_ENVELOPE
    try:
        with tls_socket(live_gateway) as s:
            for i in range(0, len(data), 3):
                if stop.wait(1.0):
                    return
                s.sendall(data[i:i + 3])
                sent[0] += 3
    except OSError:
        pass  # the gateway may cut a slow sender off


def test_hostile_run(live_gateway, session: requests.Session) -> None:  # type: ignore[no-untyped-def]
    base = live_gateway.base_url
    normal_query(session, base)  # warm up every worker's import of the handlers
    pids = _pids(base)
    assert len(pids) >= 2, pids  # master and workers
    rss_before = _rss_kib(pids)

    cases = hand_made() * 3 + generated(2400)
    statuses: Counter[str] = Counter()
    normal_ok = 0

    def post(case: tuple[str, bytes, str]) -> str:
        _, data, ctype = case
        resp = session.post(base + "/xds/registry", data=data,
                            headers={"Content-Type": ctype}, timeout=60)
        return check_answer(resp)

    with cf.ThreadPoolExecutor(6) as pool:  # warm-up: every worker meets the big cases once
        for _ in pool.map(post, hand_made() * 2):
            pass
    time.sleep(0.5)
    rss_warm = _rss_kib(pids)
    try:
        with cf.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(post, c) for c in cases]
            for i in range(0, 40):  # truncated bodies over raw sockets
                data, ctype = ((fuzz.VALID_ENVELOPE, SOAP_CT) if i % 2 == 0
                               else (fuzz.mtom_body(b"x" * 50_000 + fuzz.VALID_ENVELOPE),
                                     fuzz.MTOM_TYPE))
                truncated(live_gateway, data, ctype)
            for n, f in enumerate(cf.as_completed(futures)):
                statuses[f.result()] += 1
                if n % 200 == 0:  # normal requests keep being answered meanwhile
                    normal_query(session, base)
                    normal_ok += 1
    finally:
        pass
    normal_query(session, base)
    normal_ok += 1
    time.sleep(0.5)
    rss_after = _rss_kib(_pids(base))
    assert set(_pids(base)) == set(pids)  # no worker died and was replaced
    REPORT.update(requests=sum(statuses.values()), truncated=40, normal=normal_ok,
                  statuses=dict(statuses),
                  rss_before_kib=rss_before, rss_warm_kib=rss_warm, rss_after_kib=rss_after)
    print(f"\nhostile run: {REPORT}")
    (Path(os.environ.get("HOSTILE_REPORT_DIR", live_gateway.workdir)) / "hostile.txt").write_text(
        repr(REPORT))
    assert statuses["200"] < sum(statuses.values())  # the hostile ones were refused
    # Bounded growth: after a large request each worker collects the request's reference
    # cycles and gives freed heap back (malloc_trim), with 2 malloc arenas per process
    # (gateway.soap.worker). Measured: +75 to +95 MiB for master and 2 workers over the run
    # (it was +350 to +530 MiB, each thread keeping the peak of the biggest envelope it
    # parsed), +30 to +55 MiB of it after the warm-up.
    assert rss_after - rss_before < 2 * 128 * 1024, (rss_before, rss_warm, rss_after)
    assert rss_after - rss_warm < 96 * 1024, (rss_before, rss_warm, rss_after)


def test_slow_senders_do_not_starve_normal_requests(live_gateway) -> None:  # type: ignore[no-untyped-def]
    """32 slow senders (4 x workers x threads) trickle request heads; their connections wait
    in the workers' event loops, not in threads (gateway.soap.worker), so normal requests,
    new TLS handshakes included, are answered meanwhile."""
    stop = threading.Event()
    sent = [0]
    slow = [threading.Thread(target=slow_sender, args=(live_gateway, stop, sent), daemon=True)
            for _ in range(32)]
    for t in slow:
        t.start()
    try:
        time.sleep(4)
        s = requests.Session()
        s.trust_env = False
        s.verify = str(live_gateway.pki.ca_cert)
        s.cert = (str(live_gateway.pki.client_cert), str(live_gateway.pki.client_key))
        for _ in range(3):
            s.close()  # a new connection (and TLS handshake) each time
            resp = s.post(live_gateway.base_url + "/xds/registry", data=fuzz.envelope(),
                          headers={"Content-Type": SOAP_CT}, timeout=4)
            assert resp.status_code == 200
            assert b"AdhocQueryResponse" in resp.content
        s.close()
        # The slow senders were still connected and sending all along.
        assert sum(t.is_alive() for t in slow) == len(slow)
        assert sent[0] >= len(slow) * 3
    finally:
        stop.set()
        for t in slow:
            t.join(5)
