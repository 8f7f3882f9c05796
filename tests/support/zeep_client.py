"""zeep, a SOAP client nobody here wrote, loading the OFFICIAL IHE WSDLs from the conformance
corpus and calling the gateway over mutual TLS.

The official WSDLs include their schemas as ``../schema/...`` and rim.xsd imports xml.xsd by
web address; `CorpusTransport` maps those to the corpus files (no network). The registry WSDL
also includes HL7 V3 PIX schemas (ITI-8/ITI-44 operations) that the corpus does not carry: an
empty schema stands in for them; the ITI-18/ITI-42 operations do not use them.
"""

from __future__ import annotations

from pathlib import Path

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
        wsdl_schema = str(CONFORMANCE / "wsdl" / "schema") + "/"
        if path.startswith(wsdl_schema):  # the WSDLs' ../schema/ folder
            rel = path[len(wsdl_schema):]
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
    settings = zeep.Settings(strict=True, xml_huge_tree=False, forbid_dtd=True,
                             forbid_entities=True,
                             forbid_external=False)  # CorpusTransport never fetches
    return zeep.Client(str(CONFORMANCE / "wsdl" / wsdl), transport=transport,
                       settings=settings)
