"""IHE-named accessors on ebRIM model objects (ITI TF-3 4.2.3, 4.2.5).

DocumentEntry = ExtrinsicObject with the stable or on-demand objectType; SubmissionSet and
Folder = RegistryPackage classified with the SubmissionSet / Folder node (the Classification
nested in the package or a top-level one in the same list: both occur in real messages).
`classify_submission` sorts a RegistryObjectList into those roles. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.ebrim.model import (
    Association,
    Classification,
    ExternalIdentifier,
    ExtrinsicObject,
    Identifiable,
    ObjectRef,
    RegistryObject,
    RegistryPackage,
    Slot,
)
from gateway.ns import (
    DocumentEntryScheme,
    FolderScheme,
    ObjectType,
    SubmissionSetScheme,
)

DOCUMENT_ENTRY_TYPES = (ObjectType.STABLE_DOCUMENT_ENTRY, ObjectType.ON_DEMAND_DOCUMENT_ENTRY)

HasSlots = RegistryObject | Classification | ExternalIdentifier


@dataclass(frozen=True)
class Code:
    """A coded value: Classification@nodeRepresentation, its codingScheme slot, its Name."""

    code: str
    scheme_name: str | None
    display: str | None


@dataclass(frozen=True)
class Submission:
    """The objects of one RegistryObjectList, sorted by role."""

    submission_set: RegistryPackage | None
    document_entries: tuple[ExtrinsicObject, ...] = ()
    folders: tuple[RegistryPackage, ...] = ()
    associations: tuple[Association, ...] = ()
    classifications: tuple[Classification, ...] = ()  # top-level ones only
    external_identifiers: tuple[ExternalIdentifier, ...] = ()  # top-level ones only
    object_refs: tuple[ObjectRef, ...] = ()
    # Every package classified as SubmissionSet (a valid submission has exactly one).
    submission_sets: tuple[RegistryPackage, ...] = ()
    # Packages with neither node, and ExtrinsicObjects of another objectType.
    other: tuple[Identifiable, ...] = ()


# --- slots -------------------------------------------------------------------------------------


def slot(obj: HasSlots, name: str) -> Slot | None:
    for s in obj.slots:
        if s.name == name:
            return s
    return None


def slot_values(obj: HasSlots, name: str) -> tuple[str, ...]:
    """All values of the slot(s) named `name` (several slots of one name are concatenated)."""
    out: list[str] = []
    for s in obj.slots:
        if s.name == name:
            out.extend(s.values)
    return tuple(out)


def slot_value(obj: HasSlots, name: str) -> str | None:
    """The first value of slot `name`, or None."""
    v = slot_values(obj, name)
    return v[0] if v else None


# --- external identifiers and codes ------------------------------------------------------------


def external_ids(obj: RegistryObject, scheme: str) -> tuple[ExternalIdentifier, ...]:
    return tuple(x for x in obj.external_identifiers if x.identification_scheme == scheme)


def external_id(obj: RegistryObject, scheme: str) -> str | None:
    """The value of the (first) ExternalIdentifier of `scheme`, or None."""
    x = external_ids(obj, scheme)
    return x[0].value if x else None


def classifications(obj: RegistryObject, scheme: str) -> tuple[Classification, ...]:
    return tuple(c for c in obj.classifications if c.classification_scheme == scheme)


def _display(c: Classification) -> str | None:
    return c.name[0].value if c.name else None


def code_of(c: Classification) -> Code:
    return Code(code=c.node_representation or "", scheme_name=slot_value(c, "codingScheme"),
                display=_display(c))


def codes(obj: RegistryObject, scheme: str) -> tuple[Code, ...]:
    """The coded values of `obj` in classification scheme `scheme` (e.g. classCode)."""
    return tuple(code_of(c) for c in classifications(obj, scheme))


# --- roles -------------------------------------------------------------------------------------


def is_document_entry(obj: object) -> bool:
    return isinstance(obj, ExtrinsicObject) and obj.object_type in DOCUMENT_ENTRY_TYPES


def _has_node(pkg: RegistryPackage, node: str, objects: Iterable[Identifiable]) -> bool:
    if any(c.classification_node == node for c in pkg.classifications):
        return True
    return any(isinstance(o, Classification) and o.classified_object == pkg.id
               and o.classification_node == node for o in objects)


def is_submission_set(obj: object, objects: Iterable[Identifiable] = ()) -> bool:
    return isinstance(obj, RegistryPackage) and _has_node(obj, SubmissionSetScheme.NODE, objects)


def is_folder(obj: object, objects: Iterable[Identifiable] = ()) -> bool:
    return isinstance(obj, RegistryPackage) and _has_node(obj, FolderScheme.NODE, objects)


def patient_id(obj: RegistryObject) -> str | None:
    """XDSDocumentEntry / XDSSubmissionSet / XDSFolder .patientId of `obj`."""
    for scheme in (DocumentEntryScheme.PATIENT_ID, SubmissionSetScheme.PATIENT_ID,
                   FolderScheme.PATIENT_ID):
        v = external_id(obj, scheme)
        if v is not None:
            return v
    return None


def unique_id(obj: RegistryObject) -> str | None:
    """XDSDocumentEntry / XDSSubmissionSet / XDSFolder .uniqueId of `obj`."""
    for scheme in (DocumentEntryScheme.UNIQUE_ID, SubmissionSetScheme.UNIQUE_ID,
                   FolderScheme.UNIQUE_ID):
        v = external_id(obj, scheme)
        if v is not None:
            return v
    return None


def classify_submission(objects: Iterable[Identifiable]) -> Submission:
    """Sort a RegistryObjectList into SubmissionSet, DocumentEntries, Folders, ..."""
    objs = tuple(objects)
    sets: list[RegistryPackage] = []
    entries: list[ExtrinsicObject] = []
    folders: list[RegistryPackage] = []
    assocs: list[Association] = []
    cls: list[Classification] = []
    xids: list[ExternalIdentifier] = []
    refs: list[ObjectRef] = []
    other: list[Identifiable] = []
    # Top-level node classifications, indexed once (is_submission_set would rescan per package).
    nodes: dict[str, set[str]] = {}
    for o in objs:
        if isinstance(o, Classification) and o.classification_node:
            nodes.setdefault(o.classified_object, set()).add(o.classification_node)
    for o in objs:
        if isinstance(o, RegistryPackage):
            ns = nodes.get(o.id, set()) | {c.classification_node for c in o.classifications
                                            if c.classification_node}
            if SubmissionSetScheme.NODE in ns:
                sets.append(o)
            elif FolderScheme.NODE in ns:
                folders.append(o)
            else:
                other.append(o)
        elif isinstance(o, ExtrinsicObject):
            if is_document_entry(o):
                entries.append(o)
            else:
                other.append(o)
        elif isinstance(o, Association):
            assocs.append(o)
        elif isinstance(o, Classification):
            cls.append(o)
        elif isinstance(o, ExternalIdentifier):
            xids.append(o)
        else:
            refs.append(o)
    return Submission(
        submission_set=sets[0] if sets else None, document_entries=tuple(entries),
        folders=tuple(folders), associations=tuple(assocs), classifications=tuple(cls),
        external_identifiers=tuple(xids), object_refs=tuple(refs), submission_sets=tuple(sets),
        other=tuple(other))
