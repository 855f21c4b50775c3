"""Workflow statuses."""

from __future__ import annotations

import enum


class WorkflowStatus(str, enum.Enum):
    """The status of a workflow. A ``str`` enum: ``WorkflowStatus.RUNNING == "RUNNING"``.

    * ``RUNNING``: a manager is executing it.
    * ``PENDING``: queued behind ``max_running_workflows``.
    * ``SUCCESSFUL``: finished; its output is stored.
    * ``FAILED``: a task failed and nothing caught the error; it can be resumed.
    * ``RESUMABLE``: it was running or pending when its manager stopped (a crash,
      a cluster restart); ``resume`` continues it from its checkpoints.
    * ``CANCELED``: canceled by the user; it cannot be resumed.
    * ``NONE``: no such workflow (never stored).
    """

    NONE = "NONE"
    RUNNING = "RUNNING"
    CANCELED = "CANCELED"
    SUCCESSFUL = "SUCCESSFUL"
    FAILED = "FAILED"
    RESUMABLE = "RESUMABLE"
    PENDING = "PENDING"

    @classmethod
    def non_terminating_status(cls) -> tuple[WorkflowStatus, ...]:
        return (cls.RUNNING, cls.PENDING)

    def __str__(self) -> str:
        return self.value


__all__ = ["WorkflowStatus"]
