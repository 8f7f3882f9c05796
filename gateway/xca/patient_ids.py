"""Patient identifier cross-reference of the Initiating Gateway, both ways.

The consumers of our affinity domain query with our patient ids; each remote community knows
the patient under its own id. `[[communities]] patient_id_map / patient_ids`
(gateway.config.RemoteCommunity.patient_ids: local CX -> that community's CX) is the
cross-reference; an empty one means the community uses our ids (a shared or national id).

- Outbound (ITI-18 -> ITI-38): `translate_patient_ids` rewrites the query's patient
  parameters into the community's ids; a community whose cross-reference does not list the
  patient is not asked.
- Inbound (ITI-38 answers -> the consumer's ITI-18 answer): `localize_patient_ids` rewrites the
  patientId of every returned DocumentEntry, SubmissionSet and Folder (the ExternalIdentifiers
  XDSDocumentEntry.patientId, XDSSubmissionSet.patientId, XDSFolder.patientId) back into the
  local id the consumer asked with, so that the merged answer speaks one patient id, the
  affinity domain's. The sourcePatientId slot is the document source's own id and is left
  alone, as are the objects' ids and everything else.

What the ITI TF says, and what this follows: the Initiating Gateway "services the stored query
by initiating transactions with a selected set of Responding Gateways" (ITI TF-2a 3.18.2) and,
with the XDS Affinity Domain Option, stands for the remote communities before the local
Document Consumers (ITI TF-1 18.2.1), which know only their affinity domain's patient ids. XCA
leaves how a community's patient id is found outside the profile (a cross-reference agreed
between communities, XCPD, PIX), and ITI-38 answers carry the responding community's patientId
(ITI TF-2b 3.38: the Responding Gateway answers as its registry would). Answering the local
consumer in the local id is therefore the Initiating Gateway's part of that cross-reference;
the TF text found does not spell out the reverse mapping word for word, so this is the
reading, not a quotation.

A returned id the cross-reference cannot map back (unknown, or two local ids map to it and the
query did not say which) is left as it came, and logged at DEBUG without the id: patient ids
never go to the log.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lxml import etree

from gateway.config import RemoteCommunity
from gateway.ns import RIM, DocumentEntryScheme, FolderScheme, SubmissionSetScheme, q

log = logging.getLogger(__name__)

PATIENT_PARAMETERS = frozenset({
    "$XDSDocumentEntryPatientId", "$XDSSubmissionSetPatientId", "$XDSFolderPatientId",
    "$patientId",
})

# identificationScheme -> the attribute's name (for the DEBUG log, never the value)
PATIENT_ID_SCHEMES = {
    DocumentEntryScheme.PATIENT_ID: "XDSDocumentEntry.patientId",
    SubmissionSetScheme.PATIENT_ID: "XDSSubmissionSet.patientId",
    FolderScheme.PATIENT_ID: "XDSFolder.patientId",
}


# --- query parameters -------------------------------------------------------------------------

def unquote(value: str) -> tuple[str, str, str]:
    """"('X')" -> ("('", "X", "')"): the value and what wraps it."""
    text = value.strip()
    head = tail = ""
    if text.startswith("(") and text.endswith(")"):
        head, tail, text = "(", ")", text[1:-1].strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        head, tail, text = head + "'", "'" + tail, text[1:-1]
    return head, text, tail


def query_slots(request: etree._Element) -> list[etree._Element]:
    """The rim:Slot parameters of an AdhocQueryRequest's AdhocQuery."""
    aq = request.find(q(RIM, "AdhocQuery"))
    return [] if aq is None else list(aq.iterfind(q(RIM, "Slot")))


def slot_values(slot: etree._Element) -> list[etree._Element]:
    return list(slot.iterfind(f"{q(RIM, 'ValueList')}/{q(RIM, 'Value')}"))


def patient_ids_of(request: etree._Element) -> list[str]:
    """The patient ids named by the query's patient parameters."""
    return [unquote(v.text or "")[1] for s in query_slots(request)
            if s.get("name") in PATIENT_PARAMETERS for v in slot_values(s)]


# --- outbound: local -> remote ----------------------------------------------------------------

