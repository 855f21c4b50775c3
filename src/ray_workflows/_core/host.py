"""Hosting: a small workflow's runner in a Ray task its caller submits.

Many small workflows started at once made the manager actor's CPU the limit: each
cost it an actor call, a run's bookkeeping and its commits, one after another in one
process. A small chain does not need the manager: its caller stores it (as every
caller-stored start does, see :func:`ray_workflows._core.client.start`), grants its lease to a
name of its own (:func:`host_owner`) and submits one Ray task, :func:`run`, whose
ref is the ref ``run_async`` returns. That task *hosts the runner*: the same
:class:`~ray_workflows._core.engine.Engine` and :class:`~ray_workflows._core.scheduler.WorkflowRun`
the manager uses, in the worker's process, whose placement runs each task with Ray's
default options *in place* (:mod:`ray_workflows._core.placement`): in this process, through
the same worker entry point, without a Ray task of its own. Retries, commits, the
final status, leases and fencing are the runner's, written once.

What differs is only where the runner lives:

* **A dead host.** Ray runs the task again (system failures only); the new attempt
  resumes the workflow from its checkpoints, taking over at once the lease its dead
  predecessor held (the same owner name: an engine takes over the leases of owners it
  was given to host).
* **A driver that exits.** Ray ends the driver's tasks with it, the hosts among them.
  At exit the driver waits up to ``Settings.host_exit_wait`` seconds
  (``RAY_WORKFLOWS_HOST_EXIT_WAIT``, 2) for the workflows it hosts, then hands the
  rest to the manager, which takes them over at once (:func:`hand_over_at_exit`); a
  killed driver leaves them to the manager's recovery sweep, once their leases run
  out. Either way a task under way runs again.
* **Cancel.** The manager asks the host to stop through storage (``cancels/<id>``,
  see :meth:`Engine.cancel`); the host looks every second.
* **Eligible** (:func:`eligible`): a chain of 2 to :data:`MAX_TASKS` function tasks,
  each taking the previous one's output as a plain argument, with Ray's default
  options, checkpointed, no ObjectRef arguments, no events. A longer or wider
  workflow, one that waits for events, or one whose caller cannot store it, goes to
  the manager.

Off by default; ``Settings.host`` (``RAY_WORKFLOWS_HOST=1`` in the driver) turns it on.
It is slower than the manager today (docs/performance.md has the figures): each host
holds a CPU slot for its whole workflow, its durable commits included, and the
asyncio runner in a worker pays thread hops (the bridge loop, the in-place thread,
the storage threads, the object store) that the manager shares among many workflows.
"""

from __future__ import annotations

import atexit
import pickle
import secrets
from typing import Any

import ray

from ray_workflows._core import bridge, incarnation, signing
from ray_workflows._core.engine import Engine
from ray_workflows._core.plan import Plan
from ray_workflows._core.settings import Settings
from ray_workflows._core.store import WorkflowStore

#: A longer chain goes to the manager: it is rarely all quick, and a plan that size
#: costs the manager little next to its tasks.
MAX_TASKS = 64

_engines: dict[Settings, Engine] = {}  # per driver settings, in this worker process


def eligible(plan: Plan) -> bool:
    """Whether ``plan`` may be hosted (see the module's docs). Not a single task: that
    is most often the root of a dynamic workflow, whose continuations are better off
    in the manager, where their tasks run in parallel."""
    if not 2 <= len(plan.tasks) <= MAX_TASKS:
        return False
    previous: str | None = None
    for tid, spec in plan.tasks.items():
        if (
            spec.kind != "function"
            or spec.arg_refs
            or spec.options.ray_options
            or not spec.checkpoint
            or spec.upstream != ([] if previous is None else [previous])
            or (previous is not None and (spec.direct != [True] or spec.nested != [False]))
        ):
            return False
        previous = tid
    return previous == plan.output_task_id


HOST_PREFIX = "host:"


def host_owner() -> str:
    """A lease owner name for one hosted workflow: its cluster, and a random part."""
    return f"{HOST_PREFIX}{incarnation.cluster_token()}|{secrets.token_hex(8)}"


