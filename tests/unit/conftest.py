"""Registry database fixtures: the same tests on SQLite and on PostgreSQL.

- `postgres_server` (session): a private PostgreSQL 15 on loopback (tests/support/postgres.py),
  or the server XDSI_TEST_POSTGRES_URL names. It fails, not skips, when PostgreSQL is missing.
- `registry_url`: parametrized over "sqlite" and "postgresql"; a fresh, empty registry
  database for each test: a temp SQLite file, or a new PostgreSQL database copied from a
  template that already holds the tables (dropped again after the test). On an external
  server the tables are dropped instead, so the tests there run one at a time.
- `registry_store`: a `RegistryStore` on `registry_url`, closed after the test.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine

from gateway.registry.schema import metadata
from gateway.registry.store import RegistryStore, engine_url
from tests.support.postgres import PostgresMissing, PostgresServer, server_or_external

TEMPLATE = "xdsi_registry_template"
_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        with server_or_external() as server:
            if not server.external:
                _make_template(server)
            yield server
    except PostgresMissing as exc:
        pytest.fail(str(exc), pytrace=False)


def _admin(server: PostgresServer) -> psycopg.Connection:
    user, _, password = server.user.partition(":")
    return psycopg.connect(host=server.host, port=server.port, user=user,
                           password=password or None, dbname="postgres", autocommit=True)


def _make_template(server: PostgresServer) -> None:
    with _admin(server) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
    engine = create_engine(engine_url(server.admin_url(TEMPLATE)))
    metadata.create_all(engine)
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    if server.external:
        engine = create_engine(engine_url(server.url))
        metadata.drop_all(engine)
        engine.dispose()
        yield server.url
        return
    name = f"xdsi_t{os.getpid()}_{next(_numbers)}"
    with _admin(server) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}" STRATEGY FILE_COPY')
    try:
        yield server.admin_url(name)
    finally:
        with _admin(server) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def registry_store(registry_url: str) -> Iterator[RegistryStore]:
    store = RegistryStore(registry_url)
    try:
        yield store
    finally:
        store.close()
