"""Driving one run to its final status, and keeping its lease while it runs.

The :class:`RunDriver` registers each run the engine starts or resumes, runs it, and
stores its final status through the status protocol of ``meta.json``: every write
replaces exactly the bytes this run last saw (``WorkflowStore.swap_meta``), so a run
that lost its lease to another manager stores nothing more. A run whose lease lapsed
without anyone taking it takes it again and goes on.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable
from typing import Any

from ray_workflows._core.admission import EXEMPT, Admission
from ray_workflows._core.lease import Lease
from ray_workflows._core.lease_manager import LeaseManager
from ray_workflows._core.log import get_logger
from ray_workflows._core.scheduler import WorkflowRun
from ray_workflows._core.status import WorkflowStatus
from ray_workflows._core.store import WorkflowStore
from ray_workflows.exceptions import (
    WorkflowCancellationError,
    WorkflowError,
    WorkflowExecutionError,
    WorkflowRunningElsewhereError,
)

log = get_logger()


def _unstored(wid: str, exc: Exception) -> WorkflowError:
    error = WorkflowError(
        f"Workflow {wid!r} finished, but its status could not be stored ({exc}); it is RESUMABLE.",
        workflow_id=wid,
    )
    error.__cause__ = exc
    return error


# A task's pickled exception bigger than this is not kept with the status.
_MAX_STORED_CAUSE = 64 * 1024


def _failure(exc: WorkflowExecutionError) -> dict[str, Any]:
    """What ``get_output`` of the failed workflow raises again: the failed task and its
    own exception (pickled, base64), beside the status."""
    cause = exc.details.get("cause_bytes")
    failure: dict[str, Any] = {"task_id": exc.details.get("task_id")}
    if isinstance(cause, bytes) and len(cause) <= _MAX_STORED_CAUSE:
        failure["cause"] = base64.b64encode(cause).decode()
    return {"failure": failure}


class RunDriver:
    """Drives the runs of one engine: ``runs`` (workflow id -> its run) and ``finished``
    (workflow id -> the future of its output) hold every run it drives now."""

    def __init__(self, store: WorkflowStore, leases: LeaseManager, admission: Admission) -> None:
        self.store = store
        self.leases = leases
        self.admission = admission
        self.runs: dict[str, WorkflowRun] = {}
        self.finished: dict[str, asyncio.Future[Any]] = {}
        self.drivers: set[asyncio.Task[None]] = set()  # driving a run, or retaking its lease

    def launch(
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
        if lease.lost:
            # Lost while the run was being built (a storage slower than the lease's
            # ttl): ``on_lost`` found no run then. Without a retake now, the run would
            # hold back every task and the sweep, which skips ids running here, would
            # never resume it.
            self.lease_lost(wid)
        finished: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.finished[wid] = finished
        gate = None if meta.get(EXEMPT) else self.admission.admit(wid)
        if gate is not None:
            meta["status"] = WorkflowStatus.PENDING.value
        driver = asyncio.get_running_loop().create_task(
            self._drive(run, meta, previous, finished, gate, lease, written, stored)
        )
        self.drivers.add(driver)
        driver.add_done_callback(self.drivers.discard)
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
            meta.update(_failure(exc))
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
        self.finished.pop(wid, None)
        self.admission.release(wid)
        if final and meta["status"] == WorkflowStatus.SUCCESSFUL.value and not lease.lost:
            self.leases.drop(lease)  # nobody needs to take a finished workflow over
        else:
            await self.leases.release(lease)
        if isinstance(outcome, BaseException):
            run.graph.fail_waiters(outcome)
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
        final.pop("failure", None)
        return final

    def lease_lost(self, workflow_id: str) -> None:
        """``on_lost`` of the engine's leases: ``workflow_id``'s lease was lost."""
        run = self.runs.get(workflow_id)
        if run is not None:
            # A renewal that came too late (a starved or paused manager) loses the lease
            # without anyone taking it: take it again and go on. Only a lease that
            # another manager now holds stops the run.
            task = asyncio.get_running_loop().create_task(self._retake(workflow_id, run))
            self.drivers.add(task)
            task.add_done_callback(self.drivers.discard)

    async def _retake(self, workflow_id: str, run: WorkflowRun) -> None:
        lease = None
        while self.runs.get(workflow_id) is run:
            try:
                # Bounded, so that a hanging storage is tried again. Meanwhile the run
                # starts nothing (its lease is not valid): waiting is safe.
                lease = await asyncio.wait_for(
                    self.leases.acquire(workflow_id), self.leases.ttl / 3
                )
            except Exception as exc:  # a slow or failing storage: nobody else took it
                log.info("lease.retake_failed", workflow_id=workflow_id, error=repr(exc))
                await asyncio.sleep(self.leases.ttl / 3)
                continue
            break  # taken again, or held by another manager (None)
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

    def stop(self) -> None:
        """Cancel every run and every task driving one (the engine is closing)."""
        for run in list(self.runs.values()):
            run.cancel()
        for driver in list(self.drivers):
            driver.cancel()


__all__ = ["RunDriver"]
