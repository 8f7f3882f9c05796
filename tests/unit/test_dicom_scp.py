"""The built-in C-MOVE storage SCP (gateway.dicom.scp through gateway.dicom.storescp) over
real TCP on loopback: pynetdicom as the sending peer (an independent implementation) and raw
sockets for the misbehaving ones; plus the acceptor-side PDU codec (gateway.dicom.ul.pdu)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC as PnAssociateAc

from gateway.config import PacsConfig
from gateway.dicom import storescp
from gateway.dicom.scp import StorageSCP, is_storage_syntax
from gateway.dicom.ul import command as dimse
from gateway.dicom.ul import pdu
from gateway.dicom.ul.pdu import PduError, ProposedContext
from tests.unit.test_dicom_cget import recv_pdu

AE_TITLE = "XDSI-GW"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dataset(uid: str, syntax: str = ExplicitVRLittleEndian, size: int = 300_000) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.PatientID = "P1"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = 10, size // 20
    ds.BitsAllocated = 16
    ds.PixelData = bytes(range(256)) * (size // 256) + b"\x01\x02" * ((size % 256) // 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    return ds


@contextlib.contextmanager
def serving(tmp_path: Path, engine: str = "builtin", timeout: int = 2
            ) -> Iterator[PacsConfig]:
    """storescp serving on a free port with `engine`; stopped afterwards."""
    pacs = PacsConfig(move_port=_free_port(), timeout_seconds=timeout, dimse_engine=engine,
                      move_destination_ae_title=AE_TITLE)
    assert storescp.ensure_running(pacs, timeout)
    try:
        yield pacs
    finally:
        storescp.stop(pacs)
        shutil.rmtree(storescp.spool_root(pacs), ignore_errors=True)


def _send(pacs: PacsConfig, datasets: list[Dataset], called: str = AE_TITLE,
          syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
          ) -> list[int]:
    ae = AE(ae_title="ORTHANC")
    ae.add_requested_context(CTImageStorage, list(syntaxes))
    assoc = ae.associate("127.0.0.1", pacs.move_port, ae_title=called)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()
        assert assoc.is_released


def _leftovers(pacs: PacsConfig) -> list[Path]:
    return list(storescp.spool_root(pacs).glob(".*.part"))


# -- instances through pynetdicom ------------------------------------------------------------

@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_expected_instances_land_as_pynetdicoms_scp_writes_them(tmp_path: Path,
                                                                syntax: str) -> None:
    uids = [generate_uid() for _ in range(3)]
    datasets = [_dataset(u, syntax, 200_000 + 2 * i) for i, u in enumerate(uids)]
    written: dict[str, dict[str, bytes]] = {}
    for engine in ("builtin", "pynetdicom"):
        spool = tmp_path / engine
        spool.mkdir()
        with serving(tmp_path, engine) as pacs, storescp.expect(pacs, spool, uids):
            assert _send(pacs, datasets, syntaxes=(syntax,)) == [0, 0, 0]
            assert _leftovers(pacs) == []
        written[engine] = {u: (spool / f"{u}.dcm").read_bytes() for u in uids}
        for u in uids:
            assert storescp.transfer_syntax_of(spool / f"{u}.dcm") == syntax
    assert written["builtin"] == written["pynetdicom"]
    # and the data set after the file meta is what was sent
    from pydicom import dcmread
    for ds, u in zip(datasets, uids, strict=True):
        got = dcmread(tmp_path / "builtin" / f"{u}.dcm")
        assert got.SOPInstanceUID == u and got.PixelData == ds.PixelData
        assert got.file_meta.MediaStorageSOPClassUID == CTImageStorage


def test_unexpected_instance_refused_and_not_kept(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    wanted, other = generate_uid(), generate_uid()
    with serving(tmp_path) as pacs, storescp.expect(pacs, spool, [wanted]):
        assert _send(pacs, [_dataset(other), _dataset(wanted)]) == [0xA900, 0]
        assert _leftovers(pacs) == []
    assert sorted(p.name for p in spool.iterdir()) == [f"{wanted}.dcm"]


def test_two_requests_expecting_the_same_instance_both_get_it(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    uid = generate_uid()
    with serving(tmp_path) as pacs, storescp.expect(pacs, a, [uid]), \
            storescp.expect(pacs, b, [uid]):
        assert _send(pacs, [_dataset(uid)]) == [0]
    assert (a / f"{uid}.dcm").read_bytes() == (b / f"{uid}.dcm").read_bytes()
    assert (a / f"{uid}.dcm").stat().st_size > 200_000


def test_c_echo_answered(tmp_path: Path) -> None:
    with serving(tmp_path) as pacs:
        ae = AE(ae_title="ORTHANC")
        ae.add_requested_context(dimse.VERIFICATION)
        assoc = ae.associate("127.0.0.1", pacs.move_port, ae_title=AE_TITLE)
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
        assert assoc.is_released


def test_wrong_called_ae_rejected_by_pynetdicom_peer(tmp_path: Path) -> None:
    with serving(tmp_path) as pacs:
        ae = AE(ae_title="ORTHANC")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", pacs.move_port, ae_title="SOMEONE-ELSE")
        assert assoc.is_rejected
        # the SCP still serves the right AE title afterwards
        assert _send(pacs, [_dataset(generate_uid())]) == [0xA900]


def test_dimse_engine_selects_the_scp_and_a_bound_port_is_left_alone(tmp_path: Path) -> None:
    with serving(tmp_path) as pacs:
        server = storescp._SERVERS.pop(pacs.move_port)
        try:
            assert isinstance(server, StorageSCP)
            # as another worker process would see it: the port is taken, nothing to serve
            assert storescp.ensure_running(pacs, 2) is False
            assert pacs.move_port not in storescp._SERVERS
        finally:
            storescp._SERVERS[pacs.move_port] = server
    with serving(tmp_path, "pynetdicom") as pacs:
        assert not isinstance(storescp._SERVERS[pacs.move_port], StorageSCP)


# -- raw peers -------------------------------------------------------------------------------

def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def _rq(contexts: list[ProposedContext], called: str = AE_TITLE) -> bytes:
    return pdu.encode_associate_rq(called, "ORTHANC", contexts, max_pdu_length=16384,
                                   implementation_uid="1.2.3.4", implementation_version="T")


CT = ProposedContext(1, CTImageStorage, (ImplicitVRLittleEndian,))


def _connect(scp: StorageSCP, contexts: list[ProposedContext] | None = None
             ) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(scp.address, timeout=10)
    sock.sendall(_rq(contexts or [CT]))
    pdu_type, body = recv_pdu(sock)
    assert pdu_type == pdu.A_ASSOCIATE_AC, body
    return sock, body


def _results(ac_body: bytes) -> dict[int, tuple[int, str]]:
    out = {}
    for item_type, item in pdu.iter_items(memoryview(ac_body)[68:]):
        if item_type == 0x21:
            syntaxes = [bytes(v).decode() for t, v in pdu.iter_items(item[4:]) if t == 0x40]
            out[item[0]] = (item[2], syntaxes[0] if syntaxes else "")
    return out


def _store_rq(uid: str) -> bytes:
    return dimse.encode({dimse.AFFECTED_SOP_CLASS: CTImageStorage,
                         dimse.COMMAND_FIELD: dimse.C_STORE_RQ, dimse.MESSAGE_ID: 7,
                         dimse.PRIORITY: 0, dimse.DATA_SET_TYPE: 0,
                         dimse.AFFECTED_SOP_INSTANCE: uid})


def _p_data(cid: int, data: bytes, *, command: bool, last: bool) -> bytes:
    mch = (1 if command else 0) | (2 if last else 0)
    return (pdu.PDU_HEADER.pack(pdu.P_DATA_TF, len(data) + 6)
            + pdu.PDV_HEADER.pack(len(data) + 2, cid, mch) + data)


@pytest.fixture
def raw_scp(tmp_path: Path) -> Iterator[tuple[StorageSCP, Path, list[str]]]:
    """A StorageSCP on an ephemeral port with root `tmp_path/root`, expecting the UIDs in
    the yielded list (routed into `tmp_path/spool`)."""
    root, spool = tmp_path / "root", tmp_path / "spool"
    root.mkdir()
    spool.mkdir()
    wanted: list[str] = []

    def route(uid: str, src: Path) -> int:
        if uid not in wanted:
            return 0xA900
        src.replace(spool / f"{uid}.dcm")
        return 0

    scp = StorageSCP(AE_TITLE, 0, root, route, lambda uid: uid in wanted, timeout=1,
                     max_associations=2, host="127.0.0.1")
    scp.start()
    try:
        yield scp, spool, wanted
    finally:
        scp.shutdown()


def _wait_idle(scp: StorageSCP, limit: float = 5) -> float:
    """Seconds until every association slot is free again."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        free = 0
        while scp._slots.acquire(blocking=False):
            free += 1
        for _ in range(free):
            scp._slots.release()
        if free == 2:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError("associations still running")


