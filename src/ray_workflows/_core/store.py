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
``meta.json``, so the index is never wrong, only briefly redundant.

The engine is the single writer of everything here except large ``out`` records
and objects, which workers write where they run (on a shared storage). Small
outputs travel back in the task's receipt and the engine commits them in packs:
one write for every output that finished while the previous pack was being
stored, so a fan-out of 1,000 small tasks costs a few dozen writes, not 1,000.
Engine writes go through a group commit: writes that arrive while a batch is
being made durable share the next batch.

An output is addressed by a *record ref* (:func:`ray_workflows._core.keys.split_ref`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import pickle
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ray_workflows._core import bridge, serialization
from ray_workflows._core.keys import (
    IDS,
    STATUS_PREFIX,
    cancel_key,
    ids_key,
    meta_key,
    objects_prefix,
    pack_ref,
    parse_status_key,
    parse_task_key,
    plan_key,
    seal_epoch,
    seal_key,
    seals_prefix,
    split_ref,
    status_key,
    task_key,
    tasks_prefix,
    wf_prefix,
)
from ray_workflows._core.log import get_logger
from ray_workflows._core.plan import Plan
from ray_workflows._core.status import WorkflowStatus
from ray_workflows.exceptions import CheckpointError
from ray_workflows.storage import Storage

STORED_STATUSES = (
    WorkflowStatus.RUNNING,
    WorkflowStatus.PENDING,
    WorkflowStatus.SUCCESSFUL,
    WorkflowStatus.FAILED,
    WorkflowStatus.CANCELED,
)


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


def running_meta(output_task_id: str, user_metadata: dict[str, Any]) -> dict[str, Any]:
    """``meta.json`` of a workflow that starts now."""
    return {
        "status": WorkflowStatus.RUNNING.value,
        "user_metadata": user_metadata,
        "output_task_id": output_task_id,
        "start_time": time.time(),
    }


class TaskRecords(dict[str, set[str]]):
    """tid -> the records it has ("out", "cont", "latest"); "out" also for outputs held
    in packs, whose refs are in ``packed`` and member records in ``members``. Only
    records that count (see Fencing above); of several, the newest epoch's."""

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


class PackWriter:
    """Commits one workflow's small outputs, many per write, in the order they came.

    ``add`` returns at once with the output's record ref; the pack holding it is
    written by a background flush that takes everything added meanwhile. A flush
    first gathers for up to ``WINDOW`` seconds (or ``FULL`` records): nothing waits
    on a pack but the end of the workflow (consumers already run), which hurries
    it, so fewer, fuller packs cost nothing in latency. After the first failed
    write nothing more is written: ``on_error`` is told, and :meth:`drain` raises.
    """

    WINDOW = 0.02
    FULL = 512

    def __init__(
        self,
        store: WorkflowStore,
        wid: str,
        on_flushed: Callable[[list[str]], None],
        on_error: Callable[[str, BaseException], None],
        epoch: Callable[[], int],
    ) -> None:
        self._store, self._wid = store, wid
        self._epoch = epoch  # of the lease the run holds: packs are written under it
        self._on_flushed, self._on_error = on_flushed, on_error
        self._batch: dict[str, bytes] = {}
        self._holders: list[str] = []
        self._key: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._hurry: asyncio.Future[None] | None = None  # cuts the gathering short
        self._draining = False
        self._then: Callable[[], Awaitable[None] | None] | None = None
        self.pending: set[str] = set()  # holders whose record is not durable yet
        self.error: BaseException | None = None

    def add(self, holder: str, tid: str, record: bytes) -> str:
        """Queue ``tid``'s record; ``holder`` (the task whose output it is) stays in
        ``pending`` until the record is durable."""
        if self._key is None:
            self._key = task_key(self._wid, tid, "pack", self._epoch())
        self._batch[tid] = record
        self._holders.append(holder)
        self.pending.add(holder)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())
        elif len(self._batch) >= self.FULL:
            self._hurry_up()
        return pack_ref(self._key, tid)

    def _hurry_up(self) -> None:
        if self._hurry is not None and not self._hurry.done():
            self._hurry.set_result(None)

    async def _gather(self) -> None:
        loop = asyncio.get_running_loop()
        self._hurry = loop.create_future()
        timer = loop.call_later(self.WINDOW, self._hurry_up)
        try:
            await self._hurry
        finally:
            timer.cancel()

    async def _flush(self) -> None:
        while self._batch and self.error is None:
            if len(self._batch) < self.FULL and not self._draining:
                await self._gather()
            batch, holders, key = self._batch, self._holders, self._key
            self._batch, self._holders, self._key = {}, [], None
            assert key is not None
            # Created, never replaced: a pack is written once, under its writer's epoch.
            written = self._store.commit.queue_creates({key: encode_pack(batch)})
            try:
                then = self._take_then() if self._draining else None
                created = await (written if then is None else _first(written, then))
                if not created[key]:
                    raise CheckpointError(f"Pack {key!r} exists already.", key=key)
            except Exception as exc:
                self.error = exc
                self._on_error(next(iter(batch)), exc)
                return
            self.pending.difference_update(holders)
            self._on_flushed(holders)

    async def drain(self, then: Callable[[], Awaitable[None] | None] | None = None) -> None:
        """Wait until every queued record is durable (or raise the write's error).

        ``then`` queues writes that must not land before the records (it returns what
        waits for them, or ``None`` if it queued nothing), for a caller that adds no
        more records. It is called once: right after the pack of the records still
        gathering is queued, so that on a storage with ``ordered_batches`` both share
        one batch; with nothing left gathering, once the pack being written landed."""
        self._draining = True
        self._then = then
        try:
            while self._task is not None and not self._task.done():
                self._hurry_up()
                await asyncio.shield(self._task)
        except BaseException:
            self._then = None  # a drain given up on (the run is closing) writes nothing
            raise
        if self.error is not None:
            self._then = None
            raise self.error
        after = self._take_then()
        if after is not None:
            await after

    def _take_then(self) -> Awaitable[None] | None:
        then, self._then = self._then, None
        return None if then is None else then()


