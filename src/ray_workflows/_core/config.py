"""This process's settings, and its handles of the managers.

``workflow.init`` (or the first workflow call) builds the process's
:class:`~ray_workflows._core.settings.Settings` once (:func:`configure`); later calls
read them (:func:`current`) and never the environment. The manager of a storage is
created on first use with those settings (:func:`manager`), and a later
``workflow.init`` sends the new ones to a manager that already runs. Which storage a
process uses when it names none follows :mod:`ray_workflows._core.cluster_storage`
(a Ray task or actor takes its driver's settings, and takes them again when the
driver chooses new ones).

If Ray is not initialised, the first call starts a local Ray
(``ray.init(address="local")``), or joins ``RAY_ADDRESS`` when that is set.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from typing import Any

import ray

from ray_workflows._core import cluster_storage
from ray_workflows._core.log import get_logger
from ray_workflows._core.manager import NAMESPACE, actor_class, manager_name
from ray_workflows._core.settings import (
    Settings,
    build,
    environment_storage,
    normalise_storage,
    resolve_storage,
)
from ray_workflows._core.signing import engine_storage, published_key, use
from ray_workflows.exceptions import ClusterStorageError

log = get_logger()

_PROBE_TIMEOUT = 2.0  # seconds for a caller to read the manager's probe record

_lock = threading.Lock()
_settings: Settings | None = None
_source: bytes | None = None  # the cluster's record _settings were published as (see current)
_checked: str | None = None  # the Ray task during which a worker last checked _source
_managers: dict[str, Any] = {}
_described: dict[str, dict[str, Any]] = {}  # storage -> the manager's describe() reply


def configure(storage: str | None = None, **options: Any) -> Settings:
    """Build and set this process's settings (``workflow.init``): ``options`` are knobs
    of :class:`Settings`; a ``None`` one comes from the environment or its default.
    The storage follows the cluster's rules (:mod:`ray_workflows._core.cluster_storage`):
    a driver's own choice, else the cluster's; in a Ray task or actor, its driver's."""
    global _settings, _source
    ensure_ray()
    worker = cluster_storage.in_worker()
    found = cluster_storage.shared(worker)
    if worker and found is not None:
        settings = _adopt(found.settings, storage, options)
    else:
        if storage is None and environment_storage() is None and found is not None:
            storage = found.settings.storage  # a driver's knobs stay its own
        settings = build(storage, **options)
    published = cluster_storage.publish(settings, worker)
    if worker and published.settings.storage != settings.storage:  # lost a race to choose
        settings = _adopt(published.settings, storage, options)
    use(settings.storage, settings.signing_key)
    with _lock:
        _settings, _source = settings, published.raw
        _managers.pop(settings.storage, None)  # new settings must reach the manager
        _described.pop(settings.storage, None)
        return settings


def _adopt(shared: Settings, storage: str | None, options: Any) -> Settings:
    """For a Ray task or actor: its cluster's ``shared`` settings, with the knobs given
    in ``options``; a ``storage`` other than the cluster's is refused."""
    if storage is not None and resolve_storage(storage) != shared.storage:
        raise ClusterStorageError(
            f"This Ray task or actor asked for workflow storage {resolve_storage(storage)!r}, "
            f"but the workflows of its Ray cluster use {shared.storage!r} (chosen by the "
            "driver's workflow.init). Inside a task or actor, call workflow.init() "
            "without a storage (or not at all) to use the cluster's; to use a second "
            "storage, call workflow.init(storage=...) in a driver."
        )
    given = build(shared.storage, **options)
    changes = {name: getattr(given, name) for name, value in options.items() if value is not None}
    # The key the cluster's manager published comes before one in this worker's
    # environment (a worker's environment is not its driver's).
    key = published_key(shared.storage) or given.signing_key
    return dataclasses.replace(shared, signing_key=key, **changes)