def translate_patient_ids(request: etree._Element, community: RemoteCommunity
                          ) -> etree._Element | None:
    """A copy of the AdhocQueryRequest with the patient ids in `community`'s terms; None when
    the community has a cross-reference that does not list a patient of the query."""
    out = copy.deepcopy(request)
    mapping = dict(community.patient_ids)
    if not mapping:
        return out
    for slot in query_slots(out):
        if slot.get("name") not in PATIENT_PARAMETERS:
            continue
        for value in slot_values(slot):
            head, cx, tail = unquote(value.text or "")
            remote = mapping.get(cx)
            if remote is None:
                return None
            value.text = f"{head}{remote}{tail}"
    return out


# --- inbound: remote -> local -----------------------------------------------------------------

@dataclass(frozen=True)
class ReverseMap:
    """How one community's patient ids read in our affinity domain.

    `to_local`: remote CX -> local CX, only where that is unambiguous (the query's own pairs
    first: the consumer asked with that local id). `local_ids`: every local id of the
    cross-reference (an answer already in our terms is left alone, silently). `active`: False
    when the community has no cross-reference (it uses our ids: nothing to translate).
    """

    to_local: Mapping[str, str]
    local_ids: frozenset[str]
    active: bool


NO_REVERSE = ReverseMap({}, frozenset(), active=False)


def reverse_map(community: RemoteCommunity, asked: Iterable[str] = ()) -> ReverseMap:
    """The reverse of `community`'s cross-reference for a query that named the local patient
    ids `asked`."""
    pairs = community.patient_ids
    if not pairs:
        return NO_REVERSE
    candidates: dict[str, set[str]] = {}
    for local, remote in pairs:
        candidates.setdefault(remote.strip(), set()).add(local.strip())
    forward = {local.strip(): remote.strip() for local, remote in pairs}
    asked_by_remote: dict[str, set[str]] = {}
    for local in asked:
        mapped = forward.get(local.strip())
        if mapped is not None:
            asked_by_remote.setdefault(mapped, set()).add(local.strip())
    to_local: dict[str, str] = {}
    for remote, locals_ in candidates.items():
        chosen = asked_by_remote.get(remote) or locals_
        if len(chosen) == 1:
            to_local[remote] = next(iter(chosen))
    return ReverseMap(to_local, frozenset(forward), active=True)


@dataclass
class Localized:
    """What `localize_patient_ids` did: ids rewritten, and ids left as they came."""

    translated: int = 0
    unmapped: int = 0


def _owner_id(ext: etree._Element) -> str:
    parent = ext.getparent()
    owner = ext.get("registryObject") or (parent.get("id") if parent is not None else None)
    return owner or "(no id)"


def localize_patient_ids(objects: Sequence[etree._Element], reverse: ReverseMap,
                         home: str) -> Localized:
    """Rewrite, in place, the patientId ExternalIdentifiers of `objects` (returned by
    community `home`) into local ids. The sourcePatientId slot is not touched."""
    done = Localized()
    if not reverse.active:
        return done
    tag = q(RIM, "ExternalIdentifier")
    for obj in objects:
        if not isinstance(obj.tag, str):
            continue
        for ext in obj.iter(tag):
            scheme = ext.get("identificationScheme")
            if scheme not in PATIENT_ID_SCHEMES:
                continue
            value = (ext.get("value") or "").strip()
            local = reverse.to_local.get(value)
            if local is not None:
                if local != ext.get("value"):
                    ext.set("value", local)
                done.translated += 1
            elif value not in reverse.local_ids:
                done.unmapped += 1
                log.debug("ITI-38 answer of community %s: the %s of %s has no local "
                          "patient id in the cross-reference; left as returned",
                          home, PATIENT_ID_SCHEMES[scheme], _owner_id(ext))
    return done


__all__ = [
    "NO_REVERSE",
    "PATIENT_ID_SCHEMES",
    "PATIENT_PARAMETERS",
    "Localized",
    "ReverseMap",
    "localize_patient_ids",
    "patient_ids_of",
    "query_slots",
    "reverse_map",
    "slot_values",
    "translate_patient_ids",
    "unquote",
]
