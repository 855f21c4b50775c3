"""Group commit: the engine's writes reach storage in few batches.

Writes that arrive while a batch is being made durable share the next batch
(:class:`GroupCommit`), and a workflow's small outputs are committed many to a
record (:class:`PackWriter`): one pack for every output that finished while the
previous pack was being stored. Why, and what the store writes through them: see
:mod:`ray_workflows._core.store`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from ray_workflows._core.keys import pack_ref, task_key
from ray_workflows._core.log import get_logger
from ray_workflows._core.records import encode_pack
from ray_workflows.exceptions import CheckpointError
from ray_workflows.storage import Storage

log = get_logger()


class GroupCommit:
    """Batches writes: one ``put_many``, one ``put_if_absent_many`` (then one
    ``discard_many``) for everything queued while the last batch was being written.
    Batches are written in order; within a batch, keys keep the order in which they
    were first queued, and its discards follow its puts and creations.

    A batch that fails is written again caller by caller, in their order, so that a
    key that cannot be written (say, a name the filesystem refuses) fails only the
    caller that queued it, never the others sharing its batch."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._queue: dict[str, bytes | None] = {}  # None: delete the key
        self._creates: dict[str, bytes] = {}  # created only if absent
        # Each caller waiting for the batch, with the keys it put and it creates.
        self._waiters: list[tuple[asyncio.Future[dict[str, bool]], list[str], list[str]]] = []
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
        return self._queued(list(items), [])

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
        queued = self._queued([], [key for key in items if key not in taken])

        async def created() -> dict[str, bool]:
            done = await queued
            return {key: key not in taken and done[key] for key in items}

        return created()

    def _queued(self, puts: list[str], creates: list[str]) -> asyncio.Future[dict[str, bool]]:
        waiter: asyncio.Future[dict[str, bool]] = asyncio.get_running_loop().create_future()
        self._waiters.append((waiter, puts, creates))
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
            except Exception as exc:
                if deletes and not waiters:  # discards only: nobody waits to hear it
                    log.warning("storage.discard_failed", keys=len(deletes), error=repr(exc))
                if len(waiters) > 1:
                    log.warning("storage.batch_failed", callers=len(waiters), error=repr(exc))
                    await self._one_by_one(waiters, puts, creates, deletes)
                else:
                    for w, _, _ in waiters:
                        if not w.done():
                            w.set_exception(exc)
                continue
            except BaseException as exc:  # cancelled: every waiter of the batch learns of it
                for w, _, _ in waiters:
                    if not w.done():
                        w.set_exception(exc)
                raise
            for w, _, _ in waiters:
                if not w.done():
                    w.set_result(created)

    async def _one_by_one(
        self,
        waiters: list[tuple[asyncio.Future[dict[str, bool]], list[str], list[str]]],
        puts: dict[str, bytes],
        creates: dict[str, bytes],
        deletes: list[str],
    ) -> None:
        """A failed batch again, one caller at a time: each learns of its own keys."""
        for waiter, put_keys, create_keys in waiters:
            mine = {key: puts[key] for key in put_keys if key in puts}
            new = {key: creates[key] for key in create_keys if key in creates}
            try:
                if mine:
                    await self._storage.put_many(mine)
                created = await self._storage.put_if_absent_many(new) if new else {}
                for key, made in created.items():
                    if not made and await self._storage.get(key) == new[key]:
                        created[key] = True  # made by the failed batch, before it failed
            except Exception as exc:
                if not waiter.done():
                    waiter.set_exception(exc)
                continue
            if not waiter.done():
                waiter.set_result(created)
        if deletes:
            with contextlib.suppress(Exception):  # readers settle what a discard leaves
                await self._storage.discard_many(deletes)


class Committer(Protocol):
    """What a :class:`PackWriter` writes through: a ``WorkflowStore``'s group commit."""

    commit: GroupCommit


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
        store: Committer,
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


__all__ = ["Committer", "GroupCommit", "PackWriter"]
