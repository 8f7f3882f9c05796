"""The built-in C-MOVE SCU (`[pacs] dimse_engine = "builtin"`): one association with the
Study Root Q/R Move model, one C-MOVE-RQ per series (IMAGE level, the SOP Instance UIDs cut
into lists that fit one identifier; SERIES level for a series requested whole, see
gateway.imaging.plan), each answered by pending responses and a final one. The
instances themselves reach the gateway's storage SCP (gateway.dicom.storescp) on other
associations the PACS opens; this module only asks and reads the statuses."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from gateway.config import PacsConfig
from gateway.dicom.cfind import receive_responses
from gateway.dicom.cget import retrieve_identifier, uid_batches
from gateway.dicom.errors import PacsError
from gateway.dicom.ul import command as dimse
from gateway.dicom.ul.link import open_link
from gateway.dicom.ul.pdu import EXPLICIT_LE, IMPLICIT_LE, ProposedContext

if TYPE_CHECKING:
    from gateway.dicom.retrieve import InstanceRef

MOVE_MODEL = "1.2.840.10008.5.1.4.1.2.2.2"  # Study Root Q/R Information Model - MOVE
# Success, and "sub-operations complete, one or more failures" (the instances that did not
# arrive are found missing by the caller).
MOVE_OK = frozenset({0x0000, 0xB000})


def run_c_move(pacs: PacsConfig, instances: Sequence[InstanceRef], timeout: float, *,
               deadline: float | None = None,
               whole_series: Collection[tuple[str, str]] = ()
               ) -> tuple[dict[str, str], PacsError | None]:
    """Ask the PACS to send `instances` to [pacs] move_destination_ae_title; returns
    (failed uid -> reason for the requests that ended in a failure status, the
    association-level error if any). `deadline` (monotonic) bounds the whole exchange. A
    series in `whole_series` (all the PACS has of it is in `instances`) is asked for with one
    SERIES-level C-MOVE; the storage SCP refuses what nobody expects."""
    failed: dict[str, str] = {}
    groups: dict[tuple[str, str], list[str]] = {}
    for i in instances:
        groups.setdefault((i.study_uid, i.series_uid), []).append(i.sop_instance_uid)
    contexts = [ProposedContext(1, MOVE_MODEL, (IMPLICIT_LE, EXPLICIT_LE))]
    try:
        link = open_link(pacs, contexts, timeout)
        link.deadline = deadline
        try:
            syntax = link.accepted.contexts.get(1)
            if syntax is None:
                raise PacsError("rejected", "the PACS did not accept the Q/R Move model")
            message_id = 0
            with link.guard("C-MOVE"):
                for (study, series), uids in groups.items():
                    whole = (study, series) in whole_series
                    for batch in [uids] if whole else uid_batches(uids):
                        message_id += 1
                        rq = dimse.c_move_rq(message_id, MOVE_MODEL,
                                             pacs.move_destination_ae_title)
                        identifier = retrieve_identifier(study, series, batch, syntax, whole,
                                                         "C-MOVE")
                        link.send_message(1, rq, identifier)
                        try:
                            receive_responses(link, message_id, syntax,
                                              rsp_field=dimse.C_MOVE_RSP, what="C-MOVE",
                                              ok=MOVE_OK, keep=False)
                        except PacsError as exc:
                            if exc.kind != "failed":
                                raise
                            for uid in batch:
                                failed[uid] = ("SERIES-level " if whole else "") + exc.message
        finally:
            if not link.closed:
                link.release()
    except PacsError as exc:
        return failed, exc
    return failed, None
