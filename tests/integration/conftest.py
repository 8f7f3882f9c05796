"""A real gateway for the integration tests: `xdsi-gateway serve` in a child process, HTTPS
with mutual TLS on loopback, a fresh development PKI, registry and repository."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.demo import free_port, start_gateway, write_config
from gateway.security.pki import DevPki, create_dev_pki
from gateway.soap.client import SoapClient
from tests.support.orthanc import RunningOrthanc, load_files, start_orthanc

MAX_REQUEST_BYTES = 8 * 1024 * 1024
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024


@dataclass
class LiveGateway:
    base_url: str
    pki: DevPki
    config: Path
    workdir: Path

    def client(self) -> SoapClient:
        return SoapClient(self.base_url, ca_bundle=self.pki.ca_cert,
                          certificate=self.pki.client_cert, private_key=self.pki.client_key)


@pytest.fixture(scope="session")
def live_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    workdir = tmp_path_factory.mktemp("gateway")
    pki = create_dev_pki(workdir / "pki")
    port = free_port()
    config = write_config(workdir, pki, port, max_request_bytes=MAX_REQUEST_BYTES,
                          max_envelope_bytes=MAX_ENVELOPE_BYTES)
    running = start_gateway(config, pki, port)
    try:
        yield LiveGateway(running.base_url, pki, config, workdir)
    finally:
        running.stop()


# --- A private Orthanc loaded with the corpus images (RAD-69, KOS publisher) -----------------

ORTHANC_AET = "ORTHANC"
GATEWAY_MOVE_AET = "XDSI-GW"


def corpus_images(conformance_root: Path) -> list[Path]:
    """Every pydicom and NIST image of the corpus, in load order.

    Orthanc keeps the first file it gets for a SOP Instance UID, so the order decides which
    transfer syntax is stored: the NIST "expected" images (explicit little endian, what the NIST
    RAD-69 tests expect back) first, then the rest of the NIST image cache, then pydicom with the
    JPEG-LS variant of MR_small first (so the PACS also holds a compressed instance)."""
    images = conformance_root / "dicom" / "images"
    nist_expected = sorted((images / "nist-expected").rglob("*.dcm"))
    nist_cache = sorted(p for p in (images / "nist-imagecache").rglob("*") if p.is_file())
    pyd = conformance_root / "dicom" / "pydicom"
    first = pyd / "MR_small_jpeg_ls_lossless.dcm"
    pydicom_files = [first, *sorted(p for p in pyd.glob("*.dcm") if p != first)]
    return nist_expected + nist_cache + pydicom_files


@dataclass
class OrthancFixture:
    running: RunningOrthanc
    move_port: int  # where the gateway's storage SCP must listen for C-MOVE (AE XDSI-GW)
    move_aet: str
    files: list[Path]
    stored: dict[str, str]  # SOP Instance UID -> Orthanc status of its first upload

    @property
    def dicom_port(self) -> int:
        return self.running.dicom_port

    @property
    def aet(self) -> str:
        return self.running.aet


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory,
            conformance: Path) -> Iterator[OrthancFixture]:
    workdir = tmp_path_factory.mktemp("orthanc")
    move_port = free_port()
    running = start_orthanc(workdir, dicom_port=free_port(), http_port=free_port(),
                            aet=ORTHANC_AET,
                            known_modalities={GATEWAY_MOVE_AET: ("127.0.0.1", move_port)})
    try:
        files = corpus_images(conformance)
        stored = load_files(running, files)
        yield OrthancFixture(running, move_port, GATEWAY_MOVE_AET, files, stored)
    finally:
        running.stop()
