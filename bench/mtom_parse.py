"""Throughput of the MTOM code: mtom_response and the multipart parser (parse_multipart).

Cases: mtom_response over one attachment (the consumer discards the bytes); parse_multipart of
that message from a generator-backed stream and from a file holding the wire bytes; and a
RAD-69-like reply, `--parts` attachments of `--part-kib` each (default 500 of 526 KiB, the
synthetic CT study of bench/rad69.py) parsed into a spool folder of one file per part, at the
parser's default read size and at the client's (`SoapClient.call`, RECEIVE_CHUNK). Prints, for
each case, the median and range over `--repeat` runs of the wall time (as MB/s) and of this
process's CPU time (what the parser costs, write syscalls included), and the peak RSS; asserts
nothing but the sizes. Usage:
    python bench/mtom_parse.py [size_mb] [chunk_kib] [--repeat 5] [--parts 500]
                               [--part-kib 526] [--spool DIR]
The spool folders are made under --spool (default: the system's temporary folder); on ext4
without a journal creating files costs more after many deletions (bench/rad69.py), so compare
runs made under the same conditions, or use a tmpfs (/dev/shm) to see the parser's own cost.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.soap.mtom import mtom_response
from gateway.soap.multipart import DEFAULT_CHUNK, parse_multipart
from gateway.transactions import Attachment
from tests.support.streams import GeneratedStream

ENVELOPE = (b'<?xml version="1.0" encoding="UTF-8"?><env:Envelope '
            b'xmlns:env="http://www.w3.org/2003/05/soap-envelope"><env:Body><r/></env:Body>'
            b"</env:Envelope>")
MB = 1024 * 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_source(path: Path, size: int) -> None:
    block = bytes(range(256)) * 4096
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)


def measure(label: str, nbytes: int, repeat: int, run: Callable[[int], None]) -> None:
    """Run `run(i)` `repeat` times; print median [range] of MB/s (wall) and CPU seconds."""
    walls: list[float] = []
    cpus: list[float] = []
    for i in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        run(i)
        cpus.append(time.process_time() - c)
        walls.append(time.perf_counter() - t)
    rates = sorted(nbytes / MB / w for w in walls)
    print(f"{label:<34} {statistics.median(rates):6.0f} MB/s [{rates[0]:.0f}-{rates[-1]:.0f}], "
          f"cpu {statistics.median(cpus):.3f} s [{min(cpus):.3f}-{max(cpus):.3f}], "
          f"peak RSS {peak_rss_mb():.1f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("size_mb", nargs="?", type=int, default=200)
    ap.add_argument("chunk_kib", nargs="?", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--parts", type=int, default=500)
    ap.add_argument("--part-kib", type=int, default=526)
    ap.add_argument("--spool", type=Path, default=None)
    args = ap.parse_args()
    size = args.size_mb * MB
    chunk = args.chunk_kib * 1024
    print(f"attachment {size / MB:.0f} MiB, chunk {chunk // 1024} KiB, "
          f"start RSS {peak_rss_mb():.1f} MiB")
    with tempfile.TemporaryDirectory(prefix="mtom-bench-", dir=args.spool) as tmp:
        folder = Path(tmp)
        src = folder / "src.bin"
        write_source(src, size)
        atts = [Attachment("big@bench", src, size, "application/dicom")]

        def spool(name: str) -> Path:
            path = folder / name
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            return path

        # mtom_response: stream the file out (consumer discards the bytes).
        def send(_i: int) -> None:
            _ctype, length, body = mtom_response(ENVELOPE, atts, chunk_size=chunk)
            assert sum(len(c) for c in body) == length

        measure("mtom_response", size, args.repeat, send)

        # parse_multipart from a generator-backed stream (no disk read on the input side).
        def parse_generated(_i: int) -> None:
            ctype, length, body = mtom_response(ENVELOPE, atts, chunk_size=chunk)
            root, got = parse_multipart(GeneratedStream(iter(body)), ctype, spool("gen"),
                                        max_envelope_bytes=MB, max_total_bytes=2 * length,
                                        content_length=length, chunk_size=chunk)
            assert root == ENVELOPE and got["big@bench"].size == size

        measure("parse (generated)", size, args.repeat, parse_generated)

        # parse_multipart from a file holding the wire bytes (as a socket would deliver them).
        wire = folder / "wire.bin"
        ctype, length, body = mtom_response(ENVELOPE, atts, chunk_size=chunk)
        write_chunks(wire, body)

        def parse_file(_i: int) -> None:
            with open(wire, "rb", buffering=0) as f:
                _root, got = parse_multipart(f, ctype, spool("file"), max_envelope_bytes=MB,
                                             max_total_bytes=2 * length,
                                             content_length=length, chunk_size=chunk)
            assert got["big@bench"].size == size

        measure("parse (file)", size, args.repeat, parse_file)
        wire.unlink()

        # A RAD-69-like reply: many parts of about 0.5 MB, one spool file each. (The client
        # pulls in requests and lxml: imported here, the lines above show the parser's RSS.)
        from gateway.soap.client import RECEIVE_CHUNK

        part = args.part_kib * 1024
        write_source(src, part)
        many = [Attachment(f"{i}@bench", src, part, "application/dicom")
                for i in range(args.parts)]
        ctype, length, body = mtom_response(ENVELOPE, many, chunk_size=256 * 1024)
        write_chunks(wire, body)
        for read_size, what in ((DEFAULT_CHUNK, "default"), (RECEIVE_CHUNK, "client")):
            def parse_parts(_i: int, read_size: int = read_size) -> None:
                with open(wire, "rb", buffering=0) as f:
                    _root, got = parse_multipart(f, ctype, spool("parts"),
                                                 max_envelope_bytes=MB,
                                                 max_total_bytes=2 * length,
                                                 content_length=length, chunk_size=read_size)
                assert len(got) == args.parts

            measure(f"parse {args.parts} parts, {read_size // 1024} KiB ({what})",
                    length, args.repeat, parse_parts)


def write_chunks(path: Path, chunks: Iterable[bytes]) -> None:
    with open(path, "wb") as f:
        for c in chunks:
            f.write(c)


if __name__ == "__main__":
    main()
