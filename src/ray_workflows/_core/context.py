"""The context of the task that is running in this worker (a contextvar, not a global)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskContext:
    workflow_id: str
    task_id: str
    attempt: int = 0


_current: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "ray_workflows_task", default=None
)


def current() -> TaskContext | None:
    return _current.get()


@contextlib.contextmanager
def running(ctx: TaskContext) -> Iterator[None]:
    token = _current.set(ctx)
    try:
        yield
    finally:
        _current.reset(token)


def get_current_workflow_id() -> str:
    """The id of the workflow whose task is running here; raises outside a workflow task."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("get_current_workflow_id() is only valid inside a workflow task.")
    return ctx.workflow_id


def get_current_task_id() -> str:
    """The id of the workflow task running here; raises outside a workflow task."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("get_current_task_id() is only valid inside a workflow task.")
    return ctx.task_id


__all__ = ["TaskContext", "current", "get_current_task_id", "get_current_workflow_id", "running"]
