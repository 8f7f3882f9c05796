"""The long-lived objects one worker process serves with, built once from the configuration."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import GatewayConfig
from gateway.registry.store import RegistryStore
from gateway.repository.store import DocumentStore


@dataclass
class Services:
    config: GatewayConfig
    registry: RegistryStore
    documents: DocumentStore


def build_services(config: GatewayConfig) -> Services:
    return Services(
        config=config,
        registry=RegistryStore(config.registry.database),
        documents=DocumentStore(config.repository.directory),
    )
