"""DICOM Upper Layer PDUs (PS3.8 section 9.3) as bytes: encoding the few an SCU sends
(A-ASSOCIATE-RQ, P-DATA-TF, A-RELEASE-RQ/RP, A-ABORT) and decoding the association answers
(A-ASSOCIATE-AC/RJ, A-ABORT), and the UIDs they carry (application context, the
uncompressed transfer syntaxes). Pure: no sockets; P-DATA-TF PDUs are read by `ul.link`.

Every decoder checks lengths against the bytes it was given and raises `PduError` on anything
malformed, so a misbehaving peer can never make us read past a buffer or loop."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# The uncompressed transfer syntaxes our SCUs propose for their query/retrieve contexts.
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
PDU_TYPES = frozenset(range(1, 8))

PDU_HEADER = struct.Struct(">BxI")  # type, reserved, length
PDV_HEADER = struct.Struct(">IBB")  # item length, presentation context id, control header
ITEM_HEADER = struct.Struct(">BxH")  # item type, reserved, item length

_REJECT_SOURCES = {1: "service-user", 2: "service-provider (ACSE)",
                   3: "service-provider (presentation)"}


class PduError(Exception):
    """A PDU that does not follow PS3.8 (the association must then be aborted)."""


@dataclass(frozen=True)
class ProposedContext:
    context_id: int  # odd, 1-255
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class AcceptedAssociation:
    """What an A-ASSOCIATE-AC said: accepted contexts (id -> transfer syntax), the
    peer's maximum PDU length (0: unlimited) and the SCP/SCU roles it agreed to."""

    contexts: dict[int, str]
    max_pdu_length: int
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)


def _uid(value: str) -> bytes:
    # UIDs in UL items are not padded (PS3.8 9.3.2.2: trailing nulls allowed, not required)
    return value.encode("ascii")


def _item(item_type: int, body: bytes) -> bytes:
    if len(body) > 0xFFFF:
        raise PduError(f"item 0x{item_type:02X} too long")
    return ITEM_HEADER.pack(item_type, len(body)) + body


def _ae(title: str) -> bytes:
    raw = title.encode("ascii")
    if not 0 < len(raw) <= 16:
        raise PduError("AE title must be 1-16 characters")
    return raw.ljust(16, b" ")


def encode_associate_rq(called_ae: str, calling_ae: str,
                        contexts: Sequence[ProposedContext], *, max_pdu_length: int,
                        implementation_uid: str, implementation_version: str,
                        scp_roles: Sequence[str] = ()) -> bytes:
    """A-ASSOCIATE-RQ; `scp_roles`: SOP classes for which we propose the SCP role only
    (SCP/SCU role selection, PS3.7 D.3.3.4) - what C-GET needs for the storage classes."""
    items = [_item(0x10, _uid(APPLICATION_CONTEXT))]
    for pc in contexts:
        sub = _item(0x30, _uid(pc.abstract_syntax))
        sub += b"".join(_item(0x40, _uid(ts)) for ts in pc.transfer_syntaxes)
        items.append(_item(0x20, bytes([pc.context_id, 0, 0, 0]) + sub))
    user = _item(0x51, struct.pack(">I", max_pdu_length))
    user += _item(0x52, _uid(implementation_uid))
    for uid in scp_roles:
        raw = _uid(uid)
        user += _item(0x54, struct.pack(">H", len(raw)) + raw + b"\x00\x01")
    if implementation_version:
        user += _item(0x55, implementation_version.encode("ascii"))
    items.append(_item(0x50, user))
    body = (struct.pack(">HH", 1, 0) + _ae(called_ae) + _ae(calling_ae) + bytes(32)
            + b"".join(items))
    return PDU_HEADER.pack(A_ASSOCIATE_RQ, len(body)) + body


def encode_release_rq() -> bytes:
    return PDU_HEADER.pack(A_RELEASE_RQ, 4) + bytes(4)


def encode_release_rp() -> bytes:
    return PDU_HEADER.pack(A_RELEASE_RP, 4) + bytes(4)


def encode_abort(source: int = 0, reason: int = 0) -> bytes:
    return PDU_HEADER.pack(A_ABORT, 4) + bytes([0, 0, source, reason])


