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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads; 0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    import os

    # after "pid (comm)": state is field 0, utime field 11, stime field 12
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def gateway_processes(master: int) -> dict[int, str]:
    """The processes of a gateway started as `master`, each labelled: master, worker
    (gunicorn), forkserver, pool (retrieve pool processes, children of the forkserver),
    resource-tracker, or other."""
    out: dict[int, str] = {}
    for pid in descendants(master):
        try:
            text = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        parent = _ppid(pid)
        if pid == master:
            out[pid] = "master"
        elif "resource_tracker" in text:
            out[pid] = "resource-tracker"
        elif "forkserver" in text and parent != 0 and out.get(parent) == "forkserver":
            out[pid] = "pool"
        elif "forkserver" in text:
            out[pid] = "forkserver"
        elif parent == master:
            out[pid] = "worker"
        else:
            out[pid] = "other"
    return out


class CpuMeter:
    """CPU seconds per process of a set of processes between `start()` and `stop()`."""

    def __init__(self, pids: dict[int, str]):
        self.pids = pids
        self.before: dict[int, float] = {}

    def start(self) -> None:
        self.before = {pid: cpu_seconds(pid) for pid in self.pids}

    def stop(self) -> dict[int, float]:
        return {pid: cpu_seconds(pid) - self.before.get(pid, 0.0) for pid in self.pids}
