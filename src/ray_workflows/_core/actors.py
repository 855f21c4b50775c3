"""Virtual actors, the manager's side: durable state in storage, methods as Ray tasks.

Each actor's records are under ``actors/<id>/`` (the layout is in
:mod:`ray_workflows._core.keys`): its class and ``__init__`` arguments, its state after n
writer calls (``0``: after ``__init__``, which runs when the actor is first used), the
log of writer calls, each call id's number and each call's result.

A writer call is logged, run as a Ray task (restore the state into an instance made
without ``__init__``, call the method, capture the state again: that side is in
:mod:`ray_workflows._core.actor_methods`) and committed: its result, then the state
with its number, which is the commit point. Writers of one
actor run one at a time, in the order each handle made them (calls carry a per-handle
number: Ray may start one caller's calls to an async actor out of order). After a crash the
logged calls beyond the committed number run again, in order, before any new call:
a method body may run twice, its effect on the state lands once. A writer that
raises leaves the state as it was; its exception is its durable result, and the
calls after it go on. Readonly calls run on the committed state and log nothing.
A call made before ``__init__`` has finished waits for it.

A method may return a step or DAG: it is a sub-workflow, started (durably, under the
id ``<actor id>.call-<seq>``, exempt from the admission limits) before the call
commits, and the call's result is its output.

Inside a method, ``self.other.step(...)`` is a step that calls ``other`` on this
actor. It calls successfully at most once per run of its workflow: the first of its
calls that succeeded answers every later attempt of the step (one replayed by Ray to
a restarted manager, a retry after the attempt failed elsewhere, the attempts of a
resume after a crash or of a FAILED workflow). After a call that raised, the next
attempt calls again. A new run of a deleted workflow's id calls anew. The run is the
nonce ``workflows/<wid>/actor-run``, made by the first step call of the run and
deleted with the workflow (:func:`ray_workflows._core.keys.actor_run_key`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import ray
from ray import cloudpickle

from ray_workflows._core.actor_methods import pickle_outcome, run_method
from ray_workflows._core.actor_state import Captured, object_records, reseq, seq_of, state_record
from ray_workflows._core.keys import (
    actor_call_key,
    actor_call_seq,
    actor_calls_prefix,
    actor_class_key,
    actor_id_key,
    actor_result_key,
    actor_run_key,
    actor_state_key,
    actor_step_call_id,
    actor_sub_workflow_id,
)
from ray_workflows._core.log import get_logger
from ray_workflows._core.plan import Plan
from ray_workflows._core.signing import ref_of
from ray_workflows.exceptions import WorkflowError, WorkflowNotFoundError
from ray_workflows.storage import Storage

log = get_logger()


@dataclasses.dataclass
class _Actor:
    cls_bytes: bytes
    # Options given to Cls.options(...) at creation: defaults for every call's options.
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    seq: int = 0  # the number of the last committed writer call
    state: bytes = b""  # the committed state record (see actor_methods), without signature
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    # Writer calls reach the lock in each caller's order: the last order admitted per
    # caller, and the calls waiting for their predecessor.
    admitted: dict[str, int] = dataclasses.field(default_factory=dict)
    turns: dict[tuple[str, int], asyncio.Future[None]] = dataclasses.field(default_factory=dict)


class Actors:
    """Every virtual actor of one storage, as the manager runs them."""

    def __init__(
        self,
        storage: Storage,
        start_workflow: Callable[[str, Plan], Awaitable[None]] | None = None,
        workflow_output: Callable[[str], Awaitable[Any]] | None = None,
    ) -> None:
        """``start_workflow(id, plan)`` stores and starts a sub-workflow (or finds the
        one of that id) and ``workflow_output(id)`` waits for its output value."""
        self.storage = storage
        self._start_workflow, self._workflow_output = start_workflow, workflow_output
        self._actors: dict[str, _Actor] = {}
        self._loading: dict[str, asyncio.Task[_Actor]] = {}
        self._task = ray.remote(num_cpus=1, max_retries=3)(run_method)

    async def create(
        self, actor_id: str, cls_bytes: bytes, init: bytes, options: dict[str, Any] | None = None
    ) -> None:
        """Store a new actor and run its ``__init__``; an existing one is kept as it is
        (``options``, the defaults of its calls, with it)."""
        record = pickle.dumps((cls_bytes, init, options or {}), protocol=5)
        await self.storage.put_if_absent(actor_class_key(actor_id), record)
        await self._get(actor_id)

    async def running(self) -> dict[str, bool]:
        """Every actor of the storage, and whether a writer call runs (here) now."""
        ids = {k.split("/")[1] for k in await self.storage.list("actors/") if k.endswith("/class")}
        return {i: (a := self._actors.get(i)) is not None and a.lock.locked() for i in ids}

    async def class_of(self, actor_id: str) -> bytes:
        return (await self._get(actor_id)).cls_bytes

    async def call(
        self,
        actor_id: str,
        call_id: str,
        method: str,
        call: bytes,
        readonly: bool,
        ray_options: dict[str, Any],
        order: tuple[str, int] | None = None,
        step: str | None = None,
    ) -> Any:
        """Run one method call; return its value (or raise its exception). ``order``
        is ``(caller, n)``: a caller's writer calls run in the order of their ``n``
        (Ray may start one caller's calls to an async actor in another order).
        ``step``: the workflow id of the workflow task making the call
        (``self.m.step``), whose task id is ``call_id``: see :meth:`_step_call`."""
        actor = await self._get(actor_id)
        if readonly:
            # The last committed state, which another manager sharing the storage may
            # have written (the cache is changed only under the lock, by writers).
            state = await self.storage.get(actor_state_key(actor_id)) or actor.state
            _, outcome, plan = await self._run(actor_id, actor, state, method, call, ray_options)
            if plan is not None:
                # A readonly call is not logged, so a sub-workflow it started could not be
                # found again after a crash (and its steps could change the state twice).
                outcome = pickle_outcome(
                    "error",
                    TypeError(
                        f"Readonly virtual actor method {method!r} returned a step or DAG: only "
                        "writer methods (logged, so their sub-workflow survives a crash) may."
                    ),
                )
            return await self._resolve(outcome)
        run = None if step is None else await self._run_of(step)
        if order is not None:
            await _admit(actor, *order)
        async with actor.lock:
            if step is not None and run is not None:
                call_id, known = await self._step_call(actor_id, step, run, call_id)
            else:
                known = await self.storage.get(actor_id_key(actor_id, call_id))
            record = pickle.dumps((call_id, method, call, ray_options), protocol=5)
            while known is None:
                seq = actor.seq + 1
                if await self._log_call(actor_id, seq, call_id, record):
                    outcome = await self._apply(actor_id, actor, seq, method, call, ray_options)
                    break
                # Another manager sharing the storage logged call seq first: commit what
                # it logged (its calls run here too, at least once, as after a crash),
                # then take the next seq, unless the call was this one, replayed there.
                await self._catch_up(actor_id, actor)
                known = await self.storage.get(actor_id_key(actor_id, call_id))
            else:  # a replay, or a step's call that succeeded before: committed by now
                result = await self.storage.get(actor_result_key(actor_id, int(known)))
                assert result is not None, "a logged call is committed before new ones run"
                outcome = result
        # A sub-workflow is awaited without the lock: its steps may call this actor.
        return await self._resolve(outcome)

    async def _step_call(
        self, actor_id: str, workflow_id: str, run: str, task_id: str
    ) -> tuple[str, bytes | None]:
        """The call id for a step's call, and the seq of the logged call that answers it.

        A step calls at most once successfully per run of its workflow: its calls are
        ``step:<wid>:<run>:<task>:<k>``, and the first one that succeeded answers every
        later attempt (a replay, a retry after the attempt failed elsewhere, the attempts
        of a resume, whose numbers start again). After a call that raised, the next
        attempt calls again, as ``k + 1``. Under the lock: every logged call is
        committed."""
        k = 0
        while True:
            call_id = actor_step_call_id(workflow_id, run, task_id, k)
            seq = await self.storage.get(actor_id_key(actor_id, call_id))
            if seq is None:
                return call_id, None
            result = await self.storage.get(actor_result_key(actor_id, int(seq)))
            assert result is not None, "a logged call is committed before new ones run"
            if cloudpickle.loads(result)[0] != "error":
                return call_id, seq
            k += 1

    async def _log_call(self, actor_id: str, seq: int, call_id: str, record: bytes) -> bool:
        """Log the call as number ``seq``; False if another manager sharing the storage
        logged its own call there first (nothing is written then). The call before its
        id: an id whose call did not land would answer a retry of that call with the
        result of whichever call is logged next at the same seq (or with none)."""
        if not await self.storage.put_if_absent(actor_call_key(actor_id, seq), record):
            return False
        await self.storage.put(actor_id_key(actor_id, call_id), str(seq).encode())
        return True

    async def _run_of(self, workflow_id: str) -> str:
        """The nonce of the workflow's run, made by the first call that asks. Read each
        time, not cached: another manager may delete the workflow and run it again."""
        key = actor_run_key(workflow_id)
        while True:
            stored = await self.storage.get(key)
            if stored is not None:
                return stored.decode()
            # Concurrent steps of one run race here: the first write wins for all.
            await self.storage.put_if_absent(key, uuid.uuid4().hex[:16].encode())

    async def _sub_workflow(self, workflow_id: str, plan: Plan) -> bytes:
        """Start the sub-workflow a method returned; the outcome that stands for it."""
        if self._start_workflow is None:
            return pickle_outcome("error", TypeError("sub-workflows need a workflow engine"))
        try:
            await self._start_workflow(workflow_id, plan)
        except Exception as exc:  # refused (run elsewhere, say): the call's durable result
            return pickle_outcome("error", exc)
        return pickle_outcome("workflow", workflow_id)

    async def _resolve(self, outcome: bytes) -> Any:
        kind, value = cloudpickle.loads(outcome)
        if kind == "workflow":
            assert self._workflow_output is not None
            return await self._workflow_output(value)
        if kind == "error":
            raise value
        return value

    async def _get(self, actor_id: str) -> _Actor:
        actor = self._actors.get(actor_id)
        if actor is not None:
            return actor
        loading = self._loading.get(actor_id)
        if loading is None:
            loading = self._loading[actor_id] = asyncio.create_task(self._load(actor_id))
            loading.add_done_callback(lambda _: self._loading.pop(actor_id, None))
        return await asyncio.shield(loading)

    async def _load(self, actor_id: str) -> _Actor:
        """Read an actor from storage; finish its __init__ and any logged writer calls."""
        record = await self.storage.get(actor_class_key(actor_id))
        if record is None:
            raise WorkflowNotFoundError(
                f"No virtual actor {actor_id!r} in {self.storage.uri!r}; create it with "
                "Cls.get_or_create(actor_id, ...).",
                workflow_id=actor_id,
            )
        cls_bytes, init, *rest = pickle.loads(record)
        actor = _Actor(cls_bytes, rest[0] if rest else {})
        stored = await self.storage.get(actor_state_key(actor_id))
        if stored is None:  # __init__ has not committed: run it (again)
            captured, outcome, _ = await self._run(actor_id, actor, None, None, init, {})
            await self._resolve(outcome)  # raises what __init__ raised
            assert captured is not None, "an __init__ that returned captured its state"
            await self._commit_state(actor_id, actor, 0, captured)
        await self._catch_up(actor_id, actor, stored or actor.state)
        self._actors[actor_id] = actor
        return actor

    async def _catch_up(self, actor_id: str, actor: _Actor, stored: bytes | None = None) -> None:
        """Take the committed state (``stored``, else read), then commit the writer calls
        logged after it: by a manager that stopped, or by one sharing the storage."""
        if stored is None:
            stored = await self.storage.get(actor_state_key(actor_id))
        if stored is not None:
            actor.state, actor.seq = stored, seq_of(stored, actor_id)
        for key in await self.storage.list(actor_calls_prefix(actor_id)):
            seq = actor_call_seq(actor_id, key)
            if seq == actor.seq + 1:
                data = await self.storage.get(key)
                assert data is not None
                _, method, call, ray_options = pickle.loads(data)
                await self._apply(actor_id, actor, seq, method, call, ray_options)

    async def _apply(
        self,
        actor_id: str,
        actor: _Actor,
        seq: int,
        method: str,
        call: bytes,
        ray_options: dict[str, Any],
    ) -> bytes:
        captured, outcome, plan = await self._run(
            actor_id, actor, actor.state, method, call, ray_options
        )
        if plan is not None:  # stored before the call commits; a replay finds it stored
            outcome = await self._sub_workflow(actor_sub_workflow_id(actor_id, seq), plan)
        # The first result of call seq stands: another manager sharing the storage may
        # have run the same logged call (each call runs at least once).
        key = actor_result_key(actor_id, seq)
        if not await self.storage.put_if_absent(key, outcome):
            outcome = await self.storage.get(key) or outcome
        await self._commit_state(actor_id, actor, seq, captured)
        log.debug("actor.call_committed", workflow_id=actor_id, seq=seq, method=method)
        return outcome

    async def _commit_state(
        self, actor_id: str, actor: _Actor, seq: int, captured: Captured | None
    ) -> None:
        """Store the state after call ``seq`` (``None``: the state is unchanged), the
        objects its ObjectRefs hold first: the state record is the commit point."""
        if captured is None:
            record = reseq(actor.state, seq, actor_id)
        else:
            for key, data in captured.objects.items():
                await self.storage.put_if_absent(key, data)
            record = state_record(seq, captured)
        # Against the state this call ran on: if another manager sharing the storage
        # committed call seq first, its state stands and is taken instead.
        key = actor_state_key(actor_id)
        before = actor.state if seq > 0 else None
        if not await self.storage.compare_and_set(key, before, record):
            stored = await self.storage.get(key)
            if stored is None or seq_of(stored, actor_id) < seq:
                raise WorkflowError(
                    f"The state of virtual actor {actor_id!r} changed under call {seq} "
                    "in a way no manager writes: is a second program writing its storage?",
                    workflow_id=actor_id,
                )
            record = stored
            seq = seq_of(stored, actor_id)
        actor.state, actor.seq = record, seq

    async def _run(
        self,
        actor_id: str,
        actor: _Actor,
        record: bytes | None,
        method: str | None,
        call: bytes,
        options: dict[str, Any],
    ) -> tuple[Captured | None, bytes, Plan | None]:
        """Run a method (``__init__``: ``None``) as a Ray task, retrying a method that
        raised ``max_retries`` times; with ``catch_exceptions`` its outcome is the
        ``(result, None)`` or ``(None, exception)`` pair."""
        options = {**actor.options, **options}
        retries = int(options.pop("max_retries", 0))
        catch = bool(options.pop("catch_exceptions", False))
        ray_options = dict(options, max_retries=max(retries, 3) if retries >= 0 else -1)
        task = self._task.options(**ray_options)
        objects = await object_records(self.storage, record, actor_id)
        attempt = 0
        while True:
            captured, outcome, plan = await task.remote(
                actor.cls_bytes,
                record,
                method,
                call,
                actor_id,
                self.storage.uri,
                ref_of(self.storage),
                objects,
            )
            kind, value = cloudpickle.loads(outcome)
            if kind != "error" or method is None or (0 <= retries <= attempt):
                break
            attempt += 1
            log.info("actor.call_retried", workflow_id=actor_id, method=method, attempt=attempt)
        if catch and plan is None and method is not None:
            outcome = pickle_outcome("ok", (None, value) if kind == "error" else (value, None))
        return captured, outcome, plan


# How long a writer call waits for its caller's previous one to arrive: after a manager
# restart only some calls are replayed, and a predecessor that never comes must not
# hold its successors forever.
_TURN_WAIT = 2.0


async def _admit(actor: _Actor, caller: str, n: int) -> None:
    """Return when call ``n`` of ``caller`` may queue for the actor's lock: once call
    ``n - 1`` has (a handle numbers its calls from 0), or after a bounded wait (calls
    replayed to a restarted manager may miss their predecessors)."""
    last = actor.admitted.get(caller, -1)
    if n > last + 1:
        turn = actor.turns.setdefault((caller, n - 1), asyncio.get_running_loop().create_future())
        try:
            await asyncio.wait_for(asyncio.shield(turn), _TURN_WAIT)
        except asyncio.TimeoutError:
            log.warning("actor.call_out_of_order", caller=caller, call=n)
        finally:
            actor.turns.pop((caller, n - 1), None)
    actor.admitted[caller] = max(n, actor.admitted.get(caller, -1))
    done = actor.turns.get((caller, n))
    if done is not None and not done.done():
        done.set_result(None)


__all__ = ["Actors"]
