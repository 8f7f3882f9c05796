"""The initiating gateway's patient id cross-reference both ways (gateway.xca.patient_ids):
queries out in the community's ids, answers back in the local ids, on a CONNECT ITI-38
response from the conformance corpus and on our own SubmissionSet / Folder metadata."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from lxml import etree

from gateway.config import RemoteCommunity
from gateway.ebrim import build
from gateway.ebrim.metadata import patient_id
from gateway.ebrim.model import AdhocQuery, ExtrinsicObject, RegistryPackage, Slot
from gateway.ebrim.parse import parse_identifiable
from gateway.ebrim.render import render_adhoc_query_request, render_identifiable
from gateway.ebrim.xmlsafe import parse_xml_file
from gateway.ns import QUERY, RIM, DocumentEntryScheme, FolderScheme, ObjectType, StoredQuery, q
from gateway.xca.patient_ids import (
    localize_patient_ids,
    patient_ids_of,
    reverse_map,
    translate_patient_ids,
)

HOME = "urn:oid:1.2.3.4.3"
LOCAL = "L-1^^^&1.2.3.9&ISO"
OTHER_LOCAL = "L-2^^^&1.2.3.9&ISO"
# The patient of the CONNECT mock ITI-38 response below, in its community's terms:
CONNECT_PID = "D123401^^^&2.2&ISO"
CONNECT_SOURCE_PID = "D123402^^^&1.1&ISO"
CONNECT_RESPONSE = ("messages/iti-38/connect/responses/"
                    "ValidateQDMessageSpecVersionTest__Scenario_1_Case_1_Mock_Response.xml")


def community(pairs: dict[str, str] | None = None) -> RemoteCommunity:
    return RemoteCommunity(HOME, query_url="https://c.example/xca",
                           patient_ids=tuple(sorted((pairs or {}).items())))


def connect_objects(conformance: Path) -> list[etree._Element]:
    root = parse_xml_file(conformance / CONNECT_RESPONSE)
    rol = root.find(f".//{q(QUERY, 'AdhocQueryResponse')}/{q(RIM, 'RegistryObjectList')}")
    assert rol is not None
    return [o for o in rol if isinstance(o.tag, str)]


def entry_of(el: etree._Element) -> ExtrinsicObject:
    obj = parse_identifiable(el)
    assert isinstance(obj, ExtrinsicObject)
    return obj


# The CONNECT mock leaves Classification ids out (our strict parser refuses it): read by XPath.
def pid_of(el: etree._Element) -> str:
    found = el.xpath("rim:ExternalIdentifier[@identificationScheme=$s]/@value",
                     namespaces={"rim": RIM}, s=DocumentEntryScheme.PATIENT_ID)
    assert isinstance(found, list) and len(found) == 1
    return str(found[0])


def source_pid_of(el: etree._Element) -> str:
    found = el.xpath("rim:Slot[@name='sourcePatientId']/rim:ValueList/rim:Value/text()",
                     namespaces={"rim": RIM})
    assert isinstance(found, list) and len(found) == 1
    return str(found[0])


def other_values(el: etree._Element) -> list[tuple[str, str]]:
    return [(str(x.get("identificationScheme")), str(x.get("value")))
            for x in el.iterfind(q(RIM, "ExternalIdentifier"))
            if x.get("identificationScheme") != DocumentEntryScheme.PATIENT_ID]


# --- reverse map ------------------------------------------------------------------------------

def test_no_cross_reference_means_nothing_to_translate() -> None:
    rev = reverse_map(community())
    assert not rev.active and rev.to_local == {}


def test_reverse_map_is_the_inverse_where_unambiguous() -> None:
    rev = reverse_map(community({LOCAL: "R-1", OTHER_LOCAL: "R-2"}))
    assert rev.active and rev.to_local == {"R-1": LOCAL, "R-2": OTHER_LOCAL}


def test_two_local_ids_for_one_remote_id_need_the_query_to_decide() -> None:
    pairs = {LOCAL: "R-1", OTHER_LOCAL: "R-1"}
    assert reverse_map(community(pairs)).to_local == {}  # ambiguous: left alone
    assert reverse_map(community(pairs), [OTHER_LOCAL]).to_local == {"R-1": OTHER_LOCAL}
    assert reverse_map(community(pairs), [LOCAL, OTHER_LOCAL]).to_local == {}


# --- answers back in local ids ----------------------------------------------------------------

def test_connect_document_entry_gets_the_local_patient_id(conformance: Path) -> None:
    objects = connect_objects(conformance)
    assert pid_of(objects[0]) == CONNECT_PID
    others = other_values(objects[0])
    slots = [etree.tostring(s) for s in objects[0].iterfind(q(RIM, "Slot"))]
    done = localize_patient_ids(objects, reverse_map(community({LOCAL: CONNECT_PID}), [LOCAL]),
                                HOME)
    assert (done.translated, done.unmapped) == (1, 0)
    assert pid_of(objects[0]) == LOCAL
    assert source_pid_of(objects[0]) == CONNECT_SOURCE_PID  # the source's own id
    # nothing else moved
    assert other_values(objects[0]) == others
    assert [etree.tostring(s) for s in objects[0].iterfind(q(RIM, "Slot"))] == slots


def test_without_cross_reference_the_answer_is_untouched(conformance: Path) -> None:
    objects = connect_objects(conformance)
    before = [etree.tostring(o) for o in objects]
    done = localize_patient_ids(objects, reverse_map(community()), HOME)
    assert (done.translated, done.unmapped) == (0, 0)
    assert [etree.tostring(o) for o in objects] == before


def test_an_id_without_local_counterpart_is_left_and_logged_at_debug_only(
        conformance: Path, caplog: pytest.LogCaptureFixture) -> None:
    objects = connect_objects(conformance)
    caplog.set_level(logging.DEBUG, logger="gateway.xca.patient_ids")
    done = localize_patient_ids(objects, reverse_map(community({LOCAL: "SOMEONE-ELSE"})), HOME)
    assert (done.translated, done.unmapped) == (0, 1)
    assert pid_of(objects[0]) == CONNECT_PID
    assert caplog.records and all(r.levelno == logging.DEBUG for r in caplog.records)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "XDSDocumentEntry.patientId" in text and HOME in text
    assert "D123401" not in text and "L-1" not in text  # no patient id, even at DEBUG


def test_an_answer_already_in_local_terms_is_left_silently(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.xca.patient_ids")
    el = render_identifiable(None, build.document_entry(build.DocumentEntryValues(
        unique_id="1.2.3.5", patient_id=LOCAL, source_patient_id="S^^^&1.2&ISO",
        mime_type="text/plain", title="t", class_code=CODE, type_code=CODE, format_code=CODE,
        confidentiality_code=CODE, healthcare_facility_type_code=CODE,
        practice_setting_code=CODE, creation_time="20200101")))
    done = localize_patient_ids([el], reverse_map(community({LOCAL: "R-1"})), HOME)
    assert (done.translated, done.unmapped) == (0, 0) and caplog.records == []
    assert patient_id(entry_of(el)) == LOCAL


CODE = build.CodeValue("X", "1.2.3", "x")


def folder(pid: str) -> etree._Element:
    el = etree.Element(q(RIM, "RegistryPackage"), id="urn:uuid:f-1",
                       objectType=ObjectType.REGISTRY_PACKAGE)
    etree.SubElement(el, q(RIM, "ExternalIdentifier"), id="urn:uuid:f-1-pid",
                     registryObject="urn:uuid:f-1",
                     identificationScheme=FolderScheme.PATIENT_ID, value=pid)
    return el


def test_submission_set_and_folder_patient_ids_come_back_local() -> None:
    package, node = build.submission_set(build.SubmissionSetValues(
        unique_id="1.2.3.6", source_id="1.2.3", patient_id="R-1", content_type_code=CODE))
    objects = [render_identifiable(None, package), render_identifiable(None, node),
               folder("R-1")]
    done = localize_patient_ids(objects, reverse_map(community({LOCAL: "R-1"}), [LOCAL]), HOME)
    assert done.translated == 2
    ss = parse_identifiable(objects[0])
    assert isinstance(ss, RegistryPackage) and patient_id(ss) == LOCAL
    assert objects[2][0].get("value") == LOCAL


# --- query out, answer back -------------------------------------------------------------------

def test_round_trip_query_out_in_remote_ids_answer_back_in_local(conformance: Path) -> None:
    query = render_adhoc_query_request(AdhocQuery(
        query_id=StoredQuery.FIND_DOCUMENTS,
        parameters=(Slot("$XDSDocumentEntryPatientId", (f"'{LOCAL}'",)),)))
    c = community({LOCAL: CONNECT_PID, OTHER_LOCAL: CONNECT_PID})
    sent = translate_patient_ids(query, c)
    assert sent is not None and patient_ids_of(sent) == [CONNECT_PID]
    assert patient_ids_of(query) == [LOCAL]  # the consumer's request is not changed
    objects = connect_objects(conformance)
    localize_patient_ids(objects, reverse_map(c, patient_ids_of(query)), HOME)
    assert pid_of(objects[0]) == LOCAL
    unknown = render_adhoc_query_request(AdhocQuery(
        query_id=StoredQuery.FIND_DOCUMENTS,
        parameters=(Slot("$XDSDocumentEntryPatientId", ("'NOBODY^^^&1.2&ISO'",)),)))
    assert translate_patient_ids(unknown, c) is None  # not in the cross-reference: not asked
