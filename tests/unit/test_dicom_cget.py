"""The built-in C-GET SCU (gateway.dicom.cget) against a scripted peer on loopback: a good
exchange (instances spooled byte for byte, unwanted ones refused with 0xA900), a failed group
retried instance by instance, `retrieve(on_received=...)` called while the job still runs, and
misbehaving peers (rejection, garbage PDU, oversized PDU length, abort, close or stall in the
middle of a data set) answered with PacsError in bounded time and no partial file left."""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.config import PacsConfig
from gateway.dicom.cget import file_meta_header, run_c_get
from gateway.dicom.retrieve import InstanceRef, Received, retrieve
from gateway.dicom.ul import command, pdu

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
STUDY, SERIES = "1.2.9", "1.2.9.1"
REFS = [InstanceRef(STUDY, SERIES, f"1.2.9.1.{k}", CT) for k in (1, 2)]


def _dataset(uid: str) -> bytes:
    return bytes((k * 7) & 0xFF for k in range(40_000)) + uid.encode()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionError("closed")
        data += part
    return data


def recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    pdu_type, length = pdu.PDU_HEADER.unpack(recv_exact(sock, 6))
    return pdu_type, recv_exact(sock, length)


def recv_message(sock: socket.socket, data_set: list[bytes] | None = None
                 ) -> tuple[dict[int, bytes], int]:
    """One DIMSE message's command set and its context id; its data set's fragments are
    added to `data_set` when given (skipped otherwise)."""
    cmd = b""
    have_data = None
    while True:
        pdu_type, body = recv_pdu(sock)
        assert pdu_type == pdu.P_DATA_TF
        pos = 0
        while pos < len(body):
            length, cid, mch = pdu.PDV_HEADER.unpack_from(body, pos)
            data = body[pos + 6:pos + 4 + length]
            pos += 4 + length
            if mch & 1:
                cmd += data
                if mch & 2:
                    parsed = command.decode(cmd)
                    have_data = command.us(parsed, command.DATA_SET_TYPE) != 0x0101
                    if not have_data:
                        return parsed, cid
            else:
                if data_set is not None:
                    data_set.append(data)
                if mch & 2:
                    return command.decode(cmd), cid


def p_data(cid: int, data: bytes, *, is_command: bool, last: bool) -> bytes:
    mch = (1 if is_command else 0) | (2 if last else 0)
    return (pdu.PDU_HEADER.pack(pdu.P_DATA_TF, len(data) + 6)
            + pdu.PDV_HEADER.pack(len(data) + 2, cid, mch) + data)


def accept(sock: socket.socket, role_items: bytes = b"") -> None:
    """Read the A-ASSOCIATE-RQ and accept the Get model (implicit LE, id 1) and CT in
    explicit LE (id 3); `role_items`: SCP/SCU Role Selection sub-items of the answer."""
    pdu_type, _body = recv_pdu(sock)
    assert pdu_type == pdu.A_ASSOCIATE_RQ

    def item(t: int, body: bytes) -> bytes:
        return struct.pack(">BxH", t, len(body)) + body

    items = (item(0x10, pdu.APPLICATION_CONTEXT.encode())
             + item(0x21, bytes([1, 0, 0, 0]) + item(0x40, IMPLICIT_LE.encode()))
             + item(0x21, bytes([3, 0, 0, 0]) + item(0x40, EXPLICIT_LE.encode()))
             + item(0x50, item(0x51, struct.pack(">I", 16384)) + role_items))
    body = struct.pack(">HH", 1, 0) + b"ORTHANC".ljust(16) + b"XDSI-GW".ljust(16) + bytes(32)
    sock.sendall(pdu.PDU_HEADER.pack(pdu.A_ASSOCIATE_AC, len(body + items)) + body + items)


def store_rq(message_id: int, uid: str) -> bytes:
    return command.encode({command.AFFECTED_SOP_CLASS: CT,
                           command.COMMAND_FIELD: command.C_STORE_RQ,
                           command.MESSAGE_ID: message_id, command.PRIORITY: 0,
                           command.DATA_SET_TYPE: 0, command.AFFECTED_SOP_INSTANCE: uid})


