"""The built-in C-FIND SCU (gateway.dicom.cfind) against a scripted peer on loopback:
matches decoded, identifiers split over PDUs, a failure status with its comment, an abort,
and a stall answered with PacsError in bounded time."""

from __future__ import annotations

import socket
import time
from io import BytesIO

import pytest
from pydicom import Dataset
from pynetdicom.dsutils import decode, encode

from gateway.dicom.errors import PacsError
from gateway.dicom.find import build_query, find
from gateway.dicom.ul import command, pdu
from tests.unit.test_dicom_cget import _stall, accept, p_data, peer, recv_pdu, release

FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def find_rsp(status: int, *, data: bool, comment: str = "") -> bytes:
    elements: dict[int, int | str] = {
        command.AFFECTED_SOP_CLASS: FIND, command.COMMAND_FIELD: 0x8020,
        command.RESPONDED_TO: 1, command.DATA_SET_TYPE: 0x0000 if data else 0x0101,
        command.STATUS: status}
    if comment:
        elements[0x0902] = comment
    return command.encode(elements)


def match(uid: str) -> bytes:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.SOPInstanceUID = uid
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    raw = encode(ds, True, True)
    assert raw is not None
    return raw


def read_query(sock: socket.socket) -> Dataset:
    """The C-FIND-RQ's identifier (implicit LE: context 1 as `accept` answers it)."""
    data = b""
    while True:
        pdu_type, body = recv_pdu(sock)
        assert pdu_type == pdu.P_DATA_TF
        length, cid, mch = pdu.PDV_HEADER.unpack_from(body)
        assert cid == 1
        if mch & 1:
            assert command.us(command.decode(body[6:]), command.COMMAND_FIELD) == 0x0020
            continue
        data += body[6:4 + length]
        if mch & 2:
            return decode(BytesIO(data), True, True)


def test_matches_are_decoded() -> None:
    queries: list[Dataset] = []

    def script(sock: socket.socket) -> None:
        accept(sock)
        queries.append(read_query(sock))
        for uid in ("1.2.3.1", "1.2.3.2"):
            sock.sendall(p_data(1, find_rsp(0xFF00, data=True), is_command=True, last=True))
            raw = match(uid)
            sock.sendall(p_data(1, raw[:10], is_command=False, last=False)
                         + p_data(1, raw[10:], is_command=False, last=True))
        sock.sendall(p_data(1, find_rsp(0x0000, data=False), is_command=True, last=True))
        release(sock)

    with peer(script) as (pacs, errors):
        found = find(pacs, "IMAGE", {"StudyInstanceUID": "1.2.3",
                                     "SOPInstanceUID": ["1.2.3.1", "1.2.3.2"]})
    assert errors == []
    assert [str(d.SOPInstanceUID) for d in found] == ["1.2.3.1", "1.2.3.2"]
    assert queries[0] == build_query("IMAGE", {"StudyInstanceUID": "1.2.3",
                                               "SOPInstanceUID": ["1.2.3.1", "1.2.3.2"]})


@pytest.mark.parametrize(("ending", "kind", "words"), [
    (lambda s: s.sendall(p_data(1, find_rsp(0xC001, data=False, comment="no such key"),
                                is_command=True, last=True)),
     "failed", "C-FIND failed with status 0xC001: no such key"),
    (lambda s: s.sendall(pdu.encode_abort(2, 1)), "aborted", "aborted the association"),
    (lambda s: s.sendall(b"\x09\x00\x00\x00\x00\x00"), "aborted", "unknown PDU type"),
    (_stall, "timeout", "no data from the PACS"),
])
def test_failures_are_pacs_errors_in_bounded_time(ending, kind: str, words: str) -> None:  # type: ignore[no-untyped-def]
    def script(sock: socket.socket) -> None:
        accept(sock)
        read_query(sock)
        sock.sendall(p_data(1, find_rsp(0xFF00, data=True), is_command=True, last=True)
                     + p_data(1, match("1.2.3.1"), is_command=False, last=True))
        ending(sock)
        _stall(sock)

    start = time.monotonic()
    with peer(script) as (pacs, _errors), pytest.raises(PacsError) as info:
        find(pacs, "IMAGE", {"StudyInstanceUID": "1.2.3"}, timeout=1)
    assert info.value.kind == kind
    assert words in info.value.message
    assert time.monotonic() - start < 5
