"""The `xdsi-gateway` command (gateway/cli.py): pki, check-config, serve, version, bad usage.

Each subcommand is run in-process through `gateway.cli.main([...])`, and the parts an operator
meets first (pki, check-config, serve with a bad file) also through the installed console
script in a subprocess, to check exit statuses and that errors never show a traceback.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

import gateway
from gateway.cli import main
from gateway.demo import write_config
from gateway.security.pki import create_ca, create_dev_pki, load_certificate
from tests.unit.test_config import dump_toml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".venv" / "bin" / "xdsi-gateway"
PKI_FILES = ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "client.pem",
             "client-key.pem")


def run_script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    assert SCRIPT.is_file(), f"console script not installed at {SCRIPT}"
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def assert_chains(folder: Path, hostname: str = "localhost") -> None:
    """server.pem and client.pem are issued by ca.pem, for the right purposes."""
    ca = load_certificate(folder / "ca.pem")
    server = load_certificate(folder / "server.pem")
    client = load_certificate(folder / "client.pem")
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    chain = (PolicyBuilder().store(Store([ca]))
             .build_server_verifier(x509.DNSName(hostname)).verify(server, []))
    assert chain == [server, ca]
    # (cryptography's client verifier wants a subjectAltName on client certificates, which
    # TLS does not; the client certificate is checked by signature and purpose instead.)
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
    # Another CA of the same name does not vouch for it.
    other_ca, _key = create_ca()
    with pytest.raises(VerificationError):
        (PolicyBuilder().store(Store([other_ca]))
         .build_server_verifier(x509.DNSName(hostname)).verify(server, []))


@pytest.fixture
def good_config(tmp_path: Path) -> Path:
    """A loopback configuration beside a development PKI (test_config covers the example)."""
    return write_config(tmp_path, create_dev_pki(tmp_path / "pki"), 8443)


def edited(path: Path, section: str, key: str, value: object) -> Path:
    raw = tomllib.loads(path.read_text())
    raw.setdefault(section, {})[key] = value
    bad = path.with_name("bad.toml")
    bad.write_text(dump_toml(raw))
    return bad


# --- pki -----------------------------------------------------------------------------------

def test_pki_in_process_writes_a_chaining_dev_pki(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "new" / "pki"
    assert main(["pki", str(folder), "--hostname", "gw.example.test",
                 "--hostname", "localhost"]) == 0
    out = capsys.readouterr().out
    assert "DEVELOPMENT" in out and "never for production" in out
    for name in PKI_FILES:
        assert (folder / name).is_file()
    for name in ("ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem"):
        assert str(folder / name) in out  # what a user needs is printed; the CA key is not
    assert_chains(folder, "gw.example.test")
    assert_chains(folder, "localhost")
    with pytest.raises(VerificationError):
        assert_chains(folder, "other.example.test")


def test_pki_console_script_writes_a_chaining_dev_pki(tmp_path: Path) -> None:
    folder = tmp_path / "pki"
    result = run_script("pki", str(folder))
    assert result.returncode == 0, result.stderr
    assert "DEVELOPMENT PKI" in result.stdout
    assert str(folder / "client.pem") in result.stdout
    assert {p.name for p in folder.iterdir()} >= set(PKI_FILES)
    assert_chains(folder)


def test_pki_into_a_file_is_an_error_without_traceback(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_script("pki", str(blocker / "pki"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot write the PKI")
    assert "Traceback" not in result.stderr


# --- check-config --------------------------------------------------------------------------

def test_check_config_ok_in_process(good_config: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(good_config)]) == 0
    out = capsys.readouterr().out
    assert f"{good_config}: OK" in out
    assert "urn:oid:1.3.6.1.4.1.21367.2017.2.6.19" in out


def test_check_config_ok_console_script(good_config: Path) -> None:
    result = run_script("check-config", "--config", str(good_config))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize(("section", "key", "value", "label"), [
    ("server", "port", 70000, "[server] port:"),
    ("pacs", "called_ae_title", "ORTHANC\\1", "[pacs] called_ae_title:"),
    ("community", "home_community_id", "1.2.3", "[community] home_community_id:"),
    ("tls", "bogus", 1, "[tls] bogus: unknown key"),
])
def test_check_config_bad_value_in_process(good_config: Path,
                                           capsys: pytest.CaptureFixture[str], section: str,
                                           key: str, value: object, label: str) -> None:
    bad = edited(good_config, section, key, value)
    assert main(["check-config", "--config", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"configuration error: {label}")
    assert "OK" not in captured.out


def test_check_config_bad_file_console_script(good_config: Path) -> None:
    bad = edited(good_config, "registry", "max_results", 0)
    result = run_script("check-config", "--config", str(bad))
    assert result.returncode == 2
    assert result.stderr.startswith("configuration error: [registry] max_results:")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_check_config_missing_file(tmp_path: Path) -> None:
    result = run_script("check-config", "--config", str(tmp_path / "none.toml"))
    assert result.returncode == 2
    assert "configuration error:" in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_loads_the_tls_files(good_config: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    # The certificate exists but is not a certificate: named at check time, not at serve time.
    (good_config.parent / "pki" / "server.pem").write_text("not PEM\n")
    assert main(["check-config", "--config", str(good_config)]) == 2
    assert capsys.readouterr().err.startswith("configuration error: [tls] certificate:")


def test_check_config_names_a_certificate_that_does_not_match_its_key(
        good_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = good_config.parent / "pki"
    (pki / "server-key.pem").write_bytes((pki / "client-key.pem").read_bytes())
    assert main(["check-config", "--config", str(good_config)]) == 2
    assert capsys.readouterr().err.startswith("configuration error: [tls] certificate:")


def test_check_config_names_a_bad_ca_bundle(good_config: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    (good_config.parent / "pki" / "ca.pem").write_text("garbage\n")
    assert main(["check-config", "--config", str(good_config)]) == 2
    assert capsys.readouterr().err.startswith("configuration error: [tls] ca_bundle:")


# --- serve ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("section", "key", "value", "label"), [
    ("server", "workers", 0, "[server] workers:"),
    ("tls", "certificate", "pki/absent.pem", "[tls] certificate: file not found"),
])
def test_serve_with_a_bad_config_exits_2_promptly(good_config: Path, section: str, key: str,
                                                  value: object, label: str) -> None:
    bad = edited(good_config, section, key, value)
    result = run_script("serve", "--config", str(bad), timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith(f"configuration error: {label}")
    assert "Traceback" not in result.stderr


def test_serve_with_an_unreadable_certificate_exits_2(good_config: Path) -> None:
    (good_config.parent / "pki" / "server.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    result = run_script("serve", "--config", str(good_config), timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("configuration error: [tls] certificate:")
    assert "Traceback" not in result.stderr


def test_serve_requires_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve"])
    assert info.value.code == 2
    assert "--config" in capsys.readouterr().err


# --- version and usage ---------------------------------------------------------------------

def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == gateway.__version__


def test_version_console_script_and_module() -> None:
    result = run_script("version")
    assert (result.returncode, result.stdout.strip()) == (0, gateway.__version__)
    module = subprocess.run([sys.executable, "-m", "gateway", "version"], capture_output=True,
                            text=True, timeout=60, check=False, cwd=ROOT)
    assert (module.returncode, module.stdout.strip()) == (0, gateway.__version__)


@pytest.mark.parametrize("argv", [["frobnicate"], [], ["--log-level", "LOUD", "version"]])
def test_bad_usage_is_argparse_exit_2(argv: list[str],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: xdsi-gateway")


def test_unknown_subcommand_console_script() -> None:
    result = run_script("frobnicate")
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr
    assert "Traceback" not in result.stderr
