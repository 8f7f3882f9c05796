"""Retrieving instances from the PACS into spool files: C-GET (default) or C-MOVE, split over
parallel associations.

`retrieve(pacs, instances, transfer_syntaxes, spool, ...)` fetches the given instances (their
study, series, SOP instance and SOP class UIDs, from C-FIND) and returns which arrived, as Part
10 files in `spool` (the dataset bytes exactly as the PACS sent them, behind a file meta header:
with the built-in engine byte ranges of one segment file per association, see
gateway.dicom.cget; otherwise one file per instance), and which did not. The work is split
into `associations` jobs that run in a small pool of worker processes; each job opens one
association. pynetdicom's receive path is CPU-bound Python, so its threads would share one
core. The built-in engine spends most of its CPU in the
kernel (socket reads and page-cache writes), and run in threads of the web server worker
instead it used the same CPU in all (measured: worker 0.53-0.65 s per 263 MB against worker
0.25-0.31 s plus pool 0.24-0.39 s) and was no faster; the pool stays, for both engines: it
keeps the worker's GIL free for the response writer and for other requests.

C-GET: one presentation context per (SOP class, transfer syntax) for the SOP classes C-FIND
reported (never more than 128 contexts; a job is split further if needed), SCP role selection
for each SOP class, and the requested transfer syntaxes only, so the PACS sends each instance in
its stored syntax when that is one of them and otherwise converts it to one it can produce.
Received instances are spooled chunk by chunk (STORE_RECV_CHUNKED_DATASET) and never held in
memory.

Two engines run the C-GET of one job (`[pacs] dimse_engine`): "builtin" (gateway.dicom.cget,
a tight receive loop that writes each PDU's data straight into the spool file, several times
cheaper in CPU than pynetdicom's DUL thread and event queues) and "pynetdicom".

`retrieve(..., on_received=f)` calls `f(Received)` in the calling thread as soon as each
instance is placed in the spool folder: pool processes report through one
multiprocessing SimpleQueue per pool (passed by the pool initializer), a dispatcher thread
hands each report to the retrieve() call it belongs to (by a per-call token), and every
instance of the final outcome not reported that way is reported before retrieve() returns.

C-MOVE: the PACS sends to the gateway's own storage SCP (gateway.dicom.storescp), shared by all
worker processes; see that module for the routing.

The pool is started when a web server worker starts (`warm_up_in_background()`, called from
the application factory), not on the first RAD-69. In a pool process pynetdicom's temp files
are created in the request's spool folder, so each received instance is placed by a rename.
Jobs still running at the whole-request bound are given up, and the instances they had
already placed in the spool folder still count.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.queues import SimpleQueue
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pynetdicom import _config, build_context, build_role, evt
from pynetdicom.sop_class import (  # type: ignore
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from gateway.config import PacsConfig
from gateway.dicom.association import associate, check_alive
from gateway.dicom.errors import PacsError

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128
REPORT_BATCH = 8  # instances per progress report of the built-in engine, at most
REPORT_DELAY = 0.005  # seconds an instance may wait for others to share its report
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
GET_MODEL = StudyRootQueryRetrieveInformationModelGet
MOVE_MODEL = StudyRootQueryRetrieveInformationModelMove


@dataclass(frozen=True)
class InstanceRef:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class Received:
    """An instance in the spool folder: `size` bytes of `path` from `offset` (a Part 10
    file). The built-in engine appends the instances of an association to one segment file
    (offset >= 0); the pynetdicom engine and C-MOVE give each its own file (offset None: the
    whole file)."""

    sop_instance_uid: str
    path: Path
    transfer_syntax: str
    size: int
    offset: int | None = None

    def read_bytes(self) -> bytes:
        """The instance's bytes (for tests and small tools: a whole instance in memory)."""
        if self.offset is None:
            return self.path.read_bytes()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass
class RetrieveOutcome:
    received: dict[str, Received] = field(default_factory=dict)
    # SOP Instance UIDs that did not arrive, with the reason (no patient data).
    missing: dict[str, str] = field(default_factory=dict)
    # The first association-level problem (unreachable, rejected, aborted, timeout), if any.
    error: PacsError | None = None


