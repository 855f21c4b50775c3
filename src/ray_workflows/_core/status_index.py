"""The status index: one empty marker per workflow, ``status/<STATUS>/<wid>``.

A workflow's status changes by writing the new marker, then ``meta.json``, then
removing the old marker (:meth:`ray_workflows._core.store.WorkflowStore.swap_meta`).
A crash in between leaves two markers; ``meta.json`` says which one counts.

Markers are grouped by status, so a reader that wants only some statuses lists only
their prefixes: the recovery sweep, which looks for RUNNING and PENDING workflows,
does not read one key per finished workflow, however many are kept. Such a partial
listing cannot see a second marker under a status it did not list, so every
workflow it finds is settled from ``meta.json``: the cost follows the number of
workflows with the statuses asked for, not the size of the index.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from ray_workflows._core.keys import STATUS_PREFIX, parse_status_key
from ray_workflows._core.log import get_logger
from ray_workflows._core.status import WorkflowStatus
from ray_workflows.storage import Storage

log = get_logger()

STORED_STATUSES = (
    WorkflowStatus.RUNNING,
    WorkflowStatus.PENDING,
    WorkflowStatus.SUCCESSFUL,
    WorkflowStatus.FAILED,
    WorkflowStatus.CANCELED,
)
_KNOWN = {status.value for status in STORED_STATUSES}
#: How many ``meta.json`` reads a partial listing settles at once.
SETTLE_CONCURRENCY = 32

#: Reads a workflow's ``meta.json`` (or, without one, what its plan's header says).
MetaOf = Callable[[str], Awaitable[dict[str, Any] | None]]


async def listed(storage: Storage, prefix: str) -> dict[str, set[str]]:
    """wid -> the statuses of its markers under ``prefix`` (the whole index, or one
    status's part). A key that is not ``status/<STATUS>/<wid>`` (a folder an S3
    console made, a stray file) is logged and skipped."""
    found: dict[str, set[str]] = {}
    for key in await storage.list(prefix):
        try:
            status, wid = parse_status_key(key)
        except ValueError:
            status, wid = "", ""
        if status not in _KNOWN or not wid or "/" in wid:
            log.warning("status.stray_key", key=key)
            continue
        found.setdefault(wid, set()).add(status)
    return found


async def listed_by_status(storage: Storage, statuses: Collection[str]) -> dict[str, set[str]]:
    """:func:`listed` for the markers of ``statuses`` only: one listing per status."""
    found: dict[str, set[str]] = {}
    for status in dict.fromkeys(statuses):
        for wid, marks in (await listed(storage, f"{STATUS_PREFIX}{status}/")).items():
            found.setdefault(wid, set()).update(marks)
    return found


async def _settled(wid: str, meta_of: MetaOf) -> str | None:
    try:
        meta = await meta_of(wid)
    except Exception as exc:  # a corrupt meta.json: this one is left out
        log.warning("status.unreadable_meta", workflow_id=wid, error=str(exc))
        return None
    return None if meta is None else str(meta["status"])


async def read_index(
    storage: Storage, meta_of: MetaOf, statuses: Collection[str] | None = None
) -> dict[str, str]:
    """wid -> stored status. ``statuses=None``: from the whole index, a workflow with
    two markers settled from ``meta.json``. Else only the workflows whose stored
    status is one of ``statuses``, each settled from ``meta.json`` (see the module's
    docs). What cannot be read is logged and skipped, never fatal to the scan."""
    if statuses is None:
        found = await listed(storage, STATUS_PREFIX)
        unsure = [wid for wid, marks in found.items() if len(marks) > 1]
        result = {wid: next(iter(marks)) for wid, marks in found.items() if len(marks) == 1}
    else:
        unsure, result = list(await listed_by_status(storage, statuses)), {}
    limit = asyncio.Semaphore(SETTLE_CONCURRENCY)

    async def settle(wid: str) -> str | None:
        async with limit:
            return await _settled(wid, meta_of)

    for wid, settled in zip(unsure, await asyncio.gather(*map(settle, unsure)), strict=True):
        if settled is not None and (statuses is None or settled in statuses):
            result[wid] = settled
    return result


__all__ = ["STORED_STATUSES", "listed", "listed_by_status", "read_index"]
