"""Sending stored instances over DIMSE C-STORE (PS3.4 B.2.2): pass-through or transcoded.

pynetdicom's C-MOVE / C-GET service classes hand every yielded dataset to
``Association.send_c_store``. simral yields a :class:`StoredInstanceDataset` (a Dataset that only
names a stored blob); :func:`install` wraps ``send_c_store`` so that such an item is sent from its
file without being decoded (``STORE_SEND_CHUNKED_DATASET``), or is transcoded when the peer did
not accept the stored transfer syntax. Every other call behaves exactly as before.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

from simral.archive.service import StoredInstance, local_copy
from simral.context import AppContext
from simral.dicom.coerce import coerced_dataset
from simral.dicom.transcode import TranscodeError, choose_target, transcode_file
from simral.dimse import eventloop

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128


class StoredInstanceDataset(Dataset):
    """A placeholder dataset naming a stored instance; its bytes are read only when sent."""

    def __init__(self, instance: StoredInstance, ctx: AppContext, *, allow_transcode: bool = True) -> None:
        super().__init__()
        self.SOPClassUID = instance.sop_class_uid
        self.SOPInstanceUID = instance.sop_uid
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = UID(instance.transfer_syntax_uid)
        self._simral_instance = instance
        self._simral_ctx = ctx
        self._simral_allow_transcode = allow_transcode


def set_nodelay(event: Any) -> None:
    """EVT_CONN_OPEN handler: TCP_NODELAY on the association's socket (small PDUs go out at once)."""
    transport = event.assoc.dul.socket
    sock = getattr(transport, "socket", None) if transport is not None else None
    if sock is not None and sock.family in {socket.AF_INET, socket.AF_INET6}:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _accepted_syntaxes(assoc: Association, sop_class: str) -> list[str]:
    return [
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class and cx.as_scu
    ]


_original_send_c_store = Association.send_c_store


def _send_c_store(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
    if not isinstance(dataset, StoredInstanceDataset):
        return _original_send_c_store(self, dataset, *args, **kwargs)
    instance = dataset._simral_instance
    accepted = _accepted_syntaxes(self, instance.sop_class_uid)
    target = choose_target(instance.transfer_syntax_uid, accepted)
    if target is None or (target != instance.transfer_syntax_uid and not dataset._simral_allow_transcode):
        raise ValueError(
            f"peer accepted no usable transfer syntax for {instance.sop_class_uid} "
            f"(stored as {instance.transfer_syntax_uid})"
        )
    with local_copy(dataset._simral_ctx, instance.blob_key) as path:
        if instance.shown_patient is not None:
            # The receiver knows the patient by another identifier (PS3.4 B.4.1.3 coercion).
            return _original_send_c_store(
                self, coerced_dataset(path, instance.shown_patient, target), *args, **kwargs
            )
        if target == instance.transfer_syntax_uid:
            return _original_send_c_store(self, path, *args, **kwargs)
        try:
            converted = transcode_file(path, target)
        except TranscodeError as exc:
            log.warning("transcoding for C-STORE failed: %s", exc)
            raise
        return _original_send_c_store(self, converted, *args, **kwargs)


def install() -> None:
    """Enable pass-through sends of stored instances on event-driven associations
    (:mod:`simral.dimse.eventloop`, which also closes pynetdicom's reactor race for requests sent
    on an association whose reactor is running); idempotent."""
    eventloop.install()
    _config.STORE_SEND_CHUNKED_DATASET = True
    Association.send_c_store = _send_c_store  # type: ignore[method-assign]


def contexts_for(instances: Iterable[StoredInstance]) -> list[PresentationContext]:
    """Presentation contexts to propose for sending ``instances``.

    For each (SOP class, stored syntax) a context proposing the stored syntax, plus one context
    per SOP class proposing the native syntaxes for peers that need transcoding (PS3.8 §9.3.2.2).
    """
    pairs: dict[str, set[str]] = {}
    for item in instances:
        pairs.setdefault(item.sop_class_uid, set()).add(item.transfer_syntax_uid)
    contexts: list[PresentationContext] = []
    native = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    for sop_class, syntaxes in sorted(pairs.items()):
        for syntax in sorted(syntaxes):
            if syntax not in native:
                contexts.append(build_context(sop_class, [syntax]))
        contexts.append(build_context(sop_class, native))
    if len(contexts) > MAX_CONTEXTS:
        # Too many combinations: keep the native fallbacks (transcoding covers the rest).
        contexts = [cx for cx in contexts if cx.transfer_syntax == native][:MAX_CONTEXTS]
    return contexts
