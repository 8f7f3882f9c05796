"""`xdsi-gateway demo` end to end, as a user runs it: the installed console script.

The demo starts its own gateway (mutual TLS on loopback), submits a report and a KOS manifest
with ITI-41, finds them with ITI-18 and retrieves them with ITI-43. It also starts an embedded
Orthanc, loads sample studies, publishes their manifests and, as a consumer, finds the CT study
by modality, retrieves its manifest (ITI-43) and its images (RAD-69), byte-exact. With
`--serve` it keeps the gateway and the PACS running until SIGINT or SIGTERM, and must then stop
them (no listener left behind).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".venv" / "bin" / "xdsi-gateway"
# As from a shell without PYTHONUNBUFFERED: the demo must flush what it prints itself.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

pytestmark = pytest.mark.integration


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run([str(SCRIPT), "demo", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, check=False, env=ENV)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    iti41 = next(line for line in out.splitlines() if "ITI-41" in line)
    assert iti41.rstrip().endswith("-> Success"), iti41
    assert re.search(r"ITI-18 .*-> Success, \d+ entries, 2 of ours", out), out
    assert re.search(r"ITI-43 .*-> Success, 2 documents", out), out
    retrieved = [line for line in out.splitlines() if "SHA-1" in line]
    assert len(retrieved) == 2, out
    assert all(line.rstrip().endswith("identical") for line in retrieved), out
    assert {"text/plain", "application/dicom"} == {line.split()[0] for line in retrieved}
    assert "demo: all checks passed" in out
    assert "Traceback" not in result.stderr
    _check_imaging(out, tmp_path, "Orthanc")
    # The work folder holds what the demo says it holds; the gateway and the PACS are gone.
    assert (tmp_path / "gateway.toml").is_file() and (tmp_path / "pki" / "ca.pem").is_file()
    port = int(re.search(r"serving on https://127\.0\.0\.1:(\d+)", out).group(1))  # type: ignore[union-attr]
    assert not _listening(port)
    pacs_port = int(re.search(r"embedded PACS: .* on 127\.0\.0\.1:(\d+)", out).group(1))  # type: ignore[union-attr]
    assert not _listening(pacs_port)


def test_demo_falls_back_to_a_pynetdicom_pacs(tmp_path: Path) -> None:
    """Without Orthanc (forced here), the demo's PACS is a pynetdicom Q/R SCP; same story."""
    env = dict(ENV, XDSI_DEMO_PACS="pynetdicom")
    result = subprocess.run([str(SCRIPT), "demo", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, check=False, env=env)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "demo: all checks passed" in out
    assert "Traceback" not in result.stderr
    _check_imaging(out, tmp_path, "pynetdicom Q/R SCP")
    pacs_port = int(re.search(r"embedded PACS: .* on 127\.0\.0\.1:(\d+)", out).group(1))  # type: ignore[union-attr]
    assert not _listening(pacs_port)


def test_demo_refuses_an_unknown_pacs_kind(tmp_path: Path) -> None:
    env = dict(ENV, XDSI_DEMO_PACS="dcm4chee")
    result = subprocess.run([str(SCRIPT), "demo", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, check=False, env=env)
    assert result.returncode == 1
    assert "the embedded PACS did not start: unknown PACS kind 'dcm4chee'" in result.stdout
    assert "Traceback" not in result.stderr


def _check_imaging(out: str, workdir: Path, kind: str) -> None:
    """The imaging part: the PACS loaded, manifests published, the CT study found by modality,
    its KOS retrieved, its images retrieved with RAD-69 into <workdir>/retrieved and
    byte-exact (dataset after the file meta group) to the files loaded into the PACS."""
    from pydicom import dcmread

    from gateway.demo_pacs import dataset_bytes

    assert re.search(rf"embedded PACS: {re.escape(kind)} on 127\.0\.0\.1:\d+", out), out
    loaded = re.search(rf"PACS: {re.escape(kind)} .* loaded with (\d+) instances in (\d+) "
                       r"studies", out)
    assert loaded, out
    studies = int(loaded.group(2))
    assert studies >= 3
    assert f"studies seen {studies}, published {studies}, replaced 0, unchanged 0, " \
           "failed 0" in out, out
    assert re.search(rf"ITI-18 FindDocuments eventCode CT\^\^DCM -> Success, 1 of the "
                     rf"{studies} manifests just published", out), out
    kos = re.search(r"ITI-43 Retrieve Document Set -> Success, 1 KOS manifest\(s\) "
                    r"referencing (\d+) instances", out)
    assert kos, out
    count = int(kos.group(1))
    assert re.search(rf"RAD-69 .* -> Success, {count} instances, written to "
                     rf"{re.escape(str(workdir / 'retrieved'))}", out), out
    lines = [line for line in out.splitlines() if line.rstrip().endswith("byte-exact")]
    assert len(lines) == count and all("CT Image Storage" in line for line in lines), out

    # What the demo says, checked independently: the files it wrote are the PACS's images.
    originals = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                 for p in (workdir / "samples").glob("*.dcm")}
    retrieved = [p for p in (workdir / "retrieved").glob("*.dcm")
                 if not p.name.startswith("manifest-")]
    assert len(retrieved) == count
    for path in retrieved:
        ds = dcmread(path)
        assert ds.Modality == "CT"
        assert dataset_bytes(path) == dataset_bytes(originals[str(ds.SOPInstanceUID)])
    manifests = list((workdir / "retrieved").glob("manifest-*.dcm"))
    assert len(manifests) == 1
    assert dcmread(manifests[0]).SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"


class _Reader(threading.Thread):
    """Collect a child's stdout lines; `wait_for` a pattern without blocking forever."""

    def __init__(self, stream: object) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[str] = []
        self.changed = threading.Condition()

    def run(self) -> None:
        for line in self.stream:  # type: ignore[attr-defined]
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append("")  # end of output
            self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)
        with self.changed:
            found = self.changed.wait_for(
                lambda: any(regex.search(line) for line in self.lines)
                or (bool(self.lines) and self.lines[-1] == ""), timeout=timeout)
            for line in self.lines:
                match = regex.search(line)
                if match:
                    return match
        raise AssertionError(f"{pattern!r} not printed (finished={found}):\n"
                             + "".join(self.lines))

    @property
    def text(self) -> str:
        with self.changed:
            return "".join(self.lines)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM],
                         ids=["SIGINT", "SIGTERM"])
