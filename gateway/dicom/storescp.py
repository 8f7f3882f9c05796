"""The gateway's own storage SCP, the destination of C-MOVE ([pacs] move_destination_ae_title
on [pacs] move_port), shared by every worker process of the gateway.

Design: whichever process first needs a C-MOVE calls `ensure_running()`, which tries to bind
the port and, when it can, serves the SCP in a background thread of that process for as long
as the process lives; when the port is already bound (another worker process serves it), it
does nothing. Routing between processes goes through the file system, not through memory:
before a C-MOVE, the requester registers every SOP Instance UID it expects as
`<root>/expect/<SOP Instance UID>/<token>`, a symbolic link to its own spool folder
(`expect()`); the SCP spools each received instance to a temp file (chunked receive), then
moves it into the spool folder of every request that expects it (a hard link or copy for the
second and later ones) before it answers the C-STORE, so the instance is in place when the
PACS reports the C-MOVE complete. Instances that nobody expects are refused. `<root>` is
`xdsi-move-<port>` in the system temp folder, the same for all worker processes.
With `[pacs] tls` on, the SCP accepts only DICOM TLS from a PACS whose client certificate
chains to `tls_ca_bundle` (`gateway.dicom.association.scp_tls_context`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt

from gateway.config import PacsConfig
from gateway.dicom.association import scp_tls_context
from gateway.dicom.retrieve import _safe_name, enable_chunked_receive

_LOCK = threading.Lock()
_SERVERS: dict[int, Any] = {}


def spool_root(pacs: PacsConfig) -> Path:
    root = Path(tempfile.gettempdir()) / f"xdsi-move-{pacs.move_port}"
    (root / "expect").mkdir(parents=True, exist_ok=True)
    return root


def transfer_syntax_of(path: Path) -> str:
    return str(read_file_meta_info(path).TransferSyntaxUID)


def _handle_store(root: Path) -> Any:
    def handle(event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        name = _safe_name(uid)
        folder = root / "expect" / name
        try:
            targets = [Path(os.readlink(entry)) for entry in folder.iterdir()]
        except OSError:
            targets = []
        targets = [t for t in targets if t.is_dir()]
        if not targets:
            return 0xA900  # nobody asked for this instance
        src = Path(event.dataset_path)
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
    return handle


def ensure_running(pacs: PacsConfig, timeout: float = 30) -> bool:
    """Serve the storage SCP from this process unless some process already does.

    Returns True when this process serves it."""
    with _LOCK:
        if pacs.move_port in _SERVERS:
            return True
        enable_chunked_receive()
        root = spool_root(pacs)
        ae = AE(ae_title=pacs.move_destination_ae_title)
        ae.network_timeout = timeout
        ae.dimse_timeout = timeout
        ae.acse_timeout = timeout
        ae.maximum_pdu_size = 0
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
        try:
            server = ae.start_server(("", pacs.move_port), block=False,
                                     ssl_context=scp_tls_context(pacs),
                                     evt_handlers=[(evt.EVT_C_STORE, _handle_store(root))])
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
        for uid in sop_instance_uids:
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
