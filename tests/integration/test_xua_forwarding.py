"""XUA across two real gateways: A initiates, B responds and requires a XUA assertion on
/xca/responding. A consumer's signed assertion reaches B through A unchanged (B verifies it and
answers); when the consumer sends none, A sends its configured `[xua] outbound_assertion`; an
assertion B does not trust is passed on as it is, so B refuses and A reports B unavailable."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from lxml import etree

from gateway.demo import free_port, start_gateway
from gateway.ebrim.model import AdhocQuery, Slot
from gateway.ebrim.parse import parse_adhoc_query_response
from gateway.ebrim.render import render_adhoc_query_request
from gateway.ns import Action, ErrorCode, ResponseStatus, StoredQuery
from gateway.security.pki import DevPki, create_dev_pki
from gateway.soap.client import SoapClient
from tests.support import saml
from tests.support.communities import community_config

HA = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.201"
HB = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.202"
PATIENT = "XUA-0001^^^&1.3.6.1.4.1.21367.2017.2.5.83&ISO"


@dataclass
class Pair:
    pki: DevPki
    idp: saml.TestIdp
    a: SoapClient


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("xua-fwd")
    pki = create_dev_pki(root / "pki")
    idp = saml.TestIdp.create("XUA test IdP")
    idp_pem = idp.write_cert(root / "idp.pem")
    node_assertion = root / "node-assertion.xml"
    node_assertion.write_bytes(etree.tostring(idp.assertion(
        name_id="gateway-a@node.example.org", lifetime=3600)))
    pa, pb = free_port(), free_port()
    running = []
    client = None
    try:
        cfg_b = community_config(root / "b", pki, pb, HB,
                        f'\n[xua]\nrequired_endpoints = ["/xca/responding"]\n'
                        f'trusted_certificates = ["{idp_pem}"]\naudience = "{saml.AUDIENCE}"\n')
        running.append(start_gateway(cfg_b, pki, pb))
        url = f"https://localhost:{pb}/xca/responding"
        cfg_a = community_config(root / "a", pki, pa, HA,
                        f'\n[xua]\noutbound_assertion = "{node_assertion}"\n'
                        f"\n[xca]\nquery_timeout_seconds = 10\n"
                        f'\n[[communities]]\nhome_community_id = "{HB}"\n'
                        f'query_url = "{url}"\nretrieve_url = "{url}"\n')
        running.append(start_gateway(cfg_a, pki, pa))
        client = SoapClient(f"https://localhost:{pa}", ca_bundle=pki.ca_cert,
                            certificate=pki.client_cert, private_key=pki.client_key, timeout=30)
        yield Pair(pki, idp, client)
    finally:
        if client is not None:
            client.close()
        for r in running:
            r.stop()


def _find(pair: Pair, *headers: etree._Element) -> tuple[str, list[str]]:
    query = AdhocQuery(query_id=StoredQuery.FIND_DOCUMENTS, parameters=(
        Slot("$XDSDocumentEntryPatientId", (f"'{PATIENT}'",)),
        Slot("$XDSDocumentEntryStatus",
             ("('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')",))))
    reply = pair.a.call("/xca/initiating", Action.ITI18, render_adhoc_query_request(query),
                        headers=headers)
    assert reply.body is not None and not reply.is_fault, etree.tostring(reply.envelope)
    resp = parse_adhoc_query_response(reply.body)
    return resp.status, [e.code for e in resp.errors]


def test_consumer_assertion_is_verified_by_the_responding_gateway(pair: Pair) -> None:
    status, errors = _find(pair, saml.security_header(pair.idp.assertion()))
    assert status == ResponseStatus.SUCCESS, errors
    assert errors == []


def test_configured_assertion_when_the_consumer_sent_none(pair: Pair) -> None:
    status, errors = _find(pair)
    assert status == ResponseStatus.SUCCESS, errors


def test_untrusted_consumer_assertion_is_passed_on_not_replaced(pair: Pair) -> None:
    stranger = saml.TestIdp.create("Untrusted IdP")
    status, errors = _find(pair, saml.security_header(stranger.assertion()))
    assert status == ResponseStatus.FAILURE
    assert errors == [ErrorCode.UNAVAILABLE_COMMUNITY]
