"""The configuration contract (gateway/config.py): the example file, every rule, every message.

Each bad value must raise ConfigError whose message names the key as `[section] key`, so an
operator knows what to fix; almost-right values sit next to right ones to pin the boundaries.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.config import (
    _SECTIONS,
    ConfigError,
    GatewayConfig,
    RemoteCommunity,
    RemoteSource,
    from_dict,
    load,
)
from gateway.security.pki import create_dev_pki
from tests.support.config import EXAMPLE, dev_pki_dir, example_raw

ROOT = Path(__file__).resolve().parents[2]
HOME = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.19"
REMOTE = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.2"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def dump_toml(raw: dict[str, Any]) -> str:
    """Enough TOML writing for these tests: tables of scalars and arrays of tables."""
    lines: list[str] = []
    for name, table in raw.items():
        if isinstance(table, list) and table and all(isinstance(t, dict) for t in table):
            for item in table:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
        elif isinstance(table, dict):
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        else:
            lines.append(f"{name} = {_toml_value(table)}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dev_pki_dir(tmp_path_factory, "cfg")


@pytest.fixture
def raw(pki_dir: Path) -> dict[str, Any]:
    """The example file as a dict, its TLS paths pointing at a real development PKI."""
    return example_raw(pki_dir)


def build(raw: dict[str, Any], tmp_path: Path) -> GatewayConfig:
    return from_dict(copy.deepcopy(raw), tmp_path)


def expect_error(raw: dict[str, Any], tmp_path: Path, label: str) -> str:
    with pytest.raises(ConfigError) as info:
        build(raw, tmp_path)
    message = str(info.value)
    assert message.startswith(label), f"{message!r} does not start with {label!r}"
    return message


# --- the example file ---------------------------------------------------------------------

def _documented_keys() -> dict[str, set[str]]:
    """Section -> keys named in the example, set or commented out (`# key = value`).

    A sub-table header `[section.key]` documents `key` of `section`.
    """
    keys: dict[str, set[str]] = {}
    section: str | None = None
    for line in EXAMPLE.read_text().splitlines():
        text = line.strip().lstrip("#").strip()
        header = re.match(r"^\[\[?([a-z_.]+)\]\]?", text)
        if header:
            name, _, sub = header.group(1).partition(".")
            keys.setdefault(name, set())
            if sub:
                keys[name].add(sub)
            section = None if sub else name
            continue
        key = re.match(r"^([a-z_]+)\s*=", text)
        if key and section:
            keys[section].add(key.group(1))
    return keys


def test_example_file_loads_as_shipped_next_to_a_pki(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = tmp_path / "gateway.toml"
    shipped.write_text(EXAMPLE.read_text())
    create_dev_pki(tmp_path / "pki")  # the example's relative pki/server.pem etc.
    monkeypatch.chdir("/")
    cfg = load(shipped)
    example = tomllib.loads(EXAMPLE.read_text())
    assert cfg.source == shipped.resolve()
    assert cfg.tls.certificate == tmp_path / "pki" / "server.pem"
    assert cfg.tls.private_key == tmp_path / "pki" / "server-key.pem"
    assert cfg.tls.ca_bundle == tmp_path / "pki" / "ca.pem"
    # Every value set in the file reached its dataclass field (paths beside the file).
    for section, table in example.items():
        loaded = getattr(cfg, section)
        for key, value in table.items():
            got = getattr(loaded, key)
            if isinstance(got, Path):
                assert got == tmp_path / value, f"[{section}] {key}"
            elif isinstance(value, str | int) and value and (section, key) != (
                    "registry", "database"):
                assert got == value, f"[{section}] {key}"
    assert cfg.registry.database == f"sqlite:///{tmp_path / 'var' / 'registry.db'}"
    assert cfg.communities == ()


def test_every_key_in_the_example_is_a_field_and_every_field_is_documented() -> None:
    documented = _documented_keys()
    expected = {name: {f.name for f in dataclasses.fields(cls)}
                for name, cls in _SECTIONS.items()}
    expected["communities"] = {f.name for f in dataclasses.fields(RemoteCommunity)}
    for array in ("repositories", "imaging_sources"):
        expected[array] = {f.name for f in dataclasses.fields(RemoteSource)}
    undocumented = {f"[{section}] {key}" for section, keys in expected.items()
                    for key in keys - documented.get(section, set())}
    stale = {f"[{section}] {key}" for section, keys in documented.items()
             for key in keys - expected.get(section, set())}
    assert not undocumented, f"not in {EXAMPLE.name}: {sorted(undocumented)}"
    assert not stale, f"in {EXAMPLE.name} but not a configuration key: {sorted(stale)}"


def test_commented_out_example_keys_load_when_uncommented(raw: dict[str, Any],
                                                          tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    blocks = _commented_arrays(text)
    communities = [line for line in blocks["communities"]
                   if re.match(r"^(\[\[communities\]\]|[a-z_]+_url\s*=|"
                               r"home_community_id\s*=)", line)]
    parsed = tomllib.loads("\n".join(communities))
    assert len(parsed["communities"]) == 1
    raw["communities"] = parsed["communities"]
    for array in ("repositories", "imaging_sources"):
        raw[array] = tomllib.loads("\n".join(blocks[array]))[array]
    raw["server"]["spool_directory"] = str(tmp_path)
    cfg = build(raw, tmp_path)
    assert cfg.server.spool_directory == tmp_path
    (remote,) = cfg.communities
    assert remote.home_community_id == REMOTE
    assert remote.imaging_retrieve_url.startswith("https://")
    (repository,) = cfg.repositories
    assert repository.retrieve_url.endswith("/xds/repository")
    (source,) = cfg.imaging_sources
    assert source.retrieve_url.endswith("/xdsi/imaging-source")
    assert source.unique_id != cfg.community.imaging_source_unique_id


def _commented_arrays(text: str) -> dict[str, list[str]]:
    """Array-of-tables name -> the commented-out lines of its example block, uncommented."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        body = line.lstrip("# ").rstrip()
        header = re.match(r"^\[\[([a-z_]+)\]\]$", body)
        if line.startswith("#") and header:
            current = blocks.setdefault(header.group(1), [])
        elif not line.startswith("#") or not body:
            current = None
        if current is not None:
            current.append(body)
    return blocks


