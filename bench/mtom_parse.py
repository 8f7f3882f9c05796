"""Throughput of the MTOM code: parse_multipart and mtom_response over a 200 MB attachment.

Prints MB/s and the process's peak RSS; asserts nothing. Usage:
    python bench/mtom_parse.py [size_mb] [chunk_kib]
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.soap.mtom import mtom_response
from gateway.soap.multipart import parse_multipart
from gateway.transactions import Attachment
from tests.support.streams import GeneratedStream

ENVELOPE = (b'<?xml version="1.0" encoding="UTF-8"?><env:Envelope '
            b'xmlns:env="http://www.w3.org/2003/05/soap-envelope"><env:Body><r/></env:Body>'
            b"</env:Envelope>")
MB = 1024 * 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    size = int(sys.argv[1]) * MB if len(sys.argv) > 1 else 200 * MB
    chunk = int(sys.argv[2]) * 1024 if len(sys.argv) > 2 else 256 * 1024
    print(f"attachment {size / MB:.0f} MiB, chunk {chunk // 1024} KiB, "
          f"start RSS {peak_rss_mb():.1f} MiB")
    with tempfile.TemporaryDirectory(prefix="mtom-bench-") as tmp:
        folder = Path(tmp)
        src = folder / "src.bin"
        block = bytes(range(256)) * 4096
        with open(src, "wb") as f:
            left = size
            while left > 0:
                f.write(block[:min(left, len(block))])
                left -= len(block)
        atts = [Attachment("big@bench", src, size, "application/dicom")]

        # mtom_response: stream the file out (consumer discards the bytes).
        ctype, length, body = mtom_response(ENVELOPE, atts, chunk_size=chunk)
        t = time.perf_counter()
        sent = sum(len(c) for c in body)
        dt = time.perf_counter() - t
        assert sent == length
        print(f"mtom_response   {length / MB / dt:8.0f} MB/s  ({dt:.2f} s), "
              f"peak RSS {peak_rss_mb():.1f} MiB")

        # parse_multipart from a generator-backed stream (no disk read on the input side).
        ctype, length, body = mtom_response(ENVELOPE, atts, chunk_size=chunk)
        spool = folder / "spool1"
        spool.mkdir()
        t = time.perf_counter()
        root, got = parse_multipart(GeneratedStream(iter(body)), ctype, spool,
                                    max_envelope_bytes=MB, max_total_bytes=2 * length,
                                    content_length=length, chunk_size=chunk)
        dt = time.perf_counter() - t
        assert root == ENVELOPE and got["big@bench"].size == size
        print(f"parse (generated) {length / MB / dt:6.0f} MB/s  ({dt:.2f} s), "
              f"peak RSS {peak_rss_mb():.1f} MiB")
        got["big@bench"].path.unlink()

        # parse_multipart from a file holding the wire bytes (as a socket would deliver them).
        wire = folder / "wire.bin"
        ctype2, length, body = mtom_response(ENVELOPE, atts, chunk_size=chunk)
        with open(wire, "wb") as f:
            for c in body:
                f.write(c)
        spool = folder / "spool2"
        spool.mkdir()
        with open(wire, "rb", buffering=0) as f:
            t = time.perf_counter()
            root, got = parse_multipart(f, ctype2, spool, max_envelope_bytes=MB,
                                        max_total_bytes=2 * length, content_length=length,
                                        chunk_size=chunk)
            dt = time.perf_counter() - t
        assert got["big@bench"].size == size
        print(f"parse (file)      {length / MB / dt:6.0f} MB/s  ({dt:.2f} s), "
              f"peak RSS {peak_rss_mb():.1f} MiB")


if __name__ == "__main__":
    main()
