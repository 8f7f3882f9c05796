"""Validation against the official schemas of the conformance corpus (tests only).

One in-memory wrapper schema xs:imports ebRS 3.0 (rim, rs, lcm, query), IHE XDS.b and XDS-I.b,
SOAP 1.2 and WS-Addressing from ../shared/conformance/schemas; a resolver maps the remote
http://www.w3.org/2001/xml.xsd that rim.xsd imports to schemas/w3c/xml.xsd (the network is
never used). The xml namespace is imported first so that libxml2, which keeps the first
location it sees per namespace, uses the local copy. Built once and cached.

MTOM: an xds-b:Document holding `<xop:Include/>` is base64Binary after XOP processing; the
validators replace each xop:Include by empty base64 text in a copy before validating.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

from lxml import etree

from tests.conftest import CONFORMANCE

SCHEMAS = CONFORMANCE / "schemas"
XML_XSD_URL = "http://www.w3.org/2001/xml.xsd"
XOP_INCLUDE = "{http://www.w3.org/2004/08/xop/include}Include"

_IMPORTS = (
    ("http://www.w3.org/XML/1998/namespace", "w3c/xml.xsd"),
    ("urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0", "ebRS/rim.xsd"),
    ("urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0", "ebRS/rs.xsd"),
    ("urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0", "ebRS/lcm.xsd"),
    ("urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0", "ebRS/query.xsd"),
    ("urn:ihe:iti:xds-b:2007", "IHE/XDS.b_DocumentRepository.xsd"),
    ("urn:ihe:rad:xdsi-b:2009", "IHE/XDSI.b_ImagingDocumentSource.xsd"),
    ("http://www.w3.org/2003/05/soap-envelope", "w3c/soap-1.2-envelope.xsd"),
    ("http://www.w3.org/2005/08/addressing", "w3c/ws-addr.xsd"),
)


class _LocalXmlXsd(etree.Resolver):
    def resolve(self, system_url: str, public_id: str, context: object) -> object:  # type: ignore[override]
        if system_url == XML_XSD_URL:
            return self.resolve_filename(  # type: ignore[attr-defined]
                str(SCHEMAS / "w3c" / "xml.xsd"), context)
        return None


def _wrapper() -> bytes:
    imports = "\n".join(
        f'  <xs:import namespace="{ns}" schemaLocation="{(SCHEMAS / rel).as_uri()}"/>'
        for ns, rel in _IMPORTS)
    return (f'<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" '
            f'targetNamespace="urn:xdsi-gateway:test:wrapper">\n{imports}\n</xs:schema>'
            ).encode()


@lru_cache(maxsize=1)
def envelope_validator() -> etree.XMLSchema:
    """The cached XMLSchema that validates SOAP 1.2 envelopes and every IHE body we use."""
    parser = etree.XMLParser(no_network=True, resolve_entities=False, load_dtd=False)
    parser.resolvers.add(_LocalXmlXsd())
    doc = etree.fromstring(_wrapper(), parser, base_url=(SCHEMAS / "wrapper.xsd").as_uri())
    return etree.XMLSchema(etree.ElementTree(doc))


def _without_xop(el: etree._Element) -> etree._Element:
    if el.find(f".//{XOP_INCLUDE}") is None:
        return el
    dup = copy.deepcopy(el)
    for inc in list(dup.iter(XOP_INCLUDE)):
        parent = inc.getparent()
        assert parent is not None
        parent.remove(inc)
        parent.text = ""
    return dup


def schema_errors(el: etree._Element) -> list[str]:
    """The schema errors of `el` (an envelope or a body element); empty when valid."""
    schema = envelope_validator()
    target = _without_xop(el)
    if schema.validate(etree.ElementTree(target)):
        return []
    return [f"line {e.line}: {e.message}" for e in list(schema.error_log)]  # type: ignore[call-overload]


def validate_body(el: etree._Element) -> bool:
    return not schema_errors(el)


def assert_valid(el: etree._Element) -> None:
    """Raise AssertionError with the schema error log when `el` is not valid."""
    errors = schema_errors(el)
    if errors:
        text = etree.tostring(el, pretty_print=True).decode()[:4000]
        raise AssertionError("schema validation failed:\n" + "\n".join(errors)
                             + "\n--- document ---\n" + text)


def schemas_dir() -> Path:
    return SCHEMAS
