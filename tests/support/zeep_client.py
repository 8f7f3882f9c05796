"""zeep, a SOAP client nobody here wrote, loading the OFFICIAL IHE WSDLs from the conformance
corpus and calling the gateway over mutual TLS.

The official WSDLs include their schemas as ``../schema/...`` and rim.xsd imports xml.xsd by
web address; `CorpusTransport` maps those to the corpus files (no network). The registry WSDL
also includes HL7 V3 PIX schemas (ITI-8/ITI-44 operations) that the corpus does not carry: an
empty schema stands in for them; the ITI-18/ITI-42 operations do not use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests
import zeep
from zeep.transports import Transport

from tests.conftest import CONFORMANCE

EMPTY_SCHEMA = b'<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema"/>'


class CorpusTransport(Transport):
    def load(self, url: str) -> bytes:
        if url in ("http://www.w3.org/2001/xml.xsd", "https://www.w3.org/2001/xml.xsd"):
            return (CONFORMANCE / "schemas" / "w3c" / "xml.xsd").read_bytes()
        path = url.removeprefix("file://")
        if "/schema/HL7V3/" in path:
            return EMPTY_SCHEMA
        marker = "/conformance/wsdl/schema/"  # the official WSDLs' ../schema/ folder
        if marker in path:
            rel = path.split(marker, 1)[1]
            return (CONFORMANCE / "schemas" / rel).read_bytes()
        if url.startswith(("http://", "https://")):
            raise ValueError(f"refusing to fetch {url} (tests never reach the network)")
        return Path(path).read_bytes()


def mtls_session(ca: Path, cert: Path, key: Path) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # REQUESTS_CA_BUNDLE must not override verify (DESIGN.md)
    s.verify = str(ca)
    s.cert = (str(cert), str(key))
    return s


def official_client(wsdl: str, session: requests.Session) -> zeep.Client:
    """A zeep client of an official WSDL, e.g. "ihe-iti/XDS.b_DocumentRepository.wsdl"."""
    transport = CorpusTransport(session=session, timeout=60, operation_timeout=300)
    # strict=False: zeep cannot map ebRIM substitution groups in responses; the tests
    # validate every raw response body against the official schemas instead.
    settings = zeep.Settings(strict=False, xml_huge_tree=False, forbid_dtd=True,
                             forbid_entities=True,
                             forbid_external=False)  # CorpusTransport never fetches
    return zeep.Client(str(CONFORMANCE / "wsdl" / wsdl), transport=transport,
                       settings=settings)


def call_with_element(client: zeep.Client, binding: str, address: str, operation: str,
                      element: Any, **skeleton: Any) -> Any:
    """Call `operation` through zeep with `element` (lxml) in place of the body child of the
    same name.

    zeep cannot build ebRIM RegistryObjectLists (their members are a substitution group), so
    the message is built by zeep from `skeleton` (the same operation with a minimal value for
    that part: zeep adds WS-Addressing from the WSDL's wsaw:Action), the part is swapped for
    the real element, and zeep's own transport posts it and its binding parses the reply.
    """
    bound = client.wsdl.bindings[binding]
    # zeep's own message building: WS-Addressing from wsaw:Action, plugins, HTTP headers.
    envelope, headers = bound._create(operation, (), skeleton, client=client,
                                      options={"address": address})
    body = envelope.find("{http://www.w3.org/2003/05/soap-envelope}Body")
    assert body is not None and len(body) == 1
    old = next(c for c in body[0] if c.tag == element.tag)
    old.getparent().replace(old, element)
    response = client.transport.post_xml(address, envelope, headers)
    return bound.process_reply(client, bound.get(operation), response)
