"""Admission: at most ``max_running_workflows`` run at once; the rest wait, FIFO.

A workflow beyond the running limit is PENDING until a slot frees. When the queue
holds ``max_pending_workflows``, a new workflow is refused with
``WorkflowQueueFullError`` before anything of it is stored. ``-1`` means
unlimited; ``max_pending_workflows=0`` means no queue at all (Ray 2.47 took 0 as
unlimited).

A workflow whose ``meta.json`` has ``EXEMPT`` set is neither counted nor queued: the
sub-workflow a virtual actor method returned. The task that called the method holds a
slot while it waits for the sub-workflow's output, so queueing the sub-workflow
behind it would deadlock once every slot is held by such a task.
"""

from __future__ import annotations

import asyncio
import collections

from ray_workflows.exceptions import WorkflowQueueFullError

EXEMPT = "admission_exempt"  # the meta.json key of a workflow exempt from admission


class Admission:
    def __init__(self) -> None:
        self.max_running = -1
        self.max_pending = -1
        self.running: set[str] = set()
        self.queue: collections.OrderedDict[str, asyncio.Future[None]] = collections.OrderedDict()

    def configure(self, max_running: int | None, max_pending: int | None) -> None:
        if max_running is not None:
            self.max_running = max_running
        if max_pending is not None:
            self.max_pending = max_pending
        self._promote()

    def _has_slot(self) -> bool:
        return self.max_running == -1 or len(self.running) < self.max_running

    def check(self, workflow_id: str) -> None:
        """Raise if ``workflow_id`` would have to queue and the queue is full."""
        if self._has_slot() or self.max_pending == -1 or len(self.queue) < self.max_pending:
            return
        raise WorkflowQueueFullError(
            f"Cannot start workflow {workflow_id!r}: {len(self.running)} workflows run "
            f"(max_running_workflows={self.max_running}) and {len(self.queue)} wait "
            f"(max_pending_workflows={self.max_pending}). Nothing was stored; retry later "
            "or raise the limits with workflow.init(...).",
            workflow_id=workflow_id,
        )

    def admit(self, workflow_id: str) -> asyncio.Future[None] | None:
        """Take a slot now (``None``), or a place in the queue (a future released when
        a slot is free)."""
        if self._has_slot() and not self.queue:
            self.running.add(workflow_id)
            return None
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue[workflow_id] = gate
        return gate

    def is_pending(self, workflow_id: str) -> bool:
        return workflow_id in self.queue

    def withdraw(self, workflow_id: str, exc: BaseException) -> None:
        gate = self.queue.pop(workflow_id, None)
        if gate is not None and not gate.done():
            gate.set_exception(exc)

    def release(self, workflow_id: str) -> None:
        self.running.discard(workflow_id)
        self.queue.pop(workflow_id, None)
        self._promote()

    def _promote(self) -> None:
        while self.queue and self._has_slot():
            workflow_id, gate = self.queue.popitem(last=False)
            self.running.add(workflow_id)
            if not gate.done():
                gate.set_result(None)


__all__ = ["EXEMPT", "Admission"]
