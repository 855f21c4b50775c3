"""Recovery: rebuild a workflow's live state from what its storage holds.

Starting from the workflow's output task, walk upstream: a task with an intact
``out`` record is done (never re-run); a task with a ``cont`` record continues in
the newest continuation of its chain (one hop through the root's ``latest``
pointer); any other task is scheduled again with its stored spec. Only the
frontier records are read, and each is checked against its checksum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray_workflows._core import serialization
from ray_workflows._core.environment import dresser
from ray_workflows._core.ids import IdAllocator
from ray_workflows._core.log import get_logger
from ray_workflows._core.plan import Plan, TaskSpec
from ray_workflows._core.scheduler import WorkflowRun
from ray_workflows._core.store import TaskRecords, WorkflowStore
from ray_workflows.exceptions import (
    CheckpointError,
    RecordSignatureError,
    TaskNotFoundError,
    WorkflowNotFoundError,
    WorkflowNotResumableError,
)

if TYPE_CHECKING:
    from ray_workflows._core.executor import Executor

log = get_logger()


class Recovery:
    def __init__(self, store: WorkflowStore, executor: Executor) -> None:
        self.store = store
        self.executor = executor

    async def rebuild(self, workflow_id: str, plan: Plan, epoch: int) -> WorkflowRun:
        """The run of ``workflow_id`` as its records say, for the holder of the lease at
        ``epoch``: seals the records of earlier epochs first (see ray_workflows._core.store)."""
        records = await self.store.seal(workflow_id, epoch)
        counters = dict(plan.counters)
        for base, n in (await self.store.load_ids(records)).items():
            counters[base] = max(n, counters.get(base, 0))
        run = WorkflowRun(
            workflow_id, self.store, self.executor, plan.output_task_id, IdAllocator(counters)
        )
        run.epoch = epoch
        run.graph.dress = dresser(plan, self.executor.settings.runtime_env)
        specs: dict[str, TaskSpec] = dict(plan.tasks)
        functions = dict(plan.functions)
        needed: dict[str, TaskSpec] = {}
        stack = [plan.output_task_id]
        visited: set[str] = set()
        while stack:
            tid = stack.pop()
            if tid in visited:
                continue
            visited.add(tid)
            recs = records.get(tid, set())
            if "out" in recs and await self.mark_stored(run, tid, records, tid):
                continue
            if "cont" in recs:
                output = await self.follow_chain(workflow_id, tid, records, specs, functions)
                if "out" in records.get(output, set()) and await self.mark_stored(
                    run, tid, records, output
                ):
                    continue
                run.graph.link(output, tid)
                stack.append(output)
                continue
            spec = specs.get(tid)
            if spec is None:
                raise WorkflowNotResumableError(
                    f"Workflow {workflow_id!r} cannot resume: task {tid!r} is neither finished "
                    "nor stored in its plan (the storage is incomplete).",
                    workflow_id=workflow_id,
                    task_id=tid,
                )
            needed[tid] = spec
            stack.extend(spec.upstream)
        # Ids already used must never be allocated again, even where ids.json did not
        # land with the continuation that used them (a crash between concurrent puts).
        seen = IdAllocator.counters_of(list(records) + list(specs))
        counters = run.allocator.counters
        for base, n in seen.items():
            counters[base] = max(n, counters.get(base, 0))
        run.add_plan(Plan({}, plan.output_task_id, functions))
        for spec in needed.values():
            run.add_task(spec)
            tries = records.key(spec.task_id, "tries")  # its failed attempts so far
            if tries is not None:
                data = await self.store.read(tries)
                if data is not None:
                    run.attempts[spec.task_id] = int(data)
        for tid, recs in records.items():
            for record in ("deadline", "unacked"):
                key = records.key(tid, record)
                if key is not None:
                    run.recorded[(tid, record)] = key
            if "unacked" in recs and "out" in recs:
                spec = specs.get(tid) or await self.find_spec(workflow_id, tid, records)
                if spec is not None:
                    run.recorded[(tid, "out")] = records.output_ref(tid)
                    run.unacked.append(spec)
        return run

    async def mark_stored(
        self, run: WorkflowRun, tid: str, records: TaskRecords, record_tid: str
    ) -> bool:
        """Mark ``tid`` done by the output record of ``record_tid``, if that record is
        intact. A torn record is removed and the task that wrote it runs again."""
        ref = records.output_ref(record_tid)
        data = records.members.get(ref)
        if data is None:
            data = await self.store.storage.get(ref)
        try:
            serialization.decode(data or b"", ref)
        except RecordSignatureError:
            raise
        except CheckpointError as exc:
            log.warning(
                "checkpoint.torn", workflow_id=run.workflow_id, task_id=record_tid, error=str(exc)
            )
            if ref not in records.members:  # a pack is checked (and removed) as a whole
                await self.store.storage.delete(ref)
            return False
        run.graph.mark_stored(tid, ref)
        await self.executor.preload(ref, data)
        return True

    async def follow_chain(
        self,
        workflow_id: str,
        root: str,
        records: TaskRecords,
        specs: dict[str, TaskSpec],
        functions: dict[str, bytes],
    ) -> str:
        """The newest task of the continuation chain rooted at ``root``; loads its plan."""
        parent = root
        latest = records.key(root, "latest")
        if latest is not None:
            data = await self.store.read(latest)
            if data is not None:
                pointed = serialization.peek_header(data, "latest")["task"]
                # Written beside its continuation, not after it: on a storage whose
                # batches do not land in order it may have landed alone. Then the chain
                # is walked from its root (each earlier continuation was durable before
                # its tasks ran).
                if records.key(pointed, "cont") is not None:
                    parent = pointed
        while True:
            key = records.key(parent, "cont")
            data = None if key is None else await self.store.read(key)
            if key is None or data is None:
                raise CheckpointError(
                    f"The continuation record of task {parent!r} of workflow {workflow_id!r} "
                    "is missing.",
                    key=key or parent,
                )
            sub = WorkflowStore.decode_plan(data, key)
            specs.update(sub.tasks)
            functions.update(sub.functions)
            output = sub.output_task_id
            if "cont" not in records.get(output, set()):
                return output
            parent = output

    async def locate(self, workflow_id: str, task_id: str) -> str:
        records = await self.store.task_records(workflow_id)
        recs = records.get(task_id)
        if recs and "out" in recs:
            return records.output_ref(task_id)
        if recs and "cont" in recs:
            output = await self.follow_chain(workflow_id, task_id, records, {}, {})
            if "out" in records.get(output, set()):
                return records.output_ref(output)
        raise TaskNotFoundError(
            f"Task {task_id!r} of workflow {workflow_id!r} has no stored output (it has not "
            "finished, does not exist, or ran with checkpoint=False).",
            workflow_id=workflow_id,
            task_id=task_id,
        )

    async def find_spec(
        self, workflow_id: str, task_id: str, records: TaskRecords | None = None
    ) -> TaskSpec | None:
        plan = await self.store.load_plan(workflow_id)
        if plan is None:
            raise WorkflowNotFoundError.of(workflow_id, self.store.storage.uri)
        if task_id in plan.tasks:
            return plan.tasks[task_id]
        if records is None:
            records = await self.store.task_records(workflow_id)
        for tid in records:
            key = records.key(tid, "cont")
            if key is not None:
                data = await self.store.read(key)
                if data is not None:
                    sub = WorkflowStore.decode_plan(data, key)
                    if task_id in sub.tasks:
                        return sub.tasks[task_id]
        return None


__all__ = ["Recovery"]
