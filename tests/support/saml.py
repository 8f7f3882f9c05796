"""A test identity provider: XUA SAML 2.0 assertions signed with signxml, and the envelopes
that carry them in wsse:Security (plus the hostile variants the tests need)."""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from signxml import XMLSigner

from gateway.ns import DS, SAML2, SOAP12, WSA, WSSE
from gateway.security import xua

AUDIENCE = "https://gateway.example.org/xca"
HL7 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"


def _q(ns: str, local: str) -> str:
    return f"{{{ns}}}{local}"


@dataclass
class TestIdp:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "Test IdP", *, ecdsa: bool = False) -> TestIdp:
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
            ec.generate_private_key(ec.SECP256R1()) if ecdsa
            else rsa.generate_private_key(public_exponent=65537, key_size=2048))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write_cert(self, path: Path) -> Path:
        path.write_bytes(self.cert_pem)
        return path

    def policy(self, **kw: object) -> xua.XuaPolicy:
        return xua.XuaPolicy(trusted=(self.cert,), audience=AUDIENCE, **kw)  # type: ignore[arg-type]

    # --- assertions --------------------------------------------------------------------------

    def unsigned(self, *, now: dt.datetime | None = None, lifetime: int = 300,
                 not_before_offset: int = -5, audience: str = AUDIENCE,
                 name_id: str = "dr.house@hospital.example.org",
                 assertion_id: str | None = None) -> etree._Element:
        now = now or dt.datetime.now(dt.UTC)

        def ts(t: dt.datetime) -> str:
            return t.strftime("%Y-%m-%dT%H:%M:%SZ")

        a = etree.Element(_q(SAML2, "Assertion"), nsmap={"saml2": SAML2, "xsi": XSI})
        a.set("ID", assertion_id or f"_{uuid.uuid4().hex}")
        a.set("Version", "2.0")
        a.set("IssueInstant", ts(now))
        etree.SubElement(a, _q(SAML2, "Issuer")).text = "https://idp.example.org"
        subject = etree.SubElement(a, _q(SAML2, "Subject"))
        nid = etree.SubElement(subject, _q(SAML2, "NameID"))
        nid.set("Format", "urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress")
        nid.text = name_id
        sc = etree.SubElement(subject, _q(SAML2, "SubjectConfirmation"))
        sc.set("Method", "urn:oasis:names:tc:SAML:2.0:cm:bearer")
        scd = etree.SubElement(sc, _q(SAML2, "SubjectConfirmationData"))
        scd.set("NotOnOrAfter", ts(now + dt.timedelta(seconds=lifetime)))
        cond = etree.SubElement(a, _q(SAML2, "Conditions"))
        cond.set("NotBefore", ts(now + dt.timedelta(seconds=not_before_offset)))
        cond.set("NotOnOrAfter", ts(now + dt.timedelta(seconds=lifetime)))
        etree.SubElement(etree.SubElement(cond, _q(SAML2, "AudienceRestriction")),
                         _q(SAML2, "Audience")).text = audience
        authn = etree.SubElement(a, _q(SAML2, "AuthnStatement"))
        authn.set("AuthnInstant", ts(now))
        etree.SubElement(etree.SubElement(authn, _q(SAML2, "AuthnContext")),
                         _q(SAML2, "AuthnContextClassRef")).text = (
            "urn:oasis:names:tc:SAML:2.0:ac:classes:X509")
        stmt = etree.SubElement(a, _q(SAML2, "AttributeStatement"))

        def attr(name: str, value: str | None = None, coded: tuple[str, str, str, str] | None = None
                 ) -> None:
            at = etree.SubElement(stmt, _q(SAML2, "Attribute"))
            at.set("Name", name)
            v = etree.SubElement(at, _q(SAML2, "AttributeValue"))
            if coded is None:
                v.text = value
            else:
                local, code, system, display = coded
                c = etree.SubElement(v, _q(HL7, local), nsmap={"hl7": HL7})
                c.set(_q(XSI, "type"), "hl7:CE")
                c.set("code", code)
                c.set("codeSystem", system)
                c.set("displayName", display)

        attr(xua.SUBJECT_ID, "Gregory House")
        attr(xua.ORGANIZATION, "Princeton-Plainsboro Teaching Hospital")
        attr(xua.ORGANIZATION_ID, "urn:oid:1.2.3.4.5")
        attr(xua.HOME_COMMUNITY_ID, "urn:oid:1.2.3.4")
        attr(xua.ROLE, coded=("Role", "309343006", "2.16.840.1.113883.6.96", "Physician"))
        attr(xua.PURPOSE_OF_USE, coded=("PurposeOfUse", "TREATMENT",
                                        "2.16.840.1.113883.3.18.7.1", "Treatment"))
        attr(xua.RESOURCE_ID, "PID-1^^^&1.2.3&ISO")
        # SAML's schema puts ds:Signature right after Issuer; signxml fills the placeholder.
        a.insert(1, etree.Element(f"{{{DS}}}Signature", Id="placeholder", nsmap={"ds": DS}))
        return a

    def sign(self, assertion: etree._Element, *, c14n: str = xua.EXC_C14N,
             signature_algorithm: str = "rsa-sha256", digest: str = "sha256") -> etree._Element:
        if isinstance(self.key, ec.EllipticCurvePrivateKey) and signature_algorithm == "rsa-sha256":
            signature_algorithm = "ecdsa-sha256"
        signer = XMLSigner(signature_algorithm=signature_algorithm, digest_algorithm=digest,
                           c14n_algorithm=c14n)
        signed = signer.sign(assertion, key=self.key, cert=[self.cert],
                             reference_uri=assertion.get("ID"), id_attribute="ID")
        return signed

    def assertion(self, **kw: object) -> etree._Element:
        return self.sign(self.unsigned(**kw))  # type: ignore[arg-type]


