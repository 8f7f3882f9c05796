"""DICOM Upper Layer PDUs (PS3.8 section 9.3) as bytes: encoding the few an SCU sends
(A-ASSOCIATE-RQ, P-DATA-TF, A-RELEASE-RQ/RP, A-ABORT) and decoding the association answers
(A-ASSOCIATE-AC/RJ, A-ABORT); for the acceptor side (the C-MOVE storage SCP) decoding an
A-ASSOCIATE-RQ and encoding A-ASSOCIATE-AC/RJ; and the UIDs they carry (application context,
the uncompressed transfer syntaxes). Pure: no sockets; P-DATA-TF PDUs are read by `ul.link`.

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
            max_pdu, _uid, _version = _user_information(item, roles)
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


# -- the acceptor side (the C-MOVE storage SCP, gateway.dicom.scp) --------------------------

# Presentation context results in A-ASSOCIATE-AC (PS3.8 9.3.3.2)
ACCEPTANCE = 0
USER_REJECTION = 1
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

# A-ASSOCIATE-RJ result, source and reason (PS3.8 9.3.4)
RJ_PERMANENT = 1
RJ_TRANSIENT = 2
RJ_SOURCE_USER = 1
RJ_SOURCE_ACSE = 2
RJ_SOURCE_PRESENTATION = 3
RJ_NO_REASON = 1  # source 1
RJ_APPLICATION_CONTEXT_NOT_SUPPORTED = 2  # source 1
RJ_CALLING_AE_NOT_RECOGNIZED = 3  # source 1
RJ_CALLED_AE_NOT_RECOGNIZED = 7  # source 1
RJ_PROTOCOL_VERSION_NOT_SUPPORTED = 2  # source 2
RJ_TEMPORARY_CONGESTION = 1  # source 3
RJ_LOCAL_LIMIT_EXCEEDED = 2  # source 3


@dataclass(frozen=True)
class AssociateRequest:
    """What an A-ASSOCIATE-RQ proposes. `roles`: SOP class -> (SCU role, SCP role) of its
    SCP/SCU role selection items; `protocol_version`: the 16-bit field (bit 0: version 1)."""

    called_ae: str
    calling_ae: str
    application_context: str
    contexts: tuple[ProposedContext, ...]
    max_pdu_length: int  # 0: unlimited (or no maximum length sub-item)
    implementation_uid: str
    implementation_version: str = ""
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    protocol_version: int = 1


def _user_information(item: memoryview, roles: dict[str, tuple[bool, bool]]
                      ) -> tuple[int, str, str]:
    """A user information item (0x50) of an A-ASSOCIATE-RQ or -AC: (maximum length,
    implementation class UID, implementation version name); SCP/SCU role selection
    sub-items go into `roles` (SOP class -> (SCU, SCP))."""
    max_pdu, impl_uid, impl_version = 0, "", ""
    for sub_type, sub in iter_items(item):
        if sub_type == 0x51:
            if len(sub) != 4:
                raise PduError("maximum length sub-item must be 4 bytes")
            (max_pdu,) = struct.unpack(">I", sub)
        elif sub_type == 0x52:
            impl_uid = _text(sub)
        elif sub_type == 0x54:
            if len(sub) < 2:
                raise PduError("role selection sub-item too short")
            (n,) = struct.unpack_from(">H", sub)
            if len(sub) != n + 4:
                raise PduError("role selection sub-item length mismatch")
            roles[_text(sub[2:2 + n])] = (bool(sub[2 + n]), bool(sub[3 + n]))
        elif sub_type == 0x55:
            impl_version = _text(sub)
    return max_pdu, impl_uid, impl_version


def decode_associate_rq(body: bytes) -> AssociateRequest:
    """The variable part of an A-ASSOCIATE-RQ (after the 6-byte PDU header), PS3.8 9.3.2.
    Raises PduError when the PDU is malformed (lengths, duplicate or even context ids, a
    context without an abstract syntax, no application context)."""
    if len(body) < 68:
        raise PduError("A-ASSOCIATE-RQ too short")
    (version,) = struct.unpack_from(">H", body)
    called = bytes(body[4:20]).strip(b" \x00").decode("ascii", "replace")
    calling = bytes(body[20:36]).strip(b" \x00").decode("ascii", "replace")
    app_context: str | None = None
    contexts: list[ProposedContext] = []
    seen: set[int] = set()
    max_pdu = 0
    impl_uid = impl_version = ""
    roles: dict[str, tuple[bool, bool]] = {}
    for item_type, item in iter_items(memoryview(body)[68:]):
        if item_type == 0x10:
            if app_context is not None:
                raise PduError("more than one application context item")
            app_context = _text(item)
        elif item_type == 0x20:
            if len(item) < 4:
                raise PduError("presentation context item too short")
            cid = item[0]
            if cid % 2 == 0 or cid in seen:
                raise PduError(f"presentation context id {cid} is even or repeated")
            seen.add(cid)
            abstract: str | None = None
            syntaxes: list[str] = []
            for sub_type, sub in iter_items(item[4:]):
                if sub_type == 0x30:
                    if abstract is not None:
                        raise PduError(f"context {cid} has more than one abstract syntax")
                    abstract = _text(sub)
                elif sub_type == 0x40:
                    syntaxes.append(_text(sub))
            if not abstract:
                raise PduError(f"context {cid} has no abstract syntax")
            contexts.append(ProposedContext(cid, abstract, tuple(s for s in syntaxes if s)))
        elif item_type == 0x50:
            max_pdu, impl_uid, impl_version = _user_information(item, roles)
    if app_context is None:
        raise PduError("A-ASSOCIATE-RQ without an application context")
    return AssociateRequest(called, calling, app_context, tuple(contexts), max_pdu, impl_uid,
                            impl_version, roles, version)


def encode_associate_ac(request: AssociateRequest, results: Sequence[tuple[int, int, str]],
                        *, max_pdu_length: int, implementation_uid: str,
                        implementation_version: str,
                        roles: Sequence[tuple[str, bool, bool]] = ()) -> bytes:
    """A-ASSOCIATE-AC answering `request` (PS3.8 9.3.3): one (context id, result, transfer
    syntax) per proposed context, result ACCEPTANCE with the accepted transfer syntax or
    ABSTRACT_SYNTAX_NOT_SUPPORTED / TRANSFER_SYNTAXES_NOT_SUPPORTED / USER_REJECTION (the
    syntax is then not significant; an empty one is sent as the first proposed, if any).
    The AE title fields echo the request's, as PS3.8 asks. `roles`: (SOP class, SCU, SCP)
    answers to role selection items."""
    proposed = {pc.context_id: pc for pc in request.contexts}
    items = [_item(0x10, _uid(APPLICATION_CONTEXT))]
    for cid, result, syntax in results:
        if not syntax and cid in proposed and proposed[cid].transfer_syntaxes:
            syntax = proposed[cid].transfer_syntaxes[0]
        sub = _item(0x40, _uid(syntax)) if syntax else b""
        items.append(_item(0x21, bytes([cid, 0, result, 0]) + sub))
    user = _item(0x51, struct.pack(">I", max_pdu_length))
    user += _item(0x52, _uid(implementation_uid))
    for uid, scu, scp in roles:
        raw = _uid(uid)
        user += _item(0x54, struct.pack(">H", len(raw)) + raw + bytes([int(scu), int(scp)]))
    if implementation_version:
        user += _item(0x55, implementation_version.encode("ascii"))
    items.append(_item(0x50, user))
    body = (struct.pack(">HH", 1, 0) + _ae(request.called_ae or "-")
            + _ae(request.calling_ae or "-") + bytes(32) + b"".join(items))
    return PDU_HEADER.pack(A_ASSOCIATE_AC, len(body)) + body


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 permanent / 2 transient, source 1 service-user
    / 2 ACSE / 3 presentation, and the reason/diagnostic of that source."""
    return PDU_HEADER.pack(A_ASSOCIATE_RJ, 4) + bytes([0, result, source, reason])
