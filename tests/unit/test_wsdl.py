"""The project's own WSDLs (wsdl/) and XSDs (schemas/), checked against the official files.

- Each endpoint's WSDL offers the same operations, with the same WS-Addressing actions and body
  elements, as the corresponding official IHE (or, for XCA-I, dcm4chee-xds) WSDL, and the same
  actions as gateway/transactions.py routes on.
- zeep loads each WSDL as served (`?wsdl`, schemas fetched from `?xsd=`) and sees the
  operations.
- Our schemas give the same verdict as the official schema set (oracle) for every message
  body of the conformance corpus, and for mutated messages.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from zeep import Client, Transport

from gateway.ebrim.xmlsafe import make_parser
from gateway.ns import Action
from gateway.soap import wsdl as wsdl_mod
from gateway.soap.wsdl import schema_names, wsdl_document, xsd_document
from gateway.transactions import ENDPOINTS, ENDPOINTS_BY_PATH, Endpoint

WSDL = "http://schemas.xmlsoap.org/wsdl/"
SOAP12_WSDL = "http://schemas.xmlsoap.org/wsdl/soap12/"
WSAW = "http://www.w3.org/2006/05/addressing/wsdl"
WSAM = "http://www.w3.org/2007/05/addressing/metadata"
XS = "http://www.w3.org/2001/XMLSchema"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"

RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
QUERY = "urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
XDSB = "urn:ihe:iti:xds-b:2007"
XDSI = "urn:ihe:rad:xdsi-b:2009"
COVERED = (RIM, RS, LCM, QUERY, XDSB, XDSI)
HL7V3_ACTION = "urn:hl7-org:v3:"

BASE = "https://gateway.test:8443"

# Our WSDL -> the official WSDL(s) whose operations it must offer (paths under conformance/wsdl).
# IHE publishes no XCA-I WSDL; dcm4chee-xds's are the reference (its two RAD-75 variants agree).
# Their actions match the verified table of DESIGN.md, which is checked separately below.
OFFICIAL: dict[str, tuple[tuple[str, ...], ...]] = {
    "registry.wsdl": (("ihe-iti/XDS.b_DocumentRegistry.wsdl",),),
    "repository.wsdl": (("ihe-iti/XDS.b_DocumentRepository.wsdl",),),
    "imaging-source.wsdl": (("ihe-rad/XDS-I.b_ImagingDocumentSource.wsdl",),),
    "xca-responding.wsdl": (("ihe-iti/XCARespondingGatewayQuery.wsdl",
                             "ihe-iti/XCARespondingGatewayRetrieve.wsdl"),),
    "xca-initiating.wsdl": (("ihe-iti/XCAInitiatingGatewayQuery.wsdl",
                             "ihe-iti/XCAInitiatingGatewayRetrieve.wsdl"),),
    "xcai-responding.wsdl": (("ihe-rad/dcm4chee-xds/XCA-I-RespondingGateway.wsdl",),
                             ("ihe-rad/dcm4chee-xds/XCAIRespondingGateway.wsdl",)),
    "xcai-initiating.wsdl": (("ihe-rad/dcm4chee-xds/XCA-I_InitiatingGateway.wsdl",),),
}

# DESIGN.md "Facts to get right": (request action, response action) per transaction.
DESIGN_ACTIONS = {
    "ITI-18": ("urn:ihe:iti:2007:RegistryStoredQuery",
               "urn:ihe:iti:2007:RegistryStoredQueryResponse"),
    "ITI-38": ("urn:ihe:iti:2007:CrossGatewayQuery", "urn:ihe:iti:2007:CrossGatewayQueryResponse"),
    "ITI-39": ("urn:ihe:iti:2007:CrossGatewayRetrieve",
               "urn:ihe:iti:2007:CrossGatewayRetrieveResponse"),
    "ITI-41": ("urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b",
               "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-bResponse"),
    "ITI-42": ("urn:ihe:iti:2007:RegisterDocumentSet-b",
               "urn:ihe:iti:2007:RegisterDocumentSet-bResponse"),
    "ITI-43": ("urn:ihe:iti:2007:RetrieveDocumentSet",
               "urn:ihe:iti:2007:RetrieveDocumentSetResponse"),
    "RAD-69": ("urn:ihe:rad:2009:RetrieveImagingDocumentSet",
               "urn:ihe:iti:2007:RetrieveDocumentSetResponse"),
    "RAD-75": ("urn:ihe:rad:2011:CrossGatewayRetrieveImagingDocumentSet",
               "urn:ihe:rad:2011:CrossGatewayRetrieveImagingDocumentSetResponse"),
}

Operation = tuple[str, str, str, str, str]  # name, input action, output action, in/out element


# --------------------------------------------------------------------------------------------
# WSDL reading helpers
# --------------------------------------------------------------------------------------------

def _parse(data: bytes) -> etree._Element:
    return etree.fromstring(data, make_parser())


def _resolve_qname(el: etree._Element, value: str) -> str:
    prefix, _, local = value.rpartition(":")
    ns = el.nsmap.get(prefix or None)
    assert ns is not None, f"unbound prefix in {value!r}"
    return f"{{{ns}}}{local}"


def _action(el: etree._Element) -> str:
    return el.get(f"{{{WSAM}}}Action") or el.get(f"{{{WSAW}}}Action") or ""


def _operations(root: etree._Element) -> set[Operation]:
    """(operation, input action, output action, input element, output element) of a WSDL."""
    tns = root.get("targetNamespace")
    messages: dict[str, str] = {}
    for msg in root.iterfind(f"{{{WSDL}}}message"):
        part = msg.find(f"{{{WSDL}}}part")
        assert part is not None
        messages[f"{{{tns}}}{msg.get('name')}"] = _resolve_qname(part, part.get("element", ""))
    ops: set[Operation] = set()
    for pt in root.iterfind(f"{{{WSDL}}}portType"):
        for op in pt.iterfind(f"{{{WSDL}}}operation"):
            inp = op.find(f"{{{WSDL}}}input")
            out = op.find(f"{{{WSDL}}}output")
            assert inp is not None and out is not None
            ops.add((op.get("name", ""), _action(inp), _action(out),
                     messages[_resolve_qname(inp, inp.get("message", ""))],
                     messages[_resolve_qname(out, out.get("message", ""))]))
    return ops


def _ours(endpoint: Endpoint) -> etree._Element:
    return _parse(wsdl_document(endpoint.path, endpoint.wsdl, BASE))


def _endpoint_for(wsdl_file: str) -> Endpoint:
    (endpoint,) = [e for e in ENDPOINTS if e.wsdl == wsdl_file]
    return endpoint


ENDPOINT_IDS = [e.path for e in ENDPOINTS]


# --------------------------------------------------------------------------------------------
# WSDLs
# --------------------------------------------------------------------------------------------

def test_every_endpoint_has_a_mapped_wsdl() -> None:
    assert {e.wsdl for e in ENDPOINTS} == set(OFFICIAL)
    assert sorted(p.name for p in wsdl_mod.wsdl_dir().glob("*.wsdl")) == sorted(OFFICIAL)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ENDPOINT_IDS)
def test_wsdl_is_served_with_rewritten_addresses(endpoint: Endpoint) -> None:
    root = _ours(endpoint)
    assert root.tag == f"{{{WSDL}}}definitions"
    url = BASE + endpoint.path
    addresses = [a.get("location") for a in root.iter(f"{{{SOAP12_WSDL}}}address")]
    assert addresses and set(addresses) == {url}
    locations = [i.get("schemaLocation", "") for i in root.iter(f"{{{XS}}}import")]
    assert locations
    for loc in locations:
        assert loc.startswith(url + "?xsd="), loc
        assert xsd_document(loc.removeprefix(url + "?xsd="), endpoint.path, BASE) is not None
    # A trailing slash in the base URL does not double the separator.
    again = _parse(wsdl_document(endpoint.path, endpoint.wsdl, BASE + "/"))
    assert {a.get("location") for a in again.iter(f"{{{SOAP12_WSDL}}}address")} == {url}


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ENDPOINT_IDS)
def test_operations_match_the_official_wsdl(endpoint: Endpoint, conformance: Path) -> None:
    ours = _operations(_ours(endpoint))
    for files in OFFICIAL[endpoint.wsdl]:
        official: set[Operation] = set()
        for f in files:
            official |= _operations(_parse((conformance / "wsdl" / f).read_bytes()))
        # The IHE registry WSDL also carries the HL7 v3 Patient Identity Feed (ITI-44), which
        # this registry does not offer; nothing else may be left out.
        left_out = {op for op in official if op[1].startswith(HL7V3_ACTION)}
        assert all(op[2].startswith(HL7V3_ACTION) for op in left_out)
        assert ours == official - left_out, files


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ENDPOINT_IDS)
def test_actions_match_the_transactions_and_design(endpoint: Endpoint) -> None:
    actions = {(op[1], op[2]) for op in _operations(_ours(endpoint))}
    assert actions == {(t.request_action, t.response_action) for t in endpoint.transactions}
    assert actions == {DESIGN_ACTIONS[t.name] for t in endpoint.transactions}


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ENDPOINT_IDS)
def test_bindings_are_soap12_document_literal_with_addressing(endpoint: Endpoint) -> None:
    root = _ours(endpoint)
    port_types = {f"{{{root.get('targetNamespace')}}}{pt.get('name')}": pt
                  for pt in root.iterfind(f"{{{WSDL}}}portType")}
    bindings = root.findall(f"{{{WSDL}}}binding")
    assert len(bindings) == len(port_types)
    for binding in bindings:
        soap = binding.find(f"{{{SOAP12_WSDL}}}binding")
        assert soap is not None and soap.get("style") == "document"
        assert soap.get("transport") == "http://schemas.xmlsoap.org/soap/http"
        assert binding.find(f"{{{WSAW}}}UsingAddressing") is not None
        pt = port_types[_resolve_qname(binding, binding.get("type", ""))]
        inputs = {op.get("name"): _action(op.find(f"{{{WSDL}}}input"))  # type: ignore[arg-type]
                  for op in pt.iterfind(f"{{{WSDL}}}operation")}
        bound = binding.findall(f"{{{WSDL}}}operation")
        assert {op.get("name") for op in bound} == set(inputs)
        for op in bound:
            soap_op = op.find(f"{{{SOAP12_WSDL}}}operation")
            assert soap_op is not None and soap_op.get("soapAction") == inputs[op.get("name")]
            bodies = op.findall(f".//{{{SOAP12_WSDL}}}body")
            assert len(bodies) == 2 and all(b.get("use") == "literal" for b in bodies)
    # wsam:Action and wsaw:Action, when both present, agree.
    for el in root.iter(f"{{{WSDL}}}input", f"{{{WSDL}}}output"):
        if el.get(f"{{{WSAM}}}Action") and el.get(f"{{{WSAW}}}Action"):
            assert el.get(f"{{{WSAM}}}Action") == el.get(f"{{{WSAW}}}Action")


# --------------------------------------------------------------------------------------------
# zeep loads the WSDLs as served
# --------------------------------------------------------------------------------------------

def _zeep_client(endpoint: Endpoint) -> tuple[Any, Any]:
    class ServedTransport(Transport):
        """Answers GETs as the gateway does, without a server; never touches the network."""

        loaded: list[str]

        def load(self, url: str) -> bytes:
            self.loaded.append(url)
            prefix = BASE + endpoint.path
            if url == prefix + "?wsdl":
                return wsdl_document(endpoint.path, endpoint.wsdl, BASE)
            if url.startswith(prefix + "?xsd="):
                data = xsd_document(url.removeprefix(prefix + "?xsd="), endpoint.path, BASE)
                if data is not None:
                    return data
            raise AssertionError(f"zeep asked for {url!r}")

    transport = ServedTransport()
    transport.loaded = []
    client = Client(BASE + endpoint.path + "?wsdl", transport=transport)
    return client, transport


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ENDPOINT_IDS)
def test_zeep_loads_the_served_wsdl(endpoint: Endpoint) -> None:
    client, transport = _zeep_client(endpoint)
    expected = {(op[0], op[1]) for op in _operations(_ours(endpoint))}
    seen: set[tuple[str, str]] = set()
    for service in client.wsdl.services.values():
        for port in service.ports.values():
            assert port.binding_options["address"] == BASE + endpoint.path
            for name, operation in port.binding._operations.items():
                seen.add((name, operation.abstract.wsa_action))
    assert seen == expected
    # Every schema was fetched from this endpoint's ?xsd=, including the nested imports.
    fetched = {u.split("?xsd=")[1] for u in transport.loaded if "?xsd=" in u}
    assert fetched == _import_closure(endpoint)
    assert all(u.startswith(BASE + endpoint.path + "?") for u in transport.loaded)


def _import_closure(endpoint: Endpoint) -> set[str]:
    """Our schema files a WSDL needs: its imports and theirs, transitively."""
    prefix = f"{BASE}{endpoint.path}?xsd="
    todo = [i.get("schemaLocation", "").removeprefix(prefix)
            for i in _ours(endpoint).iter(f"{{{XS}}}import")]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        root = _parse((wsdl_mod.schema_dir() / name).read_bytes())
        todo += [i.get("schemaLocation", "") for i in root.iter(f"{{{XS}}}import")]
    return seen


def test_zeep_builds_a_rad69_request_our_schema_accepts() -> None:
    client, _ = _zeep_client(ENDPOINTS_BY_PATH["/xdsi/imaging-source"])
    element = client.get_element(f"{{{XDSI}}}RetrieveImagingDocumentSetRequest")
    value = element(
        StudyRequest=[{"studyInstanceUID": "1.2.3", "SeriesRequest": [{
            "seriesInstanceUID": "1.2.3.4",
            "DocumentRequest": [{"RepositoryUniqueId": "1.9", "DocumentUniqueId": "1.2.3.4.5"}],
        }]}],
        TransferSyntaxUIDList={"TransferSyntaxUID": ["1.2.840.10008.1.2.1"]},
    )
    node = etree.Element("wrapper")
    element.render(node, value)
    (body,) = list(node)
    ours = _our_schema()
    assert ours.validate(etree.ElementTree(body)), ours.error_log
    doc_request = body.find(f".//{{{XDSB}}}DocumentRequest")
    assert doc_request is not None  # the xds-b namespace, as RAD-69 requires


# --------------------------------------------------------------------------------------------
# Served schemas
# --------------------------------------------------------------------------------------------

def test_schemas_are_self_contained_and_marked_as_ours() -> None:
    names = schema_names()
    assert {"rim.xsd", "rs.xsd", "lcm.xsd", "query.xsd", "xml.xsd"} <= set(names)
    for name in names:
        text = (wsdl_mod.schema_dir() / name).read_text(encoding="utf-8")
        assert "the project's own" in text and "tests/unit/test_wsdl.py" in text, name
        root = _parse(text.encode())
        for el in root.iter(f"{{{XS}}}import", f"{{{XS}}}include"):
            loc = el.get("schemaLocation", "")
            assert "/" not in loc and loc in names, (name, loc)
    for name in sorted(OFFICIAL):
        text = (wsdl_mod.wsdl_dir() / name).read_text(encoding="utf-8")
        assert "the project's own" in text and "tests/unit/test_wsdl.py" in text, name
        assert "://servicelocation" not in text


@pytest.mark.parametrize("name", ["../setup.cfg", "..", "/etc/passwd", "rim", "rim.xsd/",
                                  "sub/rim.xsd", ".hidden.xsd", "nope.xsd", "..%2Frim.xsd",
                                  "rim.xsd\x00", ""])
def test_xsd_document_serves_only_our_schema_files(name: str) -> None:
    assert xsd_document(name, "/xds/registry", BASE) is None


def test_wsdl_document_refuses_paths() -> None:
    with pytest.raises(FileNotFoundError):
        wsdl_document("/xds/registry", "../wsdl/registry.wsdl", BASE)
    with pytest.raises(FileNotFoundError):
        wsdl_document("/xds/registry", "missing.wsdl", BASE)


def test_served_schema_imports_point_at_the_endpoint() -> None:
    data = xsd_document("xdsi-b.xsd", "/xcai/responding", BASE)
    assert data is not None
    locations = {el.get("schemaLocation") for el in _parse(data).iter(f"{{{XS}}}import")}
    assert locations == {f"{BASE}/xcai/responding?xsd=rim.xsd",
                         f"{BASE}/xcai/responding?xsd=xds-b.xsd"}
    assert data.startswith(b"<?xml") and b"the project's own" in data


def test_share_folder_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "wsdl").mkdir()
    (tmp_path / "schemas").mkdir()
    src = (wsdl_mod.wsdl_dir() / "registry.wsdl").read_bytes()
    (tmp_path / "wsdl" / "registry.wsdl").write_bytes(
        src.replace(b"<wsdl:documentation>", b"<wsdl:documentation>SHARED ", 1))
    (tmp_path / "schemas" / "only.xsd").write_bytes(
        b'<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema"/>')
    monkeypatch.setenv(wsdl_mod.SHARE_ENV, str(tmp_path))
    assert b"SHARED " in wsdl_document("/xds/registry", "registry.wsdl", BASE)
    assert xsd_document("only.xsd", "/xds/registry", BASE) is not None
    assert xsd_document("rim.xsd", "/xds/registry", BASE) is None
    assert schema_names() == ("only.xsd",)


def test_served_schemas_compile_when_fetched_by_url() -> None:
    """lxml, resolving every import over `?xsd=` URLs, compiles our schema as served."""
    path = "/xcai/responding"

    class Served(etree.Resolver):
        def resolve(self, url: str, pubid: str, context: Any) -> Any:  # type: ignore[override]
            prefix = f"{BASE}{path}?xsd="
            assert url.startswith(prefix), url
            data = xsd_document(url.removeprefix(prefix), path, BASE)
            assert data is not None
            return self.resolve_string(data, context, base_url=url)

    parser = make_parser()
    parser.resolvers.add(Served())
    data = xsd_document("xdsi-b.xsd", path, BASE)
    assert data is not None
    schema = etree.XMLSchema(etree.fromstring(data, parser, base_url=f"{BASE}{path}?xsd=x"))
    ok = etree.fromstring(
        f'<RetrieveImagingDocumentSetRequest xmlns="{XDSI}" xmlns:b="{XDSB}">'
        '<StudyRequest studyInstanceUID="1"><SeriesRequest seriesInstanceUID="2">'
        "<b:DocumentRequest><b:RepositoryUniqueId>3</b:RepositoryUniqueId>"
        "<b:DocumentUniqueId>4</b:DocumentUniqueId></b:DocumentRequest>"
        "</SeriesRequest></StudyRequest><TransferSyntaxUIDList><TransferSyntaxUID>1.2"
        "</TransferSyntaxUID></TransferSyntaxUIDList></RetrieveImagingDocumentSetRequest>")
    assert schema.validate(ok), schema.error_log


# --------------------------------------------------------------------------------------------
# Schema parity with the official set
# --------------------------------------------------------------------------------------------

def _wrapper_schema(imports: list[tuple[str, Path]], resolver: etree.Resolver | None = None
                    ) -> etree.XMLSchema:
    text = ('<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">'
            + "".join(f'<xs:import namespace="{ns}" schemaLocation="{p.as_uri()}"/>'
                      for ns, p in imports)
            + "</xs:schema>")
    parser = make_parser()
    if resolver is not None:
        parser.resolvers.add(resolver)
    return etree.XMLSchema(etree.fromstring(text.encode(), parser))


_SCHEMAS: dict[str, etree.XMLSchema] = {}


def _our_schema() -> etree.XMLSchema:
    if "ours" not in _SCHEMAS:
        d = wsdl_mod.schema_dir()
        _SCHEMAS["ours"] = _wrapper_schema([
            (QUERY, d / "query.xsd"), (LCM, d / "lcm.xsd"), (RS, d / "rs.xsd"),
            (RIM, d / "rim.xsd"), (XDSB, d / "xds-b.xsd"), (XDSI, d / "xdsi-b.xsd")])
    return _SCHEMAS["ours"]


def _official_schema(conformance: Path) -> etree.XMLSchema:
    """The official set; rim.xsd's web import of xml.xsd maps to the corpus copy."""
    if "official" not in _SCHEMAS:
        s = conformance / "schemas"
        xml_xsd = s / "w3c" / "xml.xsd"

        class LocalXml(etree.Resolver):
            def resolve(self, url: str, pubid: str, context: Any) -> Any:  # type: ignore[override]
                if url == "http://www.w3.org/2001/xml.xsd":
                    return self.resolve_filename(str(xml_xsd), context)  # type: ignore[attr-defined]
                return None

        _SCHEMAS["official"] = _wrapper_schema([
            (RIM, s / "ebRS" / "rim.xsd"), (RS, s / "ebRS" / "rs.xsd"),
            (LCM, s / "ebRS" / "lcm.xsd"), (QUERY, s / "ebRS" / "query.xsd"),
            (XDSB, s / "IHE" / "XDS.b_DocumentRepository.xsd"),
            (XDSI, s / "IHE" / "XDSI.b_ImagingDocumentSource.xsd")], LocalXml())
    return _SCHEMAS["official"]


