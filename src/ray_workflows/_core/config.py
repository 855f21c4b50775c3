"""Configuration: which storage, which Ray, which manager.

The one place where environment variables are merged under explicit arguments:

1. ``workflow.init(storage=...)``;
2. else ``RAY_WORKFLOWS_STORAGE`` (or the older ``RAY_WORKFLOW_STORAGE``);
3. else the local default, ``$XDG_DATA_HOME/ray-workflows`` (usually
   ``~/.local/share/ray-workflows``): a directory that survives reboots, unlike
   ``/tmp``. It only works on one machine; a multi-node cluster needs a shared
   directory or S3.

``RAY_WORKFLOWS_AUTO_RESUME=0`` turns automatic recovery off, and
``RAY_WORKFLOWS_LEASE_TTL`` (seconds, default 30) sets how long a dead manager's
workflows wait before another manager takes them over (read by
:func:`ray_workflows._core.lease.lease_ttl`, passed to the manager from the driver).

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

from ray_workflows._core.lease import lease_ttl
from ray_workflows._core.log import get_logger
from ray_workflows._core.manager import NAMESPACE, actor_class, manager_name
from ray_workflows.exceptions import UnknownStorageError
from ray_workflows.plugins import storage_scheme
from ray_workflows.storage import open_storage

ENV_STORAGE = "RAY_WORKFLOWS_STORAGE"
LEGACY_ENV_STORAGE = "RAY_WORKFLOW_STORAGE"
ENV_AUTO_RESUME = "RAY_WORKFLOWS_AUTO_RESUME"
ENV_CLOCK = "RAY_WORKFLOWS_CLOCK"

log = get_logger()

_PROBE_TIMEOUT = 2.0  # seconds for a caller to read the manager's probe record


def default_storage() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(base, "ray-workflows")


def normalise_storage(uri: str) -> str:
    """Absolute paths for file storage, so every process resolves the same directory."""
    if storage_scheme(uri) == "file" and "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    return uri


@dataclasses.dataclass(frozen=True)
class Config:
    storage: str
    max_running_workflows: int | None = None
    max_pending_workflows: int | None = None
    #: Resume the workflows storage says were running when a manager starts.
    #: ``RAY_WORKFLOWS_AUTO_RESUME=0`` turns it off by default.
    auto_resume: bool = dataclasses.field(
        default_factory=lambda: os.environ.get(ENV_AUTO_RESUME, "1") not in ("0", "false", "no")
    )
    #: The clock plugin timers and sleeps use: ``system``, or ``virtual`` in tests (time
    #: jumps ahead while every workflow waits on a timer). ``RAY_WORKFLOWS_CLOCK``.
    clock: str = dataclasses.field(default_factory=lambda: os.environ.get(ENV_CLOCK) or "system")


_lock = threading.Lock()
_config: Config | None = None
_managers: dict[str, Any] = {}
_described: dict[str, dict[str, Any]] = {}  # storage -> the manager's describe() reply


def resolve_storage(storage: str | None) -> str:
    if storage is not None and not isinstance(storage, str):
        raise TypeError(
            f"storage must be a URI string such as '/path', 'file:///path', 'memory://' or "
            f"'s3://bucket/prefix', got {type(storage).__name__}: {storage!r}"
        )
    if storage is not None and not storage.strip():
        raise UnknownStorageError(
            "storage is an empty string; give a URI such as '/path', 'file:///path', "
            "'memory://' or 's3://bucket/prefix', or None for the default."
        )
    if storage is None:
        storage = (
            os.environ.get(ENV_STORAGE) or os.environ.get(LEGACY_ENV_STORAGE) or default_storage()
        )
    return normalise_storage(storage)


def configure(storage: str | None = None, **options: Any) -> Config:
    """Set this process's configuration (``workflow.init``)."""
    global _config
    uri = resolve_storage(storage)
    open_storage(uri)  # an unknown scheme fails here, before anything else happens
    clock = options.get("clock")
    if clock is not None:
        from ray_workflows.plugins import CLOCK_GROUP, available

        if clock not in available(CLOCK_GROUP):
            raise ValueError(
                f"Unknown clock {clock!r}; known: {', '.join(available(CLOCK_GROUP))}."
            )
    options = {k: v for k, v in options.items() if v is not None}
    with _lock:
        _config = Config(uri, **options)
        _managers.pop(uri, None)  # new limits must reach the manager
        _described.pop(uri, None)
        return _config


def current() -> Config:
    with _lock:
        config = _config
    return config if config is not None else configure()


def ensure_ray() -> None:
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        log.info("ray.starting", address=address)
        ray.init(address=address)


def known_manager(config: Config) -> Any:
    """The manager's handle if this process has made it already, else ``None``."""
    return _managers.get(config.storage)


async def manager(config: Config | None = None) -> Any:
    """The manager actor for the configured storage, created on first use."""
    config = config or current()
    handle = _managers.get(config.storage)
    if handle is not None:
        return handle
    await asyncio.to_thread(ensure_ray)
    handle = (
        actor_class()
        .options(
            name=manager_name(config.storage),
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
        .remote(config.storage, config.auto_resume, lease_ttl(), config.clock)
    )
    await handle.ready.remote()
    await handle.configure.remote(
        config.max_running_workflows, config.max_pending_workflows, config.clock
    )
    _described[config.storage] = await sees_manager_storage(
        config.storage, await handle.describe.remote()
    )
    _managers[config.storage] = handle
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
        seen = await asyncio.wait_for(open_storage(storage).get(key), _PROBE_TIMEOUT)
    except Exception as exc:  # any failure means: let the manager store them
        seen = None
        log.info("storage.not_reachable_here", storage=storage, error=str(exc))
    if seen != token:
        log.info("workflow.manager_stores_new_workflows", storage=storage)
        return {**described, "caller_stores": False}
    return described


def described(config: Config) -> dict[str, Any] | None:
    """What the manager of ``config.storage`` said of itself when its handle was made
    (``WorkflowManager.describe``)."""
    return _described.get(config.storage)


def forget_managers() -> None:
    """Drop cached manager handles (after ``ray.shutdown``, or in tests)."""
    _managers.clear()
    _described.clear()


__all__ = [
    "ENV_STORAGE",
    "Config",
    "configure",
    "current",
    "default_storage",
    "described",
    "ensure_ray",
    "forget_managers",
    "known_manager",
    "manager",
    "normalise_storage",
    "resolve_storage",
    "sees_manager_storage",
]
