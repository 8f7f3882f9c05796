"""RAD-69 through the gateway against dcmtk getscu straight from the same Orthanc, same run.

    .venv/bin/python bench/rad69.py [--instances 500] [--associations 3] [--workers 2]
                                    [--retrieve c-get|c-move] [--repeat 2]
                                    [--engine builtin|pynetdicom]
                                    [--response-order root-first|root-last]

Builds a synthetic CT study (a 512x512 16-bit image cloned with new UIDs: about 0.5 MB per
instance, 500 instances = about 256 MB), loads it into a private Orthanc, then times:
getscu (TCP_NODELAY=1, bit-preserving) fetching the study, and one RAD-69 of every instance
through a real gateway (HTTPS with mutual TLS, gunicorn workers) with the response spooled to
disk by SoapClient. Prints the throughput ratio (gateway / getscu) and the peak RSS (VmHWM) of
every gateway process (gunicorn master and workers, retrieve pool processes). Asserts nothing.
With --log-level INFO the gateway logs each RAD-69's C-FIND and retrieve times.

Measured on a 2-core machine (2026-11, other work running; getscu's first run is cold and
slower, so compare the later runs): 500 instances, 263 MB: getscu 0.43-0.60 s, gateway
1.86-2.41 s (C-FIND 0.3 s, retrieve over 3 associations 1.0-1.3 s, MTOM response 0.5-0.8 s),
ratio 0.22-0.33, peak RSS 83-85 MB (the largest process). 2000 instances, 1050 MB: getscu
2.0 s, gateway 7.3 s (C-FIND 1.1 s, retrieve 4.1 s, response 2.1 s), ratio 0.28, peak RSS 94 MB.
Those figures are pynetdicom's (--engine pynetdicom). With the built-in C-FIND/C-GET engine
(--engine builtin, the default; same machine, runs 2-3 of 3): getscu 0.53-0.61 s, gateway
1.12-1.20 s (C-FIND 0.13 s, retrieve 0.48-0.53 s, response about 0.5 s, not yet overlapped
with the retrieve), ratio 0.44-0.55, peak RSS 85 MB; pynetdicom in the same session: gateway
2.09-2.41 s (C-FIND 0.33 s, retrieve 1.25-1.37 s), ratio 0.26-0.27.
--response-order (builtin engine, same machine, 2 sessions of 3 runs alternating, MTOM
parser without per-block copies): root-first gateway 0.98-1.16 s (response about 0.45 s after
the retrieve, bound by SoapClient's CPU: TLS reads and one file per part), ratio 0.41-0.64;
root-last 0.79-1.08 s (the response starts after C-FIND, the parts follow the retrieve, the
2 cores are then busy with Orthanc, the retrieve pool, the worker and the client), ratio
0.51-0.79; peak RSS 84-85 MB both. 2000 instances: root-first 4.27-4.33 s, root-last
3.79-3.84 s (getscu 1.8-2.3 s), peak RSS 94-95 MB.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from bench._common import descendants, load_synthetic_study, vm_hwm_mb  # noqa: E402
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
                       timeout_seconds=60)
        # configure_pacs appended [pacs] last: this line belongs to it
        config.write_text(config.read_text() + f'dimse_engine = "{args.engine}"\n')
        config.write_text(config.read_text()
                          + f'response_order = "{args.response_order}"\n')  # [pacs] too
        if args.instances > 1000:  # [limits] max_document_requests defaults to 1000
            config.write_text(config.read_text()
                              + f"\n[limits]\nmax_document_requests = {args.instances}\n")
        gateway = start_gateway(config, pki, port, log_level=args.log_level)
        client = SoapClient(gateway.base_url, ca_bundle=pki.ca_cert,
                            certificate=pki.client_cert, private_key=pki.client_key,
                            timeout=600)
        body = rad69_request(docs, [EXPLICIT_LE])

        for run in range(args.repeat):
            out = work / f"getscu-{run}"
            t = time.monotonic()
            got = getscu(orthanc.dicom_port, orthanc.aet, study, out)
            t_getscu = time.monotonic() - t
            size_getscu = sum(p.stat().st_size for p in got)
            shutil.rmtree(out)

            spool = work / f"reply-{run}"
            spool.mkdir()
            t = time.monotonic()
            reply = client.call("/xdsi/imaging-source", Action.RAD69, body, spool_dir=spool)
            t_gw = time.monotonic() - t
            assert reply.body is not None
            resp = parse_retrieve_document_set_response(reply.body)
            size_gw = sum(p.stat().st_size for p in spool.iterdir())
            shutil.rmtree(spool)
            print(f"run {run + 1}: getscu {len(got)} files {size_getscu / 1e6:.0f} MB in "
                  f"{t_getscu:.2f} s ({size_getscu / 1e6 / t_getscu:.0f} MB/s); gateway "
                  f"{resp.status.rsplit(':', 1)[1]} {len(resp.documents)} documents "
                  f"{size_gw / 1e6:.0f} MB in {t_gw:.2f} s ({size_gw / 1e6 / t_gw:.0f} MB/s); "
                  f"ratio {t_getscu / t_gw:.2f}")
        client.close()
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


if __name__ == "__main__":
    main()