def _xml_of(path: Path) -> bytes | None:
    """The XML of a corpus file; for a MIME (MTOM) capture, its root part."""
    data = path.read_bytes()
    if path.suffix == ".xml":
        return data
    start = data.find(b"<?xml")
    if start < 0:
        m = re.search(rb"<[A-Za-z_][\w.-]*:Envelope", data)
        start = m.start() if m else -1
    if start < 0:
        return None
    end = data.find(b"\n--", start)
    return data[start:end] if end > 0 else data[start:]


def _bodies(conformance: Path) -> Iterator[tuple[str, etree._Element]]:
    """(name, element) for every message body in the covered namespaces."""
    for path in sorted((conformance / "messages").rglob("*")):
        if not path.is_file() or path.suffix not in (".xml", ".txt"):
            continue
        data = _xml_of(path)
        if data is None:
            continue
        try:
            root = etree.fromstring(data, make_parser())
        except etree.XMLSyntaxError:
            continue  # known not well-formed samples (README); nothing to validate
        if root.tag in (f"{{{SOAP12}}}Envelope", f"{{{SOAP11}}}Envelope"):
            elements = [c for b in root if isinstance(b.tag, str) and b.tag.endswith("}Body")
                        for c in b if isinstance(c.tag, str)]
        else:
            elements = [root]
        rel = str(path.relative_to(conformance))
        for el in elements:
            if etree.QName(el).namespace in COVERED:
                yield rel, copy.deepcopy(el)


