"""Tasks submitted ahead of their inputs: the engine hands a consumer to Ray as soon
as its producers are submitted, so Ray starts it the moment they finish. When a
producer fails, dies or continues instead, the consumer's early attempt must not
count: it runs once, later, with the real value."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import ray
from helpers import count_runs, record_run

import ray_workflows as workflow
from ray_workflows._core.compiler import compile_dag
from ray_workflows._core.engine import Engine
from ray_workflows.storage import open_storage

# The manager's scheduler is what these tests test: not a hosted runner.
pytestmark = pytest.mark.usefixtures("manager_runs")


@ray.remote
def slow_source(runs: str, seconds: float) -> int:
    record_run(runs, "source")
    time.sleep(seconds)
    return 1


@ray.remote
def step(runs: str, x: int) -> int:
    record_run(runs, f"step{x}")
    return x + 1


@ray.remote
def flaky(runs: str) -> int:
    """Fails its first attempt with an application error."""
    record_run(runs, "flaky")
    if count_runs(runs, "flaky") == 1:
        raise ValueError("first attempt fails")
    return 10


@ray.remote
def dies_once(runs: str) -> int:
    """Its first attempt kills its worker process."""
    record_run(runs, "dies")
    if count_runs(runs, "dies") == 1:
        os._exit(1)
    return 20


@ray.remote
def consume(runs: str, x: int) -> int:
    record_run(runs, "consume")
    assert isinstance(x, int), f"got {x!r} instead of a value"
    return x * 2


@ray.remote
def continues(runs: str, n: int) -> Any:
    record_run(runs, "continues")
    return workflow.continuation(step.bind(runs, n))


@ray.remote
def in_list(runs: str, xs: list[Any]) -> int:
    record_run(runs, "in_list")
    return int(ray.get(xs[0])) + 100


async def test_a_chain_is_handed_to_ray_at_once(tmp_path: Path) -> None:
    runs = str(tmp_path)
    engine = Engine(open_storage(f"memory://{uuid.uuid4().hex}"))
    dag: Any = slow_source.bind(runs, 1.0)
    for _ in range(5):
        dag = consume.bind(runs, dag)
    finished = await engine.start("chain", compile_dag(dag))
    run = engine.runs["chain"]
    await asyncio.sleep(0.3)
    # While the source still sleeps, its five consumers are already Ray tasks.
    assert len(run.running) == 6
    assert count_runs(runs, "consume") == 0
    assert await (await finished) == 32
    assert count_runs(runs, "consume") == 5
    assert count_runs(runs, "source") == 1
    await engine.close()


def test_consumer_of_a_retried_task_runs_once_with_the_retry_value(
    storage: str, wid: str, counter_dir: Path
) -> None:
    runs = str(counter_dir)
    dag = consume.bind(runs, flaky.options(**workflow.options(retry_exceptions=True)).bind(runs))
    assert workflow.run(dag, workflow_id=wid) == 20
    assert count_runs(runs, "flaky") == 2
    assert count_runs(runs, "consume") == 1


def test_consumer_of_a_task_whose_worker_died_runs_once(
    storage: str, wid: str, counter_dir: Path
) -> None:
    runs = str(counter_dir)
    assert workflow.run(consume.bind(runs, dies_once.bind(runs)), workflow_id=wid) == 40
    assert count_runs(runs, "dies") == 2
    assert count_runs(runs, "consume") == 1


def test_consumer_of_a_continuation_gets_the_continuations_value(
    storage: str, wid: str, counter_dir: Path
) -> None:
    runs = str(counter_dir)
    dag = consume.bind(runs, consume.bind(runs, continues.bind(runs, 4)))
    assert workflow.run(dag, workflow_id=wid) == 20  # step(4) = 5, then x2, x2
    assert count_runs(runs, "continues") == 1
    assert count_runs(runs, "step4") == 1
    assert count_runs(runs, "consume") == 2


def test_a_nested_input_is_a_finished_ref(storage: str, wid: str, counter_dir: Path) -> None:
    # A consumer holding its input inside a list gets an ObjectRef, not a value: it is
    # not submitted ahead, so the ref it sees is the finished output, never a stand-in.
    runs = str(counter_dir)
    source = flaky.options(**workflow.options(retry_exceptions=True)).bind(runs)
    assert workflow.run(in_list.bind(runs, [source]), workflow_id=wid) == 110
    assert count_runs(runs, "in_list") == 1


def test_a_failed_producer_fails_the_workflow_without_running_its_consumer(
    storage: str, wid: str, counter_dir: Path
) -> None:
    runs = str(counter_dir)
    source = flaky.options(**workflow.options(max_retries=0)).bind(runs)
    try:
        workflow.run(consume.bind(runs, source), workflow_id=wid)
    except workflow.WorkflowExecutionError as exc:
        assert "first attempt fails" in str(exc)
    else:
        raise AssertionError("the workflow should have failed")
    assert count_runs(runs, "consume") == 0


async def test_nothing_goes_ahead_of_a_function_that_continued_last_time(tmp_path: Path) -> None:
    # A consumer submitted ahead of a task that then continues would run for nothing
    # (its input is not that task's output). Once a function has continued, its
    # consumers wait for the real value: one Ray attempt per task, none wasted.
    runs = str(tmp_path)
    engine = Engine(open_storage(f"memory://{uuid.uuid4().hex}"))
    placed = engine.executor.placed

    async def attempts(wid: str) -> dict[str, int]:
        before = dict(placed)
        finished = await engine.start(wid, compile_dag(consume.bind(runs, continues.bind(runs, 4))))
        assert await (await finished) == 10
        return {k: placed[k] - before.get(k, 0) for k in placed}

    await attempts("learns")  # the first time nobody knows that `continues` continues
    second = await attempts("knows")
    # continues, then step (its continuation), then consume (maybe ahead of step, or
    # fused with it: step's function returns a value): three attempts, none wasted.
    ray_tasks = second.get("alone", 0) + second.get("batched", 0)
    assert ray_tasks + second.get("fused", 0) == 3, second
    assert count_runs(runs, "consume") == 2  # once per workflow
    await engine.close()
