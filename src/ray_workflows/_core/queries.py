"""What the engine answers about workflows: status, list, output, metadata, result.

These read storage and the runs of this engine, and never change a workflow, but
for one thing: waiting for the result of a workflow stored as running that no
manager runs (its manager died) resumes it here first.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable
from typing import Any, Protocol

import ray

from ray_workflows._core import serialization
from ray_workflows._core.admission import Admission
from ray_workflows._core.attempts import INLINE_RECORD_BYTES
from ray_workflows._core.executor import Executor
from ray_workflows._core.lease import LeaseInfo
from ray_workflows._core.lease_manager import LeaseManager
from ray_workflows._core.recovery import Recovery
from ray_workflows._core.scheduler import WorkflowRun
from ray_workflows._core.status import WorkflowStatus
from ray_workflows._core.store import WorkflowStore
from ray_workflows.exceptions import (
    TaskNotFoundError,
    WorkflowCancellationError,
    WorkflowError,
    WorkflowExecutionError,
    WorkflowNotFoundError,
    WorkflowRunningElsewhereError,
)


class Resume(Protocol):
    """``Engine.resume``: continue a stored workflow here."""

    def __call__(
        self, workflow_id: str, *, existing_ok: bool = ..., load: bool = ...
    ) -> Awaitable[asyncio.Future[Any]]: ...


class Queries:
    """Answers about the workflows of one storage, those running here (``runs``, with
    the futures of their outputs in ``finished``) and the others."""

    def __init__(
        self,
        *,
        store: WorkflowStore,
        executor: Executor,
        recovery: Recovery,
        leases: LeaseManager,
        admission: Admission,
        runs: dict[str, WorkflowRun],
        finished: dict[str, asyncio.Future[Any]],
        resume: Resume,
    ) -> None:
        self.store = store
        self.executor = executor
        self.recovery = recovery
        self.leases = leases
        self.admission = admission
        self.runs = runs
        self.finished = finished
        self.resume = resume

    async def status(self, workflow_id: str, *, handed_over: bool = True) -> WorkflowStatus:
        """``handed_over``: a workflow whose caller is handing it over to this engine
        (``Engine.adopt``: its lease is this engine's, not held yet) is not RESUMABLE."""
        if workflow_id in self.runs:
            return self._live_status(workflow_id)
        meta = await self.store.read_meta(workflow_id)
        if meta is None:
            if not await self.store.exists(workflow_id):
                raise WorkflowNotFoundError.of(workflow_id, self.store.storage.uri)
            meta = {"status": WorkflowStatus.RUNNING.value}
        return await self.held_status(workflow_id, meta["status"], handed_over=handed_over)

    async def held_status(
        self, workflow_id: str, stored: str, *, handed_over: bool = True
    ) -> WorkflowStatus:
        """The status of a workflow whose stored status is ``stored``: RESUMABLE if it
        was running but nobody runs it now (here, or another manager)."""
        status = self._derive(workflow_id, stored)
        if status == WorkflowStatus.RESUMABLE and await self.held_elsewhere(
            workflow_id, handed_over=handed_over
        ):
            return WorkflowStatus(stored)
        return status

    def _live_status(self, workflow_id: str) -> WorkflowStatus:
        if self.admission.is_pending(workflow_id):
            return WorkflowStatus.PENDING
        return WorkflowStatus.RUNNING

    def _derive(self, workflow_id: str, stored: str) -> WorkflowStatus:
        if workflow_id in self.runs:
            return self._live_status(workflow_id)
        if stored in (WorkflowStatus.RUNNING.value, WorkflowStatus.PENDING.value):
            return WorkflowStatus.RESUMABLE
        return WorkflowStatus(stored)

    async def list_all(
        self, statuses: set[WorkflowStatus] | None = None
    ) -> list[tuple[str, WorkflowStatus]]:
        stored = await self.store.indexed()
        found = {wid: self._derive(wid, s) for wid, s in stored.items()}
        for wid in self.runs:
            found[wid] = self._live_status(wid)
        # Running or pending in no run here: RESUMABLE, unless another manager holds it.
        orphans = [wid for wid, s in found.items() if s == WorkflowStatus.RESUMABLE]
        limit = asyncio.Semaphore(64)

        async def held(wid: str) -> bool:
            async with limit:
                return await self.held_elsewhere(wid, handed_over=True)

        for wid, elsewhere in zip(
            orphans, await asyncio.gather(*(held(w) for w in orphans)), strict=True
        ):
            if elsewhere:
                found[wid] = WorkflowStatus(stored[wid])
        return sorted((wid, s) for wid, s in found.items() if statuses is None or s in statuses)

    async def output(self, workflow_id: str, task_id: str | None = None) -> Any:
        """The ObjectRef of a workflow's (or one task's) output; waits while it runs."""
        run = self.runs.get(workflow_id)
        if run is not None:
            if task_id is None:
                return await asyncio.shield(self.finished[workflow_id])
            if run.graph.knows(task_id):
                return await run.graph.task_output(task_id)
            # A task that already continued (its value is its chain's, resolved later) or
            # that does not exist yet: answer from storage once the workflow is done.
            await asyncio.wait([self.finished[workflow_id]])
            return await self.output(workflow_id, task_id)
        meta = await self.store.read_meta(workflow_id)
        if meta is None and not await self.store.exists(workflow_id):
            raise WorkflowNotFoundError.of(workflow_id, self.store.storage.uri)
        if workflow_id in self.runs:  # (re)launched while storage was read
            return await self.output(workflow_id, task_id)
        status = self._derive(workflow_id, meta["status"] if meta else "RUNNING")
        if task_id is None and status in (
            WorkflowStatus.RUNNING,
            WorkflowStatus.PENDING,
            WorkflowStatus.RESUMABLE,
        ):
            # Running elsewhere, or orphaned: wait for it (resuming it here if need be).
            return await self.result(workflow_id)
        if task_id is None:
            if status == WorkflowStatus.SUCCESSFUL and meta and meta.get("output_key"):
                return await self.stored_output(workflow_id, meta["output_key"])
            task_id = meta["output_task_id"] if meta else None
            if status != WorkflowStatus.SUCCESSFUL:
                raise _no_output(workflow_id, status, meta or {})
        assert task_id is not None
        try:
            key = await self.recovery.locate(workflow_id, task_id)
        except TaskNotFoundError:
            held = await self.held_status(workflow_id, meta["status"] if meta else "RUNNING")
            if held not in (WorkflowStatus.RUNNING, WorkflowStatus.PENDING):
                raise
            # Not stored yet, in a run elsewhere (another manager) or
            # orphaned: ask again once the workflow is over, as for a run here.
            await self.result(workflow_id)
            key = await self.recovery.locate(workflow_id, task_id)
        return await self.stored_output(workflow_id, key)

    async def metadata(self, workflow_id: str, task_id: str | None = None) -> dict[str, Any]:
        meta = await self.store.read_meta(workflow_id) or await self.store.started_meta(workflow_id)
        if meta is None:
            raise WorkflowNotFoundError.of(workflow_id, self.store.storage.uri)
        if task_id is None:
            stats = {k: meta[k] for k in ("start_time", "end_time") if k in meta}
            result = {
                "workflow_id": workflow_id,
                "status": (await self.held_status(workflow_id, meta["status"])).value,
                "user_metadata": meta.get("user_metadata", {}),
                "stats": stats,
            }
            if "error" in meta:
                result["error"] = meta["error"]
            if "runtime_env" in meta:  # recorded at submission (environment.py)
                result["runtime_env"] = meta["runtime_env"]
            return result
        return await self._task_metadata(workflow_id, task_id)

    async def _task_metadata(self, workflow_id: str, task_id: str) -> dict[str, Any]:
        run = self.runs.get(workflow_id)
        spec = run.graph.specs.get(task_id) if run is not None else None
        if spec is None:
            spec = await self.recovery.find_spec(workflow_id, task_id)
        if spec is None:
            raise TaskNotFoundError(
                f"Workflow {workflow_id!r} has no task {task_id!r}.",
                workflow_id=workflow_id,
                task_id=task_id,
            )
        stats: dict[str, Any] = {}
        records = await self.store.task_records(workflow_id)
        data = records.members.get(records.packed.get(task_id, ""))  # a small output
        for record in ("out", "cont"):  # a big output; a task that continued
            key = records.key(task_id, record)
            if data is None and key is not None and key not in records.members:
                data = await self.store.read(key)
        if data is not None:
            header = serialization.peek_header(data, task_id)
            stats = {k: header[k] for k in ("start_time", "end_time") if k in header}
        run = self.runs.get(workflow_id)
        if not stats and run is not None and task_id in run.started:
            stats = {"start_time": run.started[task_id]}
        return {
            "task_id": task_id,
            "task_name": spec.name,
            "task_type": "FUNCTION",
            "step_type": "FUNCTION",  # the Ray 1.x step API's name for it
            "task_options": spec.options.to_json(),
            "user_metadata": spec.options.metadata,
            "upstream": list(spec.upstream),
            "stats": stats,
        }

    async def result(self, workflow_id: str) -> Any:
        """The ObjectRef of the workflow's output, once it has one. A workflow stored as
        running that no manager runs (its manager died) is resumed first."""
        ref, _ = await self.result_and_record(workflow_id)
        return ref

    async def result_and_record(self, workflow_id: str) -> tuple[Any, bytes | None]:
        """:meth:`result`, and the output's record if the output is that of a run here
        that was waited for, small and without ObjectRefs: a caller can be handed the
        value itself instead of a ref it would fetch from this process. ``None`` for
        an output read from storage, which another manager sharing it may have made
        (this engine keeps no record of a run once it is over)."""
        delay = 0.01
        while workflow_id not in self.runs:
            status = await self.status(workflow_id)
            if status == WorkflowStatus.RESUMABLE:
                try:
                    # Launched (and waited for below), or found finished meanwhile.
                    await self.resume(workflow_id, existing_ok=True, load=False)
                    continue
                except WorkflowRunningElsewhereError:
                    pass
            elif status not in (WorkflowStatus.RUNNING, WorkflowStatus.PENDING):
                return await self.output(workflow_id), None
            # Its caller is handing it over to this engine (soon in self.runs), or another
            # manager runs it: wait for its final status, or for its lease to lapse (then
            # the next round resumes it here).
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0, self.leases.ttl / 3)
        run = self.runs[workflow_id]
        ref = await asyncio.shield(self.finished[workflow_id])
        return ref, run.output_record

    async def stored_output(self, workflow_id: str, key: str) -> Any:
        """An ObjectRef of the checkpointed output in record ``key``.

        A small output without ObjectRefs is read here and put in the object store
        (a fresh manager has no worker process to spare, and starting one takes
        seconds); anything else, or a value whose classes this process cannot import,
        is loaded by a helper task where user code lives."""
        data = await self.store.read_output(key)
        if data is not None and len(data) <= INLINE_RECORD_BYTES:
            header, payload = serialization.decode(data, key)  # a torn record raises
            if not header["refs"]:
                try:
                    value = serialization.loads(payload, [])
                except Exception:
                    pass
                else:
                    return ray.put(value)
        await self.executor.preload(key)
        return self.executor.load(workflow_id, key)

    async def elsewhere(self, workflow_id: str) -> WorkflowRunningElsewhereError:
        info = await self.leases.holder(workflow_id)
        where, who = "another manager", "that manager"
        if info is not None:
            left = max(0.0, info.expires_at - time.time())
            where = f"manager {info.owner!r} (its lease expires in {left:.0f} s)"
        return WorkflowRunningElsewhereError(
            f"Workflow {workflow_id!r} is running in {where} sharing this storage; it is "
            f"taken over here only if {who} stops renewing its lease.",
            workflow_id=workflow_id,
        )

    async def held_elsewhere(self, workflow_id: str, *, handed_over: bool = False) -> bool:
        """Whether a live lease keeps this workflow from being resumed here: another
        manager's, or (``handed_over``) this engine's own for a workflow it does not
        run yet: a caller stored it and is handing it over (``Engine.adopt``)."""
        info: LeaseInfo | None = await self.leases.holder(workflow_id)
        if info is None:
            return False
        if info.owner != self.leases.owner:
            return True
        return handed_over and workflow_id not in self.leases.held


def _no_output(workflow_id: str, status: WorkflowStatus, meta: dict[str, Any]) -> WorkflowError:
    """What ``get_output`` of a finished workflow without output raises: what waiting
    for its run raised (the failed task's error as the cause, or the cancellation)."""
    if status == WorkflowStatus.CANCELED:
        return WorkflowCancellationError.of(workflow_id)
    if status == WorkflowStatus.FAILED:
        failure = meta.get("failure") or {}
        cause = failure.get("cause")
        return WorkflowExecutionError(
            (meta.get("error") or f"Workflow {workflow_id!r} failed.")
            + " workflow.resume(...) runs its failed tasks again.",
            workflow_id=workflow_id,
            task_id=failure.get("task_id"),
            cause_bytes=base64.b64decode(cause) if cause else None,
        )
    return WorkflowError(
        f"Workflow {workflow_id!r} is {status.value}; it has no output.",
        workflow_id=workflow_id,
        status=status.value,
    )


__all__ = ["Queries", "Resume"]
