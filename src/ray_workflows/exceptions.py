"""The exception tree of ray-workflows.

Every error a user can act on has its own class; all of them derive from
:class:`WorkflowError`::

    WorkflowError
    ├── WorkflowExecutionError          the workflow failed (``__cause__`` is the task's error)
    ├── WorkflowCancellationError       the workflow was canceled while it was awaited
    ├── WorkflowNotFoundError           no workflow with that id in the storage (a ValueError)
    │   └── NothingToResumeError        resume of an unknown id (a WorkflowNotResumableError)
    ├── WorkflowNotResumableError       resume was asked of a workflow that cannot resume
    ├── WorkflowFinishedError           an event was sent to a workflow that will never wait again
    ├── WorkflowStillActiveError        the operation needs a workflow that is not running
    ├── WorkflowAlreadyRunningError     run/resume of a workflow that is live
    │   └── WorkflowRunningElsewhereError  another manager sharing the storage holds its lease
    ├── WorkflowQueueFullError          max_pending_workflows are already waiting (a queue.Full)
    ├── MailboxFullError                a workflow's mailbox holds mailbox_limit undelivered events
    ├── TaskNotFoundError               no task with that id in the workflow (a ValueError)
    ├── TaskIdCollisionError            two tasks of one workflow would share an id
    ├── CheckpointError                 a stored checkpoint is missing, torn or unreadable
    │   └── RecordSignatureError        a record fails its signature check (never unpickled)
    └── StorageError                    the storage backend failed
        ├── UnknownStorageError         no plugin for that storage URI scheme
        ├── ClusterStorageError         a Ray task or actor chose another storage than its cluster's
        └── TransientStorageError       a failure that may pass: retry later

Exceptions cross process boundaries intact: each one pickles with its
arguments, and the chained ``__cause__`` travels with it.

Where Ray 2.47 raised a built-in exception, ours also derives from it (noted above),
so an ``except ValueError`` or ``except queue.Full`` written for it still catches.
"""

from __future__ import annotations

import pickle
import queue
from typing import Any


class WorkflowWarning(UserWarning):
    """Warnings emitted by ray-workflows."""

    def __reduce__(self) -> Any:
        return (_rebuild_warning, (type(self), self.args, _picklable(self.__cause__)))


def _rebuild_warning(
    cls: type[WorkflowWarning], args: tuple[Any, ...], cause: BaseException | None
) -> WorkflowWarning:
    warning = cls(*args)
    warning.__cause__ = cause
    return warning


class WorkflowError(Exception):
    """Base class of every ray-workflows error."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        for key, value in details.items():
            setattr(self, key, value)

    def __reduce__(self) -> Any:
        # Rebuild with the same message and details and keep the explicit cause, so
        # that errors raised in an actor or a worker arrive with it. The implicit
        # __context__ is not carried: it is often a process-local wrapper (Ray's).
        return (_rebuild, (type(self), self.message, self.details, _picklable(self.__cause__)))

    def __str__(self) -> str:
        return self.message


def _picklable(exc: BaseException | None) -> BaseException | None:
    if exc is None:
        return None
    try:
        pickle.dumps(exc)
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__qualname__}: {exc}")


def _rebuild(
    cls: type[WorkflowError], message: str, details: dict[str, Any], cause: BaseException | None
) -> WorkflowError:
    exc = cls.__new__(cls)
    WorkflowError.__init__(exc, message, **details)
    exc.__cause__ = cause
    cause_bytes = details.get("cause_bytes")
    if exc.__cause__ is None and cause_bytes:
        # The task's own exception travels pickled, so that the engine never needs
        # the user's classes; it is unpickled here, in the caller, where they exist.
        try:
            exc.__cause__ = pickle.loads(cause_bytes)
        except Exception as load_error:
            exc.__cause__ = RuntimeError(
                f"the task's exception could not be unpickled: {load_error}"
            )
    return exc


class WorkflowExecutionError(WorkflowError):
    """The workflow failed: a task raised and no task caught the error."""

    @classmethod
    def of(cls, workflow_id: str, task_id: str, cause: BaseException) -> WorkflowExecutionError:
        exc = cls(
            f"Workflow {workflow_id!r} failed: task {task_id!r} raised "
            f"{type(cause).__name__}: {cause}",
            workflow_id=workflow_id,
            task_id=task_id,
        )
        exc.__cause__ = cause
        return exc


class WorkflowCancellationError(WorkflowError):
    """The workflow was canceled."""

    @classmethod
    def of(cls, workflow_id: str) -> WorkflowCancellationError:
        return cls(f"Workflow {workflow_id!r} was canceled.", workflow_id=workflow_id)


class WorkflowNotFoundError(WorkflowError, ValueError):
    """No workflow with this id exists in the configured storage.

    Also a ``ValueError``: Ray 2.47 raised one for an unknown id in ``get_output`` and
    ``get_metadata``, so code that catches it keeps working."""

    @classmethod
    def of(cls, workflow_id: str, storage: str = "") -> WorkflowNotFoundError:
        where = f" in storage {storage!r}" if storage else ""
        return cls(
            f"No workflow {workflow_id!r}{where}. Check the id, or the storage that "
            "workflow.init(storage=...) or RAY_WORKFLOWS_STORAGE points at; "
            "workflow.list_all() lists the known ones.",
            workflow_id=workflow_id,
        )


class WorkflowNotResumableError(WorkflowError):
    """The workflow cannot be resumed (canceled, or its stored plan is incomplete)."""


class WorkflowFinishedError(WorkflowError):
    """The workflow has finished for good (SUCCESSFUL or CANCELED): an event sent to it
    would never be delivered, so it is not stored."""


class EventConflictError(WorkflowError):
    """An event id (``event_id``, or an HTTP ``Idempotency-Key``) sent again with
    another payload: the first event stands, the second is refused, not stored."""


class WorkflowStillActiveError(WorkflowError):
    """The operation needs a workflow that is not running or pending."""

    @classmethod
    def of(cls, operation: str, workflow_id: str) -> WorkflowStillActiveError:
        return cls(
            f"Cannot {operation} workflow {workflow_id!r}: it is still running or pending. "
            f"Cancel it first with workflow.cancel({workflow_id!r}).",
            workflow_id=workflow_id,
            operation=operation,
        )


class WorkflowAlreadyRunningError(WorkflowError):
    """A workflow with this id is already running or pending in this cluster."""


class WorkflowRunningElsewhereError(WorkflowAlreadyRunningError):
    """Another manager (another cluster sharing the storage) holds the workflow's lease."""


