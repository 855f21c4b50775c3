"""How the runner runs event and wait tasks: as coroutines on its event loop, so that
a waiting workflow holds no Ray worker and no CPU slot.

:class:`EventWaits` does the work of such a task (poll the listener and commit the
event, split a wait's tasks) and hands the outcome back; the runner
(:class:`~ray_workflows._core.scheduler.WorkflowRun`) decides what follows, as it
does for a Ray task's receipt. The order of an event's steps (poll, commit,
acknowledge) is :mod:`ray_workflows._core.event_tasks`'.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray_workflows._core import event_tasks, serialization
from ray_workflows._core.events import EventContext
from ray_workflows._core.executor import Executor
from ray_workflows._core.log import get_logger
from ray_workflows._core.plan import Deref, TaskHandle, TaskSpec, Up
from ray_workflows._core.store import WorkflowStore, task_key
from ray_workflows._core.wire import Receipt


class EventWaits:
    """The event and wait tasks of one workflow."""

    def __init__(
        self,
        workflow_id: str,
        store: WorkflowStore,
        executor: Executor,
        value_ref: Callable[[str], Any],
        recorded: dict[tuple[str, str], str],
    ) -> None:
        """``value_ref(tid)`` gives an ObjectRef of a finished task's output;
        ``recorded`` maps (task, record) to the key of a record an earlier epoch wrote
        (recovery)."""
        self.workflow_id = workflow_id
        self.store = store
        self.executor = executor
        self._value_ref = value_ref
        self.recorded = recorded
        self.log = get_logger(workflow_id=workflow_id)

    def context(self, tid: str) -> EventContext:
        return EventContext(
            self.workflow_id,
            tid,
            self.store.storage,
            self.executor.clock,
            self.executor.mailbox,
        )

    async def _arguments(self, spec: TaskSpec) -> tuple[list[Any], dict[str, Any]]:
        # As a worker would see them: upstream values (or refs, when nested), and the
        # values of ObjectRefs passed directly.
        refs = [
            self.executor.load(self.workflow_id, r) if isinstance(r, str) else r
            for r in spec.arg_refs
        ]
        ups = [self._value_ref(u) for u in spec.upstream]
        args, kwargs = serialization.loads(spec.args, refs, lambda pid: ups[pid[1]])

        async def resolve(value: Any) -> Any:
            if isinstance(value, Up):
                return await ups[value.index]
            if isinstance(value, Deref):
                return await value.ref
            return value

        return [await resolve(a) for a in args], {k: await resolve(v) for k, v in kwargs.items()}

    async def run_event(self, spec: TaskSpec, epoch: int) -> tuple[Any, Any, float]:
        """Wait for the event of event task ``spec`` and commit it as its output, under
        ``epoch``; return the event, the listener class (to acknowledge it with) and
        the time the task started."""
        tid = spec.task_id
        start = time.time()
        key = task_key(self.workflow_id, tid, "out", epoch)
        unacked = task_key(self.workflow_id, tid, "unacked", epoch)

        async def commit(event: Any) -> None:
            record = await self.value_record(event, start, time.time())
            # Marker first: a crash before the acknowledgement repeats it on recovery. An
            # output without its marker would never be acknowledged, so where a batch may
            # land in any order (S3) the marker is made durable before the output.
            storage = self.store.storage
            if storage.ordered_batches:
                await storage.put_many({unacked: b"", key: record})
            else:
                await storage.put(unacked, b"")
                await storage.put(key, record)

        async def deadline(seconds: float) -> float:
            stored_key = task_key(self.workflow_id, tid, "deadline", epoch)
            data = await self.store.read(self.recorded.get((tid, "deadline"), stored_key))
            if data is not None:
                return float(data)
            at: float = self.executor.clock.time() + seconds
            await self.store.put(stored_key, repr(at).encode())
            return at

        args, kwargs = await self._arguments(spec)
        listener, args = args[0], args[1:]
        event, cls = await event_tasks.run_event(
            self.context(tid), listener, args, kwargs, commit, deadline
        )
        return event, cls, start

    async def acknowledge(self, tid: str, listener: Any, event: Any, epoch: int) -> None:
        """``event_checkpointed`` of a committed event; its 'unacked' marker goes once
        it returned. A failure is logged: the marker stays, so the next recovery
        acknowledges again (never polls again)."""
        try:
            await event_tasks.acknowledge(self.context(tid), listener, event)
            await self.store.storage.delete(task_key(self.workflow_id, tid, "unacked", epoch))
        except Exception as exc:
            self.log.warning("event.acknowledge_failed", task_id=tid, error=repr(exc))

    async def reacknowledge(self, spec: TaskSpec) -> None:
        """Recovery: an event committed before a crash gets its ``event_checkpointed``."""
        tid = spec.task_id
        try:
            # Only the listener (the first argument, a plain class or name) matters here.
            args, _ = serialization.loads(spec.args, [None] * len(spec.arg_refs), lambda p: None)
            event = await self.executor.load(self.workflow_id, self.recorded[(tid, "out")])
            await event_tasks.acknowledge(self.context(tid), args[0], event)
            await self.store.storage.delete(self.recorded[(tid, "unacked")])
        except Exception:
            self.log.exception("event.acknowledge_failed", task_id=tid)

    async def value_record(self, value: Any, start: float, end: float) -> bytes:
        """The output record of a value produced here (an event, a wait's split), its
        ObjectRefs checkpointed first, as a worker's ``_commit`` does."""
        payload, refs = serialization.dumps(value)
        keys = await self.executor.save_objects(self.workflow_id, refs) if refs else []
        return serialization.encode("value", payload, keys, start_time=start, end_time=end)

    async def split(
        self, spec: TaskSpec, done: set[str], num_returns: int
    ) -> tuple[tuple[list[Any], list[TaskHandle]], Receipt]:
        """A wait task's value, ``(ready values, handles of the others)`` (at most
        ``num_returns`` of its tasks ready, of those in ``done``), and its receipt."""
        start = time.time()
        ready = [u for u in spec.upstream if u in done][:num_returns]
        values = [await self._value_ref(u) for u in ready]
        remaining = [TaskHandle(u) for u in spec.upstream if u not in ready]
        result = (values, remaining)
        end = time.time()
        record = await self.value_record(result, start, end)
        return result, Receipt("value", start, end, record=record if spec.checkpoint else None)


__all__ = ["EventWaits"]
