"""Settings: every knob of ray-workflows, in one frozen object.

The driver builds it once (:func:`build`, called by ``workflow.init`` or by the first
workflow call) and passes it down: to the manager actor when it is created (and again
with every ``workflow.init`` that reaches a running one), and to a Ray task that hosts
a workflow. The manager and everything below it read knobs only from this object,
never from their own environment: a knob set in the driver reaches a manager on a
``ray start`` cluster, whose processes were started with another environment.

Each knob is, in this order: the explicit argument (``workflow.init(...)``), else its
environment variable in the driver, else its default. The storage is:

1. ``workflow.init(storage=...)``;
2. else ``RAY_WORKFLOWS_STORAGE`` (or the older ``RAY_WORKFLOW_STORAGE``);
3. else the storage the Ray cluster's workflows use already, if any
   (:mod:`ray_workflows._core.cluster_storage`; in a Ray task or actor, that one
   comes first, before the environment);
4. else the local default, ``$XDG_DATA_HOME/ray-workflows`` (usually
   ``~/.local/share/ray-workflows``): a directory that survives reboots, unlike
   ``/tmp``. It only works on one machine; a multi-node cluster needs a shared
   directory or S3.

The other knobs and their variables are listed at :data:`ENV`, but for the lease ttl
(``RAY_WORKFLOWS_LEASE_TTL``, read by :func:`ray_workflows._core.lease.lease_ttl`). A
flag takes ``1``, ``true``, ``yes``, ``on`` or ``0``, ``false``, ``no``, ``off``;
anything else is an error that names the variable.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
from collections.abc import Callable
from typing import Any

from ray_workflows._core.environment import MODES, RECORDED
from ray_workflows._core.lease import DEFAULT_TTL, lease_ttl
from ray_workflows._core.signing import SigningKey, parse_key
from ray_workflows.exceptions import UnknownStorageError
from ray_workflows.plugins import CLOCK_GROUP, available, storage_scheme
from ray_workflows.storage import open_storage

ENV_STORAGE = "RAY_WORKFLOWS_STORAGE"
LEGACY_ENV_STORAGE = "RAY_WORKFLOW_STORAGE"
ENV_HOST = "RAY_WORKFLOWS_HOST"
#: Undelivered events a workflow's mailbox holds before it refuses more.
DEFAULT_MAILBOX_LIMIT = 10_000
ENV_SIGNING_KEY = "RAY_WORKFLOWS_SIGNING_KEY"


@dataclasses.dataclass(frozen=True)
class Settings:
    """The knobs of one driver's workflows (see the module's docs for where each
    comes from). Frozen, so that what a manager was given cannot change under it."""

    #: The storage URI, normalised (:func:`normalise_storage`).
    storage: str
    #: Admission limits (-1: unlimited); ``None`` leaves a running manager's as they are.
    max_running_workflows: int | None = None
    max_pending_workflows: int | None = None
    #: Resume the workflows storage says were running when a manager starts.
    auto_resume: bool = True
    #: The clock plugin timers and sleeps use: ``system``, or ``virtual`` in tests (time
    #: jumps ahead while every workflow waits on a timer).
    clock: str = "system"
    #: Seconds a dead manager's workflows wait before another manager takes them over
    #: (:mod:`ray_workflows._core.lease`). Fixed when a manager starts.
    lease_ttl: float = DEFAULT_TTL
    #: Host small chains in a Ray task their caller submits (:mod:`ray_workflows._core.host`).
    host: bool = False
    #: Seconds an exiting driver waits for the workflows it hosts before it hands the
    #: rest to the manager.
    host_exit_wait: float = 2.0
    #: Submit a task as soon as its inputs' producers are submitted
    #: (:mod:`ray_workflows._core.placement`).
    submit_ahead: bool = True
    #: Run a task's only consumer in the task's own Ray task (needs ``submit_ahead``).
    fuse: bool = True
    #: Hold quick ready tasks a moment to run several in one Ray task while CPUs are busy.
    batch: bool = True
    #: Report workflow tasks to Ray's state API and dashboard task list.
    task_events: bool = False
    #: Seconds a finished workflow is kept after it ended before the manager deletes
    #: it (:mod:`ray_workflows._core.retention`); ``None``: kept until deleted, and a
    #: running manager's retention is left as it is.
    retention: float | None = None
    #: Events a workflow's mailbox may hold that no task has consumed yet; a send past
    #: it is refused (``MailboxFullError``, HTTP 429) until the workflow takes some.
    mailbox_limit: int = DEFAULT_MAILBOX_LIMIT
    #: Sign every record written and verify every record read with this secret
    #: (:mod:`ray_workflows._core.signing`); ``None``: records are not signed. Never shown.
    signing_key: SigningKey | None = dataclasses.field(default=None, repr=False)
    #: Which runtime_env tasks run with: ``recorded`` (the one recorded when their
    #: workflow was submitted) or ``current`` (the cluster's; see
    #: :mod:`ray_workflows._core.environment`).
    runtime_env: str = RECORDED


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"{name} must be a flag (1/true/yes/on or 0/false/no/off), got {value!r}")


def _seconds(name: str, value: Any) -> float:
    try:
        seconds = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"{name} must be a number of seconds (0 or more), got {value!r}")
    return seconds


def duration(name: str, value: Any) -> float:
    """Seconds, from a number, a numeric string or a ``datetime.timedelta``."""
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    try:
        return _seconds(name, value)
    except ValueError:
        raise ValueError(
            f"{name} must be a datetime.timedelta or a number of seconds (0 or more), got {value!r}"
        ) from None


def _clock(name: str, value: Any) -> str:
    known = available(CLOCK_GROUP)
    if value not in known:
        raise ValueError(f"Unknown clock {value!r} ({name}); known: {', '.join(known)}.")
    return str(value)


def _count(name: str, value: Any) -> int:
    try:
        number = int(value) if not isinstance(value, (bool, float)) else 0
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ValueError(f"{name} must be a whole number, 1 or more, got {value!r}")
    return number


def _limit(name: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    if value != -1 and value < low:
        raise ValueError(f"{name} must be -1 (unlimited) or at least {low}, got {value}")
    return value


def _runtime_env(name: str, value: Any) -> str:
    if value not in MODES:
        raise ValueError(
            f"{name} must be one of {', '.join(map(repr, MODES))}, got {value!r}: "
            + "; ".join(f"{mode!r}: {what}" for mode, what in MODES.items())
        )
    return str(value)


#: The knobs read from the environment: field -> (variable, parser).
ENV: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "auto_resume": ("RAY_WORKFLOWS_AUTO_RESUME", _flag),
    "clock": ("RAY_WORKFLOWS_CLOCK", _clock),
    "host": (ENV_HOST, _flag),
    "host_exit_wait": ("RAY_WORKFLOWS_HOST_EXIT_WAIT", _seconds),
    "submit_ahead": ("RAY_WORKFLOWS_SUBMIT_AHEAD", _flag),
    "fuse": ("RAY_WORKFLOWS_FUSE", _flag),
    "batch": ("RAY_WORKFLOWS_BATCH", _flag),
    "task_events": ("RAY_WORKFLOWS_TASK_EVENTS", _flag),
    "retention": ("RAY_WORKFLOWS_RETENTION", duration),
    "mailbox_limit": ("RAY_WORKFLOWS_MAILBOX_LIMIT", _count),
    "signing_key": (ENV_SIGNING_KEY, parse_key),
    "runtime_env": ("RAY_WORKFLOWS_RUNTIME_ENV", _runtime_env),
}


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


def resolve_storage(storage: str | None) -> str:
    """The storage URI: ``storage``, else the environment's, else the default."""
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
        storage = environment_storage() or default_storage()
    return normalise_storage(storage)


