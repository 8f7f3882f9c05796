"""The configuration contract: one TOML file -> frozen dataclasses, validated once at start.

Every key is documented in config/gateway.example.toml. An unknown key, a missing required
key or a value of the wrong type or range raises `ConfigError` naming the key
(`[tls] certificate: file not found: ...`), so a bad file fails fast and says what to fix.
Relative paths are taken relative to the folder of the configuration file.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5: no backslash, 16 chars max


# The two orders of the gateway's MTOM replies ([pacs] / [xca] response_order).
ROOT_FIRST = "root-first"
ROOT_LAST = "root-last"


class ConfigError(ValueError):
    """The configuration is wrong; the message names the key."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8443
    workers: int = 2
    threads: int = 4
    max_request_bytes: int = 1024 * 1024 * 1024  # whole HTTP body, MTOM included
    max_envelope_bytes: int = 64 * 1024 * 1024  # the SOAP envelope part alone
    request_timeout_seconds: int = 300
    spool_directory: Path | None = None  # None: the system temp folder
    header_timeout_seconds: int = 10  # TLS handshake + request head, from the connection
    body_timeout_seconds: int = 30  # request body, from the end of the head ...
    min_body_rate_bytes_per_second: int = 4096  # ... plus 1 s per this many bytes received
    send_timeout_seconds: int = 60  # each response send makes progress within this ...
    min_send_rate_bytes_per_second: int = 4096  # ... and waits for the client at most that
    # plus 1 s per this many bytes sent (0: no overall bound)


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = True
    certificate: Path | None = None
    private_key: Path | None = None
    ca_bundle: Path | None = None
    require_client_certificate: bool = True


@dataclass(frozen=True)
class CommunityConfig:
    home_community_id: str = ""  # urn:oid:...
    repository_unique_id: str = ""
    imaging_source_unique_id: str = ""
    patient_id_assigning_authority: str = ""  # OID of the affinity domain's patient ids
    # ITI-18 endpoint (https://) of this community's Document Registry that the Responding
    # Gateway queries for ITI-38; empty: the built-in registry.
    registry_url: str = ""


@dataclass(frozen=True)
class RegistryConfig:
    database: str = ""  # default set by load(): sqlite:///<config dir>/var/registry.db
    max_results: int = 1000


@dataclass(frozen=True)
class RepositoryConfig:
    directory: Path = Path("var/repository")


@dataclass(frozen=True)
class PacsConfig:
    host: str = "127.0.0.1"
    port: int = 4242
    called_ae_title: str = "ORTHANC"
    calling_ae_title: str = "XDSI-GW"
    retrieve: str = "c-get"
    move_destination_ae_title: str = "XDSI-GW"
    move_port: int = 11112
    associations: int = 3  # parallel associations per RAD-69 retrieve
    timeout_seconds: int = 30  # bound on every wait for the PACS (connect, DIMSE, network)
    # DICOM TLS (PS3.15 B.1, ATNA): every association to the PACS runs over mutual TLS 1.2+,
    # and the C-MOVE storage SCP accepts only TLS. Defaults taken from [tls] by from_dict().
    tls: bool = False
    tls_ca_bundle: Path | None = None  # CA(s) the PACS certificate must chain to
    tls_certificate: Path | None = None  # our client certificate
    tls_private_key: Path | None = None
    tls_server_name: str = ""  # name checked in the PACS certificate; default: host
    # RAD-69 response: "root-first" (the root XML part first, written once the retrieve has
    # ended; every MTOM client reads it) or "root-last" (each instance streamed as it arrives
    # from the PACS, the root part last and named by `start`; clients that take the first
    # part as the envelope, zeep among them, cannot read it). gateway.imaging.rad69.
    response_order: str = "root-first"
    # DICOM upper layer: "builtin" (gateway.dicom.ul, cget, cfind, cmove, scp: no DUL thread)
    # or "pynetdicom"
    dimse_engine: str = "builtin"
    # A series the request names in full is fetched with one SERIES-level request over one
    # association (built-in engine, C-GET or C-MOVE; gateway.imaging.plan); false: UID lists
    # spread over all `associations`, every instance looked up first.
    series_level_retrieve: bool = True


