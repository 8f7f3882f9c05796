"""XUA (IHE ITI-40) on the X-Service Provider side: the SAML 2.0 assertion of wsse:Security.

Owns `XuaPolicy` (trusted signers, audience, clock skew, where an assertion is required, built
from the [xua] configuration), `verify()` (one assertion element -> `XuaSubject`, or `XuaError`)
and `check_security()` (the envelope's header blocks -> the subject, None, or `XuaError`).

How an assertion is checked (DESIGN.md):

- the assertion is serialised on its own (at most MAX_ASSERTION_BYTES) and parsed again with
  the hardened parser, so a signature reference can only reach inside the assertion;
- its ds:Signature must be a direct child, use exclusive C14N, one Reference to "#" + the
  assertion's ID with only the enveloped-signature and exclusive C14N transforms, SHA-256
  digests and RSA-SHA256 or ECDSA-SHA256; signxml verifies it against each configured trusted
  certificate (never against a certificate the message brings);
- the element signxml reports as signed (`result.signed_xml`) must be the assertion itself
  (same ID, the only element with that ID), and every value is read from it, never from the
  message (signature wrapping);
- Conditions NotBefore/NotOnOrAfter and those of SubjectConfirmationData, with the configured
  clock skew, and every AudienceRestriction must name the configured audience.

Failures map to the WS-Security 1.1 SOAP faults (env:Sender with a wsse: subcode): a missing
or ambiguous header is wsse:InvalidSecurity, a token we cannot verify wsse:FailedAuthentication,
a broken digest wsse:FailedCheck, an expired or misaddressed one wsse:InvalidSecurityToken, an
algorithm outside the profile wsse:UnsupportedAlgorithm, an encrypted assertion
wsse:UnsupportedSecurityToken. Reasons never quote the assertion.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from lxml import etree

from gateway.ebrim.xmlsafe import parse_xml
from gateway.errors import SoapFault, SoapFaultCode
from gateway.ns import DS, SAML2, SOAP12, WSSE

if TYPE_CHECKING:
    from gateway.config import XuaConfig

log = logging.getLogger("gateway.security.xua")

MAX_ASSERTION_BYTES = 256 * 1024

EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
ENVELOPED = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
SHA256 = "http://www.w3.org/2001/04/xmlenc#sha256"
RSA_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"
ECDSA_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256"

# XUA attribute names (ITI TF-2 3.40.4.1.2).
SUBJECT_ID = "urn:oasis:names:tc:xspa:1.0:subject:subject-id"
ORGANIZATION = "urn:oasis:names:tc:xspa:1.0:subject:organization"
ORGANIZATION_ID = "urn:oasis:names:tc:xspa:1.0:subject:organization-id"
ROLE = "urn:oasis:names:tc:xacml:2.0:subject:role"
PURPOSE_OF_USE = "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse"
HOME_COMMUNITY_ID = "urn:ihe:iti:xca:2010:homeCommunityId"
RESOURCE_ID = "urn:oasis:names:tc:xacml:2.0:resource:resource-id"

_OUR_ROLES = frozenset({"", "http://www.w3.org/2003/05/soap-envelope/role/next",
                        "http://www.w3.org/2003/05/soap-envelope/role/ultimateReceiver"})


class WsseFault:
    """WS-Security 1.1 (SOAP Message Security, section 12) fault subcodes."""

    # ruff: noqa: S105 (fault names, not passwords)
    UNSUPPORTED_SECURITY_TOKEN = "UnsupportedSecurityToken"
    UNSUPPORTED_ALGORITHM = "UnsupportedAlgorithm"
    INVALID_SECURITY = "InvalidSecurity"
    INVALID_SECURITY_TOKEN = "InvalidSecurityToken"
    FAILED_AUTHENTICATION = "FailedAuthentication"
    FAILED_CHECK = "FailedCheck"


class XuaError(Exception):
    """The assertion (or its absence) is refused; `code` is a WsseFault subcode."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason

    def fault(self) -> SoapFault:
        """The SOAP 1.2 fault: env:Sender, subcode wsse:<code>."""
        return SoapFault(SoapFaultCode.SENDER, self.reason, subcode=(WSSE, self.code))


