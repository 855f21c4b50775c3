"""ray-workflows: durable task graphs for Ray.

A drop-in for the ``ray.workflow`` module that Ray removed after 2.47::

    import ray
    import ray_workflows as workflow

    @ray.remote
    def add(a: int, b: int) -> int:
        return a + b

    assert workflow.run(add.bind(100, add.bind(1, 0)), workflow_id="w1") == 101

Every finished task's output is checkpointed; after a crash the workflow resumes
from storage and no finished task runs again. Every call has an awaitable twin
in :mod:`ray_workflows.aio`.
"""

from ray_workflows import aio, event_listener, exceptions
from ray_workflows._core.context import get_current_task_id, get_current_workflow_id
from ray_workflows._core.event_tasks import sleep, wait, wait_for_event
from ray_workflows._core.events import EventListener
from ray_workflows._core.options import options
from ray_workflows._core.status import WorkflowStatus
from ray_workflows._core.steps import step
from ray_workflows._core.virtual_actor import get_actor, virtual_actor
from ray_workflows.api import (
    cancel,
    continuation,
    create,
    delete,
    delete_finished,
    get_metadata,
    get_output,
    get_output_async,
    get_status,
    init,
    list_all,
    resume,
    resume_all,
    resume_async,
    run,
    run_async,
    send_event,
)
from ray_workflows.exceptions import (
    WorkflowCancellationError,
    WorkflowError,
    WorkflowExecutionError,
    WorkflowNotFoundError,
    WorkflowNotResumableError,
    WorkflowQueueFullError,
    WorkflowRunningElsewhereError,
    WorkflowStillActiveError,
)
from ray_workflows.storage import Storage

NONE = WorkflowStatus.NONE
RUNNING = WorkflowStatus.RUNNING
PENDING = WorkflowStatus.PENDING
SUCCESSFUL = WorkflowStatus.SUCCESSFUL
FAILED = WorkflowStatus.FAILED
RESUMABLE = WorkflowStatus.RESUMABLE
CANCELED = WorkflowStatus.CANCELED

__version__ = "0.1.0"

__all__ = [
    "CANCELED",
    "EventListener",
    "FAILED",
    "NONE",
    "PENDING",
    "RESUMABLE",
    "RUNNING",
    "SUCCESSFUL",
    "Storage",
    "WorkflowCancellationError",
    "WorkflowError",
    "WorkflowExecutionError",
    "WorkflowNotFoundError",
    "WorkflowNotResumableError",
    "WorkflowQueueFullError",
    "WorkflowRunningElsewhereError",
    "WorkflowStatus",
    "WorkflowStillActiveError",
    "aio",
    "cancel",
    "continuation",
    "create",
    "delete",
    "delete_finished",
    "event_listener",
    "exceptions",
    "get_actor",
    "get_current_task_id",
    "get_current_workflow_id",
    "get_metadata",
    "get_output",
    "get_output_async",
    "get_status",
    "init",
    "list_all",
    "options",
    "resume",
    "resume_all",
    "resume_async",
    "run",
    "run_async",
    "send_event",
    "sleep",
    "step",
    "virtual_actor",
    "wait",
    "wait_for_event",
]
