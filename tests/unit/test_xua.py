"""XUA assertions checked by gateway.security.xua: only a valid, trusted, unaltered assertion
addressed to us and inside its validity window passes."""

from __future__ import annotations

import copy
import datetime as dt

import pytest
from lxml import etree

from gateway.ns import SAML2, SOAP12, WSSE
from gateway.security import xua
from gateway.security.xua import WsseFault, XuaError, XuaPolicy
from tests.support import saml


@pytest.fixture(scope="module")
def idp() -> saml.TestIdp:
    return saml.TestIdp.create()


@pytest.fixture(scope="module")
def rogue() -> saml.TestIdp:
    return saml.TestIdp.create("Test IdP")  # same name, other key


def refused(code: str, a: etree._Element | bytes, policy: XuaPolicy, **kw: object) -> XuaError:
    with pytest.raises(XuaError) as info:
        xua.verify(a, policy, **kw)  # type: ignore[arg-type]
    assert info.value.code == code, info.value.reason
    return info.value


def test_valid_assertion_gives_the_subject(idp: saml.TestIdp) -> None:
    s = xua.verify(idp.assertion(), idp.policy())
    assert s.name_id == "dr.house@hospital.example.org"
    assert s.issuer == "https://idp.example.org"
    assert s.subject_id == "Gregory House"
    assert s.organization == "Princeton-Plainsboro Teaching Hospital"
    assert s.organization_id == "urn:oid:1.2.3.4.5"
    assert s.home_community_id == "urn:oid:1.2.3.4"
    assert s.resource_id == "PID-1^^^&1.2.3&ISO"
    assert [r.code for r in s.roles] == ["309343006"]
    assert s.roles[0].code_system == "2.16.840.1.113883.6.96"
    assert [p.code for p in s.purposes_of_use] == ["TREATMENT"]
    assert s.attributes[xua.ROLE] == ("309343006",)


def test_ecdsa_signed_assertion_passes() -> None:
    ec_idp = saml.TestIdp.create("EC IdP", ecdsa=True)
    assert xua.verify(ec_idp.assertion(), ec_idp.policy()).name_id


def test_one_of_several_trusted_issuers(idp: saml.TestIdp, rogue: saml.TestIdp) -> None:
    policy = XuaPolicy(trusted=(rogue.cert, idp.cert), audience=saml.AUDIENCE)
    assert xua.verify(idp.assertion(), policy).subject_id == "Gregory House"


def test_expired(idp: saml.TestIdp) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    e = refused(WsseFault.INVALID_SECURITY_TOKEN, idp.assertion(now=past), idp.policy())
    assert "expired" in e.reason


def test_not_yet_valid(idp: saml.TestIdp) -> None:
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    e = refused(WsseFault.INVALID_SECURITY_TOKEN, idp.assertion(now=future), idp.policy())
    assert "not yet valid" in e.reason


def test_clock_skew_is_tolerated_up_to_the_configured_bound(idp: saml.TestIdp) -> None:
    a = idp.assertion(not_before_offset=30)  # issued by a clock 30 s ahead of ours
    assert xua.verify(a, idp.policy(clock_skew=dt.timedelta(seconds=60))).name_id
    refused(WsseFault.INVALID_SECURITY_TOKEN, a, idp.policy(clock_skew=dt.timedelta(seconds=5)))


def test_subject_confirmation_window_is_checked(idp: saml.TestIdp) -> None:
    a = idp.unsigned()
    scd = a.find(f".//{{{SAML2}}}SubjectConfirmationData")
    assert scd is not None
    scd.set("NotOnOrAfter", "2001-01-01T00:00:00Z")
    e = refused(WsseFault.INVALID_SECURITY_TOKEN, idp.sign(a), idp.policy())
    assert "SubjectConfirmationData" in e.reason


def test_wrong_audience(idp: saml.TestIdp) -> None:
    e = refused(WsseFault.INVALID_SECURITY_TOKEN,
                idp.assertion(audience="https://other.example.org"), idp.policy())
    assert "Audience" in e.reason


def test_unsigned(idp: saml.TestIdp) -> None:
    refused(WsseFault.FAILED_AUTHENTICATION, saml.strip_placeholder(idp.unsigned()),
            idp.policy())


def test_signed_by_an_untrusted_key(idp: saml.TestIdp, rogue: saml.TestIdp) -> None:
    refused(WsseFault.FAILED_AUTHENTICATION, rogue.assertion(), idp.policy())


def test_tampered_after_signing(idp: saml.TestIdp) -> None:
    refused(WsseFault.FAILED_CHECK, saml.tampered(idp.assertion()), idp.policy())


