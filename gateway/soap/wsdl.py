"""The `?wsdl` and `?xsd=NAME` documents each SOAP endpoint serves.

The project's own WSDLs live in `wsdl/` and its own XSDs in `schemas/` (next to the `gateway`
package in a source tree, or under `$XDSI_GATEWAY_SHARE/wsdl` and `$XDSI_GATEWAY_SHARE/schemas`
when that variable is set, e.g. for an installed package). The files carry placeholders that
are rewritten per request:

- every `soap12:address/@location` (and `soap:address`) becomes `base_url + endpoint_path`;
- every `schemaLocation` that names one of our schema files (`?xsd=rim.xsd` in a WSDL,
  `rim.xsd` in a schema) becomes `base_url + endpoint_path + "?xsd=rim.xsd"`.

So a client that fetches `https://host:8443/xds/registry?wsdl` finds the service at
`https://host:8443/xds/registry` and loads every schema from the same endpoint. Only plain
file names that exist in the folder are served (no paths, no traversal). File contents are read
once and cached; the rewriting is done per call (base URLs come from requests and are not
cached, so they cannot fill memory).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

from lxml import etree

import gateway
from gateway.ebrim.xmlsafe import parse_xml

SHARE_ENV = "XDSI_GATEWAY_SHARE"

_XS = "http://www.w3.org/2001/XMLSchema"
_SOAP12_WSDL = "http://schemas.xmlsoap.org/wsdl/soap12/"
_SOAP11_WSDL = "http://schemas.xmlsoap.org/wsdl/soap/"
_XSD_QUERY = "?xsd="
# A plain file name: no separators, no leading dot, nothing but these characters.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


def share_dir() -> Path:
    """Folder that holds `wsdl/` and `schemas/`: `$XDSI_GATEWAY_SHARE` or the source tree."""
    env = os.environ.get(SHARE_ENV)
    if env:
        return Path(env)
    return Path(gateway.__file__).resolve().parent.parent


def wsdl_dir() -> Path:
    return share_dir() / "wsdl"


def schema_dir() -> Path:
    return share_dir() / "schemas"


@lru_cache(maxsize=64)
def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _plain_file(folder: Path, name: str, suffix: str) -> Path | None:
    """`folder/name` if `name` is a plain file name with `suffix`, else None."""
    if not name.endswith(suffix) or _FILE_NAME.match(name) is None or ".." in name:
        return None
    return folder / name


def _endpoint_url(base_url: str, endpoint_path: str) -> str:
    return base_url.rstrip("/") + "/" + endpoint_path.lstrip("/")


def _serialize(root: etree._Element) -> bytes:
    # The whole tree, so the header comment before the root element is kept.
    data: bytes = etree.tostring(root.getroottree(), xml_declaration=True, encoding="UTF-8")
    return data


def _rewrite_schema_locations(root: etree._Element, endpoint_url: str, prefix: str) -> None:
    """Point `xs:import`/`xs:include` at `endpoint_url?xsd=NAME` for our schema names.

    `prefix` is what the placeholder looks like before the name ("?xsd=" in WSDLs, "" in our
    schemas). Locations that are not one of our schema files are left untouched.
    """
    for tag in ("import", "include", "redefine"):
        for el in root.iter(f"{{{_XS}}}{tag}"):
            loc = el.get("schemaLocation")
            if loc is None or not loc.startswith(prefix):
                continue
            name = loc[len(prefix):]
            if _plain_file(schema_dir(), name, ".xsd") is None:
                continue
            el.set("schemaLocation", endpoint_url + _XSD_QUERY + name)


def wsdl_document(endpoint_path: str, wsdl_file: str, base_url: str) -> bytes:
    """The WSDL `wsdl/<wsdl_file>` as served at `base_url + endpoint_path + "?wsdl"`.

    `base_url` is scheme, host and port as the client reached us (e.g. "https://gw:8443").
    Raises FileNotFoundError if the WSDL file is missing (a packaging error, not bad input).
    """
    path = _plain_file(wsdl_dir(), wsdl_file, ".wsdl")
    data = _read(path) if path is not None else None
    if data is None:
        raise FileNotFoundError(f"WSDL file {wsdl_file!r} not found in {wsdl_dir()}")
    root = parse_xml(data)
    url = _endpoint_url(base_url, endpoint_path)
    for ns in (_SOAP12_WSDL, _SOAP11_WSDL):
        for address in root.iter(f"{{{ns}}}address"):
            address.set("location", url)
    _rewrite_schema_locations(root, url, _XSD_QUERY)
    return _serialize(root)


def xsd_document(name: str, endpoint_path: str, base_url: str) -> bytes | None:
    """Our schema `schemas/<name>` as served at `...endpoint_path?xsd=<name>`, or None.

    None for anything that is not the plain name of a schema file we ship (unknown names,
    paths, traversal attempts), so the caller answers 404.
    """
    path = _plain_file(schema_dir(), name, ".xsd")
    data = _read(path) if path is not None else None
    if data is None:
        return None
    root = parse_xml(data)
    _rewrite_schema_locations(root, _endpoint_url(base_url, endpoint_path), "")
    return _serialize(root)


def schema_names() -> tuple[str, ...]:
    """File names of the schemas we serve, sorted."""
    folder = schema_dir()
    if not folder.is_dir():
        return ()
    return tuple(sorted(p.name for p in folder.iterdir()
                        if p.is_file() and _plain_file(folder, p.name, ".xsd") is not None))
