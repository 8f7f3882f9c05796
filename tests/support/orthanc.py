"""A private Orthanc for the integration tests and the benchmarks.

`start_orthanc(tmp_dir, dicom_port=..., http_port=...)` writes an Orthanc JSON configuration
(storage in `tmp_dir`, REST API on loopback only, the C-MOVE destinations it should know),
starts the Debian `Orthanc` binary in the background and waits for its REST API.
`load_files(orthanc, paths)` uploads DICOM files through the REST API (POST /instances);
`study_loaded(orthanc, parts)` uploads one study's Part 10 bytes for a while and deletes it.
`tls=OrthancTls(certificate, private_key, trusted)` turns on DICOM TLS (Orthanc >= 1.9) with
client certificates required: its DICOM port then speaks only TLS.
A missing Orthanc binary is a test failure, not a skip: `make test` installs it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ORTHANC_CANDIDATES = ("/usr/bin/Orthanc", "/usr/sbin/Orthanc")


def orthanc_binary() -> str:
    found = shutil.which("Orthanc")
    if found:
        return found
    for candidate in ORTHANC_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    pytest.fail("Orthanc is not installed (Debian package 'orthanc'; `make test` installs it)")


@dataclass
class RunningOrthanc:
    dicom_port: int
    http_port: int
    aet: str
    process: subprocess.Popen[bytes]
    directory: Path
    uploaded: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> Orthanc id

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def rest(self, method: str, path: str, data: bytes | None = None,
             content_type: str = "application/json") -> object:
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass(frozen=True)
class OrthancTls:
    """DICOM TLS material: Orthanc's certificate and key, the CA(s) its peers must chain to."""

    certificate: Path
    private_key: Path
    trusted: Path


def write_config(tmp_dir: Path, *, dicom_port: int, http_port: int, aet: str,
                 known_modalities: Mapping[str, tuple[str, int]],
                 tls: OrthancTls | None = None) -> Path:
    storage = tmp_dir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "xdsi-test-orthanc",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "StorageCompression": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,  # a wrong called AE title is rejected (a test uses it)
        "DicomCheckModalityHost": False,
        "DicomModalities": {name: [name, host, port]
                            for name, (host, port) in known_modalities.items()},
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomScuTimeout": 10,
        "OverwriteInstances": False,
        "Plugins": [],
        "ConcurrentJobs": 2,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        "SaveJobs": False,
    }
    if tls is not None:
        config.update({
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(tls.certificate),
            "DicomTlsPrivateKey": str(tls.private_key),
            "DicomTlsTrustedCertificates": str(tls.trusted),
            "DicomTlsRemoteCertificateRequired": True,
        })
    path = tmp_dir / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def start_orthanc(tmp_dir: Path, *, dicom_port: int, http_port: int, aet: str = "ORTHANC",
                  known_modalities: Mapping[str, tuple[str, int]] | None = None,
                  timeout: float = 30.0, tls: OrthancTls | None = None) -> RunningOrthanc:
    binary = orthanc_binary()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    config = write_config(tmp_dir, dicom_port=dicom_port, http_port=http_port, aet=aet,
                          known_modalities=known_modalities or {}, tls=tls)
    log = (tmp_dir / "orthanc.log").open("wb")
    proc = subprocess.Popen([binary, "--logdir=" + str(tmp_dir), str(config)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_dir)
    log.close()
    running = RunningOrthanc(dicom_port, http_port, aet, proc, tmp_dir)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"Orthanc exited with status {proc.returncode} at start; "
                        f"see {tmp_dir}/orthanc.log")
        try:
            running.rest("GET", "/system")
            return running
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.monotonic() > deadline:
            running.stop()
            pytest.fail(f"Orthanc did not answer on port {http_port} within {timeout:.0f} s")
        time.sleep(0.1)


def load_files(orthanc: RunningOrthanc, paths: Iterable[Path]) -> dict[str, str]:
    """Upload DICOM files (POST /instances); returns {SOP Instance UID: Orthanc status}.

    An instance already stored (same SOP Instance UID) keeps its first version."""
    statuses: dict[str, str] = {}
    for path in paths:
        result = orthanc.rest("POST", "/instances", Path(path).read_bytes(),
                              content_type="application/dicom")
        assert isinstance(result, dict), f"unexpected Orthanc answer for {path}: {result!r}"
        instance = orthanc.rest("GET", f"/instances/{result['ID']}/simplified-tags")
        assert isinstance(instance, dict)
        uid = str(instance.get("SOPInstanceUID", ""))
        statuses[uid] = str(result.get("Status", ""))
        orthanc.uploaded.setdefault(uid, str(result["ID"]))
    return statuses


@contextlib.contextmanager
def study_loaded(orthanc: RunningOrthanc, parts: Iterable[bytes]) -> Iterator[None]:
    """The Part 10 files `parts` (one study) stored in `orthanc` while the block runs, then
    the study deleted (other tests count the studies)."""
    orthanc_study = None
    for data in parts:
        answer = orthanc.rest("POST", "/instances", data, content_type="application/dicom")
        assert isinstance(answer, dict), f"unexpected Orthanc answer: {answer!r}"
        orthanc_study = answer["ParentStudy"]
    try:
        yield
    finally:
        if orthanc_study is not None:
            orthanc.rest("DELETE", f"/studies/{orthanc_study}")
