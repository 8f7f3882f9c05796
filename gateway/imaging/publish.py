"""The KOS manifest publisher: make the PACS's studies findable in the affinity domain.

`publish(config, selection, ...)` C-FINDs the PACS at study, series and instance level, builds
one KOS manifest per study (`gateway.imaging.kos`), its XDS-I.b DocumentEntry
(`gateway.imaging.metadata`), and registers it with ITI-41 to the configured repository: the
built-in one called in-process (`LocalTarget`, the repository handler with this process's
Services) or a remote one over HTTPS with mutual TLS and MTOM (`RemoteTarget`, `SoapClient`).

Publishing is idempotent. Before registering, the publisher asks the registry (ITI-18
FindDocumentsByReferenceId: the patient and the study's Instance UID reference, Approved
entries) for a manifest of the study, fetches the newest one (ITI-43) and compares the set of
instance UIDs it references with what the PACS holds now: the same set -> nothing is sent
("unchanged"); a different one -> the new manifest replaces it (RPLC association; the registry
deprecates the old entry). A study that fails (PACS error, registry error) is counted and
reported; the run goes on. Patient data never goes to the log above DEBUG.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from pydicom import Dataset
from pydicom.uid import generate_uid

from gateway.config import GatewayConfig
from gateway.dicom.errors import PacsError
from gateway.dicom.find import find_instances, find_series, find_studies
from gateway.ebrim import build
from gateway.ebrim.metadata import slot_value, unique_id
from gateway.ebrim.model import (
    AdhocQuery,
    Association,
    DocumentContent,
    DocumentRequest,
    ExtrinsicObject,
    ProvideAndRegisterRequest,
    RetrieveDocumentSetRequest,
    Slot,
)
from gateway.ebrim.parse import (
    parse_adhoc_query_response,
    parse_registry_response,
    parse_retrieve_document_set_response,
)
from gateway.ebrim.render import (
    render_adhoc_query_request,
    render_provide_and_register,
    render_retrieve_document_set_request,
)
from gateway.errors import XdsError
from gateway.imaging.kos import (
    ManifestOptions,
    body_parts,
    build_manifest,
    manifest_bytes,
    manifest_instance_uids,
    merge_levels,
    read_manifest,
)
from gateway.imaging.metadata import (
    KOS_FORMAT,
    MetadataOptions,
    affinity_patient_id,
    manifest_entry,
    parse_code,
    study_reference_id,
    submission_set_values,
)
from gateway.ns import (
    Action,
    AssociationType,
    AvailabilityStatus,
    MimeType,
    ResponseStatus,
    StoredQuery,
)
from gateway.transactions import Attachment

log = logging.getLogger(__name__)

STUDY_KEYS = ("PatientID", "PatientName", "IssuerOfPatientID", "PatientBirthDate",
              "PatientSex", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
              "ReferringPhysicianName", "StudyDescription", "ModalitiesInStudy")
SERIES_KEYS = ("Modality", "SeriesDescription", "SeriesNumber", "BodyPartExamined",
               "SeriesDate", "SeriesTime")
INSTANCE_KEYS = ("SOPClassUID", "InstanceNumber")
OUTCOMES = ("published", "replaced", "unchanged", "failed")


class PublishError(Exception):
    """One study could not be published; the message carries no patient data."""


@dataclass(frozen=True)
class Selection:
    """Which studies: one by UID, those of a date onwards (YYYYMMDD), or all."""

    study_uid: str | None = None
    since: str | None = None

    def keys(self) -> dict[str, str | list[str]]:
        if self.study_uid:
            return {"StudyInstanceUID": self.study_uid}
        if self.since:
            return {"StudyDate": f"{self.since}-"}
        return {}


@dataclass
class StudyResult:
    study_uid: str
    outcome: str  # one of OUTCOMES
    manifest_uid: str | None = None
    replaced_entry: str | None = None
    message: str = ""


@dataclass
class PublishSummary:
    results: list[StudyResult] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def seen(self) -> int:
        return len(self.results)

    def line(self) -> str:
        return (f"studies seen {self.seen}, published {self.count('published')}, "
                f"replaced {self.count('replaced')}, unchanged {self.count('unchanged')}, "
                f"failed {self.count('failed')}")


# --- where manifests go ---------------------------------------------------------------------

class Target(Protocol):
    """A Document Repository + Registry pair the publisher talks to."""

    def find_manifests(self, patient_id: str, study_uid: str) -> list[ExtrinsicObject]: ...

    def fetch(self, entry: ExtrinsicObject, spool: Path) -> bytes: ...

    def provide(self, request: ProvideAndRegisterRequest, spool: Path) -> list[XdsError]: ...

    def close(self) -> None: ...


def manifest_query(patient_id: str, study_uid: str) -> AdhocQuery:
    """ITI-18 FindDocumentsByReferenceId for the approved manifests of one study."""
    return AdhocQuery(query_id=StoredQuery.FIND_DOCUMENTS_BY_REFERENCE_ID, parameters=(
        Slot("$XDSDocumentEntryPatientId", (f"'{patient_id}'",)),
        Slot("$XDSDocumentEntryStatus", (f"('{AvailabilityStatus.APPROVED}')",)),
        Slot("$XDSDocumentEntryReferenceIdList", (f"('{study_reference_id(study_uid)}')",)),
        Slot("$XDSDocumentEntryFormatCode",
             (f"('{KOS_FORMAT.code}^^{KOS_FORMAT.scheme}')",)),
    ))


def _manifests(objects: Iterable[object]) -> list[ExtrinsicObject]:
    return [o for o in objects if isinstance(o, ExtrinsicObject)
            and o.mime_type == MimeType.DICOM]


def _errors_only(errors: Sequence[XdsError]) -> list[XdsError]:
    return [e for e in errors if e.is_error]


class LocalTarget:
    """The built-in registry and repository of this installation, called in-process."""

    def __init__(self, config: GatewayConfig):
        from gateway.services import build_services

        self.services = build_services(config)

    def find_manifests(self, patient_id: str, study_uid: str) -> list[ExtrinsicObject]:
        from gateway.registry.handlers import execute_stored_query

        return _manifests(execute_stored_query(self.services,
                                               manifest_query(patient_id, study_uid)))

    def fetch(self, entry: ExtrinsicObject, spool: Path) -> bytes:
        from gateway.repository.handlers import retrieve

        request = RetrieveDocumentSetRequest(documents=(DocumentRequest(
            repository_unique_id=slot_value(entry, "repositoryUniqueId") or "",
            document_unique_id=unique_id(entry) or ""),))
        _status, docs, errors = retrieve(self.services, request)
        if not docs:
            raise PublishError(f"the previous manifest cannot be retrieved: "
                               f"{errors[0].code if errors else 'no document'}")
        return docs[0].path.read_bytes()

    def provide(self, request: ProvideAndRegisterRequest, spool: Path) -> list[XdsError]:
        from gateway.repository.handlers import provide_and_register
        from gateway.transactions import RequestContext

        attachments = {f"doc{i}@xdsi-publish": Attachment(f"doc{i}@xdsi-publish", d.path, d.size,
                                                          MimeType.DICOM)
                       for i, d in enumerate(request.documents)}
        ids = {d.id: f"doc{i}@xdsi-publish" for i, d in enumerate(request.documents)}
        body = render_provide_and_register(request, content_id_for=lambda d: ids[d.id])
        ctx = RequestContext(endpoint="/xds/repository", action=Action.ITI41, message_id=None,
                             client_subject=None, attachments=attachments, spool_dir=spool)
        response = provide_and_register(self.services, ctx, body)
        parsed = parse_registry_response(response.body)
        return list(parsed.errors) if parsed.status != ResponseStatus.SUCCESS or \
            parsed.errors else []

    def close(self) -> None:
        self.services.registry.close()


class RemoteTarget:
    """A remote affinity domain: ITI-18 to its registry, ITI-41/ITI-43 to its repository."""

    def __init__(self, config: GatewayConfig):
        from gateway.soap.client import SoapClient

        t = config.tls

        def client(url: str) -> SoapClient:
            return SoapClient(url, ca_bundle=t.ca_bundle, certificate=t.certificate,
                              private_key=t.private_key)

        self.repository = client(config.publish.repository_url)
        self.registry = client(config.publish.registry_url)

    def find_manifests(self, patient_id: str, study_uid: str) -> list[ExtrinsicObject]:
        reply = self.registry.call("", Action.ITI18, render_adhoc_query_request(
            manifest_query(patient_id, study_uid)))
        if reply.body is None or reply.is_fault:
            raise PublishError(f"the registry answered HTTP {reply.http_status} with a fault")
        parsed = parse_adhoc_query_response(reply.body)
        if parsed.status == ResponseStatus.FAILURE:
            raise PublishError("the registry query failed: "
                               + ", ".join(e.code for e in parsed.errors))
        return _manifests(parsed.objects)

    def fetch(self, entry: ExtrinsicObject, spool: Path) -> bytes:
        request = RetrieveDocumentSetRequest(documents=(DocumentRequest(
            repository_unique_id=slot_value(entry, "repositoryUniqueId") or "",
            document_unique_id=unique_id(entry) or ""),))
        reply = self.repository.call("", Action.ITI43,
                                     render_retrieve_document_set_request(request),
                                     spool_dir=spool)
        if reply.body is None or reply.is_fault:
            raise PublishError(f"the repository answered HTTP {reply.http_status} with a fault")
        parsed = parse_retrieve_document_set_response(reply.body)
        if not parsed.documents:
            raise PublishError("the previous manifest cannot be retrieved: "
                               + ", ".join(e.code for e in parsed.errors))
        doc = parsed.documents[0]
        if doc.data is not None:
            return doc.data
        path = reply.attachment_path(doc.content_id)
        if path is None:
            raise PublishError("the repository's answer lacks the manifest's MTOM part")
        return path.read_bytes()

    def provide(self, request: ProvideAndRegisterRequest, spool: Path) -> list[XdsError]:
        ids = {d.id: f"doc{i}@xdsi-publish" for i, d in enumerate(request.documents)}
        attachments = [Attachment(ids[d.id], d.path, d.size, MimeType.DICOM)
                       for d in request.documents]
        body = render_provide_and_register(request, content_id_for=lambda d: ids[d.id])
        reply = self.repository.call("", Action.ITI41, body, attachments=attachments)
        if reply.body is None or reply.is_fault:
            raise PublishError(f"the repository answered HTTP {reply.http_status} with a fault")
        parsed = parse_registry_response(reply.body)
        return list(parsed.errors) if parsed.status != ResponseStatus.SUCCESS or \
            parsed.errors else []

    def close(self) -> None:
        self.repository.close()
        self.registry.close()


def make_target(config: GatewayConfig) -> Target:
    return RemoteTarget(config) if config.publish.repository_url else LocalTarget(config)


# --- options from the configuration ---------------------------------------------------------

def manifest_options(config: GatewayConfig) -> ManifestOptions:
    pub = config.publish
    return ManifestOptions(
        retrieve_location_uid=config.community.imaging_source_unique_id,
        retrieve_ae_title=pub.retrieve_ae_title or config.pacs.called_ae_title,
        issuer_of_patient_id=pub.issuer_of_patient_id
        or config.community.patient_id_assigning_authority,
        wado_rs_base=pub.wado_rs_base,
        institution_name=pub.institution_name,
        accession_number_issuer=pub.accession_number_authority,
        placer_order_issuer=pub.placer_order_authority)


def metadata_options(config: GatewayConfig) -> MetadataOptions:
    pub = config.publish
    overrides = {part.strip().upper(): parse_code(value,
                                                  default_scheme=pub.region_coding_scheme)
                 for part, value in pub.body_parts}
    return MetadataOptions(
        patient_id_authority=config.community.patient_id_assigning_authority,
        source_patient_id_authority=pub.source_patient_id_authority,
        accession_number_authority=pub.accession_number_authority,
        placer_order_authority=pub.placer_order_authority,
        class_code=parse_code(pub.class_code), type_code=parse_code(pub.type_code),
        confidentiality_code=parse_code(pub.confidentiality_code),
        healthcare_facility_type_code=parse_code(pub.healthcare_facility_type_code),
        practice_setting_code=parse_code(pub.practice_setting_code),
        content_type_code=parse_code(pub.content_type_code),
        modality_scheme=pub.modality_coding_scheme, region_scheme=pub.region_coding_scheme,
        body_part_overrides=overrides)


# --- one study ------------------------------------------------------------------------------

@dataclass
class StudyHeaders:
    study: Dataset
    series: list[Dataset]
    instances: list[Dataset]  # merged: patient + study + series + instance attributes

    @property
    def body_parts(self) -> list[str]:
        return body_parts(self.instances)

    def service_stop(self) -> str | None:
        stamps = []
        for s in self.series:
            date = str(s.get("SeriesDate") or "").strip()
            time = "".join(c for c in str(s.get("SeriesTime") or "").split(".")[0]
                           if c.isdigit())[:6]
            if len(date) == 8 and date.isdigit():
                stamps.append(date + (time if len(time) in (2, 4, 6) else ""))
        return max(stamps) if stamps else None


def query_study(config: GatewayConfig, study: Dataset) -> StudyHeaders:
    """The series and instances of one study (C-FIND), merged into instance headers."""
    pacs = config.pacs
    timeout = config.publish.pacs_timeout_seconds
    study_uid = str(study.StudyInstanceUID)
    series = find_series(pacs, study_uid, return_keys=SERIES_KEYS, timeout=timeout)
    by_uid = {str(s.SeriesInstanceUID): s for s in series}
    instances = find_instances(pacs, study_uid, return_keys=INSTANCE_KEYS, timeout=timeout)
    merged = []
    for inst in instances:
        if str(inst.get("StudyInstanceUID", study_uid)) != study_uid:
            continue
        ser = by_uid.get(str(inst.get("SeriesInstanceUID", "")))
        if ser is None:
            ser = Dataset()
            ser.SeriesInstanceUID = inst.SeriesInstanceUID
        merged.append(merge_levels(study, ser, inst))
    return StudyHeaders(study, series, merged)


def publish_study(config: GatewayConfig, target: Target, study: Dataset, spool: Path, *,
                  dry_run: bool = False) -> StudyResult:
    """Build, compare and (unless unchanged or a dry run) register one study's manifest."""
    study_uid = str(study.StudyInstanceUID)
    headers = query_study(config, study)
    if not headers.instances:
        raise PublishError("the PACS lists no instances for the study")
    if not str(study.get("PatientID") or "").strip():
        raise PublishError("the study has no Patient ID; it cannot be registered")
    kos = build_manifest(headers.instances, manifest_options(config))
    options = metadata_options(config)
    patient = affinity_patient_id(kos, options)
    current = manifest_instance_uids(kos)

    previous: ExtrinsicObject | None = None
    found = target.find_manifests(patient, study_uid)
    if found:
        found.sort(key=lambda e: (slot_value(e, "creationTime") or "", e.id))
        previous = found[-1]
        old = read_manifest(target.fetch(previous, spool))
        if manifest_instance_uids(old) == current:
            return StudyResult(study_uid, "unchanged", unique_id(previous))
    outcome = "replaced" if previous is not None else "published"
    if dry_run:
        return StudyResult(study_uid, outcome, str(kos.SOPInstanceUID),
                           previous.id if previous else None, "dry run: nothing sent")

    path = spool / f"{kos.SOPInstanceUID}.dcm"
    path.write_bytes(manifest_bytes(kos))
    entry_values = manifest_entry(kos, options, body_parts=headers.body_parts,
                                  service_stop=headers.service_stop())
    entry = build.document_entry(entry_values)
    source_id = config.publish.source_id or config.community.imaging_source_unique_id
    sub = build.submission(
        submission_set_values(generate_uid(), source_id, patient, options),
        (entry,))
    if previous is not None:
        rplc = Association(id=build.new_uuid(), association_type=AssociationType.RPLC,
                           source_object=entry.id, target_object=previous.id)
        sub = replace(sub, objects=(*sub.objects, rplc))
    request = ProvideAndRegisterRequest(
        submission=sub,
        documents=(DocumentContent(id=entry.id, path=path, size=path.stat().st_size),))
    errors = _errors_only(target.provide(request, spool))
    if errors:
        # The contexts may quote patient ids: DEBUG only; the codes tell the operator enough.
        log.debug("ITI-41 errors: %s", "; ".join(f"{e.code}: {e.context}" for e in errors))
        raise PublishError("the repository refused the manifest: " + ", ".join(
            sorted({e.code for e in errors})))
    return StudyResult(study_uid, outcome, str(kos.SOPInstanceUID),
                       previous.id if previous else None)


