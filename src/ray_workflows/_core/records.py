"""A workflow's task records: which of them count, and the packs that hold small outputs.

A runner writes task records under ``tasks/<E>/`` and seals the records of earlier
epochs in ``seals/<E>`` when it takes a workflow over (the key layout is in
:mod:`ray_workflows._core.keys`; why, under Fencing in :mod:`ray_workflows._core.store`).
This module reads them back: every record that counts, with the members of its
packs, and writes the seal. An output is addressed by a *record ref*
(:func:`ray_workflows._core.keys.split_ref`): a key, or a member of a pack.
"""

from __future__ import annotations

import asyncio
import json
import pickle
from collections.abc import Callable

from ray_workflows._core import serialization
from ray_workflows._core.keys import (
    IDS,
    pack_ref,
    parse_task_key,
    seal_epoch,
    seal_key,
    seals_prefix,
    split_ref,
    tasks_prefix,
)
from ray_workflows._core.log import get_logger
from ray_workflows.exceptions import CheckpointError, RecordSignatureError
from ray_workflows.storage import Storage

log = get_logger()


def encode_pack(members: dict[str, bytes]) -> bytes:
    return serialization.encode("pack", pickle.dumps(members, protocol=5), tasks=len(members))


def decode_pack(data: bytes, key: str) -> dict[str, bytes]:
    """The member records of a pack; ``CheckpointError`` if it is torn."""
    _, payload = serialization.decode(data, key)
    members: dict[str, bytes] = pickle.loads(payload)
    return members


def read_record(
    read: Callable[[str], bytes | None],
    ref: str,
    packs: dict[str, dict[str, bytes]] | None = None,
) -> bytes | None:
    """The output record behind ``ref``, read with a synchronous ``read(key)``.
    ``packs`` (pack key -> members) lets many reads share one read of each pack."""
    key, member = split_ref(ref)
    if member is None:
        return read(key)
    members = packs.get(key) if packs is not None else None
    if members is None:
        data = read(key)
        if data is None:
            return None
        members = decode_pack(data, key)
        if packs is not None:
            packs[key] = members
    return members.get(member)


class TaskRecords(dict[str, set[str]]):
    """tid -> the records it has ("out", "cont", "latest"); "out" also for outputs held
    in packs, whose refs are in ``packed`` and member records in ``members``. Only
    records that count (see Fencing in :mod:`ray_workflows._core.store`); of several,
    the newest epoch's."""

    def __init__(self, wid: str) -> None:
        super().__init__()
        self.wid = wid
        self.packed: dict[str, str] = {}
        self.members: dict[str, bytes] = {}
        self.where: dict[tuple[str, str], tuple[int, str]] = {}  # (tid, record) -> epoch, key
        self.ids: tuple[int, str] | None = None  # the newest ids.json: epoch, key
        self.counted: list[str] = []  # every key that counts, packs and ids.json included

    def add(self, tid: str, record: str, epoch: int, key: str) -> None:
        self.setdefault(tid, set()).add(record)
        known = self.where.get((tid, record))
        if known is None or known[0] <= epoch:
            self.where[(tid, record)] = (epoch, key)

    def key(self, tid: str, record: str) -> str | None:
        """The key of ``tid``'s ``record`` that counts, if there is one."""
        known = self.where.get((tid, record))
        return None if known is None else known[1]

    def output_ref(self, tid: str) -> str:
        packed = self.packed.get(tid)
        return packed if packed is not None else self.where[(tid, "out")][1]


async def read_records(storage: Storage, wid: str, *, repair: bool = False) -> TaskRecords:
    """Every task record of a workflow that counts (see Fencing in
    :mod:`ray_workflows._core.store`). Packs are read (and checked) to learn which
    outputs they hold; a torn pack holds none. Only the holder of the workflow's
    lease (``repair``) deletes it, so that its tasks run again and store their
    outputs anew; a reader leaves storage as it found it."""
    listed, (sealed, counted) = await asyncio.gather(
        storage.list(tasks_prefix(wid)), _newest_seal(storage, wid)
    )
    records = TaskRecords(wid)
    packs: list[tuple[int, str]] = []
    for key in listed:
        parsed = parse_task_key(wid, key)
        if parsed is None:
            continue  # not a record (a stray key)
        epoch, tid, record = parsed
        if epoch < sealed and key not in counted:
            continue  # a stale holder's, written after the takeover
        records.counted.append(key)
        if record == IDS:
            if records.ids is None or records.ids[0] <= epoch:
                records.ids = (epoch, key)
            continue
        if record == "pack":
            packs.append((epoch, key))
        else:
            records.add(tid, record, epoch, key)
    datas = await asyncio.gather(*(storage.get(key) for _, key in packs))
    for (epoch, key), data in zip(packs, datas, strict=True):
        if data is None:
            continue
        try:
            members = decode_pack(data, key)
        except RecordSignatureError:
            raise
        except CheckpointError as exc:
            log.warning("checkpoint.torn", workflow_id=wid, key=key, error=str(exc))
            if repair:
                await storage.delete(key)
            continue
        for tid, member in members.items():
            known = records.where.get((tid, "out"))
            if known is not None and known[0] > epoch:
                continue
            ref = pack_ref(key, tid)
            records.add(tid, "out", epoch, ref)
            records.packed[tid] = ref
            records.members[ref] = member
    return records


async def _newest_seal(storage: Storage, wid: str) -> tuple[int, frozenset[str]]:
    """The epoch of the newest seal and the keys of earlier epochs it counts."""
    epochs = [seal_epoch(wid, k) for k in await storage.list(seals_prefix(wid))]
    epochs = [e for e in epochs if e > 0]
    if not epochs:
        return 0, frozenset()
    newest = max(epochs)
    data = await storage.get(seal_key(wid, newest))
    if data is None:  # deleted with the workflow meanwhile
        return 0, frozenset()
    return newest, frozenset(json.loads(data)["keys"])


async def seal_records(storage: Storage, wid: str, epoch: int) -> TaskRecords:
    """Before a runner that took ``wid`` over at ``epoch`` writes anything: the task
    records that count now, stored as the only ones of earlier epochs that ever
    will (see Fencing in :mod:`ray_workflows._core.store`); returned."""
    records = await read_records(storage, wid, repair=True)
    data = json.dumps({"epoch": epoch, "keys": records.counted}).encode()
    # Only the holder of ``epoch`` writes its seal; one that exists is its own.
    await storage.put_if_absent(seal_key(wid, epoch), data)
    return records


__all__ = [
    "TaskRecords",
    "decode_pack",
    "encode_pack",
    "read_record",
    "read_records",
    "seal_records",
]
