"""The built-in C-GET SCU (`[pacs] dimse_engine = "builtin"`): one association, one C-GET
per series, and a tight receive loop that streams each C-STORE-RQ data set straight into the
association's spool file.

`run_c_get(pacs, instances, transfer_syntaxes, spool, timeout, on_stored)` proposes the Q/R
Get model plus one presentation context per (SOP class, transfer syntax) with SCP role
selection, sends a C-GET-RQ per series and answers every C-STORE-RQ: a data set of an instance
we asked for is written as it arrives, fragment by fragment, behind the same Part 10 header
pynetdicom writes (preamble, file meta of the command's SOP class/instance and the context's
transfer syntax); on its last fragment `on_stored(uid, path, transfer syntax, size, offset)` is
called and C-STORE-RSP 0x0000 sent; an instance we did not ask for is discarded and refused
(0xA900; "asked for" is per C-GET: the UIDs of that request). A group whose final C-GET
status is a failure is retried instance by instance, as the pynetdicom engine does; a failed
SERIES-level C-GET is not (its instances may not have been looked up): the caller retries it
at IMAGE level (gateway.imaging.rad69.gather).

One spool file per association (a "segment", `<name>.seg`): each instance is a byte range of
it, appended in arrival order (once the segment has been removed with its spool folder, the
next instance ends the association instead), and a line `uid offset size transfer-syntax` is
appended to `<name>.idx` once the instance is complete (what retrieve() reads back for a job it
gave up on). An instance broken off mid-way is cut off the segment again (ftruncate). One file
instead of one per instance: creating and removing files is what the receive path spent most of
its CPU on (ext4 inode allocation, about 28% of it; on a file system without a journal every
create skips the inodes deleted in the last minute, so the cost grew with the study: 2000
instances cost the retrieve processes 6.8 times what 500 did).

Nothing of an instance is held in memory: each fragment goes from the association's receive
buffer to the segment with one os.write (no Python file buffer, no bytes object per read).
Its CPU is then mostly the kernel's (socket reads and page-cache writes)."""

from __future__ import annotations

import contextlib
import os
import struct
import uuid
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import Dataset

from gateway.config import PacsConfig
from gateway.dicom.errors import PacsError
from gateway.dicom.ul import command as dimse
from gateway.dicom.ul import pdu
from gateway.dicom.ul.link import Link, open_link, write_all
from gateway.dicom.ul.pdu import EXPLICIT_LE, IMPLICIT_LE, PduError, ProposedContext

if TYPE_CHECKING:
    from gateway.dicom.retrieve import InstanceRef

GET_MODEL = "1.2.840.10008.5.1.4.1.2.2.3"  # Study Root Q/R Information Model - GET
PENDING = frozenset({0xFF00, 0xFF01})  # FF00 per PS3.4 C.4.3.1.4; FF01 tolerated
# The SOP Instance UID list of one C-GET/C-MOVE identifier: in explicit VR a UI value has a
# 16-bit length, so a longer list would have to be sent as UN (pydicom does that, with a
# warning), which a PACS may not read; longer lists are split over several requests.
MAX_UID_LIST_BYTES = 0xFFFE
# Spool files are written unbuffered, straight from the association's receive buffer.
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)

# (SOP Instance UID, segment path, transfer syntax, size, offset in the segment)
OnStored = Callable[[str, Path, str, int, int], None]


def _even(raw: bytes, pad: bytes) -> bytes:
    return raw + pad if len(raw) % 2 else raw


