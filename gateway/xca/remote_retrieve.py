"""The Responding Gateways' remote document sources: ITI-43 Retrieve Document Set to the
remote Document Repositories of this community ([[repositories]]) and RAD-69 Retrieve Imaging
Document Set to its remote Imaging Document Sources ([[imaging_sources]]).

What this module owns: sending each remote source its share of one request (a `RemoteShare`,
built by the caller: `gateway.xca.responding` for ITI-39, `gateway.xca.responding_imaging`
for RAD-75), all shares in parallel over the process's outbound pool (mutual TLS, the
request's XUA header passed on), at most [xca] max_parallel at once, each bounded by [xca]
retrieve_timeout_seconds; the ATNA record of each sent ITI-43 / RAD-69; and reading the
answers back: every DocumentResponse becomes a `RetrievedDocument` whose bytes are the MTOM
part spooled to a file under the request's spool folder (`gateway.soap.client`), or an inline
base64 Document written to such a file, so no document is held in memory. The errors the
sources report are kept (the caller locates them at our homeCommunityId). A source that
cannot be reached, times out or answers something unusable gives XDSRepositoryError (ITI TF-3
4.2.4.1, the internal repository error code, for want of a more specific one) for each of the
documents asked of it; the others' documents still come back (PartialSuccess).

`in_background` runs one call in an outbound worker thread, so the remote shares are fetched
while the caller serves its built-in share; `with_shares` does that for a whole request and
gives the consolidated status, documents and errors.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from lxml import etree

from gateway.ebrim.model import RetrievedDocument
from gateway.ebrim.parse import parse_document_response, parse_registry_error
from gateway.errors import XdsError, status_for
from gateway.ns import RS, XDSB, ErrorCode, ResponseStatus, q
from gateway.soap.client import SoapReply
from gateway.soap.mtom import resolve_cid
from gateway.transactions import RequestContext
from gateway.xca.home import located
from gateway.xca.initiating import OUTCOME_SERIOUS_FAILURE, audit_outbound, failure_reason
from gateway.xca.outbound import Outcome, pool_for, run_bounded, security_headers, workers

log = logging.getLogger(__name__)

R = TypeVar("R")



@dataclass(frozen=True)
class RemoteShare:
    """What one remote source is asked: its repositoryUniqueId, endpoint, the request body,
    and the DocumentUniqueIds in that body (for the errors when it fails)."""

    unique_id: str
    url: str
    body: etree._Element
    document_uids: tuple[str, ...]


def _failed(share: RemoteShare, what: str, reason: str) -> list[XdsError]:
    return [XdsError(ErrorCode.REPOSITORY_ERROR,
                     f"document {uid}: {what} {share.unique_id} {reason}", location=uid)
            for uid in share.document_uids]


def read_reply(share: RemoteShare, outcome: Outcome[SoapReply], timeout: float, spool: Path,
               what: str) -> tuple[list[RetrievedDocument], list[XdsError]]:
    """The documents (as files) and errors of one source's answer; `what` names the kind of
    source in the errors ("document repository", "imaging document source")."""
    reply = outcome.value
    body = reply.body if outcome.ok and reply is not None else None
    status_el = body.find(q(RS, "RegistryResponse")) if body is not None else None
    if (body is None or reply is None or body.tag != q(XDSB, "RetrieveDocumentSetResponse")
            or status_el is None or status_el.get("status") not in ResponseStatus.ALL):
        reason = failure_reason(outcome, timeout)
        log.warning("retrieve from %s %s: %s", what, share.unique_id, reason)
        return [], _failed(share, what, reason)
    errors_el = status_el.find(q(RS, "RegistryErrorList"))
    errors = [] if errors_el is None else [
        parse_registry_error(e) for e in errors_el.iterfind(q(RS, "RegistryError"))]
    asked = set(share.document_uids)
    documents: list[RetrievedDocument] = []
    for i, el in enumerate(body.iterfind(q(XDSB, "DocumentResponse"))):
        try:
            ref = parse_document_response(el)
        except Exception as exc:  # bad base64 and the like: an error value
            log.debug("DocumentResponse unreadable", exc_info=exc)
            uid = (el.findtext(q(XDSB, "DocumentUniqueId")) or "").strip()
            errors.append(XdsError(ErrorCode.REPOSITORY_ERROR,
                                   f"document {uid}: {what} {share.unique_id} returned it "
                                   "unreadable", location=uid or None))
            continue
        uid = ref.document_unique_id
        if uid not in asked:
            log.warning("retrieve from %s %s: a document that was not asked for, dropped",
                        what, share.unique_id)
            continue
        path: Path | None = None
        size = 0
        mime = ref.mime_type
        if ref.content_id is not None:
            found = resolve_cid(reply.attachments, ref.content_id)
            if found is not None:
                path, size, mime = found.path, found.size, mime or found.content_type
        elif ref.data is not None:
            path = spool / f"inline-{i}"
            path.write_bytes(ref.data)
            size = len(ref.data)
        if path is None:
            errors.append(XdsError(ErrorCode.REPOSITORY_ERROR,
                                   f"document {uid}: {what} {share.unique_id} returned it "
                                   "without its content", location=uid))
            continue
        documents.append(RetrievedDocument(
            repository_unique_id=ref.repository_unique_id or share.unique_id,
            document_unique_id=uid, mime_type=mime or "application/octet-stream",
            path=path, size=size,
            new_repository_unique_id=ref.new_repository_unique_id,
            new_document_unique_id=ref.new_document_unique_id))
    return documents, errors


def fetch_shares(services: Any, ctx: RequestContext, shares: Sequence[RemoteShare], *,
                 action: str, transaction: str, spool: Path, what: str
                 ) -> tuple[list[RetrievedDocument], list[XdsError]]:
    """Send every share in parallel (bounded per share by [xca] retrieve_timeout_seconds);
    the documents that came back (files under `spool`) and the errors, in share order."""
    if not shares:
        return [], []
    config = services.config
    pool = pool_for(config)
    timeout = float(config.xca.retrieve_timeout_seconds)
    security = security_headers(config, ctx.headers)  # XUA: the consumer's assertion passed on
    folders = [spool / f"{transaction.lower()}-{i}" for i in range(len(shares))]

    def fetch(i: int) -> Callable[[], SoapReply]:
        share, folder = shares[i], folders[i]
        headers = tuple(copy.deepcopy(h) for h in security)  # one copy per thread

        def run() -> SoapReply:
            _folder_in_request(ctx, folder)
            return pool.call(share.url, action, share.body, read_timeout=timeout,
                             spool_dir=folder, headers=headers)
        return run

    outcomes = run_bounded([(i, fetch(i)) for i in range(len(shares))],
                           max_parallel=config.xca.max_parallel, timeout=timeout)
    documents: list[RetrievedDocument] = []
    errors: list[XdsError] = []
    for i, share in enumerate(shares):
        o = outcomes[i]
        audit_outbound(services, transaction, share.url, share.body,
                       o.value.body if o.ok and o.value is not None else None,
                       None if o.ok else OUTCOME_SERIOUS_FAILURE, ctx)
        _folder_in_request(ctx, folders[i])
        docs, errs = read_reply(share, o, timeout, folders[i], what)
        documents.extend(docs)
        errors.extend(errs)
    return documents, errors


def with_shares(services: Any, ctx: RequestContext | None, shares: Sequence[RemoteShare],
                local: Callable[[], tuple[list[RetrievedDocument], list[XdsError]]] | None, *,
                home: str, errors: list[XdsError], action: str, transaction: str,
                spool: Path | None, what: str
                ) -> tuple[str, list[RetrievedDocument], list[XdsError]]:
    """The remote `shares` fetched (`fetch_shares` into `spool`, in the background) while
    `local()` serves the built-in share; the consolidated status, the documents (all with
    HomeCommunityId `home`) and `errors` plus theirs (all located at `home`). `ctx` and
    `spool` are needed only when there are shares."""
    remote = None
    if shares:
        assert ctx is not None and spool is not None
        remote = in_background(lambda: fetch_shares(
            services, ctx, shares, action=action, transaction=transaction, spool=spool,
            what=what))
    documents: list[RetrievedDocument] = []
    try:
        if local is not None:
            documents, local_errors = local()
            errors.extend(local_errors)
    finally:
        if remote is not None:  # never leave the remote calls writing to a removed spool
            remote_documents, remote_errors = remote.result()
    if remote is not None:
        documents.extend(remote_documents)
        errors.extend(remote_errors)
    documents = [replace(d, home_community_id=home) for d in documents]
    errors = located(errors, home)
    status = status_for(errors, partial_possible=True, any_success=bool(documents))
    return status, documents, errors


def _folder_in_request(ctx: RequestContext, folder: Path) -> None:
    """Create `folder` (and its parents) inside the request's spool folder, but never that
    folder itself: once the edge has removed it the request is over, and a call still
    running must fail rather than leave files behind."""
    if not Path(ctx.spool_dir).is_dir():
        raise FileNotFoundError("the request's spool folder is gone: the request has ended")
    folder.mkdir(parents=True, exist_ok=True)


class Pending(Generic[R]):
    """The result of a call running in an outbound worker thread."""

    def __init__(self, fn: Callable[[], R]):
        self._done = threading.Event()
        self._value: R | None = None
        self._error: BaseException | None = None

        def job() -> None:
            try:
                self._value = fn()
            except BaseException as exc:  # handed to result()
                self._error = exc
            finally:
                self._done.set()
        workers().submit(job)

    def result(self) -> R:
        """Wait for the call; its value, or its exception raised here."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def in_background(fn: Callable[[], R]) -> Pending[R]:
    """Start `fn` in an outbound worker thread; `.result()` waits for it."""
    return Pending(fn)


__all__ = ["Pending", "RemoteShare", "fetch_shares", "in_background", "read_reply",
           "with_shares"]