def test_negotiation_results(raw_scp: tuple[StorageSCP, Path, list[str]]) -> None:
    scp, _, _ = raw_scp
    contexts = [ProposedContext(1, CTImageStorage,
                                (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
                ProposedContext(3, dimse.VERIFICATION, (ImplicitVRLittleEndian,)),
                ProposedContext(5, STUDY_ROOT_MOVE, (ImplicitVRLittleEndian,)),
                ProposedContext(7, "1.2.840.10008.5.1.4.1.1.4", ()),
                ProposedContext(9, "1.2.840.10008.5.1.4.1.1.2.1", ("1.2.840.10008.1.2.4.50",))]
    sock, body = _connect(scp, contexts)
    with sock:
        assert _results(body) == {1: (0, ExplicitVRLittleEndian), 3: (0, ImplicitVRLittleEndian),
                                  5: (3, ImplicitVRLittleEndian), 7: (4, ""),
                                  9: (0, "1.2.840.10008.1.2.4.50")}
        assert body[4:36] == (AE_TITLE.ljust(16) + "ORTHANC".ljust(16)).encode()
        # pynetdicom reads our A-ASSOCIATE-AC
        ac = PnAssociateAc()
        ac.decode(pdu.PDU_HEADER.pack(pdu.A_ASSOCIATE_AC, len(body)) + body)
        assert ac.application_context_name == pdu.APPLICATION_CONTEXT
        sock.sendall(pdu.encode_release_rq())
        assert recv_pdu(sock) == (pdu.A_RELEASE_RP, bytes(4))
        assert _closed(sock)
    assert not is_storage_syntax(STUDY_ROOT_MOVE) and is_storage_syntax(CTImageStorage)


@pytest.mark.parametrize(("called", "app_context", "version", "expected"), [
    ("NOT-US", pdu.APPLICATION_CONTEXT, 1, bytes([0, 1, 1, 7])),
    (AE_TITLE, "1.2.3.9", 1, bytes([0, 1, 1, 2])),
    (AE_TITLE, pdu.APPLICATION_CONTEXT, 2, bytes([0, 1, 2, 2])),
])
def test_association_rejected(raw_scp: tuple[StorageSCP, Path, list[str]], called: str,
                              app_context: str, version: int, expected: bytes) -> None:
    scp, _, _ = raw_scp
    rq = bytearray(_rq([CT], called))
    rq[6:8] = struct.pack(">H", version)
    rq = bytearray(bytes(rq).replace(pdu.APPLICATION_CONTEXT.encode(), app_context.encode())
                   if app_context != pdu.APPLICATION_CONTEXT else rq)
    if len(rq) != 6 + pdu.PDU_HEADER.unpack(rq[:6])[1]:  # fix the lengths after the swap
        diff = len(app_context) - len(pdu.APPLICATION_CONTEXT)
        rq[2:6] = struct.pack(">I", pdu.PDU_HEADER.unpack(rq[:6])[1] + diff)
        at = 6 + 68
        rq[at + 2:at + 4] = struct.pack(">H", len(app_context))
    with socket.create_connection(scp.address, timeout=10) as sock:
        sock.sendall(rq)
        assert recv_pdu(sock) == (pdu.A_ASSOCIATE_RJ, expected)
        assert _closed(sock)


def test_store_over_raw_socket_and_release(raw_scp: tuple[StorageSCP, Path, list[str]]
                                           ) -> None:
    scp, spool, wanted = raw_scp
    uid = generate_uid()
    wanted.append(uid)
    data = b"\x08\x00\x18\x00" + struct.pack("<I", len(uid) + len(uid) % 2) + \
        uid.encode() + b"\x00" * (len(uid) % 2) + b"\x55" * 100_000
    sock, _ = _connect(scp)
    with sock:
        sock.sendall(_p_data(1, _store_rq(uid), command=True, last=True))
        for i in range(0, len(data), 30_000):  # several PDUs
            sock.sendall(_p_data(1, data[i:i + 30_000], command=False,
                                 last=i + 30_000 >= len(data)))
        pdu_type, body = recv_pdu(sock)
        assert pdu_type == pdu.P_DATA_TF
        cmd = dimse.decode(body[6:])
        assert dimse.us(cmd, dimse.COMMAND_FIELD) == dimse.C_STORE_RSP
        assert dimse.us(cmd, dimse.STATUS) == 0 and dimse.us(cmd, dimse.RESPONDED_TO) == 7
        assert dimse.ui(cmd, dimse.AFFECTED_SOP_INSTANCE) == uid
        sock.sendall(pdu.encode_release_rq())
        assert recv_pdu(sock) == (pdu.A_RELEASE_RP, bytes(4))
        assert _closed(sock)
    raw = (spool / f"{uid}.dcm").read_bytes()
    assert raw.endswith(data) and raw[128:132] == b"DICM"


def _partial(scp: StorageSCP, wanted: list[str]) -> socket.socket:
    uid = generate_uid()
    wanted.append(uid)
    sock, _ = _connect(scp)
    sock.sendall(_p_data(1, _store_rq(uid), command=True, last=True))
    sock.sendall(_p_data(1, b"\x00" * 50_000, command=False, last=False))
    return sock


def test_abort_mid_data_set_leaves_no_file(raw_scp: tuple[StorageSCP, Path, list[str]]
                                           ) -> None:
    scp, spool, wanted = raw_scp
    with _partial(scp, wanted) as sock:
        time.sleep(0.2)
        assert len(list(scp.root.iterdir())) == 1  # the temp file while it arrives
        sock.sendall(pdu.encode_abort())
        assert _wait_idle(scp) < 1
    assert list(scp.root.iterdir()) == [] and list(spool.iterdir()) == []


def test_stalled_peer_aborted_within_the_timeout(raw_scp: tuple[StorageSCP, Path, list[str]]
                                                 ) -> None:
    scp, spool, wanted = raw_scp
    with _partial(scp, wanted) as sock:
        start = time.monotonic()
        assert recv_pdu(sock)[0] == pdu.A_ABORT
        assert _closed(sock)
        assert 0.8 < time.monotonic() - start < 3  # timeout=1
    _wait_idle(scp)
    assert list(scp.root.iterdir()) == [] and list(spool.iterdir()) == []


def test_silent_connection_closed_within_the_timeout(
        raw_scp: tuple[StorageSCP, Path, list[str]]) -> None:
    scp, _, _ = raw_scp
    with socket.create_connection(scp.address, timeout=10) as sock:
        start = time.monotonic()
        assert _closed(sock)
        assert time.monotonic() - start < 3


@pytest.mark.parametrize("garbage", [
    b"\x09\x00\x00\x00\x00\x04abcd",  # unknown PDU type
    pdu.PDU_HEADER.pack(pdu.A_ASSOCIATE_RQ, 10) + bytes(10),  # too short
    "after-association",
])
def test_garbage_pdu_aborts(raw_scp: tuple[StorageSCP, Path, list[str]],
                            garbage: bytes | str) -> None:
    scp, _, _ = raw_scp
    if garbage == "after-association":
        sock, _ = _connect(scp)
        sock.sendall(_p_data(1, b"\x00" * 10, command=False, last=True))  # no command
    else:
        assert isinstance(garbage, bytes)
        sock = socket.create_connection(scp.address, timeout=10)
        sock.sendall(garbage)
    with sock:
        assert recv_pdu(sock)[0] == pdu.A_ABORT
        assert _closed(sock)
    _wait_idle(scp)


def test_associations_bounded(raw_scp: tuple[StorageSCP, Path, list[str]]) -> None:
    scp, _, _ = raw_scp
    first, _ = _connect(scp)
    second, _ = _connect(scp)
    with first, second, socket.create_connection(scp.address, timeout=10) as third:
        third.sendall(_rq([CT]))
        assert recv_pdu(third) == (pdu.A_ASSOCIATE_RJ, bytes([0, 2, 3, 2]))
        first.sendall(pdu.encode_release_rq())
        assert recv_pdu(first)[0] == pdu.A_RELEASE_RP
    _wait_idle(scp)
    again, _ = _connect(scp)
    again.close()


def test_stale_temp_files_removed_at_start(tmp_path: Path) -> None:
    (tmp_path / ".0123.part").write_bytes(b"x")
    (tmp_path / "keep.dcm").write_bytes(b"x")
    scp = StorageSCP(AE_TITLE, 0, tmp_path, lambda u, p: 0, lambda u: True,
                     host="127.0.0.1")
    scp.start()
    scp.shutdown()
    assert [p.name for p in tmp_path.iterdir()] == ["keep.dcm"]


def test_threads_do_not_pile_up(raw_scp: tuple[StorageSCP, Path, list[str]]) -> None:
    scp, _, _ = raw_scp
    before = threading.active_count()
    for _ in range(5):
        sock, _ = _connect(scp)
        with sock:
            sock.sendall(pdu.encode_release_rq())
            assert recv_pdu(sock)[0] == pdu.A_RELEASE_RP
    _wait_idle(scp)
    time.sleep(0.1)
    assert threading.active_count() <= before


# -- the acceptor-side PDU codec -------------------------------------------------------------

def test_decode_associate_rq_round_trip() -> None:
    contexts = [CT, ProposedContext(3, dimse.VERIFICATION, (ImplicitVRLittleEndian,
                                                            ExplicitVRLittleEndian))]
    raw = pdu.encode_associate_rq("CALLED", "CALLING", contexts, max_pdu_length=32768,
                                  implementation_uid="1.2.3", implementation_version="V1",
                                  scp_roles=[CTImageStorage])
    rq = pdu.decode_associate_rq(raw[6:])
    assert (rq.called_ae, rq.calling_ae, rq.application_context) == \
        ("CALLED", "CALLING", pdu.APPLICATION_CONTEXT)
    assert rq.contexts == tuple(contexts)
    assert (rq.max_pdu_length, rq.implementation_uid, rq.implementation_version) == \
        (32768, "1.2.3", "V1")
    assert rq.roles == {CTImageStorage: (False, True)}


def test_decode_associate_rq_from_pynetdicom() -> None:
    from pynetdicom.pdu import A_ASSOCIATE_RQ as PnRq
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = pdu.APPLICATION_CONTEXT
    primitive.calling_ae_title = "ORTHANC"
    primitive.called_ae_title = AE_TITLE
    cx = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    cx.context_id = 11
    primitive.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 12345
    primitive.user_information = [ml]
    rq_pdu = PnRq()
    rq_pdu.from_primitive(primitive)
    raw = rq_pdu.encode()
    rq = pdu.decode_associate_rq(raw[6:])
    assert rq.called_ae == AE_TITLE and rq.calling_ae == "ORTHANC"
    assert rq.contexts == (ProposedContext(11, CTImageStorage, (ExplicitVRLittleEndian,)),)
    assert rq.max_pdu_length == 12345


def _set_context_id(raw: bytes, cid: int) -> bytes:
    at = 68 + 4 + len(pdu.APPLICATION_CONTEXT)
    assert raw[at] == 0x20 and raw[at + 4] == 1
    return raw[:at + 4] + bytes([cid]) + raw[at + 5:]


@pytest.mark.parametrize("mutate", [
    lambda b: b[:60],  # shorter than the fixed part
    lambda b: b[:-3],  # an item runs past the PDU
    lambda b: _set_context_id(b, 2),  # even id
])
def test_decode_associate_rq_malformed(mutate: object) -> None:
    raw = _rq([CT])[6:]
    assert callable(mutate)
    bad = mutate(raw)
    assert bad != raw
    with pytest.raises(PduError):
        pdu.decode_associate_rq(bad)


def test_decode_associate_rq_without_application_context() -> None:
    raw = bytearray(_rq([CT])[6:])
    assert raw[68] == 0x10
    n = struct.unpack(">H", raw[70:72])[0]
    with pytest.raises(PduError):
        pdu.decode_associate_rq(bytes(raw[:68] + raw[72 + n:]))


def test_encode_associate_rj() -> None:
    raw = pdu.encode_associate_rj(1, 1, 7)
    assert raw == b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x07"
    assert pdu.describe_reject(raw[6:]) == "permanent, source service-user, reason 7"
