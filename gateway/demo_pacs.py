"""The demo's embedded PACS: sample studies and a private DICOM archive on loopback.

`sample_studies(folder)` writes a few small studies made from pydicom's bundled test images
(CT_small, MR_small, SC_rgb_small_odd) for one demo patient, each study with fresh UIDs, as
Part 10 files. `start_demo_pacs(folder)` starts Orthanc (the Debian package) on free loopback
ports with its storage in `folder`, or, when Orthanc is not installed, a small Study Root
Query/Retrieve SCP (C-ECHO, C-FIND, C-GET) on pynetdicom in a thread of this process;
`DemoPacs.load(paths)` stores the files in it and `DemoPacs.stop()` ends it. Only the demo
uses this module.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid

ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
PACS_AE = "DEMOPACS"
PATIENT_ID = "DEMO-0002"


class DemoPacsError(RuntimeError):
    """The embedded PACS could not be started or loaded."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class SampleStudy:
    study_uid: str
    modality: str
    description: str
    files: tuple[Path, ...]


# (pydicom test file, copies, modality label, study description, body part)
Sample = tuple[str, int, str, str, str]
SAMPLES: tuple[Sample, ...] = (
    ("CT_small.dcm", 2, "CT", "CT head without contrast", "HEAD"),
    ("MR_small.dcm", 1, "MR", "MR knee", "KNEE"),
    ("SC_rgb_small_odd.dcm", 1, "OT", "Secondary capture", ""),
)


def sample_studies(folder: Path, *, patient_id: str = PATIENT_ID, issuer: str = "",
                   patient_name: str = "DEMO^PACS", samples: tuple[Sample, ...] = SAMPLES,
                   accession_prefix: str = "DEMOACC") -> list[SampleStudy]:
    """Write the sample studies (fresh Study, Series and SOP Instance UIDs) into `folder`:
    one study per entry of `samples` (default: CT x2, MR x1, OT x1), all for one patient."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d")
    studies = []
    for n, (name, copies, modality, description, body_part) in enumerate(samples, start=1):
        source = get_testdata_file(name)
        if source is None:
            raise DemoPacsError(f"pydicom's test file {name} is missing")
        study_uid, series_uid = generate_uid(), generate_uid()
        files = []
        for i in range(1, copies + 1):
            ds = dcmread(str(source))
            sop = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = \
                study_uid, series_uid, sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.PatientID, ds.PatientName = patient_id, patient_name
            if issuer:
                ds.IssuerOfPatientID = issuer
            ds.AccessionNumber = f"{accession_prefix}{n}"
            ds.StudyID = str(n)
            ds.StudyDate, ds.StudyTime = stamp, "090000"
            ds.SeriesDate, ds.SeriesTime = stamp, "090500"
            ds.StudyDescription, ds.SeriesDescription = description, f"{description}, series 1"
            ds.SeriesNumber, ds.InstanceNumber = 1, i
            if body_part:
                ds.BodyPartExamined = body_part
            # Data Set Trailing Padding (CT_small has some): a PACS may drop it on storage
            # (Orthanc does), and the demo checks that what comes back is what the PACS holds.
            if 0xFFFCFFFC in ds:
                del ds[0xFFFCFFFC]
            path = folder / f"study{n}-{modality}-{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        studies.append(SampleStudy(study_uid, modality, description, tuple(files)))
    return studies


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the Part 10 file meta group (what a PACS sends, untouched)."""
    data = path.read_bytes()
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError(f"{path} is not a Part 10 file with a file meta group length")
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length:]


class DemoPacs:
    """A running PACS: `kind` says which one, `dicom_port` and `aet` how to reach it."""

    kind = "PACS"

    def __init__(self, dicom_port: int, aet: str, directory: Path):
        self.dicom_port = dicom_port
        self.aet = aet
        self.directory = directory
        self.loaded: list[Path] = []

    @property
    def pid(self) -> int:
        return os.getpid()

    def load(self, paths: list[Path]) -> None:
        self.loaded.extend(paths)

    def ready(self) -> bool:
        return _wait_port(self.dicom_port)

    def exited(self) -> int | None:
        """The exit status when the PACS process ended, else None."""
        return None

    def request_stop(self) -> None:
        """Ask the PACS to stop without waiting for it (`stop` then waits): several PACSes
        asked first stop together."""

    def stop(self) -> None:
        raise NotImplementedError


