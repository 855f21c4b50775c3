"""WorkflowStore: a workflow's records and the status index, over any Storage.

The key layout is in :mod:`ray_workflows._core.keys`, which builds every key; this
module reads and writes the workflow records in it: the plan, ``meta.json``, the
task records and seals under ``tasks/<E>/`` and ``seals/<E>``, the status index.

Fencing. ``<E>`` is the epoch of the lease its writer held (:mod:`ray_workflows._core.lease`):
a runner, and every worker on its behalf, writes task records only under its own
epoch, so no write of a stale runner can replace a record of a newer one. A runner
that takes a workflow over at epoch ``E`` lists the records, then stores the keys it
found in ``seals/<E>`` (written once) before it writes anything; readers believe a
record of an epoch below the newest seal only if that seal names it. A stale holder
that wakes up after the takeover (a paused process, a slow storage) can still add
records under its old epoch, but no reader ever sees them. ``meta.json`` is the one
record a runner replaces: it names the epoch that wrote it, and a runner replaces it
only by ``compare_and_set`` against the bytes it last saw (:meth:`WorkflowStore.swap_meta`).

A status change writes the new marker, then ``meta.json``, then deletes the old
marker. A crash in between leaves two markers, and readers settle them from
``meta.json``, so the index is never wrong, only briefly redundant (read in
:mod:`ray_workflows._core.status_index`).

The engine is the single writer of everything here except large ``out`` records
and objects, which workers write where they run (on a shared storage). Small
outputs travel back in the task's receipt and the engine commits them in packs:
one write for every output that finished while the previous pack was being
stored, so a fan-out of 1,000 small tasks costs a few dozen writes, not 1,000.
Engine writes go through a group commit: writes that arrive while a batch is
being made durable share the next batch (both in :mod:`ray_workflows._core.commit`).

An output is addressed by a *record ref* (:func:`ray_workflows._core.keys.split_ref`).
Which task records count is read in :mod:`ray_workflows._core.records`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import time
from collections.abc import Awaitable, Collection
from typing import Any

from ray_workflows._core import bridge, serialization
from ray_workflows._core.commit import GroupCommit, PackWriter
from ray_workflows._core.keys import (
    cancel_key,
    ids_key,
    meta_key,
    objects_prefix,
    pack_ref,
    plan_key,
    seal_key,
    split_ref,
    status_key,
    task_key,
    wf_prefix,
)
from ray_workflows._core.plan import Plan
from ray_workflows._core.records import (
    TaskRecords,
    decode_pack,
    encode_pack,
    read_record,
    read_records,
    seal_records,
)
from ray_workflows._core.status import WorkflowStatus
from ray_workflows._core.status_index import STORED_STATUSES, read_index
from ray_workflows.storage import Storage


def running_meta(
    output_task_id: str, user_metadata: dict[str, Any], runtime_env: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``meta.json`` of a workflow that starts now (with the runtime_env recorded for
    it, if there is one: see ray_workflows._core.environment)."""
    meta = {
        "status": WorkflowStatus.RUNNING.value,
        "user_metadata": user_metadata,
        "output_task_id": output_task_id,
        "start_time": time.time(),
    }
    if runtime_env is not None:
        meta["runtime_env"] = runtime_env
    return meta


def _started_records(
    wid: str, encoded: bytes, status: str, lease: tuple[str, bytes]
) -> dict[str, bytes]:
    """A caller's start: the plan, first (the commit point), the lease, the marker."""
    return {plan_key(wid): encoded, lease[0]: lease[1], status_key(status, wid): b""}


def _taken_back(items: dict[str, bytes], created: dict[str, bool]) -> list[str] | None:
    """What a start's batch came to, its first key (the plan) being the commit point:
    ``None`` if this call stored the workflow; else (the plan existed) the other keys
    this call created, which must be taken back (readers settle a stray marker from
    meta.json meanwhile). A marker that existed already (left by a deleted workflow of
    this id) indexes the new workflow as well."""
    plan, *others = items
    if created[plan]:
        return None
    return [key for key in others if created[key]]


def _started_outcome(
    items: dict[str, bytes], created: dict[str, bool]
) -> tuple[bool | None, list[str]]:
    """A caller's start (:func:`_started_records`): ``None`` if the workflow is stored
    already, else whether the lease record was created; and the keys to take back."""
    taken_back = _taken_back(items, created)
    if taken_back is not None:
        return None, taken_back
    _, lease_key, _ = items
    return created[lease_key], []


