"""The Engine: every workflow of one storage, driven on one event loop.

The Engine is plain asyncio over a :class:`WorkflowStore` and an
:class:`Executor`. It does not know where it lives: the manager actor hosts one
(so workflows outlive the driver that started them), and tests or an asyncio web
service can run one in-process.

This module starts and resumes workflows; the rest is done by parts the Engine
composes, each given what it needs: a ``RunDriver`` (:mod:`ray_workflows._core.drive`)
drives each run to its final status, ``Queries`` (:mod:`ray_workflows._core.queries`)
answer about workflows, ``Management`` (:mod:`ray_workflows._core.management`)
cancels, deletes and resumes them, and ``Retention`` (:mod:`ray_workflows._core.retention`)
deletes those finished long enough ago.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from ray_workflows._core import environment
from ray_workflows._core.admission import EXEMPT, Admission
from ray_workflows._core.drive import RunDriver
from ray_workflows._core.executor import Executor
from ray_workflows._core.ids import IdAllocator
from ray_workflows._core.lease import new_owner_id
from ray_workflows._core.lease_manager import LeaseManager
from ray_workflows._core.log import get_logger
from ray_workflows._core.management import Management
from ray_workflows._core.options import check_metadata
from ray_workflows._core.plan import Plan
from ray_workflows._core.queries import Queries
from ray_workflows._core.recovery import Recovery
from ray_workflows._core.retention import Retention
from ray_workflows._core.scheduler import WorkflowRun
from ray_workflows._core.status import WorkflowStatus
from ray_workflows._core.store import running_meta
from ray_workflows.clock import Clock
from ray_workflows.exceptions import (
    NothingToResumeError,
    WorkflowAlreadyRunningError,
    WorkflowError,
    WorkflowNotResumableError,
)
from ray_workflows.storage import Storage

log = get_logger()


class _IdLock:
    """``async with``: serialise start/resume of one workflow id; the lock is dropped
    when nobody holds or waits for it, so the table does not grow."""

    def __init__(self, table: dict[str, tuple[asyncio.Lock, int]], key: str) -> None:
        self._table, self._key = table, key

    async def __aenter__(self) -> None:
        lock, users = self._table.get(self._key, (asyncio.Lock(), 0))
        self._table[self._key] = (lock, users + 1)
        await lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        lock, users = self._table[self._key]
        lock.release()
        if users <= 1:
            del self._table[self._key]
        else:
            self._table[self._key] = (lock, users - 1)


class Engine:
    """Runs and tracks the workflows of one storage.

    A workflow runs only while this engine holds its lease (:mod:`ray_workflows._core.lease`),
    so two engines sharing a storage never run it at once. ``owner_prefix`` names this
    engine's lineage: leases of an owner with that prefix belong to an earlier, dead
    incarnation (the manager actor restarted by Ray) and are taken over at once.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        owner_prefix: str | None = None,
        lease_ttl: float | None = None,
        clock: Clock | str | None = None,
        here: bool = False,
    ) -> None:
        self.storage = storage
        if isinstance(clock, str):
            clock = load_clock(clock)
        owner = new_owner_id(owner_prefix or "")

        def supersedes(other: str) -> bool:
            return bool(owner_prefix) and other.startswith(owner_prefix or "") and other != owner

        self.leases = LeaseManager(
            storage,
            owner,
            ttl=lease_ttl,
            on_lost=self._lease_lost,
            supersedes=supersedes,
        )
        self.executor = Executor(storage, clock, here=here)
        self.store = self.executor.store
        self.recovery = Recovery(self.store, self.executor)
        self.admission = Admission()
        self._driver = RunDriver(self.store, self.leases, self.admission)
        self.runs = self._driver.runs
        self._finished = self._driver.finished
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._queries = Queries(
            store=self.store,
            executor=self.executor,
            recovery=self.recovery,
            leases=self.leases,
            admission=self.admission,
            runs=self.runs,
            finished=self._finished,
            resume=self.resume,
        )
        self._management = Management(
            storage=storage,
            store=self.store,
            mailbox=self.executor.mailbox,
            admission=self.admission,
            runs=self.runs,
            finished=self._finished,
            queries=self._queries,
            lock=self._lock,
            resume=self.resume,
        )
        self.retention = Retention(self.store, self._management.delete_ended)

    # -- starting ---------------------------------------------------------------
    async def start(
        self,
        workflow_id: str,
        plan: Plan,
        metadata: dict[str, Any] | None = None,
        *,
        encoded: bytes | None = None,
        exempt: bool = False,
    ) -> asyncio.Future[Any]:
        """Store and start a new workflow, or resume the stored one of that id.

        Returns once the plan is durable and the run is registered, with a future of
        the output's ObjectRef. Idempotent: a live or stored workflow of that id is
        joined or resumed, never started twice. ``exempt``: the admission limits do
        not apply to it, now or when it resumes (see :mod:`ray_workflows._core.admission`).
        """
        async with self._lock(workflow_id):
            if workflow_id in self.runs:
                log.info("workflow.already_running", workflow_id=workflow_id)
                return self._finished[workflow_id]
            meta = running_meta(plan.output_task_id, check_metadata(metadata), plan.environment)
            if exempt:
                meta[EXEMPT] = True
            else:
                self.admission.check(workflow_id)
            await environment.keep(self.storage, plan.environment)  # before the plan
            stored = plan
            if any(spec.arg_refs for spec in plan.tasks.values()):
                stored = await self._checkpoint_args(workflow_id, plan)
            record = encoded if stored is plan else None
            if exempt:
                # In the plan's header too: a resume before the first status write
                # reads the meta from there (WorkflowStore.started_meta).
                record = self.store.encode_plan(stored, meta=meta)
            # Both writes at once: for a new id nobody else can hold the lease, and
            # for an existing one the lease is what _resume needs anyway.
            lease, created = await asyncio.gather(
                self.leases.acquire(workflow_id, fresh=True),
                self.store.create(workflow_id, stored, record),
                return_exceptions=True,
            )
            try:
                if isinstance(created, BaseException):
                    raise created
                if isinstance(lease, BaseException):
                    raise lease
                if not created:
                    log.info(
                        "workflow.exists_resuming",
                        workflow_id=workflow_id,
                        note="a workflow with this id is stored; resuming it, not the new DAG",
                    )
                    return await self._resume(workflow_id, existing_ok=True)
            except BaseException:
                # The lease taken for it must not stay held (and renewed) by a start
                # that failed: another cluster would see the id running here for ever.
                held = self.leases.held.get(workflow_id)
                if held is not None and workflow_id not in self.runs:
                    await self.leases.release(held)
                raise
            if lease is None:
                raise await self._queries.elsewhere(workflow_id)
            # Stored with its RUNNING marker (WorkflowStore.create).
            running = WorkflowStatus.RUNNING.value
            return self._driver.launch(self._new_run(workflow_id, plan), meta, running, lease)

    async def adopt(
        self,
        workflow_id: str,
        plan: Plan,
        meta: dict[str, Any],
        lease_record: bytes | None,
        owner: str | None = None,
    ) -> asyncio.Future[Any]:
        """Run a workflow its caller has already stored as started (plan, RUNNING status,
        ``meta`` and a lease record granted to this engine, or to ``owner``, the name
        the caller gave the workflow's host: ``lease_record``), without storage I/O. If
        anything differs from that (the lease is no longer this engine's, the workflow
        was canceled or deleted meanwhile, or it already runs) it is an ordinary resume
        or join, decided from storage."""
        if owner is not None:
            self.leases.act_for(workflow_id, owner)
        async with self._lock(workflow_id):
            if workflow_id in self.runs:
                return self._finished[workflow_id]
            lease = None
            if lease_record is not None and not self._management.was_closed(workflow_id):
                lease = self.leases.adopt(workflow_id, lease_record)
            if lease is None:
                return await self._resume(workflow_id, existing_ok=True)
            running = WorkflowStatus.RUNNING.value
            run = self._new_run(workflow_id, plan)
            return self._driver.launch(run, dict(meta), running, lease, written=running)

    def _new_run(self, workflow_id: str, plan: Plan) -> WorkflowRun:
        run = WorkflowRun(
            workflow_id, self.store, self.executor, plan.output_task_id, IdAllocator(plan.counters)
        )
        run.graph.dress = environment.dresser(plan, self.executor.settings.runtime_env)
        run.add_plan(plan)
        log.info("workflow.started", workflow_id=workflow_id, tasks=len(plan.tasks))
        return run

    def _lock(self, workflow_id: str) -> _IdLock:
        return _IdLock(self._locks, workflow_id)

    async def _checkpoint_args(self, workflow_id: str, plan: Plan) -> Plan:
        specs = list(plan.tasks.values())
        refs = [ref for spec in specs for ref in spec.arg_refs]
        keys = iter(await self.executor.save_objects(workflow_id, refs))
        tasks = {}
        for spec in specs:
            spec.arg_keys = [next(keys) for _ in spec.arg_refs]
            tasks[spec.task_id] = dataclasses.replace(spec, arg_refs=spec.arg_keys, arg_keys=None)
        return Plan(tasks, plan.output_task_id, plan.functions, plan.counters)

    # -- resuming ------------------------------------------------------------------
    async def resume(
        self, workflow_id: str, *, existing_ok: bool = False, load: bool = True
    ) -> asyncio.Future[Any]:
        """Continue a stored workflow from its checkpoints; finished tasks never re-run.
        ``load=False``: for a finished workflow, do not start loading its output (the
        caller asks for it separately)."""
        async with self._lock(workflow_id):
            return await self._resume(workflow_id, existing_ok=existing_ok, load=load)

    async def _resume(
        self, workflow_id: str, *, existing_ok: bool, load: bool = True
    ) -> asyncio.Future[Any]:
        if workflow_id in self.runs:
            if existing_ok:
                return self._finished[workflow_id]
            raise WorkflowAlreadyRunningError(
                f"Workflow {workflow_id!r} is already running; workflow.get_output("
                f"{workflow_id!r}) waits for it.",
                workflow_id=workflow_id,
            )
        meta = await self.store.read_meta(workflow_id)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        output = meta.get("output_key") if meta is not None else None
        if meta is not None and meta["status"] == WorkflowStatus.SUCCESSFUL.value:
            # Finished: its (maybe large) plan is not needed, only its output.
            held = self.leases.held.get(workflow_id)
            if held is not None:  # taken by start() for an id that turned out finished
                self.leases.drop(held)
            if not output:
                raise WorkflowError(
                    f"Workflow {workflow_id!r} finished, but its output task ran with "
                    "checkpoint=False, so its output was not stored and cannot be returned "
                    "again. Delete the workflow and run it again to compute it, or give "
                    "the output task checkpoint=True.",
                    workflow_id=workflow_id,
                    status=WorkflowStatus.SUCCESSFUL.value,
                )
            done.set_result(
                await self._queries.stored_output(workflow_id, output) if load else None
            )
            return done
        plan = await self.store.load_plan(workflow_id)
        if plan is None:
            raise NothingToResumeError.of(workflow_id, self.storage.uri)
        if meta is None:  # stored, but not run until its first status write
            meta = await self.store.started_meta(workflow_id) or {}
            meta.update(status=WorkflowStatus.RUNNING.value, output_task_id=plan.output_task_id)
            meta.setdefault("user_metadata", {})
        if meta["status"] == WorkflowStatus.CANCELED.value:
            raise WorkflowNotResumableError(
                f"Workflow {workflow_id!r} was canceled; a canceled workflow cannot be resumed. "
                "Delete it and run it again to start over.",
                workflow_id=workflow_id,
            )
        if not meta.get(EXEMPT):
            self.admission.check(workflow_id)
        lease = await self.leases.acquire(workflow_id)
        if lease is None:
            raise await self._queries.elsewhere(workflow_id)
        try:
            # Re-read under the lease: the previous holder may have finished it meanwhile.
            now, stored = await self.store.read_meta_record(workflow_id)
            meta = now or meta
            if meta["status"] in (WorkflowStatus.SUCCESSFUL.value, WorkflowStatus.CANCELED.value):
                await self.leases.release(lease)
                return await self._resume(workflow_id, existing_ok=existing_ok)
            await environment.restore(
                self.storage, workflow_id, plan, self.executor.settings.runtime_env
            )
            run = await self.recovery.rebuild(workflow_id, plan, lease.epoch)
        except BaseException:
            await self.leases.release(lease)
            raise
        previous = meta["status"]
        meta.update(status=WorkflowStatus.RUNNING.value, start_time=time.time())
        meta.pop("end_time", None)
        meta.pop("error", None)
        meta.pop("failure", None)
        log.info("workflow.resumed", workflow_id=workflow_id, pending=len(run.graph.specs))
        return self._driver.launch(run, meta, previous, lease, stored=stored)

    def _lease_lost(self, workflow_id: str) -> None:
        self._driver.lease_lost(workflow_id)

    # -- queries (ray_workflows._core.queries) ---------------------------------------
    async def status(self, workflow_id: str) -> WorkflowStatus:
        return await self._queries.status(workflow_id)

    async def list_all(
        self, statuses: set[WorkflowStatus] | None = None
    ) -> list[tuple[str, WorkflowStatus]]:
        return await self._queries.list_all(statuses)

    async def output(self, workflow_id: str, task_id: str | None = None) -> Any:
        return await self._queries.output(workflow_id, task_id)

    async def metadata(self, workflow_id: str, task_id: str | None = None) -> dict[str, Any]:
        return await self._queries.metadata(workflow_id, task_id)

    async def result(self, workflow_id: str) -> Any:
        return await self._queries.result(workflow_id)

    async def result_and_record(self, workflow_id: str) -> tuple[Any, bytes | None]:
        return await self._queries.result_and_record(workflow_id)

    # -- management (ray_workflows._core.management) ---------------------------------
    async def cancel(self, workflow_id: str) -> None:
        await self._management.cancel(workflow_id)

    def watch_cancels(self, every: float = 1.0) -> None:
        self._management.watch_cancels(every)

    async def delete(self, workflow_id: str) -> None:
        await self._management.delete(workflow_id)

    async def send_event(
        self, workflow_id: str, key: str, payload: Any, event_id: str | None = None
    ) -> str:
        return await self._management.send_event(workflow_id, key, payload, event_id)

    async def resume_all(self, include_failed: bool = False) -> list[str]:
        return await self._management.resume_all(include_failed)

    async def close(self) -> None:
        self._management.stop_watching()
        self.retention.stop()
        self._driver.stop()
        await self.leases.close()
        await self.storage.close()


def load_clock(name: str) -> Clock:
    """An instance of the clock plugin registered as ``name`` (``system``, ``virtual``)."""
    from ray_workflows.plugins import CLOCK_GROUP, load

    try:
        cls = load(CLOCK_GROUP, name)
    except LookupError as exc:
        raise ValueError(f"Unknown clock {name!r}: {exc}") from None
    clock: Clock = cls()
    return clock


__all__ = ["Engine", "load_clock"]
