"""The built-in C-MOVE SCU (gateway.dicom.cmove) against a scripted peer on real TCP: the
request it sends (Move Destination, IMAGE-level identifier per series), pending and final
responses, failure statuses per request, an abort."""

from __future__ import annotations

import socket

from gateway.dicom import cmove
from gateway.dicom.retrieve import InstanceRef
from gateway.dicom.ul import command, pdu
from tests.unit.test_dicom_cget import (
    CT,
    SERIES,
    STUDY,
    accept,
    p_data,
    peer,
    recv_message,
    release,
)

OTHER_SERIES = SERIES + ".2"
REFS = [InstanceRef(STUDY, SERIES, f"{SERIES}.{k}", CT) for k in (1, 2)] + [
    InstanceRef(STUDY, OTHER_SERIES, f"{OTHER_SERIES}.1", CT)]


def move_rsp(responded_to: int, status: int, *, data: bool = False) -> bytes:
    return command.encode({command.AFFECTED_SOP_CLASS: cmove.MOVE_MODEL,
                           command.COMMAND_FIELD: command.C_MOVE_RSP,
                           command.RESPONDED_TO: responded_to,
                           command.DATA_SET_TYPE: 0x0000 if data else 0x0101,
                           command.STATUS: status})


def test_one_request_per_series_with_the_move_destination() -> None:
    """Two series: two C-MOVE-RQs on one association, each naming our storage SCP's AE
    title; pending responses, then success for the first and 0xA702 (with a failed-instance
    data set) for the second: only the second series' instance is failed."""
    seen: list[tuple[str, bytes]] = []

    def script(sock: socket.socket) -> None:
        accept(sock)
        for status in (0x0000, 0xA702):
            data: list[bytes] = []
            rq, cid = recv_message(sock, data)
            assert cid == 1 and command.us(rq, command.COMMAND_FIELD) == command.C_MOVE_RQ
            seen.append((command.ui(rq, command.MOVE_DESTINATION), b"".join(data)))
            mid = command.us(rq, command.MESSAGE_ID)
            sock.sendall(p_data(1, move_rsp(mid, 0xFF00), is_command=True, last=True))
            sock.sendall(p_data(1, move_rsp(mid, status, data=status != 0), is_command=True,
                                last=True))
            if status != 0:  # the Failed SOP Instance UID List data set
                sock.sendall(p_data(1, b"\x08\x00\x58\x00\x02\x00\x00\x00" + b"1\x00",
                                    is_command=False, last=True))
        release(sock)

    with peer(script) as (pacs, errors):
        failed, error = cmove.run_c_move(pacs, REFS, 2)
    assert errors == [] and error is None
    assert [dest for dest, _ in seen] == [pacs.move_destination_ae_title] * 2
    assert all(b"IMAGE" in ident for _, ident in seen)
    assert SERIES.encode() in seen[0][1] and f"{SERIES}.2".encode() in seen[0][1]
    assert OTHER_SERIES.encode() in seen[1][1]
    assert failed == {f"{OTHER_SERIES}.1": "C-MOVE failed with status 0xA702"}


def test_move_destination_is_padded_as_an_ae_title() -> None:
    raw = command.c_move_rq(1, cmove.MOVE_MODEL, "XDSI-GW")  # odd length: one space added
    assert command.decode(raw)[command.MOVE_DESTINATION] == b"XDSI-GW "


def test_an_abort_is_an_association_error() -> None:
    def script(sock: socket.socket) -> None:
        accept(sock)
        recv_message(sock)
        sock.sendall(pdu.encode_abort(2, 0))

    with peer(script) as (pacs, errors):
        failed, error = cmove.run_c_move(pacs, REFS[:1], 2)
    assert errors == [] and failed == {}
    assert error is not None and error.kind == "aborted"


def test_a_whole_series_is_asked_for_at_series_level() -> None:
    """A series the request holds in full: one SERIES-level C-MOVE without a UID list; the
    other series at IMAGE level; a failed SERIES-level request names its level."""
    idents: list[bytes] = []

    def script(sock: socket.socket) -> None:
        accept(sock)
        for status in (0xA701, 0x0000):
            data: list[bytes] = []
            rq, _cid = recv_message(sock, data)
            idents.append(b"".join(data))
            mid = command.us(rq, command.MESSAGE_ID)
            sock.sendall(p_data(1, move_rsp(mid, status), is_command=True, last=True))
        release(sock)

    with peer(script) as (pacs, errors):
        failed, error = cmove.run_c_move(pacs, REFS, 2, whole_series={(STUDY, SERIES)})
    assert errors == [] and error is None
    assert b"SERIES" in idents[0] and b"\x08\x00\x18\x00" not in idents[0]  # no UID list
    assert b"IMAGE" in idents[1] and OTHER_SERIES.encode() in idents[1]
    assert failed == {f"{SERIES}.{k}": "SERIES-level C-MOVE failed with status 0xA701"
                      for k in (1, 2)}
