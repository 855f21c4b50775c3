"""The blocking workflow API; each call drives its twin in :mod:`ray_workflows.aio`
through the bridge loop, but for ``init`` and ``run_async``, which call
:mod:`ray_workflows._core.client` from the caller's thread."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any

import ray
from ray.dag import DAGNode, FunctionNode

from ray_workflows import aio
from ray_workflows._core import bridge, client
from ray_workflows._core.attempts import in_task
from ray_workflows._core.status import WorkflowStatus


def init(
    storage: str | None = None,
    *,
    max_running_workflows: int | None = None,
    max_pending_workflows: int | None = None,
    auto_resume: bool | None = None,
    clock: str | None = None,
    retention: datetime.timedelta | float | None = None,
    runtime_env: str | None = None,
) -> None:
    """Choose the storage (a path, ``file://``, ``memory://``, ``s3://...``) and start the
    manager. Optional: the first workflow call initialises with the defaults.

    Without ``storage`` (and ``RAY_WORKFLOWS_STORAGE``), a driver joining a Ray cluster
    uses the storage the cluster's workflows use already. A Ray task or actor needs no
    ``init``: it uses its driver's storage and settings, and asking it for another
    storage raises ``ClusterStorageError`` (choose a second storage in a driver).

    ``max_running_workflows``/``max_pending_workflows`` limit how many workflows run and
    wait (-1: unlimited). ``auto_resume`` (default True, or ``RAY_WORKFLOWS_AUTO_RESUME``)
    makes a starting manager resume the workflows its storage says were running.
    ``clock`` names the clock plugin for sleeps and timers: ``"system"`` (default, or
    ``RAY_WORKFLOWS_CLOCK``), or ``"virtual"`` for tests, where time jumps ahead
    whenever every workflow waits on a timer. ``retention`` (a timedelta or seconds;
    default None, or ``RAY_WORKFLOWS_RETENTION`` in seconds) makes the manager delete
    finished workflows that ended longer ago than that, as ``delete_finished`` does;
    None keeps them until deleted (and leaves a running manager's retention as it is).
    ``runtime_env`` says which environment tasks run with: ``"recorded"`` (default, or
    ``RAY_WORKFLOWS_RUNTIME_ENV``), the one recorded when their workflow was submitted,
    or ``"current"``, the cluster's (see the guide's "Dependencies").

    Every other knob (placements, hosting, the lease ttl) comes from its
    ``RAY_WORKFLOWS_*`` environment variable in this process. All are read here once
    (or at the first workflow call) and passed to the manager, whose own environment
    does not matter: a later change of the environment takes effect at the next ``init``.

    >>> workflow.init("/mnt/shared/workflows")
    """
    client.init(
        storage,
        max_running_workflows=max_running_workflows,
        max_pending_workflows=max_pending_workflows,
        auto_resume=auto_resume,
        clock=clock,
        retention=retention,
        runtime_env=runtime_env,
    )


def run(
    dag: Any,
    *args: Any,
    workflow_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Run a workflow to completion and return its output.

    ``args``/``kwargs`` feed the DAG's ``InputNode``. An id that is already stored
    resumes that workflow (its stored DAG, not this one), or joins it if it runs.

    >>> workflow.run(add.bind(1, 2), workflow_id="sum-1")
    3
    """
    ref = run_async(dag, *args, workflow_id=workflow_id, metadata=metadata, **kwargs)
    return bridge.run(client.get(ref))


def run_async(
    dag: Any,
    *args: Any,
    workflow_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    **kwargs: Any,
) -> ray.ObjectRef[Any]:
    """Start a workflow and return a ``ray.ObjectRef`` of its output: ``ray.get(ref)``
    or ``await ref``. Errors in the DAG or arguments raise here; failures while
    running raise from the ref."""
    ref: ray.ObjectRef[Any] = client.run_blocking(dag, args, kwargs, workflow_id, metadata)
    return ref


def resume(workflow_id: str) -> Any:
    """Resume a stored workflow from its checkpoints and return its output."""
    return bridge.run(aio.resume(workflow_id))


def resume_async(workflow_id: str) -> ray.ObjectRef[Any]:
    """Resume a stored workflow; return a ``ray.ObjectRef`` of its output."""
    ref: ray.ObjectRef[Any] = bridge.run(aio.resume_async(workflow_id))
    return ref


def get_output(workflow_id: str, task_id: str | None = None, *, name: str | None = None) -> Any:
    """The workflow's output (waits while it runs), or one task's with ``task_id``
    (``name``, the older API's word for it, may be given instead)."""
    return bridge.run(aio.get_output(workflow_id, task_id=task_id, name=name))


def get_output_async(
    workflow_id: str, task_id: str | None = None, *, name: str | None = None
) -> ray.ObjectRef[Any]:
    """A ``ray.ObjectRef`` of the workflow's (or one task's) output."""
    ref: ray.ObjectRef[Any] = bridge.run(
        aio.get_output_async(workflow_id, task_id=task_id, name=name)
    )
    return ref


def get_status(workflow_id: str) -> WorkflowStatus:
    """The workflow's status; ``WorkflowNotFoundError`` for an unknown id."""
    return bridge.run(aio.get_status(workflow_id))


def get_metadata(
    workflow_id: str, task_id: str | None = None, *, name: str | None = None
) -> dict[str, Any]:
    """Metadata of the workflow (``status``, ``user_metadata``, ``stats``) or of one task
    (``task_options``, ``user_metadata``, ``stats``)."""
    return bridge.run(aio.get_metadata(workflow_id, task_id, name=name))


def list_all(status_filter: Any = None) -> list[tuple[str, WorkflowStatus]]:
    """``(workflow_id, status)`` pairs, optionally only those with the given status(es)."""
    return bridge.run(aio.list_all(status_filter))


def resume_all(include_failed: bool = False) -> aio.Resumed:
    """Resume every RESUMABLE workflow (and FAILED ones with ``include_failed``); return
    ``(workflow_id, ObjectRef of its output)`` pairs, previously running ones first
    (``.get(workflow_id)`` finds one, as the older API's dict did)."""
    result: aio.Resumed = bridge.run(aio.resume_all(include_failed))
    return result


def cancel(workflow_id: str) -> None:
    """Cancel a running or pending workflow: its Ray tasks are stopped, its checkpoints
    kept, and it can no longer be resumed. A finished workflow is left unchanged."""
    bridge.run(aio.cancel(workflow_id))


def send_event(
    workflow_id: str, key: str, payload: Any = None, *, event_id: str | None = None
) -> str:
    """Store an event for ``workflow_id`` under ``key``; return its id once durable.

    >>> workflow.send_event("order-7", "approved", {"by": "alice"})
    """
    event: str = bridge.run(aio.send_event(workflow_id, key, payload, event_id=event_id))
    return event


def delete(workflow_id: str) -> None:
    """Delete everything stored for a workflow; ``WorkflowStillActiveError`` if it runs."""
    bridge.run(aio.delete(workflow_id))


def delete_finished(
    older_than: datetime.timedelta | float,
    *,
    statuses: Iterable[WorkflowStatus | str] | WorkflowStatus | str = aio.FINISHED,
) -> list[str]:
    """Delete every finished workflow that ended more than ``older_than`` (a timedelta,
    or seconds) ago, as ``delete`` deletes one: its records, outputs, events, index
    entry and lease. ``statuses`` narrows it to some of SUCCESSFUL, FAILED and
    CANCELED. Returns the ids deleted; running workflows are never touched.

    >>> workflow.delete_finished(datetime.timedelta(days=7))
    ['order-1', 'order-2']
    """
    deleted: list[str] = bridge.run(aio.delete_finished(older_than, statuses=statuses))
    return deleted


def continuation(dag_node: Any) -> Any:
    """Return ``dag_node`` from a task to make it the task's result (a dynamic workflow).

    Inside a workflow task it returns the DAG, which the engine runs in place of the
    task. Anywhere else it runs the DAG with plain Ray and returns its value, so the
    same function also works outside workflows.
    """
    if not isinstance(dag_node, DAGNode):
        raise TypeError(f"continuation() needs a Ray DAG built with .bind(), got {dag_node!r}")
    if in_task.get():
        return dag_node
    return ray.get(_execute_plain(dag_node))


def _execute_plain(root: DAGNode) -> Any:
    """Execute a DAG of FunctionNodes as plain Ray tasks (no durability)."""
    refs: dict[str, Any] = {}
    remotes: dict[int, Any] = {}
    stack: list[tuple[DAGNode, bool]] = [(root, False)]
    while stack:
        node, ready = stack.pop()
        uid = node.get_stable_uuid()
        if uid in refs:
            continue
        if not isinstance(node, FunctionNode):
            raise TypeError(
                f"continuation() outside a workflow supports function nodes only, "
                f"got {type(node).__name__}"
            )
        children = node._get_all_child_nodes()
        if not ready:
            stack.append((node, True))
            stack.extend((c, False) for c in children if c.get_stable_uuid() not in refs)
            continue

        def sub(value: Any) -> Any:
            if isinstance(value, DAGNode):
                return refs[value.get_stable_uuid()]
            if isinstance(value, list):
                return [sub(v) for v in value]
            if isinstance(value, tuple):
                return tuple(sub(v) for v in value)
            if isinstance(value, dict):
                return {k: sub(v) for k, v in value.items()}
            return value

        remote = remotes.get(id(node._body))
        if remote is None:
            remote = remotes[id(node._body)] = ray.remote(node._body)
        opts = {k: v for k, v in node.get_options().items() if k != "_labels"}
        call = remote.options(**opts) if opts else remote
        refs[uid] = call.remote(
            *[sub(a) for a in node.get_args()], **{k: sub(v) for k, v in node.get_kwargs().items()}
        )
    return refs[root.get_stable_uuid()]


class Workflow:
    """``workflow.create(dag, *args, **kwargs)``: the 2.0-era handle with ``run``/``run_async``."""

    def __init__(self, dag: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._dag, self._args, self._kwargs = dag, args, kwargs

    def run(self, workflow_id: str | None = None, metadata: dict[str, Any] | None = None) -> Any:
        return run(
            self._dag, *self._args, workflow_id=workflow_id, metadata=metadata, **self._kwargs
        )

    def run_async(
        self, workflow_id: str | None = None, metadata: dict[str, Any] | None = None
    ) -> ray.ObjectRef[Any]:
        return run_async(
            self._dag, *self._args, workflow_id=workflow_id, metadata=metadata, **self._kwargs
        )


def create(dag: Any, *args: Any, **kwargs: Any) -> Workflow:
    """Wrap a DAG (and its inputs) as a runnable workflow: ``create(dag).run(workflow_id)``."""
    return Workflow(dag, args, kwargs)


__all__ = [
    "continuation",
    "create",
    "delete_finished",
    "get_metadata",
    "get_output",
    "get_output_async",
    "get_status",
    "init",
    "list_all",
    "resume",
    "resume_async",
    "run",
    "run_async",
]