@dataclass(frozen=True)
class PublishConfig:
    """The KOS manifest publisher (`xdsi-gateway publish`)."""

    repository_url: str = ""  # ITI-41 endpoint (https://); empty: the built-in repository
    registry_url: str = ""  # ITI-18 endpoint of that remote registry (required with it)
    wado_rs_base: str = ""  # WADO-RS base for Retrieve URL in the manifests; empty: none
    source_id: str = ""  # submission set sourceId (OID); default: imaging_source_unique_id
    issuer_of_patient_id: str = ""  # (0010,0021); default: patient_id_assigning_authority
    source_patient_id_authority: str = ""  # OID of the PACS's own patient ids; default: domain
    accession_number_authority: str = ""  # OID of the accession numbers' issuer
    placer_order_authority: str = ""  # OID of the placer order numbers' issuer
    institution_name: str = ""
    retrieve_ae_title: str = ""  # Retrieve AE Title in the manifests; default: called_ae_title
    class_code: str = "IMAGES | 1.3.6.1.4.1.19376.1.2.6.1 | Images"
    type_code: str = "18748-4 | 2.16.840.1.113883.6.1 | Diagnostic imaging study"
    confidentiality_code: str = "N | 2.16.840.1.113883.5.25 | normal"
    healthcare_facility_type_code: str = \
        "RADDX | 2.16.840.1.113883.5.10588 | Radiology diagnostics or therapeutics unit"
    practice_setting_code: str = "394914008 | 2.16.840.1.113883.6.96 | Radiology"
    content_type_code: str = "IMAGES | 1.3.6.1.4.1.19376.1.2.6.1 | Images"
    modality_coding_scheme: str = "DCM"
    region_coding_scheme: str = "SCT"
    # [publish.body_parts] BODYPART = "code | meaning": added to / replacing the built-in map.
    body_parts: tuple[tuple[str, str], ...] = ()
    pacs_timeout_seconds: int = 30


@dataclass(frozen=True)
class AuditConfig:
    """ATNA audit records (ITI-20) to an Audit Record Repository (gateway.security.audit)."""

    transport: str = "none"  # "tls" (RFC 5425, mutual TLS with [tls]), "udp" (RFC 5426), "none"
    host: str = "127.0.0.1"
    port: int = 0  # 0: 6514 for tls, 514 for udp
    server_name: str = ""  # host name expected in the repository's certificate; default: host
    spool_directory: Path | None = None  # default: var/audit-spool beside the configuration
    app_name: str = "xdsi-gateway"  # syslog APP-NAME
    audit_source_id: str = ""  # AuditSourceID; default: [community] home_community_id
    enterprise_site_id: str = ""  # AuditEnterpriseSiteID; empty: left out
    max_spool_records: int = 100_000  # records waiting beyond this are dropped, loudly
    max_spool_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class XuaConfig:
    """XUA (ITI-40): SAML assertions in wsse:Security checked by gateway.security.xua."""

    required: bool = False  # every SOAP endpoint requires an assertion
    required_endpoints: tuple[str, ...] = ()  # or only these endpoint paths
    trusted_certificates: tuple[Path, ...] = ()  # PEM files of the trusted assertion signers
    audience: str = ""  # the Audience every assertion must name (required with certificates)
    clock_skew_seconds: int = 60
    # The initiating gateways forward the consumer's wsse:Security header; when the consumer
    # sent none, this file (a saml:Assertion, or a whole wsse:Security element) is sent.
    outbound_assertion: Path | None = None