# --- per-section rules: (section, key, bad value, label that must start the message) -------

BAD_VALUES: list[tuple[str, str, Any]] = [
    # [server]
    ("server", "host", 1),
    ("server", "port", "8443"),
    ("server", "port", 8443.0),
    ("server", "port", True),
    ("server", "port", 0),
    ("server", "port", 65536),
    ("server", "port", -1),
    ("server", "workers", 0),
    ("server", "workers", 65),
    ("server", "workers", [2]),
    ("server", "threads", 0),
    ("server", "threads", 257),
    ("server", "max_request_bytes", 1023),
    ("server", "max_request_bytes", "1 GiB"),
    ("server", "max_envelope_bytes", 1023),
    ("server", "max_envelope_bytes", 1073741825),  # above max_request_bytes
    ("server", "request_timeout_seconds", 0),
    ("server", "request_timeout_seconds", 1.5),
    ("server", "spool_directory", ""),
    ("server", "send_timeout_seconds", 0),
    ("server", "send_timeout_seconds", 3601),
    ("server", "send_timeout_seconds", 1.5),
    ("server", "min_send_rate_bytes_per_second", -1),
    ("server", "min_send_rate_bytes_per_second", "4 KiB"),
    ("server", "spool_directory", 7),
    ("server", "spool_directory", "does/not/exist"),
    # [tls]
    ("tls", "enabled", "yes"),
    ("tls", "enabled", 1),
    ("tls", "require_client_certificate", "true"),
    ("tls", "certificate", 5),
    ("tls", "certificate", ""),
    ("tls", "certificate", "missing.pem"),
    ("tls", "private_key", "missing-key.pem"),
    ("tls", "ca_bundle", "missing-ca.pem"),
    # [community]
    ("community", "home_community_id", 1),
    ("community", "home_community_id", "1.3.6.1.4.1.21367.2017.2.6.19"),  # no urn:oid:
    ("community", "home_community_id", "urn:oid:1.3.6.01"),  # leading zero
    ("community", "home_community_id", "urn:uuid:1.3.6.1"),
    ("community", "registry_url", "http://registry.example.org/xds/registry"),
    ("community", "registry_url", "registry.example.org"),
    ("community", "registry_url", 5),
    ("community", "repository_unique_id", "urn:oid:1.3.6.1"),  # a bare OID expected
    ("community", "repository_unique_id", "1.3.6.1.04"),
    ("community", "repository_unique_id", "3.1.2"),  # first arc 0, 1 or 2
    ("community", "repository_unique_id", "1"),  # at least two arcs
    ("community", "repository_unique_id", "1.3.6."),
    ("community", "repository_unique_id", "1.3.6.1.x"),
    ("community", "imaging_source_unique_id", "1.2." + "3" * 62),  # 65 characters
    ("community", "imaging_source_unique_id", 1.3),
    ("community", "patient_id_assigning_authority", " 1.2.3"),
    # [registry]
    ("registry", "database", 5),
    ("registry", "database", "mysql://host/db"),
    ("registry", "database", "sqlite://relative.db"),
    ("registry", "max_results", 0),
    ("registry", "max_results", "1000"),
    # [repository]
    ("repository", "directory", 5),
    ("repository", "directory", ""),
    # [pacs]
    ("pacs", "host", 127),
    ("pacs", "port", 0),
    ("pacs", "port", 65536),
    ("pacs", "move_port", 70000),
    ("pacs", "move_port", "11112"),
    ("pacs", "retrieve", "c-find"),
    ("pacs", "retrieve", "C-GET"),
    ("pacs", "called_ae_title", "A" * 17),
    ("pacs", "called_ae_title", "ORT\\HANC"),
    ("pacs", "called_ae_title", ""),
    ("pacs", "called_ae_title", "    "),
    ("pacs", "calling_ae_title", "XDSI\tGW"),
    ("pacs", "calling_ae_title", "XDSI-GWÄ"),
    ("pacs", "move_destination_ae_title", "B" * 17),
    ("pacs", "move_destination_ae_title", 4),
]