class OrthancPacs(DemoPacs):
    """The Debian package's Orthanc in a child process; files go in with its REST API."""

    kind = "Orthanc"

    def __init__(self, binary: str, folder: Path, aet: str = PACS_AE):
        super().__init__(_free_port(), aet, folder)
        self.http_port = _free_port()
        storage = folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "xdsi-demo-pacs", "StorageDirectory": str(storage),
            "IndexDirectory": str(storage), "StorageCompression": False,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "HttpServerEnabled": True, "HttpPort": self.http_port,
            "DicomServerEnabled": True, "DicomAet": self.aet, "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True, "DicomCheckModalityHost": False,
            "DicomModalities": {}, "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True, "DicomScuTimeout": 10,
            "OverwriteInstances": False, "Plugins": [], "ConcurrentJobs": 2,
            "SaveJobs": False,
        }
        path = folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        with (folder / "orthanc.log").open("wb") as log:
            self.process = subprocess.Popen([binary, "--logdir=" + str(folder), str(path)],
                                            stdout=log, stderr=subprocess.STDOUT, cwd=folder)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._stopping = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def load(self, paths: list[Path]) -> None:
        for path in paths:
            req = urllib.request.Request(
                f"http://127.0.0.1:{self.http_port}/instances", data=path.read_bytes(),
                method="POST", headers={"Content-Type": "application/dicom"})
            try:
                with self._opener.open(req, timeout=30) as resp:
                    answer = json.loads(resp.read() or b"{}")
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise DemoPacsError(f"Orthanc did not store {path.name}: {exc}") from exc
            if not isinstance(answer, dict) or "ID" not in answer:
                raise DemoPacsError(f"Orthanc refused {path.name}: {answer!r}")
        super().load(paths)

    def ready(self) -> bool:
        try:
            with self._opener.open(f"http://127.0.0.1:{self.http_port}/system", timeout=2):
                pass
        except (urllib.error.URLError, ConnectionError, OSError):
            return False
        return _wait_port(self.dicom_port)

    def exited(self) -> int | None:
        return self.process.poll()

    def request_stop(self) -> None:
        if self.process.poll() is None and not self._stopping:
            self.process.terminate()  # Orthanc takes 2 to 3 s to wind down
            self._stopping = True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.request_stop()
            try:
                self.process.wait(timeout=15)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                self.process.kill()
                self.process.wait()


# --- the fallback: a small Query/Retrieve SCP on pynetdicom, in this process ----------------

_UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_LEVEL_KEY = {"STUDY": ("StudyInstanceUID",),
              "SERIES": ("StudyInstanceUID", "SeriesInstanceUID"),
              "IMAGE": ("SOPInstanceUID",)}


