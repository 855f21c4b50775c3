"""WorkflowStore: the key layout, records and status index, over any Storage.

Layout (all keys relative to the storage URI)::

    workflows/<wid>/plan                  entry plan (the commit point of a new workflow)
    workflows/<wid>/meta.json             status, user metadata, start/end time, error
    workflows/<wid>/ids.json              task-id counters (continuations name their tasks)
    workflows/<wid>/tasks/<tid>.out       the task's committed output (its existence = done)
    workflows/<wid>/tasks/<tid>.cont      the continuation plan the task returned
    workflows/<wid>/tasks/<tid>.latest    newest continuation of the chain rooted here
    workflows/<wid>/objects/<sha256>      checkpointed ObjectRef values
    status/<STATUS>/<wid>                 empty marker: the status index for list_all

A status change writes the new marker, then ``meta.json``, then deletes the old
marker. A crash in between leaves two markers, and readers settle them from
``meta.json``, so the index is never wrong, only briefly redundant.

The engine is the single writer of everything here except ``out`` records and
objects, which workers write where they run (on a shared storage). Engine writes
go through a group commit: writes that arrive while a batch is being made
durable share the next batch.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ray_workflows import serialization
from ray_workflows.plan import Plan
from ray_workflows.status import WorkflowStatus
from ray_workflows.storage import Storage

STORED_STATUSES = (
    WorkflowStatus.RUNNING,
    WorkflowStatus.PENDING,
    WorkflowStatus.SUCCESSFUL,
    WorkflowStatus.FAILED,
    WorkflowStatus.CANCELED,
)


def wf_prefix(wid: str) -> str:
    return f"workflows/{wid}/"


def task_key(wid: str, tid: str, record: str) -> str:
    # Flat: every record of a workflow's tasks in one directory, so a task's output
    # costs one file and one directory sync, not a new directory per task.
    return f"workflows/{wid}/tasks/{tid}.{record}"


def objects_prefix(wid: str) -> str:
    return f"workflows/{wid}/objects/"


class GroupCommit:
    """Batches writes: one ``put_many`` for everything queued while the last batch
    was being written. Batches are written in order; within a batch, keys keep the
    order in which they were first queued."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._queue: dict[str, bytes] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def put(self, key: str, data: bytes) -> None:
        self._queue.pop(key, None)  # a re-queued key takes its new place in the order
        self._queue[key] = data
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await asyncio.shield(waiter)

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, {}
            waiters, self._waiters = self._waiters, []
            try:
                await self._storage.put_many(batch)
            except BaseException as exc:  # every waiter of the batch learns of it
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            for w in waiters:
                if not w.done():
                    w.set_result(None)


class WorkflowStore:
    """Typed access to one storage for the engine."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.commit = GroupCommit(storage)

    # -- plans ---------------------------------------------------------------
    @staticmethod
    def encode_plan(plan: Plan, kind: str = "plan", **meta: Any) -> bytes:
        payload, refs = serialization.dumps(plan)
        assert not refs, "plans are stored with ObjectRefs replaced by object keys"
        return serialization.encode(kind, payload, **meta)

    @staticmethod
    def decode_plan(data: bytes, where: str) -> Plan:
        _, payload = serialization.decode(data, where)
        plan: Plan = serialization.loads(payload, [])
        return plan

    async def create(self, wid: str, plan: Plan) -> bool:
        """Store the entry plan unless the workflow exists; True if this call created it."""
        return await self.storage.put_if_absent(wf_prefix(wid) + "plan", self.encode_plan(plan))

    async def load_plan(self, wid: str) -> Plan | None:
        key = wf_prefix(wid) + "plan"
        data = await self.storage.get(key)
        return None if data is None else self.decode_plan(data, key)

    async def exists(self, wid: str) -> bool:
        return await self.storage.exists(wf_prefix(wid) + "plan")

    # -- meta and the status index --------------------------------------------
    async def read_meta(self, wid: str) -> dict[str, Any] | None:
        data = await self.storage.get(wf_prefix(wid) + "meta.json")
        return None if data is None else dict(json.loads(data))

    async def write_meta(self, wid: str, meta: dict[str, Any], old: str | None) -> None:
        """Write ``meta`` (whose "status" may have changed from ``old``) and the index."""
        new = meta["status"]
        writes = [self.commit.put(wf_prefix(wid) + "meta.json", json.dumps(meta).encode())]
        if new != old:
            # Queued first, so in the same batch the new marker lands before meta.json.
            writes.insert(0, self.commit.put(f"status/{new}/{wid}", b""))
        await asyncio.gather(*writes)
        if old and new != old:
            await self.storage.delete(f"status/{old}/{wid}")

    async def indexed(self) -> dict[str, str]:
        """wid -> stored status, from the index (settling duplicates from meta.json)."""
        found: dict[str, set[str]] = {}
        for key in await self.storage.list("status/"):
            _, status, wid = key.split("/", 2)
            found.setdefault(wid, set()).add(status)
        result = {}
        for wid, statuses in found.items():
            if len(statuses) == 1:
                result[wid] = statuses.pop()
            else:
                meta = await self.read_meta(wid)
                if meta is not None:
                    result[wid] = meta["status"]
        return result

    # -- task records ----------------------------------------------------------
    async def task_records(self, wid: str) -> dict[str, set[str]]:
        """tid -> the records it has ("out", "cont", "latest")."""
        prefix = wf_prefix(wid) + "tasks/"
        records: dict[str, set[str]] = {}
        for key in await self.storage.list(prefix):
            tid, _, record = key[len(prefix) :].rpartition(".")
            records.setdefault(tid, set()).add(record)
        return records

    async def read(self, key: str) -> bytes | None:
        return await self.storage.get(key)

    async def put(self, key: str, data: bytes) -> None:
        await self.commit.put(key, data)

    async def save_ids(self, wid: str, counters: dict[str, int]) -> None:
        await self.commit.put(wf_prefix(wid) + "ids.json", json.dumps(counters).encode())

    async def load_ids(self, wid: str) -> dict[str, int]:
        data = await self.storage.get(wf_prefix(wid) + "ids.json")
        return {} if data is None else dict(json.loads(data))

    async def delete_workflow(self, wid: str) -> int:
        removed = 0
        for status in STORED_STATUSES:
            removed += int(await self.storage.delete(f"status/{status.value}/{wid}"))
        return removed + await self.storage.delete_prefix(wf_prefix(wid))


__all__ = [
    "GroupCommit",
    "STORED_STATUSES",
    "WorkflowStore",
    "objects_prefix",
    "task_key",
    "wf_prefix",
]