@dataclass(frozen=True)
class CodedValue:
    """An HL7 v3 CE value of a role or purpose of use (code, codeSystem, displayName)."""

    code: str
    code_system: str = ""
    display_name: str = ""


@dataclass(frozen=True)
class XuaSubject:
    """Who the verified assertion says the requester is (for authorisation and the audit)."""

    name_id: str
    name_id_format: str
    issuer: str
    assertion_id: str
    not_on_or_after: datetime
    subject_id: str | None = None
    organization: str | None = None
    organization_id: str | None = None
    home_community_id: str | None = None
    resource_id: str | None = None
    roles: tuple[CodedValue, ...] = ()
    purposes_of_use: tuple[CodedValue, ...] = ()
    # Every attribute by Name, values as text (coded values as their code).
    attributes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class XuaPolicy:
    """What the X-Service Provider accepts; `enabled` once a trusted signer is configured."""

    trusted: tuple[x509.Certificate, ...] = ()
    audience: str = ""
    clock_skew: timedelta = timedelta(seconds=60)
    required: bool = False
    required_endpoints: frozenset[str] = frozenset()

    @property
    def enabled(self) -> bool:
        return bool(self.trusted)

    def required_for(self, endpoint: str) -> bool:
        return self.required or endpoint in self.required_endpoints

    @classmethod
    def from_config(cls, cfg: XuaConfig | None) -> XuaPolicy:
        if cfg is None:
            return cls()
        return cls(trusted=load_certificates(cfg.trusted_certificates), audience=cfg.audience,
                   clock_skew=timedelta(seconds=cfg.clock_skew_seconds),
                   required=cfg.required, required_endpoints=frozenset(cfg.required_endpoints))


def load_certificates(paths: Iterable[Path]) -> tuple[x509.Certificate, ...]:
    """Every certificate of the PEM files `paths` (a file may hold several)."""
    certs: list[x509.Certificate] = []
    for path in paths:
        certs.extend(x509.load_pem_x509_certificates(Path(path).read_bytes()))
    return tuple(certs)


# --- helpers -----------------------------------------------------------------------------------

def _q(ns: str, local: str) -> str:
    return f"{{{ns}}}{local}"


def _parse_time(value: str | None, what: str) -> datetime | None:
    if value is None:
        return None
    text = value.strip()
    try:
        t = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        raise XuaError(WsseFault.INVALID_SECURITY_TOKEN, f"{what} is not an xs:dateTime") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _check_window(el: etree._Element, what: str, now: datetime, skew: timedelta) -> None:
    not_before = _parse_time(el.get("NotBefore"), f"{what}/@NotBefore")
    not_after = _parse_time(el.get("NotOnOrAfter"), f"{what}/@NotOnOrAfter")
    if not_before is not None and now + skew < not_before:
        raise XuaError(WsseFault.INVALID_SECURITY_TOKEN, f"The assertion is not yet valid ({what})")
    if not_after is not None and now - skew >= not_after:
        raise XuaError(WsseFault.INVALID_SECURITY_TOKEN, f"The assertion has expired ({what})")


def _text(el: etree._Element | None) -> str:
    return (el.text or "").strip() if el is not None else ""


def _attribute_values(attr: etree._Element) -> list[str | CodedValue]:
    values: list[str | CodedValue] = []
    for v in attr.iterchildren(_q(SAML2, "AttributeValue")):
        coded = next((c for c in v if isinstance(c.tag, str) and c.get("code") is not None), None)
        if coded is not None:
            values.append(CodedValue(coded.get("code") or "", coded.get("codeSystem") or "",
                                     coded.get("displayName") or ""))
        else:
            values.append((v.text or "").strip())
    return values


