"""Direct runs: a small workflow run by one Ray task that its caller submits.

A chain of plain tasks (each takes the previous one's output; Ray's default
resources; checkpointed) needs no scheduling: its tasks run one after another
whatever runs them. Where the caller stores a new workflow itself
(:func:`ray_workflows.aio.start`), it submits such a chain as one Ray task,
:func:`run`, instead of handing it to the manager, and the ref of that task is
the ref ``run_async`` returns. The manager takes no part unless something
unusual happens: when many small workflows start at once, the manager actor's
CPU per workflow was the limit (docs/performance.md).

The worker does what the scheduler would, with the scheduler's own code for an
attempt (``worker._execute``), retries and backoff:

* **The lease.** The caller grants the workflow's lease to a direct owner
  (:func:`owner_id`: ``direct:<cluster>|<session>|<job>|...``), so no manager
  resumes it while it runs. A thread renews it every ``ttl / 3``. A manager takes
  it over at once when that owner is dead: its cluster restarted (another
  session) or its job (the driver) ended, which ends its tasks
  (:class:`DeadOwners`); another cluster's direct run is waited for until expiry.
* **Checkpoints.** Outputs go in packs, as the scheduler commits them. Before a
  task whose function has not run quickly in this process yet, everything before
  it is made durable; so is everything done once a task has been running for
  ``FUSED_FLUSH_SECONDS`` (by the thread); the rest, with the final status, in
  one durable batch at the end. So a crash may run again only the quick tasks of
  the last ``FUSED_FLUSH_SECONDS``, as the manager's pack window allows.
* **Failures.** Errors are retried as the task's options say; a workflow that
  fails is stored FAILED and raises what the manager raises. A worker that dies
  makes Ray run the task again: the new attempt resumes from the stored
  checkpoints and charges the death to the first task without one, as the
  scheduler charges a system failure.
* **Cancel.** A cancel stores CANCELED. The run stops at its next task boundary;
  a task still running a second later is stopped the way ``ray.cancel(force=True)``
  does it, by ending its worker process (the attempt Ray makes then only reports
  the cancel). Checkpoints stay, as they do for a cancel in the manager.
* **Hand-over.** A task that continues into a sub-workflow (stored as the
  scheduler stores it), a lost lease, or a status that another writer stored,
  hands the workflow to the manager: what is done is committed while the run
  still holds its lease, the lease released, and the manager's reply returned. A
  run that lost its lease to a manager (its driver handed it over at exit, or its
  lease ran out while a task held the worker) writes nothing more; a pack of its
  that it finds stored with other records means the same, and the manager's
  records stand.

The stored records are the ones a run by the manager writes, so any manager can
resume, query, cancel or delete a workflow started directly.
``RAY_WORKFLOWS_DIRECT=0`` turns direct runs off.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pickle
import threading
import time
from collections.abc import Iterable
from typing import Any

import ray
from ray.exceptions import RayTaskError

from ray_workflows import bridge
from ray_workflows.exceptions import WorkflowCancellationError, WorkflowError
from ray_workflows.ids import IdAllocator
from ray_workflows.lease import DIRECT_PREFIX, BlockingLease, is_direct, new_owner_id
from ray_workflows.log import get_logger
from ray_workflows.plan import Plan, TaskSpec
from ray_workflows.plugins import open_storage
from ray_workflows.scheduler import TaskFailure, execution_error, retry_delay
from ray_workflows.status import WorkflowStatus
from ray_workflows.storage import Storage
from ray_workflows.store import (
    WorkflowStore,
    decode_pack,
    encode_pack,
    ids_key,
    pack_ref,
    status_key,
    task_key,
    wf_prefix,
)
from ray_workflows.worker import (
    FUSED_FLUSH_SECONDS,
    Receipt,
    _copy,
    _execute,
    load_output,
    task_call,
)

ENV_DIRECT = "RAY_WORKFLOWS_DIRECT"
#: A longer chain goes to the manager: it is rarely all quick, and a plan that size
#: costs the manager little next to its tasks.
MAX_TASKS = 64
#: How often a run that has lasted this long looks for a cancel while a task runs.
CANCEL_POLL_SECONDS = 1.0

log = get_logger()


def enabled() -> bool:
    return os.environ.get(ENV_DIRECT, "1").strip().lower() not in ("0", "false", "no", "off")


def eligible(plan: Plan) -> bool:
    """Whether ``plan`` can run directly: a chain of 2 to :data:`MAX_TASKS` plain,
    checkpointed tasks with Ray's default options and no ObjectRef arguments, each
    taking the previous task's output as a direct argument.

    Not a single task: that is most often the root of a dynamic workflow, and a
    continuation is handed to the manager by a worker that then waits for it, which
    costs Ray a new worker process (fib(12) by continuations took 2.0-2.6 s instead
    of 1.2 s)."""
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


def _core() -> Any:
    return getattr(ray._private.worker.global_worker, "core_worker", None)


def supported() -> bool:
    """Whether this Ray tells a task that it is a retry (the retry must know)."""
    return hasattr(_core(), "get_current_task_attempt_number")


def caller_may() -> bool:
    """Whether this process may start direct runs: a driver. A task or actor (say, a
    Serve replica) may outlive the job in the owner id, which would look dead."""
    worker: Any = ray._private.worker.global_worker
    return bool(getattr(worker, "mode", None) == ray.SCRIPT_MODE)


def _session() -> str:
    node = getattr(ray._private.worker.global_worker, "node", None)
    return str(getattr(node, "session_name", "") or "")


def owner_id() -> str:
    """A direct owner for a run this process starts: its cluster, the cluster's
    session, its job, then what any owner id has (see :func:`lease.new_owner_id`)."""
    ctx = ray.get_runtime_context()
    return new_owner_id(f"{DIRECT_PREFIX}{ctx.gcs_address}|{_session()}|{ctx.get_job_id()}|")


class DeadOwners:
    """``owner -> bool``: whether a direct owner of this cluster is dead (for the
    manager's leases: its run is taken over at once, not after its lease expires).
    Dead means its cluster restarted since (another session at the same address)
    or its job ended: Ray ends a job's tasks with its driver (only drivers run
    directly, see :func:`caller_may`). The job table is read at most once a second."""

    def __init__(self) -> None:
        self._dead: set[str] = set()
        self._read_at = -1.0
        self._given_up: set[str] = set()  # owners whose driver handed their runs over

    def add(self, owners: Iterable[str]) -> None:
        self._given_up.update(owners)
        if len(self._given_up) > 100_000:
            self._given_up.clear()  # (their leases expire by themselves meanwhile)

    def __call__(self, owner: str) -> bool:
        if not is_direct(owner):
            return False
        if owner in self._given_up:
            return True
        parts = owner[len(DIRECT_PREFIX) :].split("|", 3)
        if len(parts) != 4 or parts[0] != ray.get_runtime_context().gcs_address:
            return False  # another cluster's run: it may be alive; wait for the expiry
        if parts[1] != _session():
            return True
        return parts[2] in self._dead_jobs()

    def _dead_jobs(self) -> set[str]:
        """Jobs the table says ended (a job not in it yet is alive: it just started)."""
        now = time.monotonic()
        if now - self._read_at > 1.0:
            try:
                worker: Any = ray._private.worker.global_worker
                jobs = worker.gcs_client.get_all_job_info(
                    skip_submission_job_info_field=True,
                    skip_is_running_tasks_field=True,
                    timeout=5,
                )
            except Exception as exc:  # unknown: alive (its lease expires by itself)
                log.warning("lease.job_table_unreadable", error=str(exc))
                return self._dead
            self._dead = {job.hex() for job, info in jobs.items() if info.is_dead}
            self._read_at = now
        return self._dead


def call(
    wid: str, plan: bytes, meta: dict[str, Any], uri: str, owner: str, lease: bytes, manager: str
) -> bytes:
    """The one argument of :func:`run` (one pickled argument: Ray's cost is per argument)."""
    return pickle.dumps((wid, plan, meta, uri, owner, lease, manager), protocol=5)


_remote: Any = None
#: This driver's direct runs that may still be running: workflow id -> (ref, owner,
#: manager name), for :func:`hand_over_at_exit`.
_running: dict[str, tuple[Any, str, str]] = {}
ENV_EXIT_WAIT = "RAY_WORKFLOWS_DIRECT_EXIT_WAIT"


def submit(data: bytes, wid: str, owner: str, manager: str) -> Any:
    """Submit :func:`run` for ``data`` (from :func:`call`); the ref of the output."""
    global _remote
    if _remote is None:
        # Ray runs it again after its worker dies, for as long as the tasks' own
        # max_retries allow (the new attempt counts; see _DirectRun.go).
        _remote = ray.remote(run).options(
            name="ray_workflows.direct", max_retries=-1, retry_exceptions=False
        )
        atexit.register(hand_over_at_exit)  # after ray.init's: runs before Ray's shutdown
    ref = _remote.remote(data)
    if len(_running) >= 1024:
        _prune()
    _running[wid] = (ref, owner, manager)
    return ref


def _prune() -> None:
    refs = [ref for ref, _, _ in _running.values()]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
    done = set(ready)
    for wid in [w for w, (ref, _, _) in _running.items() if ref in done]:
        del _running[wid]


def hand_over_at_exit() -> None:
    """At this driver's exit, Ray ends the tasks it owns: wait a little for its direct
    runs to finish (``RAY_WORKFLOWS_DIRECT_EXIT_WAIT`` seconds, default 2), then hand
    the rest to their manager, which resumes them from their checkpoints at once (a
    task under way may then run twice, as after a crash)."""
    if not _running or not ray.is_initialized():
        return
    try:
        wait = float(os.environ.get(ENV_EXIT_WAIT, "2"))
        refs = [ref for ref, _, _ in _running.values()]
        ray.wait(refs, num_returns=len(refs), timeout=wait, fetch_local=False)
        _prune()
        by_manager: dict[str, list[tuple[str, str]]] = {}
        for wid, (_, owner, manager) in _running.items():
            by_manager.setdefault(manager, []).append((wid, owner))
        from ray_workflows.manager import NAMESPACE

        for manager, runs in by_manager.items():
            handle = ray.get_actor(manager, namespace=NAMESPACE)
            taken: Any = ray.get(handle.take_over.remote(runs), timeout=30)
            log.info("workflow.direct_handed_over_at_exit", workflows=taken)
    except Exception as exc:  # they resume later anyway: their driver's job is dead
        log.warning("direct.exit_hand_over_failed", error=str(exc))
    _running.clear()


def run(data: bytes) -> Any:
    """A direct run, as a Ray task: returns the workflow's output."""
    return _DirectRun(*pickle.loads(data)).go()


#: What the last attempt of each function took in this process (monotonic seconds).
_durations: dict[str, float] = {}


class _Keeper:
    """One thread per worker process for the direct runs in it: renews their
    leases, commits what a run has done once a task has run for
    ``FUSED_FLUSH_SECONDS``, and looks for a cancel of a run that lasts."""

    def __init__(self) -> None:
        self._runs: set[_DirectRun] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

        self._deadline = float("inf")  # when the thread wakes up next
        self._active_at = -1.0  # when a run was last added

    #: While runs come and go, the thread looks at them this often: a flush is due
    #: 20 ms into a task, and waking the thread for each run would cost more.
    TICK = 0.01

    def add(self, run: _DirectRun) -> None:
        with self._cond:
            self._runs.add(run)
            self._active_at = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ray-workflows-direct", daemon=True
                )
                self._thread.start()
            if self._deadline > self._active_at + self.TICK:  # asleep for long
                self._cond.notify()

    def discard(self, run: _DirectRun) -> None:
        with self._cond:
            self._runs.discard(run)

    def _run(self) -> None:
        while True:
            with self._cond:
                runs = list(self._runs)
                now = time.monotonic()
                due = min((r.due() for r in runs), default=now + 3600)
                if runs or now - self._active_at < 1.0:
                    due = min(due, now + self.TICK)
                wait = due - now
                if wait > 0:
                    self._deadline = due
                    self._cond.wait(wait)
                    self._deadline = float("inf")
                    continue
            for r in runs:
                try:
                    r.tend()
                except Exception:  # never let the thread die; the run sees its lease
                    log.exception("direct.keeper_failed", workflow_id=r.wid)