def _text(value: object) -> str:
    """An element value as DICOM text: multiple values joined with a backslash."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _matches(record: Dataset, query: Dataset) -> bool:
    """DICOM matching (PS3.4 C.2.2.2) of one record, for the kinds the gateway sends: UID
    lists, date ranges, wildcards, single values; empty keys match anything."""
    for elem in query:
        keyword = elem.keyword
        if keyword in ("QueryRetrieveLevel", "SpecificCharacterSet") or elem.VR == "SQ":
            continue
        wanted = _text(elem.value)
        if wanted in ("", "*"):
            continue
        have = _text(record.get(keyword, ""))
        if keyword in _UID_KEYS:
            if have not in wanted.split("\\"):
                return False
        elif elem.VR in ("DA", "TM", "DT") and "-" in wanted:
            low, _, high = wanted.partition("-")
            if not have or (low and have < low) or (high and have > high):
                return False
        elif "*" in wanted or "?" in wanted:
            if not fnmatch.fnmatchcase(have, wanted):
                return False
        elif keyword == "ModalitiesInStudy":
            if not set(wanted.split("\\")) & set(have.split("\\")):
                return False
        elif have != wanted:
            return False
    return True


class PynetdicomPacs(DemoPacs):
    """A Study Root Q/R SCP (C-ECHO, C-FIND, C-GET) on pynetdicom in a thread of this process,
    serving the loaded files (read again for each C-GET)."""

    kind = "pynetdicom Q/R SCP"

    def __init__(self, folder: Path, aet: str = PACS_AE):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
            Verification,
        )

        super().__init__(_free_port(), aet, folder)
        self.headers: dict[str, tuple[Path, Dataset]] = {}
        self._lock = threading.Lock()
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        ae = AE(ae_title=self.aet)
        ae.require_called_aet = True
        ae.maximum_associations = 64  # the gateway runs parallel associations per retrieve
        for cx in StoragePresentationContexts:  # C-GET: we store to the requestor
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES,
                                     scu_role=False, scp_role=True)
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        handlers: list[Any] = [(evt.EVT_C_FIND, self._on_find), (evt.EVT_C_GET, self._on_get)]
        server = ae.start_server(("127.0.0.1", self.dicom_port), block=False,
                                 evt_handlers=handlers)
        if server is None:
            raise DemoPacsError("pynetdicom did not start its Q/R SCP")
        self.server = server

    def load(self, paths: list[Path]) -> None:
        for path in paths:
            ds = dcmread(str(path), stop_before_pixels=True)
            with self._lock:
                self.headers[str(ds.SOPInstanceUID)] = (path, ds)
        super().load(paths)

    def _records(self, level: str) -> list[Dataset]:
        with self._lock:
            instances = [ds for _path, ds in self.headers.values()]
        if level == "IMAGE":
            return instances
        groups: dict[tuple[str, ...], list[Dataset]] = {}
        for ds in instances:
            groups.setdefault(tuple(str(ds.get(k, "")) for k in _LEVEL_KEY[level]),
                              []).append(ds)
        records = []
        for members in groups.values():
            record = Dataset()
            record.update(members[0])
            if level == "STUDY":
                record.ModalitiesInStudy = sorted({str(m.Modality) for m in members})
                record.NumberOfStudyRelatedInstances = len(members)
                record.NumberOfStudyRelatedSeries = len({str(m.SeriesInstanceUID)
                                                         for m in members})
            else:
                record.NumberOfSeriesRelatedInstances = len(members)
            records.append(record)
        return records

    def _on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        level = str(query.get("QueryRetrieveLevel", ""))
        if level not in _LEVEL_KEY:
            yield 0xC000, None
            return
        for record in self._records(level):
            if event.is_cancelled:
                yield 0xFE00, None
                return
            if _matches(record, query):
                answer = Dataset()
                answer.QueryRetrieveLevel = level
                for elem in query:
                    if elem.keyword and elem.keyword != "QueryRetrieveLevel":
                        value = record.get(elem.keyword)
                        setattr(answer, elem.keyword, "" if value is None else value)
                answer.RetrieveAETitle = self.aet
                yield 0xFF00, answer

    def _on_get(self, event: Any) -> Iterator[int | tuple[int, Dataset | None]]:
        with self._lock:
            matched = [path for path, ds in self.headers.values()
                       if _matches(ds, event.identifier)]
        yield len(matched)
        for path in matched:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, dcmread(str(path))

    def stop(self) -> None:
        self.server.shutdown()


def orthanc_binary() -> str | None:
    found = shutil.which("Orthanc")
    if found:
        return found
    return next((c for c in ORTHANC_CANDIDATES if Path(c).is_file()), None)


def start_demo_pacs(folder: Path, *, kind: str | None = None, timeout: float = 30.0,
                    aet: str = PACS_AE) -> DemoPacs:
    """Orthanc when installed, else a pynetdicom Q/R SCP; both on loopback, AE title `aet`.

    `kind` ("auto", "orthanc" or "pynetdicom"; default: the XDSI_DEMO_PACS environment
    variable, else "auto") picks one."""
    kind = (kind or os.environ.get("XDSI_DEMO_PACS") or "auto").lower()
    if kind not in ("auto", "orthanc", "pynetdicom"):
        raise DemoPacsError(f"unknown PACS kind {kind!r}: expected auto, orthanc or pynetdicom")
    folder.mkdir(parents=True, exist_ok=True)
    binary = orthanc_binary() if kind != "pynetdicom" else None
    if kind == "orthanc" and binary is None:
        raise DemoPacsError("Orthanc is not installed (Debian package orthanc)")
    pacs: DemoPacs = OrthancPacs(binary, folder, aet) if binary else PynetdicomPacs(folder, aet)
    deadline = time.monotonic() + timeout
    try:
        while not pacs.ready():
            status = pacs.exited()
            if status is not None:
                raise DemoPacsError(f"{pacs.kind} exited with status {status} at start; "
                                    f"see {folder}")
            if time.monotonic() > deadline:
                raise DemoPacsError(f"{pacs.kind} did not answer within {timeout:.0f} s")
            time.sleep(0.1)
    except BaseException:
        pacs.stop()
        raise
    return pacs