@dataclass(frozen=True)
class _Job:
    instances: tuple[InstanceRef, ...]
    transfer_syntaxes: tuple[str, ...]
    spool: str
    method: str  # "c-get" or "c-move"
    timeout: float
    # Runs in a retrieve pool process (which may then point tempfile at the spool folder).
    own_process: bool = False
    # Identifies the retrieve() call for progress reports (empty: nobody listens).
    token: str = ""
    # (study, series) of which this job holds every instance the PACS has: the built-in
    # engine fetches those with one SERIES-level C-GET (gateway.imaging.plan).
    whole_series: frozenset[tuple[str, str]] = frozenset()


@dataclass
class _JobResult:
    received: list[Received] = field(default_factory=list)
    error: tuple[str, str] | None = None  # PacsError (kind, message)
    failed: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> reason


def enable_chunked_receive() -> None:
    """Spool received C-STORE datasets to temp files instead of memory (set per process)."""
    _config.STORE_RECV_CHUNKED_DATASET = True


# In a pool process: where progress reports go (set by the pool initializer).
_REPORTS: SimpleQueue[Any] | None = None
# In the process that calls retrieve(): token -> that call's local queue of reports.
_LISTENERS: dict[str, queue.SimpleQueue[Any]] = {}
_DONE = object()  # a job future finished


def _init_pool_process(reports: SimpleQueue[Any] | None) -> None:
    global _REPORTS
    enable_chunked_receive()
    _REPORTS = reports


def _report(token: str, rec: Received) -> None:
    """Tell the retrieve() call `token` that `rec` is in place (best effort, never raises)."""
    _report_many(token, [rec])


class _Batcher:
    """Progress reports of one job in batches: at most REPORT_BATCH instances each, and no
    instance waits more than REPORT_DELAY (a timer thread sends what is pending). One report
    per instance cost the pool process and the web server worker about 0.1 CPU s per 1000
    instances (pickling, the pipe, the dispatcher and relay threads)."""

    def __init__(self, token: str) -> None:
        self._token = token
        self._pending: list[Received] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="retrieve-reports",
                                        daemon=True)
        self._thread.start()

    def add(self, rec: Received) -> None:
        with self._lock:
            self._pending.append(rec)
            full = len(self._pending) >= REPORT_BATCH
        if full:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            _report_many(self._token, batch)

    def _tick(self) -> None:
        while not self._stop.wait(REPORT_DELAY):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()


def _report_many(token: str, recs: list[Received]) -> None:
    """Tell the retrieve() call `token` that `recs` are in place, in one message (best
    effort, never raises)."""
    if not token or not recs:
        return
    try:
        if _REPORTS is not None:
            _REPORTS.put((token, recs))
        else:
            listener = _LISTENERS.get(token)
            if listener is not None:
                listener.put(recs)
    except Exception as exc:  # a report is an optimisation: the job result still counts
        log.warning("retrieve progress report lost: %s", type(exc).__name__)


def _dispatch(reports: SimpleQueue[Any]) -> None:
    """Parent side: hand pool processes' reports to the retrieve() call they belong to."""
    while True:
        try:
            item = reports.get()
        except (EOFError, OSError):
            return
        token, rec = item
        listener = _LISTENERS.get(token)
        if listener is not None:
            listener.put(rec)


def _safe_name(uid: str) -> str:
    return uid if UID_RE.match(uid) and len(uid) <= 64 else uuid.uuid4().hex


def _place(src: Path, target: Path) -> None:
    try:
        os.replace(src, target)
    except OSError:  # another file system
        shutil.move(str(src), str(target))


def _store_handler(spool: Path, wanted: set[str], received: list[Received],
                   lock: threading.Lock, token: str = "") -> Callable[[Any], int]:
    def handle(event: Any) -> int:
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        if sop_uid not in wanted:
            return 0xA900  # not what we asked for: refuse it
        ts = str(event.context.transfer_syntax)
        target = spool / f"{_safe_name(sop_uid)}.dcm"
        _place(Path(event.dataset_path), target)
        rec = Received(sop_uid, target, ts, target.stat().st_size)
        with lock:
            received.append(rec)
        _report(token, rec)
        return 0x0000
    return handle


def _by_series(instances: Sequence[InstanceRef]) -> list[tuple[tuple[str, str], list[str]]]:
    """(study, series) and SOP Instance UIDs, the UIDs cut into lists that each fit one
    explicit VR identifier (gateway.dicom.cget.uid_batches)."""
    from gateway.dicom.cget import uid_batches

    groups: dict[tuple[str, str], list[str]] = {}
    for i in instances:
        groups.setdefault((i.study_uid, i.series_uid), []).append(i.sop_instance_uid)
    return [(key, batch) for key, uids in groups.items() for batch in uid_batches(uids)]


