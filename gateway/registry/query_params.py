"""Stored query parameter values (ITI TF-2a 3.18.4.1.2.3.5) and their checking.

A parameter is an rim:Slot named `$Name` whose Values are either a single value (a quoted
string `'text'` or a bare number `20040101`) or a parenthesised list `('a', 'b')`. In a
quoted string a single quote is written doubled (`''`) or backslash-escaped (`\\'`).
Several Value elements of one Slot are ORed, exactly like the members of one list; several
Slots with the same name are ANDed, which only the AND/OR parameters (event code list,
confidentiality code, folder code list) allow.

`parse_value` reads one Value; `QueryParams.from_slots` checks a request's Slots against the
`Param` definitions of its query (gateway.registry.stored_queries) and raises `XdsFailure`
with XDSStoredQueryMissingParam / XDSStoredQueryParamNumber / XDSRegistryError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gateway.ebrim.model import Slot
from gateway.errors import XdsError, XdsFailure
from gateway.ns import AvailabilityStatus, ErrorCode, ObjectType


class ParamKind:
    STRING = "string"
    CODE = "code"  # code^^^codingScheme (also code^^codingScheme, HL7 CE)
    NUMBER = "number"  # bare digits or a quoted number
    TIME = "time"  # a DTM: YYYY[MM[DD[hh[mm[ss]]]]], UTC, digits only (ITI TF-3 Table 4.2.3.1.7-2)
    STATUS = "status"  # an availabilityStatus URN (short names Approved/... accepted)
    OBJECT_TYPE = "objectType"  # stable or on-demand DocumentEntry objectType
    METADATA_LEVEL = "metadataLevel"  # 1, or 2 (Metadata Update)


@dataclass(frozen=True)
class Param:
    """One parameter of a stored query."""

    name: str
    required: bool = False
    multiple: bool = False  # a list of values (ORed) is allowed
    and_or: bool = False  # several Slots of this name are ANDed
    kind: str = ParamKind.STRING


class ParamSyntaxError(ValueError):
    """A Value that is not a quoted string, a number or a parenthesised list."""


def parse_value(text: str) -> tuple[str, ...]:
    """The values written in one rim:Value: `'a'` -> ("a",), `('a','b')` -> ("a", "b")."""
    s = text.strip()
    if not s:
        raise ParamSyntaxError("empty value")
    if s[0] == "(":
        if s[-1] != ")":
            raise ParamSyntaxError("a list that opens with ( must close with )")
        inner = s[1:-1]
        items: list[str] = []
        pos = _skip_ws(inner, 0)
        if pos == len(inner):
            raise ParamSyntaxError("empty list")
        while True:
            item, pos = _scalar(inner, pos)
            items.append(item)
            pos = _skip_ws(inner, pos)
            if pos == len(inner):
                break
            if inner[pos] != ",":
                raise ParamSyntaxError(f"expected , between list members at {inner[pos:]!r}")
            pos = _skip_ws(inner, pos + 1)
        return tuple(items)
    item, pos = _scalar(s, 0)
    if pos != len(s):
        raise ParamSyntaxError(f"unexpected text after the value: {s[pos:]!r}")
    return (item,)


def _skip_ws(s: str, pos: int) -> int:
    while pos < len(s) and s[pos].isspace():
        pos += 1
    return pos


def _scalar(s: str, pos: int) -> tuple[str, int]:
    if pos >= len(s):
        raise ParamSyntaxError("missing value")
    if s[pos] == "'":
        out: list[str] = []
        i = pos + 1
        while i < len(s):
            ch = s[i]
            if ch == "\\" and i + 1 < len(s) and s[i + 1] in "'\\":
                out.append(s[i + 1])
                i += 2
                continue
            if ch == "'":
                if i + 1 < len(s) and s[i + 1] == "'":
                    out.append("'")
                    i += 2
                    continue
                return "".join(out), i + 1
            out.append(ch)
            i += 1
        raise ParamSyntaxError("a quoted string is not closed")
    end = pos
    while end < len(s) and s[end] not in ",()'" and not s[end].isspace():
        end += 1
    if end == pos:
        raise ParamSyntaxError(f"unexpected {s[pos]!r}")
    return s[pos:end], end


def parse_code(value: str) -> tuple[str, str]:
    """`code^^^scheme` (or the HL7 CE form `code^^scheme`) -> (code, scheme).

    ITI TF-2a 3.18.4.1.2.3.5: a coded parameter carries both the code and its coding scheme;
    a value without a scheme (`Dialysis`, `a^^`) is malformed, not a wildcard.
    """
    parts = value.split("^")
    code = parts[0]
    if not code:
        raise ParamSyntaxError(f"no code in {value!r}")
    if len(parts) < 3 or not parts[-1] or any(parts[1:-1]):
        raise ParamSyntaxError(f"{value!r} is not code^^^codingScheme")
    return code, parts[-1]


_SHORT_STATUS = {
    "Approved": AvailabilityStatus.APPROVED,
    "Deprecated": AvailabilityStatus.DEPRECATED,
    "Submitted": AvailabilityStatus.SUBMITTED,
}
_STATUSES = {AvailabilityStatus.APPROVED, AvailabilityStatus.DEPRECATED,
             AvailabilityStatus.SUBMITTED, *_SHORT_STATUS}
_OBJECT_TYPES = {ObjectType.STABLE_DOCUMENT_ENTRY, ObjectType.ON_DEMAND_DOCUMENT_ENTRY}
_DTM_LENGTHS = {4, 6, 8, 10, 12, 14}
# Upper bounds of month, day, hour, minute, second at their offsets in a DTM.
_DTM_FIELDS = ((4, 1, 12), (6, 1, 31), (8, 0, 23), (10, 0, 59), (12, 0, 59))


def check_dtm(value: str) -> str | None:
    """Why `value` is not an XDS DTM, or None when it is one."""
    if not value.isdigit() or len(value) not in _DTM_LENGTHS:
        return f"{value!r} is not a DTM (YYYY[MM[DD[hh[mm[ss]]]]], digits only)"
    for offset, low, high in _DTM_FIELDS:
        if len(value) > offset and not low <= int(value[offset:offset + 2]) <= high:
            return f"{value!r} is not a valid DTM (field at position {offset + 1})"
    return None


@dataclass
class QueryParams:
    """The checked parameters of one stored query request.

    `slots[name]` is the list of Slots given for `name` (ANDed), each a tuple of values
    (ORed).
    """

    slots: dict[str, list[tuple[str, ...]]] = field(default_factory=dict)

    @classmethod
    def from_slots(cls, slots: Sequence[Slot], params: Mapping[str, Param]) -> QueryParams:
        """Parse and check the request's slots; unknown parameters are ignored."""
        out: dict[str, list[tuple[str, ...]]] = {}
        errors: list[XdsError] = []
        for slot in slots:
            p = params.get(slot.name)
            if p is None:
                continue
            values: list[str] = []
            for raw in slot.values:
                try:
                    values.extend(parse_value(raw))
                except ParamSyntaxError as exc:
                    errors.append(XdsError(
                        ErrorCode.REGISTRY_ERROR,
                        f"parameter {slot.name}: not a valid value ({exc})"))
            if not slot.values:
                errors.append(XdsError(ErrorCode.STORED_QUERY_MISSING_PARAM,
                                       f"parameter {slot.name} has no value"))
            out.setdefault(slot.name, []).append(tuple(values))
        for name, given in out.items():
            p = params[name]
            if len(given) > 1 and not p.and_or:
                errors.append(XdsError(
                    ErrorCode.STORED_QUERY_PARAM_NUMBER,
                    f"parameter {name} is given {len(given)} times; it may appear once"))
            elif not p.multiple and any(len(v) > 1 for v in given):
                errors.append(XdsError(
                    ErrorCode.STORED_QUERY_PARAM_NUMBER,
                    f"parameter {name} takes a single value"))
            for group in given:
                for v in group:
                    err = _check_kind(name, p.kind, v)
                    if err is not None:
                        errors.append(err)
        for p in params.values():
            if p.required and p.name not in out:
                errors.append(XdsError(ErrorCode.STORED_QUERY_MISSING_PARAM,
                                       f"required parameter {p.name} is missing"))
        if errors:
            raise XdsFailure(errors)
        return cls(out)

    def has(self, name: str) -> bool:
        return name in self.slots

    def single(self, name: str) -> str | None:
        given = self.slots.get(name)
        return given[0][0] if given and given[0] else None

    def values(self, name: str) -> list[str]:
        """Every value of the parameter (for parameters that are not AND/OR)."""
        return [v for group in self.slots.get(name, []) for v in group]

    def groups(self, name: str) -> list[list[str]]:
        """The ANDed groups of ORed values."""
        return [list(group) for group in self.slots.get(name, [])]

    def statuses(self, name: str) -> list[str]:
        return [_SHORT_STATUS.get(v, v) for v in self.values(name)]

    def code_groups(self, name: str) -> list[list[tuple[str, str]]]:
        return [[parse_code(v) for v in group] for group in self.groups(name)]


