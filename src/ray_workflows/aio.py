"""Awaitable twins of the workflow API, for asyncio applications.

Each function has the name and arguments of its blocking twin in
``ray_workflows``; none of them blocks the event loop::

    import ray_workflows as workflow

    async def handler():
        ref = await workflow.aio.run_async(dag, workflow_id="order-1")
        status = await workflow.aio.get_status("order-1")
        return await ref
"""

from __future__ import annotations

import asyncio
import pickle
import weakref
from collections.abc import Iterable
from typing import Any, NamedTuple

import ray
from ray.exceptions import RayTaskError

from ray_workflows._core import config, host
from ray_workflows._core.compiler import compile_dag
from ray_workflows._core.ids import check_id, new_workflow_id
from ray_workflows._core.keys import lease_key
from ray_workflows._core.lease import grant
from ray_workflows._core.options import check_metadata
from ray_workflows._core.plan import EXTERNAL
from ray_workflows._core.status import WorkflowStatus
from ray_workflows._core.store import WorkflowStore, running_meta
from ray_workflows.storage import open_storage


def unwrap(exc: BaseException) -> BaseException:
    """The workflow error inside Ray's ``RayTaskError`` wrapper, if there is one."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        return exc.cause
    return exc


async def get(ref: Any) -> Any:
    """Await an ObjectRef from this API, raising workflow errors unwrapped."""
    try:
        return await ref
    except RayTaskError as exc:
        inner = unwrap(exc)
        if inner is exc:
            raise
        raise inner from inner.__cause__


class Prepared(NamedTuple):
    """A checked, compiled run request (:func:`prepare`)."""

    workflow_id: str
    plan: Any  # the Plan, or its stored record (bytes) when it holds no live ObjectRefs
    meta: dict[str, Any]  # its meta.json as it starts (also in the encoded plan's header)
    hosted: bool = False  # it may run in a Ray task of its own (see ray_workflows._core.host)


def prepare(
    dag: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    workflow_id: str | None,
    metadata: dict[str, Any] | None,
) -> Prepared:
    """Validate and compile a run request; raises before anything is stored.

    A plan without live ObjectRefs comes back already encoded as the record that is
    stored (the bytes cross to the manager at no cost; it decodes them once)."""
    from ray.dag import DAGNode

    if not isinstance(dag, DAGNode):
        raise TypeError(
            f"workflow.run() needs a Ray DAG built with .bind(), got {type(dag).__name__}: "
            f"{dag!r:.80}. Replace fn.remote(...) with fn.bind(...)."
        )
    wid = new_workflow_id() if workflow_id is None else check_id(workflow_id)
    plan = compile_dag(dag, args, kwargs)
    for spec in plan.tasks.values():
        if any(u.startswith(EXTERNAL) for u in spec.upstream):
            raise TypeError(
                f"Task {spec.task_id!r} takes a TaskHandle (from workflow.wait): a handle "
                "names a task of the workflow that returned it, so it can only be used in "
                "that workflow's continuations, not in a new workflow."
            )
    meta = running_meta(plan.output_task_id, check_metadata(metadata))
    if not any(spec.arg_refs for spec in plan.tasks.values()):
        encoded = WorkflowStore.encode_plan(plan, meta=meta)
        return Prepared(wid, encoded, meta, host.enabled() and host.eligible(plan))
    return Prepared(wid, plan, meta)


# Per event loop and storage: concurrent starts from one loop share durable batches.
_stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, WorkflowStore]] = (
    weakref.WeakKeyDictionary()
)


def _store(uri: str) -> WorkflowStore:
    storage = open_storage(uri)
    stores = _stores.setdefault(asyncio.get_running_loop(), {})
    store = stores.get(uri)
    if store is None or store.storage is not storage:  # new, or the storage was reopened
        store = stores[uri] = WorkflowStore(storage)
    return store


def start_blocking(prepared: Prepared) -> Any:
    """:func:`start` from blocking code, without the bridge loop, where the caller
    stores a new workflow in a storage with blocking batches and the manager's handle
    is known: a hop to the loop and its storage thread costs as much as the durable
    write itself. ``None`` where that is not the case: then await :func:`start`."""
    cfg = config.current()
    handle, lease = config.known_manager(cfg), _caller_lease(cfg, prepared)
    store = WorkflowStore(open_storage(cfg.storage))
    if handle is None or lease is None or not store.storage.blocking_batches:
        return None
    wid, plan, meta, _ = prepared
    leased = store.create_started_blocking(wid, plan, meta["status"], lease[:2])
    return None if leased is None else _hand_over(cfg, handle, prepared, lease, leased)


def _caller_lease(cfg: config.Config, prepared: Prepared) -> tuple[str, bytes, str | None] | None:
    """The lease record to store with a new workflow if the caller stores it (see
    :func:`start`), else ``None``: ``(key, record, host)``, granted to the manager, or
    to the workflow's host (its owner name is then the third item, else ``None``)."""
    info = config.described(cfg)
    if not isinstance(prepared.plan, bytes) or info is None or not info["caller_stores"]:
        return None
    wid = prepared.workflow_id
    owner = host.host_owner() if prepared.hosted and info.get("hosting") else None
    return lease_key(wid), grant(wid, owner or info["owner"], info["ttl"]), owner


