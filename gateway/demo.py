"""`xdsi-gateway demo`: a gateway on loopback with its own development PKI, exercised end to end.

It submits a sample radiology report and a KOS manifest built from pydicom's bundled CT image
with ITI-41 (MTOM) over mutual TLS, finds them with ITI-18, retrieves them with ITI-43, checks
the bytes and prints a summary. Then the imaging part (`exercise_imaging`): an embedded PACS on
loopback (`gateway.demo_pacs`: Orthanc when installed, else a pynetdicom Q/R SCP) is loaded with
sample studies, the KOS publisher (`gateway.imaging.publish`) registers one manifest per study,
and the demo plays the consumer: ITI-18 FindDocuments by modality (eventCode CT^^DCM), ITI-43
for the manifest, RAD-69 for the images it references, written to <workdir>/retrieved and
compared byte for byte with what was loaded into the PACS. Then, unless told otherwise
(`run_demo(federation=...)`), the two-community part of `gateway.demo_federation` (XCA,
XCA-I). `--serve` then keeps the gateway (and the PACS) running. The helpers here
(`write_config`, `start_gateway`, `rad69_body`, `publish_quietly`, ...) are shared with the
federation part, the tests and the benchmarks.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from lxml import etree
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file

from gateway.config import load as load_config
from gateway.demo_pacs import PATIENT_ID as PACS_PATIENT
from gateway.demo_pacs import (
    DemoPacs,
    DemoPacsError,
    dataset_bytes,
    sample_studies,
    start_demo_pacs,
)
from gateway.dicom.ul.pdu import EXPLICIT_LE, IMPLICIT_LE
from gateway.ebrim import build
from gateway.ebrim.metadata import slot_value, unique_id
from gateway.ebrim.model import (
    AdhocQuery,
    DocumentRequest,
    DocumentResponseRef,
    ExtrinsicObject,
    RetrieveDocumentSetRequest,
    Slot,
)
from gateway.ebrim.parse import parse_adhoc_query_response, parse_retrieve_document_set_response
from gateway.ebrim.render import (
    render_adhoc_query_request,
    render_retrieve_document_set_request,
    render_submit_objects_request,
)
from gateway.imaging.kos import ManifestOptions, build_manifest
from gateway.imaging.publish import PublishSummary, Selection, publish
from gateway.ns import XDSB, XDSI, XOP, Action, AvailabilityStatus, ResponseStatus, StoredQuery, q
from gateway.security.pki import DevPki, create_dev_pki
from gateway.soap.client import SoapClient, SoapReply
from gateway.transactions import Attachment

HOME = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.19"
REPOSITORY = "1.3.6.1.4.1.21367.2017.2.3.19"
IMAGING_SOURCE = "1.3.6.1.4.1.21367.2017.2.3.20"
AUTHORITY = "1.3.6.1.4.1.21367.2005.13.20.1000"
PATIENT = f"DEMO-0001^^^&{AUTHORITY}&ISO"
ORG_ROOT = "1.3.6.1.4.1.21367.2017.2.99"  # demo uniqueIds live under this root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(workdir: Path, pki: DevPki, port: int, *, workers: int = 2,
                 max_request_bytes: int = 1 << 30, max_envelope_bytes: int = 64 << 20,
                 pacs: tuple[int, str] | None = None, home: str = HOME,
                 repository: str = REPOSITORY, imaging_source: str = IMAGING_SOURCE,
                 authority: str = AUTHORITY, extra: str = "") -> Path:
    """A loopback configuration with the development PKI, in `workdir`; with `pacs`
    (DICOM port, AE title), a [pacs] section for a PACS on loopback (C-GET). `home`,
    `repository`, `imaging_source` and `authority` name the community (default: the demo's);
    `extra` is appended as is (more TOML sections)."""
    cfg = workdir / "gateway.toml"
    cfg.write_text(f"""\
# Written by `xdsi-gateway demo`: a loopback gateway with a development PKI.
[server]
host = "127.0.0.1"
port = {port}
workers = {workers}
threads = 4
max_request_bytes = {max_request_bytes}
max_envelope_bytes = {max_envelope_bytes}

[tls]
certificate = "{pki.server_cert}"
private_key = "{pki.server_key}"
ca_bundle = "{pki.ca_cert}"

[community]
home_community_id = "{home}"
repository_unique_id = "{repository}"
imaging_source_unique_id = "{imaging_source}"
patient_id_assigning_authority = "{authority}"

[registry]
database = "sqlite:///{workdir / 'var' / 'registry.db'}"

[repository]
directory = "{workdir / 'var' / 'repository'}"
""")
    if pacs is not None:
        with cfg.open("a") as fh:
            fh.write(f"""
[pacs]
host = "127.0.0.1"
port = {pacs[0]}
called_ae_title = "{pacs[1]}"
calling_ae_title = "XDSI-GW"
retrieve = "c-get"
timeout_seconds = 10
""")
    if extra:
        with cfg.open("a") as fh:
            fh.write(extra)
    return cfg


@dataclass
class RunningGateway:
    process: subprocess.Popen[bytes]
    base_url: str

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL after 15 s or on a second interrupt."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                self.process.kill()
                self.process.wait()


def start_gateway(config: Path, pki: DevPki, port: int, *, log_level: str = "WARNING",
                  timeout: float = 30.0) -> RunningGateway:
    """Start `xdsi-gateway serve` in a child process and wait until /health answers."""
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--log-level", log_level,
                             "serve", "--config", str(config)])
    running = RunningGateway(proc, f"https://127.0.0.1:{port}")
    session = requests.Session()
    session.trust_env = False
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with status {proc.returncode} at start")
            try:
                r = session.get(running.base_url + "/health", verify=str(pki.ca_cert),
                                cert=(str(pki.client_cert), str(pki.client_key)), timeout=2)
                if r.status_code == 200:
                    return running
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not answer on {running.base_url} "
                                   f"within {timeout:.0f} s")
            time.sleep(0.2)
    except BaseException:  # also KeyboardInterrupt: never leave the child behind
        running.stop()
        raise
    finally:
        session.close()


def _codes() -> dict[str, build.CodeValue]:
    return {
        "report_class": build.CodeValue("REPORTS", "1.3.6.1.4.1.19376.1.2.6.1", "Reports"),
        "image_class": build.CodeValue("IMAGES", "1.3.6.1.4.1.19376.1.2.6.1", "Images"),
        "report_type": build.CodeValue("18748-4", "2.16.840.1.113883.6.1",
                                       "Diagnostic imaging study"),
        "text_format": build.CodeValue("urn:ihe:rad:TEXT", "1.3.6.1.4.1.19376.1.2.3",
                                       "Radiology report text"),
        "kos_format": build.CodeValue("1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.2.6.1",
                                      "Key Object Selection Document"),
        "normal": build.CodeValue("N", "2.16.840.1.113883.5.25", "normal"),
        "facility": build.CodeValue("RADDX", "2.16.840.1.113883.5.10588",
                                    "Radiology diagnostics or therapeutics unit"),
        "practice": build.CodeValue("R-3027B", "SNOMED-RT", "Radiology"),
        "ct": build.CodeValue("CT", "DCM", "Computed Tomography"),
        "content": build.CodeValue("IMG", "1.3.6.1.4.1.21367.2017.3", "Imaging"),
    }


def sample_documents(workdir: Path) -> list[tuple[build.DocumentEntryValues, Path]]:
    """A plain-text report and a KOS manifest of pydicom's CT_small image, as files."""
    c = _codes()
    ct = dcmread(str(get_testdata_file("CT_small.dcm")))
    kos = build_manifest([ct], ManifestOptions(retrieve_location_uid=IMAGING_SOURCE,
                                               issuer_of_patient_id=AUTHORITY,
                                               patient_id="DEMO-0001"))
    kos_path = workdir / "manifest.dcm"
    buf = io.BytesIO()
    kos.save_as(buf, enforce_file_format=True)
    kos_path.write_bytes(buf.getvalue())
    report_path = workdir / "report.txt"
    report_path.write_text("CT HEAD WITHOUT CONTRAST\n\nFindings: no acute abnormality.\n"
                           "Impression: normal study. (xdsi-gateway demo)\n")
    stamp = time.strftime("%Y%m%d%H%M%S")
    accession = f"ACC-{stamp}^^^&{ORG_ROOT}.1&ISO^urn:ihe:iti:xds:2013:accession"
    study_ref = f"{ct.StudyInstanceUID}^^^^urn:ihe:iti:xds:2016:studyInstanceUID"
    common = {"patient_id": PATIENT, "source_patient_id": f"LOCAL-77^^^&{ORG_ROOT}.2&ISO",
              "confidentiality_code": c["normal"], "healthcare_facility_type_code":
              c["facility"], "practice_setting_code": c["practice"], "creation_time": stamp,
              "event_codes": (c["ct"],), "reference_ids": (accession, study_ref),
              "authors": (build.Author(person="^Radiologist^Demo",
                                       institutions=(f"Demo Hospital^^^^^^^^^{ORG_ROOT}",)),)}
    report = build.DocumentEntryValues(
        unique_id=f"{ORG_ROOT}.10.{stamp}.{os.getpid()}", mime_type="text/plain",
        title="CT head report", class_code=c["report_class"], type_code=c["report_type"],
        format_code=c["text_format"], **common)  # type: ignore[arg-type]
    manifest = build.DocumentEntryValues(
        unique_id=str(kos.SOPInstanceUID), mime_type="application/dicom",
        title="CT head imaging manifest", class_code=c["image_class"],
        type_code=c["report_type"], format_code=c["kos_format"],
        **common)  # type: ignore[arg-type]
    return [(report, report_path), (manifest, kos_path)]


def provide_and_register_body(entries: list[tuple[build.DocumentEntryValues, Path]],
                              set_unique_id: str, *, patient: str = PATIENT
                              ) -> tuple[etree._Element, list[Attachment]]:
    """An xds-b:ProvideAndRegisterDocumentSetRequest with one MTOM attachment per entry, its
    submission set for `patient` (the entries' patient)."""
    c = _codes()
    docs = tuple(build.document_entry(v) for v, _ in entries)
    sub = build.submission(build.SubmissionSetValues(
        unique_id=set_unique_id, source_id=ORG_ROOT, patient_id=patient,
        content_type_code=c["content"], title="xdsi-gateway demo submission"), docs)
    root = etree.Element(q(XDSB, "ProvideAndRegisterDocumentSetRequest"),
                         nsmap={"xdsb": XDSB, "xop": XOP})
    root.append(render_submit_objects_request(sub))
    attachments = []
    for i, (entry, (_values, path)) in enumerate(zip(docs, entries, strict=True)):
        cid = f"document{i}@xdsi-gateway-demo"
        doc = etree.SubElement(root, q(XDSB, "Document"), id=entry.id)
        etree.SubElement(doc, q(XOP, "Include"), href=f"cid:{cid}")
        attachments.append(Attachment(cid, path, path.stat().st_size,
                                      entry.mime_type or "application/octet-stream"))
    return root, attachments


def sha1(path: Path) -> str:
    h = hashlib.sha1()  # noqa: S324 - XDS document hash is SHA-1 by definition
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def exercise(client: SoapClient, workdir: Path, say: Callable[[str], None]) -> bool:
    """ITI-41 -> ITI-18 -> ITI-43 against a running gateway; True when every check passed."""
    entries = sample_documents(workdir)
    body, attachments = provide_and_register_body(
        entries, f"{ORG_ROOT}.20.{time.strftime('%Y%m%d%H%M%S')}.{os.getpid()}")
    reply = client.call("/xds/repository", Action.ITI41, body, attachments=attachments)
    status = reply.body.get("status") if reply.body is not None else None
    say(f"ITI-41 Provide and Register: {len(entries)} documents (report, KOS manifest) "
        f"as MTOM -> {short_status(status)}")
    if status != ResponseStatus.SUCCESS:
        say(etree.tostring(reply.envelope, pretty_print=True).decode())
        return False

    query = AdhocQuery(query_id=StoredQuery.FIND_DOCUMENTS, parameters=(
        Slot("$XDSDocumentEntryPatientId", (f"'{PATIENT}'",)),
        Slot("$XDSDocumentEntryStatus", (f"('{AvailabilityStatus.APPROVED}')",)),
    ))
    reply = client.call("/xds/registry", Action.ITI18, render_adhoc_query_request(query))
    assert reply.body is not None
    found = parse_adhoc_query_response(reply.body)
    wanted = {v.unique_id for v, _ in entries}
    found_entries = [o for o in found.objects
                     if isinstance(o, ExtrinsicObject) and unique_id(o) in wanted]
    say(f"ITI-18 FindDocuments for the demo patient -> {short_status(found.status)}, "
        f"{len(found.objects)} entries, {len(found_entries)} of ours")
    if len(found_entries) != len(entries):
        return False

    requests_ = tuple(DocumentRequest(repository_unique_id=slot_value(o, "repositoryUniqueId")
                                      or "", document_unique_id=unique_id(o) or "")
                      for o in found_entries)
    spool = Path(tempfile.mkdtemp(prefix="retrieve-", dir=workdir))
    reply = client.call("/xds/repository", Action.ITI43,
                        render_retrieve_document_set_request(
                            RetrieveDocumentSetRequest(documents=requests_)),
                        spool_dir=spool)
    assert reply.body is not None
    retrieved = parse_retrieve_document_set_response(reply.body)
    say(f"ITI-43 Retrieve Document Set (MTOM) -> {short_status(retrieved.status)}, "
        f"{len(retrieved.documents)} documents")
    ok = len(retrieved.documents) == len(entries)
    by_uid = {v.unique_id: p for v, p in entries}
    for doc in retrieved.documents:
        original = by_uid.get(doc.document_unique_id)
        path = reply.attachment_path(doc.content_id)
        same = original is not None and path is not None and sha1(original) == sha1(path)
        ok = ok and same
        size = path.stat().st_size if path else 0
        say(f"  {doc.mime_type:18} {size:7} bytes  SHA-1 "
            f"{sha1(path)[:12] if path else '-':12}…  {'identical' if same else 'DIFFERENT'}")
    shutil.rmtree(spool, ignore_errors=True)
    return ok


def rad69_body(triples: list[tuple[str, str, str]], syntaxes: tuple[str, ...],
               repository: str = IMAGING_SOURCE, home: str | None = None) -> etree._Element:
    """A RetrieveImagingDocumentSetRequest for (study, series, SOP instance) UID triples;
    with `home`, each DocumentRequest names that HomeCommunityId (XCA-I)."""
    root = etree.Element(q(XDSI, "RetrieveImagingDocumentSetRequest"),
                         nsmap={"xdsi": XDSI, "xdsb": XDSB})
    studies: dict[str, dict[str, list[str]]] = {}
    for study, series, sop in triples:
        studies.setdefault(study, {}).setdefault(series, []).append(sop)
    for study, by_series in studies.items():
        st = etree.SubElement(root, q(XDSI, "StudyRequest"), studyInstanceUID=study)
        for series, sops in by_series.items():
            se = etree.SubElement(st, q(XDSI, "SeriesRequest"), seriesInstanceUID=series)
            for sop in sops:
                d = etree.SubElement(se, q(XDSB, "DocumentRequest"))
                if home:
                    etree.SubElement(d, q(XDSB, "HomeCommunityId")).text = home
                etree.SubElement(d, q(XDSB, "RepositoryUniqueId")).text = repository
                etree.SubElement(d, q(XDSB, "DocumentUniqueId")).text = sop
    tsl = etree.SubElement(root, q(XDSI, "TransferSyntaxUIDList"))
    for ts in syntaxes:
        etree.SubElement(tsl, q(XDSI, "TransferSyntaxUID")).text = ts
    return root


def manifest_references(kos: Dataset) -> list[tuple[str, str, str]]:
    """(study, series, SOP instance) UIDs of a KOS manifest's evidence sequence."""
    triples = []
    for study in kos.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for inst in series.get("ReferencedSOPSequence", []):
                triples.append((str(study.StudyInstanceUID), str(series.SeriesInstanceUID),
                                str(inst.ReferencedSOPInstanceUID)))
    return triples


def publish_quietly(config_path: Path) -> PublishSummary:
    """`xdsi-gateway publish --all` with this configuration, its INFO lines silenced (the
    caller prints the summary line)."""
    config = load_config(config_path)
    publisher_log = logging.getLogger("gateway.imaging.publish")
    level = publisher_log.level
    publisher_log.setLevel(logging.WARNING)
    try:
        return publish(config, Selection())
    finally:
        publisher_log.setLevel(level)


def exercise_imaging(client: SoapClient, config_path: Path, pacs: DemoPacs, workdir: Path,
                     say: Callable[[str], None]) -> bool:
    """Load sample studies into the PACS, publish their KOS manifests, then as a consumer:
    ITI-18 FindDocuments by modality (CT), ITI-43 for the manifests, RAD-69 for the images,
    written to `workdir`/retrieved and compared byte for byte (dataset after the file meta
    group) with the files loaded into the PACS. True when every check passed."""
    for folder in ("samples", "retrieved"):  # this run's files only
        shutil.rmtree(workdir / folder, ignore_errors=True)
    studies = sample_studies(workdir / "samples")
    files = [f for s in studies for f in s.files]
    pacs.load(files)
    say(f"PACS: {pacs.kind} (AE {pacs.aet}, 127.0.0.1:{pacs.dicom_port}) loaded with "
        f"{len(files)} instances in {len(studies)} studies ("
        + ", ".join(f"{s.modality} x{len(s.files)}" for s in studies) + ")")

    summary = publish_quietly(config_path)
    ours = {r.study_uid: r for r in summary.results}
    say(f"KOS publisher (C-FIND, then ITI-41 to the built-in repository): {summary.line()}")
    if any(ours.get(s.study_uid) is None or ours[s.study_uid].outcome != "published"
           for s in studies):
        for r in summary.results:
            if r.outcome == "failed":
                say(f"  failed: {r.message}")
        return False

    ct = [s for s in studies if s.modality == "CT"]
    wanted = {ours[s.study_uid].manifest_uid for s in ct}
    published = {r.manifest_uid for r in summary.results}
    patient = f"{PACS_PATIENT}^^^&{AUTHORITY}&ISO"
    query = AdhocQuery(query_id=StoredQuery.FIND_DOCUMENTS, parameters=(
        Slot("$XDSDocumentEntryPatientId", (f"'{patient}'",)),
        Slot("$XDSDocumentEntryStatus", (f"('{AvailabilityStatus.APPROVED}')",)),
        Slot("$XDSDocumentEntryEventCodeList", ("('CT^^DCM')",)),
    ))
    reply = client.call("/xds/registry", Action.ITI18, render_adhoc_query_request(query))
    assert reply.body is not None
    found = parse_adhoc_query_response(reply.body)
    entries = [o for o in found.objects if isinstance(o, ExtrinsicObject)
               and unique_id(o) in published]
    say(f"ITI-18 FindDocuments eventCode CT^^DCM -> {short_status(found.status)}, "
        f"{len(entries)} of the {len(published)} manifests just published")
    if {unique_id(o) for o in entries} != wanted:
        return False

    out = workdir / "retrieved"
    out.mkdir(parents=True, exist_ok=True)
    spool = Path(tempfile.mkdtemp(prefix="retrieve-", dir=workdir))
    try:
        reply = client.call("/xds/repository", Action.ITI43,
                            render_retrieve_document_set_request(RetrieveDocumentSetRequest(
                                documents=tuple(DocumentRequest(
                                    repository_unique_id=slot_value(o, "repositoryUniqueId")
                                    or "", document_unique_id=unique_id(o) or "")
                                    for o in entries))), spool_dir=spool)
        assert reply.body is not None
        retrieved = parse_retrieve_document_set_response(reply.body)
        triples: list[tuple[str, str, str]] = []
        for doc in retrieved.documents:
            path = reply.attachment_path(doc.content_id)
            if path is None:
                return False
            kos = dcmread(str(path))
            target = out / f"manifest-{doc.document_unique_id}.dcm"
            shutil.move(str(path), target)
            triples += manifest_references(kos)
        say(f"ITI-43 Retrieve Document Set -> {short_status(retrieved.status)}, "
            f"{len(retrieved.documents)} KOS manifest(s) referencing {len(triples)} instances")
        originals = {str(dcmread(str(f), stop_before_pixels=True).SOPInstanceUID): f
                     for s in ct for f in s.files}
        if len(retrieved.documents) != len(entries) or \
                {t[2] for t in triples} != set(originals):
            return False

        reply = client.call("/xdsi/imaging-source", Action.RAD69,
                            rad69_body(triples, (EXPLICIT_LE, IMPLICIT_LE)), spool_dir=spool)
        assert reply.body is not None
        images = parse_retrieve_document_set_response(reply.body)
        say(f"RAD-69 Retrieve Imaging Document Set (C-GET from the PACS, MTOM) -> "
            f"{short_status(images.status)}, {len(images.documents)} instances, "
            f"written to {out}")
        for error in images.errors:
            say(f"  {error.code}: {error.context}")
        ok = len(images.documents) == len(originals)
        for doc in images.documents:
            ok = save_instance(reply, doc, out, originals, say) and ok
        return ok
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def save_instance(reply: SoapReply, doc: DocumentResponseRef, out: Path,
                  originals: Mapping[str, Path], say: Callable[[str], None]) -> bool:
    """One retrieved instance of a RAD-69 `reply` moved to `out`/<uid>.dcm and compared, data
    set for data set, with the file loaded into the PACS (`originals` by SOP Instance UID);
    says its line; whether it is the same."""
    path = reply.attachment_path(doc.content_id)
    original = originals.get(doc.document_unique_id)
    target = out / f"{doc.document_unique_id}.dcm"
    if path is not None:
        shutil.move(str(path), target)
    same = path is not None and original is not None and \
        dataset_bytes(target) == dataset_bytes(original)
    say("  " + instance_line(target if path is not None else None, same))
    return same


def instance_line(path: Path | None, same: bool) -> str:
    """`CT Image Storage, Explicit VR Little Endian, 39214 bytes: byte-exact`."""
    if path is None:
        return "(no MTOM part): DIFFERENT"
    ds = dcmread(str(path), stop_before_pixels=True)
    return (f"{ds.SOPClassUID.name}, {ds.file_meta.TransferSyntaxUID.name}, "
            f"{path.stat().st_size} bytes, {path.name[-24:]}: "
            + ("byte-exact" if same else "DIFFERENT"))


def short_status(status: str | None) -> str:
    return (status or "no status").rsplit(":", 1)[-1]


def _say(line: str) -> None:
    print(line, flush=True)  # stdout may be a pipe: each line is news to whoever reads it


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


FEDERATION_CHOICES = ("also", "only", "no")


def run_demo(workdir: Path | None = None, port: int = 0, keep_serving: bool = False,
             federation: str = "also") -> int:
    """Run the demo; with `keep_serving`, serve until SIGINT or SIGTERM (then exit 0).

    `federation`: "also" runs the two-community part (`gateway.demo_federation`) after the
    single-community one, "only" runs it alone, "no" skips it. `keep_serving` keeps the
    single-community gateway (not with "only").

    Both signals are handled like Ctrl-C, so the gateway child is always stopped on the way
    out. SIGINT is installed explicitly too: a process started in the background by a
    non-interactive shell inherits SIGINT ignored, and Python then never turns it into
    KeyboardInterrupt.
    """
    if federation not in FEDERATION_CHOICES:
        raise ValueError(f"federation: expected one of {FEDERATION_CHOICES}")
    if keep_serving and federation == "only":
        raise ValueError("keep_serving keeps the single-community gateway: not with "
                         "federation='only'")
    own_workdir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="xdsi-demo-")) if workdir is None else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _interrupt)
    try:
        if federation == "only":
            return _run_federation_only(workdir, own_workdir)
        return _run(workdir, own_workdir, port or free_port(), keep_serving,
                    federation == "also")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _federation(workdir: Path, pki: DevPki) -> bool:
    """The two-community part, in `workdir`/federation; failures to start are reported."""
    from gateway.demo_federation import run_federation

    _say("Federation: two communities; a consumer in A finds and retrieves B's studies "
         "(XCA, XCA-I)")
    try:
        return run_federation(workdir / "federation", pki, lambda line: _say("  " + line))
    except (DemoPacsError, RuntimeError, OSError, requests.RequestException) as exc:
        _say(f"  the federation did not run: {exc}")
        return False


