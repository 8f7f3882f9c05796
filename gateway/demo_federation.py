"""The federation part of `xdsi-gateway demo`: two communities on loopback (XCA, XCA-I).

Community A and community B are each a gateway process with its own homeCommunityId, registry
(its own SQLite), repository, embedded PACS (`gateway.demo_pacs`: Orthanc or the pynetdicom
Q/R SCP) holding different sample studies of the same person under each community's own
patient id, and the KOS manifests of those studies, published to its own repository. A lists B
in [[communities]] (ITI-38/ITI-39 at B's /xca/responding, RAD-75 at B's /xcai/responding) with a
patient id cross-reference A-id -> B-id. One development PKI serves both: each gateway serves
with the node certificate and presents it when it calls the other (mutual TLS both ways).

Then the demo plays a Document Consumer / Imaging Document Consumer in community A that knows
the patient by A's id only (`exercise_federation`): ITI-18 FindDocuments to A's own registry
(A's manifests), ITI-18 FindDocuments to A's Initiating Gateway (fanned out as ITI-38 to B with
B's patient id: B's manifests, home = B; A's own are not among them, an initiating gateway asks
remote communities only), ITI-43 to A's Initiating Gateway for B's manifests (routed as ITI-39
to B), the KOS parsed with pydicom for the instances it references, and RAD-69 to A's Initiating
Imaging Gateway (routed as RAD-75 to B, whose Imaging Document Source C-GETs them from B's
PACS). The images are written to <workdir>/retrieved and compared byte for byte (data set after
the file meta group) with the files loaded into B's PACS.

`run_federation(workdir, pki, say)` does all of it and stops every process it started.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread

from gateway.demo import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    RunningGateway,
    free_port,
    publish_quietly,
    rad69_body,
    save_instance,
    short_status,
    start_gateway,
    write_config,
)
from gateway.demo_pacs import (
    DemoPacs,
    Sample,
    SampleStudy,
    sample_studies,
    start_demo_pacs,
)
from gateway.ebrim.metadata import slot_value, unique_id
from gateway.ebrim.model import (
    AdhocQuery,
    DocumentRequest,
    ExtrinsicObject,
    RetrieveDocumentSetRequest,
    Slot,
)
from gateway.ebrim.parse import parse_adhoc_query_response, parse_retrieve_document_set_response
from gateway.ebrim.render import render_adhoc_query_request, render_retrieve_document_set_request
from gateway.ns import Action, AvailabilityStatus, StoredQuery
from gateway.security.pki import DevPki
from gateway.soap.client import SoapClient

Say = Callable[[str], None]
KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


@dataclass(frozen=True)
class CommunitySpec:
    """Who a demo community is: ids, its patient id domain, its patient and its studies."""

    name: str
    home: str
    repository: str
    imaging_source: str
    authority: str  # the community's patient id assigning authority (OID)
    patient: str  # the person's id in this community (PatientID in its PACS)
    pacs_aet: str
    samples: tuple[Sample, ...]

    @property
    def patient_cx(self) -> str:
        return f"{self.patient}^^^&{self.authority}&ISO"


COMMUNITY_A = CommunitySpec(
    name="A", home="urn:oid:1.3.6.1.4.1.21367.2017.2.6.31",
    repository="1.3.6.1.4.1.21367.2017.2.3.31", imaging_source="1.3.6.1.4.1.21367.2017.2.3.32",
    authority="1.3.6.1.4.1.21367.2005.13.20.3100", patient="FED-A-0001", pacs_aet="PACS_A",
    samples=(("SC_rgb_small_odd.dcm", 1, "OT", "Secondary capture, community A", ""),))
COMMUNITY_B = CommunitySpec(
    name="B", home="urn:oid:1.3.6.1.4.1.21367.2017.2.6.41",
    repository="1.3.6.1.4.1.21367.2017.2.3.41", imaging_source="1.3.6.1.4.1.21367.2017.2.3.42",
    authority="1.3.6.1.4.1.21367.2005.13.20.4100", patient="FED-B-7734", pacs_aet="PACS_B",
    samples=(("CT_small.dcm", 2, "CT", "CT head without contrast, community B", "HEAD"),
             ("MR_small.dcm", 1, "MR", "MR knee, community B", "KNEE")))


@dataclass
class Community:
    """A running demo community: its gateway, its PACS, what it holds."""

    spec: CommunitySpec
    workdir: Path
    port: int
    pacs: DemoPacs
    config: Path
    gateway: RunningGateway | None = None
    studies: tuple[SampleStudy, ...] = ()
    manifests: frozenset[str] = frozenset()  # uniqueIds of the published KOS manifests

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"


def remote_community_toml(spec: CommunitySpec, base_url: str,
                          patient_ids: dict[str, str]) -> str:
    """A [[communities]] table for `spec` at `base_url`, with a patient cross-reference."""
    table = ", ".join(f'"{local}" = "{remote}"' for local, remote in patient_ids.items())
    return (f"\n[[communities]]\nhome_community_id = \"{spec.home}\"\n"
            f"query_url = \"{base_url}/xca/responding\"\n"
            f"retrieve_url = \"{base_url}/xca/responding\"\n"
            f"imaging_retrieve_url = \"{base_url}/xcai/responding\"\n"
            f"patient_ids = {{ {table} }}\n")


@contextmanager
def running_community(spec: CommunitySpec, workdir: Path, pki: DevPki, port: int,
                      extra: str = "") -> Iterator[Community]:
    """Start `spec`'s PACS (loaded with its sample studies) and gateway; stop both on exit."""
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh community on every run
    workdir.mkdir(parents=True)
    pacs = start_demo_pacs(workdir / "pacs", aet=spec.pacs_aet)
    try:
        studies = sample_studies(workdir / "samples", patient_id=spec.patient,
                                 patient_name="DEMO^FEDERATION", samples=spec.samples,
                                 accession_prefix=f"FED{spec.name}")
        pacs.load([f for s in studies for f in s.files])
        config = write_config(workdir, pki, port, workers=1, pacs=(pacs.dicom_port, pacs.aet),
                              home=spec.home, repository=spec.repository,
                              imaging_source=spec.imaging_source, authority=spec.authority,
                              extra=extra)
        community = Community(spec, workdir, port, pacs, config, studies=tuple(studies))
        community.gateway = start_gateway(config, pki, port)
        try:
            yield community
        finally:
            community.gateway.stop()
    finally:
        pacs.stop()