def is_host(owner: str) -> bool:
    return owner.startswith(HOST_PREFIX)


#: How long a driver that exits waits for the workflows it hosts before it hands the
#: rest to the manager (``Settings.host_exit_wait`` of its latest hosted start).
_exit_wait: float = Settings.host_exit_wait

# This driver's hosted workflows still running: id -> (ref of its host, owner, manager).
_running: dict[str, tuple[Any, str, Any]] = {}
_at_exit = False
_prune_at = 256


def started(wid: str, ref: Any, owner: str, manager: Any, exit_wait: float) -> None:
    """Track a hosted workflow this process submitted, for :func:`hand_over_at_exit`,
    which waits up to ``exit_wait`` seconds for it."""
    global _at_exit, _exit_wait
    _exit_wait = exit_wait
    if not _at_exit:
        atexit.register(hand_over_at_exit)
        _at_exit = True
    global _prune_at
    if len(_running) >= _prune_at:  # forget the finished ones now and then
        for key in [k for k, (r, _, _) in _running.items() if _done(r)]:
            del _running[key]
        _prune_at = len(_running) + 256
    _running[wid] = (ref, owner, manager)


def _done(ref: Any) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)


def hand_over_at_exit() -> None:
    """At the driver's exit Ray ends its tasks, the hosts among them: wait up to
    ``host_exit_wait`` seconds (of the settings) for the workflows they run, then ask
    the manager to take the rest over at once (else it resumes them once their leases
    run out)."""
    try:
        if not ray.is_initialized() or not _running:
            return
        refs = {wid: ref for wid, (ref, _, _) in _running.items()}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=_exit_wait)
        left: dict[Any, list[tuple[str, str]]] = {}
        for wid, (ref, owner, manager) in _running.items():
            if not _done(ref):
                left.setdefault(manager, []).append((wid, owner))
        for manager, runs in left.items():
            ray.get(manager.take_over.remote(runs), timeout=30)
    except Exception:  # the driver is exiting: the leases run out by themselves
        pass
    finally:
        _running.clear()


def call(
    wid: str, plan: bytes, meta: dict[str, Any], settings: Settings, lease: bytes, owner: str
) -> bytes:
    """The one argument of :func:`run` (one pickled argument: Ray's cost is per
    argument). ``settings`` are the driver's: the host reads no knob from its own
    environment."""
    return pickle.dumps((wid, plan, meta, settings, lease, owner), protocol=5)


def run(data: bytes) -> Any:
    """The hosting Ray task: run the workflow to its end here; return its output."""
    wid, plan, meta, settings, lease, owner = pickle.loads(data)
    return bridge.run(_run(wid, plan, meta, settings, lease, owner, _attempt()))


async def _run(
    wid: str,
    plan: bytes,
    meta: dict[str, Any],
    settings: Settings,
    lease: bytes,
    owner: str,
    attempt: int,
) -> Any:
    engine = _engine(settings)
    if attempt == 0:
        decoded = WorkflowStore.decode_plan(plan, f"the plan of {wid!r}")
        finished = await engine.adopt(wid, decoded, meta, lease, owner)
    else:  # an earlier attempt died: go on from its checkpoints, under its lease
        engine.leases.act_for(wid, owner)
        finished = await engine.resume(wid, existing_ok=True)
    return await (await finished)


def _engine(settings: Settings) -> Engine:
    engine = _engines.get(settings)
    if engine is None:
        signing.publish(settings.storage, settings.signing_key)
        engine = _engines[settings] = Engine(
            signing.engine_storage(settings.storage),
            lease_ttl=settings.lease_ttl,
            clock=settings.clock,
            here=True,
        )
        engine.executor.use(settings)
        engine.watch_cancels()
    return engine


def _attempt() -> int:
    """Which attempt of this Ray task this is (0 unless Ray ran it again)."""
    core = getattr(ray._private.worker.global_worker, "core_worker", None)
    get = getattr(core, "get_current_task_attempt_number", None)
    return int(get()) if get is not None else 0


__all__ = [
    "HOST_PREFIX",
    "MAX_TASKS",
    "call",
    "eligible",
    "host_owner",
    "is_host",
    "run",
    "started",
]