class WorkflowQueueFullError(WorkflowError, queue.Full):
    """The pending queue is full; the workflow was not stored.

    Also a ``queue.Full``, which Ray 2.47 raised here."""


class TaskNotFoundError(WorkflowError, ValueError):
    """The workflow has no task with this id.

    Also a ``ValueError``, which Ray 2.47 raised for an unknown task id."""


class TaskIdCollisionError(WorkflowError, ValueError):
    """Two tasks of one workflow would get the same task id."""


class CheckpointError(WorkflowError):
    """A checkpoint is missing, torn or cannot be read."""


class StorageError(WorkflowError):
    """The storage backend failed; the message names the storage URI (without secrets)."""


class UnknownStorageError(StorageError, ValueError):
    """No storage plugin is registered for a URI scheme."""


class ClusterStorageError(StorageError, ValueError):
    """A Ray task or actor asked for another storage than the one its cluster's
    workflows use (``workflow.init`` in the driver chose it). A task or actor uses
    the cluster's storage without being told; a second storage is chosen in a driver."""


class TransientStorageError(StorageError):
    """The storage failed in a way that may pass by itself: a timeout, a lost
    connection, throttling, a server error (HTTP 5xx), a full disk. The same call may
    succeed later. Any other :class:`StorageError` is permanent until someone fixes
    the cause (credentials, permissions, a missing bucket or directory)."""


class MailboxFullError(WorkflowError):
    """The workflow's mailbox already holds ``mailbox_limit`` events that no task has
    consumed; the event was not stored. Send it again once the workflow has taken
    some, or raise ``RAY_WORKFLOWS_MAILBOX_LIMIT``."""


class NothingToResumeError(WorkflowNotFoundError, WorkflowNotResumableError):
    """``resume`` of an id with nothing stored: a :class:`WorkflowNotFoundError`, and a
    :class:`WorkflowNotResumableError` as Ray 2.47 raised there."""


class RecordSignatureError(CheckpointError):
    """A record in storage fails its signature check (the cluster signs its records:
    ``RAY_WORKFLOWS_SIGNING_KEY``): it is not signed, signed with another key, changed
    after it was written, or moved from another storage key. It is never unpickled;
    the message names the storage key and what to do."""


__all__ = [
    "CheckpointError",
    "ClusterStorageError",
    "EventConflictError",
    "MailboxFullError",
    "NothingToResumeError",
    "RecordSignatureError",
    "StorageError",
    "TaskIdCollisionError",
    "TaskNotFoundError",
    "TransientStorageError",
    "UnknownStorageError",
    "WorkflowAlreadyRunningError",
    "WorkflowCancellationError",
    "WorkflowError",
    "WorkflowExecutionError",
    "WorkflowFinishedError",
    "WorkflowNotFoundError",
    "WorkflowNotResumableError",
    "WorkflowQueueFullError",
    "WorkflowRunningElsewhereError",
    "WorkflowStillActiveError",
    "WorkflowWarning",
]
