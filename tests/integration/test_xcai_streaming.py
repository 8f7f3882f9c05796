"""RAD-69 -> A -> RAD-75 -> B streamed through the initiating imaging gateway, on loopback with
mutual TLS on both hops and the test Orthanc as B's PACS.

Gateways: B1 (root-first, the default) and B2 (root-last) are Responding Imaging Gateways over
Orthanc; A_LAST ([xca] response_order = "root-last": streams a single community's reply
through) and A_FIRST (default: store and forward) initiate to both, and to two local fake
communities that go away mid-stream (one answers root-first, one root-last). Checked: the
instances through A are byte-exact copies of what B answers directly in every combination;
a community that goes away mid-stream gives a well-formed answer listing what was passed on
and XDSUnavailableCommunity for the rest; every request leaves A's spool folder empty;
ITI-43 -> A -> ITI-39 still answers through the streaming path."""

from __future__ import annotations

import hashlib
import io
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
import urllib3
from lxml import etree
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from gateway.demo import AUTHORITY, REPOSITORY, free_port, start_gateway
from gateway.ebrim.model import DocumentRequest, RetrieveDocumentSetRequest
from gateway.ebrim.parse import parse_retrieve_document_set_response
from gateway.ebrim.render import render_retrieve_document_set_request
from gateway.ns import RS, SOAP12, XDSB, XDSI, XOP, Action, ErrorCode, ResponseStatus, q
from gateway.security.pki import DevPki, create_dev_pki
from gateway.soap.client import SoapClient, SoapReply
from gateway.soap.multipart import MultipartError
from tests.integration.conftest import OrthancFixture
from tests.support.communities import (
    PeerServer,
    QuietHandler,
    community_config,
    gateway_client,
    shut_down,
    submit,
)
from tests.support.rad69 import (
    EXPLICIT_LE,
    NIST_SOURCE,
    configure_pacs,
    nist_instances,
    rad69_request,
)

PATIENT = f"XCAI-0001^^^&{AUTHORITY}&ISO"

HA_LAST = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.301"
HA_FIRST = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.302"
HB1 = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.311"  # root-first
HB2 = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.312"  # root-last
HD_FIRST = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.321"  # fake, dies after its root and a part
HD_LAST = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.322"  # fake, dies after one part (no root)


