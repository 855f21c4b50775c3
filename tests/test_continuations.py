"""Dynamic workflows: ``workflow.continuation``, long tail-call chains, task ids."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import ray

import ray_workflows as workflow
from ray_workflows.exceptions import TaskIdCollisionError

MOD = "test_continuations"


@ray.remote
def add(a: int, b: int) -> int:
    return a + b


@ray.remote
def fib(n: int) -> int:
    if n <= 1:
        return n
    return workflow.continuation(add.bind(fib.bind(n - 1), fib.bind(n - 2)))


@ray.remote
def fib_bare(n: int) -> Any:
    """Returns the DAG itself, without ``workflow.continuation``."""
    if n <= 1:
        return n
    return add.bind(fib_bare.bind(n - 1), fib_bare.bind(n - 2))


@ray.remote
def count(n: int) -> int:
    if n == 0:
        return n
    return workflow.continuation(count.bind(n - 1))


@ray.remote
def countdown(n: int, seen: int = 0) -> tuple[int, int]:
    """A tail-call chain: returns (final n, how many steps ran)."""
    if n == 0:
        return n, seen
    return workflow.continuation(countdown.bind(n - 1, seen + 1))


@ray.remote
def double(x: int) -> int:
    return 2 * x


@ray.remote
def f(x: int) -> int:
    return x + 1


@ray.remote
def g(x: int = 0) -> int:
    return x


@ray.remote
def gather(*xs: Any) -> list[Any]:
    return list(xs)


def py_fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


# ---------------------------------------------------------------------- fibonacci
def test_fib_10(storage: str, wid: str) -> None:
    assert workflow.run(fib.bind(10), workflow_id=wid) == 55
    assert workflow.get_output(wid) == 55
    assert workflow.get_status(wid) == workflow.SUCCESSFUL


def test_fib_15(storage: str, wid: str) -> None:
    started = time.perf_counter()
    assert workflow.run(fib.bind(15), workflow_id=wid) == 610 == py_fib(15)
    print(f"fib(15) by continuation: {time.perf_counter() - started:.1f} s")
    assert workflow.get_output(wid) == 610


def test_bare_dag_returned_is_a_continuation(storage: str, wid: str) -> None:
    assert workflow.run(fib_bare.bind(8), workflow_id=wid) == 21
    assert workflow.get_output(wid, task_id=f"{MOD}.fib_bare") == 21


def test_continuation_consumed_downstream(storage: str, wid: str) -> None:
    """A task that continues feeds the continuation's final value to its consumers."""
    assert workflow.run(gather.bind(fib.bind(6), double.bind(fib.bind(7))), workflow_id=wid) == [
        8,
        26,
    ]


# ---------------------------------------------------------- outside of a workflow
def test_continuation_outside_a_workflow_runs_the_dag() -> None:
    assert workflow.continuation(add.bind(1, add.bind(2, 3))) == 6
    # the same function works as a plain Ray task: continuation() runs the DAG there
    # (small: each nested level holds a blocked plain Ray worker)
    assert ray.get(fib.remote(3)) == 2
    assert ray.get(count.remote(2)) == 0


def test_continuation_of_a_non_dag_is_a_type_error() -> None:
    for bad in (1, "dag", None, add, add.remote(1, 2)):
        with pytest.raises(TypeError):
            workflow.continuation(bad)


@ray.remote
def continue_with(x: Any) -> Any:
    return workflow.continuation(x)


def test_continuation_of_a_non_dag_inside_a_task_fails_the_workflow(storage: str, wid: str) -> None:
    with pytest.raises(workflow.WorkflowExecutionError) as info:
        workflow.run(
            continue_with.options(**workflow.options(max_retries=0)).bind(42), workflow_id=wid
        )
    assert isinstance(info.value.__cause__, TypeError)
    assert workflow.get_status(wid) == workflow.FAILED


# ------------------------------------------------------------------- long chains
def run_chain(n: int, wid: str) -> float:
    started = time.perf_counter()
    assert workflow.run(countdown.bind(n), workflow_id=wid) == (0, n)
    took = time.perf_counter() - started
    print(f"chain of {n} tail continuations: {took:.1f} s ({1000 * took / n:.2f} ms/step)")
    return took


