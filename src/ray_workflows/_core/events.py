"""Events: the listener contract, the context a listener polls in, and the durable mailbox.

A listener is a class whose ``poll_for_event`` coroutine returns once its event
has happened. The engine runs it as an asyncio task in the manager's loop (no
Ray worker and no CPU is held while it waits), checkpoints the value it returns
as the task's output, and only then calls ``event_checkpointed``::

    class OrderPaid(EventListener):
        async def poll_for_event(self, order_id):
            ctx = current_context()
            _, payload = await ctx.mailbox.claim(ctx.workflow_id, f"paid-{order_id}", ctx.task_id)
            return payload

Events sent with ``send_event`` land in the workflow's :class:`Mailbox`, kept
durably in its storage until a task has claimed and checkpointed them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from ray_workflows._core import keys, serialization
from ray_workflows._core.ids import check_id
from ray_workflows._core.log import get_logger
from ray_workflows.clock import Clock
from ray_workflows.exceptions import WorkflowError
from ray_workflows.storage import Storage

log = get_logger()


class NoEventContextError(WorkflowError, RuntimeError):
    """``current_context()`` was called outside a listener's ``poll_for_event``."""


class EventPayloadError(WorkflowError, TypeError):
    """An event payload cannot be stored (it does not pickle, or holds an ObjectRef)."""


class EventListener:
    """Base class of event listeners (the ``ray.workflow.EventListener`` of Ray 2.47).

    Listeners are stateless: the engine creates a new instance, with no
    arguments, for each call, and never pickles an instance (the class must be
    importable or picklable by value, like a Ray task's function).
    """

    #: True for a listener whose event is a time on ``current_context().clock`` (the
    #: timer). The engine marks every other poll as an activity of the clock, and a
    #: virtual clock only skips time while nothing but such listeners wait.
    waits_on_clock: ClassVar[bool] = False

    def __init__(self) -> None:
        """Optional constructor. It takes no arguments."""

    async def poll_for_event(self, *args: Any, **kwargs: Any) -> Any:
        """Return the event once it has happened; the engine checkpoints the result.

        Runs as an asyncio task in the manager's event loop: await, never block
        (use ``asyncio.to_thread`` for blocking calls). It may be cancelled (the
        workflow was canceled or the manager stops) and is then polled again,
        with the same arguments and task id, when the workflow resumes.
        :func:`current_context` gives the workflow id, task id, storage, clock
        and mailbox.
        """
        raise NotImplementedError(f"{type(self).__qualname__} must implement poll_for_event()")

    async def event_checkpointed(self, event: Any) -> None:
        """Optional: called after ``event`` has been checkpointed, to commit it upstream
        (acknowledge a message, delete a file).

        At least once: a crash after the checkpoint and before this call returns
        makes the resumed workflow call it again with the same event, and never
        poll again. Make it idempotent.
        """


@dataclass(frozen=True)
class EventContext:
    """What a listener's ``poll_for_event`` runs with; see :func:`current_context`."""

    workflow_id: str
    task_id: str
    storage: Storage
    clock: Clock
    mailbox: Mailbox


_context: contextvars.ContextVar[EventContext | None] = contextvars.ContextVar(
    "ray_workflows_event_context", default=None
)


def current_context() -> EventContext:
    """The context of the listener poll running in this asyncio task."""
    ctx = _context.get()
    if ctx is None:
        raise NoEventContextError(
            "current_context() is only available inside EventListener.poll_for_event() "
            "and event_checkpointed() while a workflow runs them. To call a listener "
            "yourself, wrap the call in `with use_context(EventContext(...)):`."
        )
    return ctx


def context_or_none() -> EventContext | None:
    """The current listener context, or ``None`` outside a listener poll."""
    return _context.get()