def _identifier(study: str, series: str, uids: list[str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = uids if len(uids) > 1 else uids[0]
    return ds


def _check_final(status: Dataset | None, what: str, assoc: Any) -> None:
    if status is None or "Status" not in status:
        check_alive(assoc, what)
        raise PacsError("timeout", f"no {what} response within the DIMSE timeout")
    code = int(status.Status)
    if code in (0x0000, 0xB000, 0xFF00):  # success, some sub-operations failed, pending
        return
    if code == 0xFE00:
        raise PacsError("failed", f"{what} cancelled by the PACS")
    raise PacsError("failed", f"{what} failed with status 0x{code:04X}")


def _get_group(assoc: Any, study: str, series: str, uids: list[str],
               result: _JobResult) -> None:
    """One C-GET for instances of one series; a failure status for the whole group is
    retried instance by instance (one instance the PACS cannot convert fails the group)."""
    last = None
    for status, _ident in assoc.send_c_get(_identifier(study, series, uids), GET_MODEL):
        last = status
    try:
        _check_final(last, "C-GET", assoc)
    except PacsError as exc:
        if exc.kind != "failed":
            raise
        got = {r.sop_instance_uid for r in result.received}
        rest = [u for u in uids if u not in got]
        if len(uids) > 1 and len(rest) <= 64:
            for uid in rest:
                _get_group(assoc, study, series, [uid], result)
        else:
            for uid in rest:
                result.failed[uid] = exc.message


def _run_builtin_get(pacs: PacsConfig, job: _Job) -> _JobResult:
    from gateway.dicom.cget import run_c_get

    result = _JobResult()
    reports = _Batcher(job.token) if job.token else None

    def stored(uid: str, path: Path, ts: str, size: int, offset: int) -> None:
        rec = Received(uid, path, ts, size, offset)
        result.received.append(rec)
        if reports is not None:
            reports.add(rec)

    # retrieve() gives up on a job after this long: stop the association then too.
    deadline = time.monotonic() + _overall(job.timeout)
    try:
        failed, error = run_c_get(pacs, job.instances, job.transfer_syntaxes,
                                  Path(job.spool), job.timeout, stored, deadline=deadline,
                                  whole_series=job.whole_series)
    finally:
        if reports is not None:
            reports.close()
    result.failed.update(failed)
    if error is not None:
        result.error = (error.kind, error.message)
    return result


def _run_get(pacs: PacsConfig, job: _Job) -> _JobResult:
    if getattr(pacs, "dimse_engine", "builtin") == "builtin":
        return _run_builtin_get(pacs, job)
    enable_chunked_receive()
    spool = Path(job.spool)
    if job.own_process:
        # pynetdicom spools each received dataset to a temp file: create it in the spool
        # folder, so that placing it is a rename, never a copy from another file system.
        tempfile.tempdir = job.spool
        try:
            return _get_into(pacs, job, spool)
        finally:
            tempfile.tempdir = None
    return _get_into(pacs, job, spool)


def _get_into(pacs: PacsConfig, job: _Job, spool: Path) -> _JobResult:
    result = _JobResult()
    classes = sorted({i.sop_class_uid for i in job.instances})
    contexts = [build_context(GET_MODEL)]
    for cls in classes:
        for ts in job.transfer_syntaxes:
            contexts.append(build_context(cls, [ts]))
    roles = [build_role(cls, scp_role=True) for cls in classes]
    lock = threading.Lock()
    handler = _store_handler(spool, {i.sop_instance_uid for i in job.instances},
                             result.received, lock, job.token)
    try:
        assoc = associate(pacs, contexts, job.timeout, ext_neg=list(roles),
                          evt_handlers=[(evt.EVT_C_STORE, handler)])
        try:
            for (study, series), uids in _by_series(job.instances):
                _get_group(assoc, study, series, uids, result)
        finally:
            if assoc.is_established:
                assoc.release()
    except PacsError as exc:
        result.error = (exc.kind, exc.message)
    return result


def _run_move(pacs: PacsConfig, job: _Job) -> _JobResult:
    from gateway.dicom import storescp

    spool = Path(job.spool)
    result = _JobResult()
    storescp.ensure_running(pacs, job.timeout)
    with storescp.expect(pacs, spool, [i.sop_instance_uid for i in job.instances]):
        if getattr(pacs, "dimse_engine", "builtin") == "builtin":
            from gateway.dicom.cmove import run_c_move

            failed, error = run_c_move(pacs, job.instances, job.timeout,
                                       deadline=time.monotonic() + _overall(job.timeout),
                                       whole_series=job.whole_series)
            result.failed.update(failed)
            if error is not None:
                result.error = (error.kind, error.message)
        else:
            _move_pynetdicom(pacs, job, result)
    for i in job.instances:
        path = spool / f"{_safe_name(i.sop_instance_uid)}.dcm"
        if path.is_file():
            result.received.append(Received(i.sop_instance_uid, path,
                                            storescp.transfer_syntax_of(path),
                                            path.stat().st_size))
    return result


def _move_pynetdicom(pacs: PacsConfig, job: _Job, result: _JobResult) -> None:
    try:
        assoc = associate(pacs, [build_context(MOVE_MODEL)], job.timeout)
        try:
            for (study, series), uids in _by_series(job.instances):
                last = None
                for status, _ident in assoc.send_c_move(
                        _identifier(study, series, uids), pacs.move_destination_ae_title,
                        MOVE_MODEL):
                    last = status
                try:
                    _check_final(last, "C-MOVE", assoc)
                except PacsError as exc:
                    if exc.kind != "failed":
                        raise
                    for uid in uids:
                        result.failed[uid] = exc.message
        finally:
            if assoc.is_established:
                assoc.release()
    except PacsError as exc:
        result.error = (exc.kind, exc.message)


def _run_job(pacs: PacsConfig, job: _Job) -> _JobResult:
    if job.method == "c-move":
        return _run_move(pacs, job)
    return _run_get(pacs, job)


def plan_jobs(instances: Sequence[InstanceRef], transfer_syntaxes: Sequence[str],
              associations: int, whole_series: Collection[tuple[str, str]] = ()
              ) -> list[list[InstanceRef]]:
    """Split `instances` into about `associations` jobs, each within the context limit.

    A series in `whole_series` stays in one job (it is fetched with one SERIES-level C-GET):
    largest first, each to the job with the fewest instances so far. The other instances are
    then dealt one by one to the job with the fewest (round robin inside each series when no
    series is whole, so that every job gets a share of every series). A
    job whose SOP classes x transfer syntaxes exceed 127 contexts (one is the Q/R model) is
    split by SOP class."""
    n = max(1, min(associations, len(instances)))
    jobs: list[list[InstanceRef]] = [[] for _ in range(n)]
    whole: dict[tuple[str, str], list[InstanceRef]] = {}
    rest: list[InstanceRef] = []
    for inst in instances:
        key = (inst.study_uid, inst.series_uid)
        (whole.setdefault(key, []) if key in whole_series else rest).append(inst)
    for group in sorted(whole.values(), key=len, reverse=True):
        min(jobs, key=len).extend(group)
    for inst in rest:  # round robin when no series is whole
        min(jobs, key=len).append(inst)
    per_class = max(1, len(transfer_syntaxes))
    max_classes = max(1, (MAX_CONTEXTS - 1) // per_class)
    out: list[list[InstanceRef]] = []
    for job in jobs:
        classes = sorted({i.sop_class_uid for i in job})
        for start in range(0, len(classes), max_classes):
            chunk = set(classes[start:start + max_classes])
            part = [i for i in job if i.sop_class_uid in chunk]
            if part:
                out.append(part)
    return out


def whole_in(part: Sequence[InstanceRef], instances: Sequence[InstanceRef],
             whole_series: Collection[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    """The series of `whole_series` of which `part` holds every instance of `instances`
    (a job split by SOP class holds only some)."""
    if not whole_series:
        return frozenset()
    counts: dict[tuple[str, str], int] = {}
    for inst in instances:
        counts[(inst.study_uid, inst.series_uid)] = counts.get(
            (inst.study_uid, inst.series_uid), 0) + 1
    mine: dict[tuple[str, str], int] = {}
    for inst in part:
        key = (inst.study_uid, inst.series_uid)
        mine[key] = mine.get(key, 0) + 1
    return frozenset(k for k, c in mine.items() if k in whole_series and c == counts[k])


_POOL: ProcessPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_REPORTS: SimpleQueue[Any] | None = None
_POOL_LOCK = threading.Lock()


def _pool(size: int) -> ProcessPoolExecutor:
    """A per-process pool of retrieval processes, started once (forkserver: children are
    forked from a clean server process, not from this multi-threaded one). It only grows
    (restarting it costs seconds); jobs beyond its size wait for a free process."""
    global _POOL, _POOL_SIZE, _POOL_REPORTS
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < size:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            ctx = get_context("forkserver")
            ctx.set_forkserver_preload(["gateway.dicom.retrieve", "gateway.dicom.cget"])
            if _POOL_REPORTS is None:
                # One report queue and one dispatcher for the life of this process, shared
                # by a pool that replaces a smaller one: the old pool's jobs still running
                # keep reporting to a queue somebody reads.
                _POOL_REPORTS = ctx.SimpleQueue()
                threading.Thread(target=_dispatch, args=(_POOL_REPORTS,),
                                 name="retrieve-reports", daemon=True).start()
            _POOL = ProcessPoolExecutor(max_workers=size, mp_context=ctx,
                                        initializer=_init_pool_process,
                                        initargs=(_POOL_REPORTS,))
            _POOL_SIZE = size
        return _POOL


def _noop() -> None:
    return None


def warm_up(associations: int) -> None:
    """Start the retrieve process pool now rather than on the first RAD-69 (the forkserver
    and its children take a few seconds to start and import pynetdicom)."""
    pool = _pool(associations)
    wait([pool.submit(_noop) for _ in range(associations)], timeout=60)


def warm_up_in_background(associations: int) -> threading.Thread:
    """`warm_up()` in a daemon thread (for a web server worker right after it starts);
    a failure is logged, never raised: the first RAD-69 then starts the pool itself."""
    def run() -> None:
        try:
            warm_up(associations)
        except Exception as exc:  # never take the worker down for this
            log.warning("retrieve pool warm-up failed: %s", type(exc).__name__)

    thread = threading.Thread(target=run, name="retrieve-warm-up", daemon=True)
    thread.start()
    # A process that exits while the pool's processes are still starting would leave them
    # to fail (their semaphores are gone) with tracebacks on stderr: at exit, first let the
    # warm-up finish, so that the pool is complete and concurrent.futures' own exit handler
    # (registered earlier, so run after this one) shuts it down and joins its processes.
    threading._register_atexit(thread.join, 60)  # type: ignore[attr-defined]
    return thread


def _spooled(jobs: Sequence[_Job], spool: Path, results: Sequence[_JobResult]) -> _JobResult:
    """What unfinished jobs had already received: the instances listed in the segment
    indexes of the built-in engine (a line is written once its instance is complete), and
    the `<uid>.dcm` files of the other paths (renamed into place only once complete)."""
    from gateway.dicom.storescp import transfer_syntax_of

    known = {r.sop_instance_uid for res in results for r in res.received}
    wanted = {inst.sop_instance_uid for job in jobs for inst in job.instances}
    out = _JobResult()
    for index in sorted(spool.glob("*.idx")):
        try:
            # Complete lines only: the job may still be writing the last one.
            lines = index.read_text("ascii").split("\n")[:-1]
        except (OSError, UnicodeError) as exc:
            log.warning("spool index unreadable: %s", type(exc).__name__)
            continue
        for line in lines:
            fields = line.split(" ")
            if len(fields) != 4 or fields[0] not in wanted or fields[0] in known:
                continue
            uid, offset, size, ts = fields
            known.add(uid)
            out.received.append(Received(uid, index.with_suffix(".seg"), ts, int(size),
                                         int(offset)))
    for job in jobs:
        for inst in job.instances:
            path = spool / f"{_safe_name(inst.sop_instance_uid)}.dcm"
            if inst.sop_instance_uid not in known and path.is_file():
                try:
                    ts = transfer_syntax_of(path)
                except Exception as exc:  # unreadable: counts as not received
                    log.warning("spooled instance unreadable: %s", type(exc).__name__)
                    continue
                out.received.append(Received(inst.sop_instance_uid, path, ts,
                                             path.stat().st_size))
    return out


def retrieve(pacs: PacsConfig, instances: Sequence[InstanceRef],
             transfer_syntaxes: Sequence[str], spool: Path, *, method: str = "c-get",
             associations: int = 3, timeout: float = 30, in_process: bool = False,
             on_received: Callable[[Received], None] | None = None,
             whole_series: Collection[tuple[str, str]] = ()) -> RetrieveOutcome:
    """Fetch `instances` into `spool` over up to `associations` parallel associations.

    Returns every instance as received or missing; an association-level problem is in
    `.error` (the other associations' instances still count). `in_process` runs the jobs in
    threads of this process instead of the process pool (tests, one-off tools).
    `on_received`, if given, is called in this thread once for each received instance, as
    soon as it is in `spool` (C-GET) or at the latest before retrieve() returns; an exception
    it raises ends the wait and propagates (jobs still running finish on their own, bounded
    by `timeout`). `whole_series`: the (study, series) of which `instances` holds every
    instance the PACS has (gateway.imaging.plan): the built-in engine fetches each (C-GET
    or C-MOVE) with one SERIES-level request, without a UID list."""
    if method not in ("c-get", "c-move"):
        raise ValueError(f"retrieve method must be c-get or c-move, got {method!r}")
    outcome = RetrieveOutcome()
    if not instances:
        return outcome
    spool.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex if on_received is not None else ""
    if getattr(pacs, "dimse_engine", "builtin") != "builtin":
        whole_series = ()  # IMAGE level with UID lists (the pynetdicom engine)
    jobs = [_Job(tuple(part), tuple(transfer_syntaxes), str(spool), method, timeout,
                 token=token, whole_series=whole_in(part, instances, whole_series))
            for part in plan_jobs(instances, transfer_syntaxes, associations, whole_series)]
    # A whole-request bound: every DIMSE wait is bounded by `timeout`, this catches the rest.
    overall = _overall(timeout)
    reported: set[str] = set()
    listener: queue.SimpleQueue[Any] = queue.SimpleQueue()
    if token:
        _LISTENERS[token] = listener
    tpool = None
    try:
        if in_process or (len(jobs) == 1 and method == "c-get" and len(instances) <= 8):
            enable_chunked_receive()
            from concurrent.futures import ThreadPoolExecutor
            tpool = ThreadPoolExecutor(max_workers=len(jobs))
            futures: list[Future[_JobResult]] = [tpool.submit(_run_job, pacs, j)
                                                 for j in jobs]
        else:
            pool = _pool(max(1, associations))
            futures = [pool.submit(_run_job, pacs, dataclasses.replace(j, own_process=True))
                       for j in jobs]
        if on_received is None:
            done, not_done = wait(futures, timeout=overall)
        else:
            for f in futures:
                f.add_done_callback(lambda _f: listener.put(_DONE))
            _relay(listener, len(futures), overall, reported, on_received)
            done, not_done = wait(futures, timeout=0)
        for f in not_done:
            f.cancel()
        results: list[_JobResult] = []
        for f in done:
            try:
                results.append(f.result())
            except Exception as exc:  # a crashed pool process
                results.append(_JobResult(error=("aborted",
                                                 f"retrieve process failed: {exc}")))
    finally:
        _LISTENERS.pop(token, None)
        if tpool is not None:
            tpool.shutdown(wait=False)
    if not_done:
        outcome.error = PacsError("timeout", f"{len(not_done)} retrieve job(s) did not "
                                             f"finish within {overall:.0f} s")
        results.append(_spooled(jobs, spool, results))
    for r in results:
        for rec in r.received:
            outcome.received[rec.sop_instance_uid] = rec
        if r.error is not None and outcome.error is None:
            outcome.error = PacsError(*r.error)
    reasons = {uid: why for r in results for uid, why in r.failed.items()}
    for inst in instances:
        uid = inst.sop_instance_uid
        if uid not in outcome.received:
            outcome.missing[uid] = reasons.get(uid) or (
                outcome.error.message if outcome.error is not None
                else "the PACS did not send this instance")
    if on_received is not None:
        for rec in outcome.received.values():
            if rec.sop_instance_uid not in reported:
                reported.add(rec.sop_instance_uid)
                on_received(rec)
    return outcome


def _overall(timeout: float) -> float:
    return timeout * 4 + 30


def _relay(listener: queue.SimpleQueue[Any], jobs: int, overall: float, reported: set[str],
           on_received: Callable[[Received], None]) -> None:
    """Call `on_received` for each report until every job is done or `overall` elapsed."""
    deadline = time.monotonic() + overall
    finished = 0
    while finished < jobs:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            item = listener.get(timeout=left)
        except queue.Empty:
            return
        if item is _DONE:
            finished += 1
            continue
        for rec in item if isinstance(item, list) else (item,):
            if rec.sop_instance_uid not in reported:
                reported.add(rec.sop_instance_uid)
                on_received(rec)
