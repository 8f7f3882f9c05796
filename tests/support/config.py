"""The shipped example configuration as test input.

`EXAMPLE` is config/gateway.example.toml; `dev_pki_dir(tmp_path_factory, name)` writes a
development PKI in a fresh temporary folder; `example_raw(pki_dir)` reads the example file as a
dict with its [tls] paths pointing at that PKI, ready for gateway.config.from_dict;
`plain_community()` is the smallest raw [tls] + [community] (TLS off, home urn:oid:1.2.3.4.1)
for tests that add their own sections.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.security.pki import create_dev_pki

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "gateway.example.toml"


def dev_pki_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A development PKI written to `<new temporary folder named name>/pki`."""
    folder = tmp_path_factory.mktemp(name) / "pki"
    create_dev_pki(folder)
    return folder


def example_raw(pki_dir: Path) -> dict[str, Any]:
    """The example file as a dict, its TLS paths pointing at the PKI in `pki_dir`."""
    data = tomllib.loads(EXAMPLE.read_text())
    data["tls"].update(certificate=str(pki_dir / "server.pem"),
                       private_key=str(pki_dir / "server-key.pem"),
                       ca_bundle=str(pki_dir / "ca.pem"))
    return data


def plain_community() -> dict[str, Any]:
    """Raw [tls] (off) and [community] sections of community urn:oid:1.2.3.4.1, a new dict."""
    return {
        "tls": {"enabled": False},
        "community": {"home_community_id": "urn:oid:1.2.3.4.1",
                      "repository_unique_id": "1.2.3.4.1.1",
                      "imaging_source_unique_id": "1.2.3.4.1.2",
                      "patient_id_assigning_authority": "1.2.3.9"},
    }