@contextlib.contextmanager
def use_context(ctx: EventContext) -> Iterator[EventContext]:
    """Make ``ctx`` current in this block. A task created inside it (``create_task``
    copies the context) keeps it for its whole life::

        with use_context(ctx):
            poll = asyncio.create_task(listener.poll_for_event(*args, **kwargs))
    """
    token = _context.set(ctx)
    try:
        yield ctx
    finally:
        _context.reset(token)


# -- the mailbox ------------------------------------------------------------------

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

    Waiting: a claimer wakes within milliseconds when a send goes through any
    Mailbox on the same storage in this process, or when :meth:`notify` is called
    (the engine does, for events sent elsewhere); otherwise it re-reads the
    storage every ``poll_interval`` seconds.
    """

    def __init__(self, storage: Storage, *, poll_interval: float = 1.0) -> None:
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval!r}")
        self.storage = storage
        self.poll_interval = poll_interval

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
        data = _encode(workflow_id, key, payload)
        if event_id is None:
            event_id = uuid.uuid4().hex
            await self.storage.put(keys.mailbox_event_key(workflow_id, key, _name(event_id)), data)
        else:
            name = _name(event_id)
            id_key = keys.mailbox_id_key(workflow_id, key, event_id)
            if await self.storage.put_if_absent(id_key, name.encode()):
                await self.storage.put_if_absent(
                    keys.mailbox_event_key(workflow_id, key, name), data
                )
            else:
                await self._resend(workflow_id, key, event_id, data)
        log.debug("event.stored", workflow_id=workflow_id, key=key, event_id=event_id)
        self.notify(workflow_id, key)
        return event_id

    async def known(self, workflow_id: str, key: str, event_id: str) -> bool:
        """Whether an event of this id was ever sent to (workflow, key)."""
        return await self.storage.exists(keys.mailbox_id_key(workflow_id, key, event_id))

    async def _resend(self, workflow_id: str, key: str, event_id: str, data: bytes) -> None:
        # A first send may have died between its dedupe record and its event
        # record. Put the event back unless a task has claimed it: the claim record
        # outlives the acknowledgement, so a consumed event is never revived (and
        # one revived in a race is still claimed, so nobody gets it).
        stored = await self.storage.get(keys.mailbox_id_key(workflow_id, key, event_id))
        name = stored.decode() if stored is not None else ""
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
                return await self.storage.delete(stored)
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
        await self.storage.delete(index)
        log.debug("event.acknowledged", workflow_id=workflow_id, task_id=task_id, key=key)
        return removed

    async def pending(self, workflow_id: str, key: str) -> list[str]:
        """The ids of the events of ``key`` not yet acknowledged, in delivery order."""
        events = keys.mailbox_events_prefix(workflow_id, key)
        return [_event_id_of(k[len(events) :]) for k in await self.storage.list(events)]

    async def delete_all(self, workflow_id: str) -> int:
        """Remove the workflow's whole mailbox; return how many records were removed."""
        return await self.storage.delete_prefix(keys.mailbox_prefix(workflow_id))


def _name(event_id: str) -> str:
    return f"{_arrival_micros():0{_STAMP}d}-{event_id}"


def _encode(workflow_id: str, key: str, payload: Any) -> bytes:
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
    return serialization.encode("event", data, sent_at=time.time())


# -- the listener conformance suite -------------------------------------------------


