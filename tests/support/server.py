"""Run the real HTTPS server in a child process for integration tests.

`run_server(config_file, "module:factory")` starts
`python -m gateway.soap.server --config FILE --app module:factory --port N` on a free loopback
port, waits until the port accepts connections, yields a `RunningServer` and stops the
server with SIGTERM (then SIGKILL after a grace period) on the way out. The child's stdout and
stderr go to a log file (`RunningServer.log()`), shown in the error when it fails to start.

`write_config` writes a minimal valid gateway configuration for a test PKI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.config import GatewayConfig, load
from gateway.security.pki import DevPki

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    host: str
    port: int
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait for a graceful exit; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def run_server(config: Path | GatewayConfig, app: str, *, host: str = "127.0.0.1",
               port: int | None = None, log_level: str = "warning",
               timeout: float = 20.0) -> Iterator[RunningServer]:
    """Start the server for `config` (a TOML file, or a GatewayConfig read from one) serving
    the WSGI factory `app` ("module:callable"), on `host` and a free port; stop it after."""
    if isinstance(config, GatewayConfig):
        if config.source is None:
            raise ValueError("run_server: the GatewayConfig was not read from a file")
        config_file, loaded = config.source, config
    else:
        config_file, loaded = Path(config), load(Path(config))
    port = port or free_port(host)
    scheme = "https" if loaded.tls.enabled else "http"
    url_host = f"[{host}]" if ":" in host else host
    log_fd, log_name = tempfile.mkstemp(prefix="xdsi-server-", suffix=".log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.soap.server", "--config", str(config_file),
             "--app", app, "--host", host, "--port", str(port), "--log-level", log_level],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd)
    finally:
        os.close(log_fd)
    server = RunningServer(process, host, port, f"{scheme}://{url_host}:{port}", Path(log_name))
    try:
        deadline = time.monotonic() + timeout
        while not _accepts(host, port):
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with status {process.returncode} at "
                                   f"start:\n{server.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not accept connections within "
                                   f"{timeout:.0f} s:\n{server.log()}")
            time.sleep(0.05)
        yield server
    finally:
        server.stop()
        with contextlib.suppress(OSError):
            os.unlink(log_name)


def write_config(path: Path, pki: DevPki | None, *, tls_enabled: bool = True,
                 require_client_certificate: bool = True, workers: int = 2, threads: int = 2,
                 port: int = 8443, extra: str = "") -> Path:
    """A minimal valid configuration file using `pki` (None with `tls_enabled=False`)."""
    tls = f"enabled = {str(tls_enabled).lower()}\n"
    tls += f"require_client_certificate = {str(require_client_certificate).lower()}\n"
    if tls_enabled:
        if pki is None:
            raise ValueError("write_config: TLS needs a PKI")
        tls += (f'certificate = "{pki.server_cert}"\nprivate_key = "{pki.server_key}"\n'
                f'ca_bundle = "{pki.ca_cert}"\n')
    path.write_text(f"""\
[server]
host = "127.0.0.1"
port = {port}
workers = {workers}
threads = {threads}
request_timeout_seconds = 30

[tls]
{tls}
[community]
home_community_id = "urn:oid:1.3.6.1.4.1.21367.2017.2.6.19"
repository_unique_id = "1.3.6.1.4.1.21367.2017.2.3.19"
imaging_source_unique_id = "1.3.6.1.4.1.21367.2017.2.3.20"
patient_id_assigning_authority = "1.3.6.1.4.1.21367.2005.13.20.1000"

[registry]
database = "sqlite:///{path.parent / 'registry.db'}"

[repository]
directory = "{path.parent / 'repository'}"
{extra}""")
    return path