def _hand_over(
    cfg: config.Config,
    handle: Any,
    prepared: Prepared,
    lease: tuple[str, bytes, str | None],
    leased: bool,
) -> Any:
    """Hand a workflow the caller stored to its runner: a Ray task that hosts it (see
    :mod:`ray_workflows._core.host`), or the manager; the ref of its output."""
    wid, plan, meta, _ = prepared
    _, record, owner = lease
    if owner is not None and leased:
        ref = _host().remote(host.call(wid, plan, meta, cfg.storage, record, owner))
        host.started(wid, ref, owner, handle)
        return ref
    return handle.run.remote(run_call(wid, plan, meta, record if leased else None))


_hosting: Any = None


def _host() -> Any:
    """The Ray task that hosts a workflow: retried by Ray if its worker dies only."""
    global _hosting
    if _hosting is None:
        _hosting = ray.remote(max_retries=3, retry_exceptions=False)(host.run).options(
            name="ray_workflows.host"
        )
    return _hosting


def run_call(wid: str, plan: bytes, meta: dict[str, Any], lease: bytes | None) -> bytes:
    """The one argument of the manager's ``run``. One pickled argument: Ray's cost is
    per argument, and a dict costs it most (the manager's CPU per call measured
    0.3-0.4 ms, against 0.57-0.64 ms for the four arguments apart)."""
    return pickle.dumps((wid, plan, meta, lease), protocol=5)


async def start(prepared: Prepared) -> Any:
    """Store and start a prepared workflow; return the ``ray.ObjectRef`` of its output.

    Returns once the workflow is durable, so a caller killed right after loses
    nothing. A new workflow is stored by the caller itself (as Ray 2.47 did): its
    plan (with its metadata), its lease (granted to the manager) and its status
    marker, at once; the manager is then handed it with one call whose reply is the
    output, and nobody waits for the manager meanwhile. Where the manager must
    decide first (a stored id is resumed, a pending-queue limit may refuse it,
    arguments hold ObjectRefs to checkpoint, or storage the caller cannot reach),
    it stores it instead."""
    cfg = config.current()
    handle = await config.manager(cfg)
    wid, plan, meta, _ = prepared
    lease = _caller_lease(cfg, prepared)
    if lease is not None:
        leased = await _store(cfg.storage).create_started(wid, plan, meta["status"], lease[:2])
        if leased is not None:
            return _hand_over(cfg, handle, prepared, lease, leased)
    await get(handle.submit.remote(wid, plan, meta["user_metadata"]))
    return handle.result.remote(wid)


