"""Virtual actors (seeds 002 and 004): state in storage, methods as Ray tasks.

The seed samples run with the import changed, except where their own text cannot
(each marked where it stands). Then what a durable actor must guarantee: the state
survives the manager, a logged call is committed once, in order, after a crash, and
bad input is refused with a clear error.
"""

from __future__ import annotations

import json
import pickle
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import ray
from conftest import kill_manager
from helpers import count_runs, record_run, wait_for

import ray_workflows as workflow
from ray_workflows import aio
from ray_workflows._core import bridge, config
from ray_workflows.exceptions import WorkflowNotFoundError


def test_seed_002_example_4_counter(storage: str) -> None:
    @workflow.virtual_actor
    class counter:
        def __init__(self):
            self.count = 0

        def incr(self):
            self.count += 1
            return self.count

    # The seed calls workflow.init(storage="/tmp/workflows") here; the test's storage
    # stands in for it. Its actor id is made unique for the session's storage.
    workflow1 = counter.get_or_create(f"counter_workflw-{uuid.uuid4().hex[:6]}")
    # The seed names the handle workflow1, then calls it c1.
    c1 = workflow1
    assert c1.incr.run() == 1
    assert c1.incr.run() == 2


def test_seed_002_example_10_readonly_and_async_calls(storage: str) -> None:
    @workflow.virtual_actor
    class Counter:
        def __init__(self, init_val):
            self._val = init_val

        def incr(self, val=1):
            self._val += val
            print(self._val)

        @workflow.virtual_actor.readonly
        def value(self):
            return self._val

    # Initialize a Counter actor with id="my_counter" (unique per test run here).
    counter = Counter.get_or_create(f"my_counter-{uuid.uuid4().hex[:6]}", 0)

    # Similar to workflow steps, actor methods support:
    # - `run()`, which will return the value
    # - `run_async()`, which will return a ObjectRef
    counter.incr.run(10)
    assert counter.value.run() == 10

    # Non-blocking execution.
    counter.incr.run_async(10)
    counter.incr.run(10)
    assert 30 == ray.get(counter.value.run_async())


def test_seed_004_counter_with_getstate_and_setstate(storage: str) -> None:
    @workflow.virtual_actor
    class Counter:
        def __init__(self, x: int):
            self.x = x

        # Mark a method as a readonly method. It would not modify the
        # state of the virtual actor.
        @workflow.virtual_actor.readonly
        def get(self):
            return self.x

        def incr(self):
            self.x += 1
            return self.x

        def __getstate__(self):
            return self.x

        def __setstate__(self, state):
            self.x = state

    # Create and run a virtual actor.
    counter = Counter.get_or_create(actor_id=f"Counter-{uuid.uuid4().hex[:6]}", x=1)
    # The seed's `counter.run(incr)` names no existing API; the method call it means:
    assert ray.get(counter.incr.run_async()) == 2
    assert ray.get(counter.ready()) is None
    assert counter.get.run() == 2


@workflow.virtual_actor
class Ledger:
    def __init__(self, runs: str) -> None:
        self.runs = runs
        self.entries: list[int] = []

    def add(self, value: int) -> int:
        record_run(self.runs, "add")
        if value < 0:
            raise ValueError(f"negative entry {value}")
        self.entries.append(value)
        return sum(self.entries)

    @workflow.virtual_actor.readonly
    def total(self) -> int:
        return sum(self.entries)

    @workflow.virtual_actor.readonly
    def scribble(self) -> int:
        self.entries.append(1000)  # a readonly method's changes are discarded
        return len(self.entries)


def test_state_survives_the_manager_and_get_actor_finds_it(
    fresh_storage: str, wid: str, counter_dir: Path
) -> None:
    ledger = Ledger.get_or_create(wid, str(counter_dir))
    assert [ledger.add.run(v) for v in (1, 2, 3)] == [1, 3, 6]
    assert ledger.scribble.run() == 4
    assert ledger.total.run() == 6  # scribble's change was not kept
    kill_manager(fresh_storage)
    workflow.init(fresh_storage)
    again = workflow.get_actor(wid)
    assert again.total.run() == 6
    assert again.add.run(4) == 10
    # get_or_create of an existing actor ignores its arguments.
    assert Ledger.get_or_create(wid, "/elsewhere").total.run() == 10
    assert count_runs(counter_dir, "add") == 4


