"""RAD-69 resolution: C-FIND the PACS for every requested instance and check that the
request's study, series and instance UIDs agree with what the PACS holds.

Per requested study: one IMAGE-level C-FIND for the requested SOP Instance UIDs; instances not
found in their study are looked up once across all studies (and a SERIES-level C-FIND of their
study says which series exist), to tell an inconsistent request (urn:dicom:wado:0010: the
instance lives in another series or study) from an unknown study (0015), series (0016) or
instance (0017).
Each of those failures also carries XDSMissingDocument.
A list of SOP Instance UIDs too long for one explicit VR identifier (64 KB, about 1000 UIDs)
is queried in several C-FINDs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.config import PacsConfig
from gateway.dicom.cget import uid_batches
from gateway.dicom.find import find
from gateway.dicom.retrieve import InstanceRef
from gateway.errors import XdsError
from gateway.imaging.request import ImagingDocumentRequest, Wado
from gateway.ns import ErrorCode


@dataclass
class Resolution:
    found: list[tuple[InstanceRef, ImagingDocumentRequest]] = field(default_factory=list)
    errors: list[XdsError] = field(default_factory=list)


def _missing(doc: ImagingDocumentRequest, code: str, context: str) -> list[XdsError]:
    where = doc.document_unique_id
    return [XdsError(code, context, location=where),
            XdsError(ErrorCode.MISSING_DOCUMENT, f"document {where} is not available: "
                     + context, location=where)]


def resolve(pacs: PacsConfig, docs: list[ImagingDocumentRequest],
            timeout: float | None = None) -> Resolution:
    t = float(timeout if timeout is not None else pacs.timeout_seconds)
    out = Resolution()
    by_study: dict[str, list[ImagingDocumentRequest]] = {}
    for d in docs:
        by_study.setdefault(d.study_uid, []).append(d)
    strays: list[ImagingDocumentRequest] = []
    series_of_study: dict[str, set[str]] = {}
    for study, study_docs in by_study.items():
        uids = sorted({d.document_unique_id for d in study_docs})
        hits = {str(i.SOPInstanceUID): i for batch in uid_batches(uids) for i in
                find(pacs, "IMAGE", {"StudyInstanceUID": study, "SOPInstanceUID": batch},
                     timeout=t) if "SOPInstanceUID" in i}
        for d in study_docs:
            hit = hits.get(d.document_unique_id)
            if hit is None:
                strays.append(d)
            elif str(hit.get("SeriesInstanceUID", "")) != d.series_uid:
                out.errors.extend(_missing(d, Wado.INCONSISTENT,
                                           "the instance is not in the requested series"))
            else:
                out.found.append((InstanceRef(d.study_uid, d.series_uid, d.document_unique_id,
                                              str(hit.get("SOPClassUID", ""))), d))
    if strays:
        # Which series exist is only needed to explain instances not found where asked
        # (one C-FIND less, about 0.1 s, on the usual path).
        for study in sorted({d.study_uid for d in strays}):
            series = find(pacs, "SERIES", {"StudyInstanceUID": study}, timeout=t)
            series_of_study[study] = {str(s.get("SeriesInstanceUID", "")) for s in series}
        uids = sorted({d.document_unique_id for d in strays})
        elsewhere = {str(i.SOPInstanceUID) for batch in uid_batches(uids) for i in
                     find(pacs, "IMAGE", {"SOPInstanceUID": batch}, timeout=t)
                     if "SOPInstanceUID" in i}
        for d in strays:
            if d.document_unique_id in elsewhere:
                out.errors.extend(_missing(d, Wado.INCONSISTENT,
                                           "the instance is not in the requested study"))
            elif not series_of_study.get(d.study_uid):
                out.errors.extend(_missing(d, Wado.STUDY_UNKNOWN,
                                           "Study Instance UID not known"))
            elif d.series_uid not in series_of_study[d.study_uid]:
                out.errors.extend(_missing(d, Wado.SERIES_UNKNOWN,
                                           "Series Instance UID not known"))
            else:
                out.errors.extend(_missing(d, Wado.DOCUMENT_UNKNOWN,
                                           "SOP Instance UID not known"))
    # Instances without a SOP Class UID in the C-FIND answer cannot get a presentation
    # context for C-GET.
    kept = []
    for ref, d in out.found:
        if ref.sop_class_uid:
            kept.append((ref, d))
        else:
            out.errors.append(XdsError(Wado.PROCESSING_FAILURE,
                                       "the PACS did not report the SOP Class UID",
                                       location=d.document_unique_id))
    out.found = kept
    return out
