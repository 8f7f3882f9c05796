"""Hypothesis fuzzing of the envelope, MTOM and ebRIM parsers, and of the whole edge (MTOM
middleware + SOAP application): only the documented error types, never a 500 or a traceback,
every spool folder removed. Derandomised and bounded (a few seconds each); bench/fuzz.py runs
the same properties for longer."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from gateway.ns import Action
from gateway.soap.application import make_app
from gateway.soap.mtom import MtomMiddleware
from gateway.transactions import Endpoint, RequestContext, SoapResponse, Transaction
from tests.support import fuzz

FUZZ = settings(derandomize=True, deadline=None, max_examples=300, database=None,
                suppress_health_check=list(HealthCheck))


@FUZZ
@given(fuzz.mutated(fuzz.VALID_ENVELOPE))
def test_envelope_parser_raises_only_envelope_errors(data: bytes) -> None:
    fuzz.check_envelope(data)


@FUZZ
@given(st.binary(max_size=2000))
def test_envelope_parser_on_random_bytes(data: bytes) -> None:
    fuzz.check_envelope(data)


@FUZZ
@given(fuzz.mutated(fuzz.mtom_body()), st.sampled_from([fuzz.MTOM_TYPE,
                                                        fuzz.MTOM_TYPE.replace("start=", "x="),
                                                        "multipart/related; boundary=",
                                                        "multipart/related"]))
def test_multipart_parser_raises_only_multipart_errors(data: bytes, ctype: str) -> None:
    with tempfile.TemporaryDirectory() as spool:
        fuzz.check_multipart(data, ctype, Path(spool))


@settings(FUZZ, max_examples=60)
@given(st.sampled_from(fuzz.EBRIM_ROOTS).flatmap(fuzz.ebrim_tree))
def test_ebrim_parsers_raise_only_xds_failures(el: etree._Element) -> None:
    with tempfile.TemporaryDirectory() as spool:
        fuzz.check_ebrim(el, Path(spool))


# --- the whole edge ----------------------------------------------------------------------------

def _echo(services: Any, ctx: RequestContext, body: etree._Element) -> SoapResponse:
    (ctx.spool_dir / "work.tmp").write_bytes(b"x")
    return SoapResponse(etree.Element("{urn:test}Ok"))


_T = Transaction("ITI-18", "Registry Stored Query", Action.ITI18, Action.ITI18_RESPONSE,
                 f"{__name__}:_echo")
_SPOOL = Path(tempfile.mkdtemp(prefix="xdsi-fuzz-"))
_APP = MtomMiddleware(
    make_app(SimpleNamespace(), endpoints=(Endpoint("/xds/registry", "R", "registry.wsdl",
                                                    (_T,)),),
             max_envelope_bytes=64 * 1024, max_request_bytes=256 * 1024, spool_root=_SPOOL),
    spool_root=_SPOOL, max_request_bytes=256 * 1024, max_envelope_bytes=64 * 1024)


def edge_call(data: bytes, ctype: str) -> tuple[int, bytes]:
    status: list[str] = []
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/xds/registry",
               "wsgi.input": io.BytesIO(data), "CONTENT_LENGTH": str(len(data)),
               "CONTENT_TYPE": ctype, "wsgi.url_scheme": "https", "SERVER_NAME": "localhost",
               "SERVER_PORT": "443"}
    result = _APP(environ, lambda s, h, exc=None: status.append(s))
    try:
        body = b"".join(result)
    finally:
        getattr(result, "close", lambda: None)()
    return int(status[0].split()[0]), body


def assert_edge_property(data: bytes, ctype: str) -> None:
    status, body = edge_call(data, ctype)
    assert status in (200, 400, 413, 415, 500), status
    if status == 500:  # SOAP 1.2 part 2, 7.5.1: MustUnderstand, VersionMismatch -> 500
        code = etree.fromstring(body).findtext(
            "{*}Body/{*}Fault/{*}Code/{*}Value") or ""
        assert code in ("env:MustUnderstand", "env:VersionMismatch"), code
    assert b"Traceback" not in body and b'File "' not in body
    assert list(_SPOOL.iterdir()) == []  # every request folder removed


def test_edge_answers_the_valid_requests() -> None:
    status, body = edge_call(fuzz.VALID_ENVELOPE, "application/soap+xml")
    assert status == 200 and b"urn:test" in body
    status, body = edge_call(fuzz.mtom_body(), fuzz.MTOM_TYPE)
    assert status == 200 and b"urn:test" in body
    assert list(_SPOOL.iterdir()) == []


@settings(FUZZ, max_examples=200)
@given(fuzz.mutated(fuzz.VALID_ENVELOPE))
def test_edge_plain_soap(data: bytes) -> None:
    assert_edge_property(data, "application/soap+xml; charset=UTF-8")


@settings(FUZZ, max_examples=200)
@given(fuzz.mutated(fuzz.mtom_body()))
def test_edge_mtom(data: bytes) -> None:
    assert_edge_property(data, fuzz.MTOM_TYPE)
