"""RAD-69 request: parse `RetrieveImagingDocumentSetRequest` into plain values, and the
WADO-WS error codes (DICOM PS3.18 section 6.4) that RAD-69 answers with.

Parsing is lenient per document: an empty study or series UID does not reject the whole
request; it becomes an error for that document (`ImagingDocumentRequest.problem`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lxml import etree

from gateway.errors import XdsError, XdsFailure
from gateway.ns import XDSB, XDSI, ErrorCode

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


class Wado:
    """WADO-WS error codes, DICOM PS3.18 6.4 (Retrieve Imaging Document Set)."""

    TS_NOT_SUPPORTED = "urn:dicom:wado:0006"  # the server does not support the syntax
    TS_NOT_PROVIDED = "urn:dicom:wado:0007"  # cannot be provided in the requested syntax
    INCONSISTENT = "urn:dicom:wado:0010"  # e.g. the instance is in another series/study
    INVALID_PARAMETER = "urn:dicom:wado:0012"  # invalid parameter value in the request
    PROCESSING_FAILURE = "urn:dicom:wado:0014"
    STUDY_UNKNOWN = "urn:dicom:wado:0015"
    SERIES_UNKNOWN = "urn:dicom:wado:0016"
    DOCUMENT_UNKNOWN = "urn:dicom:wado:0017"


@dataclass(frozen=True)
class ImagingDocumentRequest:
    study_uid: str
    series_uid: str
    repository_unique_id: str
    document_unique_id: str  # the SOP Instance UID
    home_community_id: str | None = None
    problem: str | None = None  # why this request cannot be served as written

    @property
    def valid(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class ImagingRequest:
    documents: tuple[ImagingDocumentRequest, ...]
    transfer_syntaxes: tuple[str, ...]  # as listed, empty entries dropped


def _q(ns: str, local: str) -> str:
    return f"{{{ns}}}{local}"


def _text(el: etree._Element | None) -> str:
    return (el.text or "").strip() if el is not None else ""


def parse_request(el: etree._Element) -> ImagingRequest:
    """Raises XdsFailure only when the body is not a RAD-69 request at all."""
    if el.tag != _q(XDSI, "RetrieveImagingDocumentSetRequest"):
        raise XdsFailure(XdsError(ErrorCode.REPOSITORY_ERROR,
                                  f"expected xdsi:RetrieveImagingDocumentSetRequest, got {el.tag}"))
    docs: list[ImagingDocumentRequest] = []
    for study in el.iterfind(_q(XDSI, "StudyRequest")):
        study_uid = (study.get("studyInstanceUID") or "").strip()
        for series in study.iterfind(_q(XDSI, "SeriesRequest")):
            series_uid = (series.get("seriesInstanceUID") or "").strip()
            for d in series.iterfind(_q(XDSB, "DocumentRequest")):
                repo = _text(d.find(_q(XDSB, "RepositoryUniqueId")))
                doc = _text(d.find(_q(XDSB, "DocumentUniqueId")))
                hc = _text(d.find(_q(XDSB, "HomeCommunityId"))) or None
                problem = None
                if not study_uid or not UID_RE.match(study_uid):
                    problem = "StudyRequest/@studyInstanceUID is empty or not a UID"
                elif not series_uid or not UID_RE.match(series_uid):
                    problem = "SeriesRequest/@seriesInstanceUID is empty or not a UID"
                elif not doc or not UID_RE.match(doc):
                    problem = "DocumentUniqueId is empty or not a UID"
                elif not repo:
                    problem = "RepositoryUniqueId is empty"
                docs.append(ImagingDocumentRequest(study_uid, series_uid, repo, doc, hc,
                                                   problem))
    if not docs:
        raise XdsFailure(XdsError(ErrorCode.REPOSITORY_ERROR,
                                  "RetrieveImagingDocumentSetRequest: no DocumentRequest"))
    tsl = el.find(_q(XDSI, "TransferSyntaxUIDList"))
    syntaxes: list[str] = []
    if tsl is not None:
        for t in tsl.iterfind(_q(XDSI, "TransferSyntaxUID")):
            value = _text(t)
            if value and value not in syntaxes:
                syntaxes.append(value)
    return ImagingRequest(tuple(docs), tuple(syntaxes))
