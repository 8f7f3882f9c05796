"""Opening associations with the PACS: one place that turns pynetdicom's outcomes into
`PacsError` values and bounds every wait with a timeout, and that runs them over DICOM TLS
(PS3.15 B.1, mutual TLS 1.2+ with gateway.security.tls's policy) when `[pacs] tls` is on.

`connect(pacs, timeout)` is the TCP connect to the PACS with those outcomes (also used by
gateway.dicom.ul.link); `tls_context(pacs)` is the client context of those associations (None
without TLS); `scp_tls_context(pacs)` the server context of the C-MOVE storage SCP (the PACS
must present a certificate from `tls_ca_bundle`)."""

from __future__ import annotations

import functools
import logging
import socket
import ssl
from collections.abc import Sequence
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from gateway.config import PacsConfig
from gateway.dicom.errors import PacsError

# pynetdicom's DUL reactor sleeps this long whenever a loop iteration found nothing to do
# (its default, 1 ms, is paid again and again while a C-GET waits for the next PDU: measured
# 1.49 s -> 1.06 s for 300 CT instances from Orthanc at the same CPU time). 0.2 ms keeps an
# idle association's polling cost negligible.
DUL_LOOP_DELAY = 0.0002

# pynetdicom logs every C-FIND/C-GET identifier (patient names and ids included) at INFO, and
# formatting them costs CPU per message: only its warnings and errors may reach our logs.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)


@functools.lru_cache(maxsize=8)
def tls_context(pacs: PacsConfig) -> ssl.SSLContext | None:
    """The client TLS context of associations to this PACS, or None when `tls` is off."""
    if not pacs.tls:
        return None
    from gateway.security.tls import client_context

    return client_context(pacs.tls_ca_bundle, pacs.tls_certificate, pacs.tls_private_key)


@functools.lru_cache(maxsize=8)
def scp_tls_context(pacs: PacsConfig) -> ssl.SSLContext | None:
    """The server TLS context of the C-MOVE storage SCP, or None when `tls` is off: our
    certificate, and the PACS's client certificate required and checked against
    `tls_ca_bundle`."""
    if not pacs.tls:
        return None
    from gateway.config import TlsConfig
    from gateway.security.tls import server_context

    return server_context(TlsConfig(certificate=pacs.tls_certificate,
                                    private_key=pacs.tls_private_key,
                                    ca_bundle=pacs.tls_ca_bundle,
                                    require_client_certificate=True))


def _server_name(pacs: PacsConfig) -> str:
    return pacs.tls_server_name or pacs.host


def _tls_diagnose(pacs: PacsConfig, ctx: ssl.SSLContext, timeout: float) -> None:
    """After a failed TLS association: redo the handshake alone to say why it failed."""
    where = f"{pacs.host}:{pacs.port}"
    try:
        with socket.create_connection((pacs.host, pacs.port), timeout=min(timeout, 10)) as raw, \
                ctx.wrap_socket(raw, server_hostname=_server_name(pacs)) as tls:
            tls.settimeout(min(timeout, 1))
            # TLS 1.3: the server checks our certificate after the handshake; a refusal
            # arrives as an alert on the first read.
            try:
                tls.recv(1)
            except TimeoutError:
                return
    except ssl.SSLCertVerificationError as exc:
        raise PacsError("rejected", f"DICOM TLS: the certificate of {where} is not trusted "
                                    f"({exc.verify_message or exc.reason})") from None
    except ssl.SSLError as exc:
        raise PacsError("rejected", f"DICOM TLS handshake with {where} failed "
                                    f"({exc.reason or exc})") from None
    except TimeoutError:
        raise PacsError("timeout", f"no answer from {where} within "
                                   f"{min(timeout, 10):.0f} s") from None
    except OSError as exc:
        raise PacsError("unreachable", f"cannot connect to {where}: {exc.strerror or exc}"
                        ) from None


def connect(pacs: PacsConfig, timeout: float) -> socket.socket:
    """A TCP connection to the PACS (the connect bounded by min(`timeout`, 10) s), or
    PacsError: "timeout" when nothing answers, "unreachable" when the connect fails."""
    try:
        return socket.create_connection((pacs.host, pacs.port), timeout=min(timeout, 10))
    except TimeoutError:
        raise PacsError("timeout", f"no answer from {pacs.host}:{pacs.port} "
                                   f"within {min(timeout, 10):.0f} s") from None
    except OSError as exc:
        raise PacsError("unreachable",
                        f"cannot connect to {pacs.host}:{pacs.port}: {exc.strerror or exc}"
                        ) from None


def _reachable(pacs: PacsConfig, timeout: float) -> None:
    """Fail fast and clearly when nothing listens (pynetdicom only logs it)."""
    connect(pacs, timeout).close()


def make_ae(pacs: PacsConfig, timeout: float) -> AE:
    ae = AE(ae_title=pacs.calling_ae_title)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 10)
    ae.maximum_pdu_size = 0  # unlimited: fewer, larger PDUs
    return ae


def associate(pacs: PacsConfig, contexts: Sequence[PresentationContext], timeout: float,
              *, ext_neg: list[Any] | None = None,
              evt_handlers: list[Any] | None = None) -> Association:
    """An established association, or PacsError (unreachable, rejected, aborted, timeout)."""
    ctx = tls_context(pacs)
    if ctx is None:  # with TLS a bare probe would only add a handshake error to the PACS log;
        _reachable(pacs, timeout)  # a failure is diagnosed afterwards instead
    ae = make_ae(pacs, timeout)
    assoc = ae.associate(pacs.host, pacs.port, contexts=list(contexts),
                         ae_title=pacs.called_ae_title, ext_neg=ext_neg,
                         evt_handlers=evt_handlers or [],
                         tls_args=None if ctx is None else (ctx, _server_name(pacs)))
    if assoc.is_established:
        assoc.dul._run_loop_delay = DUL_LOOP_DELAY
        # pynetdicom clears the socket timeout once connected, so a PACS that stalls in the
        # middle of a PDU would block its reader thread (and then abort()) for ever; with a
        # timeout the read fails, the association ends and the DIMSE wait returns.
        sock = getattr(assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.settimeout(timeout)
        return assoc
    if assoc.is_rejected:
        raise PacsError("rejected", f"{pacs.called_ae_title} at {pacs.host}:{pacs.port} "
                                    "rejected the association")
    if ctx is not None:  # a TLS failure shows as an abort or no association: say which
        _tls_diagnose(pacs, ctx, timeout)
    if assoc.is_aborted:
        raise PacsError("aborted", f"{pacs.called_ae_title} at {pacs.host}:{pacs.port} "
                                   "aborted the association request")
    raise PacsError("unreachable", f"no association with {pacs.called_ae_title} at "
                                   f"{pacs.host}:{pacs.port}")


def check_alive(assoc: Association, what: str) -> None:
    """After an operation: an association that ended under us is an abort."""
    if assoc.is_aborted:
        raise PacsError("aborted", f"the PACS aborted the association during {what}")
    if not assoc.is_established:
        raise PacsError("aborted", f"the association ended during {what}")
