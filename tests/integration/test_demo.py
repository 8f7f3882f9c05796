"""`xdsi-gateway demo` end to end, as a user runs it: the installed console script.

The demo starts its own gateway (mutual TLS on loopback), submits a report and a KOS manifest
with ITI-41, finds them with ITI-18 and retrieves them with ITI-43. It also starts an embedded
Orthanc, loads sample studies, publishes their manifests and, as a consumer, finds the CT study
by modality, retrieves its manifest (ITI-43) and its images (RAD-69), byte-exact. Then the
federation: communities A and B, each with its gateway, registry, repository and PACS; a
consumer in A finds B's manifests through A's initiating gateway (home = B), retrieves them
(ITI-43 -> ITI-39) and B's images (RAD-69 -> RAD-75), byte-exact. With `--serve` it keeps the
gateway and the PACS running until SIGINT or SIGTERM, and must then stop them (no listener
left behind).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".venv" / "bin" / "xdsi-gateway"
# As from a shell without PYTHONUNBUFFERED: the demo must flush what it prints itself.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

pytestmark = pytest.mark.integration


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run([str(SCRIPT), "demo", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, check=False, env=ENV)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    iti41 = next(line for line in out.splitlines() if "ITI-41" in line)
    assert iti41.rstrip().endswith("-> Success"), iti41
    assert re.search(r"ITI-18 .*-> Success, \d+ entries, 2 of ours", out), out
    assert re.search(r"ITI-43 .*-> Success, 2 documents", out), out
    retrieved = [line for line in out.splitlines() if "SHA-1" in line]
    assert len(retrieved) == 2, out
    assert all(line.rstrip().endswith("identical") for line in retrieved), out
    assert {"text/plain", "application/dicom"} == {line.split()[0] for line in retrieved}
    assert "demo: all checks passed" in out
    assert "Traceback" not in result.stderr
    _check_imaging(out, tmp_path, "Orthanc")
    _check_federation(out, tmp_path, "Orthanc")
    # The work folder holds what the demo says it holds; the gateway and the PACS are gone.
    assert (tmp_path / "gateway.toml").is_file() and (tmp_path / "pki" / "ca.pem").is_file()
    port = int(re.search(r"serving on https://127\.0\.0\.1:(\d+)", out).group(1))  # type: ignore[union-attr]
    assert not _listening(port)
    pacs_port = int(re.search(r"embedded PACS: .* on 127\.0\.0\.1:(\d+)", out).group(1))  # type: ignore[union-attr]
    assert not _listening(pacs_port)


def test_demo_falls_back_to_a_pynetdicom_pacs(tmp_path: Path) -> None:
    """Without Orthanc (forced here), the demo's PACS is a pynetdicom Q/R SCP; same story."""
    env = dict(ENV, XDSI_DEMO_PACS="pynetdicom")
    result = subprocess.run([str(SCRIPT), "demo", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, check=False, env=env)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "demo: all checks passed" in out
    assert "Traceback" not in result.stderr
    _check_imaging(out, tmp_path, "pynetdicom Q/R SCP")
    _check_federation(out, tmp_path, "pynetdicom Q/R SCP")
    pacs_port = int(re.search(r"embedded PACS: .* on 127\.0\.0\.1:(\d+)", out).group(1))  # type: ignore[union-attr]
    assert not _listening(pacs_port)


def test_demo_refuses_an_unknown_pacs_kind(tmp_path: Path) -> None:
    env = dict(ENV, XDSI_DEMO_PACS="dcm4chee")
    result = subprocess.run([str(SCRIPT), "demo", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, check=False, env=env)
    assert result.returncode == 1
    assert "the embedded PACS did not start: unknown PACS kind 'dcm4chee'" in result.stdout
    assert "Traceback" not in result.stderr


def _check_imaging(out: str, workdir: Path, kind: str) -> None:
    """The imaging part: the PACS loaded, manifests published, the CT study found by modality,
    its KOS retrieved, its images retrieved with RAD-69 into <workdir>/retrieved and
    byte-exact (dataset after the file meta group) to the files loaded into the PACS."""
    from pydicom import dcmread

    from gateway.demo_pacs import dataset_bytes

    out = out.split("\nFederation:", 1)[0]  # the single-community part
    assert re.search(rf"embedded PACS: {re.escape(kind)} on 127\.0\.0\.1:\d+", out), out
    loaded = re.search(rf"PACS: {re.escape(kind)} .* loaded with (\d+) instances in (\d+) "
                       r"studies", out)
    assert loaded, out
    studies = int(loaded.group(2))
    assert studies >= 3
    assert f"studies seen {studies}, published {studies}, replaced 0, unchanged 0, " \
           "failed 0" in out, out
    assert re.search(rf"ITI-18 FindDocuments eventCode CT\^\^DCM -> Success, 1 of the "
                     rf"{studies} manifests just published", out), out
    kos = re.search(r"ITI-43 Retrieve Document Set -> Success, 1 KOS manifest\(s\) "
                    r"referencing (\d+) instances", out)
    assert kos, out
    count = int(kos.group(1))
    assert re.search(rf"RAD-69 .* -> Success, {count} instances, written to "
                     rf"{re.escape(str(workdir / 'retrieved'))}", out), out
    lines = [line for line in out.splitlines() if line.rstrip().endswith("byte-exact")]
    assert len(lines) == count and all("CT Image Storage" in line for line in lines), out

    # What the demo says, checked independently: the files it wrote are the PACS's images.
    originals = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                 for p in (workdir / "samples").glob("*.dcm")}
    retrieved = [p for p in (workdir / "retrieved").glob("*.dcm")
                 if not p.name.startswith("manifest-")]
    assert len(retrieved) == count
    for path in retrieved:
        ds = dcmread(path)
        assert ds.Modality == "CT"
        assert dataset_bytes(path) == dataset_bytes(originals[str(ds.SOPInstanceUID)])
    manifests = list((workdir / "retrieved").glob("manifest-*.dcm"))
    assert len(manifests) == 1
    assert dcmread(manifests[0]).SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"


def test_demo_federation_only(tmp_path: Path) -> None:
    """`--federation-only`: communities A and B alone, the single-community part skipped."""
    result = subprocess.run([str(SCRIPT), "demo", "--federation-only", "--workdir",
                             str(tmp_path)], capture_output=True, text=True, timeout=120,
                            check=False, env=ENV)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "Documents:" not in out and "Imaging:" not in out
    assert not (tmp_path / "gateway.toml").exists()
    assert "demo: all checks passed" in out
    assert "Traceback" not in result.stderr
    _check_federation(out, tmp_path, None)
    for port in re.findall(r"community [AB]: .* gateway https://127\.0\.0\.1:(\d+) .*"
                           r"PACS .* 127\.0\.0\.1:(\d+)", out):
        assert not any(_listening(int(p)) for p in port), "a community still listens"


def test_demo_refuses_serve_with_federation_only(tmp_path: Path) -> None:
    result = subprocess.run([str(SCRIPT), "demo", "--serve", "--federation-only", "--workdir",
                             str(tmp_path)], capture_output=True, text=True, timeout=30,
                            check=False, env=ENV)
    assert result.returncode == 2
    assert "--serve keeps the single-community gateway" in result.stderr
    assert not (tmp_path / "pki").exists()


def test_federation_answers_carry_b_home(tmp_path: Path) -> None:
    """The demo's communities, asked by this test: A's initiating gateways answer with B's
    manifests and images, each carrying home = B; B itself knows the patient by B's id only
    (so A's cross-reference did the work); what came through A is byte for byte what B's own
    repository and PACS hold."""
    from lxml import etree
    from pydicom import dcmread

    from gateway.demo import (
        EXPLICIT_LE,
        free_port,
        publish_quietly,
        rad69_body,
    )
    from gateway.demo_federation import (
        COMMUNITY_A,
        COMMUNITY_B,
        find_documents,
        kos_references,
        remote_community_toml,
        running_community,
    )
    from gateway.demo_pacs import dataset_bytes
    from gateway.ebrim.metadata import slot_value, unique_id
    from gateway.ebrim.model import AdhocQuery, DocumentRequest, RetrieveDocumentSetRequest, Slot
    from gateway.ebrim.parse import (
        parse_adhoc_query_response,
        parse_retrieve_document_set_response,
    )
    from gateway.ebrim.render import (
        render_adhoc_query_request,
        render_retrieve_document_set_request,
    )
    from gateway.ns import Action, AvailabilityStatus, ResponseStatus, StoredQuery
    from gateway.security.pki import create_dev_pki
    from gateway.soap.client import SoapClient

    pki = create_dev_pki(tmp_path / "pki")
    pa, pb = free_port(), free_port()
    xref = {COMMUNITY_A.patient_cx: COMMUNITY_B.patient_cx}
    with running_community(COMMUNITY_B, tmp_path / "b", pki, pb) as b, \
            running_community(COMMUNITY_A, tmp_path / "a", pki, pa,
                              extra=remote_community_toml(COMMUNITY_B, b.url, xref)) as a:
        published = {r.manifest_uid for r in publish_quietly(b.config).results}
        a_published = {r.manifest_uid for r in publish_quietly(a.config).results}
        assert len(published) == 2 and len(a_published) == 1

        def client(url: str) -> SoapClient:
            return SoapClient(url, ca_bundle=pki.ca_cert, certificate=pki.client_cert,
                              private_key=pki.client_key, timeout=60)

        def spool(name: str) -> Path:  # one folder per reply: part files are numbered
            (tmp_path / name).mkdir()
            return tmp_path / name

        ca, cb = client(a.url), client(b.url)
        try:
            # B's responding gateway, asked directly: B's id finds the manifests, A's not.
            def iti38(patient: str) -> list[object]:
                query = AdhocQuery(query_id=StoredQuery.FIND_DOCUMENTS, parameters=(
                    Slot("$XDSDocumentEntryPatientId", (f"'{patient}'",)),
                    Slot("$XDSDocumentEntryStatus", (f"('{AvailabilityStatus.APPROVED}')",))))
                reply = cb.call("/xca/responding", Action.ITI38,
                                render_adhoc_query_request(query))
                assert reply.body is not None
                return list(parse_adhoc_query_response(reply.body).objects)

            assert iti38(COMMUNITY_A.patient_cx) == []
            assert {unique_id(o) for o in iti38(COMMUNITY_B.patient_cx)  # type: ignore[arg-type]
                    } == published

            status, found, errors = find_documents(ca, "/xca/initiating",
                                                   COMMUNITY_A.patient_cx)
            assert status == ResponseStatus.SUCCESS and errors == []
            assert {unique_id(o) for o in found} == published
            assert [o.home for o in found] == [COMMUNITY_B.home] * 2

            requests_ = RetrieveDocumentSetRequest(documents=tuple(DocumentRequest(
                repository_unique_id=slot_value(o, "repositoryUniqueId") or "",
                document_unique_id=unique_id(o) or "", home_community_id=o.home)
                for o in found))
            via_a = ca.call("/xca/initiating", Action.ITI43,
                            render_retrieve_document_set_request(requests_),
                            spool_dir=spool("iti43-a"))
            at_b = cb.call("/xds/repository", Action.ITI43,
                           render_retrieve_document_set_request(requests_),
                           spool_dir=spool("iti43-b"))
            assert via_a.body is not None and at_b.body is not None, \
                etree.tostring(via_a.envelope)
            docs_a = parse_retrieve_document_set_response(via_a.body)
            docs_b = {d.document_unique_id: d
                      for d in parse_retrieve_document_set_response(at_b.body).documents}
            assert docs_a.status == ResponseStatus.SUCCESS and len(docs_a.documents) == 2
            refs = []
            for doc in docs_a.documents:
                assert doc.home_community_id == COMMUNITY_B.home
                mine = via_a.attachment_path(doc.content_id)
                theirs = at_b.attachment_path(docs_b[doc.document_unique_id].content_id)
                assert mine is not None and theirs is not None
                assert mine.read_bytes() == theirs.read_bytes()
                refs += kos_references(dcmread(mine))

            originals = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f
                         for s in b.studies for f in s.files}
            assert {r[2] for r in refs} == set(originals)
            reply = ca.call("/xcai/initiating", Action.RAD69,
                            rad69_body([r[:3] for r in refs], (EXPLICIT_LE,),
                                       repository=COMMUNITY_B.imaging_source,
                                       home=COMMUNITY_B.home), spool_dir=spool("rad69"))
            assert reply.body is not None
            images = parse_retrieve_document_set_response(reply.body)
            assert images.status == ResponseStatus.SUCCESS and not images.errors
            assert sorted(d.document_unique_id for d in images.documents) == sorted(originals)
            for doc in images.documents:
                assert doc.home_community_id == COMMUNITY_B.home
                assert doc.repository_unique_id == COMMUNITY_B.imaging_source
                path = reply.attachment_path(doc.content_id)
                assert path is not None
                assert dataset_bytes(path) == dataset_bytes(originals[doc.document_unique_id])
        finally:
            ca.close()
            cb.close()


