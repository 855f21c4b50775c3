"""The runtime environment of a workflow: recorded when it is submitted, applied to
every task of every run of it, on this cluster or another.

The record is the job's ``runtime_env`` (what ``ray.init(runtime_env=...)`` or the job
submission gave the driver) and the code packages it and the tasks' own
``runtime_env`` options name. Ray uploads a job's local ``working_dir`` and
``py_modules`` to the cluster's GCS as ``gcs://_ray_pkg_<hash>.zip``; those packages
go when the cluster goes. So each one is copied to the workflow storage once, under
the SHA-256 of its bytes (``packages/<sha256>.zip``), before the workflow is durable,
and a run on a cluster that lacks it puts it back into that cluster's GCS under its
old URI before any task needs it. Remote URIs (``s3://``, ``https://``) and ``pip``
lists are recorded as they are.

The record rides in the plan (:attr:`Plan.environment`) and in ``meta.json`` under
``runtime_env`` (what ``get_metadata`` shows)::

    {"job": {"env_vars": {...}, "working_dir": "gcs://_ray_pkg_1f2e.zip"},
     "packages": {"gcs://_ray_pkg_1f2e.zip": "<sha256 of the zip>"}}

Each task runs with the job's environment merged with its own option the way Ray
merges a child's with its parent's: the task's fields win, ``env_vars`` are merged.
``Settings.runtime_env = "current"`` runs them in the cluster's environment instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import Iterable
from typing import Any

import ray

from ray_workflows._core import cluster_kv
from ray_workflows._core.keys import package_key
from ray_workflows._core.log import get_logger
from ray_workflows._core.options import TaskOptions
from ray_workflows._core.plan import Plan, TaskSpec
from ray_workflows.exceptions import WorkflowError, WorkflowNotResumableError
from ray_workflows.storage import Storage

log = get_logger()

RECORDED = "recorded"
CURRENT = "current"
#: The values of ``Settings.runtime_env``, with what each means.
MODES = {
    RECORDED: "every task runs with the runtime_env recorded when the workflow was submitted",
    CURRENT: "tasks run in the environment of the cluster's workflow manager, as plain Ray "
    "tasks it submitted would (only a task's own runtime_env option is applied)",
}
_PACKAGE_FIELDS = ("working_dir", "py_modules")
_GCS = "gcs://"

# The job's runtime_env, parsed once per distinct serialized value.
_job_cache: tuple[str, dict[str, Any]] | None = None
# (storage URI, digest) of the packages this process knows are in a storage.
_stored: set[tuple[str, str]] = set()
_digests: dict[str, str] = {}  # package URI -> SHA-256 of its bytes


def job_runtime_env() -> dict[str, Any]:
    """The runtime_env of this process's Ray job (``{}`` if Ray is not started)."""
    global _job_cache
    if not ray.is_initialized():
        return {}
    text = ray.get_runtime_context().get_runtime_env_string()
    if _job_cache is None or _job_cache[0] != text:
        parsed = json.loads(text) if text else {}
        # Ray's own bookkeeping keys start with "_"; they describe this cluster only.
        env = {k: v for k, v in parsed.items() if not k.startswith("_")}
        _job_cache = (text, env)
    return dict(_job_cache[1])


def merged(job: dict[str, Any] | None, own: dict[str, Any] | None) -> dict[str, Any]:
    """``own`` over ``job``, as Ray merges a task's runtime_env over its parent's."""
    out = {**(job or {}), **(own or {})}
    if job and own and "env_vars" in job and "env_vars" in own:
        out["env_vars"] = {**job["env_vars"], **own["env_vars"]}
    return out


def package_uris(env: dict[str, Any] | None) -> list[str]:
    """The ``gcs://`` packages ``env`` names (they live only as long as the cluster)."""
    uris: list[str] = []
    for field in _PACKAGE_FIELDS:
        value = (env or {}).get(field)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item.startswith(_GCS):
                uris.append(item)
    return uris


def _own_envs(plan: Plan) -> Iterable[dict[str, Any]]:
    for spec in plan.tasks.values():
        env = spec.options.ray_options.get("runtime_env")
        if env:
            yield dict(env)


def record(plan: Plan) -> dict[str, Any] | None:
    """Record the submitting job's runtime_env in ``plan`` (in the driver, at
    submission, with Ray's packages still in this cluster); the record, or ``None``
    if neither the job nor a task has one."""
    job = job_runtime_env()
    own = list(_own_envs(plan))
    if not job and not own:
        return None
    uris = sorted({u for env in [job, *own] for u in package_uris(env)})
    plan.environment = {"job": job, "packages": {uri: _digest(uri) for uri in uris}}
    return plan.environment


