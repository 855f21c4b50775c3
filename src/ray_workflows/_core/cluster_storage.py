"""The storage (and settings) a Ray cluster's workflows use, known to all its processes.

A driver chooses the storage (``workflow.init(storage=...)``, or its environment, or
the default); the workflows its Ray tasks and actors start, and those of a second
driver joining the cluster (``ray.init(address="auto")``), must go to the same
storage without repeating it. So a process publishes the settings it chose in Ray's
internal KV (:mod:`ray_workflows._core.cluster_kv`, namespace ``ray_workflows``):

- ``settings-job-<job id>``: the settings the driver of that job chose last. Ray tasks
  and actors of that job (and the tasks they start) use them.
- ``settings-cluster``: the first settings chosen in the cluster. A driver that
  chooses no storage (no argument, no ``RAY_WORKFLOWS_STORAGE``), and a task whose
  driver never chose one, use them.

The rules, applied by :func:`ray_workflows._core.config.configure`:

- In a driver, a storage given (argument or environment) is used; one that differs
  from the cluster's is a deliberate second storage (its own manager, as for every
  storage), logged as ``storage.second_in_cluster``; the cluster's record stays.
- In a Ray task or actor, the job's (else the cluster's) settings are used and the
  process's own environment is not read. A task or actor asking for another storage
  gets :class:`~ray_workflows.exceptions.ClusterStorageError`: its worker process
  serves later tasks too, which must not silently inherit that choice. Only when the
  cluster has no record yet does it choose one itself (environment, else default)
  and claims both records for it.

The signing key is not in these records: a process takes it from where the manager
publishes it (:mod:`ray_workflows._core.signing`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

import ray

from ray_workflows._core import cluster_kv
from ray_workflows._core.log import get_logger
from ray_workflows._core.settings import Settings

NAMESPACE = "ray_workflows"
CLUSTER_KEY = b"settings-cluster"

log = get_logger()


class Shared(NamedTuple):
    """A published record: its bytes (to notice a change) and the settings in it."""

    raw: bytes
    settings: Settings


def in_worker() -> bool:
    """Whether this process is a Ray worker (runs tasks or an actor), not a driver."""
    worker: Any = ray._private.worker.global_worker
    return bool(worker.mode == ray._private.worker.WORKER_MODE)


def _job_key() -> bytes:
    return b"settings-job-" + ray.get_runtime_context().get_job_id().encode()


def encode(settings: Settings) -> bytes:
    fields = dataclasses.asdict(dataclasses.replace(settings, signing_key=None))
    del fields["signing_key"]
    return json.dumps(fields, sort_keys=True).encode()


def decode(raw: bytes) -> Settings:
    """The settings in a record; fields this version does not know are left out."""
    fields = json.loads(raw)
    known = {f.name for f in dataclasses.fields(Settings)}
    return Settings(**{k: v for k, v in fields.items() if k in known})


def _read(key: bytes) -> Shared | None:
    raw = cluster_kv.read(NAMESPACE, key)
    return None if raw is None else Shared(raw, decode(raw))


def shared(worker: bool) -> Shared | None:
    """What this process adopts when it chooses nothing itself: in a worker, its job's
    record, else the cluster's; in a driver, the cluster's."""
    found = _read(_job_key()) if worker else None
    return found if found is not None else _read(CLUSTER_KEY)


def publish(settings: Settings, worker: bool) -> Shared:
    """Make ``settings`` this job's (a driver's choice replaces the job's record; a
    worker's only fills an empty one) and, if the cluster has none, the cluster's.
    The job's record as it now stands is returned: a worker that lost a race to
    create it gets the winner."""
    raw = encode(settings)
    if worker:
        stored, _ = cluster_kv.claim(NAMESPACE, _job_key(), raw)
    else:
        cluster_kv.write(NAMESPACE, _job_key(), raw)
        stored = raw
    winner, created = cluster_kv.claim(NAMESPACE, CLUSTER_KEY, raw)
    if created:
        log.info("storage.chosen_for_cluster", storage=settings.storage)
    elif not worker and decode(winner).storage != settings.storage:
        log.warning(
            "storage.second_in_cluster",
            storage=settings.storage,
            cluster_storage=decode(winner).storage,
            note="this driver, its tasks and actors use a storage of their own",
        )
    return Shared(stored, decode(stored))


__all__ = [
    "CLUSTER_KEY",
    "NAMESPACE",
    "Shared",
    "decode",
    "encode",
    "in_worker",
    "publish",
    "shared",
]
