"""Does any registered DocumentEntry still point at a stored document (by its SHA-1)?

The repository keeps no database of its own: the registry's DocumentEntries (slot `hash`)
are the only references to the files of the document store. A rollback asks this before
removing a file, so that content another submission registered meanwhile is kept. The query
reads the registry's `registry_object` table (read-only) through the store's engine.
"""

from __future__ import annotations

from sqlalchemy import func, select

from gateway.registry.schema import registry_object as ro
from gateway.registry.store import Kind, RegistryStore


def hash_is_referenced(registry: RegistryStore, sha1_hex: str) -> bool:
    """True when a DocumentEntry (any status, any repository) carries this hash.

    Any repository counts, not only ours: keeping a file too long costs disk, removing one
    too early loses a document. Errors reaching the database count as "referenced".
    """
    value = sha1_hex.lower()
    try:
        with registry.engine.connect() as conn:
            row = conn.execute(
                select(ro.c.id)
                .where(ro.c.kind == Kind.DOCUMENT_ENTRY, func.lower(ro.c.hash) == value)
                .limit(1)).first()
    except Exception:  # the database is unavailable: do not delete anything
        return True
    return row is not None
