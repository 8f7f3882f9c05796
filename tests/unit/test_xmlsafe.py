"""The hardened parser refuses DTDs, entities and external references, and reports
malformed input as MalformedXmlError (a ValueError), never as a raw lxml exception."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from gateway.ebrim.xmlsafe import MalformedXmlError, UnsafeXmlError, parse_xml, parse_xml_file

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<lolz>&lol9;</lolz>"""


def _xxe(target: str) -> bytes:
    return (f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "{target}">]>'
            f"<r>&x;</r>").encode()


def test_plain_document_parses() -> None:
    root = parse_xml(b'<a xmlns="urn:x"><b c="1">t &amp; u</b></a>')
    assert root.tag == "{urn:x}a"
    assert root[0].text == "t & u"


@pytest.mark.parametrize("data", [
    BILLION_LAUGHS,
    _xxe("file:///etc/passwd"),
    _xxe("http://127.0.0.1:9/evil"),
    b'<?xml version="1.0"?><!DOCTYPE r SYSTEM "http://127.0.0.1:9/x.dtd"><r/>',
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]><r/>',
    b"<!DOCTYPE r><r/>",
], ids=["billion-laughs", "xxe-file", "xxe-http", "external-dtd", "parameter-entity",
        "bare-doctype"])
def test_dtds_and_entities_are_refused(data: bytes) -> None:
    with pytest.raises(UnsafeXmlError):
        parse_xml(data)


def test_external_entity_content_never_appears(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    with pytest.raises(UnsafeXmlError) as info:
        parse_xml(_xxe(secret.as_uri()))
    assert "TOPSECRET" not in str(info.value)


@pytest.mark.parametrize("data", [b"", b"   ", b"<a><b></a>", b"<a>&undefined;</a>",
                                  b"not xml", b"<a/><b/>"])
def test_malformed_is_reported_as_value_error(data: bytes) -> None:
    with pytest.raises(MalformedXmlError):
        parse_xml(data)
    assert issubclass(MalformedXmlError, ValueError)
    assert issubclass(UnsafeXmlError, ValueError)


def test_file_variant(tmp_path: Path) -> None:
    ok = tmp_path / "ok.xml"
    ok.write_bytes(b"<r><x/></r>")
    assert parse_xml_file(ok)[0].tag == "x"
    bad = tmp_path / "bad.xml"
    bad.write_bytes(BILLION_LAUGHS)
    with pytest.raises(UnsafeXmlError):
        parse_xml_file(bad)
    broken = tmp_path / "broken.xml"
    broken.write_bytes(b"<r>")
    with pytest.raises(MalformedXmlError):
        parse_xml_file(broken)


def test_parsers_are_per_thread() -> None:
    results: list[str] = []

    def work(i: int) -> None:
        for _ in range(50):
            results.append(parse_xml(f"<r{i}/>".encode()).tag)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(results)) == ["r0", "r1", "r2", "r3"]
    assert len(results) == 200
