"""The audit record of a streamed (live) response: written once, when the response is
complete or abandoned, with the right outcome for root-first and root-last orders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from gateway.soap.application import _audited_live
from gateway.transactions import Attachment, LiveAttachments


def _live(tmp_path: Path, n: int, *, root_first: bool, fail_at: int | None = None
          ) -> tuple[LiveAttachments, etree._Element]:
    root = etree.Element("root")

    def parts() -> Iterator[Attachment]:
        for i in range(n):
            if i == fail_at:
                raise ConnectionResetError("the community broke off")
            path = tmp_path / f"p{i}"
            path.write_bytes(b"x")
            yield Attachment(f"doc{i}", path, 1, "application/dicom")

    return LiveAttachments(parts(), lambda: root, lambda: None, root_first=root_first), root


def _recorder() -> tuple[list[tuple[Any, int | None]], Any]:
    records: list[tuple[Any, int | None]] = []
    return records, lambda body, outcome: records.append((body, outcome))


@pytest.mark.parametrize("root_first", [True, False])
@pytest.mark.parametrize("n", [0, 3])
def test_a_complete_response_is_recorded_once_with_its_body(tmp_path: Path, root_first: bool,
                                                            n: int) -> None:
    live, root = _live(tmp_path, n, root_first=root_first)
    records, record = _recorder()
    audited = _audited_live(live, record)
    if root_first:
        assert audited.finish() is root
        assert records == []  # the root went out, the parts it names not yet
        assert len(list(audited.parts)) == n
    else:
        assert len(list(audited.parts)) == n
        assert records == []
        assert audited.finish() is root
    audited.close()
    assert records == [(root, None)]


def test_a_root_first_response_broken_off_after_its_root_is_a_failure(tmp_path: Path) -> None:
    live, root = _live(tmp_path, 3, root_first=True, fail_at=1)
    records, record = _recorder()
    audited = _audited_live(live, record)
    audited.finish()
    parts = audited.parts
    next(parts)
    with pytest.raises(ConnectionResetError):
        next(parts)
    audited.close()
    assert records == [(root, 8)]


def test_a_root_last_response_abandoned_before_its_root_is_a_failure(tmp_path: Path) -> None:
    live, _root = _live(tmp_path, 3, root_first=False)
    records, record = _recorder()
    audited = _audited_live(live, record)
    next(audited.parts)
    audited.close()
    audited.close()
    assert records == [(None, 8)]


def test_a_root_that_cannot_be_built_is_a_receiver_failure(tmp_path: Path) -> None:
    live, _root = _live(tmp_path, 0, root_first=False)

    def broken() -> etree._Element:
        raise RuntimeError("no root")

    records, record = _recorder()
    audited = _audited_live(LiveAttachments(live.parts, broken, live.close), record)
    list(audited.parts)
    with pytest.raises(RuntimeError):
        audited.finish()
    audited.close()
    assert records == [(None, 12)]