def encode_p_data(context_id: int, payload: bytes, *, command: bool,
                  max_pdu_length: int) -> Iterator[bytes]:
    """One DIMSE command set or data set as P-DATA-TF PDUs of one PDV each, fragmented so
    that no PDU exceeds the peer's maximum length (0: unlimited)."""
    limit = max_pdu_length - PDV_HEADER.size if max_pdu_length else len(payload) or 1
    if limit < 1:
        raise PduError(f"peer maximum PDU length {max_pdu_length} is too small")
    view = memoryview(payload)
    start = 0
    while True:
        chunk = view[start:start + limit]
        start += len(chunk)
        last = start >= len(payload)
        mch = (1 if command else 0) | (2 if last else 0)
        yield (PDU_HEADER.pack(P_DATA_TF, PDV_HEADER.size + len(chunk))
               + PDV_HEADER.pack(len(chunk) + 2, context_id, mch) + chunk)
        if last:
            return


def iter_items(data: bytes | memoryview) -> Iterator[tuple[int, memoryview]]:
    """(item type, item body) of a run of UL items, checked against the run's length."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        if pos + ITEM_HEADER.size > len(view):
            raise PduError("truncated item header")
        item_type, length = ITEM_HEADER.unpack_from(view, pos)
        pos += ITEM_HEADER.size
        if pos + length > len(view):
            raise PduError(f"item 0x{item_type:02X} runs past its PDU")
        yield item_type, view[pos:pos + length]
        pos += length


def _text(view: memoryview) -> str:
    return bytes(view).rstrip(b"\x00 ").decode("ascii", "replace")


def decode_associate_ac(body: bytes, proposed: Sequence[ProposedContext]
                        ) -> AcceptedAssociation:
    """The variable part of an A-ASSOCIATE-AC (after the 6-byte PDU header)."""
    if len(body) < 68:
        raise PduError("A-ASSOCIATE-AC too short")
    known = {pc.context_id: pc for pc in proposed}
    contexts: dict[int, str] = {}
    max_pdu = 0
    roles: dict[str, tuple[bool, bool]] = {}
    for item_type, item in iter_items(memoryview(body)[68:]):
        if item_type == 0x21:
            if len(item) < 4:
                raise PduError("presentation context item too short")
            cid, result = item[0], item[2]
            syntaxes = [_text(v) for t, v in iter_items(item[4:]) if t == 0x40]
            pc = known.get(cid)
            if result == 0 and pc is not None and syntaxes:
                if syntaxes[0] not in pc.transfer_syntaxes:
                    raise PduError(f"context {cid} accepted with a transfer syntax we did "
                                   "not propose")
                contexts[cid] = syntaxes[0]
        elif item_type == 0x50:
            for sub_type, sub in iter_items(item):
                if sub_type == 0x51:
                    if len(sub) != 4:
                        raise PduError("maximum length sub-item must be 4 bytes")
                    (max_pdu,) = struct.unpack(">I", sub)
                elif sub_type == 0x54:
                    if len(sub) < 2:
                        raise PduError("role selection sub-item too short")
                    (n,) = struct.unpack_from(">H", sub)
                    if len(sub) != n + 4:
                        raise PduError("role selection sub-item length mismatch")
                    roles[_text(sub[2:2 + n])] = (bool(sub[2 + n]), bool(sub[3 + n]))
    return AcceptedAssociation(contexts, max_pdu, roles)


def describe_reject(body: bytes) -> str:
    """A-ASSOCIATE-RJ's result/source/reason in words (no patient data in there)."""
    if len(body) != 4:
        raise PduError("A-ASSOCIATE-RJ must be 4 bytes")
    result, source, reason = body[1], body[2], body[3]
    kind = "permanent" if result == 1 else "transient"
    return (f"{kind}, source {_REJECT_SOURCES.get(source, source)}, reason {reason}")


def describe_abort(body: bytes) -> str:
    if len(body) != 4:
        return "malformed A-ABORT"
    source = {0: "service-user", 2: "service-provider"}.get(body[2], str(body[2]))
    return f"source {source}, reason {body[3]}"