def environment_storage() -> str | None:
    """The storage this process's environment names, if it names one."""
    return os.environ.get(ENV_STORAGE) or os.environ.get(LEGACY_ENV_STORAGE) or None


def build(storage: str | None = None, **explicit: Any) -> Settings:
    """The settings of this driver: each knob from ``explicit`` (a ``None`` counts as
    not given), else from its environment variable, else its default; every value
    checked, with an error that names the knob or the variable."""
    fields = {f.name for f in dataclasses.fields(Settings)} - {"storage"}
    unknown = sorted(set(explicit) - fields)
    if unknown:
        raise TypeError(f"Unknown setting(s) {', '.join(unknown)}; known: {sorted(fields)}.")
    uri = resolve_storage(storage)
    open_storage(uri)  # an unknown scheme fails here, before anything else happens
    values: dict[str, Any] = {}
    for field, (variable, parse) in ENV.items():
        value = explicit.get(field)
        if value is not None:
            values[field] = parse(field, value)
        elif os.environ.get(variable, "").strip():
            values[field] = parse(variable, os.environ[variable])
    for field, low in (("max_running_workflows", 1), ("max_pending_workflows", 0)):
        if explicit.get(field) is not None:
            values[field] = _limit(field, explicit[field], low)
    # The ttl's own rules (explicit, else RAY_WORKFLOWS_LEASE_TTL, else 30) live with the
    # leases; asked here, once, so that the manager is given the value.
    values["lease_ttl"] = lease_ttl(explicit.get("lease_ttl"))
    return Settings(uri, **values)


__all__ = [
    "DEFAULT_MAILBOX_LIMIT",
    "ENV",
    "ENV_HOST",
    "ENV_SIGNING_KEY",
    "ENV_STORAGE",
    "LEGACY_ENV_STORAGE",
    "Settings",
    "build",
    "default_storage",
    "duration",
    "environment_storage",
    "normalise_storage",
    "resolve_storage",
]