def _verdict(schema: etree.XMLSchema, el: etree._Element) -> tuple[bool, int | None]:
    ok = schema.validate(etree.ElementTree(el))
    return ok, (None if ok else schema.error_log[0].line)  # type: ignore[index]


def test_our_schemas_agree_with_the_official_ones_on_the_corpus(conformance: Path) -> None:
    official, ours = _official_schema(conformance), _our_schema()
    verdicts: dict[bool, int] = {True: 0, False: 0}
    roots: set[str] = set()
    disagreements = []
    for name, el in _bodies(conformance):
        a, b = _verdict(official, el), _verdict(ours, el)
        verdicts[a[0]] += 1
        roots.add(etree.QName(el).localname)
        if a != b:  # same verdict, and for a rejection the first error on the same line
            disagreements.append((name, a, b, str(ours.error_log)[:300]))
    assert not disagreements
    assert verdicts[True] >= 250 and verdicts[False] >= 20, verdicts
    assert {"AdhocQueryRequest", "AdhocQueryResponse", "SubmitObjectsRequest",
            "RegistryResponse", "ProvideAndRegisterDocumentSetRequest",
            "RetrieveDocumentSetRequest", "RetrieveDocumentSetResponse",
            "RetrieveImagingDocumentSetRequest"} <= roots