class ListenerConformance:
    """Tests every event listener passes. Subclass it in a test module (the tests are
    ``async def``: pytest-asyncio in auto mode), set ``listener`` and implement
    :meth:`arguments` and :meth:`trigger`::

        from ray_workflows.testing import ListenerConformance

        class TestQueueListener(ListenerConformance):
            listener = QueueListener

            def arguments(self, ctx):
                return ("orders",), {}

            async def trigger(self, ctx, args, kwargs):
                await put_message("orders", "hello")

    Each test polls in a real :class:`EventContext` on a fresh file storage under
    pytest's ``tmp_path``, with a :class:`~ray_workflows.backends.clocks.VirtualClock`.
    Until the trigger has run the test holds ``clock.activity()``, so a listener
    that waits for a deadline on the context's clock is reached by the clock's
    jump only after the trigger.
    """

    listener: ClassVar[type[EventListener]]
    #: Real seconds a poll must keep waiting before the trigger.
    quiet_seconds: ClassVar[float] = 0.2
    #: Real seconds a poll may take to return after the trigger.
    timeout_seconds: ClassVar[float] = 10.0

    def arguments(self, ctx: EventContext) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The ``(args, kwargs)`` of ``poll_for_event``."""
        return (), {}

    async def trigger(
        self, ctx: EventContext, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Make the event that the poll with these arguments waits for happen."""
        raise NotImplementedError

    def check_event(self, ctx: EventContext, event: Any) -> None:
        """Optional: assert on the event a poll returned."""

    def make_context(
        self, path: Any, workflow_id: str = "wf", task_id: str = "task"
    ) -> EventContext:
        from ray_workflows.backends.clocks import VirtualClock
        from ray_workflows.storage import open_storage

        storage = open_storage(str(path))
        return EventContext(workflow_id, task_id, storage, VirtualClock(), Mailbox(storage))

    async def _triggered_event(self, tmp_path: Any) -> tuple[EventContext, Any]:
        ctx = self.make_context(tmp_path / "storage")
        args, kwargs = self.arguments(ctx)
        with ctx.clock.activity():
            with use_context(ctx):
                poll = asyncio.create_task(self.listener().poll_for_event(*args, **kwargs))
            await asyncio.sleep(self.quiet_seconds)
            if poll.done():
                poll.result()  # raises what the poll raised
                raise AssertionError("poll_for_event returned before its event happened")
            await self.trigger(ctx, args, kwargs)
        event = await asyncio.wait_for(poll, self.timeout_seconds)
        self.check_event(ctx, event)
        return ctx, event

    async def test_is_an_event_listener(self) -> None:
        import pickle

        assert isinstance(self.listener, type) and issubclass(self.listener, EventListener)
        self.listener()  # constructed with no arguments
        assert serialization.loads(serialization.dumps(self.listener)[0], []) is not None
        # A class of an importable module pickles by reference: the manager imports it.
        if self.listener.__module__ != "__main__":
            assert pickle.loads(pickle.dumps(self.listener)) is self.listener

    async def test_poll_waits_for_its_event(self, tmp_path: Any) -> None:
        await self._triggered_event(tmp_path)

    async def test_event_is_checkpointable(self, tmp_path: Any) -> None:
        _, event = await self._triggered_event(tmp_path)
        data, refs = serialization.dumps(event)
        assert not refs, "an event must not hold ObjectRefs: it is checkpointed"
        serialization.loads(data, [])

    async def test_event_checkpointed_is_repeatable(self, tmp_path: Any) -> None:
        ctx, event = await self._triggered_event(tmp_path)
        with use_context(ctx):  # at least once: a resumed workflow may call it again
            await self.listener().event_checkpointed(event)
            await self.listener().event_checkpointed(event)

    async def test_poll_can_be_cancelled(self, tmp_path: Any) -> None:
        ctx = self.make_context(tmp_path / "storage")
        args, kwargs = self.arguments(ctx)
        with ctx.clock.activity():
            with use_context(ctx):
                poll = asyncio.create_task(self.listener().poll_for_event(*args, **kwargs))
            await asyncio.sleep(self.quiet_seconds / 2)
            poll.cancel()
            done, _ = await asyncio.wait([poll], timeout=self.timeout_seconds)
        assert done and poll.cancelled(), "poll_for_event must not swallow cancellation"


__all__ = [
    "EventContext",
    "EventListener",
    "EventPayloadError",
    "ListenerConformance",
    "Mailbox",
    "NoEventContextError",
    "context_or_none",
    "current_context",
    "use_context",
]
