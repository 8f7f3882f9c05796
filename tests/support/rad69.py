"""Helpers for RAD-69 tests and benchmarks: gateways configured for a PACS, RAD-69 request
bodies, synthetic CT studies, the NIST studies loaded into the test PACS and their instances,
the dataset part of a Part 10 file, and dcmtk getscu (the byte-exact reference)."""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import pydicom
from lxml import etree
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from gateway.ns import XDSB, XDSI

NIST_HOME = "urn:oid:1.3.6.1.4.1.21367.13.70.101"
NIST_SOURCE = "1.3.6.1.4.1.21367.13.71.101"  # the NIST iig tests' Imaging Document Source
EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
NIST_STUDIES = ("1.3.6.1.4.1.21367.201599.1.201606010958036",
                "1.3.6.1.4.1.21367.201599.1.201606010958040",
                "1.3.6.1.4.1.21367.201599.1.201606021454002",
                "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322")  # the last: pydicom CT_small


class LoadedPacs(Protocol):
    """A test PACS and the files loaded into it (tests.integration.conftest.OrthancFixture)."""

    files: list[Path]


def instances_of(pacs: LoadedPacs, study_uid: str) -> list[tuple[str, str, str]]:
    """(study, series, SOP instance UID) of each instance of `study_uid` loaded into `pacs`."""
    out = []
    for path in pacs.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.StudyInstanceUID == study_uid:
            triple = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            if triple not in out:
                out.append(triple)
    return out


def nist_instances(pacs: LoadedPacs) -> list[tuple[str, str, str]]:
    """`instances_of` every NIST study, in NIST_STUDIES order."""
    return [t for s in NIST_STUDIES for t in instances_of(pacs, s)]


def configure_pacs(config: Path, *, port: int, called_ae_title: str = "ORTHANC",
                   retrieve: str = "c-get", move_port: int = 11112,
                   move_ae_title: str = "XDSI-GW", imaging_source_unique_id: str = NIST_SOURCE,
                   associations: int = 3, timeout_seconds: int = 10,
                   dimse_engine: str | None = None, response_order: str | None = None) -> None:
    """Point a written gateway configuration at a PACS (rewrites the file in place).
    `dimse_engine` and `response_order` are written only when given (else the defaults)."""
    text = config.read_text()
    text = re.sub(r'(?m)^imaging_source_unique_id = ".*"$',
                  f'imaging_source_unique_id = "{imaging_source_unique_id}"', text)
    text += f"""
[pacs]
host = "127.0.0.1"
port = {port}
called_ae_title = "{called_ae_title}"
calling_ae_title = "XDSI-GW"
retrieve = "{retrieve}"
move_destination_ae_title = "{move_ae_title}"
move_port = {move_port}
associations = {associations}
timeout_seconds = {timeout_seconds}
"""
    if dimse_engine is not None:
        text += f'dimse_engine = "{dimse_engine}"\n'
    if response_order is not None:
        text += f'response_order = "{response_order}"\n'
    config.write_text(text)


def rad69_request(docs: Iterable[tuple[str, str, str]], syntaxes: Sequence[str], *,
                  repository: str = NIST_SOURCE,
                  home_community_id: str | None = None) -> etree._Element:
    """A RetrieveImagingDocumentSetRequest for (study, series, instance) triples."""
    root = etree.Element(f"{{{XDSI}}}RetrieveImagingDocumentSetRequest",
                         nsmap={"xdsi": XDSI, "xdsb": XDSB})
    studies: dict[str, dict[str, list[str]]] = {}
    for study, series, sop in docs:
        studies.setdefault(study, {}).setdefault(series, []).append(sop)
    for study, series_map in studies.items():
        st = etree.SubElement(root, f"{{{XDSI}}}StudyRequest", studyInstanceUID=study)
        for series, sops in series_map.items():
            se = etree.SubElement(st, f"{{{XDSI}}}SeriesRequest", seriesInstanceUID=series)
            for sop in sops:
                d = etree.SubElement(se, f"{{{XDSB}}}DocumentRequest")
                if home_community_id:
                    etree.SubElement(d, f"{{{XDSB}}}HomeCommunityId").text = home_community_id
                etree.SubElement(d, f"{{{XDSB}}}RepositoryUniqueId").text = repository
                etree.SubElement(d, f"{{{XDSB}}}DocumentUniqueId").text = sop
    tsl = etree.SubElement(root, f"{{{XDSI}}}TransferSyntaxUIDList")
    for ts in syntaxes:
        etree.SubElement(tsl, f"{{{XDSI}}}TransferSyntaxUID").text = ts
    return root


def dataset_bytes(source: Path | bytes) -> bytes:
    """The bytes after the Part 10 file meta group (what the PACS sent, untouched), of a
    file or of its bytes."""
    data = source if isinstance(source, bytes) else source.read_bytes()
    name = "instance" if isinstance(source, bytes) else str(source)
    assert data[128:132] == b"DICM", f"{name} is not a Part 10 file"
    # (0002,0000) UL group length, explicit VR little endian: tag 4 + VR 2 + len 2 + value 4
    assert data[132:136] == b"\x02\x00\x00\x00", f"{name}: no file meta group length first"
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length:]


def getscu(port: int, aet: str, study_uid: str, out_dir: Path, *,
           timeout: float = 120) -> list[Path]:
    """Fetch a whole study with dcmtk's getscu (TCP_NODELAY=1: Debian's dcmtk stalls on
    Nagle otherwise), bit-preserving (+B: written as received, not re-encoded). Returns the
    files written."""
    binary = shutil.which("getscu")
    assert binary, "dcmtk getscu is not installed (Debian package dcmtk)"
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TCP_NODELAY="1")
    subprocess.run([binary, "-S", "+B", "-aet", "GETSCU", "-aec", aet, "-od", str(out_dir),
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                    "127.0.0.1", str(port)], check=True, env=env, timeout=timeout,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return sorted(p for p in out_dir.iterdir() if p.is_file())


def getscu_reference(port: int, aet: str, studies: Iterable[str], out_dir: Path
                     ) -> dict[str, bytes]:
    """SOP Instance UID -> dataset bytes (`dataset_bytes`) of every instance of `studies` as
    getscu fetches them (into `out_dir`/<study>)."""
    reference: dict[str, bytes] = {}
    for study in studies:
        for f in getscu(port, aet, study, out_dir / study):
            reference[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = (
                dataset_bytes(f))
    return reference


def synthetic_ct_study(n: int, *, size: int, pixels: bytes, patient_id: str,
                       patient_name: str) -> tuple[str, str, list[tuple[str, bytes]]]:
    """(study UID, series UID, [(SOP instance UID, Part 10 bytes)]) of n CT instances of
    size x size 16-bit (12 stored) MONOCHROME2 pixels, all carrying `pixels`."""
    study, series = str(generate_uid()), str(generate_uid())
    files = []
    for k in range(n):
        sop = str(generate_uid())
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(CT)
        meta.MediaStorageSOPInstanceUID = UID(sop)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName = patient_id, patient_name
        ds.Modality, ds.InstanceNumber = "CT", k + 1
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = pixels
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        files.append((sop, buf.getvalue()))
    return study, series, files
