"""Bulk loading of DocumentEntries into a registry database (benchmarks, migrations).

`entry_rows(obj)` turns one DocumentEntry into the rows `RegistryStore.submit()` would write
(the same indexed columns, the same JSON through `gateway.registry.codec`), as plain tuples
that pickle cheaply, so worker processes can build them in parallel. `BulkLoader` writes such
rows in large batches: COPY on PostgreSQL, executemany on SQLite, one transaction per batch.
On an empty database it can leave the secondary indexes out while loading and build them at
the end (`finish()`, which also refreshes the planner statistics), which is several times
faster than maintaining them row by row.

There are no registry checks here (no uniqueId, patient or association validation): the
loader is for data that is known to be good; use `RegistryStore.submit()` for everything else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Engine, Index, create_engine, event, inspect, text

from gateway.ebrim.model import ExtrinsicObject
from gateway.ns import AvailabilityStatus, DocumentEntryScheme
from gateway.registry import codec
from gateway.registry.schema import author, metadata, object_code, reference_id
from gateway.registry.schema import registry_object as ro
from gateway.registry.store import (
    _AUTHOR_SCHEMES,
    _NOT_CODES,
    REFERENCE_ID_LIST,
    Kind,
    _cx_type,
    _external_id,
    _slot,
    _slot_values,
    engine_url,
)

log = logging.getLogger(__name__)

RO_COLUMNS = tuple(c.name for c in ro.columns)
CODE_COLUMNS = tuple(c.name for c in object_code.columns)
AUTHOR_COLUMNS = tuple(c.name for c in author.columns)
REFERENCE_COLUMNS = tuple(c.name for c in reference_id.columns)


@dataclass
class Rows:
    """Rows for the registry tables, as tuples in table column order."""

    objects: list[tuple[Any, ...]] = field(default_factory=list)
    codes: list[tuple[Any, ...]] = field(default_factory=list)
    authors: list[tuple[Any, ...]] = field(default_factory=list)
    references: list[tuple[Any, ...]] = field(default_factory=list)

    def extend(self, other: Rows) -> None:
        self.objects.extend(other.objects)
        self.codes.extend(other.codes)
        self.authors.extend(other.authors)
        self.references.extend(other.references)

    def __len__(self) -> int:
        return len(self.objects)


def entry_rows(obj: ExtrinsicObject, seq: int = 0, rows: Rows | None = None) -> Rows:
    """The rows `RegistryStore.submit()` stores for this DocumentEntry (added to `rows`)."""
    out = rows if rows is not None else Rows()
    if obj.status is None:  # as submit() does: an entry without a status is Approved
        obj = replace(obj, status=AvailabilityStatus.APPROVED)
    values = {
        "id": obj.id,
        "kind": Kind.DOCUMENT_ENTRY,
        "lid": obj.lid or obj.id,
        "status": obj.status,
        "unique_id": _external_id(obj, DocumentEntryScheme.UNIQUE_ID),
        "patient_id": _external_id(obj, DocumentEntryScheme.PATIENT_ID),
        "object_type": obj.object_type,
        "mime_type": obj.mime_type,
        "creation_time": _slot(obj, "creationTime"),
        "service_start_time": _slot(obj, "serviceStartTime"),
        "service_stop_time": _slot(obj, "serviceStopTime"),
        "submission_time": _slot(obj, "submissionTime"),
        "last_update_time": _slot(obj, "lastUpdateTime"),
        "repository_unique_id": _slot(obj, "repositoryUniqueId"),
        "hash": _slot(obj, "hash"),
        "size": _slot(obj, "size"),
        "home": obj.home,
        "seq": seq,
        "content": codec.encode(obj),
    }
    out.objects.append(tuple(values[c] for c in RO_COLUMNS))
    for c in obj.classifications:
        if c.classification_scheme in _AUTHOR_SCHEMES:
            out.authors.extend((obj.id, p) for p in _slot_values(c, "authorPerson"))
        elif c.classification_scheme and c.classification_scheme not in _NOT_CODES \
                and c.node_representation:
            out.codes.append((obj.id, c.classification_scheme, c.node_representation,
                              _slot(c, "codingScheme") or ""))
    out.references.extend((obj.id, v, _cx_type(v)) for v in _slot_values(obj, REFERENCE_ID_LIST))
    return out


def _secondary_indexes() -> list[Index]:
    return [i for t in metadata.sorted_tables for i in t.indexes]


class BulkLoader:
    """Write `Rows` into a registry database in big batches.

    `prepare(defer_indexes=True)` creates the tables and, when the registry is empty, drops
    the secondary indexes; `add(rows)` writes one batch in one transaction; `finish()` builds
    the indexes again and runs ANALYZE. Use it as a context manager to get `finish()` and the
    engine disposed even when a batch fails.
    """

    def __init__(self, database_url: str):
        self.database_url = database_url
        self.is_sqlite = engine_url(database_url).startswith("sqlite")
        self._engine: Engine | None = None
        self.deferred = False
        self.loaded = 0

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            engine = create_engine(engine_url(self.database_url))
            if self.is_sqlite:
                @event.listens_for(engine, "connect")
                def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                    cur = dbapi_conn.cursor()
                    cur.execute("PRAGMA journal_mode=WAL")
                    cur.execute("PRAGMA synchronous=OFF")
                    cur.execute("PRAGMA cache_size=-262144")  # 256 MiB
                    cur.execute("PRAGMA temp_store=MEMORY")
                    cur.close()
            self._engine = engine
        return self._engine

    def __enter__(self) -> BulkLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.finish()
        finally:
            self.close()

    def prepare(self, *, defer_indexes: bool = True) -> None:
        metadata.create_all(self.engine)
        if not defer_indexes:
            return
        with self.engine.begin() as conn:
            empty = conn.execute(text("SELECT 1 FROM registry_object LIMIT 1")).first() is None
            if not empty:
                return
            present = {i["name"] for t in metadata.sorted_tables
                       for i in inspect(conn).get_indexes(t.name)}
            for index in _secondary_indexes():
                if index.name in present:
                    index.drop(conn)
        self.deferred = True

    def add(self, rows: Rows) -> int:
        """Write one batch (one transaction); returns the DocumentEntries written."""
        if not rows.objects:
            return 0
        if self.is_sqlite:
            self._add_sqlite(rows)
        else:
            self._add_postgresql(rows)
        self.loaded += len(rows.objects)
        return len(rows.objects)

    def _tables(self, rows: Rows) -> list[tuple[str, Sequence[str], list[tuple[Any, ...]]]]:
        return [(ro.name, RO_COLUMNS, rows.objects),
                (object_code.name, CODE_COLUMNS, rows.codes),
                (author.name, AUTHOR_COLUMNS, rows.authors),
                (reference_id.name, REFERENCE_COLUMNS, rows.references)]

    def _add_sqlite(self, rows: Rows) -> None:
        with self.engine.begin() as conn:
            for table in (ro, object_code, author, reference_id):
                data = {ro: rows.objects, object_code: rows.codes, author: rows.authors,
                        reference_id: rows.references}[table]
                if data:
                    # INSERT INTO t (every column, in table order) VALUES (?, ...)
                    sql = str(table.insert().compile(dialect=conn.dialect))
                    conn.exec_driver_sql(sql, data)

    def _add_postgresql(self, rows: Rows) -> None:
        raw = self.engine.raw_connection()
        try:
            pg: Any = raw.driver_connection
            with pg.cursor() as cur:
                for table, columns, data in self._tables(rows):
                    if not data:
                        continue
                    with cur.copy(f"COPY {table} ({','.join(columns)}) FROM STDIN") as copy:
                        for row in data:
                            copy.write_row(row)
            pg.commit()
        except BaseException:
            raw.rollback()
            raise
        finally:
            raw.close()

    def finish(self) -> None:
        """Build the deferred indexes and refresh the planner's statistics."""
        with self.engine.begin() as conn:
            if self.deferred:
                for index in _secondary_indexes():
                    log.info("building index %s", index.name)
                    index.create(conn, checkfirst=True)
                self.deferred = False
            if self.is_sqlite:
                conn.exec_driver_sql("PRAGMA analysis_limit=2000")
                conn.exec_driver_sql("ANALYZE")
        if not self.is_sqlite:
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM ANALYZE")

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def load(database_url: str, entries: Iterable[ExtrinsicObject], *, batch_size: int = 10_000,
         defer_indexes: bool = True) -> int:
    """Load DocumentEntries (known to be valid, with UUID ids) in batches; returns the count."""
    with BulkLoader(database_url) as loader:
        loader.prepare(defer_indexes=defer_indexes)
        rows = Rows()
        for obj in entries:
            entry_rows(obj, rows=rows)
            if len(rows) >= batch_size:
                loader.add(rows)
                rows = Rows()
        loader.add(rows)
        return loader.loaded


__all__ = ["BulkLoader", "Rows", "entry_rows", "load"]
