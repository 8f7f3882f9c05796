"""The long-lived objects one worker process serves with, built once from the configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.config import GatewayConfig
from gateway.registry.store import RegistryStore
from gateway.repository.store import DocumentStore
from gateway.security.audit import AuditService, NullAudit, build_audit


@dataclass
class Services:
    config: GatewayConfig
    registry: RegistryStore
    documents: DocumentStore
    # ATNA audit records (ITI-20): record_transaction(...) / record_outbound(...); a no-op
    # NullAudit when [audit] transport is "none".
    audit: AuditService | NullAudit = field(default_factory=NullAudit)


def build_services(config: GatewayConfig) -> Services:
    return Services(
        config=config,
        registry=RegistryStore(config.registry.database),
        documents=DocumentStore(config.repository.directory),
        audit=build_audit(config),
    )