def get_rsp(responded_to: int, status: int) -> bytes:
    return command.encode({command.AFFECTED_SOP_CLASS: "1.2.840.10008.5.1.4.1.2.2.3",
                           command.COMMAND_FIELD: command.C_GET_RSP,
                           command.RESPONDED_TO: responded_to,
                           command.DATA_SET_TYPE: 0x0101, command.STATUS: status})


def send_instance(sock: socket.socket, message_id: int, uid: str) -> int:
    """A C-STORE-RQ whose data set comes in three fragments over two PDUs; returns the
    status of our C-STORE-RSP."""
    data = _dataset(uid)
    sock.sendall(p_data(3, store_rq(message_id, uid), is_command=True, last=True))
    sock.sendall(p_data(3, data[:10_000], is_command=False, last=False)
                 + p_data(3, data[10_000:25_000], is_command=False, last=False))
    sock.sendall(p_data(3, data[25_000:], is_command=False, last=True))
    rsp, cid = recv_message(sock)
    assert cid == 3
    assert command.us(rsp, command.RESPONDED_TO) == message_id
    assert command.ui(rsp, command.AFFECTED_SOP_INSTANCE) == uid
    return command.us(rsp, command.STATUS)


def release(sock: socket.socket) -> None:
    pdu_type, _ = recv_pdu(sock)
    assert pdu_type == pdu.A_RELEASE_RQ
    sock.sendall(pdu.encode_release_rp())