def _describe(c: Community) -> str:
    assert c.gateway is not None
    return (f"community {c.spec.name}: home {c.spec.home}, gateway {c.gateway.base_url} "
            f"(pid {c.gateway.process.pid}), PACS {c.pacs.kind} 127.0.0.1:{c.pacs.dicom_port} "
            f"(AE {c.pacs.aet})")


def _n(count: int, one: str, many: str = "") -> str:
    return f"{count} {one if count == 1 else many or one + 's'}"


def _publish(c: Community, say: Say) -> bool:
    files = [f for s in c.studies for f in s.files]
    summary = publish_quietly(c.config)
    by_study = {r.study_uid: r for r in summary.results}
    say(f"{c.spec.name}: PACS loaded with {_n(len(files), 'instance')} in "
        f"{_n(len(c.studies), 'study', 'studies')} ("
        + ", ".join(f"{s.modality} x{len(s.files)}" for s in c.studies)
        + f"); KOS publisher: {summary.line()}")
    ok = all(by_study.get(s.study_uid) is not None
             and by_study[s.study_uid].outcome == "published" for s in c.studies)
    if not ok:
        for r in summary.results:
            if r.outcome == "failed":
                say(f"  failed: {r.message}")
    uids = (by_study[s.study_uid].manifest_uid for s in c.studies if s.study_uid in by_study)
    c.manifests = frozenset(uid for uid in uids if uid)
    return ok


def find_documents(client: SoapClient, path: str, patient_cx: str) -> tuple[str, list[
        ExtrinsicObject], list[str]]:
    """ITI-18 FindDocuments (Approved) for `patient_cx` at `path`: status, the DocumentEntries,
    the error codes."""
    query = AdhocQuery(query_id=StoredQuery.FIND_DOCUMENTS, parameters=(
        Slot("$XDSDocumentEntryPatientId", (f"'{patient_cx}'",)),
        Slot("$XDSDocumentEntryStatus", (f"('{AvailabilityStatus.APPROVED}')",)),
    ))
    reply = client.call(path, Action.ITI18, render_adhoc_query_request(query))
    if reply.body is None:
        return "SOAP fault", [], []
    found = parse_adhoc_query_response(reply.body)
    entries = [o for o in found.objects if isinstance(o, ExtrinsicObject)]
    return found.status, entries, [f"{e.code} ({e.location or '-'})" for e in found.errors]