def _sample(conformance: Path, rel: str) -> etree._Element:
    for name, el in _bodies(conformance):
        if name == rel:
            return el
    raise AssertionError(f"{rel} not in corpus")


RAD69 = "messages/rad-69/nist/ids_4820_case-1_With_HomeCommunityID_RAD-69Request.xml"
ITI43_RESP = "messages/iti-43/ihe/RetrieveDocumentSetResponse.xml"
ITI18_REQ = "messages/iti-18/ihe/RegistryStoredQueryRequest.xml"
ITI18_RESP = "messages/iti-18/ihe/RegistryStoredQueryResponse.xml"
ITI41_REQ = "messages/iti-41/ihe/ProvideAndRegisterDocumentSet-bRequest.xml"


def _remove(el: etree._Element, path: str) -> None:
    target = el.find(path, {"rim": RIM, "rs": RS, "lcm": LCM, "q": QUERY, "b": XDSB, "i": XDSI})
    assert target is not None, path
    parent = target.getparent()
    assert parent is not None
    parent.remove(target)


def _swap_first(el: etree._Element, path: str) -> None:
    target = el.find(path, {"rim": RIM, "rs": RS, "q": QUERY, "b": XDSB, "i": XDSI})
    assert target is not None, path
    following = target.getnext()
    assert following is not None
    target.addprevious(following)


