"""`GET /health`: a small JSON status for load balancers and operators.

Reports the gateway version, the endpoint paths and the number of objects in the registry;
never any patient data. A registry that cannot be read makes the answer 503 with
status "error" (the exception type only, not its message: it may quote data).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from gateway import __version__
from gateway.transactions import Endpoint

log = logging.getLogger(__name__)

HEALTH_PATH = "/health"


def health_document(services: Any, endpoints: Iterable[Endpoint]) -> tuple[int, bytes]:
    """(HTTP status, JSON body) of the health check."""
    doc: dict[str, Any] = {
        "status": "ok",
        "version": __version__,
        "endpoints": [e.path for e in endpoints],
    }
    status = 200
    registry = getattr(services, "registry", None)
    if registry is None:
        doc["registry"] = None
    else:
        try:
            doc["registry"] = {"objects": int(registry.count())}
        except Exception as exc:
            log.error("health: registry not readable: %s", type(exc).__name__)
            doc["status"] = "error"
            doc["registry"] = {"error": type(exc).__name__}
            status = 503
    return status, json.dumps(doc, sort_keys=True).encode("utf-8")