def strip_placeholder(a: etree._Element) -> etree._Element:
    for ph in a.findall(f"{{{DS}}}Signature[@Id='placeholder']"):
        a.remove(ph)
    return a


def tampered(signed: etree._Element) -> etree._Element:
    """The signed assertion with its NameID changed afterwards."""
    a = copy.deepcopy(signed)
    a.find(f"{_q(SAML2, 'Subject')}/{_q(SAML2, 'NameID')}").text = "mallory@evil.example"  # type: ignore[union-attr]
    return a


def wrapped(signed: etree._Element, evil: etree._Element, *, same_id: bool = False
            ) -> etree._Element:
    """Classic wrapping: the evil (unsigned) assertion carries the genuine signature, and the
    signed original is moved inside it (in saml:Advice), where the signature's "#ID" reference
    still finds it. With `same_id` the outer assertion also takes the original's ID."""
    outer = copy.deepcopy(strip_placeholder(evil))
    original = copy.deepcopy(signed)
    sig = original.find(f"{{{DS}}}Signature")
    assert sig is not None
    original.remove(sig)
    outer.insert(1, sig)
    etree.SubElement(outer, _q(SAML2, "Advice")).append(original)
    if same_id:
        outer.set("ID", original.get("ID") or "")
    return outer


def security_header(*assertions: etree._Element, must_understand: bool = True
                    ) -> etree._Element:
    sec = etree.Element(_q(WSSE, "Security"), nsmap={"wsse": WSSE, "env": SOAP12})
    if must_understand:
        sec.set(_q(SOAP12, "mustUnderstand"), "true")
    for a in assertions:
        sec.append(copy.deepcopy(a))
    return sec


def envelope(body: etree._Element, action: str, *headers: etree._Element) -> bytes:
    env = etree.Element(_q(SOAP12, "Envelope"), nsmap={"env": SOAP12, "wsa": WSA})
    h = etree.SubElement(env, _q(SOAP12, "Header"))
    etree.SubElement(h, _q(WSA, "Action")).text = action
    etree.SubElement(h, _q(WSA, "MessageID")).text = f"urn:uuid:{uuid.uuid4()}"
    for extra in headers:
        h.append(copy.deepcopy(extra))
    etree.SubElement(env, _q(SOAP12, "Body")).append(copy.deepcopy(body))
    return etree.tostring(env, xml_declaration=True, encoding="UTF-8")