@dataclass(frozen=True)
class LimitsConfig:
    """Per-request bounds against hostile or runaway input (gateway.security.limits)."""

    max_xml_elements: int = 1_000_000  # markup ('<') in the SOAP envelope, counted before parsing
    max_documents_per_request: int = 1000  # ITI-41 Documents, ITI-41/42 ExtrinsicObjects
    max_document_requests: int = 1000  # DocumentRequests of ITI-43/39, RAD-69/75
    max_query_slots: int = 100  # Slots of one AdhocQuery (ITI-18/38)
    max_query_values: int = 2000  # Values over all Slots of one AdhocQuery


@dataclass(frozen=True)
class XcaConfig:
    """The initiating gateways' outbound traffic (gateway.xca): timeouts and parallelism."""

    connect_timeout_seconds: int = 5  # TCP + TLS connect to a remote community
    query_timeout_seconds: int = 30  # bound on one community's ITI-38 answer
    retrieve_timeout_seconds: int = 300  # bound on one community's ITI-39 / RAD-75 answer
    max_parallel: int = 10  # communities asked at once by one request
    # Order of the MTOM replies of the XCA gateways (initiating RAD-69 / ITI-43 answers,
    # responding RAD-75): "root-first", "root-last" (streamed, root part last), or "" to
    # follow [pacs] response_order (gateway.xca.initiating, gateway.xca.responding_imaging).
    response_order: str = ""
    # Root-first, one community whose reply is root-first: pass its parts through as they
    # arrive (its root names them all before they come, so if it then breaks off, the answer
    # is broken off too) instead of storing the whole reply first (then a failure is
    # XDSUnavailableCommunity in a complete answer, ITI TF-2b 3.39.4.1.3).
    pipe_root_first: bool = False


