"""The SOAP edge emits one audit record per answered transaction (ITI-20 hook in
gateway.soap.application), and the [audit] configuration keys."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from gateway.config import ConfigError, from_dict
from gateway.ebrim.model import AdhocQuery, DocumentRequest, RetrieveDocumentSetRequest, Slot
from gateway.ebrim.render import render_adhoc_query_request, render_retrieve_document_set_request
from gateway.ns import SOAP12, WSA, Action, StoredQuery
from gateway.security.audit import AuditService, NullAudit, build_audit
from gateway.security.audit.messages import parse
from gateway.security.audit.spool import AuditSpool
from gateway.services import build_services
from gateway.soap.application import make_app
from gateway.transactions import Endpoint, RequestContext, Transaction

HOME = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.19"
PID = "AUDIT-1^^^&1.3.6.1.4.1.21367.2005.13.20.1000&ISO"


def raw_config(tmp_path: Path, **audit: Any) -> dict[str, Any]:
    return {
        "tls": {"enabled": False, "require_client_certificate": False},
        "community": {"home_community_id": HOME,
                      "repository_unique_id": "1.3.6.1.4.1.21367.2017.2.3.19",
                      "imaging_source_unique_id": "1.3.6.1.4.1.21367.2017.2.3.20",
                      "patient_id_assigning_authority": "1.3.6.1.4.1.21367.2005.13.20.1000"},
        "registry": {"database": f"sqlite:///{tmp_path / 'registry.db'}"},
        "repository": {"directory": str(tmp_path / "repository")},
        "audit": audit,
    }


# --- configuration ------------------------------------------------------------------------------

def test_audit_defaults_to_none_and_a_null_service(tmp_path: Path) -> None:
    cfg = from_dict(raw_config(tmp_path), tmp_path)
    assert cfg.audit.transport == "none"
    assert isinstance(build_audit(cfg), NullAudit)
    assert isinstance(build_services(cfg).audit, NullAudit)


def test_audit_keys_and_their_defaults(tmp_path: Path) -> None:
    cfg = from_dict(raw_config(tmp_path, transport="udp", host="audit.example.org"), tmp_path)
    assert (cfg.audit.port, cfg.audit.spool_directory) == (514, tmp_path / "var" / "audit-spool")
    cfg = from_dict(raw_config(tmp_path, transport="udp", port=6000, spool_directory="sp",
                               app_name="gw", max_spool_records=10), tmp_path)
    assert (cfg.audit.port, cfg.audit.spool_directory, cfg.audit.app_name) == (
        6000, tmp_path / "sp", "gw")


@pytest.mark.parametrize(("audit", "message"), [
    ({"transport": "syslog"}, "[audit] transport"),
    ({"transport": "udp", "port": 70000}, "[audit] port"),
    ({"transport": "udp", "host": " "}, "[audit] host"),
    ({"transport": "udp", "max_spool_records": 0}, "[audit] max_spool_records"),
    ({"transport": "udp", "app_name": "a b"}, "[audit] app_name"),
    ({"transport": "tls"}, "[audit] transport"),  # [tls] has no certificate here
    ({"enabled": True}, "[audit] enabled: unknown key"),
    ({"transport": 1}, "[audit] transport"),
])
def test_bad_audit_settings_name_the_key(tmp_path: Path, audit: dict[str, Any],
                                         message: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(raw_config(tmp_path, **audit), tmp_path)
    assert message in str(err.value)


# --- the edge hook ------------------------------------------------------------------------------

class Recorder:
    enabled = True

    def __init__(self) -> None:
        self.calls: list[tuple[Any, RequestContext, etree._Element, Any, int | None]] = []

    def record_transaction(self, transaction: Any, ctx: RequestContext,
                           request_body: etree._Element, response_body: Any,
                           outcome: int | None) -> None:
        self.calls.append((transaction, ctx, request_body, response_body, outcome))


def soap(app: Any, path: str, action: str, body: etree._Element,
         reply_to: str | None = "http://consumer.example/reply") -> tuple[int, bytes]:
    headers = f'<wsa:Action env:mustUnderstand="true">{action}</wsa:Action>' \
              "<wsa:MessageID>urn:uuid:0c6a3b0e-1111-2222-3333-444455556666</wsa:MessageID>"
    if reply_to:
        headers += f"<wsa:ReplyTo><wsa:Address>{reply_to}</wsa:Address></wsa:ReplyTo>"
    data = (f'<env:Envelope xmlns:env="{SOAP12}" xmlns:wsa="{WSA}"><env:Header>{headers}'
            f"</env:Header><env:Body>{etree.tostring(body).decode()}</env:Body>"
            "</env:Envelope>").encode()
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": "",
        "CONTENT_TYPE": "application/soap+xml; charset=UTF-8",
        "CONTENT_LENGTH": str(len(data)), "wsgi.input": io.BytesIO(data),
        "wsgi.url_scheme": "https", "HTTP_HOST": "gw.example:8443", "SERVER_NAME": "gw",
        "SERVER_PORT": "8443", "REMOTE_ADDR": "192.0.2.10", "wsgi.errors": io.StringIO(),
        "xdsi.client_subject": "CN=consumer",
    }
    status: list[str] = []
    out = b"".join(app(environ, lambda s, h, e=None: status.append(s)))
    return int(status[0].split()[0]), out


def query(pid: str = PID, query_id: str = StoredQuery.FIND_DOCUMENTS) -> etree._Element:
    return render_adhoc_query_request(AdhocQuery(query_id, (
        Slot("$XDSDocumentEntryPatientId", (f"'{pid}'",)),
        Slot("$XDSDocumentEntryStatus",
             ("('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')",)))))


@pytest.fixture
def edge(tmp_path: Path) -> tuple[Any, Recorder]:
    services = build_services(from_dict(raw_config(tmp_path), tmp_path))
    recorder = Recorder()
    services.audit = recorder  # type: ignore[assignment]
    return make_app(services), recorder


def test_success_is_recorded_after_the_handler_with_who_asked(edge: tuple[Any, Recorder]) -> None:
    app, recorder = edge
    status, _ = soap(app, "/xds/registry", Action.ITI18, query())
    assert status == 200
    (transaction, ctx, request, response, outcome), = recorder.calls
    assert transaction.name == "ITI-18"
    assert outcome is None and response is not None  # read from the response status
    assert etree.QName(request).localname == "AdhocQueryRequest"
    assert ctx.reply_to == "http://consumer.example/reply"
    assert ctx.client_address == "192.0.2.10"
    assert ctx.endpoint_url == "https://gw.example:8443/xds/registry"
    assert ctx.client_subject == "CN=consumer"


def test_xds_failure_and_faults_are_recorded(edge: tuple[Any, Recorder]) -> None:
    app, recorder = edge
    soap(app, "/xds/registry", Action.ITI18, query(query_id="urn:uuid:no-such-query"))
    *_, response, outcome = recorder.calls[-1]
    assert outcome is None and response.get("status", "").endswith("Failure")
    # a body the handler cannot use at all
    soap(app, "/xds/repository", Action.ITI43, etree.Element("{urn:x}Junk"))
    assert len(recorder.calls) == 2
    # a transaction without a handler: a Receiver fault, still recorded
    unbuilt = Transaction("ITI-39", "Cross Gateway Retrieve", Action.ITI39,
                          Action.ITI39_RESPONSE, None)
    app = make_app(app.services, endpoints=[Endpoint("/test/unbuilt", "Unbuilt",
                                                     "xca-responding.wsdl", (unbuilt,))])
    body = render_retrieve_document_set_request(
        RetrieveDocumentSetRequest((DocumentRequest("1.2.3", "1.2.3.4"),)))
    status, _ = soap(app, "/test/unbuilt", Action.ITI39, body)
    assert status == 500
    transaction, _ctx, _req, response, outcome = recorder.calls[-1]
    assert transaction.name == "ITI-39" and response is None and outcome == 12


def test_an_audit_failure_never_breaks_the_answer(edge: tuple[Any, Recorder]) -> None:
    app, recorder = edge

    def broken(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("disk full")

    recorder.record_transaction = broken  # type: ignore[method-assign]
    status, body = soap(app, "/xds/registry", Action.ITI18, query())
    assert status == 200 and b"AdhocQueryResponse" in body


def test_the_real_service_spools_the_record(tmp_path: Path) -> None:
    cfg = from_dict(raw_config(tmp_path, transport="udp", port=9), tmp_path)
    services = build_services(cfg)
    audit = services.audit
    assert isinstance(audit, AuditService)
    audit.close()  # keep the record in the spool: no sender
    status, _ = soap(make_app(services), "/xds/registry", Action.ITI18, query())
    assert status == 200
    spool = AuditSpool(cfg.audit.spool_directory or tmp_path)
    (_, payload), = spool.oldest(10)
    header, _, xml = payload.partition(b" <AuditMessage")
    assert header.startswith(b"<85>1 ") and b" xdsi-gateway " in header
    assert b" IHE+RFC-3881 - " in header + b" "
    root = parse(b"<AuditMessage" + xml)
    assert root.find("EventIdentification/EventID").get("csd-code") == "110112"  # type: ignore[union-attr]
    ids = [o.get("ParticipantObjectID") for o in root.findall("ParticipantObjectIdentification")]
    assert ids == [PID, StoredQuery.FIND_DOCUMENTS]


def test_outbound_records_and_a_full_spool(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    cfg = from_dict(raw_config(tmp_path, transport="udp", port=9, max_spool_records=1),
                    tmp_path)
    audit = build_audit(cfg, start=False)
    assert isinstance(audit, AuditService)
    audit.record_outbound("ITI-38", endpoint_url="https://other.example/xca",
                          request_body=query(), response_body=None, outcome=0,
                          human="dr.who")
    (_, payload), = audit.spool.oldest(5)
    root = parse(payload[payload.index(b"<AuditMessage"):])
    assert root.find("EventIdentification/EventTypeCode").get("csd-code") == "ITI-38"  # type: ignore[union-attr]
    users = [ap.get("UserID") for ap in root.findall("ActiveParticipant")]
    assert users[1:] == ["dr.who", "https://other.example/xca"]
    caplog.set_level("WARNING", logger="gateway.audit")
    audit.record_outbound("ITI-38", endpoint_url="u", request_body=query(),
                          response_body=None, outcome=0)  # the spool holds one: dropped
    assert audit.spool.count() == 1 and audit.dropped == 1
    assert "audit spool" in caplog.text and "full" in caplog.text
    assert "AUDIT-1" not in caplog.text  # no patient id in the log
