"""DocumentStore: content-addressed, atomic, idempotent puts; safe rollback."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from pathlib import Path

import pytest

from gateway.repository.store import CHUNK, DocumentStore, DocumentStoreError, normalise_sha1


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _staging(store: DocumentStore) -> list[Path]:
    return list((store.directory / ".staging").iterdir())


def test_put_stores_by_sha1_and_leaves_no_temp_file(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "repo")
    data = os.urandom(3 * CHUNK + 17)  # several chunks and a partial one
    src = _write(tmp_path / "in.bin", data)

    stored = store.put(src)

    sha1 = hashlib.sha1(data).hexdigest()
    assert stored.sha1_hex == sha1
    assert stored.size == len(data)
    assert stored.created is True
    assert stored.path == tmp_path / "repo" / sha1[:2] / sha1[2:4] / sha1
    assert stored.path.read_bytes() == data
    assert store.exists(sha1) and store.exists(sha1.upper())
    with store.open(sha1) as fh:
        assert fh.read() == data
    assert src.read_bytes() == data  # the source is left alone
    assert _staging(store) == []


def test_put_of_empty_document(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "repo")
    stored = store.put(_write(tmp_path / "empty", b""))
    assert stored.sha1_hex == hashlib.sha1(b"").hexdigest()
    assert stored.size == 0
    assert stored.path.read_bytes() == b""


def test_put_is_idempotent_for_identical_content(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "repo")
    first = store.put(_write(tmp_path / "a", b"same bytes"))
    inode = first.path.stat().st_ino
    second = store.put(_write(tmp_path / "b", b"same bytes"))

    assert second.sha1_hex == first.sha1_hex
    assert second.path == first.path
    assert second.created is False
    assert second.path.stat().st_ino == inode  # not rewritten
    assert _staging(store) == []
    files = [p for p in (tmp_path / "repo").rglob("*")
             if p.is_file() and ".staging" not in p.parts and ".locks" not in p.parts]
    assert files == [first.path]


def test_put_repairs_a_truncated_file(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "repo")
    stored = store.put(_write(tmp_path / "a", b"0123456789"))
    stored.path.write_bytes(b"01234")  # damaged by something outside the store
    again = store.put(tmp_path / "a")
    assert again.created is True
    assert again.path.read_bytes() == b"0123456789"


def test_missing_source_raises_and_leaves_nothing(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "repo")
    with pytest.raises(FileNotFoundError):
        store.put(tmp_path / "does-not-exist")
    assert _staging(store) == []


def test_path_for_rejects_anything_but_a_sha1(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "repo")
    for bad in ("../../etc/passwd", "abc", "g" * 40, ""):
        with pytest.raises(ValueError):
            store.path_for(bad)
        assert store.exists(bad) is False
    assert normalise_sha1("A" * 40) == "a" * 40


def _put_in_child(directory: str, src: str, queue: multiprocessing.Queue) -> None:
    store = DocumentStore(Path(directory))
    results = [store.put(Path(src)).sha1_hex for _ in range(20)]
    queue.put(results)


def test_concurrent_put_of_same_content_from_two_processes(tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK + 5)
    sha1 = hashlib.sha1(data).hexdigest()
    srcs = [_write(tmp_path / f"src{i}", data) for i in range(2)]
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_put_in_child, args=(str(tmp_path / "repo"), str(s), queue))
             for s in srcs]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    assert all(r == [sha1] * 20 for r in results)
    store = DocumentStore(tmp_path / "repo")
    assert store.path_for(sha1).read_bytes() == data
    assert _staging(store) == []


def test_rollback_keeps_referenced_and_pre_existing_files(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "repo")
    old = store.put(_write(tmp_path / "old", b"registered earlier"))
    # A later request stores the same content again: it did not create the file...
    again = store.put(tmp_path / "old")
    assert again.created is False
    # ...and a rollback that asks the registry keeps it while something references it.
    assert store.remove_if_unreferenced(old.sha1_hex, lambda h: h == old.sha1_hex) is False
    assert old.path.read_bytes() == b"registered earlier"

    new = store.put(_write(tmp_path / "new", b"only this request"))
    assert store.remove_if_unreferenced(new.sha1_hex, lambda h: False) is True
    assert not new.path.exists()
    assert store.remove_if_unreferenced(new.sha1_hex) is False  # already gone
    assert old.path.exists()
    assert list((store.directory / ".locks").iterdir()) == []  # lock files cleaned up


def test_ensure_restores_a_file_removed_by_a_concurrent_rollback(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "repo")
    src = _write(tmp_path / "doc", b"shared content")
    stored = store.put(src)
    store.remove_if_unreferenced(stored.sha1_hex)  # another request rolled back
    assert not store.exists(stored.sha1_hex)

    restored = store.ensure(stored.sha1_hex, src)
    assert restored.path.read_bytes() == b"shared content"
    assert store.ensure(stored.sha1_hex, src).created is False


def test_ensure_refuses_a_source_with_other_bytes(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "repo")
    sha1 = hashlib.sha1(b"expected").hexdigest()
    with pytest.raises(OSError):
        store.ensure(sha1, _write(tmp_path / "x", b"something else"))
    assert not store.exists(sha1)
    assert not store.exists(hashlib.sha1(b"something else").hexdigest())


def _lock_and_remove(directory: str, sha1: str, n: int) -> None:
    store = DocumentStore(Path(directory))
    for _ in range(n):
        store.remove_if_unreferenced(sha1)


def test_ensure_wins_against_concurrent_removals(tmp_path: Path) -> None:
    """After ensure() returns, the file is there unless a removal started later."""
    store = DocumentStore(tmp_path / "repo")
    src = _write(tmp_path / "doc", os.urandom(4096))
    sha1 = store.put(src).sha1_hex
    ctx = multiprocessing.get_context("fork")
    remover = ctx.Process(target=_lock_and_remove, args=(str(store.directory), sha1, 200))
    remover.start()
    for _ in range(200):
        stored = store.ensure(sha1, src)
        assert stored.sha1_hex == sha1
    remover.join(timeout=60)
    assert remover.exitcode == 0
    store.ensure(sha1, src)
    assert store.path_for(sha1).read_bytes() == src.read_bytes()
    assert _staging(store) == []


# --- put by hard link (a request's private spool file) --------------------------------------

def _store_files(store: DocumentStore) -> list[Path]:
    return sorted(p for p in store.directory.rglob("*") if p.is_file()
                  and ".staging" not in p.parts and ".locks" not in p.parts)


def test_put_link_stores_the_spool_file_itself(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "repo")
    data = os.urandom(3 * CHUNK + 11)
    src = _write(tmp_path / "spooled", data)
    stored = store.put(src, link=True)
    assert stored.sha1_hex == hashlib.sha1(data).hexdigest()  # hashed by reading it once
    assert (stored.size, stored.created) == (len(data), True)
    assert stored.path == store.path_for(stored.sha1_hex)
    assert stored.path.stat().st_ino == src.stat().st_ino  # no copy
    assert stored.path.stat().st_mode & 0o777 == 0o644
    assert _staging(store) == []
    src.unlink()  # the request's spool folder goes away; the document stays
    assert stored.path.read_bytes() == data


def test_put_link_with_the_spooling_hash_does_not_read_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.repository.store as store_module

    def no_reading(_fh: object) -> tuple[str, int]:
        raise AssertionError("the file was read again")

    monkeypatch.setattr(store_module, "_hash_stream", no_reading)
    store = DocumentStore(tmp_path / "repo")
    data = b"hashed while it was spooled"
    src = _write(tmp_path / "spooled", data)
    digest = hashlib.sha1(data).hexdigest()
    stored = store.put(src, sha1=digest.upper(), size=len(data), link=True)
    assert (stored.sha1_hex, stored.size, stored.created) == (digest, len(data), True)
    assert stored.path.stat().st_ino == src.stat().st_ino
    # Identical content already stored: nothing linked, the existing file stays.
    other = _write(tmp_path / "again", data)
    again = store.put(other, sha1=digest, size=len(data), link=True)
    assert again.created is False
    assert again.path.stat().st_ino == src.stat().st_ino
    assert _staging(store) == []


def test_put_without_link_still_copies(tmp_path: Path) -> None:
    # A caller's own file may be rewritten later: it must never share the stored inode.
    store = DocumentStore(tmp_path / "repo")
    src = _write(tmp_path / "mine", b"my file")
    stored = store.put(src)
    assert stored.path.stat().st_ino != src.stat().st_ino
    src.write_bytes(b"rewritten")
    assert stored.path.read_bytes() == b"my file"


@pytest.mark.parametrize("err", [18, 1, 95])  # EXDEV, EPERM, EOPNOTSUPP
def test_put_link_falls_back_to_a_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       err: int) -> None:
    import gateway.repository.store as store_module

    tried: list[Path] = []

    def cannot_link(src: Path, dst: Path) -> None:
        tried.append(Path(dst))
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(store_module.os, "link", cannot_link)
    store = DocumentStore(tmp_path / "repo")
    data = os.urandom(CHUNK + 5)
    src = _write(tmp_path / "spooled", data)
    digest = hashlib.sha1(data).hexdigest()
    stored = store.put(src, sha1=digest, size=len(data), link=True)
    assert tried and tried[0].parent == store.directory / ".staging"
    assert (stored.sha1_hex, stored.size, stored.created) == (digest, len(data), True)
    assert stored.path.stat().st_ino != src.stat().st_ino
    assert stored.path.read_bytes() == data
    assert _staging(store) == []


def test_copy_fallback_verifies_the_spooling_hash(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.repository.store as store_module

    def cannot_link(src: Path, dst: Path) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(store_module.os, "link", cannot_link)
    store = DocumentStore(tmp_path / "repo")
    src = _write(tmp_path / "spooled", b"changed after it was hashed")
    wrong = hashlib.sha1(b"what was spooled").hexdigest()
    with pytest.raises(DocumentStoreError):
        store.put(src, sha1=wrong, link=True)
    with pytest.raises(DocumentStoreError):
        store.put(src, size=3)
    assert _store_files(store) == []
    assert _staging(store) == []


def test_put_link_refuses_a_file_whose_size_changed(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "repo")
    data = b"spooled bytes"
    src = _write(tmp_path / "spooled", data + b" and more")
    with pytest.raises(DocumentStoreError):
        store.put(src, sha1=hashlib.sha1(data).hexdigest(), size=len(data), link=True)
    assert _store_files(store) == []
    assert _staging(store) == []


def test_put_link_failure_after_linking_leaves_no_file(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.repository.store as store_module

    def replace_fails(_a: object, _b: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.os, "replace", replace_fails)
    store = DocumentStore(tmp_path / "repo")
    src = _write(tmp_path / "spooled", b"never stored")
    with pytest.raises(OSError):
        store.put(src, link=True)
    assert _store_files(store) == []
    assert _staging(store) == []
    assert src.read_bytes() == b"never stored"  # the spool file is the caller's to remove


def test_put_link_hard_error_is_a_store_error(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.repository.store as store_module

    def full(src: Path, dst: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.os, "link", full)
    store = DocumentStore(tmp_path / "repo")
    with pytest.raises(DocumentStoreError):
        store.put(_write(tmp_path / "spooled", b"x"), link=True)
    assert _store_files(store) == []
    assert _staging(store) == []


def test_ensure_relinks_a_spool_file_removed_by_a_rollback(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "repo")
    src = _write(tmp_path / "spooled", b"registered, then rolled back by someone else")
    stored = store.put(src, link=True)
    assert store.remove_if_unreferenced(stored.sha1_hex) is True
    restored = store.ensure(stored.sha1_hex, src, link=True)
    assert restored.created is True
    assert restored.path.stat().st_ino == src.stat().st_ino