def test_chain_of_50_continuations(storage: str, wid: str) -> None:
    assert run_chain(50, wid) < 60
    assert workflow.get_output(wid) == (0, 50)
    # every step's id resolves to the chain's final value
    assert workflow.get_output(wid, task_id=f"{MOD}.countdown_25") == (0, 50)


# The issue asks for 10,000 levels of tail continuation, and the suite runs them:
# 40 s (4 ms a step) on the idle 2-CPU development machine in December 2026, down
# from 22 ms a step a year earlier. RAY_WORKFLOWS_TEST_CHAIN=N runs another length.
# The bound is 30x the measured cost per step (CI machines may be loaded).
CHAIN = int(os.environ.get("RAY_WORKFLOWS_TEST_CHAIN", "10000"))
CHAIN_BOUND_S = max(60.0, 0.12 * CHAIN)


@pytest.mark.slow
@pytest.mark.timeout(int(CHAIN_BOUND_S) + 300)
def test_long_chain_of_tail_continuations(storage: str, wid: str) -> None:
    took = run_chain(CHAIN, wid)
    assert took < CHAIN_BOUND_S
    assert workflow.get_output(wid, task_id=f"{MOD}.countdown") == (0, CHAIN)
    assert workflow.get_output(wid, task_id=f"{MOD}.countdown_{CHAIN}") == (0, CHAIN)


# ------------------------------------------------- get_output of continuation tasks
def test_get_output_of_intermediate_continuation_tasks(storage: str, wid: str) -> None:
    # fib(5) continues as add(fib(4), fib(3)): ids are allocated args first, so
    # fib(4) is fib_1, fib(3) is fib_2, and the add is the first add of the workflow
    assert workflow.run(fib.bind(5), workflow_id=wid) == 5
    assert workflow.get_output(wid, task_id=f"{MOD}.fib") == 5
    assert workflow.get_output(wid, task_id=f"{MOD}.fib_1") == 3
    assert workflow.get_output(wid, task_id=f"{MOD}.fib_2") == 2
    assert workflow.get_output(wid, task_id=f"{MOD}.add") == 5
    assert ray.get(workflow.get_output_async(wid, task_id=f"{MOD}.fib_1")) == 3


def test_get_output_of_every_step_of_a_chain(storage: str, wid: str) -> None:
    assert workflow.run(countdown.bind(5), workflow_id=wid) == (0, 5)
    ids = [f"{MOD}.countdown"] + [f"{MOD}.countdown_{i}" for i in range(1, 6)]
    assert [workflow.get_output(wid, task_id=t) for t in ids] == [(0, 5)] * 6
    with pytest.raises(workflow.WorkflowError):
        workflow.get_output(wid, task_id=f"{MOD}.countdown_6")


@ray.remote
def slow_countdown(n: int, delay: float) -> int:
    time.sleep(delay)
    if n == 0:
        return -1
    return workflow.continuation(slow_countdown.bind(n - 1, delay))


