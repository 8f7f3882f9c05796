"""Audit records of each transaction (gateway.security.audit.events and .messages)."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

import pytest
from lxml import etree

from gateway.ebrim.model import AdhocQuery, DocumentRequest, RetrieveDocumentSetRequest, Slot
from gateway.ebrim.render import (
    render_adhoc_query_request,
    render_adhoc_query_response,
    render_registry_response,
    render_retrieve_document_set_request,
)
from gateway.ebrim.xmlsafe import parse_xml
from gateway.errors import XdsError
from gateway.ns import XDSB, XDSI, ErrorCode, ResponseStatus, StoredQuery, q
from gateway.security.audit import events, messages

NODE = events.Node("urn:oid:1.2.3", "gw.example.org", "4242", "SITE-1")
PEER = events.Peer("http://consumer.example.org/reply", "10.0.0.7", "CN=consumer,O=Test")
PID = "P0924175725.3^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
NIST_SINGLE = "iti-41/nist/ReposAcceptanceTest-1111_SubmitSingleDoc_single_doc.xml"


def parsed(msg: messages.AuditMessage) -> etree._Element:
    data = messages.render(msg)
    assert b"\n" not in data  # one syslog MSG, one line
    return messages.parse(data)


def code(el: etree._Element | None) -> tuple[str | None, str | None, str | None]:
    assert el is not None
    return el.get("csd-code"), el.get("codeSystemName"), el.get("originalText")


def participants(root: etree._Element) -> dict[str, etree._Element]:
    out = {}
    for ap in root.findall("ActiveParticipant"):
        role = ap.find("RoleIDCode")
        out[(role.get("csd-code") or "") if role is not None else "human"] = ap
    return out


def objects(root: etree._Element) -> list[etree._Element]:
    return root.findall("ParticipantObjectIdentification")


def query_body(pid: str = PID) -> etree._Element:
    return render_adhoc_query_request(AdhocQuery(StoredQuery.FIND_DOCUMENTS, (
        Slot("$XDSDocumentEntryPatientId", (f"'{pid}'",)),
        Slot("$XDSDocumentEntryStatus",
             ("('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')",)))))


def test_iti18_answered_by_the_registry() -> None:
    body = query_body()
    response = render_adhoc_query_response(ResponseStatus.SUCCESS, (), ())
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
    root = parsed(events.answered_event(
        "ITI-18", "Registry Stored Query", node=NODE, endpoint_url="https://gw/xds/registry",
        requestor=PEER, request=body, response=response, when=when))
    ev = root.find("EventIdentification")
    assert ev is not None
    assert ev.get("EventActionCode") == "E"
    assert ev.get("EventOutcomeIndicator") == "0"
    assert ev.get("EventDateTime") == "2026-01-02T03:04:05.678Z"
    assert code(ev.find("EventID")) == ("110112", "DCM", "Query")
    assert code(ev.find("EventTypeCode")) == ("ITI-18", "IHE Transactions",
                                              "Registry Stored Query")
    parts = participants(root)
    src, dst = parts["110153"], parts["110152"]
    assert src.get("UserID") == PEER.user_id and src.get("UserIsRequestor") == "true"
    assert src.get("NetworkAccessPointID") == "10.0.0.7"
    assert src.get("NetworkAccessPointTypeCode") == "2"
    assert src.get("UserName") == "CN=consumer,O=Test"
    assert dst.get("UserID") == "https://gw/xds/registry"
    assert dst.get("UserIsRequestor") == "false"
    assert dst.get("AlternativeUserID") == "4242"
    assert dst.get("NetworkAccessPointTypeCode") == "1"  # a machine name
    src_id = root.find("AuditSourceIdentification")
    assert src_id is not None and src_id.get("AuditSourceID") == "urn:oid:1.2.3"
    assert src_id.get("AuditEnterpriseSiteID") == "SITE-1"
    patient, query = objects(root)
    assert (patient.get("ParticipantObjectTypeCode"),
            patient.get("ParticipantObjectTypeCodeRole")) == ("1", "1")
    assert patient.get("ParticipantObjectID") == PID
    assert code(patient.find("ParticipantObjectIDTypeCode"))[0] == "2"
    assert (query.get("ParticipantObjectTypeCode"),
            query.get("ParticipantObjectTypeCodeRole")) == ("2", "24")
    assert query.get("ParticipantObjectID") == StoredQuery.FIND_DOCUMENTS
    assert code(query.find("ParticipantObjectIDTypeCode")) == (
        "ITI-18", "IHE Transactions", "Registry Stored Query")
    q_text = query.findtext("ParticipantObjectQuery")
    assert q_text is not None
    decoded = parse_xml(base64.b64decode(q_text))
    assert etree.QName(decoded).localname == "AdhocQueryRequest"
    assert f"'{PID}'" in list(decoded.itertext())
    detail = query.find("ParticipantObjectDetail")
    assert detail is not None and detail.get("type") == "QueryEncoding"
    assert base64.b64decode(detail.get("value") or "") == b"UTF-8"


def test_failure_and_partial_success_outcomes() -> None:
    failure = render_adhoc_query_response(
        ResponseStatus.FAILURE, (), (XdsError(ErrorCode.UNKNOWN_STORED_QUERY, "x"),))
    assert events.outcome_of(failure) == 8
    partial = render_registry_response(ResponseStatus.PARTIAL_SUCCESS, ())
    assert events.outcome_of(partial) == 4
    assert events.outcome_of(render_registry_response(ResponseStatus.SUCCESS, ())) == 0
    assert events.outcome_of(None) == 8
    root = parsed(events.answered_event(
        "ITI-18", "Registry Stored Query", node=NODE, endpoint_url="u", requestor=PEER,
        request=query_body(), response=None, outcome=12))
    assert root.find("EventIdentification").get("EventOutcomeIndicator") == "12"  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        messages.render(messages.AuditMessage(messages.QUERY, "E", 3, messages.QUERY, (), "x"))


@pytest.mark.parametrize("transaction", ["ITI-41", "ITI-42"])
def test_submissions_are_imports_with_patient_and_submission_set(
        transaction: str, conformance: Path) -> None:
    body = parse_xml((conformance / "messages" / NIST_SINGLE).read_bytes())
    root = parsed(events.answered_event(
        transaction, "x", node=NODE, endpoint_url="u", requestor=PEER, request=body,
        response=render_registry_response(ResponseStatus.SUCCESS, ())))
    ev = root.find("EventIdentification")
    assert ev is not None
    assert code(ev.find("EventID")) == ("110107", "DCM", "Import")
    assert ev.get("EventActionCode") == "C"
    parts = participants(root)
    assert parts["110153"].get("UserID") == PEER.user_id  # the submitter is the source
    patient, subset = objects(root)
    assert patient.get("ParticipantObjectID") == PID
    assert (subset.get("ParticipantObjectTypeCode"),
            subset.get("ParticipantObjectTypeCodeRole")) == ("2", "20")
    assert code(subset.find("ParticipantObjectIDTypeCode"))[0] == (
        "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd")
    assert subset.get("ParticipantObjectID") == events.submission_set_unique_ids(body)[0]
    assert subset.get("ParticipantObjectID")


def test_iti43_answered_is_an_export_to_the_consumer() -> None:
    body = render_retrieve_document_set_request(RetrieveDocumentSetRequest((
        DocumentRequest("1.2.3.4", "1.2.3.4.100", "urn:oid:1.2.3"),
        DocumentRequest("1.2.3.4", "1.2.3.4.101"))))
    root = parsed(events.answered_event(
        "ITI-43", "Retrieve Document Set", node=NODE, endpoint_url="https://gw/xds/repository",
        requestor=PEER, request=body, response=None, outcome=0))
    ev = root.find("EventIdentification")
    assert ev is not None
    assert code(ev.find("EventID")) == ("110106", "DCM", "Export")
    assert ev.get("EventActionCode") == "R"
    parts = participants(root)
    # the repository sends the documents: it is the Source, the consumer the Destination
    assert parts["110153"].get("UserID") == "https://gw/xds/repository"
    assert parts["110153"].get("UserIsRequestor") == "false"
    assert parts["110152"].get("UserID") == PEER.user_id
    assert parts["110152"].get("UserIsRequestor") == "true"
    docs = objects(root)
    assert [d.get("ParticipantObjectID") for d in docs] == ["1.2.3.4.100", "1.2.3.4.101"]
    assert all((d.get("ParticipantObjectTypeCode"), d.get("ParticipantObjectTypeCodeRole"))
               == ("2", "3") for d in docs)
    details = {d.get("type"): base64.b64decode(d.get("value") or "")
               for d in docs[0].findall("ParticipantObjectDetail")}
    assert details == {"Repository Unique Id": b"1.2.3.4", "ihe:homeCommunityID": b"urn:oid:1.2.3"}


def rad69_body() -> etree._Element:
    root = etree.Element(q(XDSI, "RetrieveImagingDocumentSetRequest"),
                         nsmap={"xdsi": XDSI, "xdsb": XDSB})
    for study, sops in (("1.2.840.1", ["1.2.840.1.1.1", "1.2.840.1.1.2"]),
                        ("1.2.840.2", ["1.2.840.2.1.1"])):
        sr = etree.SubElement(root, q(XDSI, "StudyRequest"), studyInstanceUID=study)
        ser = etree.SubElement(sr, q(XDSI, "SeriesRequest"), seriesInstanceUID=study + ".1")
        for sop in sops:
            dr = etree.SubElement(ser, q(XDSB, "DocumentRequest"))
            etree.SubElement(dr, q(XDSB, "RepositoryUniqueId")).text = "1.2.3.20"
            etree.SubElement(dr, q(XDSB, "DocumentUniqueId")).text = sop
    tsl = etree.SubElement(root, q(XDSI, "TransferSyntaxUIDList"))
    etree.SubElement(tsl, q(XDSI, "TransferSyntaxUID")).text = "1.2.840.10008.1.2.1"
    return root


def test_rad69_answered_is_instances_transferred_with_studies() -> None:
    root = parsed(events.answered_event(
        "RAD-69", "Retrieve Imaging Document Set", node=NODE, endpoint_url="u",
        requestor=PEER, request=rad69_body(), response=None, outcome=0))
    ev = root.find("EventIdentification")
    assert ev is not None
    assert code(ev.find("EventID")) == ("110104", "DCM", "DICOM Instances Transferred")
    assert code(ev.find("EventTypeCode"))[0] == "RAD-69"
    studies = objects(root)
    assert [s.get("ParticipantObjectID") for s in studies] == ["1.2.840.1", "1.2.840.2"]
    assert all(code(s.find("ParticipantObjectIDTypeCode")) ==
               ("110180", "DCM", "Study Instance UID") for s in studies)
    assert all((s.get("ParticipantObjectTypeCode"), s.get("ParticipantObjectTypeCodeRole"))
               == ("2", "3") for s in studies)


def test_sent_records_flip_to_the_requesting_side() -> None:
    query = parsed(events.sent_event(
        "ITI-38", "Cross Gateway Query", node=NODE, endpoint_url="https://other/xca",
        request=query_body(), response=None, outcome=0))
    ev = query.find("EventIdentification")
    assert ev is not None and code(ev.find("EventID"))[0] == "110112"
    parts = participants(query)
    assert parts["110153"].get("UserIsRequestor") == "true"
    assert parts["110153"].get("AlternativeUserID") == "4242"
    assert parts["110152"].get("UserID") == "https://other/xca"
    retrieve = parsed(events.sent_event(
        "RAD-75", "Cross Gateway Retrieve Imaging Document Set", node=NODE,
        endpoint_url="https://other/xcai", request=rad69_body(), response=None, outcome=0))
    ev = retrieve.find("EventIdentification")
    assert ev is not None
    assert code(ev.find("EventID")) == ("110103", "DCM", "DICOM Instances Accessed")
    assert participants(retrieve)["110153"].get("UserID") == "https://other/xcai"
    export = parsed(events.sent_event(
        "ITI-41", "Provide and Register Document Set-b", node=NODE, endpoint_url="u",
        request=None, response=None, outcome=8))
    assert code(export.find("EventIdentification/EventID"))[0] == "110106"
    with pytest.raises(KeyError):
        events.sent_event("ITI-99", "x", node=NODE, endpoint_url="u", request=None,
                          response=None)


class FakeCoded:
    def __init__(self, code: str, code_system: str, display_name: str):
        self.code, self.code_system, self.display_name = code, code_system, display_name


class FakeXuaSubject:
    name_id = "dr.house"
    issuer = "https://idp.example.org"
    subject_id = "Gregory House"
    roles = (FakeCoded("46255001", "2.16.840.1.113883.6.96", "Pharmacist"),)
    purposes_of_use = (FakeCoded("TREATMENT", "2.16.840.1.113883.3.18.7.1", "Treatment"),)


def test_human_requestor_from_the_xua_subject() -> None:
    human = events.human_requestor_of(FakeXuaSubject())
    assert human is not None
    root = parsed(events.answered_event(
        "ITI-18", "Registry Stored Query", node=NODE, endpoint_url="u", requestor=PEER,
        request=query_body(), response=None, outcome=0, human=human))
    people = [ap for ap in root.findall("ActiveParticipant")
              if ap.get("UserID") == "dr.house"]
    assert len(people) == 1
    person = people[0]
    assert person.get("UserIsRequestor") == "true"
    assert person.get("UserName") == "<dr.house@https://idp.example.org>"
    assert person.get("AlternativeUserID") == "Gregory House"
    assert code(person.find("RoleIDCode")) == ("46255001", "2.16.840.1.113883.6.96",
                                               "Pharmacist")
    assert code(root.find("EventIdentification/PurposeOfUse"))[0] == "TREATMENT"
    # the system requestor is no longer the only requestor; still Source
    assert root.findall("ActiveParticipant")[0].find("RoleIDCode").get(  # type: ignore[union-attr]
        "csd-code") == "110153"
    assert events.human_requestor_of(None) is None
    assert events.human_requestor_of("plain-name-id") == events.HumanRequestor("plain-name-id")


def test_hostile_values_still_make_a_well_formed_record() -> None:
    pid = "EVIL<&>'\"\u202e^^^&1.2&ISO"
    root = parsed(events.answered_event(
        "ITI-18", "Registry Stored Query", node=NODE, endpoint_url="u",
        requestor=events.Peer("x\x00y"), request=query_body(pid), response=None, outcome=0))
    patient = objects(root)[0]
    assert patient.get("ParticipantObjectID") == pid
    assert participants(root)["110153"].get("UserID") == "x\ufffdy"  # no NUL in XML
    # a body that is no query at all still gives a record with the query object
    junk = etree.fromstring(b"<x:Junk xmlns:x='urn:junk'><x:a/></x:Junk>")
    root = parsed(events.answered_event(
        "ITI-18", "Registry Stored Query", node=NODE, endpoint_url="u", requestor=PEER,
        request=junk, response=None, outcome=8))
    assert [o.get("ParticipantObjectTypeCodeRole") for o in objects(root)] == ["24"]
