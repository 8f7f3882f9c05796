"""A private rsyslog as the ATNA Audit Record Repository of the audit tests and benchmark.

`start_rsyslog(directory, ca=..., certificate=..., private_key=...)` writes its own rsyslog
configuration in `directory` (imtcp with the gtls stream driver: RFC 5425 syslog over TLS,
octet-counted framing, client certificates required and checked against `ca`; imudp: RFC
5426; everything received written one message per line to `received.log`), starts the Debian
`rsyslogd -n -f CONF` with its own pid file and work folder on loopback ports, and waits until
both inputs take messages. `RunningRsyslog.stop()` / `.start()` stop and start it again on the
same ports and file; `.records()` gives every received syslog message, parsed.

A missing rsyslogd (or its gtls module) is a test failure, not a skip: `make test` installs
the Debian packages rsyslog and rsyslog-gnutls.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

GTLS_MODULE_DIRS = ("/usr/lib/x86_64-linux-gnu/rsyslog", "/usr/lib/aarch64-linux-gnu/rsyslog",
                    "/usr/lib/rsyslog")
PROBE = "xdsi-rsyslog-probe"


def rsyslogd_binary() -> str:
    found = shutil.which("rsyslogd") or next(
        (p for p in ("/usr/sbin/rsyslogd", "/sbin/rsyslogd") if Path(p).is_file()), None)
    if not found:
        pytest.fail("rsyslogd is not installed (Debian package 'rsyslog'; `make test` "
                    "installs it)")
    if not any(Path(d, "lmnsd_gtls.so").is_file() for d in GTLS_MODULE_DIRS):
        pytest.fail("rsyslog's TLS driver is not installed (Debian package 'rsyslog-gnutls')")
    return found


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class SyslogRecord:
    """One received RFC 5424 message."""

    pri: int
    version: str
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    msg: bytes


def parse_line(line: str) -> SyslogRecord:
    """`<PRI>1 TIMESTAMP HOST APP PROCID MSGID SD MSG` (rsyslog's %rawmsg%; its
    control-character escaping keeps one message per line)."""
    if not line.startswith("<") or ">" not in line:
        raise ValueError(f"not a syslog message: {line[:80]!r}")
    pri, _, rest = line[1:].partition(">")
    parts = rest.split(" ", 7)
    if len(parts) < 8:
        raise ValueError(f"not an RFC 5424 message: {line[:80]!r}")
    version, ts, host, app, procid, msgid, sd, msg = parts
    return SyslogRecord(int(pri), version, ts, host, app, procid, msgid, sd,
                        msg.encode("utf-8"))


class RunningRsyslog:
    def __init__(self, directory: Path, config: Path, tcp_port: int, udp_port: int,
                 output: Path):
        self.directory = directory
        self.config = config
        self.tcp_port = tcp_port
        self.udp_port = udp_port
        self.output = output
        self.process: subprocess.Popen[bytes] | None = None

    # --- life cycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        pidfile = self.directory / "rsyslogd.pid"
        pidfile.unlink(missing_ok=True)
        log = (self.directory / "rsyslogd.out").open("ab")
        self.process = subprocess.Popen(
            [rsyslogd_binary(), "-n", "-f", str(self.config), "-i", str(pidfile)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.directory,
            env={**os.environ, "RSYSLOG_DEBUG": ""})
        log.close()
        deadline = time.monotonic() + timeout
        while not self._tcp_listening():
            self._check_alive()
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"rsyslogd did not listen on {self.tcp_port} within {timeout} s; "
                            f"see {self.directory}/rsyslogd.out")
            time.sleep(0.05)
        self._wait_udp(deadline)

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            out = (self.directory / "rsyslogd.out").read_text(errors="replace")[-2000:]
            pytest.fail(f"rsyslogd exited with status {self.process.returncode}: {out}")

    def _tcp_listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.tcp_port), timeout=0.5):
                return True
        except OSError:
            return False

    def _wait_udp(self, deadline: float) -> None:
        """imudp has no handshake: send probes until one is written out."""
        marker = f"{PROBE}-{time.monotonic_ns()}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            while True:
                s.sendto(f"<14>1 - - probe - - - {marker}".encode(),
                         ("127.0.0.1", self.udp_port))
                time.sleep(0.05)
                if self.output.is_file() and marker in self.output.read_text(errors="replace"):
                    return
                self._check_alive()
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail("rsyslogd's UDP input did not answer")

    def stop(self, timeout: float = 15.0, *, kill: bool = False) -> None:
        """SIGTERM (an orderly stop) or, with `kill`, SIGKILL (a crash)."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # --- what arrived --------------------------------------------------------------------------

    def lines(self) -> list[str]:
        if not self.output.is_file():
            return []
        return [ln for ln in self.output.read_text("utf-8", errors="replace").splitlines()
                if ln and PROBE not in ln]

    def records(self) -> list[SyslogRecord]:
        return [parse_line(ln) for ln in self.lines()]

    def wait_for(self, count: int, timeout: float = 20.0) -> list[SyslogRecord]:
        """At least `count` records (returns what arrived when the time is up)."""
        deadline = time.monotonic() + timeout
        while True:
            recs = self.records()
            if len(recs) >= count or time.monotonic() > deadline:
                return recs
            time.sleep(0.05)


def write_config(directory: Path, *, ca: Path, certificate: Path, private_key: Path,
                 tcp_port: int, udp_port: int, output: Path) -> Path:
    work = directory / "work"
    work.mkdir(parents=True, exist_ok=True)
    conf = directory / "rsyslog.conf"
    conf.write_text(f"""\
# A private rsyslog: the Audit Record Repository of the xdsi-gateway audit tests.
global(
  workDirectory="{work}"
  maxMessageSize="256k"
  DefaultNetstreamDriver="gtls"
  DefaultNetstreamDriverCAFile="{ca}"
  DefaultNetstreamDriverCertFile="{certificate}"
  DefaultNetstreamDriverKeyFile="{private_key}"
)
# RFC 5425: syslog over TLS; imtcp reads octet-counted framing (RFC 6587 3.4.1) by default.
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1"
       StreamDriver.AuthMode="x509/certvalid" MaxSessions="64")
input(type="imtcp" address="127.0.0.1" port="{tcp_port}" ruleset="audit"
      SupportOctetCountedFraming="on")
# RFC 5426: syslog over UDP.
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{udp_port}" ruleset="audit")
main_queue(queue.type="Direct")
template(name="raw" type="string" string="%rawmsg%\\n")
ruleset(name="audit") {{
  action(type="omfile" file="{output}" template="raw" flushOnTXEnd="on" asyncWriting="off")
}}
""")
    return conf


def start_rsyslog(directory: Path, *, ca: Path, certificate: Path, private_key: Path,
                  tcp_port: int | None = None, udp_port: int | None = None) -> RunningRsyslog:
    directory.mkdir(parents=True, exist_ok=True)
    tcp_port = tcp_port or free_port()
    udp_port = udp_port or free_port(socket.SOCK_DGRAM)
    output = directory / "received.log"
    conf = write_config(directory, ca=ca, certificate=certificate, private_key=private_key,
                        tcp_port=tcp_port, udp_port=udp_port, output=output)
    server = RunningRsyslog(directory, conf, tcp_port, udp_port, output)
    server.start()
    return server