def current() -> Settings:
    """This process's settings; built on first use (see :func:`configure`). In a Ray
    task or actor, built again when its driver chose other settings since: checked
    once per task (or actor call), as the KV costs a round trip to the head."""
    global _checked
    with _lock:
        settings, source, checked = _settings, _source, _checked
    if settings is not None and not cluster_storage.in_worker():
        return settings
    task = ray.get_runtime_context().get_task_id()
    if settings is not None and (task == checked and task is not None):
        return settings
    if settings is not None:
        found = cluster_storage.shared(True)
        if found is None or found.raw == source:
            with _lock:
                _checked = task
            return settings
    settings = configure()
    with _lock:
        _checked = task
    return settings


def override(**changes: Any) -> Settings | None:
    """Replace this process's settings, if it has some, by a copy with ``changes`` (for
    tests that turn a driver-side knob, such as ``host``, on or off, with its variable
    set too for settings built later); return the settings replaced (``None`` if none
    were built yet). Knobs the manager reads reach it only with the next
    :func:`configure`."""
    global _settings
    with _lock:
        before = _settings
        if before is not None:
            _settings = dataclasses.replace(before, **changes)
        return before


def ensure_ray() -> None:
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        log.info("ray.starting", address=address)
        ray.init(address=address)


def known_manager(settings: Settings) -> Any:
    """The manager's handle if this process has made it already, else ``None``."""
    return _managers.get(settings.storage)


async def manager(settings: Settings | None = None) -> Any:
    """The manager actor for the configured storage, created on first use with these
    settings; one that runs already is sent them (:meth:`WorkflowManager.configure`)."""
    settings = settings or current()
    handle = _managers.get(settings.storage)
    if handle is not None:
        return handle
    await asyncio.to_thread(ensure_ray)
    handle = (
        actor_class()
        .options(
            name=manager_name(settings.storage),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=100_000,
            max_restarts=-1,
            # Calls made while the manager restarts are replayed on the new one; they are
            # idempotent by workflow id (a stored workflow is resumed, not restarted).
            max_task_retries=-1,
        )
        .remote(settings)
    )
    await handle.ready.remote()
    await handle.configure.remote(settings)
    _described[settings.storage] = await sees_manager_storage(
        settings.storage, await handle.describe.remote()
    )
    _managers[settings.storage] = handle
    return handle


async def sees_manager_storage(storage: str, described: dict[str, Any]) -> dict[str, Any]:
    """``described`` (the manager's describe()), with ``caller_stores`` off unless this
    process reads the manager's probe record back from its own view of ``storage``:
    a driver off the cluster (Ray Client), a directory mounted elsewhere here, or S3
    credentials missing here must not store workflows where the manager cannot see
    them. Their workflows are stored by the manager instead."""
    probe = described.get("probe")
    if not described.get("caller_stores") or probe is None:
        return {**described, "caller_stores": False}
    key, token = probe
    try:
        # Bounded: a storage this process cannot reach must not hold up its first call.
        seen = await asyncio.wait_for(engine_storage(storage).get(key), _PROBE_TIMEOUT)
    except Exception as exc:  # any failure means: let the manager store them
        seen = None
        log.info("storage.not_reachable_here", storage=storage, error=str(exc))
    if seen != token:
        log.info("workflow.manager_stores_new_workflows", storage=storage)
        return {**described, "caller_stores": False}
    return described


def described(settings: Settings) -> dict[str, Any] | None:
    """What the manager of ``settings.storage`` said of itself when its handle was made
    (``WorkflowManager.describe``)."""
    return _described.get(settings.storage)


def forget_managers() -> None:
    """Drop cached manager handles (after ``ray.shutdown``, or in tests)."""
    _managers.clear()
    _described.clear()


__all__ = [
    "configure",
    "current",
    "described",
    "ensure_ray",
    "forget_managers",
    "known_manager",
    "manager",
    "normalise_storage",
    "override",
    "sees_manager_storage",
]