@pytest.mark.parametrize(("section", "key", "value"), BAD_VALUES,
                         ids=[f"{s}.{k}={v!r}" for s, k, v in BAD_VALUES])
def test_a_bad_value_names_its_key(raw: dict[str, Any], tmp_path: Path, section: str,
                                   key: str, value: Any) -> None:
    raw[section][key] = value
    message = expect_error(raw, tmp_path, f"[{section}] {key}:")
    assert "Traceback" not in message


def _wrong_type(annotation: str) -> Any:
    """A TOML value of the wrong type for a field annotated `annotation`."""
    if annotation.startswith("tuple["):
        return 5
    if "Path" in annotation or "str" in annotation:
        return 12345
    if "bool" in annotation:
        return "true"
    if "int" in annotation:
        return "1"
    raise AssertionError(annotation)


ALL_KEYS = [(name, f.name, str(f.type)) for name, cls in _SECTIONS.items()
            for f in dataclasses.fields(cls)]


@pytest.mark.parametrize(("section", "key", "annotation"), ALL_KEYS,
                         ids=[f"{s}.{k}" for s, k, _ in ALL_KEYS])
def test_every_key_refuses_a_value_of_the_wrong_type(raw: dict[str, Any], tmp_path: Path,
                                                     section: str, key: str,
                                                     annotation: str) -> None:
    raw.setdefault(section, {})[key] = _wrong_type(annotation)
    expect_error(raw, tmp_path, f"[{section}] {key}: expected")


@pytest.mark.parametrize("section", sorted(_SECTIONS))
def test_an_unknown_key_in_each_section_names_it(raw: dict[str, Any], tmp_path: Path,
                                                 section: str) -> None:
    raw.setdefault(section, {})["colour"] = "blue"
    message = expect_error(raw, tmp_path, f"[{section}] colour: unknown key")
    # The message lists the known keys, so a typo is easy to spot.
    for f in dataclasses.fields(_SECTIONS[section]):
        assert f.name in message


def test_a_misspelt_key_is_unknown_not_ignored(raw: dict[str, Any], tmp_path: Path) -> None:
    raw["server"]["max_request_byte"] = 2048
    expect_error(raw, tmp_path, "[server] max_request_byte: unknown key")