def file_meta_header(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, 'DICM' and the file meta group, byte for byte as pynetdicom's chunked
    receive writes them (pydicom's write_file_meta_info of its create_file_meta)."""
    from gateway.dicom.ul.link import _implementation

    impl_uid, impl_version = _implementation()
    elements: list[tuple[int, bytes, bytes]] = [(0x0001, b"OB", b"\x00\x01")]
    for el, uid in ((0x0002, sop_class), (0x0003, sop_instance), (0x0010, transfer_syntax),
                    (0x0012, impl_uid)):
        elements.append((el, b"UI", _even(uid.encode("ascii"), b"\x00")))
    elements.append((0x0013, b"SH", _even(impl_version.encode("ascii"), b" ")))
    body = b""
    for el, vr, value in elements:
        if vr == b"OB":
            body += struct.pack("<HH", 2, el) + vr + b"\x00\x00" + struct.pack("<I", len(value))
        else:
            body += struct.pack("<HH", 2, el) + vr + struct.pack("<H", len(value))
        body += value
    return (b"\x00" * 128 + b"DICM" + struct.pack("<HH", 2, 0) + b"UL"
            + struct.pack("<HI", 4, len(body)) + body)


def uid_batches(uids: Sequence[str], limit: int = MAX_UID_LIST_BYTES) -> list[list[str]]:
    """`uids` in order, cut into lists whose multi-valued UI encoding (values joined by a
    backslash, padded to even length) fits in `limit` bytes."""
    batches: list[list[str]] = []
    current: list[str] = []
    size = 0
    for uid in uids:
        extra = len(uid) + (1 if current else 0)
        if current and size + extra + 1 > limit:  # + 1: the padding byte, at worst
            batches.append(current)
            current, extra, size = [], len(uid), 0
        current.append(uid)
        size += extra
    if current:
        batches.append(current)
    return batches


def retrieve_identifier(study: str, series: str, uids: Sequence[str], transfer_syntax: str,
                        whole: bool = False, what: str = "C-GET") -> bytes:
    """The identifier of a C-GET or C-MOVE (`what`): IMAGE level with the UID list, or
    SERIES level (`whole`), encoded in `transfer_syntax`."""
    from pynetdicom.dsutils import encode

    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES" if whole else "IMAGE"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    if not whole:
        ds.SOPInstanceUID = list(uids) if len(uids) > 1 else uids[0]
    raw = encode(ds, transfer_syntax == IMPLICIT_LE, True)
    if raw is None:
        raise PacsError("failed", f"cannot encode the {what} identifier")
    return raw


class _Store:
    """The C-STORE-RQ being received: its command and where its data set goes."""

    __slots__ = (
        "context_id",
        "fd",
        "message_id",
        "offset",
        "size",
        "sop_class",
        "sop_uid",
        "status",
        "transfer_syntax",
    )

    def __init__(self, message_id: int, context_id: int, sop_class: str, sop_uid: str,
                 transfer_syntax: str, fd: int | None, status: int, offset: int = 0,
                 size: int = 0):
        self.message_id, self.context_id = message_id, context_id
        self.sop_class, self.sop_uid, self.transfer_syntax = sop_class, sop_uid, transfer_syntax
        self.fd, self.status = fd, status  # fd None: discard the data set
        self.offset = offset  # where the instance starts in the segment
        self.size = size  # bytes written so far (file meta header included)


class CGetSession:
    """C-GETs over one established `Link`; see the module docstring."""

    def __init__(self, link: Link, get_context: int, spool: Path, wanted: set[str],
                 on_stored: OnStored):
        self.link = link
        self.get_context = get_context
        self.get_syntax = link.accepted.contexts[get_context]
        self.spool = spool
        self.wanted = wanted
        self.on_stored = on_stored
        self.stored: set[str] = set()
        self._message_id = 0
        self._store: _Store | None = None
        self._rsp_data = False  # a C-GET-RSP data set (failed instance list) follows
        self._final: int | None = None
        self._rsp_status: int | None = None
        self._command_buf = bytearray()  # command fragments so far (may span PDUs)
        name = uuid.uuid4().hex[:16]
        self.segment = spool / f"{name}.seg"
        self.index = spool / f"{name}.idx"
        self._seg_fd: int | None = None  # opened on the first instance
        self._idx_fd: int | None = None
        self._end = 0  # the segment's length: where the next instance starts

    # -- one C-GET -----------------------------------------------------------------------
    def get(self, study: str, series: str, uids: Sequence[str], whole: bool = False) -> int:
        """Send one C-GET-RQ (SERIES level when `whole`: the series' every instance is in
        `uids`) and receive until its final response; returns its status."""
        self._message_id = self._message_id % 0xFFFF + 1
        self._final = None
        # Only what this request asked for (a SERIES-level C-GET brings the whole series,
        # and an instance requested under another series must not be taken from it).
        self.wanted = set(uids)
        link = self.link
        with link.guard("C-GET"):
            link.send_message(self.get_context, dimse.c_get_rq(self._message_id, GET_MODEL),
                              retrieve_identifier(study, series, uids, self.get_syntax, whole))
            try:
                while self._final is None:
                    pdu_type, length = link.pdu_header()
                    if pdu_type == pdu.P_DATA_TF:
                        self._p_data(length)
                    elif pdu_type == pdu.A_ABORT:
                        why = pdu.describe_abort(link.read(length))
                        link.close()
                        raise PacsError("aborted", "the PACS aborted the association during "
                                                   f"C-GET ({why})")
                    elif pdu_type == pdu.A_RELEASE_RQ:
                        link.copy(length, None)
                        link.send(pdu.encode_release_rp())
                        link.close()
                        raise PacsError("aborted", "the association ended during C-GET")
                    else:
                        raise PduError(f"unexpected PDU type 0x{pdu_type:02X} during C-GET")
            finally:
                self._drop_partial()
        return self._final

    def _drop_partial(self) -> None:
        """Cut an instance broken off mid-way off the segment."""
        store, self._store = self._store, None
        if store is not None and store.fd is not None:
            with contextlib.suppress(OSError):
                os.lseek(store.fd, self._end, os.SEEK_SET)
            with contextlib.suppress(OSError):
                os.ftruncate(store.fd, self._end)

    def close(self) -> None:
        """Close the segment and index files (they stay in the spool folder, except a
        segment that holds no complete instance)."""
        for fd in (self._seg_fd, self._idx_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self._seg_fd is not None and self._end == 0:
            self.segment.unlink(missing_ok=True)
        self._seg_fd = self._idx_fd = None

    def _p_data(self, length: int) -> None:
        link = self.link
        command = self._command_buf
        for context_id, mch, n in link.pdvs(length):
            if mch & 1:
                if len(command) + n > dimse.MAX_COMMAND_SET:
                    raise PduError("command set too long")
                command += link.read(n)
                if mch & 2:
                    raw = bytes(command)
                    command.clear()
                    self._command(raw, context_id)
            else:
                store = self._store
                if store is not None:
                    if context_id != store.context_id:
                        raise PduError("data set fragment on another presentation context")
                    link.copy(n, store.fd)
                    store.size += n
                    if mch & 2:
                        self._stored(store)
                elif self._rsp_data:
                    link.copy(n, None)
                    if mch & 2:
                        self._rsp_data = False
                        self._final = self._rsp_status
                else:
                    raise PduError("data set fragment without a command")

    def _command(self, raw: bytes, context_id: int) -> None:
        if self._store is not None or self._rsp_data:
            raise PduError("command set before the previous data set ended")
        cmd = dimse.decode(raw)
        field = dimse.us(cmd, dimse.COMMAND_FIELD)
        has_data = dimse.us(cmd, dimse.DATA_SET_TYPE) != dimse.NO_DATA_SET
        if field == dimse.C_STORE_RQ:
            self._begin_store(cmd, context_id, has_data)
        elif field == dimse.C_GET_RSP:
            if dimse.us(cmd, dimse.RESPONDED_TO) != self._message_id:
                raise PduError("C-GET-RSP to another message")
            status = dimse.us(cmd, dimse.STATUS)
            if status in PENDING:
                if has_data:
                    self._rsp_status, self._rsp_data = None, True
                return
            if has_data:
                self._rsp_status, self._rsp_data = status, True
            else:
                self._final = status
        else:
            raise PduError(f"unexpected DIMSE command 0x{field:04X} during C-GET")

    def _begin_store(self, cmd: dict[int, bytes], context_id: int, has_data: bool) -> None:
        message_id = dimse.us(cmd, dimse.MESSAGE_ID)
        sop_class = dimse.ui(cmd, dimse.AFFECTED_SOP_CLASS)
        sop_uid = dimse.ui(cmd, dimse.AFFECTED_SOP_INSTANCE)
        syntax = self.link.accepted.contexts.get(context_id)
        if syntax is None or context_id == self.get_context:
            raise PduError("C-STORE-RQ on a presentation context not accepted for storage")
        if not has_data:
            self._respond(context_id, message_id, sop_class, sop_uid, 0xC000)
            return
        if sop_uid not in self.wanted or sop_uid in self.stored:
            self._store = _Store(message_id, context_id, sop_class, sop_uid, syntax,
                                 None, 0xA900)
            return
        fd = self._seg_fd
        if fd is None:
            fd = self._seg_fd = os.open(self.segment, _OPEN_FLAGS, 0o600)
        elif os.fstat(fd).st_nlink == 0:
            # The spool folder was removed (the response is gone: gateway.imaging.rad69):
            # end the association rather than fetch the rest into an unlinked file.
            raise FileNotFoundError("the spool segment was removed")
        # The store is current before the first write: a failed write is cut off again.
        self._store = store = _Store(message_id, context_id, sop_class, sop_uid, syntax, fd,
                                     0x0000, self._end)
        header = file_meta_header(sop_class, sop_uid, syntax)
        write_all(fd, memoryview(header))
        store.size = len(header)

    def _stored(self, store: _Store) -> None:
        self._store = None
        if store.fd is not None:
            self._end = store.offset + store.size
            if self._idx_fd is None:
                self._idx_fd = os.open(self.index, _OPEN_FLAGS | os.O_APPEND, 0o600)
            write_all(self._idx_fd, memoryview(
                f"{store.sop_uid} {store.offset} {store.size} {store.transfer_syntax}\n"
                .encode("ascii")))
            self.stored.add(store.sop_uid)
            self.on_stored(store.sop_uid, self.segment, store.transfer_syntax, store.size,
                           store.offset)
        self._respond(store.context_id, store.message_id, store.sop_class, store.sop_uid,
                      store.status)

    def _respond(self, context_id: int, message_id: int, sop_class: str, sop_uid: str,
                 status: int) -> None:
        self.link.send_message(context_id,
                               dimse.c_store_rsp(message_id, sop_class, sop_uid, status))


def _check_final(status: int) -> None:
    if status in (0x0000, 0xB000):
        return
    if status == 0xFE00:
        raise PacsError("failed", "C-GET cancelled by the PACS")
    raise PacsError("failed", f"C-GET failed with status 0x{status:04X}")


def _get_group(session: CGetSession, study: str, series: str, uids: list[str],
               failed: dict[str, str], whole: bool = False) -> None:
    """One C-GET for instances of one series (SERIES level when `whole`); a failure status
    for the whole group is retried instance by instance (one instance the PACS cannot
    convert fails the group). Not after a SERIES-level C-GET: its instances may not have
    been looked up (gateway.imaging.plan), and the caller retries them at IMAGE level once
    they have been (gateway.imaging.rad69)."""
    try:
        _check_final(session.get(study, series, uids, whole))
    except PacsError as exc:
        if exc.kind != "failed":
            raise
        rest = [u for u in uids if u not in session.stored]
        if whole:
            for uid in rest:
                failed[uid] = f"SERIES-level {exc.message}"
        elif len(uids) > 1 and len(rest) <= 64:
            for uid in rest:
                _get_group(session, study, series, [uid], failed)
        else:
            for uid in rest:
                failed[uid] = exc.message


def proposed_contexts(sop_classes: Sequence[str], transfer_syntaxes: Sequence[str]
                      ) -> list[ProposedContext]:
    """The Get model (id 1) then one context per (SOP class, transfer syntax)."""
    out = [ProposedContext(1, GET_MODEL, (IMPLICIT_LE, EXPLICIT_LE))]
    for cls in sop_classes:
        for ts in transfer_syntaxes:
            out.append(ProposedContext(len(out) * 2 + 1, cls, (ts,)))
    if len(out) > 128:
        raise ValueError("more than 128 presentation contexts")
    return out


def refused_scp_roles(roles: dict[str, tuple[bool, bool]], classes: Sequence[str]
                      ) -> set[str]:
    """The storage SOP classes whose SCP role (ours, for the C-STORE sub-operations) the PACS
    explicitly refused in its SCP/SCU Role Selection answer (PS3.7 D.3.3.4). A class it did
    not answer for is not counted: PACS that leave the item out still send C-STOREs."""
    return {c for c in classes if c in roles and not roles[c][1]}


def run_c_get(pacs: PacsConfig, instances: Sequence[InstanceRef],
              transfer_syntaxes: Sequence[str], spool: Path, timeout: float,
              on_stored: OnStored, *, deadline: float | None = None,
              whole_series: Collection[tuple[str, str]] = ()
              ) -> tuple[dict[str, str], PacsError | None]:
    """Fetch `instances` over one association; returns (failed uid -> reason, the
    association-level error if any). Each received instance is reported to `on_stored`.
    `deadline` (monotonic) bounds the whole exchange, beyond the per-read `timeout`. A
    series in `whole_series` (`instances` holds all the PACS has of it) is fetched with one
    SERIES-level C-GET; an instance the PACS sends that was not asked for is refused."""
    failed: dict[str, str] = {}
    classes = sorted({i.sop_class_uid for i in instances})
    contexts = proposed_contexts(classes, transfer_syntaxes)
    groups: dict[tuple[str, str], list[str]] = {}
    for i in instances:
        groups.setdefault((i.study_uid, i.series_uid), []).append(i.sop_instance_uid)
    try:
        link = open_link(pacs, contexts, timeout, scp_roles=classes)
        link.deadline = deadline
        try:
            if 1 not in link.accepted.contexts:
                raise PacsError("rejected", "the PACS did not accept the Q/R Get model")
            refused = refused_scp_roles(link.accepted.roles, classes)
            for i in instances:
                if i.sop_class_uid in refused:
                    failed[i.sop_instance_uid] = (
                        f"the PACS refused the SCP role for SOP class {i.sop_class_uid}, so it "
                        "cannot send it with C-GET (PS3.7 D.3.3.4)")
            session = CGetSession(link, 1, spool, {i.sop_instance_uid for i in instances},
                                  on_stored)
            try:
                for (study, series), uids in groups.items():
                    if (study, series) in whole_series and not any(u in failed for u in uids):
                        _get_group(session, study, series, uids, failed, whole=True)
                        continue
                    uids = [u for u in uids if u not in failed]
                    for batch in uid_batches(uids) if uids else []:
                        _get_group(session, study, series, batch, failed)
            finally:
                session.close()
        finally:
            if not link.closed:
                link.release()
    except PacsError as exc:
        return failed, exc
    return failed, None
