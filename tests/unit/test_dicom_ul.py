"""The built-in DICOM Upper Layer codec (gateway.dicom.ul): PDUs and DIMSE command sets,
checked against pynetdicom's and pydicom's independent decoders/encoders, and the Part 10
header the built-in C-GET writes, byte for byte as pynetdicom's chunked receive writes it."""

from __future__ import annotations

import io
import socket
import struct

import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, decode
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF

from gateway.dicom.cget import file_meta_header, proposed_contexts
from gateway.dicom.ul import command, pdu
from gateway.dicom.ul.pdu import PduError, ProposedContext

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG = "1.2.840.10008.1.2.4.50"


def test_associate_rq_decodes_with_pynetdicom() -> None:
    contexts = proposed_contexts([CT, MR], [EXPLICIT_LE, JPEG])
    raw = pdu.encode_associate_rq("ORTHANC", "XDSI-GW", contexts, max_pdu_length=1 << 20,
                                  implementation_uid="1.2.826.0.1.3680043.9.3811.3.0.4",
                                  implementation_version="XDSI_1", scp_roles=[CT, MR])
    assert struct.unpack(">I", raw[2:6])[0] == len(raw) - 6
    rq = A_ASSOCIATE_RQ()
    rq.decode(raw)
    assert rq.called_ae_title == "ORTHANC" and rq.calling_ae_title == "XDSI-GW"
    assert rq.application_context_name == pdu.APPLICATION_CONTEXT
    got = [(c.context_id, str(c.abstract_syntax), [str(t) for t in c.transfer_syntax])
           for c in rq.presentation_context]
    assert got == [(c.context_id, c.abstract_syntax, list(c.transfer_syntaxes))
                   for c in contexts]
    assert [c.context_id for c in contexts] == [1, 3, 5, 7, 9]
    subs = rq.user_information.user_data
    user = {type(i).__name__: i for i in subs}
    assert user["MaximumLengthSubItem"].maximum_length_received == 1 << 20
    roles = [i for i in subs if type(i).__name__ == "SCP_SCU_RoleSelectionSubItem"]
    assert {(str(r.uid), r.scu_role, r.scp_role) for r in roles} == {(CT, 0, 1), (MR, 0, 1)}


def test_at_most_128_contexts() -> None:
    with pytest.raises(ValueError):
        proposed_contexts([f"1.2.3.{k}" for k in range(64)], [EXPLICIT_LE, JPEG])


def _ac(items: bytes) -> bytes:
    return bytes(68) + items


def _item(t: int, body: bytes) -> bytes:
    return struct.pack(">BxH", t, len(body)) + body


def test_associate_ac_accepted_contexts_max_length_and_roles() -> None:
    proposed = [ProposedContext(1, "1.2.3", (EXPLICIT_LE,)),
                ProposedContext(3, CT, (EXPLICIT_LE,)), ProposedContext(5, CT, (JPEG,))]
    body = _ac(_item(0x10, pdu.APPLICATION_CONTEXT.encode())
               + _item(0x21, bytes([1, 0, 0, 0]) + _item(0x40, EXPLICIT_LE.encode()))
               + _item(0x21, bytes([3, 0, 0, 0]) + _item(0x40, EXPLICIT_LE.encode() + b"\0"))
               + _item(0x21, bytes([5, 0, 4, 0]) + _item(0x40, JPEG.encode()))  # refused
               + _item(0x50, _item(0x51, struct.pack(">I", 16384))
                       + _item(0x54, struct.pack(">H", len(CT)) + CT.encode() + b"\0\1")))
    ac = pdu.decode_associate_ac(body, proposed)
    assert ac.contexts == {1: EXPLICIT_LE, 3: EXPLICIT_LE}
    assert ac.max_pdu_length == 16384
    assert ac.roles == {CT: (False, True)}


@pytest.mark.parametrize("body", [
    bytes(10),  # too short
    _ac(struct.pack(">BxH", 0x21, 400) + bytes(4)),  # item longer than the PDU
    _ac(_item(0x50, _item(0x51, b"\0\0"))),  # maximum length not 4 bytes
    _ac(_item(0x21, bytes([1, 0, 0, 0]) + _item(0x40, JPEG.encode()))),  # not proposed
])
def test_malformed_associate_ac_is_a_pdu_error(body: bytes) -> None:
    with pytest.raises(PduError):
        pdu.decode_associate_ac(body, [ProposedContext(1, CT, (EXPLICIT_LE,))])


def test_reject_and_abort_in_words() -> None:
    assert pdu.describe_reject(bytes([0, 1, 1, 7])) == (
        "permanent, source service-user, reason 7")
    assert "reason 3" in pdu.describe_abort(bytes([0, 0, 2, 3]))
    with pytest.raises(PduError):
        pdu.describe_reject(b"\0")