# --- a run ----------------------------------------------------------------------------------

def select_studies(config: GatewayConfig, selection: Selection) -> list[Dataset]:
    studies = find_studies(config.pacs, selection.keys(), return_keys=STUDY_KEYS,
                           timeout=config.publish.pacs_timeout_seconds)
    return sorted(studies, key=lambda s: (str(s.get("StudyDate") or ""),
                                          str(s.StudyInstanceUID)))


def publish(config: GatewayConfig, selection: Selection, *, dry_run: bool = False,
            target: Target | None = None, progress: bool = False,
            on_result: Callable[[StudyResult], None] | None = None) -> PublishSummary:
    """Publish the selected studies; errors per study are results, never a stopped run.

    Raises PacsError only when the study list itself cannot be had from the PACS.
    """
    studies = select_studies(config, selection)
    own_target = target is None
    tgt = target if target is not None else make_target(config)
    summary = PublishSummary()
    spool_root = Path(tempfile.mkdtemp(prefix="xdsi-publish-",
                                       dir=config.server.spool_directory))
    try:
        iterator: Iterable[Dataset] = studies
        if progress:
            from tqdm import tqdm

            iterator = tqdm(studies, desc="publishing", unit="study")
        for study in iterator:
            study_uid = str(study.get("StudyInstanceUID", ""))
            spool = Path(tempfile.mkdtemp(dir=spool_root))
            try:
                result = publish_study(config, tgt, study, spool, dry_run=dry_run)
            except PacsError as exc:
                result = StudyResult(study_uid, "failed", message=exc.message)
            except PublishError as exc:
                result = StudyResult(study_uid, "failed", message=str(exc))
            except Exception as exc:  # one study never stops the run
                log.debug("publishing study failed", exc_info=exc)
                result = StudyResult(study_uid, "failed",
                                     message=f"internal error: {type(exc).__name__}")
            finally:
                shutil.rmtree(spool, ignore_errors=True)
            if result.outcome == "failed":
                log.warning("study %s: not published: %s", study_uid, result.message)
            else:
                log.info("study %s: %s", study_uid, result.outcome)
            summary.results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        shutil.rmtree(spool_root, ignore_errors=True)
        if own_target:
            tgt.close()
    return summary