def _run_federation_only(workdir: Path, own_workdir: bool) -> int:
    try:
        pki = create_dev_pki(workdir / "pki")
        _say(f"xdsi-gateway demo: work folder {workdir}")
        _say(f"  development PKI (never for production) in {workdir / 'pki'}")
        ok = _federation(workdir, pki)
        _say("demo: " + ("all checks passed" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(workdir: Path, own_workdir: bool, port: int, keep_serving: bool,
         federation: bool) -> int:
    pki = create_dev_pki(workdir / "pki")
    _say(f"xdsi-gateway demo: work folder {workdir}")
    _say(f"  development PKI (never for production) in {workdir / 'pki'}")
    shutil.rmtree(workdir / "pacs", ignore_errors=True)  # a fresh PACS on every run
    try:
        pacs = start_demo_pacs(workdir / "pacs")
    except DemoPacsError as exc:
        _say(f"demo: FAILED: the embedded PACS did not start: {exc}")
        return 1
    try:
        _say(f"  embedded PACS: {pacs.kind} on 127.0.0.1:{pacs.dicom_port} "
             f"(AE {pacs.aet}, pid {pacs.pid})")
        config = write_config(workdir, pki, port, pacs=(pacs.dicom_port, pacs.aet))
        gateway = start_gateway(config, pki, port)
        _say(f"  gateway serving on {gateway.base_url} (mutual TLS, pid {gateway.process.pid})")
        client = SoapClient(gateway.base_url, ca_bundle=pki.ca_cert,
                            certificate=pki.client_cert, private_key=pki.client_key)
        try:
            _say("Documents: a report and a KOS manifest")
            ok = exercise(client, workdir, lambda line: _say("  " + line))
            _say("Imaging: PACS -> KOS manifests -> consumer")
            try:
                ok = exercise_imaging(client, config, pacs, workdir,
                                      lambda line: _say("  " + line)) and ok
            except DemoPacsError as exc:
                _say(f"  the embedded PACS failed: {exc}")
                ok = False
            if federation:
                ok = _federation(workdir, pki) and ok
            _say("demo: " + ("all checks passed" if ok else "FAILED"))
            if keep_serving and ok:
                return _keep_serving(gateway, pki, config, pacs)
            return 0 if ok else 1
        finally:
            client.close()
            gateway.stop()
    finally:
        pacs.stop()
        if own_workdir and not keep_serving:
            shutil.rmtree(workdir, ignore_errors=True)


def _keep_serving(gateway: RunningGateway, pki: DevPki, config: Path, pacs: DemoPacs) -> int:
    from gateway.transactions import ENDPOINTS

    lines = ["", "The gateway keeps running (Ctrl-C or SIGTERM stops it). Endpoints:"]
    lines += [f"  {gateway.base_url}{e.path:22} {e.title} (WSDL: ?wsdl)" for e in ENDPOINTS]
    lines += [f"  {gateway.base_url}/health",
              f"Client certificate: {pki.client_cert}",
              f"Client key:         {pki.client_key}",
              f"CA:                 {pki.ca_cert}",
              f"Configuration:      {config}",
              f"PACS ({pacs.kind}):  DICOM 127.0.0.1:{pacs.dicom_port}, AE {pacs.aet}"]
    try:  # a signal may come as soon as the endpoints are out: already inside the try
        _say("\n".join(lines))
        status = gateway.process.wait()
    except KeyboardInterrupt:
        _say("demo: stopping the gateway")
        return 0
    _say(f"demo: the gateway exited by itself with status {status}")
    return 1