def dicom_part(sop_uid: str) -> bytes:
    """A small Part 10 file for `sop_uid` (what the dying community sends before it dies)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    ds.PatientID = "DYING-1"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


class DyingCommunity(PeerServer):
    """HTTPS (mutual TLS) on loopback answering RAD-75 with a chunked MTOM reply that breaks
    off: root-first, it sends its root (every requested document) and the first instance;
    root-last, only the first instance. Then it closes the connection mid-reply."""

    def __init__(self, pki: DevPki, root_last: bool):
        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                env = etree.fromstring(data)
                uids = [d.findtext(q(XDSB, "DocumentUniqueId")) or ""
                        for d in env.iter(q(XDSB, "DocumentRequest"))]
                boundary = b"MIMEBoundary_dying"
                self.send_response(200)
                self.send_header("Content-Type", 'multipart/related; boundary="MIMEBoundary_'
                                 'dying"; type="application/xop+xml"; start="<root@d>"; '
                                 'start-info="application/soap+xml"')
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                out = etree.Element(q(XDSB, "RetrieveDocumentSetResponse"))
                etree.SubElement(out, q(RS, "RegistryResponse"),
                                 status=ResponseStatus.SUCCESS)
                for i, uid in enumerate(uids):
                    dr = etree.SubElement(out, q(XDSB, "DocumentResponse"))
                    etree.SubElement(dr, q(XDSB, "RepositoryUniqueId")).text = NIST_SOURCE
                    etree.SubElement(dr, q(XDSB, "DocumentUniqueId")).text = uid
                    etree.SubElement(dr, q(XDSB, "mimeType")).text = "application/dicom"
                    etree.SubElement(etree.SubElement(dr, q(XDSB, "Document")),
                                     q(XOP, "Include"), href=f"cid:i{i}@d")
                root_env = etree.Element(q(SOAP12, "Envelope"))
                etree.SubElement(root_env, q(SOAP12, "Body")).append(out)
                root = (b"--" + boundary + b"\r\nContent-Type: application/xop+xml\r\n"
                        b"Content-ID: <root@d>\r\n\r\n" + etree.tostring(root_env) + b"\r\n")
                part = (b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n"
                        b"Content-ID: <i0@d>\r\n\r\n" + dicom_part(uids[0]) + b"\r\n"
                        + b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n"
                        b"Content-ID: <i1@d>\r\n\r\n" + b"\0" * 3000)  # cut mid-way
                for chunk in ([part] if root_last else [root, part]):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                time.sleep(0.2)
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        super().__init__(pki, Handler)


@dataclass
class Net:
    a_last: SoapClient
    a_first: SoapClient
    b1: SoapClient
    b2: SoapClient
    spools: dict[str, Path]
    workdir: Path


def _community(home: str, port: int) -> str:
    url = f"https://localhost:{port}"
    return (f"\n[[communities]]\nhome_community_id = \"{home}\"\n"
            f"retrieve_url = \"{url}/xca/responding\"\n"
            f"imaging_retrieve_url = \"{url}/xcai/responding\"\n")


def _with_spool(config: Path, spool: Path) -> None:
    spool.mkdir()
    text = config.read_text()
    assert "threads = 4\n" in text
    config.write_text(text.replace("threads = 4\n",
                                   f'threads = 4\nspool_directory = "{spool}"\n', 1))


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancFixture) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("xcai-streaming")
    pki = create_dev_pki(root / "pki")
    running: list = []
    clients: list[SoapClient] = []
    try:
        ports = {}
        for name, home, order in (("b1", HB1, "root-first"), ("b2", HB2, "root-last")):
            port = ports[name] = free_port()
            cfg = community_config(root / name, pki, port, home)
            configure_pacs(cfg, port=orthanc.dicom_port, move_port=orthanc.move_port,
                           move_ae_title=orthanc.move_aet)
            cfg.write_text(cfg.read_text() + f'response_order = "{order}"\n')  # in [pacs]
            running.append(start_gateway(cfg, pki, port))
        dying = {HD_FIRST: DyingCommunity(pki, root_last=False),
                 HD_LAST: DyingCommunity(pki, root_last=True)}
        running.extend(dying.values())
        spools = {}
        for name, home, order in (("a_last", HA_LAST, "root-last"),
                                  ("a_first", HA_FIRST, "root-first")):
            port = ports[name] = free_port()
            extra = (f"\n[xca]\nconnect_timeout_seconds = 2\nretrieve_timeout_seconds = 30\n"
                     f"response_order = \"{order}\"\npipe_root_first = true\n"
                     + _community(HB1, ports["b1"]) + _community(HB2, ports["b2"])
                     + "".join(_community(h, d.port) for h, d in dying.items()))
            cfg = community_config(root / name, pki, port, home, extra)
            spools[name] = root / f"spool-{name}"
            _with_spool(cfg, spools[name])
            running.append(start_gateway(cfg, pki, port))

        def client(port: int) -> SoapClient:
            return gateway_client(pki, port, clients)

        yield Net(client(ports["a_last"]), client(ports["a_first"]), client(ports["b1"]),
                  client(ports["b2"]), spools, root)
    finally:
        shut_down(clients, *reversed(running))


def _docs(orthanc: OrthancFixture) -> list[tuple[str, str, str]]:
    return nist_instances(orthanc)


def _call(client: SoapClient, path: str, action: str, body: etree._Element,
          spool: Path, order: list[str] | None = None) -> SoapReply:
    """The reply read part by part (`order` gets "root" / "part" as they came)."""
    spool.mkdir(parents=True)
    with client.stream(path, action, body, spool_dir=spool) as streamed:
        for event in streamed.events():
            if order is not None:
                order.append("root" if isinstance(event, SoapReply) else "part")
        reply = streamed.reply()
    assert reply.body is not None and not reply.is_fault, reply.envelope
    return reply


def _by_uid(reply: SoapReply) -> dict[str, str]:
    assert reply.body is not None
    resp = parse_retrieve_document_set_response(reply.body)
    out = {}
    for d in resp.documents:
        path = reply.attachment_path(d.content_id)
        assert path is not None, d.document_unique_id
        out[d.document_unique_id] = hashlib.sha1(path.read_bytes()).hexdigest()
    return out


def _spool_empty(spool: Path) -> None:
    deadline = time.monotonic() + 10
    while any(spool.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(spool.iterdir()), list(spool.iterdir())


@pytest.mark.parametrize("a", ["a_last", "a_first"])
@pytest.mark.parametrize("b", [HB1, HB2])
def test_rad69_through_a_is_byte_exact(net: Net, orthanc: OrthancFixture, a: str, b: str,
                                       tmp_path: Path) -> None:
    docs = _docs(orthanc)
    direct = net.b1 if b == HB1 else net.b2
    want = _by_uid(_call(direct, "/xdsi/imaging-source", Action.RAD69,
                         rad69_request(docs, [EXPLICIT_LE]), tmp_path / "direct"))
    assert sorted(want) == sorted(t[2] for t in docs)
    via = net.a_last if a == "a_last" else net.a_first
    unknown = "urn:oid:1.2.3.999"
    body = rad69_request(docs, [EXPLICIT_LE], home_community_id=b)
    # one more document for an unknown community: A's own routing error in the merge
    series = next(body.iter(q(XDSI, "SeriesRequest")))
    dr = etree.SubElement(series, q(XDSB, "DocumentRequest"))
    etree.SubElement(dr, q(XDSB, "HomeCommunityId")).text = unknown
    etree.SubElement(dr, q(XDSB, "RepositoryUniqueId")).text = NIST_SOURCE
    etree.SubElement(dr, q(XDSB, "DocumentUniqueId")).text = "1.2.3.4.5.6.7"
    order: list[str] = []
    reply = _call(via, "/xcai/initiating", Action.RAD69, body, tmp_path / "via", order)
    resp = parse_retrieve_document_set_response(reply.body)  # type: ignore[arg-type]
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert [(e.code, e.location) for e in resp.errors] == [(ErrorCode.UNKNOWN_COMMUNITY, unknown)]
    assert {d.home_community_id for d in resp.documents} == {b}
    assert _by_uid(reply) == want  # byte-exact, every instance
    # A_LAST streams (the root after every part), A_FIRST answers root-first
    assert order == (["part"] * len(want) + ["root"] if a == "a_last"
                     else ["root"] + ["part"] * len(want))
    _spool_empty(net.spools[a])


@pytest.mark.parametrize("dying", [HD_FIRST, HD_LAST])
def test_a_community_going_away_mid_stream(net: Net, orthanc: OrthancFixture, dying: str,
                                           tmp_path: Path) -> None:
    docs = _docs(orthanc)[:3]
    reply = _call(net.a_last, "/xcai/initiating", Action.RAD69,
                  rad69_request(docs, [EXPLICIT_LE], home_community_id=dying), tmp_path / "r")
    resp = parse_retrieve_document_set_response(reply.body)  # type: ignore[arg-type]
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    # the instance passed on before the community died is listed (root-first: B's root
    # names it; root-last: its DICOM meta header does), the two others are errors
    assert [d.document_unique_id for d in resp.documents] == [docs[0][2]]
    path = reply.attachment_path(resp.documents[0].content_id)
    assert path is not None and path.read_bytes() == dicom_part(docs[0][2])
    assert sorted((e.code, e.location) for e in resp.errors) == [
        (ErrorCode.UNAVAILABLE_COMMUNITY, dying)] * 2
    assert {e.context.split(":")[0] for e in resp.errors} == {
        f"document {t[2]}" for t in docs[1:]}
    _spool_empty(net.spools["a_last"])


def test_root_first_a_community_going_away_after_its_root(net: Net, orthanc: OrthancFixture,
                                                          tmp_path: Path) -> None:
    """A root-first answer already promised every document: when the community dies after
    its root, A breaks its response off (no closing boundary, chunked body not terminated),
    so the consumer sees a failed transfer, never a root that lies. Nothing is left in A's
    spool folder."""
    docs = _docs(orthanc)[:3]
    with pytest.raises((MultipartError, requests.exceptions.RequestException,
                        urllib3.exceptions.HTTPError)):
        _call(net.a_first, "/xcai/initiating", Action.RAD69,
              rad69_request(docs, [EXPLICIT_LE], home_community_id=HD_FIRST), tmp_path / "r")
    _spool_empty(net.spools["a_first"])


def test_root_first_a_community_going_away_before_its_root(net: Net, orthanc: OrthancFixture,
                                                           tmp_path: Path) -> None:
    """The community answers root-last and dies: A (root-first) was storing and forwarding,
    so it answers cleanly, every document XDSUnavailableCommunity."""
    docs = _docs(orthanc)[:2]
    reply = _call(net.a_first, "/xcai/initiating", Action.RAD69,
                  rad69_request(docs, [EXPLICIT_LE], home_community_id=HD_LAST),
                  tmp_path / "r")
    resp = parse_retrieve_document_set_response(reply.body)  # type: ignore[arg-type]
    assert resp.status == ResponseStatus.FAILURE and not resp.documents
    assert [(e.code, e.location) for e in resp.errors] == [
        (ErrorCode.UNAVAILABLE_COMMUNITY, HD_LAST)] * 2
    _spool_empty(net.spools["a_first"])


@pytest.mark.parametrize("a", ["a_last", "a_first"])
def test_iti43_through_a_as_iti39_byte_exact(net: Net, a: str, tmp_path: Path) -> None:
    """Documents submitted to B2 (ITI-41) retrieved through A (ITI-43 -> ITI-39), streamed
    (A_LAST, one community) or stored and forwarded; an unknown document is B2's error."""
    submitted = submit(net.b2, tmp_path / "docs", PATIENT, "7" if a == "a_last" else "8")
    requests_ = [DocumentRequest(REPOSITORY, uid, HB2) for uid in submitted]
    requests_.append(DocumentRequest(REPOSITORY, "1.2.3.4.404", HB2))
    via = net.a_last if a == "a_last" else net.a_first
    order: list[str] = []
    reply = _call(via, "/xca/initiating", Action.ITI43, render_retrieve_document_set_request(
        RetrieveDocumentSetRequest(tuple(requests_))), tmp_path / "r", order)
    resp = parse_retrieve_document_set_response(reply.body)  # type: ignore[arg-type]
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert [(e.code, e.location) for e in resp.errors] == [(ErrorCode.MISSING_DOCUMENT, HB2)]
    assert _by_uid(reply) == {u: hashlib.sha1(p.read_bytes()).hexdigest()
                              for u, p in submitted.items()}
    assert order[-1 if a == "a_last" else 0] == "root"
    _spool_empty(net.spools[a])


