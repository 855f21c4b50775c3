"""Dispatch: how a run's ready tasks reach Ray, and how their attempts are tracked
until their receipts come.

:class:`Dispatch` is the part of the runner that talks to Ray: it builds each
attempt's inputs and header, asks the placement policy (:mod:`ray_workflows._core.placement`)
how the attempt goes (alone, fused with its consumer, batched, ahead of its inputs, in
place), submits it through the executor, and watches for its receipt. What a receipt
means (a value, a continuation, a failure, a dead worker) is decided by the runner
itself, :class:`~ray_workflows._core.scheduler.WorkflowRun`, which builds on this class
and provides the hooks at the bottom.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import ray

from ray_workflows._core.calls import Calls
from ray_workflows._core.executor import Executor, Submission
from ray_workflows._core.graph import TaskGraph
from ray_workflows._core.log import get_logger
from ray_workflows._core.placement import Placement
from ray_workflows._core.run_tasks import RunTasks
from ray_workflows._core.store import WorkflowStore
from ray_workflows._core.wire import Receipt


@dataclasses.dataclass
class TaskFailure:
    task_id: str
    error: bytes | None
    text: str


class Dispatch:
    """The attempts of one workflow's run: submitted, and tracked until they end."""

    def __init__(
        self, workflow_id: str, store: WorkflowStore, executor: Executor, graph: TaskGraph
    ) -> None:
        self.workflow_id = workflow_id
        self.store = store
        self.executor = executor
        self.graph = graph
        self.log = get_logger(workflow_id=workflow_id)
        self.debug = _debug(self.log)  # checked per task: cheaper than asking the logger
        self.funcs: dict[str, Any] = {}  # func key -> the pickled function, or its ref
        # task -> (the coroutine dealing with its attempt, if any; its receipt's ref)
        self.running: dict[str, tuple[anyio.CancelScope | None, Any]] = {}
        self.tasks = RunTasks()  # the run's coroutines (see WorkflowRun.run)
        self.attempts: collections.Counter[str] = collections.Counter()
        self.started: dict[str, float] = {}  # first submit time of tasks still live
        self.result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending_submit: list[str] = []
        self._unleased: list[str] = []  # held back while the lease is not valid
        self.lease: Any = None  # the engine's lease on this workflow, while it runs
        # The epoch of that lease: every record of this run is written under it (see
        # ray_workflows._core.store, Fencing).
        self.epoch = 0
        # Submitting ahead: the output ref (and a "receipt arrived" event) of each task
        # whose attempt is under way, by the task whose output it will be; and, for a
        # task submitted ahead, the refs it was given for inputs not yet finished.
        self.inflight: dict[str, tuple[Any, asyncio.Event]] = {}
        self.ahead: dict[str, dict[str, Any]] = {}
        # Receipts that arrived but are still being dealt with (a task submitted ahead of
        # one of them waits for that, not just for the arrival), by output.
        self._settling: dict[str, asyncio.Event] = {}
        # A dead worker is charged by one rule (see WorkflowRun._handle): to an attempt
        # that ran alone in its Ray task. Attempts that shared one (a fused pair, a
        # batch) are not charged; they run again, alone from then on, so that the next
        # death is charged to the task that died.
        self.shared: set[str] = set()  # attempts under way in a Ray task with others
        self.batched: set[str] = set()  # ...of which in a batch (cancelled by executor)
        self.alone: set[str] = set()  # tasks whose shared Ray task died
        self.calls = Calls(
            workflow_id,
            store.storage,
            graph,
            self.funcs,
            self.attempts,
            self.inflight,
            lambda: self.epoch,
        )
        self.placement = Placement(
            graph, self, executor.quick, executor.continues, executor.settings, here=executor.here
        )

    def retake(self, lease: Any) -> None:
        """Go on under ``lease``, taken again after the old one ran out: new records
        are written under its epoch."""
        self.lease, self.epoch = lease, lease.epoch
        self.calls.headers.clear()
        self._pending_submit.extend(self._unleased)
        self._unleased.clear()
        self._flush_submits()

    # -- submitting ----------------------------------------------------------------
    def _flush_submits(self) -> None:
        pending, self._pending_submit = self._pending_submit, []
        graph = self.graph
        # Inputs that only storage still holds (after a resume) are loaded in batches.
        missing = list(
            dict.fromkeys(
                u
                for tid in pending
                if tid in graph.specs
                for u in graph.specs[tid].upstream
                if u not in graph.values and u in graph.stored
            )
        )
        if len(missing) > 1:
            keys = [graph.stored[u] for u in missing]
            for u, ref in zip(
                missing, self.executor.load_many(self.workflow_id, keys), strict=True
            ):
                graph.values[u] = ref
        submitted = []
        for tid in pending:
            if tid in graph.specs and tid not in self.running:
                then = self._submit_one(tid)
                submitted.append(tid)
                if then is not None:
                    submitted.append(then)
        self._go_ahead(submitted)

    def _submit(self, tid: str) -> None:
        """Submit ``tid``, then every consumer that can now be submitted ahead."""
        then = self._submit_one(tid)
        self._go_ahead([tid] if then is None else [tid, then])

    def _go_ahead(self, submitted: list[str]) -> None:
        """Submit ahead the consumers of the tasks just submitted, and theirs in turn.
        A consumer is looked at once per wave, however many of its inputs were just
        submitted (a fan-in of n is checked once, not n times)."""
        if not self.placement.submit_ahead:
            return
        todo: collections.deque[str] = collections.deque()
        queued: set[str] = set()

        def consumers_of(task_id: str) -> None:
            target = self.graph.target(task_id)
            if task_id in self.running and target in self.inflight:
                for c in self.graph.consumers.get(target, ()):
                    if c not in queued:
                        queued.add(c)
                        todo.append(c)

        for task_id in submitted:
            consumers_of(task_id)
        while todo:
            c = todo.popleft()
            queued.discard(c)
            if self.placement.ahead(c):
                then = self._submit_one(c)
                consumers_of(c)
                if then is not None:
                    consumers_of(then)

    def _submit_one(self, tid: str) -> str | None:
        """Submit one attempt of ``tid``; return the consumer fused into its Ray task,
        if any (see ``Placement.fused_consumer``)."""
        spec = self.graph.specs[tid]
        if self.lease is not None and not self.lease.valid():
            # Past its lease's deadline (a paused process, a renewal too late): nothing
            # starts until the lease is taken again (retake) or the run is abandoned.
            self._unleased.append(tid)
            return None
        if spec.kind in ("event", "wait"):
            self.started.setdefault(tid, time.time())
            self.running[tid] = (self._spawn(self._run_in_loop(tid)), None)
            return None
        values, header, refs, ahead = self.calls.inputs(tid, spec)
        then = self.placement.fused_consumer(tid, spec)
        here = self.placement.in_place(spec)
        deliver = self._delivered(tid, then, ahead, here)
        seconds = self.executor.seconds(spec.func_key)
        if then is not None:
            seconds += self.executor.seconds(self.graph.specs[then].func_key)
        sub = Submission(
            *self.calls.call(tid, spec, then, values, header, refs),
            deliver,
            self._alive,
            self._unsent(tid),
            seconds,
        )
        if here:
            deliver(self.executor.run_here(sub), False, False)
            return then
        if self.placement.batchable(tid, spec, ahead is not None):
            if not self.executor.offer(sub):
                self.running[tid] = (None, None)  # held: not submitted twice meanwhile
                if then is not None:
                    self.running[then] = (None, None)
                return None
            return then
        deliver(self.executor.submit(sub, spec.options.ray_options), False, False)
        return then

    def _alive(self) -> bool:
        return not self.result.done()

    def _delivered(
        self, tid: str, then: str | None, ahead: dict[str, Any] | None, here: bool = False
    ) -> Callable[[tuple[Any, ...], bool, bool], None]:
        """What tracks ``tid``'s attempt (with ``then``'s) once its refs exist: now, or
        ``later`` for one that waited in ``Executor.offer`` (it then goes ahead too)."""

        def deliver(refs: tuple[Any, ...], batched: bool, later: bool) -> None:
            placed = self.executor.placed
            placed["batched" if batched else "in place" if here else "alone"] += 1
            if then is not None:
                placed["fused"] += 1
            if ahead is not None:
                placed["ahead"] += 1
            self._submitted(tid, refs[0], refs[1], ahead)
            if then is not None:
                self._submitted(then, refs[2], refs[3], {self.graph.target(tid): refs[1]})
                self.shared.update((tid, then))
            if batched:
                self.shared.add(tid)
                self.batched.add(tid)
                if then is not None:
                    self.batched.add(then)
            if later:
                self._go_ahead([tid] if then is None else [tid, then])

        return deliver

    def _submitted(
        self, tid: str, receipt_ref: Any, value_ref: Any, ahead: dict[str, Any] | None
    ) -> None:
        """Track the attempt of ``tid`` just submitted until its receipt arrives."""
        self.started.setdefault(tid, time.time())
        if ahead is not None:
            self.ahead[tid] = ahead
        self.inflight[self.graph.target(tid)] = (value_ref, asyncio.Event())
        watcher = self.executor.receipts
        if watcher.available(receipt_ref):
            activity = self.executor.clock.activity()
            activity.__enter__()
            self.running[tid] = (None, receipt_ref)
            watcher.watch(
                receipt_ref,
                functools.partial(self._arrived, tid, receipt_ref, value_ref, activity),
            )
        else:
            self.running[tid] = (self._spawn(self._await(tid, receipt_ref, value_ref)), receipt_ref)
        if self.debug:
            self.log.debug(
                "task.submitted", task_id=tid, attempt=self.attempts[tid], ahead=bool(ahead)
            )

    def _spawn(self, coro: Awaitable[None]) -> anyio.CancelScope:
        return self.tasks.spawn(coro)

    # -- attempts that ended ---------------------------------------------------------
    def _settle(self, tid: str, value_ref: Any) -> None:
        """``tid``'s attempt ended: tasks submitted ahead of it may now look at it."""
        target = self.graph.target(tid)
        entry = self.inflight.get(target)
        if entry is not None and entry[0] is value_ref:
            del self.inflight[target]
            entry[1].set()

    def _ahead_known_well(self, ahead: dict[str, Any]) -> bool:
        return all(self._became_output(u, ref) for u, ref in ahead.items())

    def _became_output(self, u: str, ref: Any) -> bool:
        """Whether ``ref``, handed to a task submitted ahead, is ``u``'s finished output."""
        return u in self.graph.done and self.graph.values.get(u) is ref

    async def _went_ahead_well(self, ahead: dict[str, Any]) -> bool:
        """For a task submitted ahead: whether every input it was given became that
        input's output (waits until their attempts have been dealt with)."""
        for u, ref in ahead.items():
            entry = self.inflight.get(u)
            if entry is not None and entry[0] is ref:
                await entry[1].wait()
            settling = self._settling.get(u)
            if settling is not None:  # its receipt came and is being dealt with
                await settling.wait()
            if not self._became_output(u, ref):
                return False
        return True

    def _resubmit(self, tid: str) -> None:
        """Submit again a task whose attempt did not count: now if its inputs are all
        done, ahead again if it can be, else when its last input finishes."""
        if tid not in self.graph.specs or self.result.done():
            return
        if not self.graph.waiting.get(tid) or self.graph.ready_to_split(tid):
            self._pending_submit.append(tid)
        elif self.placement.ahead(tid):
            self._submit(tid)
        self._flush_submits()

    # -- receipts ----------------------------------------------------------------
    def _arrived(
        self, tid: str, receipt_ref: Any, value_ref: Any, activity: Any, result: Any
    ) -> Callable[[], None] | None:
        """A receipt (or the RayError in its place) came, through the watcher. The
        common case, a value whose inputs are settled, is handled right here."""
        activity.__exit__(None, None, None)
        if isinstance(result, tuple):
            result = Receipt.unwire(result)
        entry = self.running.get(tid)
        if entry is None or entry[1] is not receipt_ref or self.result.done():
            return None  # the run ended, or moved on, meanwhile
        self._settle(tid, value_ref)
        ahead = self.ahead.get(tid)
        if (
            isinstance(result, Receipt)
            and result.kind == "value"
            and not result.writes
            and (ahead is None or self._ahead_known_well(ahead))
        ):
            self.ahead.pop(tid, None)
            self.running.pop(tid, None)
            try:
                self._observe(tid, result)
                self._finished(tid, value_ref, result)
            except Exception as exc:  # a bug: fail the workflow loudly
                self.log.exception("scheduler.error", task_id=tid)
                self._fail(TaskFailure(tid, None, f"{type(exc).__name__}: {exc}"), exc)
                return None
            return self._flush_submits
        # Dealt with from now on (see _went_ahead_well), though the task starts later.
        self._settling.setdefault(self.graph.target(tid), asyncio.Event())
        self.running[tid] = (self._spawn(self._process(tid, result, value_ref)), receipt_ref)
        return None

    async def _await(self, tid: str, receipt_ref: Any, value_ref: Any) -> None:
        """Await one receipt (where the watcher is not available), then process it."""
        value = value_ref
        try:
            with self.executor.clock.activity():
                result: Any = Receipt.unwire(await receipt_ref)
            if isinstance(value_ref, asyncio.Future):  # run in place: its ObjectRef
                value = await value_ref
        except ray.exceptions.RayError as exc:  # the worker or its node died
            result = exc
        self._settle(tid, value_ref)
        await self._process(tid, result, value)

    async def _process(self, tid: str, result: Any, value_ref: Any) -> None:
        target = self.graph.target(tid)
        settling = self._settling.setdefault(target, asyncio.Event())
        try:
            await self._handle(tid, result, value_ref)
        finally:
            if self._settling.get(target) is settling:
                del self._settling[target]
            settling.set()

    def _observe(self, tid: str, receipt: Receipt) -> None:
        spec = self.graph.specs.get(tid)
        if spec is not None:
            seconds = receipt.end_time - receipt.start_time
            self.executor.observe(spec.func_key, seconds, continued=receipt.kind == "continuation")

    # -- the runner's hooks ----------------------------------------------------------
    async def _handle(self, tid: str, result: Any, value_ref: Any) -> None:
        """What ``tid``'s receipt (or the RayError in its place) means for the run."""
        raise NotImplementedError

    def _finished(self, tid: str, value_ref: Any, receipt: Receipt) -> None:
        """``tid`` finished with the value behind ``value_ref``."""
        raise NotImplementedError

    def _fail(self, failure: TaskFailure, internal: BaseException | None) -> None:
        """The run fails with ``failure``."""
        raise NotImplementedError

    def _unsent(self, tid: str) -> Callable[[BaseException], None]:
        """What to do if ``tid``'s attempt could not be submitted at all."""
        raise NotImplementedError

    async def _run_in_loop(self, tid: str) -> None:
        """Run event or wait task ``tid`` on the event loop, not in Ray."""
        raise NotImplementedError


def _debug(log: Any) -> bool:
    enabled: bool = log.isEnabledFor(10)  # logging.DEBUG, without building the event
    return enabled


__all__ = ["Dispatch", "TaskFailure"]
