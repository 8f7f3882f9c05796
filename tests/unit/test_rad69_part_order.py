"""Why the RAD-69 response keeps its root XML part first by default (`[pacs] response_order =
"root-first"`): zeep (over the official XDS-I.b WSDL) takes the first MIME part as the SOAP
envelope and ignores the `start` parameter, so a response that streams attachments before a
root written last (status known only at the end; "root-last", gateway.soap.mtom.mtom_stream)
is not readable by it; our own parser finds the root by `start` either way."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import requests
from requests.structures import CaseInsensitiveDict
from zeep.exceptions import TransportError

from gateway.ebrim.model import RetrievedDocument
from gateway.ebrim.parse import parse_retrieve_document_set_response
from gateway.ebrim.xmlsafe import parse_xml
from gateway.imaging.rad69 import _response
from gateway.ns import Action, ResponseStatus
from gateway.soap.envelope import response_envelope, to_bytes
from gateway.soap.mtom import ROOT_CONTENT_ID, mtom_response, mtom_stream
from gateway.soap.multipart import parse_multipart
from tests.support.zeep_client import official_client

WSDL = "ihe-rad/XDS-I.b_ImagingDocumentSource.wsdl"
BINDING = "{urn:ihe:rad:xdsi-b:2009}ImagingDocumentSource_Binding"
SOURCE = "1.3.6.1.4.1.21367.13.71.101"
SOP = "1.2.826.0.1.3680043.8.498.1"
PAYLOAD = b"\x00" * 128 + b"DICM" + bytes(range(256)) * 40


def _message(tmp_path: Path) -> tuple[str, bytes, bytes]:
    """(content type, root-first body, the same parts with the root last)."""
    dcm = tmp_path / "doc.dcm"
    dcm.write_bytes(PAYLOAD)
    doc = RetrievedDocument(SOURCE, SOP, "application/dicom", dcm, dcm.stat().st_size)
    response = _response(ResponseStatus.SUCCESS, [doc], [], [])
    envelope = to_bytes(response_envelope(response.body, action=Action.RAD69_RESPONSE,
                                          relates_to="urn:uuid:0"))
    ctype, _length, stream = mtom_response(envelope, response.attachments)
    first = b"".join(stream)
    boundary = ctype.split('boundary="', 1)[1].split('"', 1)[0].encode()
    dash = b"--" + boundary
    parts = first.split(dash)
    # ["", root part, attachment part, "--\r\n"]
    assert len(parts) == 4 and ROOT_CONTENT_ID.encode() in parts[1]
    last = dash.join([parts[0], parts[2], parts[1], parts[3]])
    return ctype, first, last


def _zeep_reply(ctype: str, body: bytes) -> object:
    client = official_client(WSDL, requests.Session())
    binding = client.wsdl.bindings[BINDING]
    reply = requests.Response()
    reply.status_code = 200
    reply.headers = CaseInsensitiveDict({"Content-Type": ctype})
    reply._content = body
    reply.encoding = "utf-8"
    return binding.process_reply(client, binding.get("RetrieveImagingDocumentSet"), reply)


def test_zeep_reads_root_first(tmp_path: Path) -> None:
    ctype, first, _last = _message(tmp_path)
    result = _zeep_reply(ctype, first)
    assert result.RegistryResponse.status == ResponseStatus.SUCCESS  # type: ignore[attr-defined]
    docs = result.DocumentResponse  # type: ignore[attr-defined]
    assert [d.DocumentUniqueId for d in docs] == [SOP]
    assert docs[0].Document == PAYLOAD


def test_zeep_cannot_read_root_last(tmp_path: Path) -> None:
    ctype, _first, last = _message(tmp_path)
    with pytest.raises(TransportError, match="invalid XML"):  # it parses the DICOM part
        _zeep_reply(ctype, last)


@pytest.mark.parametrize("order", ["first", "last"])
def test_our_parser_finds_root_by_start(order: str, tmp_path: Path) -> None:
    ctype, first, last = _message(tmp_path)
    data = first if order == "first" else last
    spool = tmp_path / "spool"
    spool.mkdir()
    root, attachments = parse_multipart(io.BytesIO(data), ctype, spool,
                                        max_envelope_bytes=1 << 20, max_total_bytes=1 << 24,
                                        content_length=len(data))
    envelope = parse_xml(root)
    body = envelope.find("{http://www.w3.org/2003/05/soap-envelope}Body")
    assert body is not None
    response = parse_retrieve_document_set_response(body[0])
    assert response.status == ResponseStatus.SUCCESS
    (doc,) = response.documents
    assert attachments[doc.content_id].path.read_bytes() == PAYLOAD


def test_root_last_as_the_gateway_streams_it(tmp_path: Path) -> None:
    """What `response_order = "root-last"` writes (mtom_stream): zeep cannot read it, our
    parser reads it part for part."""
    dcm = tmp_path / "doc.dcm"
    dcm.write_bytes(PAYLOAD)
    doc = RetrievedDocument(SOURCE, SOP, "application/dicom", dcm, dcm.stat().st_size)
    response = _response(ResponseStatus.SUCCESS, [doc], [], [])
    envelope = to_bytes(response_envelope(response.body, action=Action.RAD69_RESPONSE,
                                          relates_to="urn:uuid:0"))
    ctype, stream = mtom_stream(iter(response.attachments), lambda: envelope)
    data = b"".join(stream)
    assert data.index(PAYLOAD) < data.index(ROOT_CONTENT_ID.encode())
    with pytest.raises(TransportError, match="invalid XML"):
        _zeep_reply(ctype, data)
    spool = tmp_path / "spool"
    spool.mkdir()
    root, attachments = parse_multipart(io.BytesIO(data), ctype, spool,
                                        max_envelope_bytes=1 << 20, max_total_bytes=1 << 24)
    body = parse_xml(root).find("{http://www.w3.org/2003/05/soap-envelope}Body")
    assert body is not None
    (got,) = parse_retrieve_document_set_response(body[0]).documents
    assert attachments[str(got.content_id)].path.read_bytes() == PAYLOAD
