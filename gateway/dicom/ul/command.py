"""DIMSE command sets (PS3.7 section 9.3, group 0000, always implicit VR little endian):
encoding the C-GET-RQ, C-MOVE-RQ and C-STORE-RSP an SCU sends and decoding the C-STORE-RQ,
C-GET-RSP and C-MOVE-RSP it receives (and the C-ECHO-RSP of the C-MOVE storage SCP). Pure
and small: a command set is a few elements, so a dict of element number -> raw value is all
a receive loop needs."""

from __future__ import annotations

import struct
from collections.abc import Mapping

from gateway.dicom.ul.pdu import PduError

# (0000,eeee) elements we read or write, by element number
GROUP_LENGTH = 0x0000
AFFECTED_SOP_CLASS = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
RESPONDED_TO = 0x0120
PRIORITY = 0x0700
DATA_SET_TYPE = 0x0800
STATUS = 0x0900
AFFECTED_SOP_INSTANCE = 0x1000
MOVE_DESTINATION = 0x0600

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_GET_RQ = 0x0010
C_GET_RSP = 0x8010
C_MOVE_RQ = 0x0021
C_MOVE_RSP = 0x8021
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
NO_DATA_SET = 0x0101
VERIFICATION = "1.2.840.10008.1.1"  # the Verification SOP class (C-ECHO)

_US = frozenset({COMMAND_FIELD, MESSAGE_ID, RESPONDED_TO, PRIORITY, DATA_SET_TYPE, STATUS,
                 0x1020, 0x1021, 0x1022, 0x1023})
_ELEMENT = struct.Struct("<HHI")
MAX_COMMAND_SET = 1 << 16  # a command set is a few hundred bytes; more is a broken peer


def _value(element: int, value: int | str) -> bytes:
    if element in _US:
        return struct.pack("<H", int(value))
    raw = str(value).encode("ascii")
    pad = b" " if element == MOVE_DESTINATION else b"\x00"  # AE pads with a space, UI NUL
    return raw + pad if len(raw) % 2 else raw


def encode(elements: Mapping[int, int | str]) -> bytes:
    """A command set from element number -> value (US as int, UI as str), group length
    first and elements in ascending order."""
    body = b"".join(_ELEMENT.pack(0, el, len(v)) + v
                    for el, v in ((el, _value(el, elements[el])) for el in sorted(elements)
                                  if el != GROUP_LENGTH))
    return _ELEMENT.pack(0, GROUP_LENGTH, 4) + struct.pack("<I", len(body)) + body


def decode(data: bytes) -> dict[int, bytes]:
    """Element number -> raw value of the group 0000 elements of a command set."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        if pos + 8 > len(data):
            raise PduError("truncated command element")
        group, element, length = _ELEMENT.unpack_from(data, pos)
        pos += 8
        if pos + length > len(data):
            raise PduError("malformed command set")
        if group == 0:  # DCMTK appends e.g. (0008,0058) to a failed C-GET-RSP: ignore it
            out[element] = data[pos:pos + length]
        pos += length
    return out


def us(cmd: Mapping[int, bytes], element: int) -> int:
    raw = cmd.get(element)
    if raw is None or len(raw) != 2:
        raise PduError(f"command element (0000,{element:04X}) missing or not US")
    value: int = struct.unpack("<H", raw)[0]
    return value


def ui(cmd: Mapping[int, bytes], element: int) -> str:
    raw = cmd.get(element)
    if raw is None:
        raise PduError(f"command element (0000,{element:04X}) missing")
    return raw.rstrip(b"\x00 ").decode("ascii", "replace")


def c_get_rq(message_id: int, sop_class: str) -> bytes:
    return encode({AFFECTED_SOP_CLASS: sop_class, COMMAND_FIELD: C_GET_RQ,
                   MESSAGE_ID: message_id, PRIORITY: 0, DATA_SET_TYPE: 0x0000})


def c_move_rq(message_id: int, sop_class: str, destination: str) -> bytes:
    return encode({AFFECTED_SOP_CLASS: sop_class, COMMAND_FIELD: C_MOVE_RQ,
                   MESSAGE_ID: message_id, MOVE_DESTINATION: destination, PRIORITY: 0,
                   DATA_SET_TYPE: 0x0000})


def c_store_rsp(responded_to: int, sop_class: str, sop_instance: str, status: int) -> bytes:
    return encode({AFFECTED_SOP_CLASS: sop_class, COMMAND_FIELD: C_STORE_RSP,
                   RESPONDED_TO: responded_to, DATA_SET_TYPE: NO_DATA_SET, STATUS: status,
                   AFFECTED_SOP_INSTANCE: sop_instance})


def c_echo_rsp(responded_to: int, status: int = 0x0000) -> bytes:
    return encode({AFFECTED_SOP_CLASS: VERIFICATION, COMMAND_FIELD: C_ECHO_RSP,
                   RESPONDED_TO: responded_to, DATA_SET_TYPE: NO_DATA_SET, STATUS: status})
