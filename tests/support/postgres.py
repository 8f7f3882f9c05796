"""A private PostgreSQL server for tests and benchmarks: initdb in a temp folder, loopback only.

`private_server()` is a context manager that yields a `PostgresServer`: a cluster made with
the Debian binaries (/usr/lib/postgresql/<version>/bin, newest first) in a fresh temp folder,
started with pg_ctl on 127.0.0.1 and a free port, its unix socket in the same folder, fsync
off (throw-away data), trust authentication for the `postgres` role, and one database
(`xdsi_test` unless told otherwise). When the process runs as root the cluster belongs to the
`postgres` system user (initdb refuses root) and the commands run through runuser. At the end
the server is stopped (fast) and the folder removed.

`server_or_external()` honours XDSI_TEST_POSTGRES_URL: with it set, that server is used as is
and nothing is started. Without a PostgreSQL installation it raises `PostgresMissing` with a
clear message; test fixtures turn that into a failure (`make test` installs PostgreSQL).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ENV_URL = "XDSI_TEST_POSTGRES_URL"
DEFAULT_DATABASE = "xdsi_test"


class PostgresMissing(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


@dataclass(frozen=True)
class PostgresServer:
    """A running server: `url` names its database; `admin_url(db)` any other database."""

    host: str
    port: int
    user: str
    database: str
    external: bool = False

    @property
    def url(self) -> str:
        return self.admin_url(self.database)

    def admin_url(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"


def find_bin_dir() -> Path:
    """The bin folder of the newest installed PostgreSQL (Debian layout)."""
    candidates = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")
                  if (Path(p) / "initdb").exists() and (Path(p) / "pg_ctl").exists()]

    def version(p: Path) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in p.parent.name.split("."))
        except ValueError:
            return (0,)

    if not candidates:
        raise PostgresMissing(
            "PostgreSQL is not installed: no initdb/pg_ctl under /usr/lib/postgresql/*/bin. "
            "Install the Debian package `postgresql` (make test does), or point "
            f"{ENV_URL} at a server (postgresql://user@host:port/database).")
    return max(candidates, key=version)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_owner(argv: list[str], owner: str | None) -> list[str]:
    if owner is None:
        return argv
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", owner, "--", *argv]
    return ["su", owner, "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in argv)]


def _run(argv: list[str], owner: str | None, *, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_as_owner(argv, owner), cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


@contextmanager
def private_server(database: str = DEFAULT_DATABASE, *,
                   settings: dict[str, str] | None = None,
                   base_dir: str | None = None) -> Iterator[PostgresServer]:
    """Start a throw-away PostgreSQL on loopback; stop it and remove its files at the end.

    `settings` adds server options (for instance shared_buffers for a benchmark).
    """
    bin_dir = find_bin_dir()
    owner = None
    if os.geteuid() == 0:
        owner = "postgres"
    folder = Path(tempfile.mkdtemp(prefix="xdsi-pg-", dir=base_dir))
    try:
        if owner is not None:
            shutil.chown(folder, user=owner, group=None)
            os.chmod(folder, 0o700)
        data = folder / "data"
        done = _run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
                     "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
                    owner, cwd=folder)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
        options = {"listen_addresses": "127.0.0.1", "unix_socket_directories": str(folder),
                   "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                   "max_connections": "200", **(settings or {})}
        port = 0
        for attempt in range(3):
            port = _free_port()
            opts = " ".join([f"-p {port}", *(f"-c {k}={v}" for k, v in options.items())])
            done = _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l",
                         str(folder / "server.log"), "-w", "-t", "60", "-o", opts, "start"],
                        owner, cwd=folder)
            if done.returncode == 0:
                break
            if attempt == 2:
                log = (folder / "server.log")
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()}\n{tail}")
        try:
            server = PostgresServer("127.0.0.1", port, "postgres", database)
            _create_database(server, database)
            yield server
        finally:
            _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                 owner, cwd=folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _create_database(server: PostgresServer, database: str) -> None:
    import psycopg

    deadline = time.monotonic() + 20
    while True:
        try:
            conn = psycopg.connect(host=server.host, port=server.port, user=server.user,
                                   dbname="postgres", autocommit=True)
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                              (database,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{database}"')


def external_server() -> PostgresServer | None:
    """The server named by XDSI_TEST_POSTGRES_URL, if set."""
    url = os.environ.get(ENV_URL)
    if not url:
        return None
    from sqlalchemy.engine import make_url

    u = make_url(url.replace("postgresql://", "postgresql+psycopg://", 1))
    user = u.username or "postgres"
    if u.password:
        user = f"{user}:{u.password}"
    return PostgresServer(u.host or "127.0.0.1", u.port or 5432, user,
                          u.database or "postgres", external=True)


@contextmanager
def server_or_external(database: str = DEFAULT_DATABASE) -> Iterator[PostgresServer]:
    """XDSI_TEST_POSTGRES_URL's server when set, else a private one."""
    ext = external_server()
    if ext is not None:
        yield ext
        return
    with private_server(database) as server:
        yield server


__all__ = ["ENV_URL", "PostgresMissing", "PostgresServer", "external_server", "find_bin_dir",
           "private_server", "server_or_external"]
