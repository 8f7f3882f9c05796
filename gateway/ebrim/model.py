"""ebRIM 3.0 registry objects as immutable dataclasses (no I/O, no XML).

The shapes follow rim.xsd: every identifiable object has an id, optional home, slots, name and
description; registry objects add classifications, external identifiers, status, objectType,
lid and versionInfo. DocumentEntry (ExtrinsicObject), SubmissionSet and Folder
(RegistryPackage) are recognised by objectType / classification; `gateway.ebrim.metadata`
gives them IHE-named accessors. Tuples everywhere so that objects compare and hash by value and
`parse(render(x)) == x` holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import XdsError
from gateway.ns import ObjectType


@dataclass(frozen=True)
class LocalizedString:
    value: str
    lang: str | None = None
    charset: str | None = None


@dataclass(frozen=True)
class Slot:
    name: str
    values: tuple[str, ...] = ()
    slot_type: str | None = None


@dataclass(frozen=True)
class Classification:
    id: str
    classified_object: str
    classification_scheme: str | None = None
    classification_node: str | None = None
    node_representation: str | None = None
    name: tuple[LocalizedString, ...] = ()
    description: tuple[LocalizedString, ...] = ()
    slots: tuple[Slot, ...] = ()
    home: str | None = None
    object_type: str | None = None


@dataclass(frozen=True)
class ExternalIdentifier:
    id: str
    registry_object: str
    identification_scheme: str
    value: str
    name: tuple[LocalizedString, ...] = ()
    description: tuple[LocalizedString, ...] = ()
    slots: tuple[Slot, ...] = ()
    home: str | None = None
    object_type: str | None = None


@dataclass(frozen=True)
class VersionInfo:
    version_name: str | None = None
    comment: str | None = None


@dataclass(frozen=True)
class RegistryObject:
    """Fields common to ExtrinsicObject, RegistryPackage and Association."""

    id: str
    home: str | None = None
    lid: str | None = None
    status: str | None = None
    object_type: str | None = None
    name: tuple[LocalizedString, ...] = ()
    description: tuple[LocalizedString, ...] = ()
    version_info: VersionInfo | None = None
    slots: tuple[Slot, ...] = ()
    classifications: tuple[Classification, ...] = ()
    external_identifiers: tuple[ExternalIdentifier, ...] = ()


@dataclass(frozen=True)
class ExtrinsicObject(RegistryObject):
    """A DocumentEntry (objectType stable or on-demand)."""

    mime_type: str | None = None
    is_opaque: bool | None = None
    content_version_info: VersionInfo | None = None


@dataclass(frozen=True)
class RegistryPackage(RegistryObject):
    """A SubmissionSet or Folder, told apart by the Classification to its node."""

    object_type: str | None = ObjectType.REGISTRY_PACKAGE


@dataclass(frozen=True)
class Association(RegistryObject):
    association_type: str = ""
    source_object: str = ""
    target_object: str = ""
    object_type: str | None = ObjectType.ASSOCIATION


@dataclass(frozen=True)
class ObjectRef:
    id: str
    home: str | None = None


# One object of a RegistryObjectList / RegistryObjectListType, in document order.
Identifiable = ExtrinsicObject | RegistryPackage | Association | Classification | \
    ExternalIdentifier | ObjectRef


@dataclass(frozen=True)
class SubmitObjectsRequest:
    """lcm:SubmitObjectsRequest (ITI-42, and the metadata part of ITI-41)."""

    objects: tuple[Identifiable, ...] = ()
    slots: tuple[Slot, ...] = ()
    id: str | None = None
    comment: str | None = None


@dataclass(frozen=True)
class DocumentContent:
    """The bytes of one xds-b:Document of an ITI-41 request, spooled to a file.

    `path` is a temporary file owned by the request (the MTOM layer or the base64 decoder
    wrote it); `size` is its length in bytes; `sha1` its lowercase hex SHA-1 when the writer
    computed it while spooling (None when unknown).
    """

    id: str
    path: Path
    size: int
    sha1: str | None = None


@dataclass(frozen=True)
class ProvideAndRegisterRequest:
    submission: SubmitObjectsRequest
    documents: tuple[DocumentContent, ...] = ()


@dataclass(frozen=True)
class AdhocQuery:
    """query:AdhocQueryRequest: the stored query id, its parameters, the return type."""

    query_id: str
    parameters: tuple[Slot, ...] = ()
    return_type: str = "LeafClass"
    home: str | None = None
    return_composed_objects: bool = True
    start_index: int = 0
    max_results: int = -1
    federated: bool = False


@dataclass(frozen=True)
class DocumentRequest:
    """xds-b:DocumentRequest of ITI-43 / ITI-39 (and inside RAD-69 SeriesRequest)."""

    repository_unique_id: str
    document_unique_id: str
    home_community_id: str | None = None


@dataclass(frozen=True)
class RetrieveDocumentSetRequest:
    documents: tuple[DocumentRequest, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class RetrievedDocument:
    """One xds-b:DocumentResponse; the bytes are a file (streamed out as an MTOM part)."""

    repository_unique_id: str
    document_unique_id: str
    mime_type: str
    path: Path
    size: int
    home_community_id: str | None = None
    new_repository_unique_id: str | None = None
    new_document_unique_id: str | None = None
    # The bytes are `size` bytes of `path` from `offset` (a file shared by several documents,
    # gateway.dicom.cget's segments); None: the whole file.
    offset: int | None = None


# --- Responses, as parsed by clients and tests (gateway.ebrim.parse) ---------------------------
# (Added for the parse/render layer; the server side renders from status + XdsError values.)


@dataclass(frozen=True)
class RegistryResponse:
    """rs:RegistryResponse: status and RegistryErrorList."""

    status: str
    errors: tuple[XdsError, ...] = ()
    request_id: str | None = None


@dataclass(frozen=True)
class AdhocQueryResponse:
    """query:AdhocQueryResponse: status, the objects (or ObjectRefs), errors."""

    status: str
    objects: tuple[Identifiable, ...] = ()
    errors: tuple[XdsError, ...] = ()
    start_index: int | None = None
    total_result_count: int | None = None


@dataclass(frozen=True)
class DocumentResponseRef:
    """One parsed xds-b:DocumentResponse: the ids, and either the Content-ID of the MTOM part
    (`content_id`, no "cid:") or the inline bytes (`data`, small documents only)."""

    repository_unique_id: str
    document_unique_id: str
    mime_type: str
    home_community_id: str | None = None
    new_repository_unique_id: str | None = None
    new_document_unique_id: str | None = None
    content_id: str | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class RetrieveDocumentSetResponse:
    """xds-b:RetrieveDocumentSetResponse as parsed (clients and tests)."""

    status: str
    documents: tuple[DocumentResponseRef, ...] = ()
    errors: tuple[XdsError, ...] = ()
