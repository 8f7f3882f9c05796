"""MTOM through the real SOAP edge: MtomMiddleware in front of gateway.soap.application.

A handler echoes the request's attachments back; the request goes in as MTOM, the response
comes out as MTOM, and the per-request spool folder is gone once the response is closed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from lxml import etree

from gateway.config import GatewayConfig, RegistryConfig, RepositoryConfig, ServerConfig
from gateway.ebrim.xmlsafe import parse_xml
from gateway.ns import SOAP12, WSA, XOP
from gateway.soap.mtom import MtomMiddleware, mtom_response
from gateway.soap.multipart import parse_multipart
from gateway.transactions import Attachment, Endpoint, RequestContext, SoapResponse, Transaction

BODY_NS = "urn:test:mtom"
SEEN: list[RequestContext] = []


def handler_echo(services: Any, ctx: RequestContext, body: etree._Element) -> SoapResponse:
    SEEN.append(ctx)
    out = etree.Element(f"{{{BODY_NS}}}Echo", nsmap={"t": BODY_NS, "xop": XOP})
    atts: list[Attachment] = []
    for inc in body.iter(f"{{{XOP}}}Include"):
        href = str(inc.get("href"))
        att = ctx.attachments.get(href)
        if att is None:
            etree.SubElement(out, f"{{{BODY_NS}}}Missing").text = href
            continue
        doc = etree.SubElement(out, f"{{{BODY_NS}}}Document")
        etree.SubElement(doc, f"{{{XOP}}}Include").set("href", f"cid:{att.content_id}")
        atts.append(att)
    return SoapResponse(out, attachments=tuple(atts))


ECHO = Transaction("T-MTOM", "MTOM echo", "urn:test:Echo", "urn:test:EchoResponse",
                   f"{__name__}:handler_echo", mtom_response=True)
ENDPOINT = Endpoint("/test/mtom", "MTOM test", "registry.wsdl", (ECHO,))


@pytest.fixture
def app(tmp_path: Path) -> Any:
    from gateway.services import build_services
    from gateway.soap.application import make_app

    config = GatewayConfig(
        server=ServerConfig(max_envelope_bytes=64 * 1024, max_request_bytes=8 * 1024 * 1024,
                            spool_directory=tmp_path / "spool"),
        registry=RegistryConfig(database=f"sqlite:///{tmp_path / 'registry.db'}"),
        repository=RepositoryConfig(directory=tmp_path / "repository"),
    )
    SEEN.clear()
    edge = make_app(build_services(config), endpoints=[ENDPOINT])
    return MtomMiddleware(edge, spool_root=tmp_path / "spool", max_request_bytes=8 * 1024 * 1024,
                          max_envelope_bytes=64 * 1024)


def _envelope(hrefs: list[str]) -> bytes:
    docs = "".join(f'<t:Document><xop:Include href="{h}"/></t:Document>' for h in hrefs)
    return (f'<env:Envelope xmlns:env="{SOAP12}" xmlns:wsa="{WSA}"><env:Header>'
            '<wsa:Action env:mustUnderstand="true">urn:test:Echo</wsa:Action>'
            "<wsa:MessageID>urn:uuid:mtom-1</wsa:MessageID></env:Header><env:Body>"
            f'<t:Request xmlns:t="{BODY_NS}" xmlns:xop="{XOP}">{docs}</t:Request>'
            "</env:Body></env:Envelope>").encode()


def test_mtom_request_and_response_through_the_edge(app: Any, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    payloads = {"a@test": b"\x00DICM\r\n--not-a-boundary" * 5000, "b c@test": b"",
                "d@test": bytes(range(256)) * 3}
    atts = []
    for i, (cid, data) in enumerate(payloads.items()):
        (src / str(i)).write_bytes(data)
        atts.append(Attachment(cid, src / str(i), len(data), "application/dicom"))
    hrefs = ["cid:a@test", "cid:b%20c@test", "cid:d@test"]
    ctype, length, body = mtom_response(_envelope(hrefs), atts, soap_action="urn:test:Echo")
    wire = b"".join(body)
    assert len(wire) == length

    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD="POST", PATH_INFO="/test/mtom", CONTENT_TYPE=ctype,
                   CONTENT_LENGTH=str(length), HTTP_HOST="gw.example")
    environ["wsgi.input"] = io.BytesIO(wire)
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        got["status"], got["headers"] = status, dict(headers)

    result = app(environ, start_response)
    try:
        out = b"".join(result)
    finally:
        result.close()
    assert got["status"].startswith("200"), out[:500]
    assert SEEN and set(SEEN[0].attachments) == set(payloads)
    spool_root = tmp_path / "spool"
    assert not any(spool_root.iterdir())  # the request's folder is gone after close()

    rtype = got["headers"]["Content-Type"]
    assert rtype.startswith("multipart/related")
    assert int(got["headers"]["Content-Length"]) == len(out)
    back = tmp_path / "back"
    back.mkdir()
    root, echoed = parse_multipart(io.BytesIO(out), rtype, back, max_envelope_bytes=1 << 20,
                                   max_total_bytes=1 << 24)
    env = parse_xml(root)
    assert env.find(f".//{{{BODY_NS}}}Missing") is None
    out_hrefs = [str(e.get("href")) for e in env.iter(f"{{{XOP}}}Include")]
    assert len(out_hrefs) == 3
    assert sorted(echoed[h].path.read_bytes() for h in out_hrefs) == sorted(payloads.values())
