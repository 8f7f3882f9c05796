"""The configuration contract: one TOML file -> frozen dataclasses, validated once at start.

Every key is documented in config/gateway.example.toml. An unknown key, a missing required
key or a value of the wrong type or range raises `ConfigError` naming the key
(`[tls] certificate: file not found: ...`), so a bad file fails fast and says what to fix.
Relative paths are taken relative to the folder of the configuration file.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5: no backslash, 16 chars max


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


@dataclass(frozen=True)
class AuditConfig:
    enabled: bool = False


@dataclass(frozen=True)
class RemoteCommunity:
    home_community_id: str
    query_url: str = ""
    retrieve_url: str = ""
    imaging_retrieve_url: str = ""


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    community: CommunityConfig = field(default_factory=CommunityConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    repository: RepositoryConfig = field(default_factory=RepositoryConfig)
    pacs: PacsConfig = field(default_factory=PacsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    communities: tuple[RemoteCommunity, ...] = ()
    source: Path | None = None  # the file this was read from


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "tls": TlsConfig,
    "community": CommunityConfig,
    "registry": RegistryConfig,
    "repository": RepositoryConfig,
    "pacs": PacsConfig,
    "audit": AuditConfig,
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
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}]: expected a table")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(
                f"[{name}] {key}: unknown key (known: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(f"[{name}] {key}", value, str(known[key].type), base)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field missing
        raise ConfigError(f"[{name}]: {exc}") from None


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


def from_dict(raw: dict[str, Any], base: Path, source: Path | None = None) -> GatewayConfig:
    unknown = set(raw) - set(_SECTIONS) - {"communities"}
    if unknown:
        raise ConfigError(f"[{sorted(unknown)[0]}]: unknown section "
                          f"(known: {', '.join(sorted([*_SECTIONS, 'communities']))})")
    sections = {name: _section(name, cls, raw.get(name, {}), base)
                for name, cls in _SECTIONS.items()}
    repo_dir = sections["repository"].directory
    if not repo_dir.is_absolute():
        sections["repository"] = RepositoryConfig(directory=base / repo_dir)
    if not sections["registry"].database:
        sections["registry"] = RegistryConfig(
            database=f"sqlite:///{base / 'var' / 'registry.db'}",
            max_results=sections["registry"].max_results)
    raw_communities = raw.get("communities", [])
    if not isinstance(raw_communities, list):
        raise ConfigError("[[communities]]: expected an array of tables")
    communities = tuple(
        _section(f"[communities] #{i + 1}", RemoteCommunity, rc, base)
        for i, rc in enumerate(raw_communities))
    cfg = GatewayConfig(**sections, communities=communities, source=source)
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
    return from_dict(raw, path.resolve().parent, source=path.resolve())