def _check_signature_profile(signature: etree._Element, assertion_id: str) -> None:
    """The algorithms and the single reference XUA allows, before any cryptography."""
    signed_info = signature.find(_q(DS, "SignedInfo"))
    if signed_info is None:
        raise XuaError(WsseFault.INVALID_SECURITY, "The assertion signature has no SignedInfo")
    c14n = signed_info.find(_q(DS, "CanonicalizationMethod"))
    if c14n is None or c14n.get("Algorithm") != EXC_C14N:
        raise XuaError(WsseFault.UNSUPPORTED_ALGORITHM,
                       "The assertion signature must use exclusive C14N")
    method = signed_info.find(_q(DS, "SignatureMethod"))
    if method is None or method.get("Algorithm") not in (RSA_SHA256, ECDSA_SHA256):
        raise XuaError(WsseFault.UNSUPPORTED_ALGORITHM,
                       "The assertion signature must use RSA-SHA256 or ECDSA-SHA256")
    refs = signed_info.findall(_q(DS, "Reference"))
    if len(refs) != 1:
        raise XuaError(WsseFault.INVALID_SECURITY,
                       "The assertion signature must have exactly one Reference")
    ref = refs[0]
    if ref.get("URI") != f"#{assertion_id}":
        raise XuaError(WsseFault.INVALID_SECURITY,
                       "The assertion signature does not reference the assertion")
    for t in ref.iterfind(f"{_q(DS, 'Transforms')}/{_q(DS, 'Transform')}"):
        if t.get("Algorithm") not in (ENVELOPED, EXC_C14N):
            raise XuaError(WsseFault.UNSUPPORTED_ALGORITHM,
                           "The assertion signature uses a transform outside the profile")
    digest = ref.find(_q(DS, "DigestMethod"))
    if digest is None or digest.get("Algorithm") != SHA256:
        raise XuaError(WsseFault.UNSUPPORTED_ALGORITHM,
                       "The assertion signature must use SHA-256 digests")


def _embedded_certificates(signature: etree._Element) -> list[bytes]:
    out = []
    for el in signature.iterfind(f".//{_q(DS, 'X509Certificate')}"):
        out.append("".join((el.text or "").split()).encode("ascii", "replace"))
    return out


def _signature_config() -> Any:
    from signxml import DigestAlgorithm, SignatureConfiguration, SignatureMethod

    return SignatureConfiguration(
        require_x509=True, location="./", expect_references=1,
        signature_methods=frozenset({SignatureMethod.RSA_SHA256, SignatureMethod.ECDSA_SHA256}),
        digest_algorithms=frozenset({DigestAlgorithm.SHA256}))


def _verify_signature(root: etree._Element, trusted: Sequence[x509.Certificate]) -> etree._Element:
    """signxml against each trusted certificate (embedded ones first); the signed element."""
    import base64

    from cryptography.hazmat.primitives.serialization import Encoding
    from signxml import XMLVerifier
    from signxml.exceptions import InvalidDigest, InvalidSignature

    signature = root.find(_q(DS, "Signature"))
    assert signature is not None
    embedded = set(_embedded_certificates(signature))

    def is_embedded(cert: x509.Certificate) -> bool:
        return base64.b64encode(cert.public_bytes(Encoding.DER)) in embedded

    ordered = sorted(trusted, key=lambda c: not is_embedded(c))
    config = _signature_config()
    digest_failed = False
    for cert in ordered:
        try:
            result = XMLVerifier().verify(root, x509_cert=cert, id_attribute="ID",
                                          expect_config=config)
        except InvalidDigest:
            digest_failed = True
            continue
        except InvalidSignature as exc:
            if "Digest" in str(exc):
                digest_failed = True
            continue
        except Exception as exc:  # malformed signature structure, bad base64, ...
            log.info("XUA: assertion signature unusable: %s", type(exc).__name__)
            raise XuaError(WsseFault.INVALID_SECURITY_TOKEN,
                           "The assertion signature cannot be processed") from None
        signed = result.signed_xml  # type: ignore[union-attr]
        if not isinstance(signed, etree._Element):
            raise XuaError(WsseFault.INVALID_SECURITY, "The signature does not sign an element")
        return signed
    if digest_failed:
        raise XuaError(WsseFault.FAILED_CHECK,
                       "The assertion was changed after it was signed")
    raise XuaError(WsseFault.FAILED_AUTHENTICATION,
                   "The assertion is not signed by a trusted issuer")


