"""The Engine: every workflow of one storage, driven on one event loop.

The Engine is plain asyncio over a :class:`WorkflowStore` and an
:class:`Executor`. It does not know where it lives: the manager actor hosts one
(so workflows outlive the driver that started them), and tests or an asyncio web
service can run one in-process.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Awaitable
from typing import Any

import ray

from ray_workflows._core import keys, serialization
from ray_workflows._core.admission import EXEMPT, Admission
from ray_workflows._core.executor import Executor
from ray_workflows._core.ids import IdAllocator
from ray_workflows._core.lease import Lease, LeaseInfo, new_owner_id
from ray_workflows._core.lease_manager import LeaseManager
from ray_workflows._core.log import get_logger
from ray_workflows._core.options import check_metadata
from ray_workflows._core.plan import Plan
from ray_workflows._core.recovery import Recovery
from ray_workflows._core.scheduler import WorkflowRun
from ray_workflows._core.status import WorkflowStatus
from ray_workflows._core.store import running_meta
from ray_workflows._core.worker import INLINE_RECORD_BYTES
from ray_workflows.clock import Clock
from ray_workflows.exceptions import (
    TaskNotFoundError,
    WorkflowAlreadyRunningError,
    WorkflowCancellationError,
    WorkflowError,
    WorkflowExecutionError,
    WorkflowFinishedError,
    WorkflowNotFoundError,
    WorkflowNotResumableError,
    WorkflowRunningElsewhereError,
    WorkflowStillActiveError,
)
from ray_workflows.storage import Storage

#: How long a cancel waits for a runner elsewhere (a host, another manager) to stop.
CANCEL_WAIT = 10.0
FINAL = (
    WorkflowStatus.SUCCESSFUL.value,
    WorkflowStatus.FAILED.value,
    WorkflowStatus.CANCELED.value,
)

log = get_logger()


def _unstored(wid: str, exc: Exception) -> WorkflowError:
    error = WorkflowError(
        f"Workflow {wid!r} finished, but its status could not be stored ({exc}); it is RESUMABLE.",
        workflow_id=wid,
    )
    error.__cause__ = exc
    return error


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
        self._watcher: asyncio.Task[None] | None = None  # see watch_cancels

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
        self.runs: dict[str, WorkflowRun] = {}
        self._finished: dict[str, asyncio.Future[Any]] = {}
        self._drivers: set[asyncio.Task[None]] = set()
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        # Ids canceled or deleted while not running here: a caller-stored workflow
        # handed over after that is resumed from storage (and refused), not adopted.
        self._closed: collections.OrderedDict[str, None] = collections.OrderedDict()

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
            meta = running_meta(plan.output_task_id, check_metadata(metadata))
            if exempt:
                meta[EXEMPT] = True
            else:
                self.admission.check(workflow_id)
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
            )
            if not created:
                log.info(
                    "workflow.exists_resuming",
                    workflow_id=workflow_id,
                    note="a workflow with this id is stored; resuming it, not the new DAG",
                )
                return await self._resume(workflow_id, existing_ok=True)
            if lease is None:
                raise await self._elsewhere(workflow_id)
            return self._launch(self._new_run(workflow_id, plan), meta, None, lease)

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
            if lease_record is not None and workflow_id not in self._closed:
                lease = self.leases.adopt(workflow_id, lease_record)
            if lease is None:
                return await self._resume(workflow_id, existing_ok=True)
            running = WorkflowStatus.RUNNING.value
            run = self._new_run(workflow_id, plan)
            return self._launch(run, dict(meta), running, lease, written=running)

    def _new_run(self, workflow_id: str, plan: Plan) -> WorkflowRun:
        run = WorkflowRun(
            workflow_id, self.store, self.executor, plan.output_task_id, IdAllocator(plan.counters)
        )
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

    def _launch(
        self,
        run: WorkflowRun,
        meta: dict[str, Any],
        previous: str | None,
        lease: Lease,
        *,
        written: str | None = None,
        stored: bytes | None = None,
    ) -> asyncio.Future[Any]:
        """Register ``run`` and start driving it. ``written``: the status already stored
        with ``meta`` (the caller stored the workflow), which is not written again;
        ``stored``: the bytes of its ``meta.json`` (``None``: it has none yet)."""
        wid = run.workflow_id
        self.leases.start()
        run.lease, run.epoch = lease, lease.epoch
        self.runs[wid] = run
        finished: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._finished[wid] = finished
        gate = None if meta.get(EXEMPT) else self.admission.admit(wid)
        if gate is not None:
            meta["status"] = WorkflowStatus.PENDING.value
        driver = asyncio.get_running_loop().create_task(
            self._drive(run, meta, previous, finished, gate, lease, written, stored)
        )
        self._drivers.add(driver)
        driver.add_done_callback(self._drivers.discard)
        return finished

    async def _drive(
        self,
        run: WorkflowRun,
        meta: dict[str, Any],
        previous: str | None,
        finished: asyncio.Future[Any],
        gate: asyncio.Future[None] | None,
        lease: Lease,
        written: str | None,
        stored: bytes | None,
    ) -> None:
        """Run ``run`` to its end and store its status. ``stored``: the bytes of its
        ``meta.json`` as the lease was taken (``None``: it has none yet); every status
        write replaces exactly what this run last saw (see ``WorkflowStore.swap_meta``)."""
        wid = run.workflow_id
        old = meta["status"]
        outcome: Any

        async def swap(status_was: str | None) -> None:
            nonlocal stored
            meta["lease_epoch"] = run.epoch
            now = await self.store.swap_meta(wid, dict(meta), status_was, stored)
            if now is None:
                raise self._lost(wid)
            stored = now

        sealed: dict[str, Any] | None = None  # the final meta, queued by seal()
        unstored = False  # the batch that held it failed: the workflow stays resumable

        def seal() -> Awaitable[None] | None:
            # The final status of a workflow without meta.json yet, created in one batch
            # with its last checkpoints (see WorkflowRun.run); else written below.
            nonlocal sealed
            if stored is not None:
                return None
            sealed = dict(self._succeeded(meta, run), lease_epoch=run.epoch)
            queued = self.store.queue_first_meta(wid, sealed, old)

            async def landed() -> None:
                nonlocal stored
                now = await queued
                if now is None:
                    raise self._lost(wid)
                stored = now

            return landed()

        try:
            # The status is written while the first tasks already run: the plan is
            # what makes the workflow durable, and it was stored before start returned.
            if meta["status"] != written:
                await swap(previous)
            if gate is not None:
                log.info("workflow.pending", workflow_id=wid)
                await gate
                meta.update(status=WorkflowStatus.RUNNING.value, start_time=time.time())
                await swap(old)
                old = meta["status"]
            outcome = await run.run(seal)
            meta.update(sealed or self._succeeded(meta, run))
            log.info("workflow.succeeded", workflow_id=wid)
        except WorkflowRunningElsewhereError as exc:
            outcome = exc  # the lease was lost: the new holder owns the status now
        except WorkflowCancellationError as exc:
            outcome = exc
            meta.update(status=WorkflowStatus.CANCELED.value, end_time=time.time())
        except WorkflowExecutionError as exc:
            outcome = exc
            meta.update(status=WorkflowStatus.FAILED.value, end_time=time.time(), error=str(exc))
            log.warning("workflow.failed", workflow_id=wid, error=str(exc))
        except Exception as exc:
            if sealed is not None:  # the batch with the final status failed
                log.exception("workflow.status_write_failed", workflow_id=wid)
                outcome = _unstored(wid, exc)
                unstored = True
            else:
                outcome = WorkflowExecutionError(
                    f"Workflow {wid!r} failed inside the engine: {exc}", workflow_id=wid
                )
                outcome.__cause__ = exc
                meta.update(
                    status=WorkflowStatus.FAILED.value, end_time=time.time(), error=str(exc)
                )
                log.exception("workflow.engine_error", workflow_id=wid)
        lease = run.lease
        final = sealed is not None and not isinstance(outcome, BaseException)
        if not (final or unstored or isinstance(outcome, WorkflowRunningElsewhereError)):
            try:
                await swap(old)
                final = True
            except WorkflowRunningElsewhereError as exc:
                outcome = exc
            except Exception as exc:  # the status could not be stored: it stays resumable
                log.exception("workflow.status_write_failed", workflow_id=wid)
                outcome = _unstored(wid, exc)
        self.runs.pop(wid, None)
        self._finished.pop(wid, None)
        self.admission.release(wid)
        if final and meta["status"] == WorkflowStatus.SUCCESSFUL.value and not lease.lost:
            self.leases.drop(lease)  # nobody needs to take a finished workflow over
        else:
            await self.leases.release(lease)
        if isinstance(outcome, BaseException):
            run.fail_waiters(outcome)
            finished.set_exception(outcome)
        else:
            finished.set_result(outcome)

    @staticmethod
    def _lost(wid: str) -> WorkflowRunningElsewhereError:
        return WorkflowRunningElsewhereError(
            f"Workflow {wid!r} lost its lease before its status was stored; another manager "
            "sharing the storage runs it now (nothing more of this run is stored).",
            workflow_id=wid,
        )

    @staticmethod
    def _succeeded(meta: dict[str, Any], run: WorkflowRun) -> dict[str, Any]:
        final = dict(
            meta,
            status=WorkflowStatus.SUCCESSFUL.value,
            end_time=time.time(),
            output_key=run.output_key,
        )
        final.pop("error", None)
        return final

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
        if meta is not None and meta["status"] == WorkflowStatus.SUCCESSFUL.value and output:
            # Finished: its (maybe large) plan is not needed, only its output.
            held = self.leases.held.get(workflow_id)
            if held is not None:  # taken by start() for an id that turned out finished
                self.leases.drop(held)
            done.set_result(await self._stored_output(workflow_id, output) if load else None)
            return done
        plan = await self.store.load_plan(workflow_id)
        if plan is None:
            raise WorkflowNotFoundError.of(workflow_id, self.storage.uri)
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
            raise await self._elsewhere(workflow_id)
        try:
            # Re-read under the lease: the previous holder may have finished it meanwhile.
            now, stored = await self.store.read_meta_record(workflow_id)
            meta = now or meta
            if meta["status"] in (WorkflowStatus.SUCCESSFUL.value, WorkflowStatus.CANCELED.value):
                await self.leases.release(lease)
                return await self._resume(workflow_id, existing_ok=existing_ok)
            run = await self.recovery.rebuild(workflow_id, plan, lease.epoch)
        except BaseException:
            await self.leases.release(lease)
            raise
        previous = meta["status"]
        meta.update(status=WorkflowStatus.RUNNING.value, start_time=time.time())
        meta.pop("end_time", None)
        meta.pop("error", None)
        log.info("workflow.resumed", workflow_id=workflow_id, pending=len(run.specs))
        return self._launch(run, meta, previous, lease, stored=stored)

    async def _elsewhere(self, workflow_id: str) -> WorkflowRunningElsewhereError:
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

    def _lease_lost(self, workflow_id: str) -> None:
        run = self.runs.get(workflow_id)
        if run is not None:
            # A renewal that came too late (a starved or paused manager) loses the lease
            # without anyone taking it: take it again and go on. Only a lease that
            # another manager now holds stops the run.
            task = asyncio.get_running_loop().create_task(self._retake(workflow_id, run))
            self._drivers.add(task)
            task.add_done_callback(self._drivers.discard)

    async def _retake(self, workflow_id: str, run: WorkflowRun) -> None:
        try:
            # Bounded: a run must not go on without a lease while storage hangs.
            lease = await asyncio.wait_for(self.leases.acquire(workflow_id), self.leases.ttl / 3)
        except Exception:  # a storage error or the timeout: treat as taken
            lease = None
        if lease is not None and self.runs.get(workflow_id) is run:
            log.info("lease.retaken", workflow_id=workflow_id, epoch=lease.epoch)
            try:
                # A new epoch: what the run wrote under the old one counts as far as
                # it is stored now; later writes of the old epoch are a stale holder's.
                await self.store.seal(workflow_id, lease.epoch)
            except Exception:
                await self.leases.release(lease)
                lease = None
            else:
                run.retake(lease)
                return
        if lease is not None:
            await self.leases.release(lease)
        if self.runs.get(workflow_id) is run:
            log.warning("workflow.abandoned", workflow_id=workflow_id, reason="lease lost")
            run.abandon(
                WorkflowRunningElsewhereError(
                    f"Workflow {workflow_id!r} stopped here: its lease was taken over by "
                    "another manager sharing the storage, which runs it now.",
                    workflow_id=workflow_id,
                )
            )

    async def _held_elsewhere(self, workflow_id: str, *, handed_over: bool = False) -> bool:
        """Whether a live lease keeps this workflow from being resumed here: another
        manager's, or (``handed_over``) this engine's own for a workflow it does not
        run yet: a caller stored it and is handing it over (:meth:`adopt`)."""
        info: LeaseInfo | None = await self.leases.holder(workflow_id)
        if info is None:
            return False
        if info.owner != self.leases.owner:
            return True
        return handed_over and workflow_id not in self.leases.held

    def _close(self, workflow_id: str) -> None:
        self._closed[workflow_id] = None
        if len(self._closed) > 10_000:
            self._closed.popitem(last=False)

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
        ref = await asyncio.shield(self._finished[workflow_id])
        return ref, run.output_record

    async def _stored_output(self, workflow_id: str, key: str) -> Any:
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

    # -- queries -------------------------------------------------------------------
    async def status(self, workflow_id: str) -> WorkflowStatus:
        return await self._status(workflow_id, handed_over=True)

    async def _status(self, workflow_id: str, *, handed_over: bool) -> WorkflowStatus:
        if workflow_id in self.runs:
            return self._live_status(workflow_id)
        meta = await self.store.read_meta(workflow_id)
        if meta is None:
            if not await self.store.exists(workflow_id):
                raise WorkflowNotFoundError.of(workflow_id, self.storage.uri)
            meta = {"status": WorkflowStatus.RUNNING.value}
        return await self._held_status(workflow_id, meta["status"], handed_over=handed_over)

    async def _held_status(
        self, workflow_id: str, stored: str, *, handed_over: bool = True
    ) -> WorkflowStatus:
        """The status of a workflow whose stored status is ``stored``: RESUMABLE if it
        was running but nobody runs it now (here, or another manager)."""
        status = self._derive(workflow_id, stored)
        if status == WorkflowStatus.RESUMABLE and await self._held_elsewhere(
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
                return await self._held_elsewhere(wid, handed_over=True)

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
                return await asyncio.shield(self._finished[workflow_id])
            if run.knows(task_id):
                return await run.task_output(task_id)
            # A task that already continued (its value is its chain's, resolved later) or
            # that does not exist yet: answer from storage once the workflow is done.
            await asyncio.wait([self._finished[workflow_id]])
            return await self.output(workflow_id, task_id)
        meta = await self.store.read_meta(workflow_id)
        if meta is None and not await self.store.exists(workflow_id):
            raise WorkflowNotFoundError.of(workflow_id, self.storage.uri)
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
                return await self._stored_output(workflow_id, meta["output_key"])
            task_id = meta["output_task_id"] if meta else None
            if status != WorkflowStatus.SUCCESSFUL:
                raise WorkflowError(
                    f"Workflow {workflow_id!r} is {status.value}; it has no output. "
                    + (
                        "Resume it with workflow.resume(...) to finish it."
                        if status == WorkflowStatus.FAILED
                        else ""
                    ),
                    workflow_id=workflow_id,
                    status=status.value,
                )
        assert task_id is not None
        try:
            key = await self.recovery.locate(workflow_id, task_id)
        except TaskNotFoundError:
            held = await self._held_status(workflow_id, meta["status"] if meta else "RUNNING")
            if held not in (WorkflowStatus.RUNNING, WorkflowStatus.PENDING):
                raise
            # Not stored yet, in a run elsewhere (another manager) or
            # orphaned: ask again once the workflow is over, as for a run here.
            await self.result(workflow_id)
            key = await self.recovery.locate(workflow_id, task_id)
        return await self._stored_output(workflow_id, key)

    async def metadata(self, workflow_id: str, task_id: str | None = None) -> dict[str, Any]:
        meta = await self.store.read_meta(workflow_id) or await self.store.started_meta(workflow_id)
        if meta is None:
            raise WorkflowNotFoundError.of(workflow_id, self.storage.uri)
        if task_id is None:
            stats = {k: meta[k] for k in ("start_time", "end_time") if k in meta}
            result = {
                "workflow_id": workflow_id,
                "status": (await self._held_status(workflow_id, meta["status"])).value,
                "user_metadata": meta.get("user_metadata", {}),
                "stats": stats,
            }
            if "error" in meta:
                result["error"] = meta["error"]
            return result
        return await self._task_metadata(workflow_id, task_id)

    async def _task_metadata(self, workflow_id: str, task_id: str) -> dict[str, Any]:
        run = self.runs.get(workflow_id)
        spec = run.specs.get(task_id) if run is not None else None
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

    # -- management ----------------------------------------------------------------
    async def cancel(self, workflow_id: str) -> None:
        """Stop a running or pending workflow (its Ray tasks are cancelled; checkpoints
        stay), or mark a failed or resumable one CANCELED. A finished workflow is left
        as it is; an unknown one is ``WorkflowNotFoundError``."""
        run = self.runs.get(workflow_id)
        if run is not None:
            finished = self._finished[workflow_id]
            self.admission.withdraw(workflow_id, WorkflowCancellationError.of(workflow_id))
            run.cancel()
            await asyncio.wait([finished])
            log.info("workflow.canceled", workflow_id=workflow_id)
            return
        async with self._lock(workflow_id):
            # One being handed over to this engine is canceled before it starts.
            status = await self._status(workflow_id, handed_over=False)
            if status in (WorkflowStatus.SUCCESSFUL, WorkflowStatus.CANCELED):
                log.info("workflow.cancel_ignored", workflow_id=workflow_id, status=status.value)
                return
            if status in (
                WorkflowStatus.RUNNING,
                WorkflowStatus.PENDING,
            ) and await self._held_elsewhere(workflow_id):
                ended = await self._asked_to_stop(workflow_id)
                if ended is None:
                    raise await self._elsewhere(workflow_id)
                if ended != WorkflowStatus.FAILED.value:
                    return  # canceled there, or a success that stands
                # Failed meanwhile: marked CANCELED below, as a cancel after it would.
            meta, stored = await self.store.read_meta_record(workflow_id)
            if meta is None:
                meta = await self.store.started_meta(workflow_id) or {"user_metadata": {}}
            previous = meta.get("status")
            meta.update(status=WorkflowStatus.CANCELED.value, end_time=time.time())
            if await self.store.swap_meta(workflow_id, meta, previous, stored) is None:
                # A run took it up (or ended it) meanwhile: cancel what it is now.
                return await self.cancel(workflow_id)
            self._close(workflow_id)
            log.info("workflow.canceled", workflow_id=workflow_id, was=status.value)

    async def _asked_to_stop(self, workflow_id: str) -> str | None:
        """Ask the runner that holds ``workflow_id``'s lease elsewhere (a host, another
        manager) to cancel it, through storage (``cancels/<id>``, which every runner
        looks for: :meth:`watch_cancels`), and wait for its final status: the status
        it stored, or ``None`` if none within :data:`CANCEL_WAIT` seconds (the request
        stays)."""
        request = keys.cancel_key(workflow_id)
        await self.storage.put(request, b"")
        deadline = time.monotonic() + CANCEL_WAIT
        delay = 0.02
        while time.monotonic() < deadline:
            meta = await self.store.read_meta(workflow_id)
            status = meta.get("status") if meta else None
            if status in FINAL:
                await self.storage.delete(request)
                log.info("workflow.cancel_answered", workflow_id=workflow_id, status=status)
                return str(status)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        return None

    def watch_cancels(self, every: float = 1.0) -> None:
        """Look for cancel requests (``cancels/<id>``, see :meth:`cancel`) of the
        workflows running here every ``every`` seconds, and cancel those."""
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(every))

    async def _watch(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            if not self.runs:
                continue
            try:
                requested = await self.storage.list(keys.CANCELS_PREFIX)
            except Exception as exc:  # storage trouble: look again later
                log.warning("workflow.cancel_watch_failed", error=str(exc))
                continue
            for key in requested:
                wid = key[len(keys.CANCELS_PREFIX) :]
                if wid not in self.runs:
                    continue
                try:
                    await self.cancel(wid)
                    await self.storage.delete(key)
                except Exception:  # this one is asked again next time; the others go on
                    log.exception("workflow.cancel_request_failed", workflow_id=wid)

    async def delete(self, workflow_id: str) -> None:
        """Remove everything stored for a workflow that is not running or pending."""
        async with self._lock(workflow_id):
            # Live also while its caller hands it over (a lease of ours, not held yet),
            # as get_status shows it. WorkflowNotFoundError if there is nothing stored.
            status = await self._status(workflow_id, handed_over=True)
            # Another manager may also be resuming it while its stored status is still
            # FAILED: its live lease says so.
            if status in (WorkflowStatus.RUNNING, WorkflowStatus.PENDING) or (
                status != WorkflowStatus.SUCCESSFUL and await self._held_elsewhere(workflow_id)
            ):
                raise WorkflowStillActiveError.of("delete", workflow_id)
            removed = await self.store.delete_workflow(workflow_id)
            self._close(workflow_id)
            log.info("workflow.deleted", workflow_id=workflow_id, records=removed)

    async def send_event(
        self, workflow_id: str, key: str, payload: Any, event_id: str | None = None
    ) -> str:
        """Store an event in the workflow's mailbox (durably) and wake its waiter. A
        workflow that has finished for good (SUCCESSFUL or CANCELED) refuses a new event
        (a retry of one it had is answered as before); a FAILED one keeps it, for when
        it is resumed."""
        if workflow_id not in self.runs:
            status = await self.status(workflow_id)  # WorkflowNotFoundError if unknown
            if status in (WorkflowStatus.SUCCESSFUL, WorkflowStatus.CANCELED):
                mailbox = self.executor.mailbox
                if event_id is not None and await mailbox.known(workflow_id, key, event_id):
                    return event_id
                raise WorkflowFinishedError(
                    f"Workflow {workflow_id!r} is {status.value}: it will never wait for "
                    f"an event again, so the event for key {key!r} was not stored.",
                    workflow_id=workflow_id,
                    status=status.value,
                )
        return await self.executor.mailbox.send(workflow_id, key, payload, event_id=event_id)

    async def resume_all(self, include_failed: bool = False) -> list[str]:
        """Resume every RESUMABLE workflow (and FAILED ones if asked): those that were
        running before those that were pending, so they get the running slots back.
        One that cannot resume is logged and skipped; the others still resume."""
        order = {"RUNNING": 0, "PENDING": 1, "FAILED": 2}
        wanted = {"RUNNING", "PENDING"} | ({"FAILED"} if include_failed else set())
        stored = await self.store.indexed()
        candidates = sorted(
            (order[s], wid) for wid, s in stored.items() if s in wanted and wid not in self.runs
        )
        resumed = []
        for _, wid in candidates:
            try:
                await self.resume(wid, existing_ok=True)
            except WorkflowRunningElsewhereError:
                log.info("workflow.running_elsewhere", workflow_id=wid)
                continue
            except WorkflowError as exc:
                log.warning("workflow.resume_failed", workflow_id=wid, error=str(exc))
                continue
            resumed.append(wid)
        return resumed

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for run in list(self.runs.values()):
            run.cancel()
        for driver in list(self._drivers):
            driver.cancel()
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