@pytest.mark.parametrize(("size", "max_pdu", "count"), [
    (0, 16384, 1), (100, 16384, 1), (16378, 16384, 1), (16379, 16384, 2),
    (50_000, 16384, 4), (50_000, 0, 1)])
def test_p_data_fragments_within_the_peer_maximum(size: int, max_pdu: int, count: int) -> None:
    payload = bytes(k & 0xFF for k in range(size))
    pdus = list(pdu.encode_p_data(7, payload, command=False, max_pdu_length=max_pdu))
    assert len(pdus) == count
    joined = b""
    for k, raw in enumerate(pdus):
        if max_pdu:
            assert len(raw) - 6 <= max_pdu
        decoded = P_DATA_TF()
        decoded.decode(raw)
        (item,) = decoded.presentation_data_value_items
        cid, data = item.presentation_context_id, item.presentation_data_value
        assert cid == 7
        assert data[0] == (2 if k == count - 1 else 0)  # last-fragment bit, data set
        joined += data[1:]
    assert joined == payload


def test_command_sets_decode_with_pynetdicom() -> None:
    rsp = decode(io.BytesIO(command.c_store_rsp(42, CT, "1.2.3.45", 0xA900)), True, True)
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8001, 42, 0xA900)
    assert (rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID) == (CT, "1.2.3.45")
    assert rsp.CommandDataSetType == 0x0101
    raw = command.c_get_rq(7, "1.2.840.10008.5.1.4.1.2.2.3")
    rq = decode(io.BytesIO(raw), True, True)
    assert (rq.CommandField, rq.MessageID, rq.Priority) == (0x0010, 7, 0)
    assert rq.CommandGroupLength == len(raw) - 12
    assert rq.CommandDataSetType != 0x0101
    parsed = command.decode(raw)
    assert command.us(parsed, command.MESSAGE_ID) == 7
    assert command.ui(parsed, command.AFFECTED_SOP_CLASS) == "1.2.840.10008.5.1.4.1.2.2.3"


@pytest.mark.parametrize("raw", [b"\0\0\0", b"\x00\x00\x00\x01\x04\x00\x00\x00abc",
                                 b"\x00\x00\x00\x01\xff\x00\x00\x00ab"])
def test_malformed_command_set_is_a_pdu_error(raw: bytes) -> None:
    with pytest.raises(PduError):
        command.decode(raw)


def test_elements_of_other_groups_are_ignored() -> None:
    # DCMTK (Orthanc) appends (0008,0058) Failed SOP Instance UID List to a failed C-GET-RSP
    raw = command.c_get_rq(3, CT) + struct.pack("<HHI", 8, 0x58, 8) + b"1.2.3.4\0"
    assert command.us(command.decode(raw), command.MESSAGE_ID) == 3


def test_missing_command_element_is_a_pdu_error() -> None:
    with pytest.raises(PduError):
        command.us(command.decode(command.c_get_rq(1, CT)), command.STATUS)


@pytest.mark.parametrize("sop", ["1.2.3.4", "1.2.3.45",
                                 "1.2.840.113619.2.55.3.604688119.868.1234567890.123"])
@pytest.mark.parametrize("syntax", [EXPLICIT_LE, JPEG, "1.2.840.10008.1.2"])
def test_file_meta_header_matches_pynetdicom(sop: str, syntax: str) -> None:
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, create_file_meta(sop_class_uid=UID(CT), sop_instance_uid=UID(sop),
                                               transfer_syntax=UID(syntax)))
    assert file_meta_header(CT, sop, syntax) == buf.getvalue()


class _RecordingSocket(socket.socket):
    """A TCP socket that records its setsockopt calls (in order, with its receives)."""

    log: list[object]

    def setsockopt(self, *args: object) -> None:  # type: ignore[override]
        self.log.append(("setsockopt", *args))
        super().setsockopt(*args)  # type: ignore[arg-type]

    def recv_into(self, *args: object, **kw: object) -> int:  # type: ignore[override]
        self.log.append("recv")
        return super().recv_into(*args, **kw)  # type: ignore[arg-type]


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="Linux only")
def test_every_receive_is_acknowledged_at_once() -> None:
    """TCP_QUICKACK before each receive: a PACS with Nagle's algorithm on must not wait for
    a delayed acknowledgement of its small first segment (gateway.dicom.ul.link._fill)."""
    from gateway.dicom.ul.link import Link

    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    raw, _addr = listener.accept()
    sock = _RecordingSocket(fileno=raw.detach())
    sock.log = []
    try:
        link = Link(sock, "test", 5)
        peer.sendall(pdu.PDU_HEADER.pack(pdu.P_DATA_TF, 4))
        assert link.pdu_header() == (pdu.P_DATA_TF, 4)
        peer.sendall(b"abcd")
        assert link.read(4) == b"abcd"
        quickack = ("setsockopt", socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        assert sock.log == [quickack, "recv", quickack, "recv"]
    finally:
        for s in (sock, peer, listener):
            s.close()