# --- verification ------------------------------------------------------------------------------

def verify(assertion: etree._Element | bytes, policy: XuaPolicy, *,
           now: datetime | None = None) -> XuaSubject:
    """Check one saml:Assertion (element or bytes) against `policy`; the subject or XuaError."""
    if not policy.enabled:
        raise XuaError(WsseFault.FAILED_AUTHENTICATION,
                       "This gateway has no trusted assertion issuer configured")
    now = (now or datetime.now(UTC)).astimezone(UTC)
    data = assertion if isinstance(assertion, bytes) else etree.tostring(assertion)
    if len(data) > MAX_ASSERTION_BYTES:
        raise XuaError(WsseFault.INVALID_SECURITY_TOKEN,
                       f"The assertion is larger than {MAX_ASSERTION_BYTES} bytes")
    try:
        root = parse_xml(data)
    except ValueError:
        raise XuaError(WsseFault.INVALID_SECURITY_TOKEN,
                       "The assertion is not well-formed XML without a DTD") from None
    if root.tag != _q(SAML2, "Assertion"):
        raise XuaError(WsseFault.UNSUPPORTED_SECURITY_TOKEN, "Expected a SAML 2.0 Assertion")
    assertion_id = root.get("ID") or ""
    if not assertion_id:
        raise XuaError(WsseFault.INVALID_SECURITY_TOKEN, "The assertion has no ID")
    signatures = root.findall(_q(DS, "Signature"))
    if not signatures:
        raise XuaError(WsseFault.FAILED_AUTHENTICATION, "The assertion is not signed")
    if len(signatures) > 1:
        raise XuaError(WsseFault.INVALID_SECURITY, "The assertion has more than one signature")
    same_id = root.xpath("//*[@ID=$id]", id=assertion_id)
    if not isinstance(same_id, list) or len(same_id) != 1:
        raise XuaError(WsseFault.INVALID_SECURITY, "The assertion ID is not unique")
    _check_signature_profile(signatures[0], assertion_id)
    signed = _verify_signature(root, policy.trusted)
    # Everything below reads the signed element only.
    if signed.tag != _q(SAML2, "Assertion") or signed.get("ID") != assertion_id:
        raise XuaError(WsseFault.INVALID_SECURITY,
                       "The signed element is not the assertion presented")
    return _subject(signed, policy, now)


