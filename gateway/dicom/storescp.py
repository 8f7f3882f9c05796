"""The gateway's own storage SCP, the destination of C-MOVE ([pacs] move_destination_ae_title
on [pacs] move_port), shared by every worker process of the gateway.

Design: whichever process first needs a C-MOVE calls `ensure_running()`, which tries to bind
the port and, when it can, serves the SCP in a background thread of that process for as long
as the process lives; when the port is already bound (another worker process serves it), it
does nothing. Routing between processes goes through the file system, not through memory:
before a C-MOVE, the requester registers every SOP Instance UID it expects as
`<root>/expect/<SOP Instance UID>/<token>`, a symbolic link to its own spool folder
(`expect()`); the SCP spools each received instance to a temp file as it arrives, then
moves it into the spool folder of every request that expects it (a hard link or copy for the
second and later ones) before it answers the C-STORE, so the instance is in place when the
PACS reports the C-MOVE complete (`route()`). Instances that nobody expects are refused
(0xA900). `<root>` is
`xdsi-move-<port>` in the system temp folder, the same for all worker processes.
With `[pacs] tls` on, the SCP accepts only DICOM TLS from a PACS whose client certificate
chains to `tls_ca_bundle` (`gateway.dicom.association.scp_tls_context`).

Two engines serve it, by `[pacs] dimse_engine`: "builtin" (the default: gateway.dicom.scp,
our own upper layer, one thread per association, at most 16; an instance nobody expects is
discarded as it arrives, never written) and "pynetdicom" (pynetdicom's AE with chunked
receive). Both place instances through `route()`, with the same bytes on disk (the Part 10
file meta header of gateway.dicom.cget.file_meta_header, then the data set as the PACS sent
it). Measured with bench/rad69.py --retrieve c-move (500 instances, 263 MB, 3 runs): the
process serving the SCP spent 1.38-1.80 CPU s with pynetdicom, 0.51-0.56 s built-in (its own
C-MOVE SCU included), the retrieve 2.40-2.53 s against 1.02-1.07 s.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info

from gateway.config import PacsConfig
from gateway.dicom.association import scp_tls_context
from gateway.dicom.retrieve import _safe_name

_LOCK = threading.Lock()
_SERVERS: dict[int, Any] = {}


def spool_root(pacs: PacsConfig) -> Path:
    root = Path(tempfile.gettempdir()) / f"xdsi-move-{pacs.move_port}"
    (root / "expect").mkdir(parents=True, exist_ok=True)
    return root


def transfer_syntax_of(path: Path) -> str:
    return str(read_file_meta_info(path).TransferSyntaxUID)


def _targets(root: Path, name: str) -> list[Path]:
    try:
        targets = [Path(os.readlink(entry)) for entry in (root / "expect" / name).iterdir()]
    except OSError:
        return []
    # Two jobs of one request expect the same instance in the same folder: one copy.
    return list(dict.fromkeys(t for t in targets if t.is_dir()))


def is_expected(root: Path, sop_instance_uid: str) -> bool:
    """Whether some request currently expects this instance."""
    return bool(_targets(root, _safe_name(sop_instance_uid)))


def route(root: Path, sop_instance_uid: str, src: Path) -> int:
    """Place a received instance (the Part 10 file `src`) and return the C-STORE status:
    moved into the spool folder of the first request that expects it as `<uid>.dcm`, hard
    linked (or copied) into the others', 0x0000; nobody expects it: left where it is (the
    caller removes it), 0xA900. Both engines call this."""
    name = _safe_name(sop_instance_uid)
    targets = _targets(root, name)
    if not targets:
        return 0xA900  # nobody asked for this instance
    first = targets[0] / f"{name}.dcm"
    try:
        os.replace(src, first)
    except OSError:
        shutil.move(str(src), str(first))
    for t in targets[1:]:
        other = t / f"{name}.dcm"
        try:
            os.link(first, other)
        except OSError:
            shutil.copyfile(first, other)
    return 0x0000


def _handle_store(root: Path) -> Any:
    """The pynetdicom engine's EVT_C_STORE handler."""
    def handle(event: Any) -> int:
        return route(root, str(event.request.AffectedSOPInstanceUID), Path(event.dataset_path))
    return handle


def _start_pynetdicom(pacs: PacsConfig, root: Path, timeout: float) -> Any:
    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from gateway.dicom.retrieve import enable_chunked_receive

    enable_chunked_receive()
    ae = AE(ae_title=pacs.move_destination_ae_title)
    ae.network_timeout = timeout
    ae.dimse_timeout = timeout
    ae.acse_timeout = timeout
    ae.maximum_pdu_size = 0
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
    return ae.start_server(("", pacs.move_port), block=False,
                           ssl_context=scp_tls_context(pacs),
                           evt_handlers=[(evt.EVT_C_STORE, _handle_store(root))])


def _start_builtin(pacs: PacsConfig, root: Path, timeout: float) -> Any:
    from gateway.dicom.scp import StorageSCP

    server = StorageSCP(pacs.move_destination_ae_title, pacs.move_port, root,
                        functools.partial(route, root), functools.partial(is_expected, root),
                        timeout=timeout, tls=scp_tls_context(pacs))
    server.start()
    return server


def ensure_running(pacs: PacsConfig, timeout: float = 30) -> bool:
    """Serve the storage SCP from this process unless some process already does: the
    built-in one (gateway.dicom.scp) or pynetdicom's, by `[pacs] dimse_engine`.

    Returns True when this process serves it."""
    with _LOCK:
        if pacs.move_port in _SERVERS:
            return True
        root = spool_root(pacs)
        start = (_start_builtin if getattr(pacs, "dimse_engine", "builtin") == "builtin"
                 else _start_pynetdicom)
        try:
            server = start(pacs, root, timeout)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False  # another worker process serves it
            raise
        _SERVERS[pacs.move_port] = server
        return True


def stop(pacs: PacsConfig) -> None:
    with _LOCK:
        server = _SERVERS.pop(pacs.move_port, None)
    if server is not None:
        server.shutdown()


@contextlib.contextmanager
def expect(pacs: PacsConfig, spool: Path, sop_instance_uids: Iterable[str]) -> Iterator[None]:
    """Register `spool` as the destination of these instances for the duration."""
    root = spool_root(pacs)
    token = uuid.uuid4().hex
    links: list[Path] = []
    try:
        for uid in dict.fromkeys(sop_instance_uids):  # a UID listed twice: one link
            folder = root / "expect" / _safe_name(uid)
            link = folder / token
            for _ in range(5):  # a concurrent request may remove an emptied folder
                folder.mkdir(exist_ok=True)
                try:
                    os.symlink(spool.resolve(), link)
                    break
                except FileNotFoundError:
                    continue
            links.append(link)
        yield
    finally:
        for link in links:
            with contextlib.suppress(OSError):
                link.unlink()
            with contextlib.suppress(OSError):
                link.parent.rmdir()  # only when empty
