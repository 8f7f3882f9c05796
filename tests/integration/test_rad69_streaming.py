"""RAD-69 with `[pacs] response_order = "root-last"` end to end: a real gateway (HTTPS, mutual
TLS, gunicorn) in front of the test Orthanc. Our client reads the chunked response whose root
part comes last (byte-exact instances against dcmtk getscu, exact status); the client going
away mid-stream leaves nothing in the spool folder and the gateway serving; zeep, which takes
the first part as the envelope, cannot read it (the documented trade-off), while the default
root-first gateway stays what zeep reads (test_rad69_orthanc.py,
test_zeep_official_wsdl_byte_exact)."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from zeep.exceptions import TransportError

from gateway.demo import free_port, start_gateway, write_config
from gateway.ebrim.parse import parse_retrieve_document_set_response
from gateway.imaging.request import Wado
from gateway.ns import Action, ResponseStatus
from gateway.security.pki import create_dev_pki
from gateway.soap.client import SoapClient, envelope
from gateway.soap.mtom import ROOT_CONTENT_ID
from gateway.soap.multipart import parse_content_type
from tests.integration.conftest import LiveGateway, OrthancFixture
from tests.support.orthanc import study_loaded
from tests.support.rad69 import (
    EXPLICIT_LE,
    NIST_SOURCE,
    NIST_STUDIES,
    configure_pacs,
    dataset_bytes,
    getscu_reference,
    instances_of,
    nist_instances,
    rad69_request,
    synthetic_ct_study,
)
from tests.support.zeep_client import mtls_session, official_client

PATH = "/xdsi/imaging-source"


@pytest.fixture(scope="module")
def root_last(tmp_path_factory: pytest.TempPathFactory,
              orthanc: OrthancFixture) -> Iterator[LiveGateway]:
    workdir = tmp_path_factory.mktemp("rad69-root-last")
    pki = create_dev_pki(workdir / "pki")
    port = free_port()
    config = write_config(workdir, pki, port)
    spool = workdir / "spool"
    spool.mkdir()
    config.write_text(config.read_text().replace(
        "threads = 4\n", f'threads = 4\nspool_directory = "{spool}"\n', 1))
    configure_pacs(config, port=orthanc.dicom_port, move_port=orthanc.move_port,
                   move_ae_title=orthanc.move_aet)
    config.write_text(config.read_text() + 'response_order = "root-last"\n')  # in [pacs]
    proc = start_gateway(config, pki, port)
    try:
        yield LiveGateway(proc.base_url, pki, config, workdir)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def big_study(orthanc: OrthancFixture) -> Iterator[list[tuple[str, str, str]]]:
    """80 CT instances of 512x512 (about 42 MB: more than loopback socket buffers hold),
    loaded for this module only (other tests count the studies)."""
    pixels = bytes((i * 5) & 0xFF for i in range(512 * 512 * 2))
    study, series, files = synthetic_ct_study(80, size=512, pixels=pixels,
                                              patient_id="STREAM-1", patient_name="Test^Stream")
    with study_loaded(orthanc.running, (data for _sop, data in files)):
        yield [(study, series, sop) for sop, _d in files]


def _nist_docs(orthanc: OrthancFixture) -> list[tuple[str, str, str]]:
    return nist_instances(orthanc)


def test_root_last_byte_exact_with_our_client(root_last: LiveGateway, orthanc: OrthancFixture,
                                              tmp_path: Path) -> None:
    docs = _nist_docs(orthanc)
    unknown = (docs[0][0], docs[0][1], "1.2.3.4.5.6.7.8.9")  # C-FIND finds nothing
    client: SoapClient = root_last.client()
    spool = tmp_path / "reply"
    spool.mkdir()
    try:
        reply = client.call(PATH, Action.RAD69,
                            rad69_request([*docs, unknown], [EXPLICIT_LE]), spool_dir=spool)
    finally:
        client.close()
    assert reply.body is not None and not reply.is_fault
    response = parse_retrieve_document_set_response(reply.body)
    assert response.status == ResponseStatus.PARTIAL_SUCCESS
    assert {e.location for e in response.errors} == {unknown[2]}
    assert sorted(d.document_unique_id for d in response.documents) == sorted(
        t[2] for t in docs)
    reference = getscu_reference(orthanc.dicom_port, orthanc.aet, NIST_STUDIES,
                                 tmp_path / "getscu")
    content_ids = [d.content_id for d in response.documents]
    assert len(set(content_ids)) == len(content_ids)
    for d in response.documents:
        assert d.repository_unique_id == NIST_SOURCE and d.mime_type == "application/dicom"
        path = reply.attachment_path(d.content_id)
        assert path is not None
        meta = pydicom.filereader.read_file_meta_info(path)
        assert meta.MediaStorageSOPInstanceUID == d.document_unique_id
        assert meta.TransferSyntaxUID == EXPLICIT_LE
        assert dataset_bytes(path) == reference[d.document_unique_id]


def _raw_post(gateway: LiveGateway, docs: list[tuple[str, str, str]]) -> requests.Response:
    session = requests.Session()
    session.trust_env = False
    data, _mid = envelope(Action.RAD69, gateway.base_url + PATH,
                          rad69_request(docs, [EXPLICIT_LE]))
    return session.post(gateway.base_url + PATH, data=data, stream=True, timeout=120,
                        verify=str(gateway.pki.ca_cert),
                        cert=(str(gateway.pki.client_cert), str(gateway.pki.client_key)),
                        headers={"Content-Type": "application/soap+xml; charset=UTF-8; "
                                                 f'action="{Action.RAD69}"'})


def test_root_last_framing_on_the_wire(root_last: LiveGateway,
                                       orthanc: OrthancFixture) -> None:
    docs = instances_of(orthanc, NIST_STUDIES[0])
    with _raw_post(root_last, docs) as resp:
        assert resp.status_code == 200
        assert resp.headers.get("Transfer-Encoding", "").lower() == "chunked"
        assert "Content-Length" not in resp.headers
        media, params = parse_content_type(resp.headers["Content-Type"])
        assert media == "multipart/related"
        assert params["start"] == f"<{ROOT_CONTENT_ID}>"
        data = resp.raw.read(decode_content=True)
    boundary = b"--" + params["boundary"].encode()
    parts = data.split(boundary)
    assert parts[-1].strip() == b"--"
    assert len(parts) == len(docs) + 3  # preamble, the instances, the root, the end
    assert ROOT_CONTENT_ID.encode() in parts[-2]
    assert all(ROOT_CONTENT_ID.encode() not in p for p in parts[1:-2])
    assert b"application/dicom" in parts[1]


def test_client_gone_mid_stream(root_last: LiveGateway,
                                big_study: list[tuple[str, str, str]]) -> None:
    """The client reads a little of the response and closes the connection: the gateway ends
    the retrieve, removes the request's spool folder, and serves the next request."""
    docs = big_study
    ctx = ssl.create_default_context(cafile=str(root_last.pki.ca_cert))
    ctx.load_cert_chain(str(root_last.pki.client_cert), str(root_last.pki.client_key))
    data, _mid = envelope(Action.RAD69, root_last.base_url + PATH,
                          rad69_request(docs, [EXPLICIT_LE]))
    host, port = root_last.base_url.split("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(
            f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f'Content-Type: application/soap+xml; charset=UTF-8; action="{Action.RAD69}"\r\n'
            f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        got = tls.recv(4096)
        assert got.startswith(b"HTTP/1.1 200")
    spool = root_last.workdir / "spool"
    deadline = time.monotonic() + 30
    while any(spool.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(spool.iterdir()) == []
    client = root_last.client()
    try:  # still serving
        reply = client.call(PATH, Action.RAD69,
                            rad69_request([("1.2.3", "1.2.3.4", "1.2.3.4.5")], [EXPLICIT_LE]),
                            spool_dir=root_last.workdir)
    finally:
        client.close()
    assert reply.body is not None
    response = parse_retrieve_document_set_response(reply.body)
    assert response.status == ResponseStatus.FAILURE
    assert {e.code for e in response.errors} <= {
        Wado.STUDY_UNKNOWN, Wado.SERIES_UNKNOWN, Wado.DOCUMENT_UNKNOWN, "XDSMissingDocument"}


def test_zeep_cannot_read_root_last(root_last: LiveGateway, orthanc: OrthancFixture) -> None:
    """The trade-off of root-last, end to end: zeep takes the first MIME part (a DICOM
    instance) as the envelope."""
    study = NIST_STUDIES[3]
    docs = instances_of(orthanc, study)
    session = mtls_session(root_last.pki.ca_cert, root_last.pki.client_cert,
                           root_last.pki.client_key)
    client = official_client("ihe-rad/XDS-I.b_ImagingDocumentSource.wsdl", session)
    service = client.create_service("{urn:ihe:rad:xdsi-b:2009}ImagingDocumentSource_Binding",
                                    root_last.base_url + PATH)
    with pytest.raises(TransportError):
        service.RetrieveImagingDocumentSet(
            StudyRequest=[{"studyInstanceUID": study, "SeriesRequest": [
                {"seriesInstanceUID": docs[0][1], "DocumentRequest": [
                    {"RepositoryUniqueId": NIST_SOURCE, "DocumentUniqueId": docs[0][2]}]}]}],
            TransferSyntaxUIDList={"TransferSyntaxUID": [EXPLICIT_LE]})
