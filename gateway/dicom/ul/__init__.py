"""A small DICOM Upper Layer for the SCU side of C-GET, without pynetdicom's DUL thread and
event machinery: `pdu` (PDU bytes), `command` (DIMSE command sets), `link` (one association
over a socket). gateway.dicom.cget runs the C-GET receive loop on top of it."""
