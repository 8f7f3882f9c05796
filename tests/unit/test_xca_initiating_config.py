"""[xca] and the per-community patient id cross-reference of [[communities]]."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, GatewayConfig, from_dict
from tests.support.config import plain_community

HOME = "urn:oid:1.2.3.4.2"


def build(tmp_path: Path, community: dict[str, Any] | None = None,
          xca: dict[str, Any] | None = None) -> GatewayConfig:
    raw: dict[str, Any] = {
        **plain_community(),
        "communities": [{"home_community_id": HOME,
                         "query_url": "https://b.example/xca/responding",
                         **(community or {})}],
    }
    if xca is not None:
        raw["xca"] = xca
    return from_dict(raw, tmp_path)


def test_xca_defaults(tmp_path: Path) -> None:
    x = build(tmp_path).xca
    assert (x.connect_timeout_seconds, x.query_timeout_seconds, x.retrieve_timeout_seconds,
            x.max_parallel) == (5, 30, 300, 10)


@pytest.mark.parametrize("key,value", [("query_timeout_seconds", 0),
                                       ("connect_timeout_seconds", 4000),
                                       ("retrieve_timeout_seconds", -1),
                                       ("max_parallel", 0)])
def test_xca_bounds_name_the_key(tmp_path: Path, key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=rf"\[xca\] {key}"):
        build(tmp_path, xca={key: value})


def test_patient_map_from_csv_and_inline_table_inline_wins(tmp_path: Path) -> None:
    (tmp_path / "map.csv").write_text(
        "local_cx,remote_cx\n# comment\n\nA^^^&1.2&ISO, X^^^&1.3&ISO\nB^^^&1.2&ISO,Y^^^&1.3&ISO\n")
    cfg = build(tmp_path, {"patient_id_map": "map.csv",
                           "patient_ids": {"B^^^&1.2&ISO": "Z^^^&1.3&ISO"}})
    assert dict(cfg.communities[0].patient_ids) == {"A^^^&1.2&ISO": "X^^^&1.3&ISO",
                                                    "B^^^&1.2&ISO": "Z^^^&1.3&ISO"}


@pytest.mark.parametrize("text,message", [
    ("A,X,extra\n", "line 1"),
    ("A,\n", "line 1"),
    ("A,X\nA,Y\n", "mapped twice"),
])
def test_bad_patient_map_lines_are_named(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "map.csv").write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        build(tmp_path, {"patient_id_map": "map.csv"})
    assert "[[communities]] #1 patient_id_map" in str(info.value)


def test_missing_patient_map_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="patient_id_map: file not found"):
        build(tmp_path, {"patient_id_map": "nope.csv"})


def test_inline_table_must_hold_strings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="patient_ids"):
        build(tmp_path, {"patient_ids": {"A": 1}})