class WorkflowStore:
    """Typed access to one storage for the engine."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.commit = GroupCommit(storage)

    # -- plans ---------------------------------------------------------------
    @staticmethod
    def encode_plan(plan: Plan, kind: str = "plan", **meta: Any) -> bytes:
        payload = None
        if all(isinstance(r, str) for spec in plan.tasks.values() for r in spec.arg_refs):
            # Plain pickle is several times faster, and enough for plain data (functions
            # and retry classes are bytes already); a plan still holding live
            # ObjectRefs needs the out-of-band list, so it takes the slow path.
            with contextlib.suppress(Exception):
                payload = pickle.dumps(plan, protocol=5)
        if payload is None:
            payload, refs = serialization.dumps(plan)
            assert not refs, "plans are stored with ObjectRefs replaced by object keys"
        return serialization.encode(kind, payload, **meta)

    @staticmethod
    def encode_continuation(plan: Plan, start_time: float, end_time: float) -> bytes:
        """The ``cont`` record of a task that continued into ``plan`` (renamed into the
        workflow's ids), stored with its arguments' object keys in place of refs."""
        stored = Plan(
            {
                t: dataclasses.replace(s, arg_refs=s.arg_keys or [], arg_keys=None)
                for t, s in plan.tasks.items()
            },
            plan.output_task_id,
            plan.functions,
        )
        return WorkflowStore.encode_plan(
            stored, "continuation", start_time=start_time, end_time=end_time
        )

    @staticmethod
    def decode_plan(data: bytes, where: str) -> Plan:
        _, payload = serialization.decode(data, where)
        plan: Plan = serialization.loads(payload, [])
        return plan

    async def create(self, wid: str, plan: Plan, encoded: bytes | None = None) -> bool:
        """Store the entry plan (``encoded`` already, if given) and its RUNNING marker,
        unless the workflow exists; True if this call created it. Plan and marker are
        one batch, the plan first: the index that recovery scans shows the workflow
        from the moment it exists, before its first status write."""
        data = encoded if encoded is not None else self.encode_plan(plan)
        items = {plan_key(wid): data, status_key(WorkflowStatus.RUNNING.value, wid): b""}
        taken_back = _taken_back(items, await self.commit.create_many(items))
        await self._take_back(taken_back or [])
        return taken_back is None

    async def _take_back(self, keys: list[str]) -> None:
        for key in keys:
            with contextlib.suppress(Exception):
                await self.storage.delete(key)

    async def create_started(
        self, wid: str, encoded: bytes, status: str, lease: tuple[str, bytes]
    ) -> bool | None:
        """Store a new workflow as started, from the caller's process, in one round:
        the plan (the commit point, its ``meta.json`` content in its header: see
        :meth:`started_meta`), its lease record (``(key, record)``) and its ``status``
        marker, each created only if absent, in one batch. ``None`` if the workflow
        exists already (a lease or marker this call created is then taken back); else
        whether the lease record was created."""
        items = _started_records(wid, encoded, status, lease)
        # With the starts of other workflows under way: one durable batch for all.
        created = await self.commit.create_many(items)
        outcome, taken_back = _started_outcome(items, created)
        await self._take_back(taken_back)
        return outcome

    def create_started_blocking(
        self, wid: str, encoded: bytes, status: str, lease: tuple[str, bytes]
    ) -> bool | None:
        """:meth:`create_started` in the calling thread, from blocking code, where the
        storage has ``blocking_batches``: no hop to an event loop and a thread."""
        items = _started_records(wid, encoded, status, lease)
        created = self.storage.put_if_absent_many_blocking(items)
        outcome, taken_back = _started_outcome(items, created)
        if taken_back:  # rare: no hop to the bridge's loop otherwise
            with contextlib.suppress(Exception):
                bridge.run(self._take_back(taken_back))
        return outcome

    async def started_meta(self, wid: str) -> dict[str, Any] | None:
        """``meta.json`` as the workflow started, for one stored by its caller that has
        none yet (the plan's header carries it); ``None`` if there is no plan."""
        key = plan_key(wid)
        data = await self.storage.get(key)
        if data is None:
            return None
        meta = serialization.peek_header(data, key).get("meta")
        if isinstance(meta, dict):
            return meta
        return {"status": WorkflowStatus.RUNNING.value, "user_metadata": {}}

    async def load_plan(self, wid: str) -> Plan | None:
        key = plan_key(wid)
        data = await self.storage.get(key)
        return None if data is None else self.decode_plan(data, key)

    async def exists(self, wid: str) -> bool:
        return await self.storage.exists(plan_key(wid))

    # -- meta and the status index --------------------------------------------
    async def read_meta(self, wid: str) -> dict[str, Any] | None:
        return (await self.read_meta_record(wid))[0]

    async def read_meta_record(self, wid: str) -> tuple[dict[str, Any] | None, bytes | None]:
        """``meta.json`` and its bytes (what :meth:`swap_meta` expects), or ``None``s."""
        data = await self.storage.get(meta_key(wid))
        return (None, None) if data is None else (dict(json.loads(data)), data)

    def queue_first_meta(
        self, wid: str, meta: dict[str, Any], old: str | None
    ) -> Awaitable[bytes | None]:
        """:meth:`swap_meta` of a workflow that has no ``meta.json`` yet, on a storage
        whose batches land in order: queued now, with whatever was queued just before
        it (a run's last pack), in one durable batch."""
        data = json.dumps(meta).encode()
        new = meta["status"]
        items = {status_key(new, wid): b""} if new != old else {}
        items[meta_key(wid)] = data  # after the marker, which must land first
        queued = self.commit.queue_creates(items)

        async def stored() -> bytes | None:
            if not (await queued)[meta_key(wid)]:
                return None
            if old and new != old:
                self.commit.discard(status_key(old, wid))  # see swap_meta
            return data

        return stored()

    async def swap_meta(
        self, wid: str, meta: dict[str, Any], old: str | None, expected: bytes | None
    ) -> bytes | None:
        """Write ``meta`` (whose "status" may have changed from ``old``) and the index,
        only if ``meta.json`` still holds ``expected`` (``None``: there is none): a
        runner passes what it last wrote or read, so that nothing it writes after
        another runner took the workflow over lands (see Fencing above). Returns the
        bytes now stored, or ``None`` if ``meta.json`` had changed: nothing was
        written but, maybe, the marker of the new status, which readers settle from
        ``meta.json`` as they settle any pair of markers."""
        new = meta["status"]
        data = json.dumps(meta).encode()
        if expected is None and self.storage.ordered_batches:
            # The first meta.json (a caller stored the workflow): created, with the new
            # marker before it, in one durable batch shared with other workflows'.
            return await self.queue_first_meta(wid, meta, old)
        if new != old:
            # First: an index scan must find the new status once meta.json has it.
            await self.commit.put(status_key(new, wid), b"")
        if not await self.storage.compare_and_set(meta_key(wid), expected, data):
            return None
        if old and new != old:
            # Once the new marker is durable: a crash that brings the old one back
            # leaves two markers, settled from meta.json (see indexed()).
            self.commit.discard(status_key(old, wid))
        return data

    async def indexed(self, statuses: Collection[str] | None = None) -> dict[str, str]:
        """wid -> stored status, from the index: all of it, or (``statuses``) only the
        workflows with one of these statuses, listing only their part of the index
        (see :mod:`ray_workflows._core.status_index`)."""
        return await read_index(self.storage, self._stored_meta, statuses)

    async def _stored_meta(self, wid: str) -> dict[str, Any] | None:
        return await self.read_meta(wid) or await self.started_meta(wid)

    # -- task records ----------------------------------------------------------
    async def task_records(self, wid: str) -> TaskRecords:
        """Every task record of a workflow that counts (see Fencing above), for a
        reader: a torn pack holds no outputs, and stays (only a runner taking the
        workflow over repairs, in :meth:`seal`)."""
        return await read_records(self.storage, wid)

    async def seal(self, wid: str, epoch: int) -> TaskRecords:
        """Before a runner that took ``wid`` over at ``epoch`` writes anything: the task
        records that count now, stored as the only ones of earlier epochs that ever
        will (see Fencing above); returned."""
        return await seal_records(self.storage, wid, epoch)

    async def read(self, key: str) -> bytes | None:
        return await self.storage.get(key)

    async def read_output(self, ref: str) -> bytes | None:
        """The output record behind a record ref (an ``out`` key or a pack member)."""
        key, member = split_ref(ref)
        data = await self.storage.get(key)
        if data is None or member is None:
            return data
        return decode_pack(data, key).get(member)

    async def put(self, key: str, data: bytes) -> None:
        await self.commit.put(key, data)

    async def save_ids(self, wid: str, counters: dict[str, int], epoch: int) -> None:
        await self.commit.put(ids_key(wid, epoch), json.dumps(counters).encode())

    async def load_ids(self, records: TaskRecords) -> dict[str, int]:
        if records.ids is None:
            return {}
        data = await self.storage.get(records.ids[1])
        return {} if data is None else dict(json.loads(data))

    async def delete_workflow(self, wid: str) -> int:
        # Writes still queued (a superseded marker's discard) land first: one landing
        # later could remove a marker of the next run of this id.
        await self.commit.drain()
        # The plan is the commit point: without it nobody resumes a half-deleted workflow.
        removed = int(await self.storage.delete(plan_key(wid)))
        for status in STORED_STATUSES:
            removed += int(await self.storage.delete(status_key(status.value, wid)))
        await self.storage.delete(cancel_key(wid))  # a request nobody answered
        return removed + await self.storage.delete_prefix(wf_prefix(wid))


__all__ = [
    "STORED_STATUSES",
    "WorkflowStore",
    "running_meta",
    # Built in ray_workflows._core.commit, .records and .keys; still importable from here.
    "GroupCommit",
    "PackWriter",
    "TaskRecords",
    "decode_pack",
    "encode_pack",
    "objects_prefix",
    "pack_ref",
    "read_record",
    "seal_key",
    "split_ref",
    "task_key",
    "wf_prefix",
]
