"""XDS-I.b DocumentEntry metadata for a KOS imaging manifest (RAD TF-3 4.68.4.1.2.1, MCWG).

`manifest_entry(kos, options, body_parts=...)` reads a manifest built by
`gateway.imaging.kos.build_manifest` and returns the `DocumentEntryValues` of its registry
entry: mimeType application/dicom, formatCode 1.2.840.10008.5.1.4.1.1.88.59 (coding scheme
1.2.840.10008.2.6.1), configurable classCode / typeCode and the other mandatory codes,
eventCodeList holding the modalities of the study (DCM) and the anatomic regions (SNOMED CT,
mapped from Body Part Examined with `region_for_body_part`), referenceIdList holding the
accession number, the Study Instance UID and the placer order number, serviceStart/StopTime
from the study's date and time, sourcePatientInfo, and the patient id in the affinity domain.

`BODY_PART_REGIONS` maps the Body Part Examined defined terms (DICOM PS3.16 Annex L) to the
SNOMED CT codes of CID 4031 "Common Anatomic Regions". Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from gateway.ebrim.build import (
    CodeValue,
    DocumentEntryValues,
    SubmissionSetValues,
    dtm_now,
)
from gateway.ns import MimeType, ReferenceIdType

KOS_FORMAT = CodeValue("1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.2.6.1",
                       "Key Object Selection Document")

# Body Part Examined (0018,0015) defined term -> CID 4031 code (SNOMED CT) and meaning.
BODY_PART_REGIONS: dict[str, tuple[str, str]] = {
    "ABDOMEN": ("818981001", "Abdomen"),
    "ABDOMENPELVIS": ("818982008", "Abdomen and Pelvis"),
    "ACJOINT": ("85856004", "Acromioclavicular joint"),
    "ANKLE": ("70258002", "Ankle joint"),
    "BLADDER": ("89837001", "Bladder"),
    "BREAST": ("76752008", "Breast"),
    "BRONCHUS": ("955009", "Bronchus"),
    "CALCANEUS": ("80144004", "Calcaneus"),
    "CHEST": ("816094009", "Chest"),
    "CHESTABDOMEN": ("416550000", "Chest and Abdomen"),
    "CHESTABDPELVIS": ("416775004", "Chest, Abdomen and Pelvis"),
    "CLAVICLE": ("51299004", "Clavicle"),
    "COCCYX": ("64688005", "Coccyx"),
    "COLON": ("71854001", "Colon"),
    "CSPINE": ("122494005", "Cervical spine"),
    "CTSPINE": ("1217257000", "Cervico-thoracic spine"),
    "DUODENUM": ("38848004", "Duodenum"),
    "ELBOW": ("16953009", "Elbow joint"),
    "ESOPHAGUS": ("32849002", "Esophagus"),
    "EXTREMITY": ("66019005", "Extremity"),
    "EYE": ("81745001", "Eye"),
    "FACE": ("91397008", "Facial bones"),
    "FEMUR": ("71341001", "Femur"),
    "FIBULA": ("87342007", "Fibula"),
    "FINGER": ("7569003", "Finger"),
    "FOOT": ("56459004", "Foot"),
    "FOREARM": ("14975008", "Forearm"),
    "GALLBLADDER": ("28231008", "Gallbladder"),
    "HAND": ("85562004", "Hand"),
    "HEAD": ("69536005", "Head"),
    "HEADNECK": ("774007", "Head and Neck"),
    "HEART": ("80891009", "Heart"),
    "HIP": ("29836001", "Hip"),
    "HUMERUS": ("85050009", "Humerus"),
    "IAC": ("361078006", "Internal Auditory Canal"),
    "JAW": ("661005", "Jaw region"),
    "KNEE": ("72696002", "Knee"),
    "LARYNX": ("4596009", "Larynx"),
    "LEG": ("30021000", "Lower leg"),
    "LOWERLIMB": ("61685007", "Lower limb"),
    "LSPINE": ("122496007", "Lumbar spine"),
    "LSSPINE": ("1217253001", "Lumbo-sacral spine"),
    "MANDIBLE": ("91609006", "Mandible"),
    "MEDIASTINUM": ("72410000", "Mediastinum"),
    "NECK": ("45048000", "Neck"),
    "NECKCHEST": ("417437006", "Neck and Chest"),
    "NECKCHESTABDOMEN": ("416152001", "Neck, Chest and Abdomen"),
    "NECKCHESTABDPELV": ("416319003", "Neck, Chest, Abdomen and Pelvis"),
    "ORBIT": ("363654007", "Orbital structure"),
    "PANCREAS": ("15776009", "Pancreas"),
    "PATELLA": ("64234005", "Patella"),
    "PELVIS": ("816092008", "Pelvis"),
    "PROSTATE": ("41216001", "Prostate"),
    "RECTUM": ("34402009", "Rectum"),
    "RIB": ("113197003", "Rib"),
    "SACRUM": ("54735007", "Sacrum"),
    "SCAPULA": ("79601000", "Scapula"),
    "SHOULDER": ("16982005", "Shoulder"),
    "SINUS": ("2095001", "Paranasal sinus"),
    "SKULL": ("89546000", "Skull"),
    "SPINE": ("421060004", "Spine"),
    "SSPINE": ("1217254007", "Sacro-coccygeal Spine"),
    "STERNUM": ("56873002", "Sternum"),
    "STOMACH": ("69695003", "Stomach"),
    "THIGH": ("68367000", "Thigh"),
    "THUMB": ("76505004", "Thumb"),
    "TLSPINE": ("1217256009", "Thoraco-lumbar spine"),
    "TMJ": ("53620006", "Temporomandibular joint"),
    "TOE": ("29707007", "Toe"),
    "TSPINE": ("122495006", "Thoracic spine"),
    "UPPERLIMB": ("53120007", "Upper limb"),
    "URETER": ("87953007", "Ureter"),
    "URETHRA": ("13648007", "Urethra"),
    "WHOLEBODY": ("38266002", "Entire body"),
    "WRIST": ("74670003", "Wrist joint"),
    "ZYGOMA": ("13881006", "Zygoma"),
}

# CID 29 "Acquisition Modality" (and KO/SR/PR that appear in studies): code -> meaning.
MODALITY_MEANINGS: dict[str, str] = {
    "CR": "Computed Radiography", "CT": "Computed Tomography", "DX": "Digital Radiography",
    "ES": "Endoscopy", "IO": "Intra-oral Radiography", "IVUS": "Intravascular Ultrasound",
    "MG": "Mammography", "MR": "Magnetic Resonance", "NM": "Nuclear Medicine",
    "OCT": "Optical Coherence Tomography", "OP": "Ophthalmic Photography",
    "OPT": "Ophthalmic Tomography", "PT": "Positron emission tomography", "PX":
    "Panoramic X-Ray", "RF": "Radio Fluoroscopy", "RG": "Radiographic imaging",
    "SM": "Slide Microscopy", "US": "Ultrasound", "XA": "X-Ray Angiography",
    "XC": "External-camera Photography", "GM": "General Microscopy", "BMD":
    "Bone Mineral Densitometry", "KO": "Key Object Selection", "SR": "SR Document",
    "PR": "Presentation State", "SEG": "Segmentation", "RTIMAGE": "RT Image",
    "RTSTRUCT": "RT Structure Set", "RTPLAN": "RT Plan", "RTDOSE": "RT Dose",
    "DOC": "Document", "OT": "Other",
}


def parse_code(text: str, *, default_scheme: str = "") -> CodeValue:
    """"code | scheme | display" (or "code | display" with `default_scheme`) -> CodeValue."""
    parts = [p.strip() for p in text.split("|")]
    if len(parts) == 3 and all(parts):
        return CodeValue(parts[0], parts[1], parts[2])
    if len(parts) == 2 and all(parts) and default_scheme:
        return CodeValue(parts[0], default_scheme, parts[1])
    expected = '"code | scheme | display"' + (' or "code | display"' if default_scheme else "")
    raise ValueError(f"expected {expected}, got {text!r}")


# Defaults for the codes an affinity domain chooses ([publish] overrides each of them).
DEFAULT_CLASS_CODE = CodeValue("IMAGES", "1.3.6.1.4.1.19376.1.2.6.1", "Images")
DEFAULT_TYPE_CODE = CodeValue("18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging study")
DEFAULT_CONFIDENTIALITY_CODE = CodeValue("N", "2.16.840.1.113883.5.25", "normal")
DEFAULT_FACILITY_TYPE_CODE = CodeValue("RADDX", "2.16.840.1.113883.5.10588",
                                       "Radiology diagnostics or therapeutics unit")
DEFAULT_PRACTICE_SETTING_CODE = CodeValue("394914008", "2.16.840.1.113883.6.96", "Radiology")
DEFAULT_CONTENT_TYPE_CODE = CodeValue("IMAGES", "1.3.6.1.4.1.19376.1.2.6.1", "Images")


@dataclass(frozen=True)
class MetadataOptions:
    """The affinity domain's choices for manifest entries (from [publish] and [community])."""

    patient_id_authority: str  # OID: the affinity domain's assigning authority
    source_patient_id_authority: str = ""  # OID of the PACS's ids; default: the domain's
    accession_number_authority: str = ""  # OID, for the referenceIdList accession CXi
    placer_order_authority: str = ""  # OID, for the referenceIdList order CXi
    class_code: CodeValue = DEFAULT_CLASS_CODE
    type_code: CodeValue = DEFAULT_TYPE_CODE
    confidentiality_code: CodeValue = DEFAULT_CONFIDENTIALITY_CODE
    healthcare_facility_type_code: CodeValue = DEFAULT_FACILITY_TYPE_CODE
    practice_setting_code: CodeValue = DEFAULT_PRACTICE_SETTING_CODE
    content_type_code: CodeValue = DEFAULT_CONTENT_TYPE_CODE
    modality_scheme: str = "DCM"
    region_scheme: str = "SCT"
    language_code: str = "en-US"
    # Extra or replacing body part mappings: defined term (upper case) -> code.
    body_part_overrides: Mapping[str, CodeValue] = field(default_factory=dict)