def _check_federation(out: str, workdir: Path, kind: str | None) -> None:
    """The federation part: A's consumer found B's manifests (home = B, none of A's) through
    A's initiating gateway, retrieved them (ITI-43 -> ITI-39) and B's images (RAD-69 ->
    RAD-75), written to <workdir>/federation/retrieved and byte-exact to B's PACS files."""
    from pydicom import dcmread

    from gateway.demo_federation import COMMUNITY_A, COMMUNITY_B, KOS_SOP_CLASS
    from gateway.demo_pacs import dataset_bytes

    assert "\nFederation:" in out, out
    out = out.split("\nFederation:", 1)[1]
    for spec in (COMMUNITY_A, COMMUNITY_B):
        line = re.search(rf"community {spec.name}: home {re.escape(spec.home)}, gateway "
                         r"https://127\.0\.0\.1:\d+ \(pid \d+\), PACS (.+) 127\.0\.0\.1:\d+ "
                         rf"\(AE {spec.pacs_aet}\)", out)
        assert line, out
        assert kind is None or line.group(1) == kind, line.group(0)
    assert re.search(r"A: PACS loaded with 1 instance in 1 study \(OT x1\); KOS publisher: "
                     r"studies seen 1, published 1, replaced 0, unchanged 0, failed 0", out), out
    assert re.search(r"B: PACS loaded with 3 instances in 2 studies \(CT x2, MR x1\); KOS "
                     r"publisher: studies seen 2, published 2, replaced 0, unchanged 0, "
                     r"failed 0", out), out
    assert f"patient cross-reference {COMMUNITY_A.patient_cx} -> {COMMUNITY_B.patient_cx}" \
        in out, out
    assert re.search(r"ITI-18 FindDocuments at A's registry \(/xds/registry\) -> Success, 1 "
                     r"manifest\(s\), .*: A's own \(1 of the 1 A published\)", out), out
    assert re.search(r"ITI-18 FindDocuments at A's Initiating Gateway .* -> Success, "
                     r"2 manifest\(s\), home B x2; A's own among them: 0 ", out), out
    listed = [line for line in out.splitlines()
              if re.search(rf": home {re.escape(COMMUNITY_B.home)}, repository "
                           rf"{re.escape(COMMUNITY_B.repository)}$", line)]
    assert len(listed) == 2, out
    assert re.search(r"ITI-43 at A's Initiating Gateway \(/xca/initiating; ITI-39 to B\) -> "
                     r"Success, 2 KOS manifest\(s\) from home B, referencing 3 instances",
                     out), out
    retrieved_dir = workdir / "federation" / "retrieved"
    assert re.search(r"RAD-69 at A's Initiating Imaging Gateway .*RAD-75 to B.* -> Success, "
                     rf"3 instances from home B, written to {re.escape(str(retrieved_dir))}",
                     out), out
    exact = [line for line in out.splitlines() if line.rstrip().endswith("byte-exact")]
    assert len(exact) == 3, out
    assert sorted(line.split(",")[0].strip() for line in exact) == \
        ["CT Image Storage", "CT Image Storage", "MR Image Storage"], out

    # Checked independently: the files written are B's PACS files (none of A's), the
    # manifests are B's KOS (B's patient id) referencing exactly them.
    def originals(name: str) -> dict[str, Path]:
        return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                for p in (workdir / "federation" / name / "samples").glob("*.dcm")}

    b_files, a_files = originals("b"), originals("a")
    assert len(b_files) == 3 and len(a_files) == 1
    images = [p for p in retrieved_dir.glob("*.dcm") if not p.name.startswith("manifest-")]
    assert len(images) == 3
    for path in images:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert uid in b_files and uid not in a_files
        assert dataset_bytes(path) == dataset_bytes(b_files[uid])
    manifests = list(retrieved_dir.glob("manifest-*.dcm"))
    assert len(manifests) == 2
    referenced = set()
    for path in manifests:
        kos = dcmread(path)
        assert kos.SOPClassUID == KOS_SOP_CLASS
        assert kos.PatientID == COMMUNITY_B.patient
        for study in kos.CurrentRequestedProcedureEvidenceSequence:
            for series in study.ReferencedSeriesSequence:
                assert series.RetrieveLocationUID == COMMUNITY_B.imaging_source
                referenced |= {str(i.ReferencedSOPInstanceUID)
                               for i in series.ReferencedSOPSequence}
    assert referenced == set(b_files)