def test_demo_serve_keeps_serving_until_a_signal(tmp_path: Path, signum: int) -> None:
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:  # a file: a lingering child cannot block the test on it
        # Started as a background job of a non-interactive shell would start it (CI may):
        # SIGINT inherited as ignored. The demo must still stop on it.
        proc = subprocess.Popen([str(SCRIPT), "demo", "--serve", "--workdir", str(tmp_path)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=ENV,
                                preexec_fn=_ignore_sigint)
    reader = _Reader(proc.stdout)
    reader.start()
    try:
        port = int(reader.wait_for(r"serving on https://127\.0\.0\.1:(\d+)", 90).group(1))
        reader.wait_for(r"^Configuration: ", 90)
        out = reader.text
        assert "demo: all checks passed" in out
        pacs = re.search(r"PACS \(Orthanc\): +DICOM 127\.0\.0\.1:(\d+), AE \w+", out)
        assert pacs, out
        pacs_port = int(pacs.group(1))
        assert _listening(pacs_port)
        for path in ("/xds/registry", "/xds/repository", "/xdsi/imaging-source", "/health"):
            assert f"https://127.0.0.1:{port}{path}" in out
        assert f"Client certificate: {tmp_path / 'pki' / 'client.pem'}" in out
        assert f"Client key:         {tmp_path / 'pki' / 'client-key.pem'}" in out
        assert f"CA:                 {tmp_path / 'pki' / 'ca.pem'}" in out
        # Still serving after it printed all that.
        assert proc.poll() is None
        assert _listening(port)

        proc.send_signal(signum)
        assert proc.wait(timeout=20) == 0, reader.text + err_path.read_text()
        reader.join(timeout=5)
        assert "stopping the gateway" in reader.text
        assert not _listening(port), "the gateway child still listens after the demo exited"
        assert not _listening(pacs_port), "the PACS still listens after the demo exited"
        stderr = err_path.read_text()
        assert "Traceback" not in stderr, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
