"""The [publish] configuration section of the KOS publisher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, from_dict
from gateway.imaging.metadata import MetadataOptions
from gateway.imaging.publish import manifest_options, metadata_options


def _raw(**publish: Any) -> dict[str, Any]:
    return {"tls": {"enabled": False, "require_client_certificate": False},
            "community": {"home_community_id": "urn:oid:1.2.3", "repository_unique_id": "1.2.4",
                          "imaging_source_unique_id": "1.2.5",
                          "patient_id_assigning_authority": "1.2.6"},
            "publish": publish}


def test_defaults_give_working_options(tmp_path: Path) -> None:
    cfg = from_dict(_raw(), tmp_path)
    m = manifest_options(cfg)
    assert m.retrieve_location_uid == "1.2.5"
    assert m.retrieve_ae_title == cfg.pacs.called_ae_title
    assert m.issuer_of_patient_id == "1.2.6"
    meta = metadata_options(cfg)
    assert meta.class_code == MetadataOptions(patient_id_authority="x").class_code
    assert meta.modality_scheme == "DCM" and meta.region_scheme == "SCT"


def test_body_part_overrides(tmp_path: Path) -> None:
    cfg = from_dict(_raw(body_parts={"brain": "12738006 | Brain",
                                     "HEAD": "1 | 99X | Mine"}), tmp_path)
    overrides = metadata_options(cfg).body_part_overrides
    assert overrides["BRAIN"].code == "12738006" and overrides["BRAIN"].scheme == "SCT"
    assert overrides["HEAD"].scheme == "99X"


@pytest.mark.parametrize(("publish", "key"), [
    ({"body_parts": {"BRAIN": "12738006"}}, "[publish.body_parts] BRAIN"),
    ({"body_parts": {"BRAIN": 5}}, "[publish] body_parts"),
    ({"repository_url": "http://repo"}, "[publish] repository_url"),
    ({"repository_url": "https://repo"}, "[publish] registry_url"),
    ({"class_code": "only-a-code"}, "[publish] class_code"),
    ({"source_id": "not-an-oid"}, "[publish] source_id"),
    ({"retrieve_ae_title": "A" * 17}, "[publish] retrieve_ae_title"),
    ({"pacs_timeout_seconds": 0}, "[publish] pacs_timeout_seconds"),
    ({"nonsense": 1}, "[publish] nonsense"),
])
def test_bad_values_name_the_key(tmp_path: Path, publish: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(_raw(**publish), tmp_path)
    assert str(err.value).startswith(key)
