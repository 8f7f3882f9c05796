"""The Document Registry's metadata store: ebRIM objects in SQL (SQLAlchemy Core 2.x).

`RegistryStore(database_url)` keeps DocumentEntries, SubmissionSets, Folders and
Associations; SQLite ("sqlite:///path", the default) or PostgreSQL ("postgresql://...",
driven by psycopg 3). Several worker processes share one database: the engine is created
lazily in the process that uses it (after a fork, a new one), every call is one short
transaction, SQLite runs in WAL mode with a busy timeout and takes its write lock at the
start of a submission (BEGIN IMMEDIATE) so that concurrent submissions queue instead of
failing.

`submit()` stores the objects of one submission atomically and applies the document
lifecycle (RPLC / XFRM_RPLC deprecate the replaced DocumentEntry in the same transaction);
conflicts raise `XdsFailure` and leave nothing stored. The readers return model objects
exactly as they were stored (JSON in the `content` column, see `gateway.registry.codec`).
The object ids given to `submit()` must already be UUIDs (`assign_uuids` runs before).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    String,
    and_,
    create_engine,
    event,
    exists,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.sql.elements import ColumnElement

from gateway.ebrim.model import (
    Association,
    Classification,
    ExternalIdentifier,
    ExtrinsicObject,
    Identifiable,
    RegistryObject,
    RegistryPackage,
    Slot,
)
from gateway.errors import XdsError, XdsFailure
from gateway.ns import (
    AssociationType,
    AvailabilityStatus,
    DocumentEntryScheme,
    ErrorCode,
    FolderScheme,
    SubmissionSetScheme,
)
from gateway.registry import codec
from gateway.registry.schema import association, author, metadata, object_code, reference_id
from gateway.registry.schema import registry_object as ro

log = logging.getLogger(__name__)

REFERENCE_ID_LIST = "urn:ihe:iti:xds:2013:referenceIdList"
# Batches of ids in IN (...) clauses stay below SQLite's bound-parameter limit.
_CHUNK = 500


class Kind:
    DOCUMENT_ENTRY = "DocumentEntry"
    SUBMISSION_SET = "SubmissionSet"
    FOLDER = "Folder"
    ASSOCIATION = "Association"


_PATIENT_SCHEMES = {
    Kind.DOCUMENT_ENTRY: DocumentEntryScheme.PATIENT_ID,
    Kind.SUBMISSION_SET: SubmissionSetScheme.PATIENT_ID,
    Kind.FOLDER: FolderScheme.PATIENT_ID,
}
_UNIQUE_ID_SCHEMES = {
    Kind.DOCUMENT_ENTRY: DocumentEntryScheme.UNIQUE_ID,
    Kind.SUBMISSION_SET: SubmissionSetScheme.UNIQUE_ID,
    Kind.FOLDER: FolderScheme.UNIQUE_ID,
}
_AUTHOR_SCHEMES = {DocumentEntryScheme.AUTHOR, SubmissionSetScheme.AUTHOR}
# Classification schemes that are not codes (authors) or mark the kind (nodes).
_NOT_CODES = _AUTHOR_SCHEMES | {SubmissionSetScheme.NODE, FolderScheme.NODE}
_REPLACING = {AssociationType.RPLC, AssociationType.XFRM_RPLC}
_DOCUMENT_RELATIONS = {AssociationType.RPLC, AssociationType.XFRM_RPLC, AssociationType.APND,
                       AssociationType.XFRM, AssociationType.SIGNS}


def engine_url(database_url: str) -> str:
    """The SQLAlchemy URL for a configured database URL (postgresql:// -> psycopg 3)."""
    if database_url.startswith("postgresql://"):
        return "postgresql+psycopg://" + database_url[len("postgresql://"):]
    if database_url.startswith("postgres://"):
        return "postgresql+psycopg://" + database_url[len("postgres://"):]
    return database_url


# --- Reading the indexed values off the model ----------------------------------------------

def _slot(obj: RegistryObject | Classification, name: str) -> str | None:
    for s in obj.slots:
        if s.name == name:
            return s.values[0] if s.values else None
    return None


def _slot_values(obj: RegistryObject | Classification, name: str) -> tuple[str, ...]:
    return tuple(v for s in obj.slots if s.name == name for v in s.values)


def _external_id(obj: RegistryObject, scheme: str) -> str | None:
    for e in obj.external_identifiers:
        if e.identification_scheme == scheme:
            return e.value
    return None


def _package_kind(pkg: RegistryPackage, extra: Iterable[Classification]) -> str | None:
    for c in (*pkg.classifications, *extra):
        if c.classification_node == SubmissionSetScheme.NODE:
            return Kind.SUBMISSION_SET
        if c.classification_node == FolderScheme.NODE:
            return Kind.FOLDER
    return None


def kind_of(obj: Identifiable, extra: Iterable[Classification] = ()) -> str | None:
    """DocumentEntry / SubmissionSet / Folder / Association, or None for anything else."""
    if isinstance(obj, ExtrinsicObject):
        return Kind.DOCUMENT_ENTRY
    if isinstance(obj, Association):
        return Kind.ASSOCIATION
    if isinstance(obj, RegistryPackage):
        return _package_kind(obj, extra)
    return None


def _hm(message: str) -> XdsError:
    return XdsError(ErrorCode.REGISTRY_METADATA_ERROR, message)


@dataclass(frozen=True)
class StoredObject:
    """One row of `registry_object` as the queries see it."""

    id: str
    kind: str
    status: str
    unique_id: str | None
    patient_id: str | None
    obj: ExtrinsicObject | RegistryPackage | Association


# --- The store -------------------------------------------------------------------------------

class RegistryStore:
    """ebRIM metadata in SQL. Safe to share between threads; one engine per process."""

    def __init__(self, database_url: str, *, busy_timeout_ms: int = 10_000):
        self.database_url = database_url
        self.busy_timeout_ms = busy_timeout_ms
        self._engine: Engine | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    # -- engine and transactions --

    @property
    def is_sqlite(self) -> bool:
        return engine_url(self.database_url).startswith("sqlite")

    def _make_engine(self) -> Engine:
        url = engine_url(self.database_url)
        if url.startswith("sqlite"):
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": self.busy_timeout_ms / 1000})
            timeout = int(self.busy_timeout_ms)

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                # Let SQLAlchemy's begin event emit BEGIN itself (pysqlite would defer it).
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute(f"PRAGMA busy_timeout={timeout}")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            @event.listens_for(engine, "begin")
            def _on_begin(conn: Connection) -> None:
                if conn.get_execution_options().get("xds_write"):
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                else:
                    conn.exec_driver_sql("BEGIN")
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
        try:
            metadata.create_all(engine)
        except (OperationalError, IntegrityError, DBAPIError):
            # Another process created the tables at the same moment: check again.
            metadata.create_all(engine)
        return engine

    @property
    def engine(self) -> Engine:
        pid = os.getpid()
        if self._engine is None or self._pid != pid:
            with self._lock:
                if self._engine is None or self._pid != pid:
                    if self._engine is not None:
                        # Inherited from the parent process: drop its pool without closing
                        # the parent's connections.
                        self._engine.dispose(close=False)
                    self._engine = self._make_engine()
                    self._pid = pid
        return self._engine

    @contextmanager
    def _transaction(self, *, write: bool = False) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                if write:
                    conn = conn.execution_options(xds_write=True)
                with conn.begin():
                    yield conn
        except XdsFailure:
            raise
        except IntegrityError:
            raise XdsFailure(XdsError(
                ErrorCode.DUPLICATE_UNIQUE_ID,
                "an object with the same id or uniqueId was registered at the same time"),
            ) from None
        except OperationalError as exc:
            log.warning("registry database error: %s", type(exc.orig).__name__)
            if "locked" in str(exc.orig).lower() or "busy" in str(exc.orig).lower():
                raise XdsFailure(XdsError(ErrorCode.REGISTRY_BUSY,
                                          "the registry database is busy, try again")) from None
            raise XdsFailure(XdsError(ErrorCode.REGISTRY_ERROR,
                                      "the registry database is unavailable")) from None

    def close(self) -> None:
        with self._lock:
            if self._engine is not None and self._pid == os.getpid():
                self._engine.dispose()
            self._engine = None
            self._pid = None

    # -- writing --

    def submit(self, objects: Sequence[Identifiable]) -> None:
        """Store one submission atomically, or raise XdsFailure and store nothing.

        DocumentEntries, SubmissionSets and Folders keep the status they carry (Approved when
        they carry none). Standalone Classifications and ExternalIdentifiers are folded into
        the object they describe; ObjectRefs only name existing objects and are not stored.
        The registry sets lastUpdateTime on new Folders and on existing Folders that get a
        member. A replacement (RPLC / XFRM_RPLC) deprecates the original and joins the
        Folders the original was in (ITI TF-3 4.1.6.1.x), all in the same transaction.
        """
        now = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        rows, assocs = self._prepare(objects, now)
        with self._transaction(write=True) as conn:
            self._check_ids_free(conn, rows)
            self._check_unique_ids(conn, rows)
            existing = self._referenced(conn, rows, assocs)
            self._check_associations(rows, assocs, existing)
            replaced = {a.target_object: a.source_object for a in assocs
                        if a.association_type in _REPLACING}
            for seq, (kind, obj) in enumerate(rows):
                self._insert(conn, seq, kind, obj)
            for a in assocs:
                self._insert_association(conn, a)
            touched = {a.source_object for a in assocs
                       if a.association_type == AssociationType.HAS_MEMBER
                       and a.source_object in existing
                       and existing[a.source_object].kind == Kind.FOLDER}
            if replaced:
                self._deprecate(conn, list(replaced))
                touched |= self._carry_folder_membership(conn, replaced, len(rows))
            if touched:
                self._touch_folders(conn, sorted(touched), now)

    def _insert_association(self, conn: Connection, a: Association) -> None:
        conn.execute(association.insert().values(
            id=a.id, type=a.association_type, source=a.source_object, target=a.target_object))

    def _carry_folder_membership(self, conn: Connection, replaced: Mapping[str, str],
                                 seq: int) -> set[str]:
        """New HasMember associations Folder -> replacement for every Folder holding an
        original; the Folders concerned."""
        folders = ro.alias("folder")
        links = conn.execute(
            select(association.c.source, association.c.target)
            .join(folders, folders.c.id == association.c.source)
            .where(association.c.type == AssociationType.HAS_MEMBER,
                   association.c.target.in_(list(replaced)),
                   folders.c.kind == Kind.FOLDER)).all()
        out: set[str] = set()
        for i, link in enumerate(links):
            a = Association(id=f"urn:uuid:{uuid.uuid4()}",
                            association_type=AssociationType.HAS_MEMBER,
                            source_object=link.source, target_object=replaced[link.target],
                            status=AvailabilityStatus.APPROVED)
            self._insert(conn, seq + i, Kind.ASSOCIATION, a)
            self._insert_association(conn, a)
            out.add(link.source)
        return out

    def _touch_folders(self, conn: Connection, ids: Sequence[str], now: str) -> None:
        for chunk in _chunks(ids):
            for row in conn.execute(select(ro.c.id, ro.c.content).where(
                    ro.c.id.in_(chunk), ro.c.kind == Kind.FOLDER)).all():
                obj = codec.decode(row.content)
                obj = replace(obj, slots=_with_slot(obj.slots, "lastUpdateTime", now))
                conn.execute(ro.update().where(ro.c.id == row.id).values(
                    last_update_time=now, content=codec.encode(obj)))

    def _prepare(self, objects: Sequence[Identifiable], now: str,
                 ) -> tuple[list[tuple[str, ExtrinsicObject | RegistryPackage | Association]],
                            list[Association]]:
        """Kinds, folded classifications; metadata errors for objects of no known kind."""
        loose_cls = [o for o in objects if isinstance(o, Classification)]
        loose_ext = [o for o in objects if isinstance(o, ExternalIdentifier)]
        owners = {o.id for o in objects
                  if isinstance(o, (ExtrinsicObject, RegistryPackage, Association))}
        errors: list[XdsError] = []
        for c in loose_cls:
            if c.classified_object not in owners:
                errors.append(XdsError(
                    ErrorCode.UNRESOLVED_REFERENCE,
                    f"Classification {c.id} classifies {c.classified_object}, "
                    "which is not part of this submission"))
        for e in loose_ext:
            if e.registry_object not in owners:
                errors.append(XdsError(
                    ErrorCode.UNRESOLVED_REFERENCE,
                    f"ExternalIdentifier {e.id} identifies {e.registry_object}, "
                    "which is not part of this submission"))
        rows: list[tuple[str, ExtrinsicObject | RegistryPackage | Association]] = []
        assocs: list[Association] = []
        for o in objects:
            if not isinstance(o, (ExtrinsicObject, RegistryPackage, Association)):
                continue
            extra_c = tuple(c for c in loose_cls if c.classified_object == o.id)
            extra_e = tuple(e for e in loose_ext if e.registry_object == o.id)
            kind = kind_of(o, extra_c)
            if kind is None:
                errors.append(_hm(f"RegistryPackage {o.id} is classified neither as a "
                                  "SubmissionSet nor as a Folder"))
                continue
            if extra_c or extra_e:
                o = replace(o, classifications=o.classifications + extra_c,
                            external_identifiers=o.external_identifiers + extra_e)
            if o.status is None:
                o = replace(o, status=AvailabilityStatus.APPROVED)
            if kind == Kind.FOLDER:
                o = replace(o, slots=_with_slot(o.slots, "lastUpdateTime", now))
            rows.append((kind, o))
            if isinstance(o, Association):
                assocs.append(o)
        if errors:
            raise XdsFailure(errors)
        return rows, assocs

    def _check_ids_free(self, conn: Connection,
                        rows: Sequence[tuple[str, RegistryObject]]) -> None:
        ids = [o.id for _, o in rows]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise XdsFailure(_hm(f"object id {dup} is used twice in the submission"))
        taken = self._existing_ids(conn, ids)
        if taken:
            raise XdsFailure(XdsError(
                ErrorCode.REGISTRY_METADATA_ERROR,
                f"object id {sorted(taken)[0]} already exists in the registry"))

    def _existing_ids(self, conn: Connection, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(ids):
            found.update(conn.scalars(select(ro.c.id).where(ro.c.id.in_(chunk))))
        return found

    def _check_unique_ids(self, conn: Connection,
                          rows: Sequence[tuple[str, RegistryObject]]) -> None:
        errors: list[XdsError] = []
        seen: dict[tuple[str, str], str] = {}
        for kind, o in rows:
            if kind == Kind.ASSOCIATION:
                continue
            uid = _external_id(o, _UNIQUE_ID_SCHEMES[kind])
            if uid is None:
                continue
            if (kind, uid) in seen:
                errors.append(XdsError(ErrorCode.DUPLICATE_UNIQUE_ID,
                                       f"{kind} uniqueId {uid} appears twice in the submission"))
            seen[(kind, uid)] = o.id
            existing = conn.execute(
                select(ro.c.id, ro.c.hash).where(ro.c.kind == kind, ro.c.unique_id == uid)
            ).first()
            if existing is None:
                continue
            new_hash = _slot(o, "hash") if kind == Kind.DOCUMENT_ENTRY else None
            if (kind == Kind.DOCUMENT_ENTRY and new_hash and existing.hash
                    and new_hash.lower() != existing.hash.lower()):
                errors.append(XdsError(
                    ErrorCode.NON_IDENTICAL_HASH,
                    f"DocumentEntry uniqueId {uid} is already registered with another hash"))
            else:
                errors.append(XdsError(
                    ErrorCode.DUPLICATE_UNIQUE_ID,
                    f"{kind} uniqueId {uid} is already registered"))
        if errors:
            raise XdsFailure(errors)

    def _referenced(self, conn: Connection, rows: Sequence[tuple[str, RegistryObject]],
                    assocs: list[Association]) -> dict[str, StoredObject]:
        """The objects already in the registry that the associations point at."""
        own = {o.id for _, o in rows}
        ids = sorted({i for a in assocs for i in (a.source_object, a.target_object)} - own)
        return self._load(conn, ids)

    def _check_associations(self, rows: Sequence[tuple[str, RegistryObject]],
                            assocs: list[Association],
                            existing: Mapping[str, StoredObject]) -> None:
        own: dict[str, tuple[str, RegistryObject]] = {o.id: (k, o) for k, o in rows}
        errors: list[XdsError] = []

        def patient(i: str) -> str | None:
            if i in own:
                k, o = own[i]
                return _external_id(o, _PATIENT_SCHEMES[k]) if k in _PATIENT_SCHEMES else None
            return existing[i].patient_id if i in existing else None

        def kind(i: str) -> str | None:
            if i in own:
                return own[i][0]
            return existing[i].kind if i in existing else None

        set_patient = next((patient(o.id) for k, o in rows if k == Kind.SUBMISSION_SET), None)
        for a in assocs:
            for end in (a.source_object, a.target_object):
                if end not in own and end not in existing:
                    if a.association_type in _REPLACING and end == a.target_object:
                        errors.append(XdsError(
                            ErrorCode.UNRESOLVED_REFERENCE,
                            f"replaced DocumentEntry {end} is not in the registry"))
                    else:
                        errors.append(XdsError(
                            ErrorCode.UNRESOLVED_REFERENCE,
                            f"Association {a.id} refers to {end}, which is neither in the "
                            "submission nor in the registry"))
            if a.target_object not in own and a.target_object not in existing:
                continue
            if a.source_object not in own and a.source_object not in existing:
                continue
            if a.association_type in _DOCUMENT_RELATIONS:
                if kind(a.source_object) != Kind.DOCUMENT_ENTRY or \
                        kind(a.target_object) != Kind.DOCUMENT_ENTRY:
                    short = a.association_type.rsplit(":", 1)[-1]
                    errors.append(_hm(f"Association {a.id} ({short}) must link two "
                                      "DocumentEntries"))
                    continue
                if a.target_object in own:
                    errors.append(_hm(f"Association {a.id}: the original document must "
                                      "already be in the registry"))
                    continue
                target = existing[a.target_object]
                if a.association_type in _REPLACING and \
                        target.status != AvailabilityStatus.APPROVED:
                    errors.append(XdsError(
                        ErrorCode.REPLACE_FAILED,
                        f"DocumentEntry {a.target_object} is not Approved and cannot be "
                        "replaced"))
                if patient(a.source_object) != target.patient_id:
                    errors.append(XdsError(
                        ErrorCode.PATIENT_ID_DOES_NOT_MATCH,
                        f"Association {a.id}: the documents belong to different patients"))
            elif a.association_type == AssociationType.HAS_MEMBER:
                src_kind, dst_kind = kind(a.source_object), kind(a.target_object)
                if src_kind == Kind.DOCUMENT_ENTRY:
                    errors.append(_hm(f"Association {a.id}: a DocumentEntry cannot have "
                                      "members"))
                    continue
                if src_kind == Kind.FOLDER and dst_kind == Kind.DOCUMENT_ENTRY and (
                        a.source_object in existing or a.target_object in existing):
                    if patient(a.source_object) != patient(a.target_object):
                        errors.append(XdsError(
                            ErrorCode.PATIENT_ID_DOES_NOT_MATCH,
                            f"Association {a.id}: the Folder and the DocumentEntry belong "
                            "to different patients"))
                for end in (a.source_object, a.target_object):
                    ref = existing.get(end)
                    if ref is not None and ref.kind in (Kind.DOCUMENT_ENTRY, Kind.FOLDER) \
                            and set_patient is not None and ref.patient_id != set_patient:
                        errors.append(XdsError(
                            ErrorCode.PATIENT_ID_DOES_NOT_MATCH,
                            f"Association {a.id}: the referenced {ref.kind} {end} belongs to "
                            "another patient than the SubmissionSet"))
        if errors:
            raise XdsFailure(errors)

    def _insert(self, conn: Connection, seq: int, kind: str,
                obj: ExtrinsicObject | RegistryPackage | Association) -> None:
        uid = _external_id(obj, _UNIQUE_ID_SCHEMES[kind]) if kind in _UNIQUE_ID_SCHEMES else None
        pid = _external_id(obj, _PATIENT_SCHEMES[kind]) if kind in _PATIENT_SCHEMES else None
        status = obj.status or AvailabilityStatus.APPROVED
        conn.execute(ro.insert().values(
            id=obj.id,
            kind=kind,
            lid=obj.lid or obj.id,
            status=status,
            unique_id=uid,
            patient_id=pid,
            object_type=obj.object_type,
            mime_type=obj.mime_type if isinstance(obj, ExtrinsicObject) else None,
            creation_time=_slot(obj, "creationTime"),
            service_start_time=_slot(obj, "serviceStartTime"),
            service_stop_time=_slot(obj, "serviceStopTime"),
            submission_time=_slot(obj, "submissionTime"),
            last_update_time=_slot(obj, "lastUpdateTime"),
            repository_unique_id=_slot(obj, "repositoryUniqueId"),
            hash=_slot(obj, "hash"),
            size=_slot(obj, "size"),
            home=obj.home,
            seq=seq,
            content=codec.encode(obj),
        ))
        codes = [
            {"object_id": obj.id, "scheme": c.classification_scheme,
             "code": c.node_representation, "coding_scheme": _slot(c, "codingScheme") or ""}
            for c in obj.classifications
            if c.classification_scheme and c.classification_scheme not in _NOT_CODES
            and c.node_representation
        ]
        if codes:
            conn.execute(object_code.insert(), codes)
        authors = [
            {"object_id": obj.id, "person": person}
            for c in obj.classifications if c.classification_scheme in _AUTHOR_SCHEMES
            for person in _slot_values(c, "authorPerson")
        ]
        if authors:
            conn.execute(author.insert(), authors)
        refs = [
            {"object_id": obj.id, "value": v, "id_type": _cx_type(v)}
            for v in _slot_values(obj, REFERENCE_ID_LIST)
        ]
        if refs:
            conn.execute(reference_id.insert(), refs)

    def _deprecate(self, conn: Connection, ids: Sequence[str]) -> None:
        for chunk in _chunks(ids):
            rows = conn.execute(select(ro.c.id, ro.c.content).where(
                ro.c.id.in_(chunk), ro.c.status == AvailabilityStatus.APPROVED)).all()
            for row in rows:
                obj = replace(codec.decode(row.content), status=AvailabilityStatus.DEPRECATED)
                updated = conn.execute(
                    ro.update().where(ro.c.id == row.id,
                                      ro.c.status == AvailabilityStatus.APPROVED)
                    .values(status=AvailabilityStatus.DEPRECATED, content=codec.encode(obj)))
                if updated.rowcount != 1:  # replaced concurrently (PostgreSQL)
                    raise XdsFailure(XdsError(
                        ErrorCode.REPLACE_FAILED,
                        f"DocumentEntry {row.id} was replaced by another submission"))
            if len(rows) != len(set(chunk)):
                raise XdsFailure(XdsError(
                    ErrorCode.REPLACE_FAILED,
                    "the replaced DocumentEntry was replaced by another submission"))

    # -- reading --

    def _load(self, conn: Connection, ids: Sequence[str]) -> dict[str, StoredObject]:
        out: dict[str, StoredObject] = {}
        for chunk in _chunks(list(dict.fromkeys(ids))):
            for row in conn.execute(select(
                    ro.c.id, ro.c.kind, ro.c.status, ro.c.unique_id, ro.c.patient_id,
                    ro.c.content).where(ro.c.id.in_(chunk))):
                out[row.id] = StoredObject(row.id, row.kind, row.status, row.unique_id,
                                           row.patient_id, codec.decode(row.content))
        return out

    def get_objects(self, ids: Sequence[str]) -> list[ExtrinsicObject | RegistryPackage
                                                     | Association]:
        """The stored objects with these ids, in the order asked; unknown ids are skipped."""
        with self._transaction() as conn:
            found = self._load(conn, ids)
        return [found[i].obj for i in dict.fromkeys(ids) if i in found]

    def get_stored(self, ids: Sequence[str]) -> dict[str, StoredObject]:
        """Like get_objects, with the indexed columns (kind, status, ...), by id."""
        with self._transaction() as conn:
            return self._load(conn, ids)

    def find_by_unique_ids(self, kind: str, unique_ids: Sequence[str],
                           statuses: Sequence[str] | None = None) -> list[StoredObject]:
        """Objects of `kind` (Kind.*) with one of these uniqueIds."""
        out: list[StoredObject] = []
        with self._transaction() as conn:
            for chunk in _chunks(list(dict.fromkeys(unique_ids))):
                q = select(ro.c.id).where(ro.c.kind == kind, ro.c.unique_id.in_(chunk))
                if statuses:
                    q = q.where(ro.c.status.in_(list(statuses)))
                ids = list(conn.scalars(q.order_by(ro.c.unique_id)))
                loaded = self._load(conn, ids)
                out.extend(loaded[i] for i in ids)
        return out

    def find_documents_by_unique_id(self, unique_ids: Sequence[str],
                                    statuses: Sequence[str] | None = None,
                                    ) -> list[ExtrinsicObject]:
        """DocumentEntries with one of these uniqueIds."""
        return [s.obj for s in self.find_by_unique_ids(Kind.DOCUMENT_ENTRY, unique_ids, statuses)
                if isinstance(s.obj, ExtrinsicObject)]

    def find_documents_by_lid(self, lids: Sequence[str],
                              statuses: Sequence[str] | None = None) -> list[ExtrinsicObject]:
        """DocumentEntries with one of these logical ids (every version)."""
        with self._transaction() as conn:
            out: list[ExtrinsicObject] = []
            for chunk in _chunks(list(dict.fromkeys(lids))):
                q = select(ro.c.id).where(ro.c.kind == Kind.DOCUMENT_ENTRY,
                                          ro.c.lid.in_(chunk))
                if statuses:
                    q = q.where(ro.c.status.in_(list(statuses)))
                ids = list(conn.scalars(q.order_by(ro.c.lid, ro.c.id)))
                loaded = self._load(conn, ids)
                out.extend(o for i in ids if isinstance(o := loaded[i].obj, ExtrinsicObject))
            return out

    def find_documents(
        self,
        patient_id: str,
        statuses: Sequence[str],
        *,
        object_types: Sequence[str] | None = None,
        codes: Mapping[str, Sequence[Sequence[tuple[str, str | None]]]] | None = None,
        creation_time: tuple[str | None, str | None] = (None, None),
        service_start_time: tuple[str | None, str | None] = (None, None),
        service_stop_time: tuple[str | None, str | None] = (None, None),
        author_persons: Sequence[str] | None = None,
        reference_ids: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[ExtrinsicObject]:
        """DocumentEntries of one patient (FindDocuments and its relatives).

        `codes` maps a classification scheme uuid to a list of groups that are ANDed; within a
        group the (code, codingScheme) pairs are ORed (codingScheme None matches any scheme).
        Time ranges are (from inclusive, to exclusive) on the stored DTM strings, compared on
        their common precision as ITI TF-2a 3.18.4.1.2.3.6 asks. `author_persons` are SQL LIKE
        patterns (ORed). `limit` caps the rows read (the caller asks for one more than it
        allows, to detect too many results).
        """
        q = select(ro.c.id).where(ro.c.kind == Kind.DOCUMENT_ENTRY,
                                  ro.c.patient_id == patient_id,
                                  ro.c.status.in_(list(statuses)))
        if object_types:
            q = q.where(ro.c.object_type.in_(list(object_types)))
        q = q.where(*code_clauses(codes))
        for column, (lo, hi) in ((ro.c.creation_time, creation_time),
                                 (ro.c.service_start_time, service_start_time),
                                 (ro.c.service_stop_time, service_stop_time)):
            q = q.where(*time_range_clauses(column, lo, hi))
        if author_persons:
            q = q.where(exists().where(author.c.object_id == ro.c.id, or_(
                *[author.c.person.like(p, escape="\\") for p in author_persons])))
        if reference_ids:
            q = q.where(exists().where(reference_id.c.object_id == ro.c.id,
                                       reference_id.c.value.in_(list(reference_ids))))
        q = q.order_by(ro.c.creation_time, ro.c.id)
        if limit is not None:
            q = q.limit(limit)
        with self._transaction() as conn:
            ids = list(conn.scalars(q))
            loaded = self._load(conn, ids)
        return [o for i in ids if isinstance(o := loaded[i].obj, ExtrinsicObject)]

    def find_objects(
        self,
        kind: str,
        patient_id: str,
        statuses: Sequence[str],
        *,
        object_types: Sequence[str] | None = None,
        codes: Mapping[str, Sequence[Sequence[tuple[str, str | None]]]] | None = None,
        time_column: str | None = None,
        time_range: tuple[str | None, str | None] = (None, None),
        author_persons: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[ExtrinsicObject | RegistryPackage]:
        """Objects of one kind and patient (FindSubmissionSets, FindFolders, GetAll).

        `time_column` names the DTM column `time_range` applies to (submission_time,
        last_update_time, creation_time, ...). Other arguments as for find_documents.
        Results are in registration order.
        """
        q = select(ro.c.id).where(ro.c.kind == kind, ro.c.patient_id == patient_id,
                                  ro.c.status.in_(list(statuses)))
        if object_types:
            q = q.where(ro.c.object_type.in_(list(object_types)))
        q = q.where(*code_clauses(codes))
        if time_column is not None:
            q = q.where(*time_range_clauses(ro.c[time_column], *time_range))
        if author_persons:
            q = q.where(exists().where(author.c.object_id == ro.c.id, or_(
                *[author.c.person.like(p, escape="\\") for p in author_persons])))
        q = q.order_by(ro.c.seq, ro.c.id) if kind != Kind.DOCUMENT_ENTRY else \
            q.order_by(ro.c.creation_time, ro.c.id)
        if limit is not None:
            q = q.limit(limit)
        with self._transaction() as conn:
            ids = list(conn.scalars(q))
            loaded = self._load(conn, ids)
        return [o for i in ids
                if isinstance(o := loaded[i].obj, (ExtrinsicObject, RegistryPackage))]

    def find_by_lids(self, kind: str, lids: Sequence[str]) -> list[StoredObject]:
        """Every version of the objects of `kind` with these logical ids."""
        out: list[StoredObject] = []
        with self._transaction() as conn:
            for chunk in _chunks(list(dict.fromkeys(lids))):
                ids = list(conn.scalars(select(ro.c.id).where(
                    ro.c.kind == kind, ro.c.lid.in_(chunk)).order_by(ro.c.lid, ro.c.id)))
                loaded = self._load(conn, ids)
                out.extend(loaded[i] for i in ids)
        return out

    def associations(self, *, sources: Sequence[str] | None = None,
                     targets: Sequence[str] | None = None,
                     either: Sequence[str] | None = None,
                     types: Sequence[str] | None = None,
                     statuses: Sequence[str] | None = None) -> list[Association]:
        """Associations by their ends: source in `sources`, target in `targets`, or either end
        in `either` (the given lists are ANDed); of these `types` and availabilityStatus."""
        given = [x for x in (sources, targets, either) if x is not None]
        if not given or any(not x for x in given):
            return []
        conds: list[ColumnElement[bool]] = []
        if types:
            conds.append(association.c.type.in_(list(types)))
        if statuses:
            conds.append(association.c.id.in_(select(ro.c.id).where(
                ro.c.kind == Kind.ASSOCIATION, ro.c.status.in_(list(statuses)))))
        found: list[str] = []
        # Chunk on the longest list; the others are bound whole (they are short in practice).
        with self._transaction() as conn:
            lists = {"sources": sources, "targets": targets, "either": either}
            longest = max((k for k, v in lists.items() if v is not None),
                          key=lambda k: len(lists[k] or []))
            for chunk in _chunks(list(dict.fromkeys(lists[longest] or []))):
                where = list(conds)
                for key, values in lists.items():
                    if values is None:
                        continue
                    vals = chunk if key == longest else list(dict.fromkeys(values))
                    if key == "sources":
                        where.append(association.c.source.in_(vals))
                    elif key == "targets":
                        where.append(association.c.target.in_(vals))
                    else:
                        where.append(or_(association.c.source.in_(vals),
                                         association.c.target.in_(vals)))
                found.extend(conn.scalars(
                    select(association.c.id).join(ro, ro.c.id == association.c.id)
                    .where(*where).order_by(ro.c.seq, association.c.id)))
            loaded = self._load(conn, found)
        return [o for i in dict.fromkeys(found) if isinstance(o := loaded[i].obj, Association)]

    def document_for_retrieve(self, unique_id: str,
                              repository_unique_id: str) -> ExtrinsicObject | None:
        """The DocumentEntry a repository serves for (uniqueId, repositoryUniqueId), if any."""
        with self._transaction() as conn:
            row = conn.execute(select(ro.c.content).where(
                ro.c.kind == Kind.DOCUMENT_ENTRY, ro.c.unique_id == unique_id,
                ro.c.repository_unique_id == repository_unique_id)).first()
        if row is None:
            return None
        obj = codec.decode(row.content)
        return obj if isinstance(obj, ExtrinsicObject) else None

    def associations_for(self, ids: Sequence[str], *,
                         types: Sequence[str] | None = None) -> list[Association]:
        """Associations whose source or target is one of `ids`."""
        found: list[str] = []
        with self._transaction() as conn:
            for chunk in _chunks(list(dict.fromkeys(ids))):
                q = select(association.c.id).where(
                    or_(association.c.source.in_(chunk), association.c.target.in_(chunk)))
                if types:
                    q = q.where(association.c.type.in_(list(types)))
                found.extend(conn.scalars(q))
            loaded = self._load(conn, found)
        return [o for i in dict.fromkeys(found) if isinstance(o := loaded[i].obj, Association)]

    def has_document_with_hash(self, sha1_hex: str) -> bool:
        """True when a DocumentEntry (any status, any repository) carries this SHA-1."""
        values = list({sha1_hex, sha1_hex.lower(), sha1_hex.upper()})
        with self._transaction() as conn:
            row = conn.execute(select(ro.c.id).where(
                ro.c.kind == Kind.DOCUMENT_ENTRY, ro.c.hash.in_(values)).limit(1)).first()
        return row is not None

    def count(self, kind: str | None = None) -> int:
        """How many objects (of one kind) the registry holds; a cheap health check."""
        q = select(func.count()).select_from(ro)
        if kind is not None:
            q = q.where(ro.c.kind == kind)
        with self._transaction() as conn:
            return int(conn.scalar(q) or 0)


def time_range_clauses(column: Any, lo: str | None, hi: str | None
                       ) -> list[ColumnElement[bool]]:
    """SQL conditions for a stored-query time range on a DTM column.

    From is inclusive, To exclusive (ITI TF-2a 3.18.4.1.2.3.7.1), and the two DTMs are
    compared at their common precision: each is truncated to the length of the shorter one.
    So a stored `2004` matches From `20040101` (its year is not before the bound) and a
    stored `20041231235959` is compared with To `2005` as `2004` < `2005`. An object without
    the attribute never matches a range on it.
    """
    out: list[ColumnElement[bool]] = []
    for bound, lower in ((lo, True), (hi, False)):
        if bound is None:
            continue
        stored = func.substr(column, 1, len(bound))
        asked = func.substr(literal(bound, String), 1, func.length(column))
        out.append(column.is_not(None))
        out.append(stored >= asked if lower else stored < asked)
    return out


def code_clauses(codes: Mapping[str, Sequence[Sequence[tuple[str, str | None]]]] | None
                 ) -> list[ColumnElement[bool]]:
    """One IN (subquery) per ANDed group; the (code, codingScheme) pairs of a group are ORed
    (codingScheme None matches any scheme)."""
    out: list[ColumnElement[bool]] = []
    for scheme, groups in (codes or {}).items():
        for group in groups:
            alts = [and_(object_code.c.code == code, object_code.c.coding_scheme == cs)
                    if cs is not None else object_code.c.code == code for code, cs in group]
            if alts:
                # correlated EXISTS: one index probe per candidate row (ix_object_code_object)
                out.append(exists().where(object_code.c.object_id == ro.c.id,
                                          object_code.c.scheme == scheme, or_(*alts)))
    return out


def _chunks(items: Sequence[str]) -> Iterator[list[str]]:
    items = list(items)
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


def _with_slot(slots: tuple[Slot, ...], name: str, value: str) -> tuple[Slot, ...]:
    """`slots` with the slot `name` set to the single `value` (replaced or appended)."""
    if any(s.name == name for s in slots):
        return tuple(Slot(name, (value,), s.slot_type) if s.name == name else s for s in slots)
    return (*slots, Slot(name, (value,)))


def _cx_type(value: str) -> str | None:
    """CXi.5 (the identifier type code) of a referenceIdList value."""
    parts = value.split("^")
    return parts[4] if len(parts) > 4 and parts[4] else None


__all__ = ["Kind", "RegistryStore", "StoredObject", "engine_url", "kind_of"]
