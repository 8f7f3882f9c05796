"""ebRIM model objects -> lxml elements, in the element order of the official schemas
(rim.xsd, rs.xsd, lcm.xsd, query.xsd, XDS.b_DocumentRepository.xsd).

The inverse of gateway.ebrim.parse: `parse_x(render_x(v)) == v` for every model type. Documents
of retrieve responses are written as `<xop:Include href="cid:..."/>` with a Content-ID chosen by
the caller; the MTOM layer streams the files. No I/O here, except `render_provide_and_register`
reading small documents for inline base64 when no Content-ID function is given (clients, tests).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import quote

from lxml import etree

from gateway.ebrim.model import (
    AdhocQuery,
    Association,
    Classification,
    DocumentContent,
    DocumentRequest,
    ExternalIdentifier,
    ExtrinsicObject,
    Identifiable,
    LocalizedString,
    ObjectRef,
    ProvideAndRegisterRequest,
    RegistryObject,
    RegistryPackage,
    RetrievedDocument,
    RetrieveDocumentSetRequest,
    Slot,
    SubmitObjectsRequest,
    VersionInfo,
)
from gateway.errors import XdsError
from gateway.ns import LCM, QUERY, RIM, RS, XDSB, XOP, Severity, q

XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"

_NS_RIM = {"rim": RIM}
_NS_RS = {"rs": RS, "rim": RIM}
_NS_LCM = {"lcm": LCM, "rim": RIM, "rs": RS}
_NS_QUERY = {"query": QUERY, "rim": RIM, "rs": RS}
_NS_XDSB = {"xdsb": XDSB, "lcm": LCM, "rim": RIM, "rs": RS, "xop": XOP}


def _el(parent: etree._Element | None, ns: str, local: str,
        attrs: dict[str, str | None] | None = None,
        nsmap: dict[str, str] | None = None) -> etree._Element:
    clean = {k: v for k, v in (attrs or {}).items() if v is not None}
    if parent is None:
        return etree.Element(q(ns, local), clean, nsmap=nsmap)
    return etree.SubElement(parent, q(ns, local), clean)


def _text_el(parent: etree._Element, ns: str, local: str, text: str) -> etree._Element:
    e = etree.SubElement(parent, q(ns, local))
    e.text = text
    return e


def _bool(v: bool) -> str:
    return "true" if v else "false"


# --- RIM building blocks -----------------------------------------------------------------------


def render_slot(parent: etree._Element, slot: Slot) -> etree._Element:
    s = _el(parent, RIM, "Slot", {"name": slot.name, "slotType": slot.slot_type})
    vl = _el(s, RIM, "ValueList")
    for v in slot.values:
        _text_el(vl, RIM, "Value", v)
    return s


def _slots(parent: etree._Element, slots: Iterable[Slot]) -> None:
    for s in slots:
        render_slot(parent, s)


def _istring(parent: etree._Element, local: str,
             strings: tuple[LocalizedString, ...]) -> None:
    if not strings:
        return
    holder = _el(parent, RIM, local)
    for ls in strings:
        _el(holder, RIM, "LocalizedString",
            {XML_LANG: ls.lang, "charset": ls.charset, "value": ls.value})


def _version(parent: etree._Element, local: str, v: VersionInfo | None) -> None:
    if v is not None:
        _el(parent, RIM, local, {"versionName": v.version_name, "comment": v.comment})


def render_classification(parent: etree._Element | None, c: Classification) -> etree._Element:
    e = _el(parent, RIM, "Classification", {
        "id": c.id, "home": c.home, "objectType": c.object_type,
        "classificationScheme": c.classification_scheme,
        "classifiedObject": c.classified_object,
        "classificationNode": c.classification_node,
        "nodeRepresentation": c.node_representation,
    }, nsmap=_NS_RIM if parent is None else None)
    _slots(e, c.slots)
    _istring(e, "Name", c.name)
    _istring(e, "Description", c.description)
    return e


def render_external_identifier(parent: etree._Element | None,
                               x: ExternalIdentifier) -> etree._Element:
    e = _el(parent, RIM, "ExternalIdentifier", {
        "id": x.id, "home": x.home, "objectType": x.object_type,
        "registryObject": x.registry_object, "identificationScheme": x.identification_scheme,
        "value": x.value,
    }, nsmap=_NS_RIM if parent is None else None)
    _slots(e, x.slots)
    _istring(e, "Name", x.name)
    _istring(e, "Description", x.description)
    return e


def _registry_object(parent: etree._Element | None, local: str, o: RegistryObject,
                     extra: dict[str, str | None]) -> etree._Element:
    attrs: dict[str, str | None] = {
        "id": o.id, "home": o.home, "lid": o.lid, "objectType": o.object_type,
        "status": o.status}
    attrs.update(extra)
    e = _el(parent, RIM, local, attrs, nsmap=_NS_RIM if parent is None else None)
    # rim.xsd RegistryObjectType: Slot*, Name?, Description?, VersionInfo?, Classification*,
    # ExternalIdentifier*
    _slots(e, o.slots)
    _istring(e, "Name", o.name)
    _istring(e, "Description", o.description)
    _version(e, "VersionInfo", o.version_info)
    for c in o.classifications:
        render_classification(e, c)
    for x in o.external_identifiers:
        render_external_identifier(e, x)
    return e


def render_identifiable(parent: etree._Element | None, obj: Identifiable) -> etree._Element:
    if isinstance(obj, ExtrinsicObject):
        e = _registry_object(parent, "ExtrinsicObject", obj, {
            "mimeType": obj.mime_type,
            "isOpaque": None if obj.is_opaque is None else _bool(obj.is_opaque)})
        _version(e, "ContentVersionInfo", obj.content_version_info)
        return e
    if isinstance(obj, RegistryPackage):
        return _registry_object(parent, "RegistryPackage", obj, {})
    if isinstance(obj, Association):
        return _registry_object(parent, "Association", obj, {
            "associationType": obj.association_type, "sourceObject": obj.source_object,
            "targetObject": obj.target_object})
    if isinstance(obj, Classification):
        return render_classification(parent, obj)
    if isinstance(obj, ExternalIdentifier):
        return render_external_identifier(parent, obj)
    if isinstance(obj, ObjectRef):
        return _el(parent, RIM, "ObjectRef", {"id": obj.id, "home": obj.home},
                   nsmap=_NS_RIM if parent is None else None)
    raise TypeError(f"not an ebRIM object: {type(obj).__name__}")


def render_registry_object_list(objects: Iterable[Identifiable],
                                parent: etree._Element | None = None) -> etree._Element:
    """rim:RegistryObjectList with `objects` in order (as a child of `parent` if given)."""
    rol = _el(parent, RIM, "RegistryObjectList", nsmap=_NS_RIM if parent is None else None)
    for o in objects:
        render_identifiable(rol, o)
    return rol


def _slot_list(parent: etree._Element, ns: str, local: str, slots: tuple[Slot, ...]) -> None:
    if slots:
        holder = _el(parent, ns, local)
        _slots(holder, slots)


def render_submit_objects_request(req: SubmitObjectsRequest,
                                  parent: etree._Element | None = None) -> etree._Element:
    """lcm:SubmitObjectsRequest: RequestSlotList?, RegistryObjectList."""
    e = _el(parent, LCM, "SubmitObjectsRequest", {"id": req.id, "comment": req.comment},
            nsmap=_NS_LCM if parent is None else None)
    _slot_list(e, RS, "RequestSlotList", req.slots)
    render_registry_object_list(req.objects, e)
    return e


def render_provide_and_register(
        req: ProvideAndRegisterRequest, *,
        content_id_for: Callable[[DocumentContent], str] | None = None) -> etree._Element:
    """xds-b:ProvideAndRegisterDocumentSetRequest.

    With `content_id_for`, each Document is `<xop:Include href="cid:..."/>` (the caller sends
    the files as MTOM parts); without, the file is read and written inline as base64 (small
    documents only: clients and tests).
    """
    e = _el(None, XDSB, "ProvideAndRegisterDocumentSetRequest", nsmap=_NS_XDSB)
    render_submit_objects_request(req.submission, e)
    for d in req.documents:
        doc = _el(e, XDSB, "Document", {"id": d.id})
        if content_id_for is not None:
            _include(doc, content_id_for(d))
        else:
            doc.text = base64.b64encode(d.path.read_bytes()).decode("ascii")
    return e


def _include(parent: etree._Element, content_id: str) -> None:
    _el(parent, XOP, "Include", {"href": "cid:" + quote(content_id, safe="@!$&'()*+,;=:._~-")})


# --- responses ---------------------------------------------------------------------------------


def _error_list(parent: etree._Element, errors: Sequence[XdsError],
                location: str | None) -> None:
    if not errors:
        return
    highest = Severity.ERROR if any(x.is_error for x in errors) else Severity.WARNING
    lst = _el(parent, RS, "RegistryErrorList", {"highestSeverity": highest})
    for x in errors:
        _el(lst, RS, "RegistryError", {
            "codeContext": x.context, "errorCode": x.code, "severity": x.severity,
            "location": location if location is not None else x.location})


def render_registry_response(status: str, errors: Sequence[XdsError] = (), *,
                             location: str | None = None,
                             parent: etree._Element | None = None) -> etree._Element:
    """rs:RegistryResponse with a RegistryErrorList when there are errors.

    `location`, when given, overrides every error's location (a responding gateway sets it to
    its homeCommunityId).
    """
    e = _el(parent, RS, "RegistryResponse", {"status": status},
            nsmap=_NS_RS if parent is None else None)
    _error_list(e, errors, location)
    return e


def render_adhoc_query_response(status: str, objects_or_refs: Iterable[Identifiable],
                                errors: Sequence[XdsError] = (), *,
                                location: str | None = None,
                                start_index: int | None = None,
                                total_result_count: int | None = None) -> etree._Element:
    """query:AdhocQueryResponse: RegistryErrorList?, RegistryObjectList (always present).

    For returnType ObjectRef pass `ObjectRef` values; for LeafClass the full objects.
    """
    e = _el(None, QUERY, "AdhocQueryResponse", {
        "status": status,
        "startIndex": None if start_index is None else str(start_index),
        "totalResultCount": None if total_result_count is None else str(total_result_count),
    }, nsmap=_NS_QUERY)
    _error_list(e, errors, location)
    render_registry_object_list(objects_or_refs, e)
    return e


def render_retrieve_document_set_response(
        status: str, documents: Sequence[RetrievedDocument], errors: Sequence[XdsError] = (),
        *, content_id_for: Callable[[RetrievedDocument], str],
        location: str | None = None) -> etree._Element:
    """xds-b:RetrieveDocumentSetResponse: rs:RegistryResponse, then one DocumentResponse per
    document with its bytes as `<xop:Include href="cid:CID"/>`, CID = content_id_for(doc)."""
    e = _el(None, XDSB, "RetrieveDocumentSetResponse", nsmap=_NS_XDSB)
    render_registry_response(status, errors, location=location, parent=e)
    for d in documents:
        r = _el(e, XDSB, "DocumentResponse")
        if d.home_community_id is not None:
            _text_el(r, XDSB, "HomeCommunityId", d.home_community_id)
        _text_el(r, XDSB, "RepositoryUniqueId", d.repository_unique_id)
        _text_el(r, XDSB, "DocumentUniqueId", d.document_unique_id)
        if d.new_repository_unique_id is not None:
            _text_el(r, XDSB, "NewRepositoryUniqueId", d.new_repository_unique_id)
        if d.new_document_unique_id is not None:
            _text_el(r, XDSB, "NewDocumentUniqueId", d.new_document_unique_id)
        _text_el(r, XDSB, "mimeType", d.mime_type)
        _include(_el(r, XDSB, "Document"), content_id_for(d))
    return e


# --- requests (clients, tests) -----------------------------------------------------------------


def render_adhoc_query_request(query: AdhocQuery) -> etree._Element:
    """query:AdhocQueryRequest: ResponseOption, rim:AdhocQuery with the parameter slots."""
    e = _el(None, QUERY, "AdhocQueryRequest", {
        "federated": _bool(query.federated) if query.federated else None,
        "startIndex": str(query.start_index) if query.start_index else None,
        "maxResults": str(query.max_results) if query.max_results != -1 else None,
    }, nsmap=_NS_QUERY)
    _el(e, QUERY, "ResponseOption", {
        "returnType": query.return_type,
        "returnComposedObjects": _bool(query.return_composed_objects)})
    aq = _el(e, RIM, "AdhocQuery", {"id": query.query_id, "home": query.home})
    _slots(aq, query.parameters)
    return e


def render_document_request(parent: etree._Element, r: DocumentRequest) -> etree._Element:
    d = _el(parent, XDSB, "DocumentRequest")
    if r.home_community_id is not None:
        _text_el(d, XDSB, "HomeCommunityId", r.home_community_id)
    _text_el(d, XDSB, "RepositoryUniqueId", r.repository_unique_id)
    _text_el(d, XDSB, "DocumentUniqueId", r.document_unique_id)
    return d


def render_retrieve_document_set_request(req: RetrieveDocumentSetRequest) -> etree._Element:
    e = _el(None, XDSB, "RetrieveDocumentSetRequest", nsmap={"xdsb": XDSB})
    for r in req.documents:
        render_document_request(e, r)
    return e


__all__ = [
    "render_adhoc_query_request",
    "render_adhoc_query_response",
    "render_classification",
    "render_document_request",
    "render_external_identifier",
    "render_identifiable",
    "render_provide_and_register",
    "render_registry_object_list",
    "render_registry_response",
    "render_retrieve_document_set_request",
    "render_retrieve_document_set_response",
    "render_slot",
    "render_submit_objects_request",
]