def _subject(a: etree._Element, policy: XuaPolicy, now: datetime) -> XuaSubject:
    if a.get("Version") != "2.0":
        raise XuaError(WsseFault.UNSUPPORTED_SECURITY_TOKEN, "Expected SAML Version 2.0")
    conditions = a.find(_q(SAML2, "Conditions"))
    if conditions is None or conditions.get("NotOnOrAfter") is None:
        raise XuaError(WsseFault.INVALID_SECURITY_TOKEN,
                       "The assertion has no Conditions/@NotOnOrAfter")
    _check_window(conditions, "Conditions", now, policy.clock_skew)
    restrictions = conditions.findall(_q(SAML2, "AudienceRestriction"))
    if policy.audience:
        if not restrictions:
            raise XuaError(WsseFault.INVALID_SECURITY_TOKEN,
                           "The assertion has no AudienceRestriction")
        for r in restrictions:
            if policy.audience not in {_text(x) for x in r.iterchildren(_q(SAML2, "Audience"))}:
                raise XuaError(WsseFault.INVALID_SECURITY_TOKEN,
                               "The assertion is not addressed to this gateway (Audience)")
    subject = a.find(_q(SAML2, "Subject"))
    name_id = subject.find(_q(SAML2, "NameID")) if subject is not None else None
    if subject is None or name_id is None or not _text(name_id):
        raise XuaError(WsseFault.INVALID_SECURITY_TOKEN, "The assertion has no Subject/NameID")
    for data in subject.iterfind(
            f"{_q(SAML2, 'SubjectConfirmation')}/{_q(SAML2, 'SubjectConfirmationData')}"):
        _check_window(data, "SubjectConfirmationData", now, policy.clock_skew)
    issuer = _text(a.find(_q(SAML2, "Issuer")))
    if not issuer:
        raise XuaError(WsseFault.INVALID_SECURITY_TOKEN, "The assertion has no Issuer")
    attributes: dict[str, list[str | CodedValue]] = {}
    for attr in a.iterfind(f"{_q(SAML2, 'AttributeStatement')}/{_q(SAML2, 'Attribute')}"):
        attributes.setdefault(attr.get("Name") or "", []).extend(_attribute_values(attr))

    def first(name: str) -> str | None:
        return next((v for v in attributes.get(name, ()) if isinstance(v, str) and v), None)

    def coded(name: str) -> tuple[CodedValue, ...]:
        return tuple(v if isinstance(v, CodedValue) else CodedValue(v)
                     for v in attributes.get(name, ()) if v)

    not_after = _parse_time(conditions.get("NotOnOrAfter"), "NotOnOrAfter")
    assert not_after is not None
    return XuaSubject(
        name_id=_text(name_id), name_id_format=name_id.get("Format") or "", issuer=issuer,
        assertion_id=a.get("ID") or "", not_on_or_after=not_after,
        subject_id=first(SUBJECT_ID), organization=first(ORGANIZATION),
        organization_id=first(ORGANIZATION_ID), home_community_id=first(HOME_COMMUNITY_ID),
        resource_id=first(RESOURCE_ID), roles=coded(ROLE), purposes_of_use=coded(PURPOSE_OF_USE),
        attributes={k: tuple(v.code if isinstance(v, CodedValue) else v for v in vs)
                    for k, vs in attributes.items()})


def check_security(headers: Sequence[etree._Element], endpoint: str, policy: XuaPolicy, *,
                   now: datetime | None = None) -> XuaSubject | None:
    """The XUA subject of a request's header blocks, None when there is none to check, or
    XuaError (missing where `endpoint` requires one, or any assertion that fails `verify`)."""
    blocks = [h for h in headers if h.tag == _q(WSSE, "Security")
              and (h.get(_q(SOAP12, "role")) or "").strip() in _OUR_ROLES]
    required = policy.required_for(endpoint)
    if len(blocks) > 1:
        raise XuaError(WsseFault.INVALID_SECURITY, "More than one wsse:Security header for "
                                                   "this node")
    children = [c for c in blocks[0] if isinstance(c.tag, str)] if blocks else []
    if any(c.tag == _q(SAML2, "EncryptedAssertion") for c in children):
        raise XuaError(WsseFault.UNSUPPORTED_SECURITY_TOKEN,
                       "Encrypted assertions are not supported")
    assertions = [c for c in children if c.tag == _q(SAML2, "Assertion")]
    if not assertions:
        if required:
            raise XuaError(WsseFault.INVALID_SECURITY, f"{endpoint} requires a XUA assertion "
                           "(SAML 2.0 in wsse:Security)")
        return None
    if len(assertions) > 1:
        raise XuaError(WsseFault.INVALID_SECURITY,
                       "wsse:Security holds more than one SAML assertion")
    if not policy.enabled:
        # Not an X-Service Provider: the assertion is neither checked nor used.
        log.debug("XUA: assertion ignored, no trusted issuer configured")
        return None
    return verify(assertions[0], policy, now=now)
