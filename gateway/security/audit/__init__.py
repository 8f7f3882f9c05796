"""ATNA audit records (ITI-20): DICOM PS3.15 audit messages (messages), which record each
transaction gets (events), syslog over TLS or UDP (transport), the durable spool (spool) and
the per-process service with its sender thread (service). See gateway.security.audit.service.
"""

from __future__ import annotations

from gateway.security.audit.service import AuditService, NullAudit, build_audit

__all__ = ["AuditService", "NullAudit", "build_audit"]