async def run_async(
    dag: Any,
    *args: Any,
    workflow_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Start a workflow; return the ``ray.ObjectRef`` of its output."""
    # Compiling a large DAG takes a while: not on the event loop.
    return await start(await asyncio.to_thread(prepare, dag, args, kwargs, workflow_id, metadata))


async def run(
    dag: Any,
    *args: Any,
    workflow_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Run a workflow to completion and return its output."""
    ref = await run_async(dag, *args, workflow_id=workflow_id, metadata=metadata, **kwargs)
    return await get(ref)


async def resume_async(workflow_id: str) -> Any:
    """Resume a stored workflow; return the ``ray.ObjectRef`` of its output."""
    check_id(workflow_id)
    handle = await config.manager()
    await get(handle.resume.remote(workflow_id))
    return handle.result.remote(workflow_id)


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
    handle = await config.manager()
    ids: list[str] = await get(handle.resume_all.remote(include_failed))
    return Resumed((wid, handle.result.remote(wid)) for wid in ids)


async def cancel(workflow_id: str) -> None:
    """Cancel a running or pending workflow; its checkpoints are kept."""
    check_id(workflow_id)
    handle = await config.manager()
    await get(handle.cancel.remote(workflow_id))


async def send_event(
    workflow_id: str, key: str, payload: Any = None, *, event_id: str | None = None
) -> str:
    """Store an event for ``workflow_id`` under ``key`` and return its id once it is
    durable. A waiting ``wait_for_event("http", event_key=key)`` receives it; an event
    that arrives before anyone waits is kept. The same ``event_id`` twice is stored
    (and delivered) once. An unknown workflow is ``WorkflowNotFoundError``."""
    check_id(workflow_id)
    if not isinstance(key, str) or not key or "/" in key:
        raise ValueError(f"event key must be a non-empty string without '/', got {key!r}")
    handle = await config.manager()
    event: str = await get(handle.send_event.remote(workflow_id, key, payload, event_id))
    return event


async def delete(workflow_id: str) -> None:
    """Delete a workflow that is not running; ``WorkflowStillActiveError`` otherwise."""
    check_id(workflow_id)
    handle = await config.manager()
    await get(handle.delete.remote(workflow_id))


async def get_output_async(
    workflow_id: str, task_id: str | None = None, *, name: str | None = None
) -> Any:
    """The ``ray.ObjectRef`` of a workflow's output, or of one task's (``task_id``)."""
    check_id(workflow_id)
    task_id = task_id if task_id is not None else name
    handle = await config.manager()
    return handle.get_output.remote(workflow_id, task_id)


async def get_output(
    workflow_id: str, task_id: str | None = None, *, name: str | None = None
) -> Any:
    """A workflow's output (waits while it runs), or one task's with ``task_id``."""
    return await get(await get_output_async(workflow_id, task_id=task_id, name=name))


async def get_status(workflow_id: str) -> WorkflowStatus:
    """The workflow's status; raises ``WorkflowNotFoundError`` for an unknown id."""
    check_id(workflow_id)
    handle = await config.manager()
    status: WorkflowStatus = await get(handle.get_status.remote(workflow_id))
    return status


async def get_metadata(
    workflow_id: str, task_id: str | None = None, *, name: str | None = None
) -> dict[str, Any]:
    """Metadata of a workflow (status, user_metadata, stats) or of one of its tasks."""
    check_id(workflow_id)
    task_id = task_id if task_id is not None else name
    handle = await config.manager()
    result: dict[str, Any] = await get(handle.get_metadata.remote(workflow_id, task_id))
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
    statuses = _statuses(status_filter)
    handle = await config.manager()
    result: list[tuple[str, WorkflowStatus]] = await get(handle.list_all.remote(statuses))
    return result


__all__ = [
    "Resumed",
    "cancel",
    "delete",
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