def kos_references(kos: Dataset) -> list[tuple[str, str, str, str]]:
    """(study, series, SOP instance, Retrieve Location UID) of a KOS's evidence sequence."""
    refs = []
    for study in kos.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            location = str(series.get("RetrieveLocationUID", ""))
            for inst in series.get("ReferencedSOPSequence", []):
                refs.append((str(study.StudyInstanceUID), str(series.SeriesInstanceUID),
                             str(inst.ReferencedSOPInstanceUID), location))
    return refs


def _home_name(home: str | None, communities: tuple[Community, ...]) -> str:
    for c in communities:
        if c.spec.home == home:
            return c.spec.name
    return home or "none"


def _homes(entries: list[ExtrinsicObject], communities: tuple[Community, ...]) -> str:
    """`B x2`: how many entries carry each home (by community name; `none` when absent)."""
    counts: dict[str, int] = {}
    for o in entries:
        name = _home_name(o.home, communities)
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} x{k}" for n, k in counts.items()) or "-"


def exercise_federation(a: Community, b: Community, client: SoapClient, out: Path,
                        say: Say) -> bool:
    """The consumer in A (knows A's patient id only) finds and retrieves B's studies through
    A's initiating gateways; True when every check passed."""
    both = (a, b)
    # A's own registry: A's own manifests, no home needed.
    status, own, own_errors = find_documents(client, "/xds/registry", a.spec.patient_cx)
    own_uids = {unique_id(o) for o in own}
    say(f"ITI-18 FindDocuments at A's registry (/xds/registry) -> {short_status(status)}, "
        f"{len(own)} manifest(s), home {_homes(own, both)}: A's own "
        f"({len(own_uids & a.manifests)} of the {len(a.manifests)} A published)")
    ok = own_uids == a.manifests

    # A's initiating gateway: fan-out (ITI-38) to B with B's patient id.
    status, found, problems = find_documents(client, "/xca/initiating", a.spec.patient_cx)
    found_uids = {unique_id(o) for o in found}
    say(f"ITI-18 FindDocuments at A's Initiating Gateway (/xca/initiating; ITI-38 to B with "
        f"B's patient id) -> {short_status(status)}, {len(found)} manifest(s), home "
        f"{_homes(found, both)}; A's own among them: {len(found_uids & a.manifests)} (an "
        "initiating gateway asks remote communities only)")
    for e in own_errors + problems:
        say(f"  error {e}")
    for o in found:
        title = o.name[0].value if o.name else "(no title)"
        say(f"  {title}: home {o.home}, repository {slot_value(o, 'repositoryUniqueId')}")
    ok = ok and found_uids == b.manifests and bool(found) \
        and all(o.home == b.spec.home for o in found)
    if not found:
        return False

    out.mkdir(parents=True, exist_ok=True)
    spool = Path(tempfile.mkdtemp(prefix="retrieve-", dir=out.parent))
    try:
        # ITI-43 at A's initiating gateway, routed as ITI-39 to B by HomeCommunityId.
        reply = client.call("/xca/initiating", Action.ITI43,
                            render_retrieve_document_set_request(RetrieveDocumentSetRequest(
                                documents=tuple(DocumentRequest(
                                    repository_unique_id=slot_value(o, "repositoryUniqueId")
                                    or "", document_unique_id=unique_id(o) or "",
                                    home_community_id=o.home) for o in found))),
                            spool_dir=spool)
        if reply.body is None:
            say("ITI-43 at A's Initiating Gateway -> SOAP fault")
            return False
        retrieved = parse_retrieve_document_set_response(reply.body)
        refs: list[tuple[str, str, str, str]] = []
        for doc in retrieved.documents:
            path = reply.attachment_path(doc.content_id)
            ok = ok and doc.home_community_id == b.spec.home and path is not None
            if path is None:
                continue
            target = out / f"manifest-{doc.document_unique_id}.dcm"
            shutil.move(str(path), target)
            kos = dcmread(str(target))
            ok = ok and str(kos.SOPClassUID) == KOS_SOP_CLASS \
                and str(kos.SOPInstanceUID) == doc.document_unique_id
            refs += kos_references(kos)
        say(f"ITI-43 at A's Initiating Gateway (/xca/initiating; ITI-39 to B) -> "
            f"{short_status(retrieved.status)}, {len(retrieved.documents)} KOS manifest(s) "
            f"from home " + ", ".join(sorted({_home_name(d.home_community_id, both)
                                              for d in retrieved.documents}) or ["-"])
            + f", referencing {len(refs)} instances")
        for err in retrieved.errors:
            say(f"  error {err.code} ({err.location or '-'})")
        originals = {str(dcmread(str(f), stop_before_pixels=True).SOPInstanceUID): f
                     for s in b.studies for f in s.files}
        ok = ok and len(retrieved.documents) == len(found) and \
            {r[2] for r in refs} == set(originals)
        if not refs:
            return False

        # RAD-69 at A's initiating imaging gateway, routed as RAD-75 to B.
        by_location: dict[str, list[tuple[str, str, str]]] = {}
        for study, series, sop, location in refs:
            by_location.setdefault(location, []).append((study, series, sop))
        count = 0
        for location, triples in by_location.items():
            reply = client.call("/xcai/initiating", Action.RAD69,
                                rad69_body(triples, (EXPLICIT_LE, IMPLICIT_LE),
                                           repository=location, home=b.spec.home),
                                spool_dir=spool)
            if reply.body is None:
                say("RAD-69 at A's Initiating Imaging Gateway -> SOAP fault")
                return False
            images = parse_retrieve_document_set_response(reply.body)
            say(f"RAD-69 at A's Initiating Imaging Gateway (/xcai/initiating; RAD-75 to B, "
                f"C-GET from B's PACS) -> {short_status(images.status)}, "
                f"{len(images.documents)} instances from home "
                + ", ".join(sorted({_home_name(d.home_community_id, both)
                                    for d in images.documents}) or ["-"])
                + f", written to {out}")
            for err in images.errors:
                say(f"  error {err.code} ({err.location or '-'})")
            ok = ok and len(images.documents) == len(triples) and not images.errors
            for doc in images.documents:
                same = save_instance(reply, doc, out, originals, say)
                ok = ok and same and doc.home_community_id == b.spec.home
                count += same
        ok = ok and count == len(originals)
        return ok
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def run_federation(workdir: Path, pki: DevPki, say: Say) -> bool:
    """Start communities A and B in `workdir` (a/, b/), run the consumer in A, write B's images
    to `workdir`/retrieved, stop everything; True when every check passed."""
    a_spec, b_spec = COMMUNITY_A, COMMUNITY_B
    port_a, port_b = free_port(), free_port()
    b_url = f"https://localhost:{port_b}"
    xref = {a_spec.patient_cx: b_spec.patient_cx}
    shutil.rmtree(workdir / "retrieved", ignore_errors=True)
    say("one development CA for both: each gateway serves with its node certificate and "
        "presents it when it calls the other")
    with ExitStack() as stack:
        b = stack.enter_context(running_community(b_spec, workdir / "b", pki, port_b))
        say(_describe(b))
        a = stack.enter_context(running_community(
            a_spec, workdir / "a", pki, port_a,
            extra=remote_community_toml(b_spec, b_url, xref)))
        say(_describe(a))
        say(f"A's [[communities]]: B ({b_spec.home}): ITI-38/ITI-39 at {b_url}/xca/responding, "
            f"RAD-75 at {b_url}/xcai/responding; patient cross-reference "
            f"{a_spec.patient_cx} -> {b_spec.patient_cx}")
        ok = _publish(a, say)
        ok = _publish(b, say) and ok
        if not ok:
            return False
        say("Consumer in community A (knows the patient by A's id only):")
        client = SoapClient(a.url, ca_bundle=pki.ca_cert, certificate=pki.client_cert,
                            private_key=pki.client_key, timeout=60)
        stack.callback(client.close)
        try:
            return exercise_federation(a, b, client, workdir / "retrieved",
                                       lambda line: say("  " + line))
        finally:  # both PACSes wind down while the gateways stop
            a.pacs.request_stop()
            b.pacs.request_stop()
    return False  # pragma: no cover - ExitStack does not swallow exceptions
