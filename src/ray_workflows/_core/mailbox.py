"""The durable mailbox of the events sent to workflows, and their wake-ups.

Events sent with ``send_event`` land in the workflow's :class:`Mailbox`, kept
durably in its storage until a task has claimed and checkpointed them. A listener
reaches it as ``current_context().mailbox`` (see :mod:`ray_workflows._core.events`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
import uuid
from typing import Any

from ray_workflows._core import keys, serialization
from ray_workflows._core.ids import check_id
from ray_workflows._core.log import get_logger
from ray_workflows._core.mailbox_counts import counts
from ray_workflows._core.settings import DEFAULT_MAILBOX_LIMIT
from ray_workflows.exceptions import EventConflictError, MailboxFullError, WorkflowError
from ray_workflows.storage import Storage

log = get_logger()


class EventPayloadError(WorkflowError, TypeError):
    """An event payload cannot be stored (it does not pickle, or holds an ObjectRef)."""


_clock_lock = threading.Lock()
_last_micros = 0


def _arrival_micros() -> int:
    # Strictly increasing within a process, so one sender's events keep their order.
    global _last_micros
    with _clock_lock:
        _last_micros = max(time.time_ns() // 1000, _last_micros + 1)
        return _last_micros


_STAMP = 16  # digits of the microsecond timestamp that starts an event's name


def _event_id_of(name: str) -> str:
    return name[_STAMP + 1 :]


_Where = tuple[str, str, str]  # (storage URI, workflow id, event key)


class _Waiters:
    """In-process wake-ups for claimers, keyed by (storage URI, workflow id, key).

    Process-wide, so that a send through any Mailbox on the same storage wakes a
    claimer of another one, on any event loop, in any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[_Where, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def arm(self, where: _Where) -> asyncio.Event:
        event = asyncio.Event()
        with self._lock:
            self._armed.setdefault(where, []).append((asyncio.get_running_loop(), event))
        return event

    def disarm(self, where: _Where, event: asyncio.Event) -> None:
        with self._lock:
            armed = self._armed.get(where)
            if armed is not None:
                armed[:] = [(loop, e) for loop, e in armed if e is not event]
                if not armed:
                    del self._armed[where]

    def wake(self, where: _Where) -> None:
        with self._lock:
            armed = self._armed.pop(where, [])
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, event in armed:
            if loop is running:
                event.set()
            else:
                with contextlib.suppress(RuntimeError):  # that loop has closed
                    loop.call_soon_threadsafe(event.set)


_waiters = _Waiters()


class Mailbox:
    """A durable mailbox per workflow, on a :class:`~ray_workflows.storage.Storage`.

    Its records are under ``workflows/<wid>/mailbox/`` (deleting the workflow deletes
    them; the layout is in :mod:`ray_workflows._core.keys`): per event key, the events until
    they are acknowledged, the claims (the id of the task that claimed an event), the
    dedupe records of sender-chosen ids; per task, the event it holds. An event's name
    is ``<micros>-<event_id>``, ``<micros>`` 16 digits.

    Order: events of one key are delivered in the order of their names, which
    start with the sender's wall-clock time in microseconds (strictly increasing
    within a process). Two senders in different processes are therefore ordered
    by their clocks: events sent within clock skew of each other may be
    delivered in either order.

    Exactly once: a claim is a ``put_if_absent`` of the claim record, so of
    racing claimers exactly one gets an event; a task that claims again after a
    crash gets the event it already holds. Claim records stay after the event is
    acknowledged (a tombstone, removed with the workflow), so a late retry of a
    send with the same ``event_id`` can never deliver it twice.

    Limit: the mailbox holds at most ``limit`` events (Settings.mailbox_limit) that no
    task has consumed (claimed and checkpointed); a send of a new event past it raises
    :class:`~ray_workflows.exceptions.MailboxFullError` and stores nothing. A send
    again of an event id already stored is still answered as before. The count is
    kept per process (see :mod:`ray_workflows._core.mailbox_counts`).

    Waiting: a claimer wakes within milliseconds when a send goes through any
    Mailbox on the same storage in this process, or when :meth:`notify` is called
    (the engine does, for events sent elsewhere); otherwise it re-reads the
    storage every ``poll_interval`` seconds.
    """

    def __init__(
        self, storage: Storage, *, poll_interval: float = 1.0, limit: int = DEFAULT_MAILBOX_LIMIT
    ) -> None:
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval!r}")
        if not (isinstance(limit, int) and limit >= 1):
            raise ValueError(f"the mailbox limit must be an int, 1 or more, got {limit!r}")
        self.storage = storage
        self.poll_interval = poll_interval
        self.limit = limit

    async def send(
        self, workflow_id: str, key: str, payload: Any, *, event_id: str | None = None
    ) -> str:
        """Store an event durably; return its id once it is stored.

        With an ``event_id`` chosen by the sender, sending it again (a retry after
        a timeout, a duplicate delivery) stores and delivers nothing new: the
        event is delivered once. Without one, a fresh id is generated.
        """
        check_id(workflow_id, "workflow_id")
        check_id(key, "event key")
        if event_id is not None:
            check_id(event_id, "event_id")
        data, digest = _encode(workflow_id, key, payload)
        event_id = uuid.uuid4().hex if event_id is None else event_id
        where = (self.storage.uri, workflow_id)
        if not await self._reserve(workflow_id):
            # Full: only a retry of an event already stored goes through.
            if not await self.known(workflow_id, key, event_id):
                raise MailboxFullError(
                    f"The mailbox of workflow {workflow_id!r} holds {self.limit} events no "
                    f"task has consumed (its limit): the event for key {key!r} was not "
                    "stored. Send it again once the workflow has taken some, or raise "
                    "RAY_WORKFLOWS_MAILBOX_LIMIT.",
                    workflow_id=workflow_id,
                    key=key,
                    limit=self.limit,
                )
            await self._resend(workflow_id, key, event_id, data, digest)
        else:
            try:
                if not await self._store(workflow_id, key, data, digest, event_id):
                    counts.release(where)  # a retry: nothing new is held
            except BaseException:
                counts.release(where)
                raise
        log.debug("event.stored", workflow_id=workflow_id, key=key, event_id=event_id)
        self.notify(workflow_id, key)
        return event_id

    async def _store(
        self, workflow_id: str, key: str, data: bytes, digest: str, event_id: str
    ) -> bool:
        """Store a new event; False if its id was stored before (then answered as a retry)."""
        name = _name(event_id)
        id_key = keys.mailbox_id_key(workflow_id, key, event_id)
        # The id's record names the event and the digest of its payload.
        if await self.storage.put_if_absent(id_key, f"{name}\n{digest}".encode()):
            await self.storage.put_if_absent(keys.mailbox_event_key(workflow_id, key, name), data)
            return True
        await self._resend(workflow_id, key, event_id, data, digest)
        return False

    async def _reserve(self, workflow_id: str) -> bool:
        where = (self.storage.uri, workflow_id)
        room = counts.take(where, self.limit)
        if room is None:
            room = counts.settle(where, await self.held(workflow_id), self.limit)
        return room

    async def held(self, workflow_id: str) -> int:
        """How many events the workflow's mailbox holds (every key; claimed ones too
        until their task's output is checkpointed). Lists the mailbox."""
        base = keys.mailbox_prefix(workflow_id) + "keys/"
        return sum(
            1 for k in await self.storage.list(base) if k[len(base) :].split("/")[1] == "events"
        )

    async def known(self, workflow_id: str, key: str, event_id: str) -> bool:
        """Whether an event of this id was ever sent to (workflow, key)."""
        return await self.storage.exists(keys.mailbox_id_key(workflow_id, key, event_id))

    async def _resend(
        self, workflow_id: str, key: str, event_id: str, data: bytes, digest: str
    ) -> None:
        # The same id with another payload is not a retry: refused, the first stands.
        # A first send may have died between its dedupe record and its event
        # record. Put the event back unless a task has claimed it: the claim record
        # outlives the acknowledgement, so a consumed event is never revived (and
        # one revived in a race is still claimed, so nobody gets it).
        stored = await self.storage.get(keys.mailbox_id_key(workflow_id, key, event_id))
        name, _, first = (stored.decode() if stored is not None else "").partition("\n")
        if first and first != digest:
            raise EventConflictError(
                f"Event id {event_id!r} was sent to workflow {workflow_id!r} (key {key!r}) "
                "before with another payload; the first event stands. Use a new id for a "
                "new event.",
                workflow_id=workflow_id,
                key=key,
            )
        if name and not await self.storage.exists(keys.mailbox_claim_key(workflow_id, key, name)):
            await self.storage.put_if_absent(keys.mailbox_event_key(workflow_id, key, name), data)

    def notify(self, workflow_id: str, key: str) -> None:
        """Wake this process's claimers of (workflow, key) now. Thread-safe."""
        _waiters.wake((self.storage.uri, workflow_id, key))

    async def claim(self, workflow_id: str, key: str, task_id: str) -> tuple[str, Any]:
        """Wait for an event of ``key`` that no other task holds; claim it for
        ``task_id`` and return ``(event_id, payload)``.

        If ``task_id`` already holds an unacknowledged event of this key (it
        crashed after claiming, before its output was checkpointed), that same
        event is returned: a task gets one event, whatever the crashes.
        """
        check_id(workflow_id, "workflow_id")
        check_id(key, "event key")
        check_id(task_id, "task_id")
        where = (self.storage.uri, workflow_id, key)
        while True:
            woken = _waiters.arm(where)
            try:
                found = await self._try_claim(workflow_id, key, task_id)
                if found is not None:
                    log.debug(
                        "event.claimed",
                        workflow_id=workflow_id,
                        task_id=task_id,
                        key=key,
                        event_id=found[0],
                    )
                    return found
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(woken.wait(), self.poll_interval)
            finally:
                _waiters.disarm(where, woken)

    async def _try_claim(self, workflow_id: str, key: str, task_id: str) -> tuple[str, Any] | None:
        me = task_id.encode()
        index = keys.mailbox_task_key(workflow_id, task_id)
        events = keys.mailbox_events_prefix(workflow_id, key)
        held, listed = await asyncio.gather(self.storage.get(index), self.storage.list(events))

        def claim_key(name: str) -> str:
            return keys.mailbox_claim_key(workflow_id, key, name)

        # Fast path after a restart: the index names the event this task holds.
        if held is not None:
            held_key, _, name = held.decode().rpartition("/")
            if held_key == key and await self.storage.get(claim_key(name)) == me:
                found = await self._load(workflow_id, key, name)
                if found is not None:
                    return found
        pending = [k[len(events) :] for k in listed]
        if not pending:
            return None
        owners = await asyncio.gather(*(self.storage.get(claim_key(n)) for n in pending))
        # A crash between a claim and its index record: the claim is still ours.
        mine = [name for name, owner in zip(pending, owners, strict=True) if owner == me]
        free = [name for name, owner in zip(pending, owners, strict=True) if owner is None]
        for name in mine + free:
            if name in mine or await self.storage.put_if_absent(claim_key(name), me):
                found, _ = await asyncio.gather(
                    self._load(workflow_id, key, name),
                    self.storage.put(index, f"{key}/{name}".encode()),
                )
                if found is not None:
                    return found
        return None

    async def _load(self, workflow_id: str, key: str, name: str) -> tuple[str, Any] | None:
        where = keys.mailbox_event_key(workflow_id, key, name)
        data = await self.storage.get(where)
        if data is None:
            return None  # acknowledged (or the workflow deleted) meanwhile
        _, payload = serialization.decode(data, where)
        return _event_id_of(name), serialization.loads(payload, [])

    async def acknowledge(self, workflow_id: str, key: str, event_id: str) -> bool:
        """Drop a claimed event once the claiming task's output is durable.
        Idempotent; True if this call removed it."""
        events = keys.mailbox_events_prefix(workflow_id, key)
        for stored in await self.storage.list(events):
            if _event_id_of(stored[len(events) :]) == event_id:
                log.debug("event.acknowledged", workflow_id=workflow_id, key=key, event_id=event_id)
                removed = await self.storage.delete(stored)
                if removed:
                    counts.release((self.storage.uri, workflow_id))
                return removed
        return False

    async def acknowledge_task(self, workflow_id: str, task_id: str) -> bool:
        """Drop the event that ``task_id`` claimed (see :meth:`acknowledge`), found by
        the task alone: what a listener's ``event_checkpointed`` knows."""
        index = keys.mailbox_task_key(workflow_id, task_id)
        held = await self.storage.get(index)
        if held is None:
            return False
        key, _, name = held.decode().rpartition("/")
        removed = await self.storage.delete(keys.mailbox_event_key(workflow_id, key, name))
        if removed:
            counts.release((self.storage.uri, workflow_id))
        await self.storage.delete(index)
        log.debug("event.acknowledged", workflow_id=workflow_id, task_id=task_id, key=key)
        return removed

    async def pending(self, workflow_id: str, key: str) -> list[str]:
        """The ids of the events of ``key`` not yet acknowledged, in delivery order."""
        events = keys.mailbox_events_prefix(workflow_id, key)
        return [_event_id_of(k[len(events) :]) for k in await self.storage.list(events)]

    async def delete_all(self, workflow_id: str) -> int:
        """Remove the workflow's whole mailbox; return how many records were removed."""
        counts.forget((self.storage.uri, workflow_id))
        return await self.storage.delete_prefix(keys.mailbox_prefix(workflow_id))


def _name(event_id: str) -> str:
    return f"{_arrival_micros():0{_STAMP}d}-{event_id}"


def _encode(workflow_id: str, key: str, payload: Any) -> tuple[bytes, str]:
    """The event's record, and the digest of its payload (what a resend must match)."""
    where = f"event {key!r} for workflow {workflow_id!r}"
    try:
        data, refs = serialization.dumps(payload)
    except Exception as exc:
        raise EventPayloadError(
            f"The payload of {where} cannot be pickled ({type(exc).__name__}: {exc}). "
            "Send plain data: JSON-like values or instances of importable classes.",
            workflow_id=workflow_id,
            key=key,
        ) from exc
    if refs:
        raise EventPayloadError(
            f"The payload of {where} holds a ray.ObjectRef. Events are stored durably and "
            "a ref would not outlive its owner: send the value (ray.get(ref)) instead.",
            workflow_id=workflow_id,
            key=key,
        )
    digest = hashlib.sha256(data).hexdigest()
    return serialization.encode("event", data, sent_at=time.time()), digest


__all__ = ["EventPayloadError", "Mailbox"]
