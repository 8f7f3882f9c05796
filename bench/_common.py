"""Helpers only the benchmarks share: a synthetic CT study loaded into an Orthanc, and the
processes of a gateway with their peak resident memory (VmHWM) read from /proc."""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.orthanc import RunningOrthanc  # noqa: E402
from tests.support.rad69 import synthetic_ct_study  # noqa: E402


def synthetic_study(n: int) -> tuple[str, str, list[tuple[str, bytes]]]:
    """n CT instances of 512x512 16-bit (about 0.5 MB each), as Part 10 files."""
    pixels = bytes((i * 7 + (i >> 9)) & 0xFF for i in range(512 * 512 * 2))
    return synthetic_ct_study(n, size=512, pixels=pixels, patient_id="BENCH-1",
                              patient_name="Bench^Synthetic")


def load_synthetic_study(orthanc: RunningOrthanc, n: int) -> list[tuple[str, str, str]]:
    """Build `synthetic_study(n)`, store it in `orthanc`, print its size and loading time, and
    return its (study, series, instance) UIDs."""
    t = time.monotonic()
    study, series, files = synthetic_study(n)
    total = sum(len(b) for _s, b in files)
    for _sop, data in files:
        orthanc.rest("POST", "/instances", data, content_type="application/dicom")
    docs = [(study, series, sop) for sop, _b in files]
    del files
    print(f"study: {n} instances, {total / 1e6:.0f} MB, loaded in "
          f"{time.monotonic() - t:.1f} s")
    return docs


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return out


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0
