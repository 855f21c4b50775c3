"""Awaitable twins of the workflow API, for asyncio applications.

Each function has the name and arguments of its blocking twin in
``ray_workflows``; none of them blocks the event loop::

    import ray_workflows as workflow

    async def handler():
        ref = await workflow.aio.run_async(dag, workflow_id="order-1")
        status = await workflow.aio.get_status("order-1")
        return await ref

Each checks its arguments and calls :mod:`ray_workflows._core.client`, which starts
workflows and talks to the manager.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterable
from typing import Any

from ray_workflows._core import client
from ray_workflows._core.client import get
from ray_workflows._core.ids import check_id
from ray_workflows._core.settings import duration
from ray_workflows._core.status import WorkflowStatus


async def run_async(
    dag: Any,
    *args: Any,
    workflow_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Start a workflow; return the ``ray.ObjectRef`` of its output."""
    return await client.run_async(dag, args, kwargs, workflow_id, metadata)


async def run(
    dag: Any,
    *args: Any,
    workflow_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Run a workflow to completion and return its output."""
    return await get(await client.run_async(dag, args, kwargs, workflow_id, metadata))


async def resume_async(workflow_id: str) -> Any:
    """Resume a stored workflow; return the ``ray.ObjectRef`` of its output."""
    return await client.resume(check_id(workflow_id))


async def resume(workflow_id: str) -> Any:
    """Resume a stored workflow from its checkpoints and return its output."""
    return await get(await resume_async(workflow_id))


class Resumed(list[tuple[str, Any]]):
    """What ``resume_all`` returns: ``(workflow_id, ObjectRef)`` pairs, in the order
    they were resumed; ``get(workflow_id)`` finds one (the Ray 1.x API returned a
    dict)."""

    def get(self, workflow_id: str, default: Any = None) -> Any:
        return next((ref for wid, ref in self if wid == workflow_id), default)


async def resume_all(include_failed: bool = False) -> Resumed:
    """Resume every RESUMABLE workflow (and FAILED ones with ``include_failed``)."""
    return Resumed(await client.resume_all(include_failed))


async def cancel(workflow_id: str) -> None:
    """Cancel a running or pending workflow; its checkpoints are kept."""
    await client.call("cancel", check_id(workflow_id))


async def send_event(
    workflow_id: str, key: str, payload: Any = None, *, event_id: str | None = None
) -> str:
    """Store an event for ``workflow_id`` under ``key`` and return its id once it is
    durable. A waiting ``wait_for_event("http", event_key=key)`` receives it; an event
    that arrives before anyone waits is kept. The same ``event_id`` twice is stored
    (and delivered) once; with another payload it is ``EventConflictError``. An unknown
    workflow is ``WorkflowNotFoundError``. Without an ``event_id`` one is made here,
    before the manager is called: a call Ray replays after a manager restart stores
    the event once."""
    check_id(workflow_id)
    if not isinstance(key, str) or not key or "/" in key:
        raise ValueError(f"event key must be a non-empty string without '/', got {key!r}")
    event_id = uuid.uuid4().hex if event_id is None else check_id(event_id, "event_id")
    event: str = await client.call("send_event", workflow_id, key, payload, event_id)
    return event


async def delete(workflow_id: str) -> None:
    """Delete a workflow that is not running; ``WorkflowStillActiveError`` otherwise."""
    await client.call("delete", check_id(workflow_id))


FINISHED = (WorkflowStatus.SUCCESSFUL, WorkflowStatus.FAILED, WorkflowStatus.CANCELED)


async def delete_finished(
    older_than: datetime.timedelta | float,
    *,
    statuses: Iterable[WorkflowStatus | str] | WorkflowStatus | str = FINISHED,
) -> list[str]:
    """Delete every finished workflow (of ``statuses``: SUCCESSFUL, FAILED, CANCELED)
    that ended more than ``older_than`` (a timedelta, or seconds) ago, as ``delete``
    does; return the ids deleted. Running workflows are never touched."""
    seconds = duration("older_than", older_than)
    deleted: list[str] = await client.call("delete_finished", seconds, _finished(statuses))
    return deleted


def _finished(value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, WorkflowStatus)):
        value = [value]
    if not isinstance(value, Iterable):
        raise TypeError(f"statuses must be a status or an iterable of them, got {value!r}")
    statuses = {s.value if isinstance(s, WorkflowStatus) else s for s in value}
    wrong = sorted(map(repr, statuses - {s.value for s in FINISHED}))
    if wrong or not statuses:
        raise ValueError(
            "delete_finished deletes only finished workflows: statuses must be some of "
            f"SUCCESSFUL, FAILED, CANCELED, got {', '.join(wrong) or 'none'}. A running "
            "workflow is canceled with workflow.cancel first."
        )
    return tuple(sorted(statuses))


async def get_output_async(
    workflow_id: str, task_id: str | None = None, *, name: str | None = None
) -> Any:
    """The ``ray.ObjectRef`` of a workflow's output, or of one task's (``task_id``)."""
    task_id = task_id if task_id is not None else name
    return await client.ref("get_output", check_id(workflow_id), task_id)


async def get_output(
    workflow_id: str, task_id: str | None = None, *, name: str | None = None
) -> Any:
    """A workflow's output (waits while it runs), or one task's with ``task_id``."""
    return await get(await get_output_async(workflow_id, task_id=task_id, name=name))


async def get_status(workflow_id: str) -> WorkflowStatus:
    """The workflow's status; raises ``WorkflowNotFoundError`` for an unknown id."""
    status: WorkflowStatus = await client.call("get_status", check_id(workflow_id))
    return status


async def get_metadata(
    workflow_id: str, task_id: str | None = None, *, name: str | None = None
) -> dict[str, Any]:
    """Metadata of a workflow (status, user_metadata, stats) or of one of its tasks."""
    task_id = task_id if task_id is not None else name
    result: dict[str, Any] = await client.call("get_metadata", check_id(workflow_id), task_id)
    return result


def _statuses(value: Any) -> set[WorkflowStatus] | None:
    """Normalise a list_all status filter: None, a status, a str, or a set of them."""
    if value is None:
        return None
    if isinstance(value, (str, WorkflowStatus)):
        value = {value}
    if not isinstance(value, Iterable):
        raise TypeError(f"status_filter must be a status, a str or a set of them, got {value!r}")
    statuses = set()
    for item in value:
        try:
            statuses.add(WorkflowStatus(item))
        except ValueError:
            raise ValueError(
                f"Unknown workflow status {item!r}; valid ones are "
                f"{[s.value for s in WorkflowStatus if s is not WorkflowStatus.NONE]}."
            ) from None
    if WorkflowStatus.NONE in statuses:
        raise ValueError("list_all cannot filter on NONE: such workflows do not exist.")
    return statuses


async def list_all(status_filter: Any = None) -> list[tuple[str, WorkflowStatus]]:
    """``(workflow_id, status)`` of every stored workflow, optionally filtered by status."""
    result: list[tuple[str, WorkflowStatus]] = await client.call(
        "list_all", _statuses(status_filter)
    )
    return result


__all__ = [
    "Resumed",
    "cancel",
    "delete",
    "delete_finished",
    "get",
    "get_metadata",
    "get_output",
    "get_output_async",
    "get_status",
    "list_all",
    "resume",
    "resume_all",
    "resume_async",
    "run",
    "run_async",
    "send_event",
]