def _digest(uri: str) -> str:
    """The SHA-256 of a package in this cluster's GCS (Ray names a package after its
    content, so one look per process is enough)."""
    digest = _digests.get(uri)
    if digest is None:
        data = _gcs_get(uri)
        if data is None:
            raise WorkflowError(
                f"The runtime_env package {uri} is not in this Ray cluster, so it cannot be "
                "recorded with the workflow. Give the job its working_dir or py_modules "
                "again (ray.init(runtime_env=...) uploads them), then submit the workflow."
            )
        digest = _digests[uri] = hashlib.sha256(data).hexdigest()
    return digest


def kept(storage: Storage, environment: dict[str, Any] | None) -> bool:
    """Whether this process has seen every package of ``environment`` in ``storage``."""
    packages = (environment or {}).get("packages") or {}
    return all((storage.uri, digest) in _stored for digest in packages.values())


async def keep(storage: Storage, environment: dict[str, Any] | None) -> None:
    """Copy the environment's packages from this cluster's GCS to ``storage`` (those
    not there yet): before the workflow's plan is stored."""
    for uri, digest in sorted(((environment or {}).get("packages") or {}).items()):
        if (storage.uri, digest) in _stored:
            continue
        key = package_key(digest)
        if not await storage.exists(key):
            data = await asyncio.to_thread(_gcs_get, uri)
            if data is None or hashlib.sha256(data).hexdigest() != digest:
                raise WorkflowError(
                    f"The runtime_env package {uri} changed or left this Ray cluster before "
                    "the workflow was stored; submit the workflow again."
                )
            await storage.put_if_absent(key, data)
            log.info("runtime_env.package_stored", uri=uri, sha256=digest, size=len(data))
        _stored.add((storage.uri, digest))


async def restore(storage: Storage, workflow_id: str, plan: Plan, mode: str) -> None:
    """Put back into this cluster's GCS each recorded package it lacks, from
    ``storage``: before a resumed run of the workflow submits any task."""
    if mode != RECORDED:
        return
    for uri, digest in sorted(((plan.environment or {}).get("packages") or {}).items()):
        if await asyncio.to_thread(_gcs_exists, uri):
            continue
        data = await storage.get(package_key(digest))
        if data is None or hashlib.sha256(data).hexdigest() != digest:
            raise WorkflowNotResumableError(
                f"Workflow {workflow_id!r} runs with the runtime_env package {uri}, which "
                "this cluster does not have, and the storage holds no intact copy of it "
                f"({package_key(digest)}). Resume it where that package exists, or with "
                "runtime_env='current' (RAY_WORKFLOWS_RUNTIME_ENV=current) to run its "
                "tasks with the cluster's code.",
                workflow_id=workflow_id,
            )
        await asyncio.to_thread(_gcs_put, uri, data)
        log.info("runtime_env.package_restored", workflow_id=workflow_id, uri=uri)


def dresser(plan: Plan, mode: str) -> Dresser | None:
    """What gives each task of a run of ``plan`` the recorded job environment
    (``None`` if there is none, or in the ``current`` mode)."""
    job = (plan.environment or {}).get("job")
    return Dresser(job) if job and mode == RECORDED else None


class Dresser:
    """Gives a task the recorded job environment: merged into its own ``runtime_env``
    option. Tasks share their options (the compiler makes one per function and
    distinct options), so each is dressed once."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self._dressed: dict[int, tuple[TaskOptions, TaskOptions]] = {}

    def __call__(self, spec: TaskSpec) -> TaskSpec:
        if spec.kind != "function":  # events and waits run in the runner, not as Ray tasks
            return spec
        opts = spec.options
        found = self._dressed.get(id(opts))
        if found is None or found[0] is not opts:
            ray_options = opts.ray_options
            env = merged(self.job, ray_options.get("runtime_env"))
            dressed = dataclasses.replace(opts, ray_options={**ray_options, "runtime_env": env})
            found = self._dressed[id(opts)] = (opts, dressed)
            if len(self._dressed) > 4096:
                self._dressed.clear()
        return dataclasses.replace(spec, options=found[1])


# Ray keeps runtime_env packages in the GCS key/value store, under their URI and
# outside any namespace.
def _gcs_get(uri: str) -> bytes | None:
    return cluster_kv.read(None, uri.encode())


def _gcs_exists(uri: str) -> bool:
    return cluster_kv.exists(None, uri.encode())


def _gcs_put(uri: str, data: bytes) -> None:
    cluster_kv.create(None, uri.encode(), data)


__all__ = [
    "CURRENT",
    "MODES",
    "RECORDED",
    "Dresser",
    "dresser",
    "job_runtime_env",
    "keep",
    "kept",
    "merged",
    "package_uris",
    "record",
    "restore",
]