MUTATIONS = [
    # missing required elements
    (ITI18_REQ, lambda e: _remove(e, "q:ResponseOption")),
    (ITI18_REQ, lambda e: _remove(e, "rim:AdhocQuery")),
    (ITI18_REQ, lambda e: _remove(e, ".//rim:ValueList")),
    (ITI18_RESP, lambda e: _remove(e, "rim:RegistryObjectList")),
    (ITI41_REQ, lambda e: _remove(e, "lcm:SubmitObjectsRequest")),
    (ITI41_REQ, lambda e: _remove(e, "lcm:SubmitObjectsRequest/rim:RegistryObjectList")),
    (ITI43_RESP, lambda e: _remove(e, "rs:RegistryResponse")),
    (ITI43_RESP, lambda e: _remove(e, "b:DocumentResponse/b:mimeType")),
    (RAD69, lambda e: _remove(e, "i:TransferSyntaxUIDList")),
    (RAD69, lambda e: _remove(e, ".//b:DocumentRequest/b:RepositoryUniqueId")),
    (RAD69, lambda e: _remove(e, "i:StudyRequest/i:SeriesRequest")),
    # wrong element order
    (ITI18_REQ, lambda e: _swap_first(e, "q:ResponseOption")),
    (ITI43_RESP, lambda e: _swap_first(e, "b:DocumentResponse/b:RepositoryUniqueId")),
    (ITI43_RESP, lambda e: _swap_first(e, "b:DocumentResponse/b:mimeType")),
    (RAD69, lambda e: _swap_first(e, "i:StudyRequest")),
    (RAD69, lambda e: _swap_first(e, ".//b:DocumentRequest/b:RepositoryUniqueId")),
    # missing required attributes, bad values, strangers
    (ITI18_RESP, lambda e: e.attrib.pop("status")),
    (RAD69, lambda e: e[0].attrib.pop("studyInstanceUID")),
    (ITI18_REQ, lambda e: e.find(f".//{{{RIM}}}Value").__setattr__("text", "x" * 257)),
    (ITI18_REQ, lambda e: e[0].set("returnType", "Everything")),
    (ITI41_REQ, lambda e: e.find(f".//{{{RIM}}}LocalizedString").set(
        "{http://www.w3.org/XML/1998/namespace}lang", "not a language")),
    (RAD69, lambda e: e.append(etree.Element(f"{{{XDSI}}}Unexpected"))),
]


