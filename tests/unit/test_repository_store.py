"""DocumentStore: content-addressed, atomic, idempotent puts; safe rollback."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from pathlib import Path

import pytest

from gateway.repository.store import CHUNK, DocumentStore, normalise_sha1


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