async def _first(written: Awaitable[dict[str, bool]], then: Awaitable[None]) -> dict[str, bool]:
    """Wait for both; the first's result."""
    created, _ = await asyncio.gather(written, then)
    return created


def _started_records(
    wid: str, encoded: bytes, status: str, lease: tuple[str, bytes]
) -> dict[str, bytes]:
    """A caller's start: the plan, first (the commit point), the lease, the marker."""
    return {plan_key(wid): encoded, lease[0]: lease[1], status_key(status, wid): b""}


def _started_outcome(
    items: dict[str, bytes], created: dict[str, bool]
) -> tuple[bool | None, list[str]]:
    """What a start's batch came to: ``None`` if the plan existed (the workflow is
    stored already), else whether the lease record was created; and the keys this
    call created that must be taken back (readers settle a stray marker from
    meta.json meanwhile)."""
    plan_key, lease_key, _ = items
    if not created[plan_key]:
        return None, [key for key in list(items)[1:] if created[key]]
    # A marker that existed already (left by a deleted workflow of this id) indexes
    # the new one as well.
    return created[lease_key], []


class GroupCommit:
    """Batches writes: one ``put_many``, one ``put_if_absent_many`` (then one
    ``discard_many``) for everything queued while the last batch was being written.
    Batches are written in order; within a batch, keys keep the order in which they
    were first queued, and its discards follow its puts and creations."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._queue: dict[str, bytes | None] = {}  # None: delete the key
        self._creates: dict[str, bytes] = {}  # created only if absent
        self._waiters: list[asyncio.Future[dict[str, bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def put(self, key: str, data: bytes) -> None:
        await self.enqueue(key, data)

    def enqueue(self, key: str, data: bytes) -> Awaitable[dict[str, bool]]:
        """Queue a put now, in call order (keys queued without an await in between
        share a batch), and return what waits for its batch."""
        return self.enqueue_many({key: data})

    def enqueue_many(self, items: Mapping[str, bytes]) -> Awaitable[dict[str, bool]]:
        """:meth:`enqueue` of several keys, in their order, with one wait for all."""
        for key, data in items.items():
            self._queue.pop(key, None)  # a re-queued key takes its new place in the order
            self._queue[key] = data
        return self._queued()

    def discard(self, key: str) -> None:
        """Delete ``key`` with the next batch, after its puts, without waiting and
        without making the deletion durable (:meth:`Storage.discard_many`): for keys
        whose return after a crash readers settle (a superseded status marker)."""
        self._queue.pop(key, None)
        self._queue[key] = None
        self._kick()

    async def create_many(self, items: Mapping[str, bytes]) -> dict[str, bool]:
        """``put_if_absent_many`` of ``items``, in one batch with the other callers'.
        A key another caller is creating in the same batch is not created here."""
        return await self.queue_creates(items)

    def queue_creates(self, items: Mapping[str, bytes]) -> Awaitable[dict[str, bool]]:
        """:meth:`create_many`, queued now (in one batch, after whatever was queued
        just before it); await the result for it to be durable."""
        taken = {key for key in items if key in self._creates}
        for key, data in items.items():
            if key not in taken:
                self._creates[key] = data
        queued = self._queued()

        async def created() -> dict[str, bool]:
            done = await queued
            return {key: key not in taken and done[key] for key in items}

        return created()

    def _queued(self) -> asyncio.Future[dict[str, bool]]:
        waiter: asyncio.Future[dict[str, bool]] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._kick()
        return asyncio.shield(waiter)

    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def drain(self) -> None:
        """Wait until everything queued so far is written (or has failed)."""
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            await asyncio.shield(flusher)

    async def _flush(self) -> None:
        try:
            await self._flush_all()
        finally:
            # Not kept once done: a finished task would keep its event loop alive.
            if self._flusher is asyncio.current_task():
                self._flusher = None

    async def _flush_all(self) -> None:
        while self._queue or self._creates:
            batch, self._queue = self._queue, {}
            creates, self._creates = self._creates, {}
            waiters, self._waiters = self._waiters, []
            puts = {key: data for key, data in batch.items() if data is not None}
            deletes = [key for key, data in batch.items() if data is None]
            created: dict[str, bool] = {}
            try:
                if puts:
                    await self._storage.put_many(puts)
                if creates:
                    created = await self._storage.put_if_absent_many(creates)
                if deletes:
                    await self._storage.discard_many(deletes)
            except BaseException as exc:  # every waiter of the batch learns of it
                if deletes and not waiters:  # discards only: nobody waits to hear it
                    log.warning("storage.discard_failed", keys=len(deletes), error=repr(exc))
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            for w in waiters:
                if not w.done():
                    w.set_result(created)


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
        """Store the entry plan (``encoded`` already, if given) unless the workflow
        exists; True if this call created it."""
        data = encoded if encoded is not None else self.encode_plan(plan)
        return await self.storage.put_if_absent(plan_key(wid), data)

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
        for key in taken_back:
            with contextlib.suppress(Exception):
                await self.storage.delete(key)
        return outcome

    def create_started_blocking(
        self, wid: str, encoded: bytes, status: str, lease: tuple[str, bytes]
    ) -> bool | None:
        """:meth:`create_started` in the calling thread, from blocking code, where the
        storage has ``blocking_batches``: no hop to an event loop and a thread."""
        items = _started_records(wid, encoded, status, lease)
        created = self.storage.put_if_absent_many_blocking(items)
        outcome, taken_back = _started_outcome(items, created)
        for key in taken_back:
            with contextlib.suppress(Exception):
                bridge.run(self.storage.delete(key))
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

    async def indexed(self) -> dict[str, str]:
        """wid -> stored status, from the index (settling duplicates from meta.json)."""
        found: dict[str, set[str]] = {}
        for key in await self.storage.list(STATUS_PREFIX):
            status, wid = parse_status_key(key)
            found.setdefault(wid, set()).add(status)
        result = {}
        for wid, statuses in found.items():
            if len(statuses) == 1:
                result[wid] = statuses.pop()
            else:
                meta = await self.read_meta(wid) or await self.started_meta(wid)
                if meta is not None:
                    result[wid] = meta["status"]
        return result

    # -- task records ----------------------------------------------------------
    async def task_records(self, wid: str) -> TaskRecords:
        """Every task record of a workflow that counts (see Fencing above). Packs are
        read (and checked: a torn pack is deleted, so its tasks run again) to learn
        which outputs they hold."""
        listed, (sealed, counted) = await asyncio.gather(
            self.storage.list(tasks_prefix(wid)), self._newest_seal(wid)
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
        datas = await asyncio.gather(*(self.storage.get(key) for _, key in packs))
        for (epoch, key), data in zip(packs, datas, strict=True):
            if data is None:
                continue
            try:
                members = decode_pack(data, key)
            except CheckpointError as exc:
                log.warning("checkpoint.torn", workflow_id=wid, key=key, error=str(exc))
                await self.storage.delete(key)
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

    async def _newest_seal(self, wid: str) -> tuple[int, frozenset[str]]:
        """The epoch of the newest seal and the keys of earlier epochs it counts."""
        epochs = [seal_epoch(wid, k) for k in await self.storage.list(seals_prefix(wid))]
        epochs = [e for e in epochs if e > 0]
        if not epochs:
            return 0, frozenset()
        newest = max(epochs)
        data = await self.storage.get(seal_key(wid, newest))
        if data is None:  # deleted with the workflow meanwhile
            return 0, frozenset()
        return newest, frozenset(json.loads(data)["keys"])

    async def seal(self, wid: str, epoch: int) -> TaskRecords:
        """Before a runner that took ``wid`` over at ``epoch`` writes anything: the task
        records that count now, stored as the only ones of earlier epochs that ever
        will (see Fencing above); returned."""
        records = await self.task_records(wid)
        data = json.dumps({"epoch": epoch, "keys": records.counted}).encode()
        # Only the holder of ``epoch`` writes its seal; one that exists is its own.
        await self.storage.put_if_absent(seal_key(wid, epoch), data)
        return records

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
    "GroupCommit",
    "PackWriter",
    "STORED_STATUSES",
    "TaskRecords",
    "WorkflowStore",
    "decode_pack",
    "encode_pack",
    "read_record",
    "running_meta",
    # Built in ray_workflows._core.keys; still importable from here.
    "objects_prefix",
    "pack_ref",
    "seal_key",
    "split_ref",
    "task_key",
    "wf_prefix",
]