@dataclass(frozen=True)
class RemoteCommunity:
    home_community_id: str
    query_url: str = ""
    retrieve_url: str = ""
    imaging_retrieve_url: str = ""
    # Patient id cross-reference, local CX -> this community's CX: a CSV file of
    # "local_cx,remote_cx" lines and/or an inline table; merged into `patient_ids` by
    # from_dict() (the inline table wins). Empty: the local id is sent unchanged.
    patient_id_map: Path | None = None
    patient_ids: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RemoteSource:
    """A remote Document Repository ([[repositories]], ITI-43) or Imaging Document Source
    ([[imaging_sources]], RAD-69) of this community, behind the Responding Gateways."""

    unique_id: str  # its repositoryUniqueId (OID)
    retrieve_url: str  # its ITI-43 / RAD-69 endpoint (https://)


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    community: CommunityConfig = field(default_factory=CommunityConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    repository: RepositoryConfig = field(default_factory=RepositoryConfig)
    pacs: PacsConfig = field(default_factory=PacsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    xua: XuaConfig = field(default_factory=XuaConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    xca: XcaConfig = field(default_factory=XcaConfig)
    communities: tuple[RemoteCommunity, ...] = ()
    repositories: tuple[RemoteSource, ...] = ()  # remote ITI-43 repositories of our community
    imaging_sources: tuple[RemoteSource, ...] = ()  # remote RAD-69 sources of our community
    source: Path | None = None  # the file this was read from


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "tls": TlsConfig,
    "community": CommunityConfig,
    "registry": RegistryConfig,
    "repository": RepositoryConfig,
    "pacs": PacsConfig,
    "audit": AuditConfig,
    "xua": XuaConfig,
    "limits": LimitsConfig,
    "publish": PublishConfig,
    "xca": XcaConfig,
}


def _coerce(where: str, value: Any, annotation: str, base: Path) -> Any:
    """Check `value` against a dataclass field's (string) annotation and convert paths."""
    kinds = {a.strip() for a in annotation.split("|")}
    if value is None:
        raise ConfigError(f"{where}: a value is required")
    if "Path" in kinds:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path (a non-empty string)")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base / p)
    if annotation in ("tuple[Path, ...]", "tuple[str, ...]"):  # an array of paths / strings
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where}: expected an array of non-empty strings")
        if annotation == "tuple[str, ...]":
            return tuple(value)
        return tuple(p if p.is_absolute() else base / p
                     for p in (Path(v).expanduser() for v in value))
    if annotation.startswith("tuple[tuple[str, str]"):  # a table of strings
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ConfigError(f"{where}: expected a table of strings (KEY = \"value\")")
        return tuple(sorted(value.items()))
    if "bool" in kinds:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if "int" in kinds:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return value
    if "str" in kinds:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {annotation}")  # pragma: no cover


def _section(name: str, cls: type, raw: Any, base: Path) -> Any:
    """One table -> `cls`; `name` is a section name or a full label like `[[communities]] #2`."""
    label = name if name.startswith("[") else f"[{name}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a table")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(
                f"{label} {key}: unknown key (known: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(f"{label} {key}", value, str(known[key].type), base)
    for f in known.values():
        if f.name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{label} {f.name}: required")
    return cls(**kwargs)


def _sqlite_relative_to(url: str, base: Path) -> str:
    """`sqlite:///var/x.db` (a relative file) -> `sqlite:////<base>/var/x.db`."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return url
    path, sep, query = url[len(prefix):].partition("?")
    if not path or path.startswith("/") or path == ":memory:" or path.startswith("file:"):
        return url
    expanded = Path(path).expanduser()
    resolved = expanded if expanded.is_absolute() else base / expanded
    return f"{prefix}{resolved}{sep}{query}"


def _check_oid(where: str, value: str, *, urn: bool = False) -> None:
    text = value.removeprefix("urn:oid:") if urn else value
    if urn and not value.startswith("urn:oid:"):
        raise ConfigError(f"{where}: expected urn:oid:<OID>, got {value!r}")
    if not OID.match(text) or len(text) > 64:
        raise ConfigError(f"{where}: not an OID: {value!r}")


def validate(cfg: GatewayConfig) -> None:
    """Cross-field rules; raises ConfigError naming the key."""
    s = cfg.server
    if not 0 < s.port < 65536:
        raise ConfigError(f"[server] port: {s.port} is not a TCP port")
    if not 1 <= s.workers <= 64:
        raise ConfigError("[server] workers: expected 1 to 64")
    if not 1 <= s.threads <= 256:
        raise ConfigError("[server] threads: expected 1 to 256")
    if s.max_request_bytes < 1024:
        raise ConfigError("[server] max_request_bytes: expected at least 1024")
    if not 1024 <= s.max_envelope_bytes <= s.max_request_bytes:
        raise ConfigError("[server] max_envelope_bytes: expected 1024 to max_request_bytes")
    if s.request_timeout_seconds < 1:
        raise ConfigError("[server] request_timeout_seconds: expected at least 1")
    if not 1 <= s.header_timeout_seconds <= 3600:
        raise ConfigError("[server] header_timeout_seconds: expected 1 to 3600")
    if not 1 <= s.body_timeout_seconds <= 86400:
        raise ConfigError("[server] body_timeout_seconds: expected 1 to 86400")
    if s.min_body_rate_bytes_per_second < 0:
        raise ConfigError("[server] min_body_rate_bytes_per_second: expected 0 or more")
    if not 1 <= s.send_timeout_seconds <= 3600:
        raise ConfigError("[server] send_timeout_seconds: expected 1 to 3600")
    if s.min_send_rate_bytes_per_second < 0:
        raise ConfigError("[server] min_send_rate_bytes_per_second: expected 0 or more")
    if s.spool_directory is not None and not s.spool_directory.is_dir():
        raise ConfigError(f"[server] spool_directory: not a folder: {s.spool_directory}")
    t = cfg.tls
    if t.enabled:
        for key in ("certificate", "private_key", "ca_bundle"):
            path = getattr(t, key)
            if key == "ca_bundle" and path is None and not t.require_client_certificate:
                continue
            if path is None:
                raise ConfigError(f"[tls] {key}: required when TLS is enabled")
            if not path.is_file():
                raise ConfigError(f"[tls] {key}: file not found: {path}")
    elif t.require_client_certificate and any(
            getattr(t, k) is not None for k in ("certificate", "private_key")):
        raise ConfigError("[tls] enabled: false, but certificate/private_key are set")
    c = cfg.community
    if not c.home_community_id:
        raise ConfigError("[community] home_community_id: required")
    _check_oid("[community] home_community_id", c.home_community_id, urn=True)
    for key in ("repository_unique_id", "imaging_source_unique_id",
                "patient_id_assigning_authority"):
        value = getattr(c, key)
        if not value:
            raise ConfigError(f"[community] {key}: required")
        _check_oid(f"[community] {key}", value)
    db = cfg.registry.database
    if not (db.startswith("sqlite:///") or db.startswith("postgresql://")
            or db.startswith("postgresql+psycopg://")):
        raise ConfigError(
            f"[registry] database: expected sqlite:///PATH or postgresql://..., got {db!r}")
    if cfg.registry.max_results < 1:
        raise ConfigError("[registry] max_results: expected at least 1")
    p = cfg.pacs
    if p.retrieve not in ("c-get", "c-move"):
        raise ConfigError(f"[pacs] retrieve: expected \"c-get\" or \"c-move\", got {p.retrieve!r}")
    for key in ("called_ae_title", "calling_ae_title", "move_destination_ae_title"):
        if not AE_TITLE.match(getattr(p, key)) or not getattr(p, key).strip():
            raise ConfigError(f"[pacs] {key}: not a DICOM AE title (1-16 characters, no \\)")
    for key in ("port", "move_port"):
        if not 0 < getattr(p, key) < 65536:
            raise ConfigError(f"[pacs] {key}: not a TCP port")
    if not 1 <= p.associations <= 16:
        raise ConfigError("[pacs] associations: expected 1 to 16")
    if not 1 <= p.timeout_seconds <= 3600:
        raise ConfigError("[pacs] timeout_seconds: expected 1 to 3600")
    if p.response_order not in ("root-first", "root-last"):
        raise ConfigError("[pacs] response_order: expected \"root-first\" or \"root-last\", "
                          f"got {p.response_order!r}")
    if p.dimse_engine not in ("builtin", "pynetdicom"):
        raise ConfigError("[pacs] dimse_engine: expected \"builtin\" or \"pynetdicom\", "
                          f"got {p.dimse_engine!r}")
    _validate_pacs_tls(p)
    _validate_publish(cfg.publish)
    _validate_audit(cfg)
    _validate_xua(cfg)
    _validate_limits(cfg)
    seen: set[str] = set()
    for i, rc in enumerate(cfg.communities):
        where = f"[[communities]] #{i + 1}"
        _check_oid(f"{where} home_community_id", rc.home_community_id, urn=True)
        if rc.home_community_id in seen:
            raise ConfigError(f"{where} home_community_id: listed twice")
        seen.add(rc.home_community_id)
        for key in ("query_url", "retrieve_url", "imaging_retrieve_url"):
            url = getattr(rc, key)
            if url and not url.startswith("https://"):
                raise ConfigError(f"{where} {key}: expected an https:// URL")
        for local, remote in rc.patient_ids:
            if not local.strip() or not remote.strip():
                raise ConfigError(f"{where} patient_ids: empty patient id in the mapping")
    _validate_xca(cfg.xca)
    _validate_backends(cfg)


def _validate_pacs_tls(p: PacsConfig) -> None:
    if not p.tls:
        return
    for key in ("tls_ca_bundle", "tls_certificate", "tls_private_key"):
        path = getattr(p, key)
        if path is None:
            raise ConfigError(f"[pacs] {key}: required when tls = true (or set [tls] "
                              f"{key.removeprefix('tls_')})")
        if not path.is_file():
            raise ConfigError(f"[pacs] {key}: file not found: {path}")


def _pacs_defaults(pacs: PacsConfig, tls: TlsConfig) -> PacsConfig:
    """[pacs] tls_* default to the node's [tls] material (only when [pacs] tls is on)."""
    if not pacs.tls:
        return pacs
    return replace(pacs,
                   tls_ca_bundle=pacs.tls_ca_bundle or tls.ca_bundle,
                   tls_certificate=pacs.tls_certificate or tls.certificate,
                   tls_private_key=pacs.tls_private_key or tls.private_key)


def _validate_xca(x: XcaConfig) -> None:
    for key in ("connect_timeout_seconds", "query_timeout_seconds", "retrieve_timeout_seconds"):
        if not 1 <= getattr(x, key) <= 3600:
            raise ConfigError(f"[xca] {key}: expected 1 to 3600")
    if not 1 <= x.max_parallel <= 256:
        raise ConfigError("[xca] max_parallel: expected 1 to 256")
    if x.response_order not in ("", "root-first", "root-last"):
        raise ConfigError("[xca] response_order: expected \"root-first\", \"root-last\" or "
                          f"\"\" (as [pacs] response_order), got {x.response_order!r}")


def _validate_backends(cfg: GatewayConfig) -> None:
    """[community] registry_url, [[repositories]], [[imaging_sources]] (the Responding
    Gateways' remote backends, gateway.xca.remote_*)."""
    url = cfg.community.registry_url
    if url and not url.startswith("https://"):
        raise ConfigError("[community] registry_url: expected an https:// URL")
    for section, sources, own_key in (
            ("repositories", cfg.repositories, "repository_unique_id"),
            ("imaging_sources", cfg.imaging_sources, "imaging_source_unique_id")):
        own = getattr(cfg.community, own_key)
        seen: set[str] = set()
        for i, src in enumerate(sources):
            where = f"[[{section}]] #{i + 1}"
            _check_oid(f"{where} unique_id", src.unique_id)
            if src.unique_id == own:
                raise ConfigError(f"{where} unique_id: {src.unique_id} is this gateway's own "
                                  f"[community] {own_key}")
            if src.unique_id in seen:
                raise ConfigError(f"{where} unique_id: listed twice")
            seen.add(src.unique_id)
            if not src.retrieve_url.startswith("https://") or len(src.retrieve_url) <= 8:
                raise ConfigError(f"{where} retrieve_url: expected an https:// URL")


def read_patient_id_map(path: Path, where: str) -> dict[str, str]:
    """A CSV file of "local_cx,remote_cx" lines (blank lines and lines starting with # are
    skipped; an optional header line "local_cx,remote_cx" too) -> {local: remote}."""
    import csv

    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise ConfigError(f"{where} patient_id_map: file not found: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{where} patient_id_map: cannot read {path}: {exc}") from None
    mapping: dict[str, str] = {}
    for n, row in enumerate(rows, 1):
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if n == 1 and [c.lower() for c in cells] == ["local_cx", "remote_cx"]:
            continue
        if len(cells) != 2 or not all(cells):
            raise ConfigError(f"{where} patient_id_map: {path} line {n}: expected "
                              "\"local_cx,remote_cx\"")
        if cells[0] in mapping and mapping[cells[0]] != cells[1]:
            raise ConfigError(f"{where} patient_id_map: {path} line {n}: a local patient id "
                              "mapped twice")
        mapping[cells[0]] = cells[1]
    return mapping


def _with_patient_map(rc: RemoteCommunity, where: str) -> RemoteCommunity:
    if rc.patient_id_map is None:
        return rc
    mapping = read_patient_id_map(rc.patient_id_map, where)
    mapping.update(dict(rc.patient_ids))
    return replace(rc, patient_ids=tuple(sorted(mapping.items())))


def _validate_publish(pub: PublishConfig) -> None:
    for key in ("repository_url", "registry_url"):
        url = getattr(pub, key)
        if url and not url.startswith("https://"):
            raise ConfigError(f"[publish] {key}: expected an https:// URL")
    if bool(pub.repository_url) != bool(pub.registry_url):
        raise ConfigError("[publish] registry_url: a remote repository_url needs the "
                          "registry_url of its affinity domain (and the other way round)")
    if pub.wado_rs_base and not pub.wado_rs_base.startswith(("https://", "http://")):
        raise ConfigError("[publish] wado_rs_base: expected an http(s):// URL")
    for key in ("source_id", "source_patient_id_authority", "accession_number_authority",
                "placer_order_authority"):
        if getattr(pub, key):
            _check_oid(f"[publish] {key}", getattr(pub, key))
    if pub.retrieve_ae_title and not AE_TITLE.match(pub.retrieve_ae_title):
        raise ConfigError("[publish] retrieve_ae_title: not a DICOM AE title "
                          "(1-16 characters, no \\)")
    for key in ("class_code", "type_code", "confidentiality_code",
                "healthcare_facility_type_code", "practice_setting_code", "content_type_code"):
        parts = [p.strip() for p in getattr(pub, key).split("|")]
        if len(parts) != 3 or not all(parts):
            raise ConfigError(f"[publish] {key}: expected \"code | coding scheme | display "
                              f"name\", got {getattr(pub, key)!r}")
    for part, value in pub.body_parts:
        pieces = [p.strip() for p in value.split("|")]
        if not part.strip() or len(pieces) not in (2, 3) or not all(pieces):
            raise ConfigError(f"[publish.body_parts] {part}: expected \"code | meaning\" or "
                              f"\"code | coding scheme | meaning\", got {value!r}")
    if not 1 <= pub.pacs_timeout_seconds <= 3600:
        raise ConfigError("[publish] pacs_timeout_seconds: expected 1 to 3600")


AUDIT_TRANSPORTS = ("tls", "udp", "none")


def _validate_audit(cfg: GatewayConfig) -> None:
    a = cfg.audit
    if a.transport not in AUDIT_TRANSPORTS:
        raise ConfigError(f"[audit] transport: expected \"tls\", \"udp\" or \"none\", "
                          f"got {a.transport!r}")
    if a.transport == "none":
        return
    if not a.host.strip():
        raise ConfigError("[audit] host: required when transport is not \"none\"")
    if not 0 < a.port < 65536:
        raise ConfigError(f"[audit] port: {a.port} is not a TCP/UDP port")
    if a.max_spool_records < 1:
        raise ConfigError("[audit] max_spool_records: expected at least 1")
    if a.max_spool_bytes < 64 * 1024:
        raise ConfigError("[audit] max_spool_bytes: expected at least 65536")
    if not a.app_name or len(a.app_name) > 48 or not all(33 <= ord(c) <= 126 for c in a.app_name):
        raise ConfigError("[audit] app_name: 1-48 printable ASCII characters, no spaces")
    if a.transport == "tls":
        t = cfg.tls
        for key in ("certificate", "private_key", "ca_bundle"):
            path = getattr(t, key)
            if path is None:
                raise ConfigError(f"[audit] transport: \"tls\" needs [tls] {key} (the node's "
                                  "certificate authenticates it to the audit repository)")
            if not path.is_file():
                raise ConfigError(f"[tls] {key}: file not found: {path}")


def _validate_xua(cfg: GatewayConfig) -> None:
    x = cfg.xua
    for path in x.trusted_certificates:
        if not path.is_file():
            raise ConfigError(f"[xua] trusted_certificates: file not found: {path}")
        try:
            from cryptography import x509

            if not x509.load_pem_x509_certificates(path.read_bytes()):
                raise ValueError
        except ValueError:
            raise ConfigError(f"[xua] trusted_certificates: no PEM certificate in {path}") from None
    if (x.required or x.required_endpoints) and not x.trusted_certificates:
        raise ConfigError("[xua] trusted_certificates: required when assertions are required")
    if x.trusted_certificates and not x.audience:
        raise ConfigError("[xua] audience: required with trusted_certificates")
    if not 0 <= x.clock_skew_seconds <= 3600:
        raise ConfigError("[xua] clock_skew_seconds: expected 0 to 3600")
    if x.outbound_assertion is not None and not x.outbound_assertion.is_file():
        raise ConfigError(f"[xua] outbound_assertion: file not found: {x.outbound_assertion}")
    from gateway.transactions import ENDPOINTS_BY_PATH

    for endpoint_path in x.required_endpoints:
        if endpoint_path not in ENDPOINTS_BY_PATH:
            raise ConfigError(f"[xua] required_endpoints: unknown endpoint {endpoint_path!r} "
                              f"(known: {', '.join(ENDPOINTS_BY_PATH)})")


def _validate_limits(cfg: GatewayConfig) -> None:
    for key in ("max_xml_elements", "max_documents_per_request", "max_document_requests",
                "max_query_slots", "max_query_values"):
        if getattr(cfg.limits, key) < 1:
            raise ConfigError(f"[limits] {key}: expected at least 1")


def _audit_defaults(audit: AuditConfig, base: Path) -> AuditConfig:
    port = audit.port or (6514 if audit.transport == "tls" else 514)
    spool = audit.spool_directory or (base / "var" / "audit-spool")
    return replace(audit, port=port, spool_directory=spool)


def from_dict(raw: dict[str, Any], base: Path, source: Path | None = None) -> GatewayConfig:
    arrays = ("communities", "repositories", "imaging_sources")
    unknown = set(raw) - set(_SECTIONS) - set(arrays)
    if unknown:
        raise ConfigError(f"[{sorted(unknown)[0]}]: unknown section "
                          f"(known: {', '.join(sorted([*_SECTIONS, *arrays]))})")
    sections = {name: _section(name, cls, raw.get(name, {}), base)
                for name, cls in _SECTIONS.items()}
    repo_dir = sections["repository"].directory
    if not repo_dir.is_absolute():
        sections["repository"] = replace(sections["repository"], directory=base / repo_dir)
    registry = sections["registry"]
    database = (_sqlite_relative_to(registry.database, base) if registry.database
                else f"sqlite:///{base / 'var' / 'registry.db'}")
    sections["registry"] = replace(registry, database=database)
    sections["audit"] = _audit_defaults(sections["audit"], base)
    sections["pacs"] = _pacs_defaults(sections["pacs"], sections["tls"])
    raw_communities = raw.get("communities", [])
    if not isinstance(raw_communities, list):
        raise ConfigError("[[communities]]: expected an array of tables")
    communities = tuple(
        _with_patient_map(_section(f"[[communities]] #{i + 1}", RemoteCommunity, rc, base),
                          f"[[communities]] #{i + 1}")
        for i, rc in enumerate(raw_communities))
    remote: dict[str, tuple[RemoteSource, ...]] = {}
    for name in ("repositories", "imaging_sources"):
        items = raw.get(name, [])
        if not isinstance(items, list):
            raise ConfigError(f"[[{name}]]: expected an array of tables")
        remote[name] = tuple(_section(f"[[{name}]] #{i + 1}", RemoteSource, item, base)
                             for i, item in enumerate(items))
    cfg = GatewayConfig(**sections, communities=communities, source=source,
                        repositories=remote["repositories"],
                        imaging_sources=remote["imaging_sources"])
    validate(cfg)
    return cfg


def load(path: Path) -> GatewayConfig:
    """Read and validate a TOML configuration file."""
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text") from None
    except OSError as exc:  # a folder, no permission...
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return from_dict(raw, path.resolve().parent, source=path.resolve())
