"""The registry's SQL tables (SQLAlchemy Core), the same on SQLite and PostgreSQL.

- `registry_object`: one row per DocumentEntry, SubmissionSet, Folder and Association, with
  the columns the stored queries filter on and the complete object as JSON (`content`,
  written by `gateway.registry.codec`).
- `association`: type, source and target of every Association (both ends indexed).
- `object_code`: one row per coded classification (class, type, practice setting, event,
  confidentiality, format, healthcare facility type, content type, folder code list).
- `reference_id`: the urn:ihe:iti:xds:2013:referenceIdList values of DocumentEntries.
- `author`: authorPerson values of DocumentEntries, SubmissionSets and Folders.

Unique ids are unique per kind (a DocumentEntry and a SubmissionSet may not share one
within a kind; the registry checks this before inserting, the constraint catches races).

Which index serves which query (plans checked at 1,000,000 DocumentEntries with
bench/registry_plans.py: EXPLAIN QUERY PLAN on SQLite, EXPLAIN ANALYZE on PostgreSQL):

- FindDocuments / FindSubmissionSets / FindFolders / GetAll / FindDocumentsByReferenceId
  start from `ix_registry_object_patient_status` (patient_id, kind, status): one patient's
  few rows, whatever the other parameters. Every further filter is a correlated EXISTS probed
  once per candidate row, never a scan of the big child tables:
  class, type, practice setting, event, confidentiality, format, facility type codes ->
  `ix_object_code_object` (object_id, scheme, code, coding_scheme), covering;
  referenceIdList (accession, Study Instance UID, order) -> `ix_reference_id_object`
  (object_id, value), covering; authorPerson -> `ix_author_object` (object_id, person).
  Time ranges, objectType and the ORDER BY are evaluated on those few rows.
- GetDocuments / GetFolders / GetSubmissionSets by uuid -> the primary key; by uniqueId ->
  `ix_registry_object_unique_id`; by logical id -> `ix_registry_object_lid`.
- Associations by either end (GetAssociations, GetRelatedDocuments, ...->Contents) ->
  `ix_association_source` / `ix_association_target` (end, type).
- `ix_object_code_lookup`, `ix_reference_id_value` and `ix_author_person` answer
  value-first lookups (a code, an accession or an author across patients).
- ITI-41 duplicate-document check by SHA-1 -> `ix_registry_object_hash`.
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

ID = String(256)  # "urn:uuid:..." ids; symbolic ids never reach the store

registry_object = Table(
    "registry_object",
    metadata,
    Column("id", ID, primary_key=True),
    Column("kind", String(16), nullable=False),  # DocumentEntry/SubmissionSet/Folder/Association
    Column("lid", ID),
    Column("status", String(128), nullable=False),
    Column("unique_id", String(256)),
    Column("patient_id", String(512)),
    Column("object_type", String(128)),
    Column("mime_type", String(128)),
    Column("creation_time", String(32)),
    Column("service_start_time", String(32)),
    Column("service_stop_time", String(32)),
    Column("submission_time", String(32)),
    Column("last_update_time", String(32)),
    Column("repository_unique_id", String(128)),
    Column("hash", String(128)),
    Column("size", String(32)),
    Column("home", String(256)),
    Column("seq", Integer, nullable=False),  # insertion order within a submission
    Column("content", Text, nullable=False),
    UniqueConstraint("kind", "unique_id", name="uq_registry_object_kind_unique_id"),
)
Index("ix_registry_object_patient_status", registry_object.c.patient_id,
      registry_object.c.kind, registry_object.c.status)
Index("ix_registry_object_lid", registry_object.c.lid)
Index("ix_registry_object_unique_id", registry_object.c.unique_id)
Index("ix_registry_object_hash", registry_object.c.hash)

association = Table(
    "association",
    metadata,
    Column("id", ID, ForeignKey("registry_object.id", ondelete="CASCADE"), primary_key=True),
    Column("type", String(128), nullable=False),
    Column("source", ID, nullable=False),
    Column("target", ID, nullable=False),
)
Index("ix_association_source", association.c.source, association.c.type)
Index("ix_association_target", association.c.target, association.c.type)

object_code = Table(
    "object_code",
    metadata,
    Column("object_id", ID, ForeignKey("registry_object.id", ondelete="CASCADE"),
           nullable=False),
    Column("scheme", String(64), nullable=False),  # classificationScheme uuid
    Column("code", String(256), nullable=False),
    Column("coding_scheme", String(256), nullable=False),  # "" when the slot is missing
)
Index("ix_object_code_lookup", object_code.c.scheme, object_code.c.code,
      object_code.c.coding_scheme, object_code.c.object_id)
Index("ix_object_code_object", object_code.c.object_id, object_code.c.scheme,
      object_code.c.code, object_code.c.coding_scheme)

reference_id = Table(
    "reference_id",
    metadata,
    Column("object_id", ID, ForeignKey("registry_object.id", ondelete="CASCADE"),
           nullable=False),
    Column("value", String(512), nullable=False),
    Column("id_type", String(128)),  # CXi.5, e.g. urn:ihe:iti:xds:2013:accession
)
Index("ix_reference_id_value", reference_id.c.value, reference_id.c.object_id)
Index("ix_reference_id_object", reference_id.c.object_id, reference_id.c.value)

author = Table(
    "author",
    metadata,
    Column("object_id", ID, ForeignKey("registry_object.id", ondelete="CASCADE"),
           nullable=False),
    Column("person", String(512), nullable=False),
)
Index("ix_author_person", author.c.person, author.c.object_id)
Index("ix_author_object", author.c.object_id, author.c.person)