def _check_kind(name: str, kind: str, value: str) -> XdsError | None:
    if kind == ParamKind.NUMBER and not value.isdigit():
        return XdsError(ErrorCode.REGISTRY_ERROR,
                        f"parameter {name}: {value!r} is not a number")
    if kind == ParamKind.TIME and (why := check_dtm(value)) is not None:
        return XdsError(ErrorCode.REGISTRY_ERROR, f"parameter {name}: {why}")
    if kind == ParamKind.STATUS and value not in _STATUSES:
        return XdsError(ErrorCode.REGISTRY_ERROR,
                        f"parameter {name}: {value!r} is not an availabilityStatus")
    if kind == ParamKind.OBJECT_TYPE and value not in _OBJECT_TYPES:
        return XdsError(ErrorCode.REGISTRY_ERROR,
                        f"parameter {name}: {value!r} is neither the stable nor the on-demand "
                        "DocumentEntry objectType")
    if kind == ParamKind.METADATA_LEVEL and value not in ("1", "2"):
        return XdsError(ErrorCode.REGISTRY_ERROR,
                        f"parameter {name}: {value!r} is not a metadata level (1 or 2)")
    if kind == ParamKind.CODE:
        try:
            parse_code(value)
        except ParamSyntaxError as exc:
            return XdsError(ErrorCode.REGISTRY_ERROR, f"parameter {name}: {exc}")
    if not value:
        return XdsError(ErrorCode.REGISTRY_ERROR, f"parameter {name}: empty value")
    return None