@pytest.mark.parametrize("b", [HB1, HB2])
def test_rad75_at_b_honours_its_response_order(net: Net, orthanc: OrthancFixture, b: str,
                                               tmp_path: Path) -> None:
    """The Responding Imaging Gateway answers RAD-75 root-last when so configured (B2), the
    root then as RAD-75's: HomeCommunityId on every DocumentResponse, errors located at B."""
    docs = _docs(orthanc)
    body = rad69_request(docs, [EXPLICIT_LE], home_community_id=b)
    series = next(body.iter(q(XDSI, "SeriesRequest")))
    dr = etree.SubElement(series, q(XDSB, "DocumentRequest"))  # not in the PACS
    etree.SubElement(dr, q(XDSB, "HomeCommunityId")).text = b
    etree.SubElement(dr, q(XDSB, "RepositoryUniqueId")).text = NIST_SOURCE
    etree.SubElement(dr, q(XDSB, "DocumentUniqueId")).text = "1.2.3.4.5.6.7.8.9"
    order: list[str] = []
    reply = _call(net.b1 if b == HB1 else net.b2, "/xcai/responding", Action.RAD75, body,
                  tmp_path / "r", order)
    resp = parse_retrieve_document_set_response(reply.body)  # type: ignore[arg-type]
    assert order == (["root"] + ["part"] * len(docs) if b == HB1
                     else ["part"] * len(docs) + ["root"])
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert sorted(d.document_unique_id for d in resp.documents) == sorted(t[2] for t in docs)
    assert {d.home_community_id for d in resp.documents} == {b}
    assert resp.errors and {e.location for e in resp.errors} == {b}
