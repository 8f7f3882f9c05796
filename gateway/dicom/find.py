"""C-FIND against the PACS: Study Root Query/Retrieve at STUDY, SERIES or IMAGE level.

`find(pacs, level, keys, return_keys=...)` sends one query and returns the matches as pydicom
Datasets. Keys are DICOM keywords; a list value is a UID list match (values joined with "\\").
Every key is also a return key; `return_keys` adds more (universal matching). Errors are
`PacsError`. With `[pacs] dimse_engine = "builtin"` (the default) the query runs over
gateway.dicom.cfind instead of pynetdicom.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pynetdicom import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore

from gateway.config import PacsConfig
from gateway.dicom.association import associate, check_alive
from gateway.dicom.errors import PacsError

LEVELS = ("STUDY", "SERIES", "IMAGE")
_UNIQUE = {"STUDY": ("StudyInstanceUID",),
           "SERIES": ("StudyInstanceUID", "SeriesInstanceUID"),
           "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
_DEFAULT_RETURN = {
    "STUDY": ("StudyInstanceUID",),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID", "Modality"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"),
}


def build_query(level: str, keys: Mapping[str, str | list[str]],
                return_keys: Sequence[str] = (), without: Sequence[str] = ()) -> Dataset:
    """The identifier: the level's unique keys, its default return keys except those in
    `without` (never a unique key), `return_keys`, then `keys` with their values."""
    if level not in LEVELS:
        raise ValueError(f"C-FIND level must be one of {LEVELS}, got {level!r}")
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    defaults = tuple(k for k in _DEFAULT_RETURN[level] if k not in without)
    for keyword in (*_UNIQUE[level], *defaults, *return_keys):
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"not a DICOM keyword: {keyword!r}")
        if keyword not in ds:
            setattr(ds, keyword, "")
    for keyword, value in keys.items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"not a DICOM keyword: {keyword!r}")
        setattr(ds, keyword, "\\".join(value) if isinstance(value, list) else value)
    return ds


def find(pacs: PacsConfig, level: str, keys: Mapping[str, str | list[str]], *,
         return_keys: Sequence[str] = (), timeout: float = 30,
         without: Sequence[str] = ()) -> list[Dataset]:
    """The matches of one C-FIND; `without` drops default return keys (a PACS may have to
    read every matching instance for some: Orthanc for SOP Class UID)."""
    query = build_query(level, keys, return_keys, without)
    if getattr(pacs, "dimse_engine", "builtin") == "builtin":
        from gateway.dicom.cfind import run_c_find

        return run_c_find(pacs, query, timeout)
    model = StudyRootQueryRetrieveInformationModelFind
    assoc = associate(pacs, [build_context(model)], timeout)
    results: list[Dataset] = []
    try:
        for status, identifier in assoc.send_c_find(query, model):
            if status is None or "Status" not in status:
                check_alive(assoc, "C-FIND")
                raise PacsError("timeout", "no C-FIND response within the DIMSE timeout")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                if identifier is not None:
                    results.append(identifier)
            elif code == 0x0000:
                break
            elif code == 0xFE00:
                raise PacsError("failed", "C-FIND cancelled by the PACS")
            else:
                comment = str(status.get("ErrorComment", "")).strip()
                raise PacsError("failed", f"C-FIND failed with status 0x{code:04X}"
                                          + (f": {comment}" if comment else ""))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def find_studies(pacs: PacsConfig, keys: Mapping[str, str | list[str]] | None = None, *,
                 return_keys: Sequence[str] = (), timeout: float = 30) -> list[Dataset]:
    return find(pacs, "STUDY", keys or {}, return_keys=return_keys, timeout=timeout)


def find_series(pacs: PacsConfig, study_uid: str | list[str],
                keys: Mapping[str, str | list[str]] | None = None, *,
                return_keys: Sequence[str] = (), timeout: float = 30) -> list[Dataset]:
    return find(pacs, "SERIES", {"StudyInstanceUID": study_uid, **(keys or {})},
                return_keys=return_keys, timeout=timeout)


def find_instances(pacs: PacsConfig, study_uid: str | list[str],
                   series_uid: str | list[str] = "",
                   keys: Mapping[str, str | list[str]] | None = None, *,
                   return_keys: Sequence[str] = (), timeout: float = 30) -> list[Dataset]:
    base: dict[str, str | list[str]] = {"StudyInstanceUID": study_uid}
    if series_uid:
        base["SeriesInstanceUID"] = series_uid
    return find(pacs, "IMAGE", {**base, **(keys or {})},
                return_keys=return_keys, timeout=timeout)
