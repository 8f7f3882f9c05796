"""In-process gateway services over a temporary SQLite registry and file repository.

`community_services(tmp, home_community_id, repository_unique_id, authority=...)` builds the
configuration the handler tests share (TLS off, the NIST imaging source, a patient id assigning
authority), a `Services` over it and an empty spool folder, for handlers called directly
without a server.
"""

from __future__ import annotations

from pathlib import Path

from gateway.config import from_dict
from gateway.registry.store import RegistryStore
from gateway.repository.store import DocumentStore
from gateway.services import Services

NIST_XCA_AUTHORITY = "1.3.6.1.4.1.21367.2005.13.20.1000"


def community_services(tmp: Path, home_community_id: str, repository_unique_id: str, *,
                       authority: str = NIST_XCA_AUTHORITY) -> tuple[Services, Path]:
    """Return (services, spool folder) for a community whose stores live under `tmp`."""
    cfg = from_dict({
        "tls": {"enabled": False, "require_client_certificate": False},
        "community": {"home_community_id": home_community_id,
                      "repository_unique_id": repository_unique_id,
                      "imaging_source_unique_id": "1.3.6.1.4.1.21367.13.72.200",
                      "patient_id_assigning_authority": authority},
        "registry": {"database": f"sqlite:///{tmp / 'registry.db'}"},
        "repository": {"directory": str(tmp / "repository")},
    }, base=tmp)
    spool = tmp / "spool"
    spool.mkdir()
    services = Services(config=cfg, registry=RegistryStore(cfg.registry.database),
                        documents=DocumentStore(cfg.repository.directory))
    return services, spool
