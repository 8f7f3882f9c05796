"""RAD-69 Retrieve Imaging Document Set: the Imaging Document Source in front of a PACS.

request (gateway.imaging.request) -> checks (repository id, UIDs, transfer syntaxes) ->
C-FIND to resolve and check every requested instance (gateway.imaging.plan) -> C-GET or C-MOVE
into the request's spool folder (gateway.dicom.retrieve) -> RetrieveDocumentSetResponse with
one DocumentResponse per instance, its Part 10 file as an MTOM attachment, streamed by the edge
from the spool file; the spool folder is removed after the response (SoapResponse.cleanup).

Two response orders (`[pacs] response_order`):

- "root-first" (default): the response starts once the retrieve has ended, root XML part
  first. zeep, with the official XDS-I.b WSDL, takes the first MIME part as the envelope
  whatever `start` says (tests/unit/test_rad69_part_order.py), and the root carries the
  RegistryResponse status and the list of DocumentResponses, which are known only when every
  instance has arrived or failed; writing the root first from the C-FIND plan would misreport
  instances that then fail. Readable by every MTOM client; the response (about 0.4 s per
  250 MB on loopback) comes after the retrieve, never overlapping it.
- "root-last": the response starts as soon as C-FIND has resolved the request. Each instance
  is written as an attachment part the moment the retrieve places it in the spool folder
  (`retrieve(on_received=...)`, run in a thread of this request), in arrival order, with
  Content-IDs doc0, doc1, ... in that order; the root part goes last, with the exact status,
  errors and DocumentResponses (same order as the parts) once everything is known: an
  instance that fails after streaming began is just an error in the root. This is MTOM to
  the letter: the multipart `start` parameter names the root (RFC 2387 section 3.2: "the
  content-ID of the compound object's root"; only without `start` is the first part the
  root), and XOP 1.0 section 4.1 says that, except for determining the root part as RFC 2387
  specifies, the order of MIME parts MUST NOT be significant. The length is unknown, so the
  HTTP response is chunked. The trade-off: clients that ignore `start` and take the first
  part as the envelope (zeep 4; some other stacks) cannot read it, and the HTTP status is 200
  even when every instance then fails (the status is in the root, as always for XDS). Our
  own client (gateway.soap.client) finds the root by `start`. A client that goes away
  mid-stream ends the response: the retrieve runs to its end (bounded by the PACS timeouts),
  then the spool folder is removed and the audit record written (outcome 8).

Each instance is returned as the PACS sent it (the dataset bytes untouched, behind a file meta
header) and only in one of the requested transfer syntaxes; the gateway never converts pixel
data itself. Errors are per document, as WADO-WS codes (DICOM PS3.18 6.4) plus
XDSMissingDocument for unknown or inconsistent identifiers; some documents failing gives
PartialSuccess, all failing Failure.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree
from pydicom.uid import AllTransferSyntaxes

from gateway.config import ROOT_FIRST, ROOT_LAST, PacsConfig
from gateway.dicom.errors import PacsError
from gateway.ebrim.model import RetrievedDocument
from gateway.ebrim.render import render_retrieve_document_set_response
from gateway.errors import XdsError, XdsFailure, status_for
from gateway.imaging.plan import Resolution, explain, resolve
from gateway.imaging.request import ImagingDocumentRequest, ImagingRequest, Wado, parse_request
from gateway.ns import ErrorCode, ResponseStatus
from gateway.services import Services
from gateway.transactions import Attachment, LiveAttachments, RequestContext, SoapResponse

if TYPE_CHECKING:
    from gateway.dicom.retrieve import InstanceRef, Received, RetrieveOutcome

log = logging.getLogger(__name__)

MIME_DICOM = "application/dicom"
CONTENT_ID_DOMAIN = "imaging-source.xdsi-gateway"
KNOWN_SYNTAXES = frozenset(str(u) for u in AllTransferSyntaxes)


def _doc_error(code: str, context: str, doc: ImagingDocumentRequest) -> XdsError:
    return XdsError(code, context, location=doc.document_unique_id or None)


def check_documents(services: Services, request: ImagingRequest
                    ) -> tuple[list[ImagingDocumentRequest], list[XdsError], tuple[str, ...]]:
    """The documents worth asking the PACS for, the errors of the others, and the transfer
    syntaxes to ask for."""
    own_id = services.config.community.imaging_source_unique_id
    syntaxes = tuple(t for t in request.transfer_syntaxes if t in KNOWN_SYNTAXES)
    unknown = [t for t in request.transfer_syntaxes if t not in KNOWN_SYNTAXES]
    errors: list[XdsError] = []
    ok: list[ImagingDocumentRequest] = []
    for doc in request.documents:
        if doc.problem is not None:
            errors.append(_doc_error(Wado.INVALID_PARAMETER, doc.problem, doc))
        elif doc.repository_unique_id != own_id:
            errors.append(_doc_error(
                ErrorCode.UNKNOWN_REPOSITORY_ID,
                f"RepositoryUniqueId {doc.repository_unique_id} is not this Imaging Document "
                f"Source ({own_id})", doc))
        elif not request.transfer_syntaxes:
            errors.append(_doc_error(Wado.INVALID_PARAMETER,
                                     "TransferSyntaxUIDList lists no transfer syntax", doc))
        elif not syntaxes:
            errors.append(_doc_error(
                Wado.TS_NOT_SUPPORTED,
                "none of the requested transfer syntaxes is supported: " + " ".join(unknown),
                doc))
        else:
            ok.append(doc)
    return ok, errors, syntaxes


def _response(status: str, documents: list[RetrievedDocument], errors: list[XdsError],
              cleanup: list[Path]) -> SoapResponse:
    content_ids = {id(d): f"doc{i}@{CONTENT_ID_DOMAIN}" for i, d in enumerate(documents)}
    body = render_retrieve_document_set_response(
        status, documents, errors, content_id_for=lambda d: content_ids[id(d)])
    attachments = tuple(Attachment(content_ids[id(d)], d.path, d.size, MIME_DICOM,
                                   offset=d.offset)
                        for d in documents)
    return SoapResponse(body=body, attachments=attachments, cleanup=cleanup)


def response_order(services: Services) -> str:
    """`[pacs] response_order` ("root-first" when absent)."""
    return str(getattr(services.config.pacs, "response_order", ROOT_FIRST) or ROOT_FIRST)


def retrieve_imaging_document_set(services: Services, ctx: RequestContext,
                                  body: etree._Element) -> SoapResponse:
    try:
        request = parse_request(body)
    except XdsFailure as failure:
        return _response(ResponseStatus.FAILURE, [], list(failure.errors), [])
    spool = ctx.spool_dir / "rad69"
    if response_order(services) == ROOT_LAST:
        return live_response(services, request, spool)
    documents, errors = retrieve_request(services, request, spool)
    status = status_for(errors, partial_possible=True, any_success=bool(documents))
    return _response(status, documents, errors, [spool])


def _resolve(services: Services, candidates: list[ImagingDocumentRequest], errors: list[XdsError],
             transaction: str) -> Resolution:
    """C-FIND for `candidates`; its errors (and a failed C-FIND's) go into `errors`."""
    try:
        resolution = resolve(services.config.pacs, candidates)
    except PacsError as exc:
        log.warning("%s: C-FIND failed: %s", transaction, exc)
        errors.extend(_doc_error(ErrorCode.REPOSITORY_ERROR,
                                 f"the PACS could not be queried: {exc}", d)
                      for d in candidates)
        resolution = Resolution()
    errors.extend(resolution.errors)
    return resolution


def retrieve_request(services: Services, request: ImagingRequest, spool: Path, *,
                     transaction: str = "RAD-69"
                     ) -> tuple[list[RetrievedDocument], list[XdsError]]:
    """The Imaging Document Source's work for one request: check the documents, resolve them
    with C-FIND, retrieve what was found into `spool`. RAD-69 and RAD-75 (for the documents
    of our community) both answer with it."""
    candidates, errors, syntaxes = check_documents(services, request)
    documents: list[RetrievedDocument] = []
    if candidates:
        started = time.monotonic()
        resolution = _resolve(services, candidates, errors, transaction)
        found_at = time.monotonic()
        if resolution.found:
            documents, retrieve_errors = fetch(services, resolution, syntaxes, spool)
            errors.extend(retrieve_errors)
        log.info("%s: %d requested, %d found by C-FIND in %.2f s, %d retrieved in %.2f s",
                 transaction, len(request.documents), len(resolution.found),
                 found_at - started, len(documents), time.monotonic() - found_at)
    return documents, errors


def live_response(services: Services, request: ImagingRequest, spool: Path) -> SoapResponse:
    """RAD-69 with the root part last (module docstring): checks and C-FIND now, then a
    `SoapResponse.live` whose parts are the instances as the retrieve places them in
    `spool`. Without anything to retrieve, the plain response (nothing to stream)."""
    candidates, errors, syntaxes = check_documents(services, request)
    if not candidates:
        status = status_for(errors, partial_possible=True, any_success=False)
        return _response(status, [], errors, [spool])
    started = time.monotonic()
    resolution = _resolve(services, candidates, errors, "RAD-69")
    if not resolution.found:
        status = status_for(errors, partial_possible=True, any_success=False)
        return _response(status, [], errors, [spool])
    log.info("RAD-69: %d requested, %d found by C-FIND in %.2f s; streaming",
             len(request.documents), len(resolution.found), time.monotonic() - started)
    stream = LiveRetrieve(services, resolution, syntaxes, spool, errors)
    fallback = render_retrieve_document_set_response(
        ResponseStatus.FAILURE, [],
        [XdsError(ErrorCode.REPOSITORY_ERROR, "the gateway could not complete the response")],
        content_id_for=lambda _d: "")
    return SoapResponse(body=fallback, cleanup=[spool],
                        live=LiveAttachments(stream.parts(), stream.finish, stream.close))


_END = object()
CLOSE_WAIT_SECONDS = 1.0  # how long close() waits for a retrieve still running


class LiveRetrieve:
    """One root-last RAD-69: the retrieve runs in a thread; `parts()` yields each instance
    as the retrieve reports it (`on_received`, called in that thread, feeds a queue that can
    never hold more than one entry per instance, so it never blocks the retrieve), `finish()`
    renders the root from what was sent and what failed, `close()` ends it (see there)."""

    def __init__(self, services: Services, resolution: Resolution,
                 syntaxes: tuple[str, ...], spool: Path, errors: list[XdsError]):
        pacs = services.config.pacs
        self._pacs = pacs
        self._resolution = resolution
        self._found = list(resolution.found)
        self._explained: dict[str | None, list[XdsError]] = {}
        self._by_uid = {ref.sop_instance_uid: doc for ref, doc in self._found}
        self._syntaxes = syntaxes
        self._spool = spool
        self._errors = list(errors)  # from the checks and C-FIND
        # Unbounded type, bounded in fact: at most one report per instance, plus _END.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sent: list[RetrievedDocument] = []
        self._seen: set[str] = set()
        self._wrong_syntax: dict[str, str] = {}
        self._outcome: RetrieveOutcome | None = None
        self._failure: str | None = None
        self._abandoned = threading.Event()
        # Two retrieves at most (gather), each within its own whole-request bound
        # (gateway.dicom.retrieve), a lookup between them, plus a margin.
        timeout = float(pacs.timeout_seconds)
        self._bound = 2 * (timeout * 4 + 30) + timeout + 15
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="rad69-retrieve", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._outcome, self._explained = gather(self._pacs, self._resolution,
                                                    self._syntaxes, self._spool,
                                                    on_received=self._queue.put,
                                                    cancelled=self._abandoned.is_set)
        except Exception as exc:
            log.warning("RAD-69: retrieve from the PACS failed: %s", type(exc).__name__)
            log.debug("retrieve failure", exc_info=True)
            self._failure = str(exc) or type(exc).__name__
        finally:
            self._queue.put(_END)
            if self._abandoned.is_set():  # the response is gone: nobody else may be left
                shutil.rmtree(self._spool, ignore_errors=True)

    def _accept(self, got: Received) -> Attachment | None:
        uid = got.sop_instance_uid
        doc = self._by_uid.get(uid)
        if doc is None or uid in self._seen:
            return None
        self._seen.add(uid)
        if got.transfer_syntax not in self._syntaxes:
            if got.offset is None:  # its own file (a segment is removed with the folder)
                got.path.unlink(missing_ok=True)
            self._wrong_syntax[uid] = got.transfer_syntax
            return None
        content_id = f"doc{len(self._sent)}@{CONTENT_ID_DOMAIN}"
        self._sent.append(RetrievedDocument(
            repository_unique_id=doc.repository_unique_id,
            document_unique_id=doc.document_unique_id, mime_type=MIME_DICOM,
            path=got.path, size=got.size, home_community_id=doc.home_community_id,
            offset=got.offset))
        return Attachment(content_id, got.path, got.size, MIME_DICOM, offset=got.offset)

    def parts(self) -> Iterator[Attachment]:
        """The instances in arrival order, each as soon as its file is complete."""
        deadline = self._started + self._bound
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._failure = self._failure or "the retrieve did not end in time"
                log.warning("RAD-69: the retrieve did not end within %.0f s", self._bound)
                return
            if item is _END:
                break
            att = self._accept(item)
            if att is not None:
                yield att
        if self._outcome is not None:  # anything the retrieve did not report (it should)
            for ref, _doc in self._found:
                got = self._outcome.received.get(ref.sop_instance_uid)
                if got is not None:
                    att = self._accept(got)
                    if att is not None:
                        yield att

    def finish(self) -> etree._Element:
        """The root: status, errors (those known before the retrieve first), and one
        DocumentResponse per part sent, in the order of the parts."""
        errors = list(self._errors)
        missing = [(doc, self._wrong_syntax.get(ref.sop_instance_uid))
                   for ref, doc in self._found
                   if ref.sop_instance_uid not in self._seen
                   or ref.sop_instance_uid in self._wrong_syntax]
        errors.extend(missing_errors(missing, self._explained, self._failure, self._outcome,
                                     self._syntaxes))
        documents = self._sent
        status = status_for(errors, partial_possible=True, any_success=bool(documents))
        content_ids = {id(d): f"doc{i}@{CONTENT_ID_DOMAIN}" for i, d in enumerate(documents)}
        log.info("RAD-69: %d of %d streamed, the root after %.2f s", len(documents),
                 len(self._found), time.monotonic() - self._started)
        return render_retrieve_document_set_response(
            status, documents, errors, content_id_for=lambda d: content_ids[id(d)])

    def close(self) -> None:
        """The response has ended (or the client went away). A retrieve that has ended is
        joined; one still running is not waited for beyond a second (the web server's thread
        is freed): the edge then removes the spool folder, which ends each association at its
        next instance (its segment file is gone: gateway.dicom.cget), and the thread removes
        the folder again when the retrieve has returned, in case something was still placed
        in it."""
        self._abandoned.set()
        self._thread.join(CLOSE_WAIT_SECONDS)
        if self._thread.is_alive():
            log.warning("RAD-69: the retrieve is still running after the response ended; "
                        "its spool folder is removed when it ends")


def _retrieve_error(doc: ImagingDocumentRequest, wrong_syntax: str | None,
                    failure: str | None, outcome: RetrieveOutcome | None,
                    syntaxes: tuple[str, ...]) -> XdsError:
    """The error of a found instance that is not returned."""
    if wrong_syntax is not None:
        return _doc_error(
            Wado.TS_NOT_PROVIDED,
            f"the PACS holds this instance in {wrong_syntax}, not in a requested "
            "transfer syntax", doc)
    if failure is not None:
        return _doc_error(Wado.PROCESSING_FAILURE, f"retrieve from the PACS failed: {failure}",
                          doc)
    if outcome is not None and outcome.error is not None and outcome.error.kind != "failed":
        return _doc_error(Wado.PROCESSING_FAILURE,
                          f"retrieve from the PACS failed: {outcome.error}", doc)
    return _doc_error(
        Wado.TS_NOT_PROVIDED,
        "the PACS could not provide this instance in a requested transfer syntax ("
        + ", ".join(syntaxes) + ")", doc)


def fetch(services: Services, resolution: Resolution, syntaxes: tuple[str, ...],
          spool: Path) -> tuple[list[RetrievedDocument], list[XdsError]]:
    pacs = services.config.pacs
    outcome, explained = gather(pacs, resolution, syntaxes, spool)
    documents: list[RetrievedDocument] = []
    missing: list[tuple[ImagingDocumentRequest, str | None]] = []
    for ref, doc in resolution.found:
        got = outcome.received.get(ref.sop_instance_uid)
        if got is not None and got.transfer_syntax in syntaxes:
            documents.append(RetrievedDocument(
                repository_unique_id=doc.repository_unique_id,
                document_unique_id=doc.document_unique_id, mime_type=MIME_DICOM,
                path=got.path, size=got.size, home_community_id=doc.home_community_id,
                offset=got.offset))
            continue
        if got is not None and got.offset is None:  # a segment goes with the folder
            got.path.unlink(missing_ok=True)
        missing.append((doc, got.transfer_syntax if got is not None else None))
    return documents, missing_errors(missing, explained, None, outcome, syntaxes)


def gather(pacs: PacsConfig, resolution: Resolution, syntaxes: tuple[str, ...], spool: Path,
           *, on_received: Callable[[Received], None] | None = None,
           cancelled: Callable[[], bool] = lambda: False
           ) -> tuple[RetrieveOutcome, dict[str | None, list[XdsError]]]:
    """Retrieve what `resolution` found into `spool` (`on_received` as for
    gateway.dicom.retrieve.retrieve), in at most two rounds. After the first, while the PACS
    answered normally and `cancelled()` is false: instances of whole series fetched at
    SERIES level that did not come are fetched again at IMAGE level (a PACS that refuses the
    level, or fails the whole request for one instance it cannot convert; gateway.dicom.cget
    retries instance by instance from there); those taken without looking them up
    (gateway.imaging.plan) are looked up first: only those where the request says are
    fetched again, the others get the errors of their identifiers (second item, by SOP
    Instance UID; a lookup that fails gives them a processing failure)."""
    from gateway.dicom.retrieve import retrieve

    def fetch_refs(refs: list[InstanceRef], whole: set[tuple[str, str]]) -> RetrieveOutcome:
        outcome = retrieve(pacs, refs, syntaxes, spool, method=pacs.retrieve,
                           associations=pacs.associations, timeout=pacs.timeout_seconds,
                           on_received=on_received, whole_series=whole)
        if outcome.error is not None:
            log.warning("RAD-69: retrieve from the PACS incomplete: %s", outcome.error)
        return outcome

    outcome = fetch_refs([ref for ref, _doc in resolution.found], resolution.whole_series)
    explained: dict[str | None, list[XdsError]] = {}
    if outcome.error is not None or cancelled():  # a failing PACS is not asked any more
        return outcome, explained
    again: dict[str, InstanceRef] = {}
    lost: dict[str, ImagingDocumentRequest] = {}  # unverified, by UID (listed once)
    for ref, doc in resolution.found:
        uid = ref.sop_instance_uid
        if uid in outcome.received:
            continue
        if uid in resolution.unverified:
            lost.setdefault(uid, doc)
        elif ((ref.study_uid, ref.series_uid) in resolution.whole_series
              and outcome.missing.get(uid, "").startswith("SERIES-level")):
            again[uid] = ref
    if lost:
        log.info("RAD-69: %d instance(s) of whole series did not come; looking them up",
                 len(lost))
        try:
            check = explain(pacs, list(lost.values()))
        except PacsError as exc:
            log.warning("RAD-69: could not look up instances that did not come: %s", exc)
            for uid, doc in lost.items():
                explained[uid] = [_doc_error(Wado.PROCESSING_FAILURE,
                                             f"retrieve from the PACS failed: {exc}", doc)]
        else:
            for err in check.errors:
                explained.setdefault(err.location, []).append(err)
            again.update((ref.sop_instance_uid, ref) for ref, _doc in check.found)
    if again and not cancelled():
        second = fetch_refs(list(again.values()), set())
        outcome.received.update(second.received)
        for uid in second.received:
            outcome.missing.pop(uid, None)
        outcome.missing.update(second.missing)
        outcome.error = outcome.error or second.error
    return outcome, explained


def missing_errors(missing: list[tuple[ImagingDocumentRequest, str | None]],
                   explained: dict[str | None, list[XdsError]], failure: str | None,
                   outcome: RetrieveOutcome | None, syntaxes: tuple[str, ...]
                   ) -> list[XdsError]:
    """The errors of resolved documents that are not returned ((document, the transfer
    syntax it came in when that was not a requested one)): those `gather` looked up and
    found wrong get the errors of their identifiers, the others the retrieve's."""
    errors: list[XdsError] = []
    for doc, wrong in missing:
        why = explained.get(doc.document_unique_id) if wrong is None else None
        if why:
            errors.extend(why)
        else:
            errors.append(_retrieve_error(doc, wrong, failure, outcome, syntaxes))
    return errors
