"""[pacs] tls settings: defaults from [tls], validation naming the key, and the client/server
TLS contexts gateway.dicom.association builds from them (TLS 1.2+, mutual)."""

from __future__ import annotations

import copy
import ssl
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, from_dict
from gateway.dicom.association import scp_tls_context, tls_context
from gateway.security.pki import create_dev_pki
from tests.support.config import dev_pki_dir, example_raw


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dev_pki_dir(tmp_path_factory, "pacs-tls")


@pytest.fixture
def raw(pki_dir: Path) -> dict[str, Any]:
    return example_raw(pki_dir)


def test_off_by_default_and_no_contexts(raw: dict[str, Any], tmp_path: Path) -> None:
    cfg = from_dict(copy.deepcopy(raw), tmp_path)
    assert cfg.pacs.tls is False
    assert cfg.pacs.tls_certificate is None
    assert tls_context(cfg.pacs) is None
    assert scp_tls_context(cfg.pacs) is None


def test_defaults_come_from_the_tls_section(raw: dict[str, Any], tmp_path: Path,
                                            pki_dir: Path) -> None:
    raw["pacs"]["tls"] = True
    cfg = from_dict(copy.deepcopy(raw), tmp_path)
    assert cfg.pacs.tls_ca_bundle == pki_dir / "ca.pem"
    assert cfg.pacs.tls_certificate == pki_dir / "server.pem"
    assert cfg.pacs.tls_private_key == pki_dir / "server-key.pem"
    client = tls_context(cfg.pacs)
    assert client is not None
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    server = scp_tls_context(cfg.pacs)
    assert server is not None
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_REQUIRED


def test_own_settings_win_and_are_relative_to_the_file(raw: dict[str, Any], tmp_path: Path,
                                                        pki_dir: Path) -> None:
    other = tmp_path / "other"
    create_dev_pki(other)
    raw["pacs"].update(tls=True, tls_ca_bundle="other/ca.pem",
                       tls_certificate="other/client.pem",
                       tls_private_key="other/client-key.pem",
                       tls_server_name="pacs.example.org")
    cfg = from_dict(copy.deepcopy(raw), tmp_path)
    assert cfg.pacs.tls_ca_bundle == other / "ca.pem"
    assert cfg.pacs.tls_certificate == other / "client.pem"
    assert cfg.pacs.tls_server_name == "pacs.example.org"


@pytest.mark.parametrize("key", ["tls_ca_bundle", "tls_certificate", "tls_private_key"])
def test_a_missing_file_names_its_key(raw: dict[str, Any], tmp_path: Path, key: str) -> None:
    raw["pacs"].update({"tls": True, key: "nowhere.pem"})
    with pytest.raises(ConfigError, match=rf"^\[pacs\] {key}: file not found"):
        from_dict(copy.deepcopy(raw), tmp_path)


def test_tls_without_any_material_names_the_key(raw: dict[str, Any], tmp_path: Path) -> None:
    raw["tls"] = {"enabled": False, "require_client_certificate": False}
    raw["pacs"]["tls"] = True
    with pytest.raises(ConfigError, match=r"^\[pacs\] tls_ca_bundle: required when tls = true"):
        from_dict(copy.deepcopy(raw), tmp_path)


def test_tls_must_be_a_boolean(raw: dict[str, Any], tmp_path: Path) -> None:
    raw["pacs"]["tls"] = "yes"
    with pytest.raises(ConfigError, match=r"^\[pacs\] tls: expected true or false"):
        from_dict(copy.deepcopy(raw), tmp_path)