def test_an_unknown_section_is_named(raw: dict[str, Any], tmp_path: Path) -> None:
    raw["sever"] = {"port": 1}
    message = expect_error(raw, tmp_path, "[sever]: unknown section")
    assert "server" in message


@pytest.mark.parametrize("section", sorted(_SECTIONS))
def test_a_section_that_is_not_a_table_is_named(raw: dict[str, Any], tmp_path: Path,
                                                section: str) -> None:
    raw[section] = 5
    expect_error(raw, tmp_path, f"[{section}]: expected a table")


GOOD_VALUES: list[tuple[str, str, Any]] = [
    ("server", "port", 1),
    ("server", "port", 65535),
    ("server", "workers", 1),
    ("server", "workers", 64),
    ("server", "threads", 256),
    ("server", "request_timeout_seconds", 1),
    ("server", "send_timeout_seconds", 1),
    ("server", "send_timeout_seconds", 3600),
    ("server", "min_send_rate_bytes_per_second", 0),
    ("community", "home_community_id", "urn:oid:1.0.3"),
    ("community", "repository_unique_id", "2.999.0.10"),
    ("community", "repository_unique_id", "0.0"),
    ("community", "imaging_source_unique_id", "1.2." + "3" * 60),  # 64 characters
    ("registry", "database", "postgresql://gw:secret@db.example.org/xds"),
    ("registry", "database", "postgresql+psycopg://gw@localhost:5433/xds"),
    ("registry", "max_results", 1),
    ("pacs", "retrieve", "c-move"),
    ("pacs", "called_ae_title", "A" * 16),
    ("pacs", "called_ae_title", "A"),
    ("pacs", "calling_ae_title", "MY AE_TITLE-1.2"),
    ("pacs", "move_port", 65535),
]


@pytest.mark.parametrize(("section", "key", "value"), GOOD_VALUES,
                         ids=[f"{s}.{k}={v!r}" for s, k, v in GOOD_VALUES])
def test_a_right_value_next_to_the_boundary_loads(raw: dict[str, Any], tmp_path: Path,
                                                  section: str, key: str,
                                                  value: Any) -> None:
    raw[section][key] = value
    cfg = build(raw, tmp_path)
    assert getattr(getattr(cfg, section), key) == value


def test_max_envelope_bytes_may_equal_max_request_bytes(raw: dict[str, Any],
                                                        tmp_path: Path) -> None:
    raw["server"].update(max_request_bytes=4096, max_envelope_bytes=4096)
    assert build(raw, tmp_path).server.max_envelope_bytes == 4096
    raw["server"]["max_envelope_bytes"] = 4097
    expect_error(raw, tmp_path, "[server] max_envelope_bytes:")
    raw["server"].update(max_request_bytes=1024, max_envelope_bytes=1024)  # the minimum
    assert build(raw, tmp_path).server.max_request_bytes == 1024


def test_missing_sections_take_their_defaults_except_community(raw: dict[str, Any],
                                                               tmp_path: Path) -> None:
    minimal = {"tls": raw["tls"], "community": raw["community"]}
    cfg = build(minimal, tmp_path)
    assert cfg.server.port == 8443
    assert cfg.pacs.retrieve == "c-get"
    assert cfg.repository.directory == tmp_path / "var" / "repository"


# --- required keys -------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["home_community_id", "repository_unique_id",
                                 "imaging_source_unique_id",
                                 "patient_id_assigning_authority"])
def test_each_community_key_is_required(raw: dict[str, Any], tmp_path: Path,
                                        key: str) -> None:
    del raw["community"][key]
    assert expect_error(raw, tmp_path, f"[community] {key}:").endswith("required")
    raw["community"][key] = ""
    expect_error(raw, tmp_path, f"[community] {key}: required")


def test_a_missing_community_section_names_its_first_key(raw: dict[str, Any],
                                                         tmp_path: Path) -> None:
    del raw["community"]
    expect_error(raw, tmp_path, "[community] home_community_id: required")


@pytest.mark.parametrize("key", ["certificate", "private_key", "ca_bundle"])
def test_tls_files_are_required_when_enabled(raw: dict[str, Any], tmp_path: Path,
                                             key: str) -> None:
    del raw["tls"][key]
    expect_error(raw, tmp_path, f"[tls] {key}: required when TLS is enabled")