def region_for_body_part(body_part: str, options: MetadataOptions) -> CodeValue | None:
    """The SNOMED CT anatomic region of a Body Part Examined value, or None if unmapped."""
    key = body_part.strip().upper()
    override = options.body_part_overrides.get(key)
    if override is not None:
        return override
    found = BODY_PART_REGIONS.get(key)
    if found is None:
        return None
    return CodeValue(found[0], options.region_scheme, found[1])


def modality_code(modality: str, options: MetadataOptions) -> CodeValue:
    m = modality.strip().upper()
    return CodeValue(m, options.modality_scheme, MODALITY_MEANINGS.get(m, m))


def _cx(value: str, authority: str) -> str:
    return f"{value}^^^&{authority}&ISO" if authority else value


def _cxi(value: str, authority: str, id_type: str) -> str:
    hd = f"&{authority}&ISO" if authority else ""
    return f"{value}^^^{hd}^{id_type}"


def _clean(value: str) -> str:
    """A value for an HL7 v2 component: no delimiters (^ & ~ \\ |)."""
    return "".join(c for c in value.strip() if c not in "^&~\\|")


def _dtm(date: str, time: str) -> str | None:
    date = date.strip()
    if len(date) != 8 or not date.isdigit():
        return None
    digits = "".join(c for c in time.split(".")[0] if c.isdigit())[:6]
    return date + digits if len(digits) in (2, 4, 6) else date


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def reference_ids(kos: Dataset, options: MetadataOptions) -> tuple[str, ...]:
    """referenceIdList CXi values: accession number, Study Instance UID, placer order."""
    out: list[str] = []
    accession = _clean(_text(kos, "AccessionNumber"))
    if accession:
        out.append(_cxi(accession, options.accession_number_authority,
                        ReferenceIdType.ACCESSION))
    out.append(_cxi(str(kos.StudyInstanceUID), "", ReferenceIdType.STUDY_INSTANCE_UID))
    placers = []
    for req in kos.get("ReferencedRequestSequence", []):
        placer = _clean(_text(req, "PlacerOrderNumberImagingServiceRequest"))
        if placer and placer not in placers:
            placers.append(placer)
    out.extend(_cxi(p, options.placer_order_authority, ReferenceIdType.ORDER)
               for p in placers)
    return tuple(out)