@pytest.mark.parametrize(("rel", "mutate"), MUTATIONS, ids=[f"m{i}" for i in range(len(MUTATIONS))])
def test_mutated_messages_are_rejected_by_both(conformance: Path, rel: str,
                                               mutate: Callable[[etree._Element], object]
                                               ) -> None:
    official, ours = _official_schema(conformance), _our_schema()
    el = _sample(conformance, rel)
    assert official.validate(etree.ElementTree(el)) and ours.validate(etree.ElementTree(el))
    mutate(el)
    assert not official.validate(etree.ElementTree(el))
    assert not ours.validate(etree.ElementTree(el)), rel


SYSTEMATIC = [
    RAD69, ITI43_RESP, ITI18_REQ, ITI18_RESP, ITI41_REQ,
    "messages/iti-39/ihe/XCACrossGatewayRetrieveRequest.xml",
    "messages/iti-41/ihe/related-iti-42/RegisterDocumentSet-bRequest_SOAP.xml",
    "messages/iti-18/connect/errors/DocQueryXDSErrors__DocQueryXDSErrors_TestSuite_"
    "XDSRegistryError_TestCase_Mock_XDS.b_Response.xml",
    "messages/iti-43/connect/errors/DocumentRetrieveXDSErrorValidation__DocumentRetrieve"
    "XDSErrorValidation_TestSuite_PartialSuccess_TestCase_Mock_XDS.b_Repository.xml",
]