def test_signature_wrapping_moved_original(idp: saml.TestIdp) -> None:
    signed = idp.assertion()
    evil = idp.unsigned(name_id="mallory@evil.example")
    refused(WsseFault.INVALID_SECURITY, saml.wrapped(signed, evil), idp.policy())
    refused(WsseFault.INVALID_SECURITY, saml.wrapped(signed, evil, same_id=True), idp.policy())


def test_sha1_and_inclusive_c14n_are_refused(idp: saml.TestIdp) -> None:
    a = idp.sign(idp.unsigned(), c14n="http://www.w3.org/2006/12/xml-c14n11")
    refused(WsseFault.UNSUPPORTED_ALGORITHM, a, idp.policy())
    a = idp.sign(idp.unsigned(), digest="sha512")
    refused(WsseFault.UNSUPPORTED_ALGORITHM, a, idp.policy())


def test_hostile_bytes_are_refused_without_parsing_a_dtd(idp: saml.TestIdp) -> None:
    bomb = (b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxx">]>'
            b'<saml2:Assertion xmlns:saml2="urn:oasis:names:tc:SAML:2.0:assertion">&x;'
            b'</saml2:Assertion>')
    refused(WsseFault.INVALID_SECURITY_TOKEN, bomb, idp.policy())
    big = etree.tostring(idp.assertion()).replace(
        b"Gregory House", b"G" * (xua.MAX_ASSERTION_BYTES + 1))
    refused(WsseFault.INVALID_SECURITY_TOKEN, big, idp.policy())


def test_not_enabled_without_trusted_certificates(idp: saml.TestIdp) -> None:
    refused(WsseFault.FAILED_AUTHENTICATION, idp.assertion(), XuaPolicy())


# --- check_security: the header blocks of a request ------------------------------------------

def test_check_security_valid_and_absent(idp: saml.TestIdp) -> None:
    policy = idp.policy()
    s = xua.check_security((saml.security_header(idp.assertion()),), "/xca/responding", policy)
    assert s is not None and s.subject_id == "Gregory House"
    assert xua.check_security((), "/xca/responding", policy) is None


def test_missing_assertion_where_required(idp: saml.TestIdp) -> None:
    policy = idp.policy(required_endpoints=frozenset({"/xca/responding"}))
    with pytest.raises(XuaError) as info:
        xua.check_security((), "/xca/responding", policy)
    assert info.value.code == WsseFault.INVALID_SECURITY
    assert xua.check_security((), "/xds/registry", policy) is None
    with pytest.raises(XuaError):
        xua.check_security((saml.security_header(),), "/xca/responding", policy)


def test_unsigned_assertion_beside_a_signed_one(idp: saml.TestIdp) -> None:
    evil = saml.strip_placeholder(idp.unsigned(name_id="mallory@evil.example"))
    for order in ((evil, idp.assertion()), (idp.assertion(), evil)):
        with pytest.raises(XuaError) as info:
            xua.check_security((saml.security_header(*order),), "/xds/registry", idp.policy())
        assert info.value.code == WsseFault.INVALID_SECURITY


def test_two_security_headers_and_encrypted_assertions(idp: saml.TestIdp) -> None:
    h = saml.security_header(idp.assertion())
    with pytest.raises(XuaError):
        xua.check_security((h, copy.deepcopy(h)), "/xds/registry", idp.policy())
    enc = saml.security_header()
    etree.SubElement(enc, f"{{{SAML2}}}EncryptedAssertion")
    with pytest.raises(XuaError) as info:
        xua.check_security((enc,), "/xds/registry", idp.policy())
    assert info.value.code == WsseFault.UNSUPPORTED_SECURITY_TOKEN


def test_security_header_for_another_role_is_not_ours(idp: saml.TestIdp) -> None:
    h = saml.security_header(saml.tampered(idp.assertion()))
    h.set(f"{{{SOAP12}}}role", "urn:example:some-intermediary")
    assert xua.check_security((h,), "/xds/registry", idp.policy()) is None


def test_assertion_ignored_when_xua_is_not_configured(idp: saml.TestIdp) -> None:
    h = saml.security_header(idp.assertion())
    assert xua.check_security((h,), "/xds/registry", XuaPolicy()) is None


def test_fault_is_wsse_subcode_of_sender() -> None:
    f = XuaError(WsseFault.FAILED_CHECK, "x").fault()
    assert f.code == "Sender" and f.subcode == (WSSE, "FailedCheck") and f.http_status == 400