def test_ca_bundle_is_optional_without_client_certificates(raw: dict[str, Any],
                                                           tmp_path: Path) -> None:
    del raw["tls"]["ca_bundle"]
    raw["tls"]["require_client_certificate"] = False
    cfg = build(raw, tmp_path)
    assert cfg.tls.ca_bundle is None


def test_tls_disabled_needs_no_files(raw: dict[str, Any], tmp_path: Path) -> None:
    raw["tls"] = {"enabled": False, "require_client_certificate": False}
    cfg = build(raw, tmp_path)
    assert cfg.tls.enabled is False and cfg.tls.certificate is None


def test_tls_disabled_with_certificates_still_set_is_flagged(raw: dict[str, Any],
                                                             tmp_path: Path) -> None:
    raw["tls"]["enabled"] = False
    expect_error(raw, tmp_path, "[tls] enabled:")


# --- files ---------------------------------------------------------------------------------

def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found") as info:
        load(tmp_path / "nowhere.toml")
    assert "nowhere.toml" in str(info.value)


def test_a_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path)


@pytest.mark.parametrize("text", [
    "[server\nport = 1\n",
    "[server]\nport = \n",
    "[server]\nport = 1\nport = 2\n",
    'home = "unterminated\n',
])
def test_invalid_toml_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load(path)
    assert str(path) in str(info.value)


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_bytes(b'[server]\nhost = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(path)


def test_a_bad_key_in_a_file_is_named_the_same_way(raw: dict[str, Any],
                                                   tmp_path: Path) -> None:
    raw["pacs"]["called_ae_title"] = "X" * 17
    path = tmp_path / "gateway.toml"
    path.write_text(dump_toml(raw))
    with pytest.raises(ConfigError, match=r"^\[pacs\] called_ae_title: "):
        load(path)


# --- relative paths ------------------------------------------------------------------------

def test_relative_paths_resolve_against_the_config_folder(
        raw: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc"
    create_dev_pki(etc / "certs")
    raw["tls"].update(certificate="certs/server.pem", private_key="certs/server-key.pem",
                      ca_bundle="certs/ca.pem")
    raw["repository"]["directory"] = "data/repo"
    raw["registry"]["database"] = "sqlite:///data/registry.db"
    (etc / "spool").mkdir()
    raw["server"]["spool_directory"] = "spool"
    path = etc / "gateway.toml"
    path.write_text(dump_toml(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load(Path("..") / "etc" / "gateway.toml")
    assert cfg.source == path
    assert cfg.tls.certificate == etc / "certs" / "server.pem"
    assert cfg.tls.private_key == etc / "certs" / "server-key.pem"
    assert cfg.tls.ca_bundle == etc / "certs" / "ca.pem"
    assert cfg.repository.directory == etc / "data" / "repo"
    assert cfg.registry.database == f"sqlite:///{etc / 'data' / 'registry.db'}"
    assert cfg.server.spool_directory == etc / "spool"


def test_a_relative_tls_file_is_looked_for_beside_the_config_not_in_the_cwd(
        raw: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        pki_dir: Path) -> None:
    raw["tls"]["certificate"] = "server.pem"  # exists in the cwd, not beside the config
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "gateway.toml").write_text(dump_toml(raw))
    monkeypatch.chdir(pki_dir)
    with pytest.raises(ConfigError, match=r"^\[tls\] certificate: file not found") as info:
        load(etc / "gateway.toml")
    assert str(etc / "server.pem") in str(info.value)


def test_default_database_is_sqlite_beside_the_config(raw: dict[str, Any],
                                                      tmp_path: Path) -> None:
    del raw["registry"]["database"]
    path = tmp_path / "gateway.toml"
    path.write_text(dump_toml(raw))
    cfg = load(path)
    assert cfg.registry.database == f"sqlite:///{tmp_path / 'var' / 'registry.db'}"
    assert cfg.registry.max_results == raw["registry"]["max_results"]
    del raw["repository"]
    cfg = build(raw, tmp_path)
    assert cfg.repository.directory == tmp_path / "var" / "repository"


@pytest.mark.parametrize(("url", "expected"), [
    ("sqlite:////srv/xds/registry.db", "sqlite:////srv/xds/registry.db"),
    ("sqlite:///:memory:", "sqlite:///:memory:"),
    ("sqlite:///db/r.db?timeout=10", "sqlite:///{base}/db/r.db?timeout=10"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
])
def test_database_urls_other_than_relative_sqlite_are_kept(raw: dict[str, Any],
                                                           tmp_path: Path, url: str,
                                                           expected: str) -> None:
    raw["registry"]["database"] = url
    assert build(raw, tmp_path).registry.database == expected.format(base=tmp_path)


def test_absolute_paths_are_kept(raw: dict[str, Any], tmp_path: Path) -> None:
    raw["repository"]["directory"] = "/srv/xds/repository"
    assert build(raw, tmp_path / "x").repository.directory == Path("/srv/xds/repository")


def test_home_folder_paths_are_expanded(raw: dict[str, Any], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    raw["repository"]["directory"] = "~/repo"
    assert build(raw, tmp_path / "x").repository.directory == tmp_path / "repo"


# --- [[communities]] -----------------------------------------------------------------------

def remote(home: str = REMOTE, **urls: str) -> dict[str, str]:
    return {"home_community_id": home, **urls}


def test_remote_communities_load_in_order(raw: dict[str, Any], tmp_path: Path) -> None:
    raw["communities"] = [
        remote(query_url="https://a.example.org/xca", retrieve_url="https://a.example.org/r",
               imaging_retrieve_url="https://a.example.org/i"),
        remote("urn:oid:1.3.6.1.4.1.21367.2017.2.6.3", query_url="https://b.example.org/q"),
    ]
    cfg = build(raw, tmp_path)
    assert [c.home_community_id for c in cfg.communities] == [
        REMOTE, "urn:oid:1.3.6.1.4.1.21367.2017.2.6.3"]
    assert cfg.communities[0].imaging_retrieve_url == "https://a.example.org/i"
    assert cfg.communities[1].retrieve_url == ""


@pytest.mark.parametrize(("entry", "label"), [
    (remote("1.3.6.1.4.1.21367.2017.2.6.2"), "[[communities]] #2 home_community_id:"),
    (remote("urn:oid:1.3.6.01.2"), "[[communities]] #2 home_community_id:"),
    (remote("urn:oid:"), "[[communities]] #2 home_community_id:"),
    (remote(5), "[[communities]] #2 home_community_id:"),  # type: ignore[arg-type]
    (remote(HOME.upper()), "[[communities]] #2 home_community_id:"),
    (remote(query_url="http://b.example.org/q"), "[[communities]] #2 query_url:"),
    (remote(retrieve_url="b.example.org/r"), "[[communities]] #2 retrieve_url:"),
    (remote(imaging_retrieve_url="HTTPS://b.example.org/i"),
     "[[communities]] #2 imaging_retrieve_url:"),
    ({"query_url": "https://b.example.org/q"}, "[[communities]] #2 home_community_id: required"),
    ({**remote(), "url": "https://b.example.org/"}, "[[communities]] #2 url: unknown key"),
])
def test_a_bad_remote_community_is_named_by_position_and_key(
        raw: dict[str, Any], tmp_path: Path, entry: dict[str, Any], label: str) -> None:
    raw["communities"] = [remote("urn:oid:1.3.6.1.4.1.21367.2017.2.6.3"), entry]
    expect_error(raw, tmp_path, label)


def test_a_remote_community_listed_twice_is_refused(raw: dict[str, Any],
                                                    tmp_path: Path) -> None:
    raw["communities"] = [remote(query_url="https://a.example.org/q"),
                          remote(query_url="https://b.example.org/q")]
    expect_error(raw, tmp_path, "[[communities]] #2 home_community_id: listed twice")


def test_communities_must_be_an_array_of_tables(raw: dict[str, Any], tmp_path: Path) -> None:
    raw["communities"] = remote()
    expect_error(raw, tmp_path, "[[communities]]:")
    raw["communities"] = ["urn:oid:1.2.3"]
    expect_error(raw, tmp_path, "[[communities]] #1: expected a table")


# --- [[repositories]], [[imaging_sources]]: the Responding Gateways' remote backends -------

REPO_ID = "1.3.6.1.4.1.21367.2017.2.3.31"
SOURCE_ID = "1.3.6.1.4.1.21367.2017.2.3.32"


def test_remote_backends_load_in_order(raw: dict[str, Any], tmp_path: Path) -> None:
    raw["community"]["registry_url"] = "https://registry.example.org/xds/registry"
    raw["repositories"] = [
        {"unique_id": REPO_ID, "retrieve_url": "https://r1.example.org/xds/repository"},
        {"unique_id": REPO_ID + "1", "retrieve_url": "https://r2.example.org/xds/repository"}]
    raw["imaging_sources"] = [
        {"unique_id": SOURCE_ID, "retrieve_url": "https://i.example.org/xdsi/imaging-source"}]
    cfg = build(raw, tmp_path)
    assert cfg.community.registry_url == "https://registry.example.org/xds/registry"
    assert [(r.unique_id, r.retrieve_url) for r in cfg.repositories] == [
        (REPO_ID, "https://r1.example.org/xds/repository"),
        (REPO_ID + "1", "https://r2.example.org/xds/repository")]
    assert cfg.imaging_sources == (
        RemoteSource(SOURCE_ID, "https://i.example.org/xdsi/imaging-source"),)


def test_remote_backends_default_to_none(raw: dict[str, Any], tmp_path: Path) -> None:
    cfg = build(raw, tmp_path)
    assert cfg.community.registry_url == ""
    assert cfg.repositories == () and cfg.imaging_sources == ()


def _source(unique_id: Any = REPO_ID, retrieve_url: Any = "https://r.example.org/x"
            ) -> dict[str, Any]:
    return {"unique_id": unique_id, "retrieve_url": retrieve_url}


@pytest.mark.parametrize("array", ["repositories", "imaging_sources"])
@pytest.mark.parametrize(("entry", "message"), [
    (_source("urn:oid:1.3.6.1"), "unique_id: not an OID"),
    (_source("1.3.6.01"), "unique_id: not an OID"),
    (_source(7), "unique_id: expected a string"),
    (_source(retrieve_url="http://r.example.org/x"), "retrieve_url: expected an https:// URL"),
    (_source(retrieve_url="https://"), "retrieve_url: expected an https:// URL"),
    (_source(retrieve_url=""), "retrieve_url: expected an https:// URL"),
    ({"unique_id": REPO_ID}, "retrieve_url: required"),
    ({"retrieve_url": "https://r.example.org/x"}, "unique_id: required"),
    ({**_source(), "url": "https://r.example.org/"}, "url: unknown key"),
])
def test_bad_remote_backend_names_its_key(raw: dict[str, Any], tmp_path: Path, array: str,
                                          entry: dict[str, Any], message: str) -> None:
    raw[array] = [_source(SOURCE_ID + "9"), entry]
    expect_error(raw, tmp_path, f"[[{array}]] #2 {message}")


@pytest.mark.parametrize(("array", "own_key"), [
    ("repositories", "repository_unique_id"),
    ("imaging_sources", "imaging_source_unique_id")])
def test_remote_backend_ids_are_unique_and_not_our_own(raw: dict[str, Any], tmp_path: Path,
                                                       array: str, own_key: str) -> None:
    raw[array] = [_source(), _source(retrieve_url="https://other.example.org/x")]
    expect_error(raw, tmp_path, f"[[{array}]] #2 unique_id: listed twice")
    raw[array] = [_source(raw["community"][own_key])]
    message = expect_error(raw, tmp_path, f"[[{array}]] #1 unique_id:")
    assert own_key in message


@pytest.mark.parametrize("array", ["repositories", "imaging_sources"])
def test_remote_backends_must_be_an_array_of_tables(raw: dict[str, Any], tmp_path: Path,
                                                   array: str) -> None:
    raw[array] = _source()
    expect_error(raw, tmp_path, f"[[{array}]]: expected an array of tables")
    raw[array] = [REPO_ID]
    expect_error(raw, tmp_path, f"[[{array}]] #1: expected a table")


def test_the_loaded_configuration_is_frozen(raw: dict[str, Any], tmp_path: Path) -> None:
    cfg = build(raw, tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]
