"""Retention: deleting finished workflows once they are old enough.

A workflow's age is the time since it ended: the ``end_time`` its ``meta.json``
holds, written when it succeeded, failed or was canceled (a FAILED workflow that is
resumed and ends again is as old as its last end). Only workflows whose stored
status is final are candidates, found in their statuses' parts of the status index;
each is deleted as ``workflow.delete`` deletes it, under its id's lock, after its
status and end time are read again there (:meth:`Management.delete_ended`). A
workflow running or resumed anywhere is never touched.

A pass remembers the end time of every workflow it found too young, so a periodic
pass with nothing to delete costs one listing per final status, and reads a
``meta.json`` only for workflows that finished since the last pass. (An end time
only grows, so a remembered one can only make a workflow look younger than it is.)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Collection

from ray_workflows._core.log import get_logger
from ray_workflows._core.management import FINAL, ended_at
from ray_workflows._core.status_index import listed_by_status
from ray_workflows._core.store import WorkflowStore

log = get_logger()

#: How many workflows one pass reads or deletes at once.
CONCURRENCY = 16
#: The periodic pass runs every quarter of the retention period, within these bounds
#: (seconds): often enough that nothing stays much longer than asked, rarely enough
#: that an idle manager does next to nothing.
PERIOD_BOUNDS = (0.5, 300.0)

#: ``Management.delete_ended``: (workflow id, ended before, statuses) -> deleted.
DeleteEnded = Callable[[str, float, Collection[str]], Awaitable[bool]]


def period(retention: float) -> float:
    low, high = PERIOD_BOUNDS
    return min(max(retention / 4, low), high)


class Retention:
    """Deletes the finished workflows of one storage that ended long enough ago."""

    def __init__(self, store: WorkflowStore, delete_ended: DeleteEnded) -> None:
        self.store = store
        self.delete_ended = delete_ended
        self._ended: dict[str, float] = {}  # wid -> end time, of those found too young
        self._keeper: asyncio.Task[None] | None = None
        self.retention: float | None = None

    async def delete_finished(
        self, older_than: float, statuses: Collection[str] = FINAL
    ) -> list[str]:
        """Delete every workflow whose stored status is one of ``statuses`` (final ones)
        and that ended more than ``older_than`` seconds ago; the ids deleted, sorted."""
        before = time.time() - older_than
        found = await listed_by_status(self.store.storage, statuses)
        for wid in [w for w in self._ended if w not in found]:  # deleted meanwhile
            del self._ended[wid]
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(wid: str) -> bool:
            async with limit:
                if self._ended.get(wid, -math.inf) > before:
                    return False
                try:
                    meta = await self.store.read_meta(wid)
                except Exception as exc:  # a corrupt meta.json: left for a person to look at
                    log.warning("retention.unreadable_meta", workflow_id=wid, error=str(exc))
                    return False
                if meta is None or meta.get("status") not in statuses:
                    return False  # being started again, or a marker its status change left
                ended = ended_at(meta)
                if ended > before:
                    self._ended[wid] = ended
                    return False
                self._ended.pop(wid, None)
                return await self.delete_ended(wid, before, statuses)

        wids = sorted(found)
        gone = await asyncio.gather(*map(one, wids))
        deleted = [wid for wid, removed in zip(wids, gone, strict=True) if removed]
        if deleted:
            log.info("retention.deleted", workflows=len(deleted), older_than=older_than)
        return deleted

    def keep(self, retention: float | None) -> None:
        """Delete finished workflows older than ``retention`` seconds from now on, in a
        periodic pass (``None``: keep them forever, and stop the pass)."""
        if retention == self.retention:
            return
        self.stop()
        self.retention = retention
        if retention is not None:
            self._keeper = asyncio.get_running_loop().create_task(self._keep(retention))

    async def _keep(self, retention: float) -> None:
        every = period(retention)
        while True:
            try:
                await self.delete_finished(retention)
            except Exception:  # storage trouble: tried again next period
                log.exception("retention.pass_failed")
            await asyncio.sleep(every)

    def stop(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        self.retention = None


__all__ = ["CONCURRENCY", "PERIOD_BOUNDS", "Retention", "period"]
