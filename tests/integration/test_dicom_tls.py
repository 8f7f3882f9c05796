"""DICOM TLS to the PACS: a private Orthanc with DICOM TLS on (client certificates required),
the gateway's C-FIND / C-GET / C-MOVE over mutual TLS, and the refusals: a PACS certificate
from another CA, a gateway without TLS, a gateway whose client certificate Orthanc does not
trust."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from gateway.config import PacsConfig
from gateway.demo import free_port
from gateway.dicom import storescp
from gateway.dicom.errors import PacsError
from gateway.dicom.find import find_instances
from gateway.dicom.retrieve import InstanceRef, retrieve
from gateway.security.pki import DevPki, create_dev_pki
from tests.support.orthanc import OrthancTls, RunningOrthanc, load_files, start_orthanc

FILES = ("CT_small.dcm", "MR_small.dcm")
EXPLICIT_LE = "1.2.840.10008.1.2.1"
MOVE_AET = "XDSI-GW-TLS"


@dataclasses.dataclass
class TlsPacs:
    orthanc: RunningOrthanc
    pki: DevPki
    other: DevPki  # a second CA nobody here trusts
    move_port: int
    datasets: list[pydicom.Dataset]

    def config(self, **changes: object) -> PacsConfig:
        base = PacsConfig(host="127.0.0.1", port=self.orthanc.dicom_port,
                          called_ae_title=self.orthanc.aet, calling_ae_title="XDSI-GW",
                          move_destination_ae_title=MOVE_AET, move_port=self.move_port,
                          timeout_seconds=10, tls=True, tls_ca_bundle=self.pki.ca_cert,
                          # as from_dict() defaults them: the node's [tls] certificate, which
                          # also serves the C-MOVE storage SCP (serverAuth + clientAuth)
                          tls_certificate=self.pki.server_cert,
                          tls_private_key=self.pki.server_key)
        return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tls_pacs(tmp_path_factory: pytest.TempPathFactory, conformance: Path) -> Iterator[TlsPacs]:
    work = tmp_path_factory.mktemp("orthanc-tls")
    pki = create_dev_pki(work / "pki")
    other = create_dev_pki(work / "other-pki")
    move_port = free_port()
    modality = {"AET": MOVE_AET, "Host": "127.0.0.1", "Port": move_port, "UseDicomTls": True}
    running = start_orthanc(work / "orthanc", dicom_port=free_port(), http_port=free_port(),
                            known_modalities={MOVE_AET: ("127.0.0.1", move_port)},
                            tls=OrthancTls(pki.server_cert, pki.server_key, pki.ca_cert))
    try:
        # Orthanc's C-MOVE SCU must itself use TLS towards our storage SCP.
        running.rest("PUT", f"/modalities/{MOVE_AET}", json.dumps(modality).encode())
        paths = [conformance / "dicom" / "pydicom" / name for name in FILES]
        load_files(running, paths)
        yield TlsPacs(running, pki, other, move_port,
                      [pydicom.dcmread(p, stop_before_pixels=True) for p in paths])
    finally:
        running.stop()


def _refs(ds_list: list[pydicom.Dataset]) -> list[InstanceRef]:
    return [InstanceRef(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                        str(ds.SOPInstanceUID), str(ds.SOPClassUID)) for ds in ds_list]


def test_c_find_over_tls(tls_pacs: TlsPacs) -> None:
    ds = tls_pacs.datasets[0]
    found = find_instances(tls_pacs.config(), str(ds.StudyInstanceUID),
                           return_keys=["SOPInstanceUID"], timeout=10)
    assert [str(f.SOPInstanceUID) for f in found] == [str(ds.SOPInstanceUID)]


@pytest.mark.parametrize("method", ["c-get", "c-move"])
def test_retrieve_over_tls(method: str, tls_pacs: TlsPacs, tmp_path: Path) -> None:
    pacs = tls_pacs.config()
    refs = _refs(tls_pacs.datasets)
    try:
        outcome = retrieve(pacs, refs, [EXPLICIT_LE], tmp_path / "spool", method=method,
                           associations=2, timeout=10, in_process=True)
    finally:
        if method == "c-move":
            storescp.stop(pacs)
    assert outcome.error is None, outcome.error
    assert not outcome.missing
    assert set(outcome.received) == {r.sop_instance_uid for r in refs}
    for ref in refs:
        got = pydicom.dcmread(io.BytesIO(outcome.received[ref.sop_instance_uid].read_bytes()))
        assert str(got.SOPInstanceUID) == ref.sop_instance_uid


def test_pacs_certificate_from_another_ca_is_refused(tls_pacs: TlsPacs) -> None:
    pacs = tls_pacs.config(tls_ca_bundle=tls_pacs.other.ca_cert)
    with pytest.raises(PacsError) as info:
        find_instances(pacs, str(tls_pacs.datasets[0].StudyInstanceUID), timeout=10)
    assert info.value.kind == "rejected"
    assert "not trusted" in info.value.message
    assert f"127.0.0.1:{tls_pacs.orthanc.dicom_port}" in info.value.message


def test_server_name_must_match(tls_pacs: TlsPacs) -> None:
    pacs = tls_pacs.config(tls_server_name="pacs.example.org")
    with pytest.raises(PacsError) as info:
        find_instances(pacs, str(tls_pacs.datasets[0].StudyInstanceUID), timeout=10)
    assert info.value.kind == "rejected"
    assert "not trusted" in info.value.message


def test_client_certificate_from_another_ca_is_refused_by_the_pacs(tls_pacs: TlsPacs) -> None:
    pacs = tls_pacs.config(tls_certificate=tls_pacs.other.client_cert,
                           tls_private_key=tls_pacs.other.client_key)
    with pytest.raises(PacsError) as info:
        find_instances(pacs, str(tls_pacs.datasets[0].StudyInstanceUID), timeout=10)
    assert info.value.kind == "rejected"
    assert "UNKNOWN_CA" in info.value.message.upper()


def test_plain_association_to_a_tls_pacs_fails(tls_pacs: TlsPacs) -> None:
    with pytest.raises(PacsError):
        find_instances(tls_pacs.config(tls=False),
                       str(tls_pacs.datasets[0].StudyInstanceUID), timeout=5)


def test_tls_pacs_down_is_unreachable(tls_pacs: TlsPacs) -> None:
    with pytest.raises(PacsError) as info:
        find_instances(tls_pacs.config(port=free_port()),
                       str(tls_pacs.datasets[0].StudyInstanceUID), timeout=5)
    assert info.value.kind == "unreachable"


def test_c_get_through_the_process_pool(tls_pacs: TlsPacs, tmp_path: Path) -> None:
    """The associations of the pool processes use TLS too (the config crosses the pickle)."""
    refs = _refs(tls_pacs.datasets)
    outcome = retrieve(tls_pacs.config(), refs, [EXPLICIT_LE], tmp_path / "spool",
                       method="c-get", associations=2, timeout=10)
    assert outcome.error is None, outcome.error
    assert set(outcome.received) == {r.sop_instance_uid for r in refs}
