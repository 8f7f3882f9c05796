"""RAD-69 through the gateway against dcmtk getscu straight from the same Orthanc, same run.

    .venv/bin/python bench/rad69.py [--instances 500] [--associations 3] [--workers 2]
                                    [--retrieve c-get|c-move] [--repeat 2]
                                    [--engine builtin|pynetdicom]
                                    [--response-order root-first|root-last]
                                    [--cpu] [--profile-client FILE] [--discard]

Builds a synthetic CT study (a 512x512 16-bit image cloned with new UIDs: about 0.5 MB per
instance, 500 instances = about 256 MB), loads it into a private Orthanc, then times:
getscu (TCP_NODELAY=1, bit-preserving) fetching the study, and one RAD-69 of every instance
through a real gateway (HTTPS with mutual TLS, gunicorn workers) with the response spooled to
disk by SoapClient. Prints the throughput ratio (gateway / getscu) and the peak RSS (VmHWM) of
every gateway process (gunicorn master and workers, retrieve pool processes). Asserts nothing.
With --cpu, the CPU seconds (utime + stime from /proc) each process spent during each run:
Orthanc and getscu for the getscu run; Orthanc, the gunicorn master and workers, the retrieve
pool processes and this client for the gateway run. With --log-level INFO the gateway logs each
RAD-69's C-FIND and retrieve times.

History on this 2-core machine (2026-11, other work running; getscu's first run is cold):
pynetdicom engine, 500 instances: gateway 1.86-2.41 s, ratio 0.22-0.33; the built-in engine
(f1286bb): gateway 1.12-1.20 s, ratio 0.44-0.55; root-last (9dc6a6b): 0.79-1.08 s, ratio
0.51-0.79.

Current figures (2026-11-24 13:35-13:45 UTC, quiet machine, builtin engine, 3 associations
(a whole series goes over one, at SERIES level), 2 workers; --repeat 7 for 500, 4 for 2000;
median [range]; "fastest" = the fastest gateway run against getscu's fastest):

| instances | order | getscu s | gateway s | ratio | fastest | peak RSS |
| --- | --- | --- | --- | --- | --- | --- |
| 500, 263 MB | root-last | 0.49 [0.47-0.56] | 0.52 [0.51-0.57] | 0.96 [0.86-1.03] | 0.93 | 81 MB |
| 500, 263 MB | root-first | 0.50 [0.46-0.63] | 0.71 [0.68-0.74] | 0.69 [0.66-0.88] | 0.68 | 82 MB |
| 2000, 1 GB | root-last | 2.10 [1.96-5.92] | 2.36 [2.10-2.44] | 0.89 [0.80-2.82] | 0.93 | 89 MB |
| 2000, 1 GB | root-first | 2.00 [1.87-4.35] | 2.84 [2.53-3.22] | 0.69 [0.62-1.72] | 0.74 | 90 MB |
| 500, c-move | root-first | 0.57 [0.57-0.67] | 1.10 [1.04-1.20] | 0.52 [0.47-0.65] | 0.54 | 83 MB |

CPU seconds per request, 500 instances, root-last: Orthanc 0.15-0.22, gunicorn worker
0.20-0.23, retrieve process 0.16-0.17, client 0.36-0.39: 0.90-0.98 in all (getscu's run:
Orthanc 0.19-0.23 + getscu 0.20-0.33). Root-first is the retrieve (0.28-0.30 s) then the
response, never overlapping: its ratio cannot reach root-last's. C-MOVE: the PACS's
associations to our storage SCP write one file per instance (routing by SOP Instance UID
across worker processes) and nothing is streamed before the C-MOVE ends.

What changed in the session that got there (at its start: root-last 500 0.78-1.03 s,
1.25-1.30 CPU s; 2000 3.5-4.8 s; c-move retrieve 2.0 s):
- TCP_QUICKACK before each receive on the DICOM link: Orthanc (DCMTK) leaves Nagle on, sends a
  PDU header as a small segment and holds the rest until it is acknowledged; Linux delays
  that by 40 ms. A C-FIND 43 -> 1.2 ms; one association's C-GET of 500 instances 0.65-1.46 s
  (17-24 stalls) -> 0.32-0.43 s. getscu suffers the same stalls, hence its 0.4-1.3 s swings.
- One spool segment per association instead of a file per instance: retrieve process CPU
  0.24-0.28 -> 0.15-0.20 s per 500 instances (ext4 inode creation).
- Asking the PACS less (gateway.imaging.plan): SOP Classes in Study, series counts, a whole
  series fetched at SERIES level without the IMAGE-level C-FIND: resolution 0.10-0.13 s ->
  0.01 s (2000: 0.35 -> 0.01-0.02 s); Orthanc CPU 0.28-0.31 -> 0.15-0.22 s.
- Progress reports in batches: worker 0.27-0.29 -> 0.19-0.22 s (root-last, 500).
- Client (MTOM receive): 0.50 [0.33-0.55] -> 0.35 [0.24-0.48] s.
- C-MOVE on our own storage SCP and SCU: retrieve 2.0 s -> 0.56-0.75 s.

The session before (another helper's benchmarks running, load average 2-3):

| instances | order | getscu s | gateway s | ratio | peak RSS |
| --- | --- | --- | --- | --- | --- |
| 500, 263 MB | root-first | 0.57 [0.52-0.70] | 1.23 [1.15-1.56] | 0.45 [0.37-0.56] | 85 MB |
| 500, 263 MB | root-last | 0.62 [0.54-0.66] | 1.09 [0.94-1.26] | 0.57 [0.52-0.60] | 83 MB |
| 2000, 1050 MB | root-first | 2.59 [2.07-5.89] | 5.61 [5.34-7.32] | 0.46 [0.39-0.81] | 94 MB |
| 2000, 1050 MB | root-last | 2.32 [2.03-2.35] | 4.65 [3.81-5.44] | 0.51 [0.43-0.53] | 94 MB |

What the session before measured (tools: /proc CPU counters, perf, strace -c, cProfile):
- The engine is at the kernel's floor: per 263 MB it spends 0.25-0.35 CPU s, as much as
  getscu (0.30-0.38), about 90% in the kernel (perf): ext4 inode creation 28% (this machine's
  ext4 has no journal, and then every create skips the inodes deleted in the last minute,
  `recently_deleted`: with spool folders created and removed per request each create costs
  0.1-0.3 ms), page-cache writes 12%, socket reads 10%.
  With the bench's folders on tmpfs (TMPDIR=/dev/shm) the pool spent 0.15-0.23 s and the
  client 0.33-0.38 s instead of 0.33-0.43 and 0.51-0.55 s.
- Receive path (recv_into one buffer, os.write straight from it, no Python file buffer, no
  stat, no random temp name per file): 2 mmap/munmap, 1 stat and 1 getrandom fewer per
  instance, CPU unchanged within noise (A/B alternating: pool 0.26-0.43 s either way).
- Max PDU length advertised (one association, 6-12 runs each, Orthanc + us): 16 KiB 0.21-0.32
  + 0.38-0.44; 32 KiB 0.26 + 0.37; 48 KiB 0.28 + 0.36; 64 KiB 0.21-0.22 + 0.30-0.36; 96 KiB
  0.28 + 0.36; 128 KiB 0.29 + 0.35; 1 MiB 0.28 + 0.30-0.34; unlimited 0.28 + 0.31. 64 KiB is
  now advertised: through the gateway (A/B) Orthanc went from 0.32-0.37 to 0.28-0.34 s.
- SO_RCVBUF 256 KiB / 2 MiB / 8 MiB set before connecting, MSG_WAITALL reads: no change.
- Associations 1-4 (root-last, 3 runs each): 1: 1.24-1.69 s; 2: 0.89-1.67 s; 3: 1.04-1.13 s;
  4: 0.96-1.09 s, with more CPU (pool 0.28-0.44). The default stays 3.
- Retrieve in threads of the gunicorn worker instead of the pool: worker 0.53-0.65 s against
  worker 0.25-0.31 + pool 0.24-0.39 s, no faster: the pool stays.
- Orthanc's side: an IMAGE-level C-GET with a UID list costs it more than a SERIES- or
  STUDY-level one (2000 instances, one association: 1.27-1.39 s against 0.89-0.94 and getscu's
  0.71-0.76); the C-FIND of 2000 UIDs 0.25 s. Cutting the list into C-GETs of 50-667 UIDs
  does not help.
- Per-instance progress reports (root-last) cost about 0.07 CPU s per 500 instances (pool
  pipe writes, the dispatcher and relay threads).
- Client (SoapClient, --profile-client): about 20,000 TLS record reads per 263 MB, but reading
  263 MB of TLS from a socket costs 0.11 CPU s however it is read (socket reads of 16 KB or
  MemoryBIO with 1 MiB reads); its other costs are creating and writing 500 files (perf:
  ext4 inode creation 27%, writes 22%, TCP reads 13%, Python 16%, crypto 6.5%).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from bench._common import (  # noqa: E402
    CpuMeter,
    descendants,
    gateway_processes,
    load_synthetic_study,
    vm_hwm_mb,
)
from gateway.demo import free_port, start_gateway, write_config  # noqa: E402
from gateway.ebrim.parse import parse_retrieve_document_set_response  # noqa: E402
from gateway.ns import Action  # noqa: E402
from gateway.security.pki import create_dev_pki  # noqa: E402
from gateway.soap.client import SoapClient  # noqa: E402
from tests.support.orthanc import start_orthanc  # noqa: E402
from tests.support.rad69 import EXPLICIT_LE, configure_pacs, getscu, rad69_request  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--associations", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--retrieve", default="c-get", choices=["c-get", "c-move"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--engine", default="builtin", choices=["builtin", "pynetdicom"],
                    help="[pacs] dimse_engine: the C-GET receive path")
    ap.add_argument("--response-order", default="root-first",
                    choices=["root-first", "root-last"],
                    help="[pacs] response_order: root-last streams each instance as it "
                         "arrives (read by SoapClient through `start`)")
    ap.add_argument("--discard", action="store_true",
                    help="the client reads the HTTP response and discards it (no MTOM "
                         "parsing, no files): the gateway's own throughput, without the "
                         "consumer's cost on these shared cores")
    ap.add_argument("--cpu", action="store_true",
                    help="print the CPU seconds each process spent per run (Orthanc, getscu, "
                         "gunicorn master and workers, retrieve pool, this client)")
    ap.add_argument("--profile-client", metavar="FILE",
                    help="cProfile the client's last RAD-69 call into FILE (pstats)")
    ap.add_argument("--log-level", default="WARNING",
                    help="the gateway's log level (INFO shows each RAD-69's C-FIND and "
                         "retrieve times)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-rad69-"))
    move_port = free_port()
    orthanc = start_orthanc(work / "orthanc", dicom_port=free_port(), http_port=free_port(),
                            known_modalities={"XDSI-GW": ("127.0.0.1", move_port)})
    gateway = None
    try:
        docs = load_synthetic_study(orthanc, args.instances)
        study = docs[0][0]

        pki = create_dev_pki(work / "pki")
        port = free_port()
        (work / "gw").mkdir()
        config = write_config(work / "gw", pki, port, workers=args.workers)
        configure_pacs(config, port=orthanc.dicom_port, retrieve=args.retrieve,
                       move_port=move_port, associations=args.associations,
                       timeout_seconds=60, dimse_engine=args.engine,
                       response_order=args.response_order)
        if args.instances > 1000:  # [limits] max_document_requests defaults to 1000
            config.write_text(config.read_text()
                              + f"\n[limits]\nmax_document_requests = {args.instances}\n")
        gateway = start_gateway(config, pki, port, log_level=args.log_level)
        client = SoapClient(gateway.base_url, ca_bundle=pki.ca_cert,
                            certificate=pki.client_cert, private_key=pki.client_key,
                            timeout=600)
        body = rad69_request(docs, [EXPLICIT_LE])

        times: list[tuple[float, float]] = []  # (getscu s, gateway s) per run
        for run in range(args.repeat):
            out = work / f"getscu-{run}"
            meter = CpuMeter({orthanc.process.pid: "orthanc"})
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            meter.start()
            t = time.monotonic()
            got = getscu(orthanc.dicom_port, orthanc.aet, study, out)
            t_getscu = time.monotonic() - t
            cpu_getscu = meter.stop()
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            getscu_cpu = (after.ru_utime + after.ru_stime
                          - children.ru_utime - children.ru_stime)
            size_getscu = sum(p.stat().st_size for p in got)
            shutil.rmtree(out)

            spool = work / f"reply-{run}"
            spool.mkdir()
            labels = gateway_processes(gateway.process.pid)
            labels[orthanc.process.pid] = "orthanc"
            meter = CpuMeter(labels)
            meter.start()
            client_cpu = time.process_time()
            t = time.monotonic()
            profile = None
            if args.profile_client and run == args.repeat - 1:
                import cProfile
                profile = cProfile.Profile()
                profile.enable()
            if args.discard:
                size_gw, status = _discard(client, body)
                t_gw = time.monotonic() - t
            else:
                reply = client.call("/xdsi/imaging-source", Action.RAD69, body,
                                    spool_dir=spool)
                t_gw = time.monotonic() - t
            if profile is not None:
                profile.disable()
                profile.dump_stats(args.profile_client)
            client_cpu = time.process_time() - client_cpu
            cpu_gw = meter.stop()
            if not args.discard:
                assert reply.body is not None
                resp = parse_retrieve_document_set_response(reply.body)
                size_gw = sum(p.stat().st_size for p in spool.iterdir())
                status = (f"{resp.status.rsplit(':', 1)[1]} {len(resp.documents)} "
                          "documents")
            shutil.rmtree(spool)
            times.append((t_getscu, t_gw))
            print(f"run {run + 1}: getscu {len(got)} files {size_getscu / 1e6:.0f} MB in "
                  f"{t_getscu:.2f} s ({size_getscu / 1e6 / t_getscu:.0f} MB/s); gateway "
                  f"{status} {size_gw / 1e6:.0f} MB in {t_gw:.2f} s "
                  f"({size_gw / 1e6 / t_gw:.0f} MB/s); ratio {t_getscu / t_gw:.2f}")
            if args.cpu:
                print(f"  cpu s, getscu run: orthanc {sum(cpu_getscu.values()):.2f}, "
                      f"getscu {getscu_cpu:.2f}")
                print("  cpu s, gateway run: " + _cpu_line(labels, cpu_gw, client_cpu))
        client.close()
        _summary(times)
        pids = descendants(gateway.process.pid)
        peaks = {pid: vm_hwm_mb(pid) for pid in pids}
        print("gateway peak RSS (VmHWM) per process, MB: "
              + ", ".join(f"{v:.0f}" for v in sorted(peaks.values(), reverse=True))
              + f"; max {max(peaks.values()):.0f} MB")
    finally:
        if gateway is not None:
            gateway.stop()
        orthanc.stop()
        shutil.rmtree(work, ignore_errors=True)


def _summary(times: list[tuple[float, float]]) -> None:
    """Medians over the runs, and the ratio of the fastest runs of each (getscu's time swings
    with delayed-ACK stalls against Orthanc that the gateway's link avoids)."""
    if not times:
        return
    getscu = [g for g, _w in times]
    gateway = [w for _g, w in times]
    ratios = [g / w for g, w in times]
    print(f"summary over {len(times)} runs: getscu median {statistics.median(getscu):.2f} s "
          f"[{min(getscu):.2f}-{max(getscu):.2f}], gateway median "
          f"{statistics.median(gateway):.2f} s [{min(gateway):.2f}-{max(gateway):.2f}]; "
          f"ratio median {statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}], "
          f"fastest against fastest {min(getscu) / min(gateway):.2f}")


def _discard(client: SoapClient, body: object) -> tuple[int, str]:
    """POST the RAD-69 and read its HTTP body into nothing: (bytes read, a status line)."""
    resp = client._post("/xdsi/imaging-source", Action.RAD69, body, (), False, ())  # type: ignore[arg-type]
    try:
        buf = bytearray(1 << 20)
        total = 0
        while True:
            n = resp.raw.readinto(buf)
            if not n:
                break
            total += n
    finally:
        resp.close()
    return total, f"HTTP {resp.status_code} (discarded)"


def _cpu_line(labels: dict[int, str], cpu: dict[int, float], client: float) -> str:
    by_label: dict[str, list[float]] = {}
    for pid, label in labels.items():
        by_label.setdefault(label, []).append(cpu.get(pid, 0.0))
    parts = []
    for label in ("orthanc", "master", "worker", "forkserver", "pool", "resource-tracker",
                  "other"):
        values = by_label.get(label)
        if values and sum(values) >= 0.005:
            each = "+".join(f"{v:.2f}" for v in sorted(values, reverse=True) if v >= 0.005)
            parts.append(f"{label} {sum(values):.2f}" + (f" ({each})" if len(values) > 1
                                                          else ""))
    parts.append(f"client {client:.2f}")
    total = sum(cpu.values()) + client
    return ", ".join(parts) + f"; total {total:.2f}"


if __name__ == "__main__":
    main()
