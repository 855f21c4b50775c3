"""The scheduler: one coroutine runs one workflow to completion.

It submits every task whose inputs are ready as a Ray task, awaits the task's
receipt, and reacts: a value makes its consumers ready, a continuation splices
a new sub-plan in place of the task, an error is retried (with backoff) or
fails the workflow. All state changes happen on one event loop, so no locks.

The runner is three parts: the task graph (:mod:`~ray_workflows._core.graph`: what
is ready, done, where outputs are), dispatch (:mod:`~ray_workflows._core.dispatch`:
getting attempts to Ray and tracking them), and this module, which decides what a
receipt means (and a failure: :mod:`~ray_workflows._core.failures`). Event and wait
tasks run as coroutines here (:mod:`~ray_workflows._core.event_waits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import ray

from ray_workflows._core import serialization
from ray_workflows._core.dispatch import Dispatch, TaskFailure
from ray_workflows._core.event_waits import EventWaits
from ray_workflows._core.executor import Executor
from ray_workflows._core.failures import Catchers, caught, execution_error, retry_delay
from ray_workflows._core.graph import TaskGraph
from ray_workflows._core.ids import IdAllocator
from ray_workflows._core.plan import Plan, TaskSpec
from ray_workflows._core.receipts import cancel_ray_task
from ray_workflows._core.store import PackWriter, WorkflowStore, task_key
from ray_workflows._core.wire import Receipt, pickled_error
from ray_workflows.exceptions import WorkflowCancellationError, WorkflowExecutionError


class WorkflowRun(Dispatch):
    """The live state of one running workflow."""

    def __init__(
        self,
        workflow_id: str,
        store: WorkflowStore,
        executor: Executor,
        output_task_id: str,
        allocator: IdAllocator,
    ) -> None:
        packs = PackWriter(store, workflow_id, self._packed, self._pack_failed, lambda: self.epoch)
        graph = TaskGraph(
            output_task_id, lambda key: executor.load(workflow_id, key), packs.pending
        )
        super().__init__(workflow_id, store, executor, graph)
        self.packs = packs
        self.output_task_id = output_task_id
        self.allocator = allocator
        self.output_key: str | None = None
        # The output task's record, when it came in the receipt without ObjectRefs.
        self.output_record: bytes | None = None
        # Event tasks committed before a crash, maybe without their acknowledgement.
        self.unacked: list[TaskSpec] = []
        # Recovery: (task, record) -> the key of a record an earlier epoch wrote.
        self.recorded: dict[tuple[str, str], str] = {}
        self.events = EventWaits(workflow_id, store, executor, graph.value_ref, self.recorded)
        self.catchers = Catchers()

    # -- building the graph -----------------------------------------------------
    def add_plan(self, plan: Plan) -> None:
        for key, data in plan.functions.items():
            if key not in self.funcs:
                self.funcs[key] = self.executor.function_ref(key, data)
        for spec in plan.tasks.values():
            self.add_task(spec)

    def add_task(self, spec: TaskSpec) -> None:
        ready = self.graph.add(spec)
        timeout = self.graph.wait_timeout(spec.task_id)
        if timeout is not None:
            self._spawn(self._wait_timeout(spec.task_id, timeout))
        if ready:
            self._pending_submit.append(spec.task_id)

    async def _wait_timeout(self, tid: str, seconds: float) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self.executor.clock.sleep(seconds)
            if tid in self.graph.specs and tid not in self.running and not self.result.done():
                self._submit(tid)

    # -- running -----------------------------------------------------------------
    async def run(self, seal: Callable[[], Awaitable[None] | None] | None = None) -> Any:
        """Run until the output task is done and every output it reported is durable;
        return the output's ObjectRef.

        Every coroutine of the run (receipts being dealt with, event and wait tasks,
        acknowledgements, retries' timers) lives in one task group that this call
        owns: none outlives the run. ``seal`` queues the final status where the
        storage's batches land in order: it is called once the output is done and
        nothing else runs, so that the last checkpoints and the status share one batch
        (it returns ``None`` if it queued nothing)."""
        return await self.tasks.run(lambda: self._until_durable(seal), self._stop_attempts)

    async def _until_durable(self, seal: Callable[[], Awaitable[None] | None] | None) -> Any:
        if self.output_task_id in self.graph.done:
            self._resolve_output()
        for spec in self.unacked:
            self.tasks.acknowledging(self.events.reacknowledge(spec))
        self._flush_submits()
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
        if (
            seal is not None
            and self.store.storage.ordered_batches
            and not (self.tasks.acks or self.running)
        ):
            # Nothing left that could add a record or an acknowledgement.
            await self.packs.drain(then=seal)
            return output
        await self.packs.drain()
        # Acknowledgements finish before the workflow does: a crash before then
        # repeats them on recovery (at least once).
        await self.tasks.acknowledged()
        return output

    def _stop_attempts(self) -> None:
        """The run is over: its Ray tasks still under way are cancelled (its coroutines
        end with its task group)."""
        for tid, (_, ref) in self.running.items():
            if ref is None:
                continue
            if tid in self.batched:  # shared: cancelled once no run wants it
                self.executor.abandon(ref)
            else:
                cancel_ray_task(ref)

    # -- event and wait tasks: coroutines here, no Ray worker held while they wait --
    async def _run_in_loop(self, tid: str) -> None:
        """Run event or wait task ``tid`` here: an event is waited for and committed
        (it may fail, and is then retried as a task is), a wait's tasks are split."""
        spec = self.graph.specs[tid]
        try:
            if spec.kind == "event":
                value, cls, start = await self.events.run_event(spec, self.epoch)
                receipt = Receipt("value", start, time.time())
            else:
                num_returns, _ = self.graph.waits.pop(tid)
                value, receipt = await self.events.split(spec, self.graph.done, num_returns)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.running.pop(tid, None)
            text = f"{type(exc).__name__}: {exc}"
            if spec.kind != "event":  # a bug: fail the workflow loudly
                self.log.exception("scheduler.error", task_id=tid)
                self._fail(TaskFailure(tid, None, text), exc)
                return
            failure = TaskFailure(tid, pickled_error(exc), text)
            await self._failed(tid, failure, system=False, retryable=True)
            self._flush_submits()
            return
        self.running.pop(tid, None)
        if spec.kind == "event":
            # Committed: consumers go on now; a failing acknowledgement is retried at the
            # next recovery (the 'unacked' marker stays), never by polling again.
            self.tasks.acknowledging(self.events.acknowledge(tid, cls, value, self.epoch))
        self._finished(tid, ray.put(value), receipt)
        self._flush_submits()

    # -- receipts ------------------------------------------------------------------
    def _unsent(self, tid: str) -> Callable[[BaseException], None]:
        def fail(exc: BaseException) -> None:  # a bug, or Ray refusing the task
            self.log.error("task.submit_failed", task_id=tid, error=repr(exc))
            self._fail(TaskFailure(tid, None, f"{type(exc).__name__}: {exc}"), exc)

        return fail

    async def _handle(self, tid: str, result: Any, value_ref: Any) -> None:
        try:
            if self.catchers.moot_receipt(tid):  # its chain's catcher caught a failure
                self.running.pop(tid, None)
                return
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
                self.graph.from_storage(tid)
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
                self._observe(tid, receipt)
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
        spec = self.graph.specs.get(tid)
        if spec is None or not spec.checkpoint or not self.store.storage.shared:
            return False
        key = task_key(self.workflow_id, tid, "out", self.epoch)
        if not await self.store.storage.exists(key):
            return False
        now = time.time()
        self._finished(tid, self.executor.load(self.workflow_id, key), Receipt("value", now, now))
        return True

    def _finished(self, tid: str, value_ref: Any, receipt: Receipt) -> None:
        spec = self.graph.specs[tid]
        self.started.pop(tid, None)
        self.shared.discard(tid)
        self.batched.discard(tid)
        self.alone.discard(tid)
        self.calls.headers.pop(tid, None)
        if self.debug:
            self.log.debug(
                "task.succeeded", task_id=tid, seconds=receipt.end_time - receipt.start_time
            )
        target = self.graph.target(tid)
        key = None
        if receipt.record is not None:
            key = self.packs.add(target, tid, receipt.record)
        elif spec.checkpoint:
            key = task_key(self.workflow_id, tid, "out", self.epoch)
        ready = self.graph.finish(tid, value_ref, key)
        self.placement.forget(tid)
        if target == self.output_task_id:
            record = receipt.record
            if record is not None and not serialization.peek_header(record)["refs"]:
                self.output_record = record
            self._resolve_output()
            return
        self._pending_submit.extend(ready)

    def _packed(self, holders: list[str]) -> None:
        self.graph.packed(holders)

    def _pack_failed(self, tid: str, exc: BaseException) -> None:
        self.log.error("checkpoint.write_failed", task_id=tid, error=str(exc))
        self._fail(TaskFailure(tid, None, f"{type(exc).__name__}: {exc}"), exc)

    async def _continued(self, tid: str, sub: Plan, receipt: Receipt) -> None:
        plan = sub.renamed(self.allocator, creator=tid)
        spec, root = self.graph.continuing(tid, plan.output_task_id)
        self.catchers.continued(spec, root)
        self.started.pop(tid, None)
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
        self.graph.continued(spec, plan.output_task_id, root)
        self.calls.headers.pop(tid, None)
        self.placement.forget(tid)
        self.add_plan(plan)

    async def _failed(
        self, tid: str, failure: TaskFailure, *, system: bool, retryable: bool = True
    ) -> None:
        spec = self.graph.specs.get(tid)
        if spec is None:
            return
        attempts = self.attempts[tid]
        max_retries = spec.options.max_retries
        if (system or retryable) and (max_retries == -1 or attempts < max_retries):
            self.attempts[tid] += 1
            # Durable before the retry: a runner that resumes the workflow after a crash
            # goes on counting, so a task runs at most max_retries + 1 times in all.
            await self.store.put(
                task_key(self.workflow_id, tid, "tries", self.epoch), str(attempts + 1).encode()
            )
            if system:
                self.graph.from_storage(tid)
            delay = retry_delay(attempts)
            self.log.info(
                "task.retrying",
                task_id=tid,
                attempt=attempts + 1,
                delay=round(delay, 3),
                error=failure.text.strip().splitlines()[-1:] or "",
            )
            await asyncio.sleep(delay)
            if tid in self.graph.specs and not self.result.done():
                self._submit(tid)
            return
        self.log.warning(
            "task.failed",
            task_id=tid,
            attempts=attempts + 1,
            error=(failure.text.strip().splitlines() or [""])[-1],
        )
        if system or failure.error is None or not self._caught(spec, failure.error):
            self._fail(failure, None)

    def _caught(self, spec: TaskSpec, error: bytes) -> bool:
        """Whether a catcher up ``spec``'s creators caught its failure (failures.py)."""
        end = self.catchers.chain_end(spec, self.graph)
        if end is None:
            return False
        self.log.info("task.caught", task_id=spec.task_id, output_of=end)
        if end in self.running:  # submitted ahead: tasks ahead of it look at the value now
            self.catchers.moot.add(end)
            self._settle(end, self.inflight.get(self.graph.target(end), (None,))[0])
        value, record = caught(error, now := time.time())
        keep = self.graph.specs[end].checkpoint
        self._finished(end, value, Receipt("value", now, now, record=record if keep else None))
        return True  # (its consumers are submitted by the caller, as for any receipt)

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
            self.output_key = self.graph.stored.get(self.output_task_id)
            self.result.set_result(self.graph.value_ref(self.output_task_id))


__all__ = ["WorkflowRun"]
