"""The client: what a caller of the public API does, under ``ray_workflows.api`` and
``ray_workflows.aio``, which check their arguments and call this module.

It owns the start protocol (:func:`prepare`, then :func:`start` or, from blocking
code, :func:`start_blocking`): a new workflow is compiled in the caller, stored by the
caller where it can be, and handed to its runner (the manager, or a Ray task that
hosts it). Every other call goes to the manager of the configured storage
(:func:`call`, :func:`ref`), with the process's settings
(:mod:`ray_workflows._core.config`).
"""

from __future__ import annotations

import asyncio
import pickle
import weakref
from typing import Any, NamedTuple

import ray
from ray.exceptions import RayTaskError

from ray_workflows._core import bridge, config, environment, host
from ray_workflows._core.compiler import compile_dag
from ray_workflows._core.ids import check_id, new_workflow_id
from ray_workflows._core.keys import lease_key
from ray_workflows._core.lease import grant
from ray_workflows._core.options import check_metadata
from ray_workflows._core.plan import EXTERNAL
from ray_workflows._core.settings import Settings
from ray_workflows._core.signing import engine_storage
from ray_workflows._core.store import WorkflowStore, running_meta


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


def init(storage: str | None, **knobs: Any) -> None:
    """Build this process's settings (``workflow.init``) and start (or reach) the
    manager with them."""
    bridge.run(config.manager(config.configure(storage, **knobs)))


async def ref(method: str, *args: Any) -> Any:
    """The ObjectRef of the manager's reply to ``method(*args)``."""
    handle = await config.manager()
    return getattr(handle, method).remote(*args)


async def call(method: str, *args: Any) -> Any:
    """The manager's reply to ``method(*args)``; its errors raised unwrapped."""
    return await get(await ref(method, *args))


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
    meta = running_meta(plan.output_task_id, check_metadata(metadata), environment.record(plan))
    if not any(spec.arg_refs for spec in plan.tasks.values()):
        encoded = WorkflowStore.encode_plan(plan, meta=meta)
        return Prepared(wid, encoded, meta, config.current().host and host.eligible(plan))
    return Prepared(wid, plan, meta)


# Per event loop and storage: concurrent starts from one loop share durable batches.
_stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, WorkflowStore]] = (
    weakref.WeakKeyDictionary()
)


def _store(uri: str) -> WorkflowStore:
    storage = engine_storage(uri)
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
    settings = config.current()
    handle, lease = config.known_manager(settings), _caller_lease(settings, prepared)
    store = WorkflowStore(engine_storage(settings.storage))
    if handle is None or lease is None or not store.storage.blocking_batches:
        return None
    if not environment.kept(store.storage, prepared.meta.get("runtime_env")):
        return None  # its packages are stored first, by start()
    wid, plan, meta, _ = prepared
    leased = store.create_started_blocking(wid, plan, meta["status"], lease[:2])
    return None if leased is None else _hand_over(settings, handle, prepared, lease, leased)


def _caller_lease(settings: Settings, prepared: Prepared) -> tuple[str, bytes, str | None] | None:
    """The lease record to store with a new workflow if the caller stores it (see
    :func:`start`), else ``None``: ``(key, record, host)``, granted to the manager, or
    to the workflow's host (its owner name is then the third item, else ``None``)."""
    info = config.described(settings)
    if not isinstance(prepared.plan, bytes) or info is None or not info["caller_stores"]:
        return None
    wid = prepared.workflow_id
    owner = host.host_owner() if prepared.hosted and info.get("hosting") else None
    return lease_key(wid), grant(wid, owner or info["owner"], info["ttl"]), owner


def _hand_over(
    settings: Settings,
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
        ref = _host().remote(host.call(wid, plan, meta, settings, record, owner))
        host.started(wid, ref, owner, handle, settings.host_exit_wait)
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
    settings = config.current()
    handle = await config.manager(settings)
    wid, plan, meta, _ = prepared
    lease = _caller_lease(settings, prepared)
    if lease is not None:
        # The packages its runtime_env needs are durable before the workflow is.
        await environment.keep(_store(settings.storage).storage, meta.get("runtime_env"))
        leased = await _store(settings.storage).create_started(wid, plan, meta["status"], lease[:2])
        if leased is not None:
            return _hand_over(settings, handle, prepared, lease, leased)
    await get(handle.submit.remote(wid, plan, meta["user_metadata"]))
    return handle.result.remote(wid)


async def run_async(
    dag: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    workflow_id: str | None,
    metadata: dict[str, Any] | None,
) -> Any:
    """Start a workflow from a coroutine; the ``ray.ObjectRef`` of its output."""
    # Compiling a large DAG takes a while: not on the event loop.
    return await start(await asyncio.to_thread(prepare, dag, args, kwargs, workflow_id, metadata))


def run_blocking(
    dag: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    workflow_id: str | None,
    metadata: dict[str, Any] | None,
) -> Any:
    """Start a workflow from blocking code; the ``ray.ObjectRef`` of its output."""
    # Compiled here, in the caller's thread, and stored here too where it can be; the
    # bridge loop stores and starts it otherwise.
    bridge.refuse_own_loop()
    prepared = prepare(dag, args, kwargs, workflow_id, metadata)
    started = start_blocking(prepared)
    return started if started is not None else bridge.run(start(prepared))


async def resume(workflow_id: str) -> Any:
    """Resume a stored workflow (or join its run); the ObjectRef of its output."""
    await call("resume", workflow_id)
    return await ref("result", workflow_id)


async def resume_all(include_failed: bool) -> list[tuple[str, Any]]:
    """Resume every RESUMABLE workflow (and FAILED ones with ``include_failed``):
    ``(workflow_id, ObjectRef of its output)`` pairs."""
    handle = await config.manager()
    ids: list[str] = await get(handle.resume_all.remote(include_failed))
    return [(wid, handle.result.remote(wid)) for wid in ids]


__all__ = [
    "Prepared",
    "call",
    "get",
    "init",
    "prepare",
    "ref",
    "resume",
    "resume_all",
    "run_async",
    "run_blocking",
    "run_call",
    "start",
    "start_blocking",
    "unwrap",
]
