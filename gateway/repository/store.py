"""The Document Repository's document store: files named by their SHA-1, on a shared folder.

A document lives at `<directory>/<h[0:2]>/<h[2:4]>/<h>` where `h` is the lowercase hex SHA-1 of
its bytes (the value XDS puts in the DocumentEntry `hash` slot). Content addressing makes a put
idempotent: the same bytes always land on the same path. The mapping uniqueId -> hash, size,
mimeType lives in the registry's DocumentEntry (slots hash, size, repositoryUniqueId); this
module keeps no database of its own.

Several worker processes share the folder, so every write is atomic: `put()` copies the
source into a temporary file in the store's staging folder (same file system), computing size
and SHA-1 in the same pass (1 MiB chunks), fsyncs it, renames it into place with
`os.replace` and fsyncs the target folder. A reader never sees a partial file.

`put(src, link=True)` is for a source that is private to the caller and never written again
(a request's spool file): the file is fsynced and hard-linked into the staging folder, then
renamed into place the same way, so the bytes are neither read nor copied again (with `sha1`,
the hash the caller computed while writing the file, they are not read at all). When a hard
link is impossible (the spool folder is on another file system, or the file system has no
hard links) it falls back to the copy. Never link a file someone may rewrite: the stored
document would change with it.

Rolling back (a registration that failed after its documents were stored) must not delete a
file another request relies on. `remove_if_unreferenced()` and `ensure()` run under a per-hash
exclusive lock (`flock` on `<directory>/.locks/<h>`): the remover checks that nothing
references the hash and unlinks it inside the lock; a request that has just registered the
same content calls `ensure()` afterwards, which waits for the lock and re-stores the file if a
concurrent rollback removed it. POSIX only (fcntl).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 1024 * 1024
# os.link errors that mean "no hard link here": fall back to copying.
_NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP,
                      errno.EOPNOTSUPP, errno.ENOSYS, errno.EACCES})
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_STAGING = ".staging"
_LOCKS = ".locks"


class DocumentStoreError(OSError):
    """The store could not read or write a document (disk full, permissions, ...)."""


@dataclass(frozen=True)
class StoredDocument:
    sha1_hex: str
    size: int
    path: Path
    # True when this put created the file; False when identical content was already stored.
    created: bool = True


def normalise_sha1(sha1: str) -> str:
    """The lowercase hex form; ValueError unless `sha1` is 40 hex digits (any case)."""
    value = sha1.strip().lower()
    if not _SHA1.match(value):
        raise ValueError("not a hex SHA-1")
    return value


def _hash_stream(fh: io.BufferedReader) -> tuple[str, int]:
    """(hex SHA-1, byte count) of what is left to read in `fh`."""
    digest = hashlib.sha1(usedforsecurity=False)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    size = 0
    while n := fh.readinto(view):
        digest.update(view[:n])
        size += n
    return digest.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DocumentStore:
    """Documents by content hash under `directory` (created when missing)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / _STAGING).mkdir(exist_ok=True)
        (self.directory / _LOCKS).mkdir(exist_ok=True)

    # -- paths --

    def path_for(self, sha1: str) -> Path:
        h = normalise_sha1(sha1)
        return self.directory / h[0:2] / h[2:4] / h

    def exists(self, sha1: str) -> bool:
        try:
            return self.path_for(sha1).is_file()
        except ValueError:
            return False

    def open(self, sha1: str) -> BinaryIO:
        """The stored document for reading; FileNotFoundError when it is not stored."""
        return self.path_for(sha1).open("rb")

    # -- writing --

    def put(self, src: Path, *, sha1: str | None = None, size: int | None = None,
            link: bool = False) -> StoredDocument:
        """Store the bytes of `src` (left in place); idempotent for identical content.

        `sha1` (and `size`): what the caller computed while writing `src`, e.g. during MTOM
        spooling. `link`: `src` is private to the caller and never written again, so it may be
        hard-linked into the store instead of copied; with `sha1` its bytes are then not read
        at all, without it they are read once to hash them. Whenever the bytes are copied
        their SHA-1 and size are computed and must equal `sha1` and `size` when given. A
        source whose size differs from `size` is refused (DocumentStoreError, nothing stored).

        Raises OSError (DocumentStoreError when the store itself cannot be written).
        """
        expected = normalise_sha1(sha1) if sha1 is not None else None
        if link:
            linked = self._put_linked(src, expected, size)
            if linked is not None:
                return linked
        stored = self._put_copy(src)
        if (expected is not None and stored.sha1_hex != expected) or \
                (size is not None and stored.size != size):
            if stored.created:
                self.remove_if_unreferenced(stored.sha1_hex)
            raise DocumentStoreError(errno.EIO, "the document changed after it was spooled")
        return stored

    def _put_linked(self, src: Path, sha1: str | None, size: int | None
                    ) -> StoredDocument | None:
        """`put` by hard link; None when the file system cannot link (the caller copies)."""
        staging = self.directory / _STAGING
        with open(src, "rb") as fh:
            st = os.fstat(fh.fileno())
            if size is not None and st.st_size != size:
                raise DocumentStoreError(errno.EIO, "the document changed after it was spooled")
            if sha1 is None:
                sha1, read = _hash_stream(fh)
                if read != st.st_size:
                    raise DocumentStoreError(errno.EIO, "the document changed while it was read")
            target = self.path_for(sha1)
            if target.is_file() and target.stat().st_size == st.st_size:
                return StoredDocument(sha1, st.st_size, target, created=False)
            os.fsync(fh.fileno())  # the data is durable before any name in the store
        tmp = staging / f"put-{secrets.token_hex(12)}.tmp"
        try:
            os.link(src, tmp)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno in _NO_LINK:
                return None
            raise DocumentStoreError(exc.errno, f"cannot write to the document store: "
                                                f"{exc.strerror}") from None
        try:
            linked = os.stat(tmp)
            if (linked.st_ino, linked.st_dev, linked.st_size) != \
                    (st.st_ino, st.st_dev, st.st_size):
                raise DocumentStoreError(errno.EIO, "the document changed while it was stored")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
            return StoredDocument(sha1, st.st_size, target, created=True)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def _put_copy(self, src: Path) -> StoredDocument:
        """`put` by copying into staging, hashing in the same pass."""
        staging = self.directory / _STAGING
        try:
            fd, tmp_name = tempfile.mkstemp(dir=staging, prefix="put-", suffix=".tmp")
        except OSError as exc:
            raise DocumentStoreError(exc.errno, f"cannot write to the document store: "
                                                f"{exc.strerror}") from None
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha1(usedforsecurity=False)
            size = 0
            with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
                while chunk := inp.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha1 = digest.hexdigest()
            target = self.path_for(sha1)
            if target.is_file() and target.stat().st_size == size:
                tmp.unlink()
                return StoredDocument(sha1, size, target, created=False)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
            return StoredDocument(sha1, size, target, created=True)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    # -- rollback and its counterpart --

    @contextlib.contextmanager
    def _locked(self, sha1: str) -> Iterator[None]:
        """An exclusive lock for one hash, across threads and processes."""
        h = normalise_sha1(sha1)
        path = self.directory / _LOCKS / h
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.fstat(fd).st_ino == os.stat(path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # the previous holder removed the lock file: take the new one
                    continue
                try:
                    yield
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                return
            finally:
                os.close(fd)

    def remove_if_unreferenced(
            self, sha1: str,
            is_referenced: Callable[[str], bool] | None = None) -> bool:
        """Delete the document unless `is_referenced(sha1)` says something still uses it.

        Returns True when a file was removed. The check and the unlink happen under the hash's
        lock, so a concurrent `ensure()` of the same hash sees the outcome.
        """
        h = normalise_sha1(sha1)
        with self._locked(h):
            if is_referenced is not None and is_referenced(h):
                return False
            path = self.path_for(h)
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            with contextlib.suppress(OSError):
                _fsync_dir(path.parent)
            return True

    def ensure(self, sha1: str, src: Path, *, link: bool = False) -> StoredDocument:
        """Make sure the document `sha1` is stored, re-storing it from `src` if it is missing.

        Called after a registration succeeded: a concurrent rollback of another request with
        the same content may have removed the file between our put and our registration.
        `link` as for `put` (the bytes of `src` are hashed again either way).
        """
        h = normalise_sha1(sha1)
        with self._locked(h):
            path = self.path_for(h)
            if path.is_file():
                return StoredDocument(h, path.stat().st_size, path, created=False)
            stored = self.put(src, link=link)
        if stored.sha1_hex != h:
            # The source changed under us: never keep other bytes for this request.
            if stored.created:
                self.remove_if_unreferenced(stored.sha1_hex)
            raise DocumentStoreError(errno.EIO, "the document changed while it was stored")
        return stored

    def cleanup_staging(self, older_than_seconds: float = 24 * 3600) -> int:
        """Remove staging files left by crashed processes; returns how many were removed."""
        import time

        removed = 0
        limit = time.time() - older_than_seconds
        for p in (self.directory / _STAGING).glob("put-*.tmp"):
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < limit:
                    p.unlink()
                    removed += 1
        return removed