def test_a_failing_writer_keeps_the_state_and_the_next_calls_go_on(
    storage: str, wid: str, counter_dir: Path
) -> None:
    ledger = Ledger.get_or_create(wid, str(counter_dir))
    assert ledger.add.run(5) == 5
    with pytest.raises(ValueError, match="negative entry -1"):
        ledger.add.run(-1)
    with pytest.raises(ValueError):
        ray.get(ledger.add.run_async(-2))
    assert ledger.add.run(1) == 6
    assert ledger.total.run() == 6


@workflow.virtual_actor
class Trail:
    """Remembers the order in which its writer calls ran."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def visit(self, i: int) -> list[int]:
        self.seen.append(i)
        return list(self.seen)


def test_writers_run_one_at_a_time_in_submission_order(storage: str, wid: str) -> None:
    trail = Trail.get_or_create(wid)
    refs = [trail.visit.run_async(i) for i in range(50)]
    results = ray.get(refs)
    assert results[-1] == list(range(50))
    assert all(results[i] == list(range(i + 1)) for i in range(50))


def _storage_path(storage: str, actor_id: str, *parts: str) -> Path:
    return Path(storage, "actors", actor_id, *parts)


def test_a_logged_call_is_committed_once_in_order_after_a_crash(
    fresh_storage: str, wid: str, counter_dir: Path
) -> None:
    ledger = Ledger.get_or_create(wid, str(counter_dir))
    assert ledger.add.run(1) == 1
    kill_manager(fresh_storage)
    # As if the manager had logged call 2 and died before committing it.
    call = pickle.dumps(("lost-call", "add", __import__("ray").cloudpickle.dumps(((2,), {})), {}))
    _storage_path(fresh_storage, wid, "calls", f"{2:012d}").write_bytes(call)
    _storage_path(fresh_storage, wid, "ids", "lost-call").write_bytes(b"2")
    workflow.init(fresh_storage)
    # The next call comes after the logged one, which runs first.
    assert workflow.get_actor(wid).add.run(10) == 13
    state = json.loads(_storage_path(fresh_storage, wid, "state").read_bytes())
    assert state["seq"] == 3 and state["state"]["entries"] == [1, 2, 10]
    # The caller of the lost call, replayed by Ray with its call id, gets its result
    # without running it again.
    handle = bridge.run(config.manager())
    replay = handle.actor_call.remote(wid, "lost-call", "add", b"", False, {})
    assert bridge.run(aio.get(replay)) == 3
    assert count_runs(counter_dir, "add") == 3  # 1, the lost 2, 10: once each


def test_bad_input_is_refused_with_a_clear_error(storage: str, wid: str) -> None:
    with pytest.raises(ValueError, match="only one of __getstate__ and __setstate__"):

        @workflow.virtual_actor
        class Half:
            def __getstate__(self) -> Any:
                return 1

    with pytest.raises(TypeError, match="decorates a class"):
        workflow.virtual_actor(lambda: None)
    with pytest.raises(TypeError, match="decorates a method"):
        workflow.virtual_actor.readonly(3)

    @workflow.virtual_actor
    class Opaque:
        def __init__(self) -> None:
            self.lock = object()  # not JSON

        def poke(self) -> None:
            pass

    with pytest.raises(TypeError, match="get_or_create"):
        Opaque()
    with pytest.raises(ValueError, match="JSON serializable"):
        ray.get(Opaque.get_or_create(wid).ready())

    ledger = Ledger.get_or_create(wid + "-l", "/tmp")
    with pytest.raises(TypeError, match=r"\.run\(\.\.\.\)"):
        ledger.add(1)
    with pytest.raises(AttributeError, match="no method 'nothing'"):
        ledger.nothing  # noqa: B018
    with pytest.raises(ValueError, match="Unknown option"):
        ledger.add.options(metadata={})
    with pytest.raises(WorkflowNotFoundError, match="get_or_create"):
        workflow.get_actor("no-such-actor-" + uuid.uuid4().hex[:6])
    with pytest.raises(ValueError):
        Ledger.get_or_create("../escape", "/tmp")


def test_calls_that_reach_the_manager_out_of_order_run_in_the_handles_order(
    storage: str, wid: str
) -> None:
    # As when Ray starts one caller's actor calls in another order: the calls of one
    # handle carry their number, and are sent here last to first.
    ray.get(Trail.get_or_create(wid).ready())
    handle = bridge.run(config.manager())
    caller = uuid.uuid4().hex
    refs = {
        n: handle.actor_call.remote(
            wid,
            uuid.uuid4().hex,
            "visit",
            ray.cloudpickle.dumps(((n,), {})),
            False,
            {},
            (caller, n),
        )
        for n in reversed(range(6))
    }
    assert ray.get(refs[5], timeout=30) == [0, 1, 2, 3, 4, 5]
    assert [ray.get(refs[n]) for n in range(6)] == [list(range(n + 1)) for n in range(6)]


# Seed 002, example 11 ("Using sub workflows"), with `import ray_workflows as workflow`
# in place of `from ray import workflow`.
@workflow.step
def double(s):  # type: ignore[no-untyped-def]
    return 2 * s


@workflow.virtual_actor
class Actor:
    def __init__(self):  # type: ignore[no-untyped-def]
        self.val = 1

    def double(self, update):  # type: ignore[no-untyped-def]
        step = double.step(self.val)
        if not update:
            # inside the method, a workflow can be launched
            return step
        else:
            # workflow can also be passed to another method
            return self.update.step(step)

    def update(self, v):  # type: ignore[no-untyped-def]
        self.val = v
        return self.val


def test_seed_002_example_11_methods_return_sub_workflows(storage: str) -> None:
    handler = Actor.get_or_create("actor-" + uuid.uuid4().hex[:8])
    assert handler.double.run(False) == 2
    assert handler.double.run(False) == 2
    assert handler.double.run(True) == 2
    assert handler.double.run(True) == 4
    # A call that returned a step ran it as a workflow of its own, stored under the
    # call's number (the update steps were calls 4 and 6) and inspectable as any other.
    sub = f"{handler.actor_id}.call-5"
    assert workflow.get_status(sub) == workflow.WorkflowStatus.SUCCESSFUL
    assert workflow.get_output(sub) == 4
    assert handler.double.run(False) == 8  # the state the last update step committed


@workflow.step
def slow_double(x: int, counter_dir: str, gate: str) -> int:
    record_run(counter_dir, "slow_double")
    while not Path(gate).exists():
        time.sleep(0.05)
    return 2 * x


@workflow.virtual_actor
class Keeper:
    def __init__(self, counter_dir: str, gate: str) -> None:
        self.val, self.dir, self.gate = 3, counter_dir, gate

    def bump(self) -> Any:
        record_run(self.dir, "bump")
        self.val += 1
        return self.store.step(slow_double.step(self.val, self.dir, self.gate))

    def store(self, v: int) -> int:
        record_run(self.dir, "store")
        self.val = v
        return v

    @workflow.virtual_actor.readonly
    def value(self) -> int:
        return int(self.val)


def test_a_call_whose_sub_workflow_outlives_its_manager_returns_its_output(
    fresh_storage: str, wid: str, counter_dir: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    keeper = Keeper.get_or_create(wid, str(counter_dir), str(gate))
    ref = keeper.bump.run_async()

    def committed() -> bool:
        state = _storage_path(fresh_storage, wid, "state")
        return state.exists() and json.loads(state.read_bytes())["seq"] == 1

    # The call committed (with its sub-workflow stored) and the sub-workflow's first
    # step runs: now the manager dies.
    wait_for(lambda: committed() and count_runs(counter_dir, "slow_double") >= 1)
    kill_manager(fresh_storage, no_restart=False)  # Ray restarts it, with no memory
    gate.touch()
    # Ray replays the call to the restarted manager, which answers with the output of
    # the sub-workflow it resumed.
    assert ray.get(ref, timeout=120) == 8
    workflow.init(fresh_storage)
    assert workflow.get_actor(wid).value.run() == 8
    assert count_runs(counter_dir, "bump") == 1  # committed once, before the crash
    assert count_runs(counter_dir, "store") == 1


def test_a_readonly_method_may_not_return_a_sub_workflow(storage: str, wid: str) -> None:
    @workflow.virtual_actor
    class Peek:
        def __init__(self) -> None:
            self.val = 1

        @workflow.virtual_actor.readonly
        def doubled(self) -> Any:
            return double.step(self.val)  # not logged: a crash would lose or repeat it

    with pytest.raises(TypeError, match="Readonly virtual actor method 'doubled'"):
        Peek.get_or_create(wid).doubled.run()


def test_an_actor_whose_id_ends_in_a_dot_may_return_a_sub_workflow(storage: str, wid: str) -> None:
    actor = Actor.get_or_create(wid + ".")
    assert actor.double.run(False) == 2  # a sub-workflow computes double(1)


@workflow.virtual_actor
class Flaky:
    """Its first ``failures`` calls of ``add`` raise. Calls are counted in files: a
    writer that raises leaves the state as it was."""

    def __init__(self, runs: str, failures: int) -> None:
        self.runs, self.failures, self.total = runs, failures, 0

    def add(self, n: int) -> int:
        record_run(self.runs, "add")
        if count_runs(self.runs, "add") <= self.failures:
            raise ValueError("not yet")
        self.total += n
        return int(self.total)

    @workflow.virtual_actor.readonly
    def value(self) -> int:
        return int(self.total)


def _method_step(storage: str, actor: Any, method: str, *args: Any, **options: Any) -> Any:
    """The step ``self.<method>.step(*args)`` makes inside one of the actor's methods,
    here with Ray options, for a workflow of the test's own to run (the public way to
    make one is inside a method, whose sub-workflow's id is never run twice). The
    actor is created first: the step goes to the manager directly, not through the
    handle, which would wait for that itself."""
    from ray_workflows._core.actor_methods import _method_task

    ray.get(actor.ready())
    task = _method_task.options(**options) if options else _method_task
    return task.bind(config.normalise_storage(storage), actor.actor_id, method, False, *args)


def test_a_method_step_of_a_workflow_run_again_after_delete_calls_again(
    storage: str, wid: str, counter_dir: Path
) -> None:
    actor = Flaky.get_or_create(wid + "-actor", str(counter_dir), 0)
    assert workflow.run(_method_step(storage, actor, "add", 5), workflow_id=wid) == 5
    workflow.delete(wid)
    # A new run of the id: its step is a new call, not the old run's logged one.
    assert workflow.run(_method_step(storage, actor, "add", 5), workflow_id=wid) == 10
    assert count_runs(counter_dir, "add") == 2
    assert actor.value.run() == 10


def test_a_retried_method_step_calls_the_method_again(
    storage: str, wid: str, counter_dir: Path
) -> None:
    actor = Flaky.get_or_create(wid + "-actor", str(counter_dir), 1)
    step = _method_step(storage, actor, "add", 7, max_retries=2, retry_exceptions=True)
    # The first attempt's call raised; the retry is a call of its own, which succeeds.
    assert workflow.run(step, workflow_id=wid) == 7
    assert count_runs(counter_dir, "add") == 2
    assert actor.value.run() == 7


def test_resuming_a_failed_workflow_calls_its_failed_method_step_again(
    storage: str, wid: str, counter_dir: Path
) -> None:
    actor = Flaky.get_or_create(wid + "-actor", str(counter_dir), 1)
    with pytest.raises(workflow.WorkflowExecutionError, match="not yet"):
        workflow.run(_method_step(storage, actor, "add", 3), workflow_id=wid)
    assert workflow.get_status(wid) == workflow.FAILED
    assert workflow.resume(wid) == 3
    assert count_runs(counter_dir, "add") == 2


@workflow.step
def gated_double(x: int, gate: str) -> int:
    while not Path(gate).exists():
        time.sleep(0.02)
    return 2 * x


@workflow.virtual_actor
class Nest:
    def __init__(self, gate: str) -> None:
        self.val, self.gate = 1, gate

    def outer(self) -> Any:
        return self.inner.step()  # a sub-workflow whose step calls inner...

    def inner(self) -> Any:
        return double.step(self.val)  # ...which returns a sub-workflow of its own

    def wait(self) -> Any:
        return gated_double.step(self.val, self.gate)


@ray.remote
def constant(value: str) -> str:
    return value


def _status(workflow_id: str) -> workflow.WorkflowStatus | None:
    try:
        return workflow.get_status(workflow_id)
    except WorkflowNotFoundError:  # not started yet
        return None


def test_sub_workflows_of_actor_calls_are_exempt_from_the_running_limit(
    fresh_storage: str, wid: str, tmp_path: Path
) -> None:
    workflow.init(fresh_storage, max_running_workflows=1)
    gate = tmp_path / "gate"
    nest = Nest.get_or_create(wid, str(gate))
    # outer's sub-workflow runs the inner step, which waits for inner's sub-workflow:
    # had that queued for the one slot the first holds, neither would ever finish.
    assert ray.get(nest.outer.run_async(), timeout=60) == 2
    assert workflow.get_status(f"{wid}.call-2") == workflow.SUCCESSFUL
    # Nor do they count: with one waiting, a workflow of the user's still runs at once.
    waiting = nest.wait.run_async()
    wait_for(lambda: _status(f"{wid}.call-3") == workflow.RUNNING)
    ref = workflow.run_async(constant.bind("mine"), workflow_id=wid + "-mine")
    assert ray.get(ref, timeout=60) == "mine"
    gate.touch()
    assert ray.get(waiting, timeout=60) == 2


def test_a_step_calls_until_a_call_succeeds_and_never_after(
    storage: str, wid: str, counter_dir: Path
) -> None:
    # The calls a workflow task's attempts make, sent as _call_method sends them.
    actor = Flaky.get_or_create(wid + "-actor", str(counter_dir), 1)
    ray.get(actor.ready())
    handle = bridge.run(config.manager())
    call = ray.cloudpickle.dumps(((2,), {}))

    def attempt() -> Any:
        ref = handle.actor_call.remote(actor.actor_id, "task", "add", call, False, {}, None, wid)
        return bridge.run(aio.get(ref))

    with pytest.raises(ValueError, match="not yet"):
        attempt()
    assert attempt() == 2  # the retry of a call that raised calls again
    assert attempt() == 2  # replayed: answered from the log
    # Any later attempt (a retry after it failed elsewhere, or one of a resume, whose
    # attempt numbers start from 0 again) gets that call's result.
    assert attempt() == 2
    assert attempt() == 2
    assert count_runs(counter_dir, "add") == 2
    assert actor.value.run() == 2


def test_a_step_call_whose_log_landed_in_part_calls_again(
    faulty: tuple[str, Path], wid: str, counter_dir: Path
) -> None:
    # A storage that may land a batch's keys in any order (S3): here the call's id
    # record lands and the call record's write fails. The retry must find no call, not
    # an id naming a call that was never logged.
    _, control = faulty
    actor = Flaky.get_or_create(wid + "-actor", str(counter_dir), 0)
    ray.get(actor.ready())
    handle = bridge.run(config.manager())
    call = ray.cloudpickle.dumps(((5,), {}))

    def attempt() -> Any:
        ref = handle.actor_call.remote(actor.actor_id, "task", "add", call, False, {}, None, wid)
        return bridge.run(aio.get(ref))

    control.write_text(json.dumps({"fail": "/calls/", "unordered": True}))
    with pytest.raises(Exception, match="injected write failure"):
        attempt()
    control.unlink()
    assert attempt() == 5  # the retry calls (it was never logged), once
    assert attempt() == 5  # and is answered from the log from then on
    assert count_runs(counter_dir, "add") == 1


def test_actors_are_listed_as_workflows(storage: str, tmp_path: Path) -> None:
    """Seed 004 / Ray 1.x: ``list_all`` shows each virtual actor as a workflow whose id
    is the actor's: RUNNING while a writer call runs, SUCCESSFUL when idle."""

    @workflow.virtual_actor
    class Gate:
        def __init__(self) -> None:
            self.n = 0

        def wait(self, path: str) -> int:
            while not Path(path).exists():
                time.sleep(0.02)
            self.n += 1
            return self.n

    actor_id = f"listed-{uuid.uuid4().hex[:6]}"
    actor = Gate.get_or_create(actor_id)
    ray.get(actor.ready())
    assert (actor_id, workflow.SUCCESSFUL) in workflow.list_all()
    assert actor_id not in dict(workflow.list_all(workflow.RUNNING))
    gate = tmp_path / "gate"
    ref = actor.wait.run_async(str(gate))
    wait_for(lambda: dict(workflow.list_all(workflow.RUNNING)).get(actor_id) == workflow.RUNNING)
    gate.touch()
    assert ray.get(ref, timeout=60) == 1
    assert dict(workflow.list_all({workflow.SUCCESSFUL}))[actor_id] == workflow.SUCCESSFUL