@pytest.mark.parametrize("rel", SYSTEMATIC, ids=[Path(r).stem[:40] for r in SYSTEMATIC])
def test_every_single_mutation_gets_the_official_verdict(conformance: Path, rel: str) -> None:
    """Systematic mutations: for each element, drop it, duplicate it, swap it with its next
    sibling, give it an over-long text, drop each of its attributes or make it over-long (past
    the 256 / 1024 character limits); our verdict must be the official one."""
    official, ours = _official_schema(conformance), _our_schema()
    original = _sample(conformance, rel)

    def elements(root: etree._Element) -> list[etree._Element]:
        return [x for x in root.iter() if isinstance(x.tag, str)]

    count = len(elements(original))
    tried = rejected = 0
    for index in range(count):
        attributes = [str(a) for a in elements(original)[index].attrib]
        kinds = ["drop", "dup", "swap", "text"] + [f"@{a}" for a in attributes]
        for kind in kinds + [f"long@{a}" for a in attributes]:
            el = copy.deepcopy(original)
            target = elements(el)[index]
            parent = target.getparent()
            if kind.startswith("@"):
                del target.attrib[kind[1:]]
            elif kind.startswith("long@"):
                target.set(kind[5:], "x" * 1100)
            elif kind == "text":
                if len(target) or not (target.text or "").strip():
                    continue
                target.text = "x" * 300
            elif parent is None:
                continue
            elif kind == "drop":
                parent.remove(target)
            elif kind == "dup":
                target.addnext(copy.deepcopy(target))
            else:
                following = target.getnext()
                if following is None or following.tag == target.tag:
                    continue
                target.addprevious(following)
            tried += 1
            verdict = _verdict(official, el)
            rejected += not verdict[0]
            assert verdict == _verdict(ours, el), (rel, kind, index)
    assert tried >= 2 * count and rejected > 0


def test_zeep_addresses_a_request_with_the_wsdl_action() -> None:
    """zeep reads the input action from our WSDL and puts it in a SOAP 1.2 wsa:Action header."""
    endpoint = ENDPOINTS_BY_PATH["/xds/repository"]
    client, _ = _zeep_client(endpoint)
    envelope = client.create_message(
        client.service, "DocumentRepository_RetrieveDocumentSet",
        DocumentRequest=[{"RepositoryUniqueId": "1.2.3", "DocumentUniqueId": "1.2.3.4"}])
    assert envelope.tag == f"{{{SOAP12}}}Envelope"
    action = envelope.find(f"{{{SOAP12}}}Header/{{http://www.w3.org/2005/08/addressing}}Action")
    assert action is not None and action.text == Action.ITI43
    to = envelope.find(f"{{{SOAP12}}}Header/{{http://www.w3.org/2005/08/addressing}}To")
    assert to is not None and to.text == BASE + endpoint.path
    body = envelope.find(f"{{{SOAP12}}}Body")
    assert body is not None and _our_schema().validate(etree.ElementTree(copy.deepcopy(body[0])))
