"""The one exception the DICOM layer raises: `PacsError(kind, message)`.

`kind` says what went wrong so that callers can map it to an XDS error without looking at
pynetdicom: "unreachable" (no TCP connection), "rejected" (association rejected), "aborted"
(association aborted or released mid-operation), "timeout" (no answer in time) and "failed"
(the PACS answered with a failure status). Messages never carry patient data.
"""

from __future__ import annotations

KINDS = frozenset({"unreachable", "rejected", "aborted", "timeout", "failed"})


class PacsError(Exception):
    def __init__(self, kind: str, message: str):
        if kind not in KINDS:
            raise ValueError(f"unknown PacsError kind {kind!r}")
        self.kind = kind
        self.message = message
        super().__init__(f"PACS {kind}: {message}")
