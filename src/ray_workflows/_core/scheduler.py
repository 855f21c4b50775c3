"""The scheduler: one coroutine runs one workflow to completion.

It submits every task whose inputs are ready as a Ray task, awaits the task's
receipt, and reacts: a value makes its consumers ready, a continuation splices
a new sub-plan in place of the task, an error is retried (with backoff) or
fails the workflow. All state changes happen on one event loop, so no locks.

State stays proportional to the *live* part of the workflow: a finished task's
spec is dropped at once, and its output ref as soon as its last consumer has
finished. A chain of 10,000 tail continuations therefore holds one task at a
time, and nothing here recurses.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import ray

from ray_workflows._core import event_tasks, serialization
from ray_workflows._core.events import EventContext
from ray_workflows._core.executor import Executor, Submission
from ray_workflows._core.ids import IdAllocator
from ray_workflows._core.log import get_logger
from ray_workflows._core.placement import Placement
from ray_workflows._core.plan import Deref, Plan, TaskHandle, TaskSpec, Up
from ray_workflows._core.receipts import cancel_ray_task
from ray_workflows._core.store import PackWriter, WorkflowStore, task_key
from ray_workflows._core.wire import Attempt, Receipt, pickled_error, task_header
from ray_workflows.exceptions import WorkflowCancellationError, WorkflowExecutionError

# Backoff between retries: 50 ms doubling to at most 5 s, with jitter.
_BACKOFF_BASE, _BACKOFF_CAP = 0.05, 5.0

_PRODUCED = object()  # the input a fused consumer gets from its producer


@dataclasses.dataclass
class TaskFailure:
    task_id: str
    error: bytes | None
    text: str


class WorkflowRun:
    """The live state of one running workflow."""

    def __init__(
        self,
        workflow_id: str,
        store: WorkflowStore,
        executor: Executor,
        output_task_id: str,
        allocator: IdAllocator,
    ) -> None:
        self.workflow_id = workflow_id
        self.store = store
        self.executor = executor
        self.output_task_id = output_task_id
        self.allocator = allocator
        self.log = get_logger(workflow_id=workflow_id)
        self.debug = _debug(self.log)  # checked per task: cheaper than asking the logger
        self.specs: dict[str, TaskSpec] = {}
        self.funcs: dict[str, Any] = {}  # func key -> the pickled function, or its ref
        self.values: dict[str, Any] = {}  # task -> ObjectRef of its output
        self.stored: dict[str, str] = {}  # task -> key of the record holding its output
        self.done: set[str] = set()
        self.waiting: dict[str, set[str]] = {}
        self.consumers: dict[str, list[str]] = collections.defaultdict(list)
        self.needed: collections.Counter[str] = collections.Counter()
        self.root_of: dict[str, str] = {}  # continuation output -> root of its chain
        self.roots: set[str] = set()  # roots of the chains still running
        self.running: dict[str, tuple[asyncio.Task[None] | None, Any]] = {}
        self.attempts: collections.Counter[str] = collections.Counter()
        self.started: dict[str, float] = {}  # first submit time of tasks still live
        self.output_key: str | None = None
        # The output task's record, when it came in the receipt without ObjectRefs.
        self.output_record: bytes | None = None
        self.result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters: dict[str, list[asyncio.Future[Any]]] = collections.defaultdict(list)
        self._pending_submit: list[str] = []
        self._unleased: list[str] = []  # held back while the lease is not valid
        self._headers: dict[str, bytes] = {}  # pickled once per task, for every attempt
        # Event tasks committed before a crash, maybe without their acknowledgement.
        self.unacked: list[TaskSpec] = []
        # Recovery: (task, record) -> the key of a record an earlier epoch wrote.
        self.recorded: dict[tuple[str, str], str] = {}
        self.lease: Any = None  # the engine's lease on this workflow, while it runs
        # The epoch of that lease: every record of this run is written under it (see
        # ray_workflows._core.store, Fencing).
        self.epoch = 0
        self._acks: set[asyncio.Task[None]] = set()  # event acknowledgements under way
        self._waits: dict[str, tuple[int, float | None]] = {}  # wait task -> its limits
        # Submitting ahead: the output ref (and a "receipt arrived" event) of each task
        # whose attempt is under way, by the task whose output it will be; and, for a
        # task submitted ahead, the refs it was given for inputs not yet finished.
        self.inflight: dict[str, tuple[Any, asyncio.Event]] = {}
        self.ahead: dict[str, dict[str, Any]] = {}
        # Receipts that arrived but are still being dealt with (a task submitted ahead of
        # one of them waits for that, not just for the arrival), by output.
        self._settling: dict[str, asyncio.Event] = {}
        # A dead worker is charged by one rule (see _handle): to an attempt that ran
        # alone in its Ray task. Attempts that shared one (a fused pair, a batch) are
        # not charged; they run again, alone from then on, so that the next death is
        # charged to the task that died.
        self.shared: set[str] = set()  # attempts under way in a Ray task with others
        self.batched: set[str] = set()  # ...of which in a batch (cancelled by executor)
        self.alone: set[str] = set()  # tasks whose shared Ray task died
        self.placement = Placement(self, executor.quick, executor.settings, here=executor.here)
        self.packs = PackWriter(
            store, workflow_id, self._packed, self._pack_failed, lambda: self.epoch
        )

    # -- building the graph -----------------------------------------------------
    def add_plan(self, plan: Plan) -> None:
        for key, data in plan.functions.items():
            if key not in self.funcs:
                self.funcs[key] = self.executor.function_ref(key, data)
        for spec in plan.tasks.values():
            self.add_task(spec)

    def add_task(self, spec: TaskSpec) -> None:
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
            self._waits[tid] = (int(kwargs["num_returns"]), kwargs.get("timeout"))
            if kwargs.get("timeout") is not None and self._ready_to_split(tid) is False:
                self._spawn(self._wait_timeout(tid, float(kwargs["timeout"])))
        if not pending or self._ready_to_split(tid):
            self._pending_submit.append(tid)

    def _ready_to_split(self, tid: str) -> bool | None:
        """For a wait task: whether enough of its tasks finished (None: not a wait)."""
        limits = self._waits.get(tid)
        if limits is None:
            return None
        spec = self.specs[tid]
        return len(spec.upstream) - len(self.waiting.get(tid, ())) >= limits[0]

    async def _wait_timeout(self, tid: str, seconds: float) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self.executor.clock.sleep(seconds)
            if tid in self.specs and tid not in self.running and not self.result.done():
                self._submit(tid)

    def mark_stored(self, tid: str, ref: str) -> None:
        """Recovery: ``tid``'s output is the committed record behind ``ref``."""
        self.done.add(tid)
        self.stored[tid] = ref

    def retake(self, lease: Any) -> None:
        """Go on under ``lease``, taken again after the old one ran out: new records
        are written under its epoch."""
        self.lease, self.epoch = lease, lease.epoch
        self._headers.clear()
        self._pending_submit.extend(self._unleased)
        self._unleased.clear()
        self._flush_submits()

    def link(self, output: str, root: str) -> None:
        self.root_of[output] = root
        self.roots.add(root)

    # -- running -----------------------------------------------------------------
    async def run(self, seal: Callable[[], Awaitable[None] | None] | None = None) -> Any:
        """Run until the output task is done and every output it reported is durable;
        return the output's ObjectRef.

        ``seal`` queues the final status where the storage's batches land in order: it
        is called once the output is done and nothing else runs, so that the last
        checkpoints and the status share one batch (it returns ``None`` if it queued
        nothing)."""
        if self.output_task_id in self.done:
            self._resolve_output()
        for spec in self.unacked:
            self._spawn(self._reacknowledge(spec))
        self._flush_submits()
        try:
            try:
                output = await self.result
            except (WorkflowExecutionError, WorkflowCancellationError):
                # Outputs that finished before the failure (or the cancel) are still
                # gathering in a pack: commit them, so a resume does not run them again.
                # (Not after a lost lease: the new holder owns the records now.)
                with contextlib.suppress(Exception):
                    await self.packs.drain()
                raise
            # Consumers start as soon as a receipt arrives; the workflow is done only
            # when every output it reported is durable.
            self._acks = {t for t in self._acks if not t.done()}
            if (
                seal is not None
                and self.store.storage.ordered_batches
                and not (self._acks or self.running)
            ):
                # Nothing left that could add a record or an acknowledgement.
                await self.packs.drain(then=seal)
                return output
            await self.packs.drain()
            # Acknowledgements finish before the workflow does: a crash before then
            # repeats them on recovery (at least once).
            while self._acks:
                await asyncio.wait(list(self._acks))
                self._acks = {t for t in self._acks if not t.done()}
            return output
        finally:
            for tid, (task, ref) in self.running.items():
                if task is not None:
                    task.cancel()
                if ref is None:
                    continue
                if tid in self.batched:  # shared: cancelled once no run wants it
                    self.executor.abandon(ref)
                else:
                    cancel_ray_task(ref)

    def _flush_submits(self) -> None:
        pending, self._pending_submit = self._pending_submit, []
        # Inputs that only storage still holds (after a resume) are loaded in batches.
        missing = list(
            dict.fromkeys(
                u
                for tid in pending
                if tid in self.specs
                for u in self.specs[tid].upstream
                if u not in self.values and u in self.stored
            )
        )
        if len(missing) > 1:
            keys = [self.stored[u] for u in missing]
            for u, ref in zip(
                missing, self.executor.load_many(self.workflow_id, keys), strict=True
            ):
                self.values[u] = ref
        submitted = []
        for tid in pending:
            if tid in self.specs and tid not in self.running:
                then = self._submit_one(tid)
                submitted.append(tid)
                if then is not None:
                    submitted.append(then)
        self._go_ahead(submitted)

    def _value_ref(self, tid: str) -> Any:
        ref = self.values.get(tid)
        if ref is None:
            ref = self.values[tid] = self.executor.load(self.workflow_id, self.stored[tid])
        return ref

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
            target = self.root_of.get(task_id, task_id)
            if task_id in self.running and target in self.inflight:
                for c in self.consumers.get(target, ()):
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
        spec = self.specs[tid]
        if self.lease is not None and not self.lease.valid():
            # Past its lease's deadline (a paused process, a renewal too late): nothing
            # starts until the lease is taken again (retake) or the run is abandoned.
            self._unleased.append(tid)
            return None
        if spec.kind in ("event", "wait"):
            self.started.setdefault(tid, time.time())
            runner = self._run_event(tid) if spec.kind == "event" else self._run_wait(tid)
            self.running[tid] = (self._spawn(runner), None)
            return None
        values, header, refs, ahead = self._inputs(tid, spec)
        then = self.placement.fused_consumer(tid, spec)
        here = self.placement.in_place(spec)
        deliver = self._delivered(tid, then, ahead, here)
        seconds = self.executor.seconds(spec.func_key)
        if then is not None:
            seconds += self.executor.seconds(self.specs[then].func_key)
        sub = Submission(
            *self._call(tid, spec, then, values, header, refs),
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

    def _call(
        self,
        tid: str,
        spec: TaskSpec,
        then: str | None,
        values: list[Any],
        header: bytes,
        refs: Any,
    ) -> tuple[str, tuple[Attempt, ...], tuple[Any, ...], int, int]:
        """The Ray task's name, the attempts it runs (``tid``'s, then its fused
        consumer ``then``'s), their input values, and for a pair where the consumer's
        values start and which of them is the producer's output."""
        first = Attempt(header, self.attempts[tid], self.funcs[spec.func_key], refs)
        if then is None:
            return spec.name, (first,), tuple(values), 0, 0
        then_spec = self.specs[then]
        then_values, then_header, then_refs, _ = self._inputs(
            then, then_spec, self.root_of.get(tid, tid)
        )
        slot = next(i for i, v in enumerate(then_values) if v is _PRODUCED)
        then_values[slot] = None
        second = Attempt(
            then_header, self.attempts[then], self.funcs[then_spec.func_key], then_refs
        )
        name = f"{spec.name}+{then_spec.name}"
        return name, (first, second), (*values, *then_values), len(values), slot

    def _alive(self) -> bool:
        return not self.result.done()

    def _unsent(self, tid: str) -> Callable[[BaseException], None]:
        def fail(exc: BaseException) -> None:  # a bug, or Ray refusing the task
            self.log.error("task.submit_failed", task_id=tid, error=repr(exc))
            self._fail(TaskFailure(tid, None, f"{type(exc).__name__}: {exc}"), exc)

        return fail

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
                self._submitted(then, refs[2], refs[3], {self.root_of.get(tid, tid): refs[1]})
                self.shared.update((tid, then))
            if batched:
                self.shared.add(tid)
                self.batched.add(tid)
                if then is not None:
                    self.batched.add(then)
            if later:
                self._go_ahead([tid] if then is None else [tid, then])

        return deliver

    def _inputs(
        self, tid: str, spec: TaskSpec, produced: str | None = None
    ) -> tuple[list[Any], bytes, Any, dict[str, Any] | None]:
        """What a submission of ``tid`` is given: its direct input refs, its header, its
        live and nested refs, and the refs of inputs not finished yet (submitted ahead).
        The input ``produced`` (by the task it is fused with) is :data:`_PRODUCED`."""
        direct_values: list[Any] = []
        slots: list[int | None] = []
        nested: list[Any] | None = None
        ahead: dict[str, Any] | None = None
        pending = self.waiting.get(tid)
        for i, (u, is_direct, is_nested) in enumerate(
            zip(spec.upstream, spec.direct, spec.nested, strict=True)
        ):
            if u == produced:
                ref: Any = _PRODUCED
            elif pending and u in pending:
                ref = self.inflight[u][0]
                ahead = ahead or {}
                ahead[u] = ref
            else:
                ref = self._value_ref(u)
            slots.append(len(direct_values) if is_direct else None)
            if is_direct:
                direct_values.append(ref)
            if is_nested:
                nested = nested or [None] * len(spec.upstream)
                nested[i] = ref
        header = self._headers.get(tid)
        if header is None:
            header = self._headers[tid] = task_header(
                self.workflow_id, self.store.storage, spec, slots, self.epoch
            )
        live = None if all(isinstance(r, str) for r in spec.arg_refs) else spec.arg_refs
        refs = None if live is None and nested is None else (live, nested)
        return direct_values, header, refs, ahead

    def _submitted(
        self, tid: str, receipt_ref: Any, value_ref: Any, ahead: dict[str, Any] | None
    ) -> None:
        """Track the attempt of ``tid`` just submitted until its receipt arrives."""
        self.started.setdefault(tid, time.time())
        if ahead is not None:
            self.ahead[tid] = ahead
        self.inflight[self.root_of.get(tid, tid)] = (value_ref, asyncio.Event())
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
            task = asyncio.get_running_loop().create_task(self._await(tid, receipt_ref, value_ref))
            self.running[tid] = (task, receipt_ref)
        if self.debug:
            self.log.debug(
                "task.submitted", task_id=tid, attempt=self.attempts[tid], ahead=bool(ahead)
            )

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        return task

    # -- event tasks: coroutines here, no Ray worker held while they wait ----------
    def _event_context(self, tid: str) -> EventContext:
        return EventContext(
            self.workflow_id,
            tid,
            self.store.storage,
            self.executor.clock,
            self.executor.mailbox,
        )

    async def _event_arguments(self, spec: TaskSpec) -> tuple[list[Any], dict[str, Any]]:
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

    async def _run_event(self, tid: str) -> None:
        spec = self.specs[tid]
        start = time.time()
        key = task_key(self.workflow_id, tid, "out", self.epoch)
        unacked = task_key(self.workflow_id, tid, "unacked", self.epoch)

        async def commit(event: Any) -> None:
            record = await self._value_record(event, start, time.time())
            # Marker first: a crash before the acknowledgement repeats it on recovery.
            await self.store.storage.put_many({unacked: b"", key: record})

        async def deadline(seconds: float) -> float:
            stored_key = task_key(self.workflow_id, tid, "deadline", self.epoch)
            data = await self.store.read(self.recorded.get((tid, "deadline"), stored_key))
            if data is not None:
                return float(data)
            at: float = self.executor.clock.time() + seconds
            await self.store.put(stored_key, repr(at).encode())
            return at

        try:
            args, kwargs = await self._event_arguments(spec)
            listener, args = args[0], args[1:]
            event, cls = await event_tasks.run_event(
                self._event_context(tid), listener, args, kwargs, commit, deadline
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.running.pop(tid, None)
            await self._failed(
                tid,
                TaskFailure(tid, pickled_error(exc), f"{type(exc).__name__}: {exc}"),
                system=False,
                retryable=True,
            )
            self._flush_submits()
            return
        self.running.pop(tid, None)
        # Committed: consumers go on now; a failing acknowledgement is retried at the
        # next recovery (the 'unacked' marker stays), never by polling again.
        self._acks.add(self._spawn(self._acknowledge(tid, cls, event)))
        self._finished(tid, ray.put(event), Receipt("value", start, time.time()))
        self._flush_submits()

    async def _acknowledge(self, tid: str, listener: Any, event: Any) -> None:
        try:
            await event_tasks.acknowledge(self._event_context(tid), listener, event)
            await self.store.storage.delete(task_key(self.workflow_id, tid, "unacked", self.epoch))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.warning("event.acknowledge_failed", task_id=tid, error=repr(exc))

    async def _value_record(self, value: Any, start: float, end: float) -> bytes:
        """The output record of a value produced here (an event, a wait's split), its
        ObjectRefs checkpointed first, as a worker's ``_commit`` does."""
        payload, refs = serialization.dumps(value)
        keys = await self.executor.save_objects(self.workflow_id, refs) if refs else []
        return serialization.encode("value", payload, keys, start_time=start, end_time=end)

    async def _run_wait(self, tid: str) -> None:
        """Split a wait task's tasks into (ready values, handles of the others)."""
        spec = self.specs[tid]
        start = time.time()
        num_returns, _ = self._waits.pop(tid)
        try:
            ready = [u for u in spec.upstream if u in self.done][:num_returns]
            values = [await self._value_ref(u) for u in ready]
            remaining = [TaskHandle(u) for u in spec.upstream if u not in ready]
            result = (values, remaining)
            end = time.time()
            record = await self._value_record(result, start, end)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.exception("scheduler.error", task_id=tid)
            self._fail(TaskFailure(tid, None, f"{type(exc).__name__}: {exc}"), exc)
            return
        self.running.pop(tid, None)
        receipt = Receipt("value", start, end, record=record if spec.checkpoint else None)
        self._finished(tid, ray.put(result), receipt)
        self._flush_submits()

    async def _reacknowledge(self, spec: TaskSpec) -> None:
        """Recovery: an event committed before a crash gets its ``event_checkpointed``."""
        tid = spec.task_id
        try:
            # Only the listener (the first argument, a plain class or name) matters here.
            args, _ = serialization.loads(spec.args, [None] * len(spec.arg_refs), lambda p: None)
            event = await self.executor.load(self.workflow_id, self.recorded[(tid, "out")])
            await event_tasks.acknowledge(self._event_context(tid), args[0], event)
            await self.store.storage.delete(self.recorded[(tid, "unacked")])
        except Exception:
            self.log.exception("event.acknowledge_failed", task_id=tid)

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
        self._settling.setdefault(self.root_of.get(tid, tid), asyncio.Event())
        task = asyncio.get_running_loop().create_task(self._process(tid, result, value_ref))
        self.running[tid] = (task, receipt_ref)
        return None

    def _ahead_known_well(self, ahead: dict[str, Any]) -> bool:
        return all(self._became_output(u, ref) for u, ref in ahead.items())

    def _became_output(self, u: str, ref: Any) -> bool:
        """Whether ``ref``, handed to a task submitted ahead, is ``u``'s finished output."""
        return u in self.done and self.values.get(u) is ref

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
        target = self.root_of.get(tid, tid)
        settling = self._settling.setdefault(target, asyncio.Event())
        try:
            await self._handle(tid, result, value_ref)
        finally:
            if self._settling.get(target) is settling:
                del self._settling[target]
            settling.set()

    async def _handle(self, tid: str, result: Any, value_ref: Any) -> None:
        try:
            failure = result if isinstance(result, ray.exceptions.RayError) else None
            receipt: Receipt = result
            shared = tid in self.shared
            self.shared.discard(tid)
            self.batched.discard(tid)
            if failure is not None and shared:
                self.alone.add(tid)  # its Ray task died, maybe of another attempt in it
            if failure is not None and await self._stored_anyway(tid):
                # The worker died after writing the output itself: the task is done.
                self.ahead.pop(tid, None)
                self.running.pop(tid, None)
                self._flush_submits()
                return
            ahead = self.ahead.pop(tid, None)
            if ahead is not None and not await self._went_ahead_well(ahead):
                # Its input's producer failed or continued: this attempt did not count.
                self.running.pop(tid, None)
                self._resubmit(tid)
                return
            if failure is not None and shared:
                # Not charged: it runs again, alone, from the stored copies of its inputs
                # (they may have died with the node).
                self.running.pop(tid, None)
                self._from_storage(tid)
                self._resubmit(tid)
                return
            if failure is not None:
                self.running.pop(tid, None)
                await self._failed(
                    tid,
                    TaskFailure(tid, None, f"{type(failure).__name__}: {failure}"),
                    system=True,
                )
                return
            if receipt.writes:
                await self.store.storage.put_many(receipt.writes)
            self.running.pop(tid, None)
            if receipt.kind == "value":
                self._observe(tid, receipt)
                self._finished(tid, value_ref, receipt)
            elif receipt.kind == "skipped":  # cannot happen once its inputs went well
                self._resubmit(tid)
            elif receipt.kind == "continuation":
                assert receipt.plan is not None
                await self._continued(tid, receipt.plan, receipt)
            else:
                await self._failed(
                    tid,
                    TaskFailure(tid, receipt.error, receipt.error_text),
                    system=False,
                    retryable=receipt.retryable,
                )
            self._flush_submits()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or a storage failure: fail the workflow loudly
            self.log.exception("scheduler.error", task_id=tid)
            self._fail(TaskFailure(tid, None, f"{type(exc).__name__}: {exc}"), exc)

    async def _stored_anyway(self, tid: str) -> bool:
        """Whether the attempt whose worker died had written ``tid``'s output itself
        (a big output, or a fused producer's once its consumer ran long): then the
        task is done, and does not run again."""
        spec = self.specs.get(tid)
        if spec is None or not spec.checkpoint or not self.store.storage.shared:
            return False
        key = task_key(self.workflow_id, tid, "out", self.epoch)
        if not await self.store.storage.exists(key):
            return False
        now = time.time()
        self._finished(tid, self.executor.load(self.workflow_id, key), Receipt("value", now, now))
        return True

    def _observe(self, tid: str, receipt: Receipt) -> None:
        spec = self.specs.get(tid)
        if spec is not None:
            self.executor.observe(spec.func_key, receipt.end_time - receipt.start_time)

    def _settle(self, tid: str, value_ref: Any) -> None:
        """``tid``'s attempt ended: tasks submitted ahead of it may now look at it."""
        target = self.root_of.get(tid, tid)
        entry = self.inflight.get(target)
        if entry is not None and entry[0] is value_ref:
            del self.inflight[target]
            entry[1].set()

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
        if tid not in self.specs or self.result.done():
            return
        if not self.waiting.get(tid) or self._ready_to_split(tid):
            self._pending_submit.append(tid)
        elif self.placement.ahead(tid):
            self._submit(tid)
        self._flush_submits()

    def _finished(self, tid: str, value_ref: Any, receipt: Receipt) -> None:
        spec = self.specs.pop(tid)
        self.started.pop(tid, None)
        self.shared.discard(tid)
        self.batched.discard(tid)
        self.alone.discard(tid)
        self._headers.pop(tid, None)
        if self.debug:
            self.log.debug(
                "task.succeeded", task_id=tid, seconds=receipt.end_time - receipt.start_time
            )
        target = self.root_of.pop(tid, tid)
        self.roots.discard(target)
        self.done.add(target)
        self.values[target] = value_ref
        if receipt.record is not None:
            self.stored[target] = self.packs.add(target, tid, receipt.record)
        elif spec.checkpoint:
            self.stored[target] = task_key(self.workflow_id, tid, "out", self.epoch)
        self._release_inputs(spec)
        for waiter in self._waiters.pop(target, []):
            if not waiter.done():
                waiter.set_result(value_ref)
        if target == self.output_task_id:
            record = receipt.record
            if record is not None and not serialization.peek_header(record)["refs"]:
                self.output_record = record
            self._resolve_output()
            return
        for consumer in self.consumers.pop(target, []):
            pending = self.waiting.get(consumer)
            if pending is not None:
                pending.discard(target)
                if not pending or self._ready_to_split(consumer):
                    self._pending_submit.append(consumer)

    def _release_inputs(self, spec: TaskSpec) -> None:
        for u in spec.upstream:
            self.needed[u] -= 1
            if self.needed[u] <= 0:
                del self.needed[u]
                # An output still on its way to storage can only be read from memory.
                if u != self.output_task_id and u not in self.packs.pending:
                    self.values.pop(u, None)
        self.waiting.pop(spec.task_id, None)
        self._headers.pop(spec.task_id, None)
        self.placement.forget(spec.task_id)

    def _packed(self, holders: list[str]) -> None:
        for tid in holders:
            if tid != self.output_task_id and self.needed.get(tid, 0) <= 0:
                self.values.pop(tid, None)

    def _pack_failed(self, tid: str, exc: BaseException) -> None:
        self.log.error("checkpoint.write_failed", task_id=tid, error=str(exc))
        self._fail(TaskFailure(tid, None, f"{type(exc).__name__}: {exc}"), exc)

    async def _continued(self, tid: str, sub: Plan, receipt: Receipt) -> None:
        spec = self.specs.pop(tid)
        self.started.pop(tid, None)
        plan = sub.renamed(self.allocator, creator=tid)
        root = self.root_of.pop(tid, tid)
        self.root_of[plan.output_task_id] = root
        self.roots.add(root)
        if spec.checkpoint:
            cont = WorkflowStore.encode_continuation(plan, receipt.start_time, receipt.end_time)
            writes = [
                self.store.save_ids(self.workflow_id, dict(self.allocator.counters), self.epoch),
                self.store.put(task_key(self.workflow_id, tid, "cont", self.epoch), cont),
            ]
            if root != tid:
                writes.append(
                    self.store.put(
                        task_key(self.workflow_id, root, "latest", self.epoch),
                        serialization.encode("latest", b"", task=tid),
                    )
                )
            await asyncio.gather(*writes)
        self.log.debug(
            "task.continued", task_id=tid, output=plan.output_task_id, tasks=len(plan.tasks)
        )
        self._release_inputs(spec)
        moved = self._waiters.pop(plan.output_task_id, [])
        self._waiters[root].extend(moved)
        self.add_plan(plan)

    async def _failed(
        self, tid: str, failure: TaskFailure, *, system: bool, retryable: bool = True
    ) -> None:
        spec = self.specs.get(tid)
        if spec is None:
            return
        attempts = self.attempts[tid]
        max_retries = spec.options.max_retries
        if (system or retryable) and (max_retries == -1 or attempts < max_retries):
            self.attempts[tid] += 1
            if system:
                self._from_storage(tid)
            delay = retry_delay(attempts)
            self.log.info(
                "task.retrying",
                task_id=tid,
                attempt=attempts + 1,
                delay=round(delay, 3),
                error=failure.text.strip().splitlines()[-1:] or "",
            )
            await asyncio.sleep(delay)
            if tid in self.specs and not self.result.done():
                self._submit(tid)
            return
        self.log.warning(
            "task.failed",
            task_id=tid,
            attempts=attempts + 1,
            error=(failure.text.strip().splitlines() or [""])[-1],
        )
        self._fail(failure, None)

    def _from_storage(self, tid: str) -> None:
        """The inputs' objects may have died with their node: take the stored copies
        for the next attempt of ``tid``."""
        for u in self.specs[tid].upstream:
            if u in self.stored and u not in self.packs.pending:
                self.values.pop(u, None)

    def _fail(self, failure: TaskFailure, internal: BaseException | None) -> None:
        if self.result.done():
            return
        error = execution_error(self.workflow_id, failure)
        error.__cause__ = internal
        self.failure = failure
        self.result.set_exception(error)

    def cancel(self) -> None:
        self.abandon(WorkflowCancellationError.of(self.workflow_id))

    def abandon(self, error: BaseException) -> None:
        """Stop the run with ``error`` (its Ray tasks are cancelled as ``run`` returns)."""
        if not self.result.done():
            self.result.set_exception(error)

    def _resolve_output(self) -> None:
        if not self.result.done():
            self.output_key = self.stored.get(self.output_task_id)
            self.result.set_result(self._value_ref(self.output_task_id))

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
            fut.set_result(self._value_ref(root))
        else:
            self._waiters[root].append(fut)
        return fut

    def fail_waiters(self, exc: BaseException) -> None:
        for waiters in self._waiters.values():
            for w in waiters:
                if not w.done():
                    w.set_exception(exc)
        self._waiters.clear()


def execution_error(workflow_id: str, failure: TaskFailure) -> WorkflowExecutionError:
    """What a workflow failed by ``failure`` raises to whoever waits for it."""
    return WorkflowExecutionError(
        f"Workflow {workflow_id!r} failed: task {failure.task_id!r} raised "
        f"{(failure.text.strip().splitlines() or ['an error'])[-1]}",
        workflow_id=workflow_id,
        task_id=failure.task_id,
        cause_bytes=failure.error,
    )


def retry_delay(attempts: int) -> float:
    """The backoff before the retry that follows ``attempts`` failed attempts."""
    delay: float = min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempts) * (0.5 + random.random() / 2)
    return delay


def _no_up(pid: Any) -> None:
    return None


def _debug(log: Any) -> bool:
    enabled: bool = log.isEnabledFor(10)  # logging.DEBUG, without building the event
    return enabled


__all__ = ["TaskFailure", "WorkflowRun", "execution_error", "retry_delay"]
