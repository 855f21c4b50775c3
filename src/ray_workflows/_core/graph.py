"""The task graph of one running workflow: which tasks wait for which inputs, which
are done, and where each output is (an ObjectRef in memory, a record in storage).

It knows nothing of Ray tasks, attempts or storage writes: the runner
(:class:`~ray_workflows._core.scheduler.WorkflowRun`) tells it what happened (a task
finished, a task continued into a sub-plan) and asks it what is ready next.

State stays proportional to the *live* part of the workflow: a finished task's spec
is dropped at once, and its output ref as soon as its last consumer has finished. A
chain of 10,000 tail continuations therefore holds one task at a time.

Continuations: a task that returns a sub-plan is replaced by the sub-plan's output
task, whose output then stands for it. ``root_of`` maps such an output to the task it
stands for (the *root* of the chain), so consumers and waiters of the root are served
when the chain ends.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Container, Iterable
from typing import Any

from ray_workflows._core import serialization
from ray_workflows._core.plan import TaskSpec


class TaskGraph:
    """The tasks of one run and what is known of each."""

    def __init__(
        self,
        output_task_id: str,
        load: Callable[[str], Any],
        writing: Container[str],
    ) -> None:
        """``load(key)`` gives an ObjectRef of the output stored in record ``key``;
        ``writing`` holds the tasks whose output is still on its way to storage (it can
        only be read from memory until then)."""
        self.output_task_id = output_task_id
        self._load = load
        self._writing = writing
        self.specs: dict[str, TaskSpec] = {}  # tasks not finished yet
        self.values: dict[str, Any] = {}  # task -> ObjectRef of its output
        self.stored: dict[str, str] = {}  # task -> key of the record holding its output
        self.done: set[str] = set()
        self.waiting: dict[str, set[str]] = {}  # task -> its inputs not finished yet
        self.consumers: dict[str, list[str]] = collections.defaultdict(list)
        self.needed: collections.Counter[str] = collections.Counter()  # consumers to come
        self.root_of: dict[str, str] = {}  # continuation output -> root of its chain
        self.roots: set[str] = set()  # roots of the chains still running
        self.waits: dict[str, tuple[int, float | None]] = {}  # wait task -> its limits
        self._waiters: dict[str, list[asyncio.Future[Any]]] = collections.defaultdict(list)
        # What every task added is given first: the recorded runtime_env, merged into
        # its Ray options (ray_workflows._core.environment.Dresser), else nothing.
        self.dress: Callable[[TaskSpec], TaskSpec] | None = None

    # -- building ------------------------------------------------------------------
    def add(self, spec: TaskSpec) -> bool:
        """Add a task; return whether it can be submitted now."""
        if self.dress is not None:
            spec = self.dress(spec)
        tid = spec.task_id
        self.specs[tid] = spec
        pending = {u for u in spec.upstream if u not in self.done}
        self.waiting[tid] = pending
        for u in spec.upstream:
            self.needed[u] += 1
            if u in pending:
                self.consumers[u].append(tid)
        if spec.kind == "wait":
            _, kwargs = serialization.loads(spec.args, [None] * len(spec.arg_refs), _no_up)
            self.waits[tid] = (int(kwargs["num_returns"]), kwargs.get("timeout"))
        return not pending or bool(self.ready_to_split(tid))

    def wait_timeout(self, tid: str) -> float | None:
        """For a wait task not ready yet: the seconds after which it splits anyway."""
        limits = self.waits.get(tid)
        if limits is None or limits[1] is None or self.ready_to_split(tid) is not False:
            return None
        return float(limits[1])

    def ready_to_split(self, tid: str) -> bool | None:
        """For a wait task: whether enough of its tasks finished (None: not a wait)."""
        limits = self.waits.get(tid)
        if limits is None:
            return None
        spec = self.specs[tid]
        return len(spec.upstream) - len(self.waiting.get(tid, ())) >= limits[0]

    def mark_stored(self, tid: str, ref: str) -> None:
        """Recovery: ``tid``'s output is the committed record behind ``ref``."""
        self.done.add(tid)
        self.stored[tid] = ref

    def link(self, output: str, root: str) -> None:
        """``output``'s value will stand for ``root``'s (a continuation chain)."""
        self.root_of[output] = root
        self.roots.add(root)

    def target(self, tid: str) -> str:
        """The task whose output ``tid``'s output will be: its chain's root, or itself."""
        return self.root_of.get(tid, tid)

    def value_ref(self, tid: str) -> Any:
        """An ObjectRef of ``tid``'s output: in memory, else loaded from storage."""
        ref = self.values.get(tid)
        if ref is None:
            ref = self.values[tid] = self._load(self.stored[tid])
        return ref

    # -- progress ------------------------------------------------------------------
    def finish(self, tid: str, value_ref: Any, key: str | None) -> list[str]:
        """``tid`` finished with ``value_ref`` (stored in record ``key``, if any); return
        the consumers that can now be submitted."""
        spec = self.specs.pop(tid)
        target = self.root_of.pop(tid, tid)
        self.roots.discard(target)
        self.done.add(target)
        self.values[target] = value_ref
        if key is not None:
            self.stored[target] = key
        self.release_inputs(spec)
        for waiter in self._waiters.pop(target, []):
            if not waiter.done():
                waiter.set_result(value_ref)
        if target == self.output_task_id:
            return []
        ready = []
        for consumer in self.consumers.pop(target, []):
            pending = self.waiting.get(consumer)
            if pending is not None:
                pending.discard(target)
                if not pending or self.ready_to_split(consumer):
                    ready.append(consumer)
        return ready

    def continuing(self, tid: str, output: str) -> tuple[TaskSpec, str]:
        """``tid`` returned a sub-plan whose output task is ``output``: that output now
        stands for ``tid``'s chain. Return ``tid``'s spec and the chain's root."""
        spec = self.specs.pop(tid)
        root = self.root_of.pop(tid, tid)
        self.root_of[output] = root
        self.roots.add(root)
        return spec, root

    def continued(self, spec: TaskSpec, output: str, root: str) -> None:
        """After :meth:`continuing`, once the continuation is stored: ``spec``'s inputs
        are released, and waiters for the sub-plan's output wait for the root."""
        self.release_inputs(spec)
        moved = self._waiters.pop(output, [])
        self._waiters[root].extend(moved)

    def release_inputs(self, spec: TaskSpec) -> None:
        for u in spec.upstream:
            self.needed[u] -= 1
            if self.needed[u] <= 0:
                del self.needed[u]
                # An output still on its way to storage can only be read from memory.
                if u != self.output_task_id and u not in self._writing:
                    self.values.pop(u, None)
        self.waiting.pop(spec.task_id, None)

    def packed(self, holders: Iterable[str]) -> None:
        """These outputs are durable now: drop those no consumer needs any more."""
        for tid in holders:
            if tid != self.output_task_id and self.needed.get(tid, 0) <= 0:
                self.values.pop(tid, None)

    def from_storage(self, tid: str) -> None:
        """The inputs' objects may have died with their node: take the stored copies
        for the next attempt of ``tid``."""
        for u in self.specs[tid].upstream:
            if u in self.stored and u not in self._writing:
                self.values.pop(u, None)

    # -- queries -------------------------------------------------------------------
    def knows(self, tid: str) -> bool:
        """Whether ``tid``'s output can be awaited from memory: it is pending, running,
        done, or the current end of a continuation chain."""
        return tid in self.specs or tid in self.done or tid in self.root_of or tid in self.roots

    def task_output(self, tid: str) -> asyncio.Future[Any]:
        """A future of the ObjectRef of ``tid``'s output (waits if it is not done yet)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        root = self.root_of.get(tid, tid)
        if root in self.done:
            fut.set_result(self.value_ref(root))
        else:
            self._waiters[root].append(fut)
        return fut

    def fail_waiters(self, exc: BaseException) -> None:
        for waiters in self._waiters.values():
            for w in waiters:
                if not w.done():
                    w.set_exception(exc)
        self._waiters.clear()


def _no_up(pid: Any) -> None:
    return None


__all__ = ["TaskGraph"]