class _Reader(threading.Thread):
    """Collect a child's stdout lines; `wait_for` a pattern without blocking forever."""

    def __init__(self, stream: object) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[str] = []
        self.changed = threading.Condition()

    def run(self) -> None:
        for line in self.stream:  # type: ignore[attr-defined]
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append("")  # end of output
            self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)
        with self.changed:
            found = self.changed.wait_for(
                lambda: any(regex.search(line) for line in self.lines)
                or (bool(self.lines) and self.lines[-1] == ""), timeout=timeout)
            for line in self.lines:
                match = regex.search(line)
                if match:
                    return match
        raise AssertionError(f"{pattern!r} not printed (finished={found}):\n"
                             + "".join(self.lines))

    @property
    def text(self) -> str:
        with self.changed:
            return "".join(self.lines)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM],
                         ids=["SIGINT", "SIGTERM"])
def test_demo_serve_keeps_serving_until_a_signal(tmp_path: Path, signum: int) -> None:
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:  # a file: a lingering child cannot block the test on it
        # Started as a background job of a non-interactive shell would start it (CI may):
        # SIGINT inherited as ignored. The demo must still stop on it.
        proc = subprocess.Popen([str(SCRIPT), "demo", "--serve", "--no-federation",
                                 "--workdir", str(tmp_path)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=ENV,
                                preexec_fn=_ignore_sigint)
    reader = _Reader(proc.stdout)
    reader.start()
    try:
        port = int(reader.wait_for(r"serving on https://127\.0\.0\.1:(\d+)", 90).group(1))
        reader.wait_for(r"^Configuration: ", 90)
        out = reader.text
        assert "demo: all checks passed" in out
        assert "Federation:" not in out  # --no-federation
        pacs = re.search(r"PACS \(Orthanc\): +DICOM 127\.0\.0\.1:(\d+), AE \w+", out)
        assert pacs, out
        pacs_port = int(pacs.group(1))
        assert _listening(pacs_port)
        for path in ("/xds/registry", "/xds/repository", "/xdsi/imaging-source", "/health"):
            assert f"https://127.0.0.1:{port}{path}" in out
        assert f"Client certificate: {tmp_path / 'pki' / 'client.pem'}" in out
        assert f"Client key:         {tmp_path / 'pki' / 'client-key.pem'}" in out
        assert f"CA:                 {tmp_path / 'pki' / 'ca.pem'}" in out
        # Still serving after it printed all that.
        assert proc.poll() is None
        assert _listening(port)

        proc.send_signal(signum)
        assert proc.wait(timeout=20) == 0, reader.text + err_path.read_text()
        reader.join(timeout=5)
        assert "stopping the gateway" in reader.text
        assert not _listening(port), "the gateway child still listens after the demo exited"
        assert not _listening(pacs_port), "the PACS still listens after the demo exited"
        stderr = err_path.read_text()
        assert "Traceback" not in stderr, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