@contextlib.contextmanager
def peer(script: Callable[[socket.socket], None]) -> Iterator[tuple[PacsConfig, list[str]]]:
    """A one-connection peer running `script`; yields the PacsConfig pointing at it and a
    list that collects the script's exceptions (an assertion there fails the test)."""
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[str] = []

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            try:
                script(conn)
            except Exception as exc:
                errors.append(repr(exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield PacsConfig(port=listener.getsockname()[1], timeout_seconds=2), errors
    finally:
        listener.close()
        thread.join(10)


def _run(pacs: PacsConfig, spool: Path, refs: list[InstanceRef] = REFS[:1],
         timeout: float = 2) -> tuple[list[Received], dict[str, str], object, float]:
    got: list[Received] = []
    start = time.monotonic()
    failed, error = run_c_get(pacs, refs, [EXPLICIT_LE], spool, timeout,
                              lambda u, p, t, s, o: got.append(Received(u, p, t, s, o)))
    return got, failed, error, time.monotonic() - start


def test_instances_spooled_and_unwanted_refused(tmp_path: Path) -> None:
    statuses: list[int] = []

    def script(sock: socket.socket) -> None:
        accept(sock)
        rq, cid = recv_message(sock)
        assert cid == 1 and command.us(rq, command.COMMAND_FIELD) == command.C_GET_RQ
        statuses.append(send_instance(sock, 101, "1.2.9.1.1"))
        statuses.append(send_instance(sock, 102, "1.2.9.9.9"))  # not asked for
        sock.sendall(p_data(1, get_rsp(command.us(rq, command.MESSAGE_ID), 0x0000),
                            is_command=True, last=True))
        release(sock)

    with peer(script) as (pacs, errors):
        got, failed, error, _t = _run(pacs, tmp_path)
    assert errors == [] and error is None and failed == {}
    assert statuses == [0x0000, 0xA900]
    assert [(r.sop_instance_uid, r.transfer_syntax) for r in got] == [("1.2.9.1.1", EXPLICIT_LE)]
    # One segment file for the association, the instance at its start, and its index line.
    segment = got[0].path
    assert segment.parent == tmp_path and segment.suffix == ".seg" and got[0].offset == 0
    assert got[0].size == segment.stat().st_size  # the unwanted instance left nothing
    assert got[0].read_bytes() == (file_meta_header(CT, "1.2.9.1.1", EXPLICIT_LE)
                                   + _dataset("1.2.9.1.1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [segment.stem + ".idx",
                                                          segment.name]
    assert segment.with_suffix(".idx").read_text() == (
        f"1.2.9.1.1 0 {got[0].size} {EXPLICIT_LE}\n")


@pytest.mark.parametrize("recv_buffer", [1000, 1 << 18])
def test_pdus_split_anywhere_by_tcp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    recv_buffer: int) -> None:
    """PDU and PDV headers, command sets and data sets cut at arbitrary TCP boundaries (and
    a receive buffer smaller than a PDU) still give byte-exact files."""
    from gateway.dicom.ul import link

    monkeypatch.setattr(link, "RECV_BUFFER", recv_buffer)
    uids = ["1.2.9.1.1", "1.2.9.1.2"]
    statuses: list[int] = []

    def dribble(sock: socket.socket, data: bytes) -> None:
        sizes, pos, k = (1, 5, 6, 7, 4093, 3, 12_000), 0, 0
        while pos < len(data):
            sock.sendall(data[pos:pos + sizes[k % len(sizes)]])
            pos += sizes[k % len(sizes)]
            k += 1
            if k % 50 == 0:
                time.sleep(0.001)  # let the reader see the pieces apart

    def script(sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        accept(sock)
        rq, _cid = recv_message(sock)
        for n, uid in enumerate(uids):
            data = _dataset(uid)
            dribble(sock, p_data(3, store_rq(201 + n, uid), is_command=True, last=True)
                    + p_data(3, data[:3], is_command=False, last=False)
                    + p_data(3, data[3:30_001], is_command=False, last=False)
                    + p_data(3, data[30_001:], is_command=False, last=True))
            rsp, _ = recv_message(sock)
            statuses.append(command.us(rsp, command.STATUS))
        dribble(sock, p_data(1, get_rsp(command.us(rq, command.MESSAGE_ID), 0x0000),
                             is_command=True, last=True))
        release(sock)

    with peer(script) as (pacs, errors):
        got, failed, error, _t = _run(pacs, tmp_path, REFS)
    assert errors == [] and error is None and failed == {}
    assert statuses == [0x0000, 0x0000]
    offset = 0
    for rec, uid in zip(got, uids, strict=True):
        assert rec.sop_instance_uid == uid and rec.offset == offset  # appended in order
        assert rec.read_bytes() == file_meta_header(CT, uid, EXPLICIT_LE) + _dataset(uid)
        offset += rec.size
    assert got[0].path == got[1].path and got[0].path.stat().st_size == offset
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".idx", ".seg"]


def test_a_whole_series_is_fetched_at_series_level(tmp_path: Path) -> None:
    """A series the request holds in full: one SERIES-level C-GET without a UID list; an
    instance of it that was not asked for (added to the PACS since the C-FIND) is refused."""
    identifiers: list[bytes] = []
    statuses: list[int] = []

    def script(sock: socket.socket) -> None:
        accept(sock)
        data: list[bytes] = []
        rq, _cid = recv_message(sock, data)
        identifiers.append(b"".join(data))
        for k, uid in enumerate(["1.2.9.1.1", "1.2.9.1.7", "1.2.9.1.2"]):
            statuses.append(send_instance(sock, 300 + k, uid))
        sock.sendall(p_data(1, get_rsp(command.us(rq, command.MESSAGE_ID), 0xB000),
                            is_command=True, last=True))
        release(sock)

    got: list[Received] = []
    with peer(script) as (pacs, errors):
        failed, error = run_c_get(pacs, REFS, [EXPLICIT_LE], tmp_path, 2,
                                  lambda u, p, t, s, o: got.append(Received(u, p, t, s, o)),
                                  whole_series={(STUDY, SERIES)})
    assert errors == [] and error is None and failed == {}
    assert len(identifiers) == 1  # one request for the series
    assert b"SERIES" in identifiers[0] and b"IMAGE" not in identifiers[0]
    assert b"\x08\x00\x18\x00" not in identifiers[0]  # no SOP Instance UID (0008,0018)
    assert SERIES.encode() in identifiers[0]
    assert statuses == [0x0000, 0xA900, 0x0000]
    assert [r.sop_instance_uid for r in got] == ["1.2.9.1.1", "1.2.9.1.2"]
    assert [r.read_bytes() for r in got] == [
        file_meta_header(CT, u, EXPLICIT_LE) + _dataset(u) for u in ("1.2.9.1.1", "1.2.9.1.2")]


def test_failed_group_is_retried_instance_by_instance(tmp_path: Path) -> None:
    requests: list[int] = []

    def script(sock: socket.socket) -> None:
        accept(sock)
        rq, _ = recv_message(sock)  # both instances: the PACS fails the group
        requests.append(2)
        sock.sendall(p_data(1, get_rsp(command.us(rq, command.MESSAGE_ID), 0xC000),
                            is_command=True, last=True))
        for k, status in ((1, 0x0000), (2, 0xA702)):
            rq, _ = recv_message(sock)
            requests.append(1)
            if status == 0:
                send_instance(sock, 200 + k, f"1.2.9.1.{k}")
            sock.sendall(p_data(1, get_rsp(command.us(rq, command.MESSAGE_ID), status),
                                is_command=True, last=True))
        release(sock)

    with peer(script) as (pacs, errors):
        got, failed, error, _t = _run(pacs, tmp_path, REFS)
    assert errors == [] and error is None
    assert requests == [2, 1, 1]
    assert [r.sop_instance_uid for r in got] == ["1.2.9.1.1"]
    assert failed == {"1.2.9.1.2": "C-GET failed with status 0xA702"}


def test_on_received_is_called_while_the_job_runs(tmp_path: Path) -> None:
    seen = threading.Event()
    called_early: list[bool] = []

    def script(sock: socket.socket) -> None:
        accept(sock)
        rq, _ = recv_message(sock)
        send_instance(sock, 1, "1.2.9.1.1")
        called_early.append(seen.wait(5))  # before the C-GET even ends
        send_instance(sock, 2, "1.2.9.1.2")
        sock.sendall(p_data(1, get_rsp(command.us(rq, command.MESSAGE_ID), 0x0000),
                            is_command=True, last=True))
        release(sock)

    reported: list[str] = []

    def on_received(rec: Received) -> None:
        assert rec.path.is_file()
        reported.append(rec.sop_instance_uid)
        seen.set()

    with peer(script) as (pacs, errors):
        outcome = retrieve(pacs, REFS, [EXPLICIT_LE], tmp_path, associations=1, timeout=5,
                           in_process=True, on_received=on_received)
    assert errors == []
    assert called_early == [True]
    assert reported == ["1.2.9.1.1", "1.2.9.1.2"]  # each once
    assert set(outcome.received) == set(reported) and outcome.error is None


def _mid_dataset(ending: Callable[[socket.socket], None]) -> Callable[[socket.socket], None]:
    def script(sock: socket.socket) -> None:
        accept(sock)
        recv_message(sock)
        sock.sendall(p_data(3, store_rq(1, "1.2.9.1.1"), is_command=True, last=True))
        sock.sendall(p_data(3, _dataset("x")[:5000], is_command=False, last=False))
        ending(sock)
    return script


def _stall(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.recv(1000)  # until the SCU gives up (A-ABORT, then close)
        time.sleep(0.5)


@pytest.mark.parametrize(("name", "script", "kind", "words"), [
    ("garbage PDU", _mid_dataset(lambda s: s.sendall(b"\x4f\x00\x00\x00\x00\x04abcd")),
     "aborted", "unknown PDU type 0x4F"),
    ("oversized PDU", _mid_dataset(lambda s: s.sendall(b"\x04\x00\x7f\xff\xff\xff")),
     "aborted", "exceeds"),
    ("PDV longer than its PDU", _mid_dataset(lambda s: s.sendall(
        pdu.PDU_HEADER.pack(4, 10) + pdu.PDV_HEADER.pack(5000, 3, 0) + b"abcd")),
     "aborted", "PDV length"),
    ("abort mid-dataset", _mid_dataset(lambda s: s.sendall(pdu.encode_abort(2, 0))),
     "aborted", "aborted the association"),
    ("close mid-dataset", _mid_dataset(lambda s: s.shutdown(socket.SHUT_RDWR)),
     "aborted", "ended during C-GET"),
    ("stall mid-dataset", _mid_dataset(_stall), "timeout", "no data from the PACS"),
    ("data set without a command", lambda s: (accept(s), recv_message(s), s.sendall(
        p_data(3, b"abcd", is_command=False, last=True)), _stall(s)),
     "aborted", "without a command"),
])
def test_misbehaving_peer_is_a_pacs_error_in_bounded_time(
        name: str, script: Callable[[socket.socket], None], kind: str, words: str,
        tmp_path: Path) -> None:
    with peer(script) as (pacs, _errors):
        got, _failed, error, elapsed = _run(pacs, tmp_path, timeout=1)
    assert got == []
    assert error is not None and error.kind == kind, (name, error)  # type: ignore[attr-defined]
    assert words in error.message, error  # type: ignore[attr-defined]
    assert elapsed < 4, elapsed
    assert list(tmp_path.iterdir()) == []  # the partial instance is gone


def test_rejected_association(tmp_path: Path) -> None:
    def script(sock: socket.socket) -> None:
        recv_pdu(sock)
        sock.sendall(pdu.PDU_HEADER.pack(pdu.A_ASSOCIATE_RJ, 4) + bytes([0, 1, 1, 7]))

    with peer(script) as (pacs, _errors):
        _got, _failed, error, _t = _run(pacs, tmp_path)
    assert error is not None and error.kind == "rejected"  # type: ignore[attr-defined]
    assert "rejected the association" in error.message  # type: ignore[attr-defined]


def test_nothing_listening_is_unreachable(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    _got, _failed, error, _t = _run(PacsConfig(port=port), tmp_path)
    assert error is not None and error.kind == "unreachable"  # type: ignore[attr-defined]
    assert "cannot connect" in error.message  # type: ignore[attr-defined]


def test_dimse_engine_setting(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from gateway.config import ConfigError, from_dict
    from tests.support.config import dev_pki_dir, example_raw

    raw = example_raw(dev_pki_dir(tmp_path_factory, "cget-config"))
    assert from_dict(raw, tmp_path).pacs.dimse_engine == "builtin"  # the example's value
    raw["pacs"].pop("dimse_engine", None)
    assert from_dict(raw, tmp_path).pacs.dimse_engine == "builtin"  # the default
    raw["pacs"]["dimse_engine"] = "pynetdicom"
    assert from_dict(raw, tmp_path).pacs.dimse_engine == "pynetdicom"
    raw["pacs"]["dimse_engine"] = "dcmtk"
    with pytest.raises(ConfigError, match=r"^\[pacs\] dimse_engine: expected"):
        from_dict(raw, tmp_path)


def test_a_trickling_peer_is_stopped_at_the_deadline(tmp_path: Path) -> None:
    """Each byte arrives within the read timeout, but the exchange has a deadline."""
    def script(sock: socket.socket) -> None:
        accept(sock)
        recv_message(sock)
        sock.sendall(p_data(3, store_rq(1, "1.2.9.1.1"), is_command=True, last=True))
        with contextlib.suppress(OSError):
            for _ in range(100):
                sock.sendall(p_data(3, b"ab", is_command=False, last=False))
                time.sleep(0.3)

    with peer(script) as (pacs, _errors):
        start = time.monotonic()
        _failed, error = run_c_get(pacs, REFS[:1], [EXPLICIT_LE], tmp_path, 1,
                                   lambda *_a: None, deadline=time.monotonic() + 1.5)
        elapsed = time.monotonic() - start
    assert error is not None and error.kind == "timeout", error
    assert 1.4 < elapsed < 3, elapsed
    assert list(tmp_path.iterdir()) == []


def _role_item(uid: str, scu: int, scp: int) -> bytes:
    body = struct.pack(">H", len(uid)) + uid.encode() + bytes([scu, scp])
    return struct.pack(">BxH", 0x54, len(body)) + body


@pytest.mark.parametrize("scp", [0, 1])
def test_a_refused_scp_role_fails_its_instances_without_a_c_get(tmp_path: Path,
                                                                scp: int) -> None:
    """PS3.7 D.3.3.4: a PACS that refuses our SCP role for a SOP class cannot send its
    instances with C-STORE; they fail with that reason, and no C-GET is sent for them."""
    def script(sock: socket.socket) -> None:
        accept(sock, _role_item(CT, 0, scp))
        if scp:
            rq, _cid = recv_message(sock)
            send_instance(sock, 101, "1.2.9.1.1")
            sock.sendall(p_data(1, get_rsp(command.us(rq, command.MESSAGE_ID), 0x0000),
                                is_command=True, last=True))
        release(sock)

    with peer(script) as (pacs, errors):
        got, failed, error, _took = _run(pacs, tmp_path)
    assert errors == [] and error is None
    if scp:
        assert [r.sop_instance_uid for r in got] == ["1.2.9.1.1"] and failed == {}
    else:
        assert got == [] and list(failed) == ["1.2.9.1.1"]
        assert "refused the SCP role" in failed["1.2.9.1.1"]


def test_a_removed_spool_folder_ends_the_association(tmp_path: Path) -> None:
    """The response is gone and its spool folder removed while the C-GET runs: the next
    instance ends the association (no fetching the rest into an unlinked file)."""
    removed = threading.Event()
    statuses: list[int] = []
    spool = tmp_path / "spool"
    spool.mkdir()

    def script(sock: socket.socket) -> None:
        accept(sock)
        recv_message(sock)
        statuses.append(send_instance(sock, 1, "1.2.9.1.1"))
        removed.wait(5)
        with contextlib.suppress(OSError):
            send_instance(sock, 2, "1.2.9.1.2")
            statuses.append(-1)  # answered: the association went on

    got: list[str] = []

    def on_stored(uid: str, path: Path, _ts: str, _size: int, _offset: int) -> None:
        got.append(uid)
        shutil.rmtree(spool)
        removed.set()

    with peer(script) as (pacs, errors):
        _failed, error = run_c_get(pacs, REFS, [EXPLICIT_LE], spool, 5, on_stored)
    assert errors == []
    assert got == ["1.2.9.1.1"] and statuses == [0x0000]
    assert error is not None and error.kind == "aborted"
    assert not spool.exists()


def test_a_failed_series_level_c_get_is_not_retried_here(tmp_path: Path) -> None:
    """A SERIES-level C-GET that ends in a failure: what did not come is failed with a
    reason naming the level, without IMAGE-level requests on this association (its instances
    may not have been looked up: gateway.imaging.rad69.gather does that, then retries)."""
    requests: list[int] = []

    def script(sock: socket.socket) -> None:
        accept(sock)
        rq, _ = recv_message(sock)
        requests.append(1)
        send_instance(sock, 1, "1.2.9.1.1")
        sock.sendall(p_data(1, get_rsp(command.us(rq, command.MESSAGE_ID), 0xC000),
                            is_command=True, last=True))
        release(sock)

    got: list[str] = []
    with peer(script) as (pacs, errors):
        failed, error = run_c_get(pacs, REFS, [EXPLICIT_LE], tmp_path, 5,
                                  lambda u, *_a: got.append(u),
                                  whole_series={(STUDY, SERIES)})
    assert errors == [] and error is None and requests == [1]
    assert got == ["1.2.9.1.1"]
    assert failed == {"1.2.9.1.2": "SERIES-level C-GET failed with status 0xC000"}


def test_each_c_get_accepts_only_its_own_instances(tmp_path: Path) -> None:
    """An instance the job wants, but for another series, sent during a series' SERIES-level
    C-GET is refused there (the request may have put it under the wrong series); it is taken
    when its own C-GET sends it."""
    other = InstanceRef(STUDY, SERIES + ".9", "1.2.9.9.1", CT)
    statuses: list[int] = []

    def script(sock: socket.socket) -> None:
        accept(sock)
        for uid in ("1.2.9.9.1", "1.2.9.9.1"):  # during the series' C-GET, then its own
            rq, _ = recv_message(sock)
            statuses.append(send_instance(sock, 400 + len(statuses), uid))
            sock.sendall(p_data(1, get_rsp(command.us(rq, command.MESSAGE_ID), 0xB000),
                                is_command=True, last=True))
        release(sock)

    got: list[str] = []
    with peer(script) as (pacs, errors):
        _failed, error = run_c_get(pacs, [*REFS, other], [EXPLICIT_LE], tmp_path, 5,
                                   lambda u, *_a: got.append(u),
                                   whole_series={(STUDY, SERIES)})
    assert errors == [] and error is None
    assert statuses == [0xA900, 0x0000] and got == ["1.2.9.9.1"]