def study_reference_id(study_uid: str) -> str:
    """The referenceIdList value by which a manifest of this study is found."""
    return _cxi(study_uid, "", ReferenceIdType.STUDY_INSTANCE_UID)


def event_codes(kos: Dataset, body_parts: Iterable[str],
                options: MetadataOptions) -> tuple[CodeValue, ...]:
    """Modalities of the study (KO excluded) then the mapped anatomic regions."""
    codes: list[CodeValue] = []
    modalities = kos.get("ModalitiesInStudy") or []
    if isinstance(modalities, str):  # pydicom: a single value is a str, not a list
        modalities = [modalities]
    for m in modalities:
        if str(m).strip() and str(m).strip().upper() != "KO":
            code = modality_code(str(m), options)
            if code not in codes:
                codes.append(code)
    for part in body_parts:
        region = region_for_body_part(part, options)
        if region is not None and region not in codes:
            codes.append(region)
    return tuple(codes)


def source_patient_info(kos: Dataset, patient_id: str) -> tuple[str, ...]:
    """PID-3, PID-5, PID-7, PID-8 as far as the manifest knows them."""
    info = [f"PID-3|{patient_id}"]
    name = _text(kos, "PatientName")
    if name:
        info.append(f"PID-5|{name.replace('|', ' ')}")
    birth = _text(kos, "PatientBirthDate")
    if len(birth) == 8 and birth.isdigit():
        info.append(f"PID-7|{birth}")
    sex = _text(kos, "PatientSex").upper()
    if sex in ("M", "F", "O", "U"):
        info.append(f"PID-8|{sex}")
    return tuple(info)


