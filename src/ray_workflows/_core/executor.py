"""The Executor: how the engine hands work to Ray.

It submits task attempts (one cached remote wrapper per function and options) and
the helper tasks that load stored outputs and checkpoint ObjectRefs, and holds what
event tasks use: the clock and the mailbox. Quick ready tasks offered while the CPUs
are busy go in batches, formed by its :class:`~ray_workflows._core.batching.Batcher`.
The engine and its schedulers decide what runs; this module only knows how.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import pickle
from typing import Any

import ray

from ray_workflows._core import serialization
from ray_workflows._core.batching import Batcher, Submission
from ray_workflows._core.checkpoints import load_output, load_outputs, save_objects
from ray_workflows._core.mailbox import Mailbox
from ray_workflows._core.receipts import ReceiptWatcher
from ray_workflows._core.settings import Settings
from ray_workflows._core.store import WorkflowStore
from ray_workflows._core.wire import Attempt, Unit
from ray_workflows._core.worker import execute_group
from ray_workflows.backends.clocks import SystemClock
from ray_workflows.clock import Clock
from ray_workflows.storage import Storage

_LOAD_BATCH = 500  # stored outputs per loading helper task
_INLINE_FUNCTION_BYTES = 4096  # smaller pickled functions travel with each task
QUICK_SECONDS = 0.01  # a function whose last attempt ran shorter may be fused (quick())


class Executor:
    """Submits task attempts and helper tasks to Ray; holds what event tasks use
    (the clock and the mailbox)."""

    def __init__(
        self,
        storage: Storage,
        clock: Clock | None = None,
        *,
        here: bool = False,
        settings: Settings | None = None,
    ) -> None:
        self.storage = storage
        self.store = WorkflowStore(storage)
        self.clock: Clock = clock or SystemClock()
        # The knobs of task placement and submission (see use()); the defaults until
        # the manager (or a host) passes the driver's.
        self.settings = settings or Settings(storage.uri)
        self.mailbox = Mailbox(storage, limit=self.settings.mailbox_limit)
        self._execute = ray.remote(max_retries=0)(execute_group)
        self._load = ray.remote(num_cpus=0, max_retries=3)(load_output)
        self._load_many = ray.remote(num_cpus=0, max_retries=3)(load_outputs)
        self._save = ray.remote(num_cpus=0, max_retries=3)(save_objects)
        self._records: dict[str, dict[str, bytes]] = {}
        self.receipts = ReceiptWatcher()
        # How long each function's last successful attempt ran (see quick()).
        self._durations: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._continuing: set[str] = set()  # functions whose last attempt continued
        # `.options()` builds a new wrapper each call; one per (name, options) is kept.
        self._remotes: dict[Any, Any] = {}
        # In place (see run_here): for a runner hosted in a Ray task, whose tasks run in
        # its own process, one after another, without a Ray task each.
        self.here = here
        # How many attempts went each way (alone, batched, in place; fused, ahead): the
        # placements this executor's runs chose, for tests and a look at the engine.
        self.placed: collections.Counter[str] = collections.Counter()
        self._here_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._here_runs: set[asyncio.Task[None]] = set()
        # Pickled functions put in the object store once, shared by every run that
        # uses them (keyed by content hash), not once per workflow.
        self._functions: collections.OrderedDict[str, Any] = collections.OrderedDict()
        # Batching (see offer()): quick ready tasks share a Ray task while the CPUs
        # are busy.
        self.batcher = Batcher(self._group, self.receipts)

    def use(self, settings: Settings) -> None:
        """Run with ``settings`` from now on: the driver's, passed by the manager (or the
        Ray task that hosts a workflow). Runs started later place their tasks by them."""
        if settings.task_events != self.settings.task_events:
            self._remotes.clear()  # the wrappers carry enable_task_events
        self.settings = settings
        self.mailbox.limit = settings.mailbox_limit

    def function_ref(self, key: str, data: bytes) -> Any:
        """What a task is handed for its pickled function: the bytes themselves when
        small (a function pickled by reference), else one shared ObjectRef."""
        if len(data) <= _INLINE_FUNCTION_BYTES:
            return data
        ref = self._functions.get(key)
        if ref is None:
            ref = self._functions[key] = ray.put(data)
            if len(self._functions) > 1024:
                self._functions.popitem(last=False)
        else:
            self._functions.move_to_end(key)
        return ref

    def observe(self, func_key: str, seconds: float, *, continued: bool = False) -> None:
        """Note how long an attempt of the function ``func_key`` ran, and whether it
        returned a continuation."""
        if continued:
            self._continuing.add(func_key)
        else:
            self._continuing.discard(func_key)
        durations = self._durations
        if func_key in durations:
            durations.move_to_end(func_key)
        durations[func_key] = seconds
        if len(durations) > 4096:
            self._continuing.discard(durations.popitem(last=False)[0])

    def seconds(self, func_key: str) -> float:
        """How long the function's last attempt ran (never seen: QUICK_SECONDS)."""
        return self._durations.get(func_key, QUICK_SECONDS)

    def continues(self, func_key: str) -> bool:
        """Whether the function's last attempt returned a continuation: its output is
        not its Ray task's value, so nothing should be submitted ahead of it."""
        return func_key in self._continuing

    def quick(self, func_key: str) -> bool:
        """Whether the function's last attempt ran for less than :data:`QUICK_SECONDS`
        (never seen: no). Only such a consumer is fused into its producer's Ray task,
        so the producer's output seldom waits for it to be saved."""
        seconds = self._durations.get(func_key)
        return seconds is not None and seconds < QUICK_SECONDS

    def submit(self, sub: Submission, ray_options: dict[str, Any]) -> tuple[Any, ...]:
        """One Ray task for one unit, now, with the task's own Ray options; the refs
        of its receipts and output values, in that order."""
        return self._group([sub], sub.name, ray_options)[0]

    def _group(
        self, subs: list[Submission], name: str, ray_options: dict[str, Any]
    ) -> list[tuple[Any, ...]]:
        """One Ray task of :func:`~ray_workflows._core.worker.execute_group` for ``subs``
        (its arguments: :func:`_arguments`); per submission, the refs of its receipts
        and values."""
        units, packed, args = _arguments(subs)
        returns = sum(unit.returns for unit in units)
        remote = self._remote(self._execute, name, ray_options, num_returns=returns)
        refs = remote.remote(units, packed, *args)
        groups, at = [], 0
        for unit in units:
            groups.append(tuple(refs[at : at + unit.returns]))
            at += unit.returns
        return groups

    def run_here(self, sub: Submission) -> tuple[Any, ...]:
        """Run one unit in this process (the *in place* placement of a hosted runner,
        see :mod:`ray_workflows._core.host`): the same :func:`execute_group` a Ray task would
        run, with the same arguments, in a worker thread. Returns futures where
        :meth:`submit` returns refs: of each attempt's receipt (its wire tuple) and of
        an ObjectRef of its value (put in the object store, as a Ray task's would be)."""
        loop = asyncio.get_running_loop()
        futures = tuple(loop.create_future() for _ in range(2 * len(sub.attempts)))
        run = loop.create_task(self._here(*_arguments([sub]), futures))
        self._here_runs.add(run)
        run.add_done_callback(self._here_runs.discard)
        return futures

    async def _here(
        self,
        units: tuple[Unit, ...],
        packed: bytes,
        args: list[Any],
        futures: tuple[asyncio.Future[Any], ...],
    ) -> None:
        try:
            # What Ray would do: resolve the ObjectRefs given as arguments of their own.
            values = [await a if isinstance(a, ray.ObjectRef) else a for a in args]
            if self._here_pool is None:
                self._here_pool = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="rwf-here"
                )
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(self._here_pool, execute_group, units, packed, *values)
            results = [r if i % 2 == 0 else ray.put(r) for i, r in enumerate(out)]
        except BaseException as exc:  # as a Ray task that died: every attempt in it
            error = ray.exceptions.RayError(f"in place: {type(exc).__name__}: {exc}")
            for future in futures:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        for future, result in zip(futures, results, strict=True):
            if not future.done():
                future.set_result(result)

    def offer(self, sub: Submission) -> bool:
        """Submit a quick task (or pair) whose inputs all exist now, or hold it to go
        with others in one Ray task (see :meth:`Batcher.offer`). True if it was
        submitted now."""
        return self.batcher.offer(sub)

    def abandon(self, receipt: Any) -> None:
        """The run of a batched attempt (its receipt ref) ended before it (see
        :meth:`Batcher.abandon`)."""
        self.batcher.abandon(receipt)

    def _remote(self, execute: Any, name: str, ray_options: dict[str, Any], **extra: Any) -> Any:
        # The Ray task is named after the user's function, so the dashboard, `ray list
        # tasks` and worker log prefixes show what runs (the task id is in the logs).
        try:
            key: Any = (id(execute), name, *sorted(_frozen(ray_options)), *extra.items())
            remote = self._remotes.get(key)
        except TypeError:  # an unhashable option value
            key, remote = None, None
        if remote is None:
            # Ray's task events (the state API's and dashboard's task list) cost the worker
            # and the manager a quarter of a small task's overhead; workflow tasks report
            # through get_metadata and the logs. Settings.task_events turns them on (or a
            # task's own enable_task_events=True).
            options = {
                "name": name,
                "enable_task_events": self.settings.task_events,
                **ray_options,
                **extra,
            }
            remote = execute.options(**options)
            if key is not None and len(self._remotes) < 4096:
                self._remotes[key] = remote
        return remote

    async def preload(self, key: str, record: bytes | None = None) -> None:
        """For a storage the helper tasks cannot read (``memory://``), gather a record
        and every object record it refers to, to hand over when it is loaded."""
        if self.storage.shared:
            return
        records: dict[str, bytes] = {}
        pending = [(key, record)]
        while pending:
            name, data = pending.pop()
            if name in records:
                continue
            if data is None:
                data = await (
                    self.store.read_output(name) if name == key else self.storage.get(name)
                )
            if data is None:
                continue
            records[name] = data
            header = serialization.peek_header(data, name)
            pending.extend((ref_key, None) for ref_key in header["refs"])
        self._records[key] = records

    def load_many(self, workflow_id: str, keys: list[str]) -> list[Any]:
        """ObjectRefs of many stored outputs, loaded by a few helper tasks (a resumed
        fan-out must not start one Ray worker per input)."""
        refs: list[Any] = []
        for i in range(0, len(keys), _LOAD_BATCH):
            batch = keys[i : i + _LOAD_BATCH]
            if len(batch) == 1:
                refs.append(self.load(workflow_id, batch[0]))
                continue
            records = None
            if not self.storage.shared:
                records = {}
                for key in batch:
                    records.update(self._records.get(key) or {})
            task = self._load_many.options(num_returns=len(batch))
            loaded: Any = task.remote(self.storage, workflow_id, records, batch)
            refs.extend(loaded)
        return refs

    def load(self, workflow_id: str, key: str) -> Any:
        records = None if self.storage.shared else self._records.get(key)
        return self._load.remote(self.storage, workflow_id, records, key)

    async def save_objects(self, workflow_id: str, refs: list[Any]) -> list[str]:
        keys, writes = await self._save.remote(self.storage, workflow_id, refs)
        if writes:
            await self.storage.put_many(writes)
        return list(keys)


def _frozen(value: Any) -> Any:
    """``value`` with its dicts and lists made hashable (a runtime_env is a dict)."""
    if type(value) is dict:
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if type(value) is list:
        return ("list", *map(_frozen, value))
    return value


def _arguments(subs: list[Submission]) -> tuple[tuple[Unit, ...], bytes, list[Any]]:
    """What :func:`execute_group` gets for ``subs``: their units, their plain attempts
    pickled together (Ray's cost is per argument: 160 small arguments 1.2 ms, one
    blob 31 us), and the other arguments."""
    units: list[Unit] = []
    packed: list[tuple[Attempt, ...]] = []
    args: list[Any] = []
    for sub in subs:
        plain = all(a.plain() for a in sub.attempts)
        units.append(Unit(len(sub.attempts), plain, len(sub.values), sub.split, sub.slot))
        if plain:
            packed.append(sub.attempts)
        else:
            for attempt in sub.attempts:
                args.extend(attempt)
        args.extend(sub.values)
    return tuple(units), pickle.dumps(packed, protocol=5), args


__all__ = ["Executor", "Submission"]
