"""Managing workflows: cancel, delete, send an event, resume every orphan.

A workflow running elsewhere (a host, another manager sharing the storage) is
canceled through storage: a request at ``cancels/<id>``, which every runner looks
for (:meth:`Management.watch_cancels`).
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable, Collection
from contextlib import AbstractAsyncContextManager
from typing import Any

from ray_workflows._core import keys
from ray_workflows._core.admission import Admission
from ray_workflows._core.log import get_logger
from ray_workflows._core.mailbox import Mailbox
from ray_workflows._core.queries import Queries, Resume
from ray_workflows._core.scheduler import WorkflowRun
from ray_workflows._core.status import WorkflowStatus
from ray_workflows._core.store import WorkflowStore
from ray_workflows.exceptions import (
    WorkflowCancellationError,
    WorkflowError,
    WorkflowFinishedError,
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


def ended_at(meta: dict[str, Any]) -> float:
    """When a finished workflow ended, from its meta.json: ``end_time`` (its start time
    if a record lacks one, or infinity: never old enough)."""
    value = meta.get("end_time", meta.get("start_time"))
    return float(value) if isinstance(value, (int, float)) else math.inf


class Management:
    """Cancels, deletes, sends events to and resumes the workflows of one storage.
    ``lock(workflow_id)`` serialises it with the start and resume of that id."""

    def __init__(
        self,
        *,
        storage: Storage,
        store: WorkflowStore,
        mailbox: Mailbox,
        admission: Admission,
        runs: dict[str, WorkflowRun],
        finished: dict[str, asyncio.Future[Any]],
        queries: Queries,
        lock: Callable[[str], AbstractAsyncContextManager[None]],
        resume: Resume,
    ) -> None:
        self.storage = storage
        self.store = store
        self.mailbox = mailbox
        self.admission = admission
        self.runs = runs
        self.finished = finished
        self.queries = queries
        self.lock = lock
        self.resume = resume
        self._watcher: asyncio.Task[None] | None = None  # see watch_cancels
        # Ids canceled or deleted while not running here: a caller-stored workflow
        # handed over after that is resumed from storage (and refused), not adopted.
        self._closed: collections.OrderedDict[str, None] = collections.OrderedDict()

    async def cancel(self, workflow_id: str) -> None:
        """Stop a running or pending workflow (its Ray tasks are cancelled; checkpoints
        stay), or mark a failed or resumable one CANCELED. A finished workflow is left
        as it is; an unknown one is ``WorkflowNotFoundError``."""
        while True:
            run = self.runs.get(workflow_id)
            if run is not None:
                finished = self.finished[workflow_id]
                self.admission.withdraw(workflow_id, WorkflowCancellationError.of(workflow_id))
                run.cancel()
                await asyncio.wait([finished])
                log.info("workflow.canceled", workflow_id=workflow_id)
                return
            async with self.lock(workflow_id):
                if await self._cancel_stored(workflow_id):
                    return
            # meta.json changed meanwhile (a run took the workflow up, or ended it):
            # cancel what it is now, with the id's lock released (it is not reentrant).

    async def _cancel_stored(self, workflow_id: str) -> bool:
        """Cancel a workflow that does not run here (under its id's lock); ``False``
        if its meta.json changed while this was deciding, so nothing was written."""
        # One being handed over to this engine is canceled before it starts.
        status = await self.queries.status(workflow_id, handed_over=False)
        if status in (WorkflowStatus.SUCCESSFUL, WorkflowStatus.CANCELED):
            log.info("workflow.cancel_ignored", workflow_id=workflow_id, status=status.value)
            return True
        if status in (
            WorkflowStatus.RUNNING,
            WorkflowStatus.PENDING,
        ) and await self.queries.held_elsewhere(workflow_id):
            ended = await self._asked_to_stop(workflow_id)
            if ended is None:
                raise await self.queries.elsewhere(workflow_id)
            if ended != WorkflowStatus.FAILED.value:
                return True  # canceled there, or a success that stands
            # Failed meanwhile: marked CANCELED below, as a cancel after it would.
        meta, stored = await self.store.read_meta_record(workflow_id)
        if meta is None:
            meta = await self.store.started_meta(workflow_id) or {"user_metadata": {}}
        previous = meta.get("status")
        meta.update(status=WorkflowStatus.CANCELED.value, end_time=time.time())
        if await self.store.swap_meta(workflow_id, meta, previous, stored) is None:
            return False
        self._close(workflow_id)
        log.info("workflow.canceled", workflow_id=workflow_id, was=status.value)
        return True

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
        async with self.lock(workflow_id):
            # Live also while its caller hands it over (a lease of ours, not held yet),
            # as get_status shows it. WorkflowNotFoundError if there is nothing stored.
            status = await self.queries.status(workflow_id, handed_over=True)
            if await self._active(workflow_id, status):
                raise WorkflowStillActiveError.of("delete", workflow_id)
            await self._remove(workflow_id)

    async def delete_ended(
        self, workflow_id: str, before: float, statuses: Collection[str]
    ) -> bool:
        """:meth:`delete` a workflow if its stored status is one of ``statuses`` and it
        ended before ``before`` (epoch seconds, its meta.json's ``end_time``), as read
        under its id's lock; ``False`` (nothing removed) otherwise."""
        async with self.lock(workflow_id):
            meta = await self.store.read_meta(workflow_id)
            if (
                meta is None
                or meta.get("status") not in statuses
                or ended_at(meta) > before
                or await self._active(workflow_id, WorkflowStatus(meta["status"]))
            ):
                return False
            await self._remove(workflow_id)
            return True

    async def _active(self, workflow_id: str, status: WorkflowStatus) -> bool:
        # Another manager may also be resuming it while its stored status is still
        # FAILED: its live lease says so.
        return (
            workflow_id in self.runs
            or status in (WorkflowStatus.RUNNING, WorkflowStatus.PENDING)
            or (
                status != WorkflowStatus.SUCCESSFUL
                and await self.queries.held_elsewhere(workflow_id)
            )
        )

    async def _remove(self, workflow_id: str) -> None:
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
            status = await self.queries.status(workflow_id)  # WorkflowNotFoundError if unknown
            if status in (WorkflowStatus.SUCCESSFUL, WorkflowStatus.CANCELED):
                if event_id is not None and await self.mailbox.known(workflow_id, key, event_id):
                    return event_id
                raise WorkflowFinishedError(
                    f"Workflow {workflow_id!r} is {status.value}: it will never wait for "
                    f"an event again, so the event for key {key!r} was not stored.",
                    workflow_id=workflow_id,
                    status=status.value,
                )
        return await self.mailbox.send(workflow_id, key, payload, event_id=event_id)

    async def resume_all(self, include_failed: bool = False) -> list[str]:
        """Resume every RESUMABLE workflow (and FAILED ones if asked): those that were
        running before those that were pending, so they get the running slots back.
        One that cannot resume is logged and skipped; the others still resume. Only
        the index's markers of those statuses are listed: the sweep's cost does not
        grow with the number of finished workflows kept."""
        order = {"RUNNING": 0, "PENDING": 1, "FAILED": 2}
        wanted = {"RUNNING", "PENDING"} | ({"FAILED"} if include_failed else set())
        stored = await self.store.indexed(wanted)
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
            except Exception:  # unreadable records: this one is skipped, never the rest
                log.exception("workflow.resume_failed", workflow_id=wid)
                continue
            resumed.append(wid)
        return resumed

    def _close(self, workflow_id: str) -> None:
        self._closed[workflow_id] = None
        if len(self._closed) > 10_000:
            self._closed.popitem(last=False)

    def was_closed(self, workflow_id: str) -> bool:
        """Whether ``workflow_id`` was canceled or deleted while not running here (of the
        last 10,000 such ids)."""
        return workflow_id in self._closed

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()


__all__ = ["CANCEL_WAIT", "FINAL", "Management", "ended_at"]