def affinity_patient_id(kos: Dataset, options: MetadataOptions) -> str:
    return _cx(_clean(_text(kos, "PatientID")), options.patient_id_authority)


def manifest_entry(kos: Dataset, options: MetadataOptions, *,
                   body_parts: Iterable[str] = (), service_stop: str | None = None,
                   creation_time: str | None = None, title: str = "",
                   entry_uuid: str | None = None) -> DocumentEntryValues:
    """The DocumentEntry values of one KOS manifest (its uniqueId is the SOP Instance UID)."""
    patient_id = affinity_patient_id(kos, options)
    local = _clean(_text(kos, "PatientID"))
    for other in kos.get("OtherPatientIDsSequence", []):
        local = _clean(_text(other, "PatientID")) or local
    source_authority = options.source_patient_id_authority or options.patient_id_authority
    source_patient_id = _cx(local, source_authority)
    start = _dtm(_text(kos, "StudyDate"), _text(kos, "StudyTime"))
    stop = service_stop or start
    if start and stop and stop < start:
        stop = start
    description = _text(kos, "StudyDescription")
    extra = {"entry_uuid": entry_uuid} if entry_uuid else {}
    return DocumentEntryValues(
        unique_id=str(kos.SOPInstanceUID),
        patient_id=patient_id,
        source_patient_id=source_patient_id,
        mime_type=MimeType.DICOM,
        title=title or (f"Imaging manifest: {description}" if description
                        else "Imaging manifest"),
        class_code=options.class_code,
        type_code=options.type_code,
        format_code=KOS_FORMAT,
        confidentiality_code=options.confidentiality_code,
        healthcare_facility_type_code=options.healthcare_facility_type_code,
        practice_setting_code=options.practice_setting_code,
        creation_time=creation_time or dtm_now(),
        language_code=options.language_code,
        event_codes=event_codes(kos, body_parts, options),
        reference_ids=reference_ids(kos, options),
        service_start_time=start,
        service_stop_time=stop if start else None,
        source_patient_info=source_patient_info(kos, source_patient_id),
        **extra,  # type: ignore[arg-type]
    )


def submission_set_values(unique_id: str, source_id: str, patient_id: str,
                          options: MetadataOptions, *, title: str = "") -> SubmissionSetValues:
    return SubmissionSetValues(unique_id=unique_id, source_id=source_id, patient_id=patient_id,
                               content_type_code=options.content_type_code,
                               title=title or "xdsi-gateway imaging manifest")
