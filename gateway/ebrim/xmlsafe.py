"""Hardened XML parsing: the only way untrusted XML enters the gateway.

No DTD is loaded, no entity is resolved, nothing is fetched from the network, and a document
that carries a DOCTYPE at all is refused (`UnsafeXmlError`), which rules out entity expansion
("billion laughs"), external entities and DTD-based attacks whatever libxml2 would do with
them. Text nodes are limited by libxml2's default (huge_tree off: 10 MB per text node), so a
large document must travel as an MTOM attachment, not as inline base64.

lxml parser objects must not be shared between threads, so `parse_xml` keeps one parser per
thread, built from `PARSER_OPTIONS`; `PARSER` is a module-level instance for single-threaded
callers (tests, command-line tools).
"""

from __future__ import annotations

import threading
from os import PathLike
from typing import Any

from lxml import etree

PARSER_OPTIONS: dict[str, Any] = {
    "resolve_entities": False,
    "no_network": True,
    "load_dtd": False,
    "dtd_validation": False,
    "attribute_defaults": False,
    "huge_tree": False,
    "remove_blank_text": False,
    "recover": False,
}


class UnsafeXmlError(ValueError):
    """The document uses a DTD / DOCTYPE (entities, external subsets): refused."""


class MalformedXmlError(ValueError):
    """The document is not well-formed XML (or is empty)."""


def make_parser() -> etree.XMLParser:
    """A new hardened parser (one per thread)."""
    return etree.XMLParser(**PARSER_OPTIONS)


PARSER = make_parser()
_local = threading.local()


def _parser() -> etree.XMLParser:
    p = getattr(_local, "parser", None)
    if p is None:
        p = make_parser()
        _local.parser = p
    return p


def _check_tree(tree: etree._ElementTree) -> None:
    info = tree.docinfo
    if getattr(info, "doctype", "") or info.internalDTD is not None or info.externalDTD is not None:
        raise UnsafeXmlError("XML with a DOCTYPE / DTD is not accepted")
    for node in tree.iter(etree.Entity):  # defensive: no DOCTYPE means no entity can be declared
        raise UnsafeXmlError(f"XML entity reference {node.text!r} is not accepted")


def _error(exc: etree.XMLSyntaxError) -> MalformedXmlError:
    msg = str(exc) or "not well-formed XML"
    return MalformedXmlError(f"not well-formed XML: {msg}")


def parse_xml(data: bytes) -> etree._Element:
    """Parse `data` with the hardened parser and return the root element.

    Raises `UnsafeXmlError` for any DOCTYPE and `MalformedXmlError` for anything that is not
    well-formed (including empty input).
    """
    if not data or not data.strip():
        raise MalformedXmlError("empty XML document")
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        # libxml2 may refuse a DTD-based attack (amplification) before we see the DOCTYPE.
        if b"<!DOCTYPE" in data[:4096] or b"<!ENTITY" in data[:65536]:
            raise UnsafeXmlError("XML with a DOCTYPE / DTD is not accepted") from exc
        raise _error(exc) from exc
    if root is None:
        raise MalformedXmlError("empty XML document")
    _check_tree(root.getroottree())
    return root


def parse_xml_file(path: str | PathLike[str]) -> etree._Element:
    """`parse_xml` for a file (read by libxml2 itself, not loaded into a bytes object)."""
    try:
        tree = etree.parse(str(path), _parser())
    except etree.XMLSyntaxError as exc:
        with open(path, "rb") as fh:
            head = fh.read(65536)
        if b"<!DOCTYPE" in head or b"<!ENTITY" in head:
            raise UnsafeXmlError("XML with a DOCTYPE / DTD is not accepted") from exc
        raise _error(exc) from exc
    _check_tree(tree)
    return tree.getroot()
