"""The `xdsi-gateway` command: serve, pki, demo, check-config, version."""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__
from gateway.config import ConfigError, GatewayConfig, load


def check_tls_files(config: GatewayConfig) -> None:
    """Load the TLS certificate, key and CA bundle now; ConfigError naming the key if not."""
    t = config.tls
    if not t.enabled:
        return
    from gateway.security.tls import server_context

    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        probe.load_cert_chain(certfile=str(t.certificate), keyfile=str(t.private_key))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"[tls] certificate: cannot use {t.certificate} with private_key "
                          f"{t.private_key}: {_reason(exc)}") from None
    if t.ca_bundle is not None:
        try:
            probe.load_verify_locations(cafile=str(t.ca_bundle))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"[tls] ca_bundle: cannot use {t.ca_bundle}: "
                              f"{_reason(exc)}") from None
    try:
        server_context(t)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"[tls]: cannot build the TLS context: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.reason} ({exc.library or 'ssl'})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _serve(args: argparse.Namespace) -> int:
    from gateway.soap.server import serve

    config = load(Path(args.config))
    check_tls_files(config)
    serve(config, "gateway.soap.application:app_factory")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    config = load(Path(args.config))
    check_tls_files(config)
    print(f"{config.source}: OK (home community {config.community.home_community_id}, "
          f"{len(config.communities)} remote communities)")
    return 0


def _pki(args: argparse.Namespace) -> int:
    from gateway.security.pki import create_dev_pki

    try:
        pki = create_dev_pki(Path(args.directory),
                             hostnames=tuple(args.hostname or ["localhost"]))
    except OSError as exc:
        print(f"error: cannot write the PKI to {args.directory}: {_reason(exc)}",
              file=sys.stderr)
        return 1
    print("DEVELOPMENT PKI - for demos and tests only, never for production.")
    for label, path in (("CA certificate", pki.ca_cert), ("server certificate", pki.server_cert),
                        ("server key", pki.server_key), ("client certificate", pki.client_cert),
                        ("client key", pki.client_key)):
        print(f"  {label:20} {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    federation = "only" if args.federation_only else "no" if args.no_federation else "also"
    if args.serve and federation == "only":
        print("error: --serve keeps the single-community gateway; it cannot go with "
              "--federation-only", file=sys.stderr)
        return 2
    return run_demo(workdir=Path(args.workdir) if args.workdir else None,
                    port=args.port, keep_serving=args.serve, federation=federation)


def _publish(args: argparse.Namespace) -> int:
    from gateway.dicom.errors import PacsError
    from gateway.imaging.publish import Selection, publish

    config = load(Path(args.config))
    if args.since is not None and not (len(args.since) == 8 and args.since.isdigit()):
        print("error: --since expects a date YYYYMMDD", file=sys.stderr)
        return 2
    selection = Selection(study_uid=args.study, since=args.since)
    try:
        summary = publish(config, selection, dry_run=args.dry_run,
                          progress=not args.no_progress and sys.stderr.isatty())
    except PacsError as exc:
        print(f"error: cannot list the PACS's studies: {exc}", file=sys.stderr)
        return 1
    for result in summary.results:
        if result.outcome == "failed":
            print(f"  failed  {result.study_uid}: {result.message}")
    print(("dry run: " if args.dry_run else "") + summary.line())
    return 1 if summary.count("failed") else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xdsi-gateway",
        description="XDS-I.b / XCA-I imaging gateway (IHE ITI-18/41/42/43, RAD-69/75, "
                    "ITI-38/39) over SOAP 1.2 with mutual TLS.")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level (patient data is logged at DEBUG only)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve the gateway (HTTPS, mutual TLS, worker processes)")
    p.add_argument("--config", required=True, help="TOML configuration file")
    p.set_defaults(func=_serve)

    p = sub.add_parser("check-config",
                       help="validate a configuration file, load its TLS files, and exit")
    p.add_argument("--config", required=True, help="TOML configuration file")
    p.set_defaults(func=_check_config)

    p = sub.add_parser("pki", help="create a DEVELOPMENT CA with server and client "
                                   "certificates (never for production)")
    p.add_argument("directory", help="folder to write the PEM files to")
    p.add_argument("--hostname", action="append",
                   help="a DNS name for the server certificate (repeatable; "
                        "default localhost)")
    p.set_defaults(func=_pki)

    p = sub.add_parser("demo", help="start a gateway on loopback, submit, query and "
                                    "retrieve a report and a KOS manifest, publish and "
                                    "retrieve a PACS's studies, then the same across two "
                                    "communities (XCA, XCA-I); print a summary")
    p.add_argument("--serve", action="store_true",
                   help="keep the (single-community) gateway running afterwards and print "
                        "its endpoints")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--no-federation", action="store_true",
                       help="skip the two-community part")
    scope.add_argument("--federation-only", action="store_true",
                       help="run only the two-community part (communities A and B)")
    p.add_argument("--workdir", help="folder for the demo's PKI, configuration and data "
                                     "(default: a new temporary folder)")
    p.add_argument("--port", type=int, default=0, help="HTTPS port (default: a free one)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("publish", help="C-FIND the PACS, build one KOS manifest per study and "
                                       "register it with ITI-41 (idempotent; RPLC when a "
                                       "study changed)")
    p.add_argument("--config", required=True, help="TOML configuration file")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="UID", help="one study, by Study Instance UID")
    which.add_argument("--since", metavar="YYYYMMDD", help="studies of this date and later")
    which.add_argument("--all", action="store_true", help="every study of the PACS")
    p.add_argument("--dry-run", action="store_true",
                   help="build and compare the manifests, register nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_publish)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=lambda _args: print(__version__) or 0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