def _wait_for_task(wid: str, task_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            workflow.get_metadata(wid, task_id)
            return
        except workflow.WorkflowError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_get_output_of_a_chain_step_requested_while_running_before_it_runs(
    storage: str, wid: str
) -> None:
    ref = workflow.run_async(slow_countdown.bind(12, 0.05), workflow_id=wid)
    out = workflow.get_output_async(wid, task_id=f"{MOD}.slow_countdown_10")
    assert ray.get(ref, timeout=120) == -1
    assert ray.get(out, timeout=30) == -1


def test_get_output_of_a_chain_step_requested_after_it_continued(storage: str, wid: str) -> None:
    ref = workflow.run_async(slow_countdown.bind(12, 0.05), workflow_id=wid)
    _wait_for_task(wid, f"{MOD}.slow_countdown_5")  # so slow_countdown_3 has continued
    out = workflow.get_output_async(wid, task_id=f"{MOD}.slow_countdown_3")
    assert ray.get(ref, timeout=120) == -1
    assert workflow.get_output(wid, task_id=f"{MOD}.slow_countdown_3") == -1  # after: fine
    assert ray.get(out, timeout=3) == -1


# ------------------------------------------------------------------------ task ids
def test_default_task_ids_and_repeats(storage: str, wid: str) -> None:
    dag = add.bind(add.bind(1, 2), add.bind(3, 4))
    assert workflow.run(dag, workflow_id=wid) == 10
    # bottom-up: arguments before the node using them
    assert workflow.get_output(wid, task_id=f"{MOD}.add") == 3
    assert workflow.get_output(wid, task_id=f"{MOD}.add_1") == 7
    assert workflow.get_output(wid, task_id=f"{MOD}.add_2") == 10
    for tid in (f"{MOD}.add", f"{MOD}.add_1", f"{MOD}.add_2"):
        assert workflow.get_metadata(wid, tid)["task_id"] == tid


def test_explicit_task_id_repeats_get_suffixes(storage: str, wid: str) -> None:
    opts = workflow.options(task_id="f", metadata={"who": "f"})
    dag = f.options(**opts).bind(f.options(**opts).bind(1))
    assert workflow.run(dag, workflow_id=wid) == 3
    inner, outer = workflow.get_metadata(wid, "f"), workflow.get_metadata(wid, "f_1")
    assert inner["task_id"] == "f" and outer["task_id"] == "f_1"
    assert workflow.get_output(wid, task_id="f") == 2
    assert workflow.get_output(wid, task_id="f_1") == 3
    for meta in (inner, outer):
        assert {"task_id", "task_options", "user_metadata", "stats"} <= set(meta)
        assert meta["user_metadata"] == {"who": "f"}
        assert isinstance(meta["task_options"], dict)
        stats = meta["stats"]
        assert stats["start_time"] <= stats["end_time"] <= time.time()
    # the inner task ran (and finished) before the outer one started
    assert inner["stats"]["end_time"] <= outer["stats"]["start_time"]
    with pytest.raises(workflow.WorkflowError):
        workflow.get_metadata(wid, "f_2")


def test_task_ids_in_continuations_continue_the_workflow_counters(storage: str, wid: str) -> None:
    assert workflow.run(fib.bind(3), workflow_id=wid) == 2
    # fib(3) -> add(fib(2), fib(1)); fib(2) -> add(fib(1), fib(0))
    assert workflow.get_metadata(wid, f"{MOD}.fib_1")["task_id"] == f"{MOD}.fib_1"
    assert workflow.get_output(wid, task_id=f"{MOD}.fib_1") == 1  # fib(2)
    assert workflow.get_output(wid, task_id=f"{MOD}.fib_2") == 1  # fib(1)
    assert {workflow.get_output(wid, task_id=f"{MOD}.fib_{i}") for i in (3, 4)} == {0, 1}
    assert workflow.get_output(wid, task_id=f"{MOD}.add_1") == 1
    with pytest.raises(workflow.WorkflowError):
        workflow.get_output(wid, task_id=f"{MOD}.fib_5")


def test_metadata_of_a_continued_task_has_stats(storage: str, wid: str) -> None:
    assert workflow.run(fib.bind(4), workflow_id=wid) == 3
    meta = workflow.get_metadata(wid, f"{MOD}.fib")
    assert meta["task_id"] == f"{MOD}.fib"
    assert meta["stats"]["start_time"] <= meta["stats"]["end_time"]


# --------------------------------------------------------------- id collisions
def _named(fn: Any, task_id: str) -> Any:
    return fn.options(**workflow.options(task_id=task_id))


@pytest.mark.parametrize("order", ["generated_first", "explicit_first"])
def test_explicit_id_colliding_with_a_generated_repeat(storage: str, wid: str, order: str) -> None:
    generated = [_named(g, "g").bind(1), _named(g, "g").bind(2)]  # g, g_1
    explicit = [_named(g, "g_1").bind(3)]
    parts = generated + explicit if order == "generated_first" else explicit + generated
    with pytest.raises(TaskIdCollisionError) as info:
        workflow.run(gather.bind(*parts), workflow_id=wid)
    assert isinstance(info.value, ValueError)
    assert "g_1" in str(info.value)
    with pytest.raises(workflow.WorkflowNotFoundError):
        workflow.get_status(wid)


def test_explicit_id_colliding_with_a_default_repeat(storage: str, wid: str) -> None:
    dag = gather.bind(g.bind(1), g.bind(2), _named(g, f"{MOD}.g_1").bind(3))
    with pytest.raises(TaskIdCollisionError):
        workflow.run(dag, workflow_id=wid)
    with pytest.raises(workflow.WorkflowNotFoundError):
        workflow.get_status(wid)
    assert wid not in dict(workflow.list_all())


def test_no_collision_when_ids_differ(storage: str, wid: str) -> None:
    dag = gather.bind(_named(g, "g").bind(1), _named(g, "g").bind(2), _named(g, "g_2").bind(3))
    assert workflow.run(dag, workflow_id=wid) == [1, 2, 3]
    assert workflow.get_output(wid, task_id="g_1") == 2
    assert workflow.get_output(wid, task_id="g_2") == 3


def test_no_false_collision_for_ids_never_generated(storage: str, wid: str) -> None:
    dag = gather.bind(
        _named(g, "g").bind(1),
        _named(g, "g").bind(2),
        _named(g, "g_0").bind(3),
        _named(g, "g_01").bind(4),
    )
    assert workflow.run(dag, workflow_id=wid) == [1, 2, 3, 4]


@ray.remote
def colliding_continuation() -> Any:
    return workflow.continuation(
        gather.bind(_named(g, "h").bind(1), _named(g, "h").bind(2), _named(g, "h_1").bind(3))
    )


def test_collision_inside_a_continuation_fails_the_workflow(storage: str, wid: str) -> None:
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(
            colliding_continuation.options(**workflow.options(max_retries=0)).bind(),
            workflow_id=wid,
        )
    assert workflow.get_status(wid) == workflow.FAILED


@ray.remote
def bad_arity_continuation(directory: str) -> Any:
    from helpers import record_run

    record_run(directory, "bad")
    return workflow.continuation(add.bind(1))  # add needs two arguments


def test_invalid_continuation_dag_is_an_application_error(
    storage: str, wid: str, counter_dir: Any
) -> None:
    from helpers import count_runs

    with pytest.raises(workflow.WorkflowExecutionError) as info:
        workflow.run(bad_arity_continuation.bind(str(counter_dir)), workflow_id=wid)
    assert count_runs(counter_dir, "bad") == 1  # application errors are not retried
    assert isinstance(info.value.__cause__, TypeError)


# ------------------------------------------------------------------- recovery
@ray.remote
def flaky_step(n: int, flag: str, directory: str) -> Any:
    from helpers import record_run

    record_run(directory, f"step{n}")
    if n == 3 and not os.path.exists(flag):
        raise RuntimeError("step 3 fails until the flag exists")
    if n == 0:
        return "done"
    return workflow.continuation(
        flaky_step.options(**workflow.options(max_retries=0)).bind(n - 1, flag, directory)
    )


def test_a_failed_chain_resumes_where_it_stopped(
    storage: str, wid: str, tmp_path: Any, counter_dir: Any
) -> None:
    from helpers import count_runs

    flag = str(tmp_path / "go")
    dag = flaky_step.options(**workflow.options(max_retries=0)).bind(6, flag, str(counter_dir))
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(dag, workflow_id=wid)
    assert workflow.get_status(wid) == workflow.FAILED
    open(flag, "w").close()
    assert workflow.resume(wid) == "done"
    assert [count_runs(counter_dir, f"step{n}") for n in range(6, -1, -1)] == [1, 1, 1, 2, 1, 1, 1]
    # ids continue across the resume: step(6) is flaky_step, step(0) is flaky_step_6
    assert workflow.get_output(wid, task_id=f"{MOD}.flaky_step_6") == "done"
    assert workflow.get_output(wid, task_id=f"{MOD}.flaky_step") == "done"
    assert workflow.get_output(wid, task_id=f"{MOD}.flaky_step_3") == "done"
    with pytest.raises(workflow.WorkflowError):
        workflow.get_metadata(wid, f"{MOD}.flaky_step_7")


@ray.remote
def flaky_fib(n: int, flag: str) -> int:
    if n == 2 and not os.path.exists(flag):
        raise RuntimeError("fib(2) fails until the flag exists")
    if n <= 1:
        return n
    opts = workflow.options(max_retries=0)
    return workflow.continuation(
        add.bind(
            flaky_fib.options(**opts).bind(n - 1, flag), flaky_fib.options(**opts).bind(n - 2, flag)
        )
    )


def test_a_failed_continuation_tree_resumes(storage: str, wid: str, tmp_path: Any) -> None:
    flag = str(tmp_path / "go")
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(
            flaky_fib.options(**workflow.options(max_retries=0)).bind(5, flag), workflow_id=wid
        )
    open(flag, "w").close()
    assert workflow.resume(wid) == 5
    assert workflow.get_output(wid) == 5
    assert workflow.get_status(wid) == workflow.SUCCESSFUL