_keeper = _Keeper()


class _DirectRun:
    renew_at: float  # when the keeper renews the lease next (see _renewed)

    def __init__(
        self,
        wid: str,
        plan: bytes,
        meta: dict[str, Any],
        uri: str,
        owner: str,
        lease: bytes,
        manager: str,
    ) -> None:
        self.wid, self.encoded, self.meta, self.owner = wid, plan, meta, owner
        self.manager = manager
        self.storage: Storage = open_storage(uri)
        self.lease = BlockingLease(self.storage, wid, lease)
        self.members: dict[str, bytes] = {}  # output records not committed yet
        self.pack: str | None = None
        self.log = log.bind(workflow_id=wid)
        self._lock = threading.Lock()  # the records, between this thread and the keeper
        now = time.monotonic()
        self.began = now
        self._renewed()
        self.flush_at: float | None = None  # while a task runs with records queued
        self.poll_at = now + CANCEL_POLL_SECONDS

    # -- the keeper's side ------------------------------------------------------
    def due(self) -> float:
        return min(self.renew_at, self.poll_at, self.flush_at or self.renew_at)

    def tend(self) -> None:
        now = time.monotonic()
        if self.flush_at is not None and now >= self.flush_at:
            self.flush_at = None
            self._commit({})
        if now >= self.renew_at:
            self.renew_at = now + self.lease.info.ttl / 3
            self.lease.renew()
        if now >= self.poll_at:
            self.poll_at = now + CANCEL_POLL_SECONDS
            stored = self._stored_meta()
            if stored is not None and stored.get("status") == WorkflowStatus.CANCELED.value:
                # As ray.cancel(force=True) stops a task: its process ends. Ray runs this
                # task again, and that attempt reports the cancel (see go()).
                self._commit({})
                self.log.info("workflow.canceled", direct=True, note="ending the worker")
                os._exit(1)

    # -- running ------------------------------------------------------------------
    def go(self) -> Any:
        plan = WorkflowStore.decode_plan(self.encoded, f"the plan of {self.wid!r}")
        retry = _core().get_current_task_attempt_number()
        current: list[str] = [next(iter(plan.tasks))]  # the task under way, for errors
        try:
            if retry > 0:
                resumed = self._resumed(plan, retry)
            elif not self.lease.valid():  # queued for CPUs until its grant ran out
                resumed = _Reply(lambda: self._hand_over(self.lease))
            else:
                # (A cancel while it was queued is seen at the first task boundary after
                # 20 ms, or by the final status: no read before a quick chain.)
                resumed = (0, (), 0)
            if isinstance(resumed, _Reply):
                return resumed.reply()
            _keeper.add(self)
            try:
                return self._run(plan, *resumed, current)
            finally:
                _keeper.discard(self)
        except WorkflowError:
            raise  # what the run answers (a failure, a cancel, the manager's reply)
        except Exception as exc:  # a bug or a storage failure: fail the workflow loudly
            self.log.exception("direct.error", task_id=current[0])
            failure = TaskFailure(current[0], None, f"{type(exc).__name__}: {exc}")
            return self._failure(failure, exc).reply()

    def _resumed(self, plan: Plan, retry: int) -> tuple[int, tuple[Any, ...], int] | _Reply:
        """After Ray ran this task again (its worker died): where to go on from (as the
        manager's recovery would), or what to answer instead."""
        held = BlockingLease.stored(self.storage, self.wid, self.owner)
        self.log.info("workflow.direct_retried", attempt=retry, held=held is not None)
        if held is None or not (held.valid() or held.renew()):
            return _Reply(lambda: self._hand_over(None))  # taken over: the manager has it
        self.lease = held
        self._renewed()
        stored = self._stored_meta()
        if stored is not None:
            return _Reply(lambda: self._after(stored))
        records = bridge.run(WorkflowStore(self.storage).task_records(self.wid))
        if any("cont" in r for r in records.values()):
            return _Reply(lambda: self._hand_over(self.lease))  # the recovery follows it
        specs = list(plan.tasks.values())
        start = len(specs)
        while start > 0 and "out" not in records.get(specs[start - 1].task_id, set()):
            start -= 1
        values: tuple[Any, ...] = ()
        if start > 0:
            ref = records.output_ref(specs[start - 1].task_id)
            values = (load_output(self.storage, self.wid, None, ref),)
        if start == len(specs):  # it finished but died before its status: store it now
            return _Reply(lambda: self._finish(values[0], ref))
        # The death is charged to the task that was under way, with the earlier ones
        # of the same task (stored: Ray's attempt number counts those of every task).
        key = task_key(self.wid, specs[start].task_id, "deaths")
        data = bridge.run(self.storage.get(key))
        deaths = (int(data) if data else 0) + 1
        bridge.run(self.storage.put(key, str(deaths).encode()))
        return start, values, deaths

    def _renewed(self) -> None:
        """Schedule the next renewal from the record's own renewal time."""
        left = self.lease.info.renewed_at + self.lease.info.ttl / 3 - time.time()
        self.renew_at = time.monotonic() + max(0.0, left)

    def _run(
        self,
        plan: Plan,
        start: int,
        values: tuple[Any, ...],
        charged: int,
        current: list[str],
    ) -> Any:
        specs = list(plan.tasks.values())
        value: Any = None
        output_ref = ""
        for i in range(start, len(specs)):
            spec = specs[i]
            current[0] = spec.task_id
            if i > start and time.monotonic() - self.began > FUSED_FLUSH_SECONDS:
                if not self.lease.valid():
                    return self._hand_over(self.lease)
                stored = self._stored_meta()
                if stored is not None:  # canceled, or taken over by a manager, meanwhile
                    return self._after(stored)
            if self.members and _durations.get(spec.func_key, 1.0) > FUSED_FLUSH_SECONDS:
                self._commit({})  # before a task that may take long
            if self.lease.lost:  # (a renewal or a commit found that another run has it)
                return self._hand_over(self.lease)
            receipt, value = self._attempts(plan, spec, values, charged if i == start else 0)
            if isinstance(receipt, _Reply):
                return receipt.reply()
            if receipt.kind == "continuation":
                self._continued(spec.task_id, receipt, plan)
                return self._hand_over(self.lease)
            output_ref = self._add(spec.task_id, receipt)
            if charged and i + 1 < len(specs):
                # After a death, each output at once: the next death must be charged
                # to the task that died, not to one whose output it lost.
                self._commit({})
            if i + 1 < len(specs):
                assert receipt.pickled is not None
                values = (_copy(value, receipt.pickled),)
        return self._finish(value, output_ref)

    def _attempts(
        self, plan: Plan, spec: TaskSpec, values: tuple[Any, ...], deaths: int
    ) -> tuple[Any, Any]:
        """Run ``spec`` until it succeeds or may not be retried; ``deaths``: workers
        that died running it, each an attempt (a system failure, as in the scheduler)."""
        retries = spec.options.max_retries
        attempt = deaths
        if deaths and retries != -1 and deaths > retries:
            text = f"WorkerCrashedError: the worker running the task died {deaths} times"
            return self._failure(TaskFailure(spec.task_id, None, text)), None
        header = task_call(self.wid, self.storage, spec, [0] if spec.upstream else [])
        func = plan.functions[spec.func_key]
        while True:
            began = time.monotonic()
            with self._lock:
                if self.members:
                    self.flush_at = began + FUSED_FLUSH_SECONDS  # (the keeper's next tick)
            try:
                receipt, value = _execute(header, attempt, func, None, values)
            finally:
                with self._lock:
                    self.flush_at = None
            _durations[spec.func_key] = time.monotonic() - began
            if len(_durations) > 1024:
                _durations.pop(next(iter(_durations)))
            if receipt.kind != "error":
                return receipt, value
            if not receipt.retryable or (retries != -1 and attempt >= retries):
                failure = TaskFailure(spec.task_id, receipt.error, receipt.error_text)
                return self._failure(failure), None
            self._commit({})  # the outputs before it, while it waits (as the manager would)
            time.sleep(retry_delay(attempt))
            attempt += 1

    # -- records ------------------------------------------------------------------
    def _add(self, tid: str, receipt: Receipt) -> str:
        """Queue ``tid``'s output record (a big one the attempt wrote itself)."""
        if receipt.record is None:
            return task_key(self.wid, tid, "out")
        with self._lock:
            if self.pack is None:
                self.pack = task_key(self.wid, tid, "pack")
            self.members[tid] = receipt.record
            return pack_ref(self.pack, tid)

    def _create(self, items: dict[str, bytes]) -> dict[str, bool]:
        if self.storage.blocking_batches:
            return self.storage.put_if_absent_many_blocking(items)
        return bridge.run(self.storage.put_if_absent_many(items))

    def _commit(self, status: dict[str, bytes]) -> dict[str, bool]:
        """Make the queued records durable, then ``status`` (in one batch where the
        storage keeps a batch's order). Returns what was created: nothing of ``status``
        where another run stored the pack first (see :meth:`_ours`), or at all once
        the lease is known lost (a renewal found another owner's record)."""
        with self._lock:
            if self.lease.lost:
                self.members, self.pack = {}, None
                return {}
            records = {}
            if self.members:
                assert self.pack is not None
                records[self.pack] = encode_pack(self.members)
            if status and records and not self.storage.ordered_batches:
                if not self._create(records)[next(iter(records))] and not self._ours():
                    return {}
                records = {}
            created = self._create({**records, **status})
            if records and not created[next(iter(records))]:
                self._ours()
            self.members, self.pack = {}, None
            return created

    def _ours(self) -> bool:
        """Whether the pack that this run found stored holds its own records (an earlier
        write of it that raised but landed). If not, another run of the workflow stored
        it: a manager that took the workflow over (its driver handed it over, or its
        lease ran out while a task held up this worker), which holds the lease now and
        stored its status before any pack (so a status of this run's batch is not
        created either). Its records stand; this run drops its own and hands over."""
        assert self.pack is not None
        data = bridge.run(self.storage.get(self.pack))
        stored = decode_pack(data, self.pack) if data is not None else {}
        if all(stored.get(tid) == record for tid, record in self.members.items()):
            return True
        self.log.warning("direct.superseded", key=self.pack, note="another run stored it first")
        self.members, self.pack = {}, None
        self.lease.lose()
        return False

    def _stored_meta(self) -> dict[str, Any] | None:
        """meta.json, which no one writes while a direct run goes on but a cancel."""
        data = bridge.run(self.storage.get(wf_prefix(self.wid) + "meta.json"))
        return None if data is None else dict(json.loads(data))

    def _status(self, status: WorkflowStatus, **fields: Any) -> dict[str, Any] | None:
        """Store the final ``status`` after the queued records; the meta.json stored
        instead if another writer (a cancel) stored one first."""
        meta = dict(self.meta, status=status.value, end_time=time.time(), **fields)
        meta_key = wf_prefix(self.wid) + "meta.json"
        marker = status_key(status.value, self.wid)
        created = self._commit({marker: b"", meta_key: json.dumps(meta).encode()})
        if not created.get(meta_key):
            if created.get(marker):
                self._discard(marker)
            return self._stored_meta() or {"status": WorkflowStatus.RUNNING.value}
        # Once the new marker is durable, as WorkflowStore.queue_meta does.
        self._discard(status_key(WorkflowStatus.RUNNING.value, self.wid))
        return None

    def _discard(self, key: str) -> None:
        if self.storage.blocking_batches:
            with contextlib.suppress(NotImplementedError):  # (a plugin without it)
                self.storage.discard_many_blocking([key])
                return
        bridge.run(self.storage.discard_many([key]))

    # -- endings ------------------------------------------------------------------
    def _finish(self, value: Any, output_ref: str) -> Any:
        if not self.lease.valid():
            return self._hand_over(self.lease)
        try:
            other = self._status(WorkflowStatus.SUCCESSFUL, output_key=output_ref)
        except Exception as exc:  # the checkpoints could not be stored
            failure = TaskFailure(
                next(iter(self.members), ""), None, f"{type(exc).__name__}: {exc}"
            )
            return self._failure(failure, exc).reply()
        if other is not None:
            return self._after(other)
        # The lease is left to expire, as the manager leaves a finished workflow's.
        self.log.info("workflow.succeeded", direct=True)
        return value

    def _failure(self, failure: TaskFailure, cause: BaseException | None = None) -> _Reply:
        """The workflow failed by ``failure`` (``cause``: an error of ours, such as a
        failed write): store FAILED; what ``run`` answers."""
        error = execution_error(self.wid, failure)
        error.__cause__ = cause
        self.log.warning(
            "task.failed",
            task_id=failure.task_id,
            error=(failure.text.strip().splitlines() or [""])[-1],
        )
        if not self.lease.valid():
            return _Reply(lambda: self._hand_over(self.lease))
        if cause is not None:
            with self._lock:  # the records whose write failed (the rest is committed)
                self.members, self.pack = {}, None
        try:
            other = self._status(WorkflowStatus.FAILED, error=str(error))
        except Exception:  # not even the status: it stays RUNNING and is resumed later
            self.log.exception("workflow.status_write_failed")
            return _Reply(lambda: _raise(error))
        if other is not None:
            return _Reply(lambda: self._after(other))
        self.lease.release()  # a FAILED workflow may be resumed at once, anywhere
        return _Reply(lambda: _raise(error))

    def _after(self, meta: dict[str, Any]) -> Any:
        """Another writer stored the workflow's status first: a cancel (which leaves the
        lease to this run), or a manager that took the workflow over."""
        if meta.get("status") == WorkflowStatus.CANCELED.value:
            self._commit({})
            self._discard(status_key(WorkflowStatus.RUNNING.value, self.wid))
            self.lease.release()
            raise WorkflowCancellationError.of(self.wid)
        self.lease.lose()  # only the lease's holder writes any other status
        return self._hand_over(self.lease)

    def _continued(self, tid: str, receipt: Receipt, plan: Plan) -> None:
        """Store a continuation as the scheduler does (see ``WorkflowRun._continued``)."""
        assert receipt.plan is not None
        allocator = IdAllocator(plan.counters)
        sub = receipt.plan.renamed(allocator, creator=tid)
        self._commit({})
        if self.lease.lost:
            return  # another run has the workflow: its own run of the task decides
        cont = WorkflowStore.encode_continuation(sub, receipt.start_time, receipt.end_time)
        ids = json.dumps(dict(allocator.counters)).encode()
        bridge.run(
            self.storage.put_many({ids_key(self.wid): ids, task_key(self.wid, tid, "cont"): cont})
        )

    def _hand_over(self, lease: BlockingLease | None) -> Any:
        """Let the manager finish the workflow from what is stored; its reply. What this
        run did is committed if it holds ``lease`` (or, run out, can renew it: nobody
        took it meanwhile), and the lease released; a run that lost it writes nothing
        more: the manager runs again the tasks whose outputs were not committed."""
        from ray_workflows.aio import run_call, unwrap
        from ray_workflows.manager import NAMESPACE

        _keeper.discard(self)  # no renewals of a released lease, no cancel by exit
        if lease is not None and (lease.valid() or lease.renew()):
            self._commit({})
        else:
            with self._lock:  # not this run's to write any more
                self.members, self.pack = {}, None
        if lease is not None and not lease.lost:
            stored = self._stored_meta()
            if stored is not None and stored.get("status") == WorkflowStatus.CANCELED.value:
                return self._after(stored)
            lease.release()
        self.log.info("workflow.handed_over")
        handle = ray.get_actor(self.manager, namespace=NAMESPACE)
        reply: Any = handle.run.remote(run_call(self.wid, self.encoded, self.meta, None))
        try:
            return ray.get(reply)
        except RayTaskError as exc:
            raise unwrap(exc) from None


class _Reply:
    """What a run answers instead of going on (called once it has let go of things)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def reply(self) -> Any:
        return self.answer()


def _raise(error: BaseException) -> Any:
    raise error


__all__ = [
    "ENV_DIRECT",
    "MAX_TASKS",
    "DeadOwners",
    "call",
    "eligible",
    "enabled",
    "owner_id",
    "run",
    "submit",
    "supported",
]
