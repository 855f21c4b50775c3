"""Fused pairs: a task's only consumer, with the same Ray options and a function that
ran quickly last time, runs in the task's own Ray task (one submission and one worker
dispatch instead of two). Each half must still behave as its own task: its own
retries, its own checkpoint, a copy of its input, and a producer whose consumer runs
long after all has its output saved before the consumer ends.

The tests run each shape once first: the manager fuses only functions it saw run."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import ray
from helpers import count_runs, record_run, wait_for

import ray_workflows as workflow
from ray_workflows._core import bridge, config
from ray_workflows._core.keys import task_key
from ray_workflows.storage import open_storage

# The manager's scheduler is what these tests test: not a hosted runner.
pytestmark = pytest.mark.usefixtures("manager_runs")


def _task() -> str:
    return str(ray.get_runtime_context().get_task_id())


@ray.remote
def where(x: int) -> tuple[int, str]:
    return x + 1, _task()


@ray.remote
def where_then(prev: tuple[int, str]) -> tuple[int, str, str]:
    return prev[0] * 10, prev[1], _task()


def test_a_producer_and_its_only_consumer_share_one_ray_task(storage: str, wid: str) -> None:
    value, first, second = workflow.run(where_then.bind(where.bind(1)), workflow_id=wid)
    assert value == 20
    value, first, second = workflow.run(where_then.bind(where.bind(1)), workflow_id=wid + "2")
    assert value == 20
    assert first == second


@ray.remote
def slow_first(runs: str, prev: tuple[int, str]) -> tuple[str, str]:
    record_run(runs, "slow_first")
    if count_runs(runs, "slow_first") == 1:
        time.sleep(0.1)
    return prev[1], _task()


def test_a_consumer_whose_last_run_was_slow_is_not_fused(
    storage: str, wid: str, counter_dir: Path
) -> None:
    runs = str(counter_dir)
    first, second = workflow.run(slow_first.bind(runs, where.bind(1)), workflow_id=wid)
    assert first != second  # never seen
    first, second = workflow.run(slow_first.bind(runs, where.bind(1)), workflow_id=wid + "2")
    assert first != second  # slow last time
    first, second = workflow.run(slow_first.bind(runs, where.bind(1)), workflow_id=wid + "3")
    assert first == second  # quick last time


def test_different_ray_options_are_not_fused(storage: str, wid: str) -> None:
    workflow.run(where_then.bind(where.bind(1)), workflow_id=wid)
    dag = where_then.options(num_cpus=0.5).bind(where.bind(1))
    value, first, second = workflow.run(dag, workflow_id=wid + "2")
    assert value == 20
    assert first != second


@ray.remote
def pair_of(a: tuple[int, str, str], b: tuple[int, str, str]) -> list[tuple[int, str, str]]:
    return [a, b]


def test_a_task_with_two_consumers_is_not_fused_with_either(storage: str, wid: str) -> None:
    workflow.run(where_then.bind(where.bind(1)), workflow_id=wid + "-warm")
    source = where.bind(1)
    dag = pair_of.bind(where_then.bind(source), where_then.bind(source))
    for value, source_task, own_task in workflow.run(dag, workflow_id=wid):
        assert value == 20
        assert source_task != own_task


@ray.remote
def make_list(runs: str) -> list[int]:
    record_run(runs, "make_list")
    return [1, 2, 3]


@ray.remote
def mutate(runs: str, xs: list[int]) -> int:
    record_run(runs, "mutate")
    xs.append(100)
    return sum(xs)


def test_the_consumer_gets_a_copy_of_the_producers_output(
    storage: str, wid: str, counter_dir: Path
) -> None:
    runs = str(counter_dir)
    for n in range(2):
        producer = make_list.options(**workflow.options(task_id="source")).bind(runs)
        assert workflow.run(mutate.bind(runs, producer), workflow_id=f"{wid}{n}") == 106
        assert workflow.get_output(f"{wid}{n}", task_id="source") == [1, 2, 3]
    assert count_runs(runs, "make_list") == 2
    assert count_runs(runs, "mutate") == 2


@ray.remote
def fails_once(runs: str) -> int:
    record_run(runs, "fails_once")
    if count_runs(runs, "fails_once") == 1:
        raise ValueError("first attempt")
    return 5


@ray.remote
def double(runs: str, x: int) -> int:
    record_run(runs, "double")
    return 2 * x


@ray.remote
def consumer_fails_once(runs: str, x: int) -> int:
    record_run(runs, "consumer")
    if count_runs(runs, "consumer") == 1:
        raise ValueError("first attempt")
    return x + 1


def test_a_failing_producer_is_retried_and_its_consumer_runs_once(
    storage: str, wid: str, counter_dir: Path
) -> None:
    for n in range(2):  # the second time, fused
        runs = str(counter_dir / str(n))
        os.mkdir(runs)
        producer = fails_once.options(**workflow.options(retry_exceptions=True)).bind(runs)
        assert workflow.run(double.bind(runs, producer), workflow_id=f"{wid}{n}") == 10
        assert count_runs(runs, "fails_once") == 2
        assert count_runs(runs, "double") == 1


@ray.remote
def make_three(runs: str) -> int:
    record_run(runs, "make_three")
    return 3


def test_a_failing_consumer_is_retried_without_its_producer(
    storage: str, wid: str, counter_dir: Path
) -> None:
    consumer = consumer_fails_once.options(**workflow.options(retry_exceptions=True))
    for n in range(2):  # the second time, fused
        runs = str(counter_dir / str(n))
        os.mkdir(runs)
        dag = consumer.bind(runs, make_three.bind(runs))
        assert workflow.run(dag, workflow_id=f"{wid}{n}") == 4
        assert count_runs(runs, "make_three") == 1
        assert count_runs(runs, "consumer") == 2


@ray.remote
def source(runs: str) -> int:
    record_run(runs, "source")
    return 7


@ray.remote
def killed_once(runs: str, x: int) -> int:
    """Quick, but once a file ``slow`` exists it writes its pid and waits to be killed."""
    record_run(runs, "killed_once")
    slow = Path(runs, "slow")
    if slow.exists():
        slow.unlink()
        Path(runs, "pid").write_text(str(os.getpid()))
        time.sleep(60)
    return x * 3


def test_a_producer_whose_consumer_runs_long_is_saved_before_the_consumer_ends(
    storage: str, wid: str, counter_dir: Path
) -> None:
    runs = str(counter_dir)
    assert workflow.run(killed_once.bind(runs, source.bind(runs)), workflow_id=wid + "-q") == 21
    Path(runs, "slow").touch()
    producer = source.options(**workflow.options(task_id="source")).bind(runs)
    ref = workflow.run_async(killed_once.bind(runs, producer), workflow_id=wid)
    pid_file = Path(runs, "pid")
    wait_for(pid_file.exists)
    # The worker itself wrote the producer's output while the consumer still runs (an
    # output the engine commits would be in a pack, not under this key).
    store = open_storage(config.normalise_storage(storage))
    key = task_key(wid, "source", "out", 1)  # the first lease's epoch
    wait_for(lambda: bridge.run(store.exists(key)), timeout=10)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert ray.get(ref, timeout=120) == 21
    # The worker died with both halves in flight: only the consumer ran again.
    assert count_runs(runs, "source") == 2  # once for the quick run, once here
    assert count_runs(runs, "killed_once") == 3  # quick run, killed attempt, retry


@ray.remote
def dies_when_told(runs: str, x: int) -> int:
    """Quick, but while the file ``deaths`` holds a count above 0 it kills its worker."""
    record_run(runs, "dies_when_told")
    budget = Path(runs, "deaths")
    if budget.exists() and int(budget.read_text()) > 0:
        budget.write_text(str(int(budget.read_text()) - 1))
        os._exit(1)
    return x + 1


def test_a_pair_that_died_runs_apart_so_the_next_death_is_the_consumers_own(
    storage: str, wid: str, counter_dir: Path
) -> None:
    runs = str(counter_dir)
    assert workflow.run(dies_when_told.bind(runs, source.bind(runs)), workflow_id=wid + "-q") == 8
    Path(runs, "deaths").write_text("2")
    assert workflow.run(dies_when_told.bind(runs, source.bind(runs)), workflow_id=wid) == 8
    # The pair died once (its producer's unsaved output with it: the producer runs
    # again, alone); then the consumer died alone and was retried alone. Fused again,
    # the producer would have run once more for the consumer's second death.
    assert count_runs(runs, "source") == 1 + 2
    assert count_runs(runs, "dies_when_told") == 1 + 3


def test_a_dead_pair_is_charged_to_neither_half_and_a_death_alone_is_charged(
    storage: str, wid: str, counter_dir: Path
) -> None:
    # One rule for a dead worker: an attempt that shared its Ray task (here a fused
    # pair) is not charged; it runs again alone, where the next death is charged.
    runs = str(counter_dir)
    none = workflow.options(max_retries=0)
    producer, consumer = source.options(**none), dies_when_told.options(**none)
    assert workflow.run(consumer.bind(runs, producer.bind(runs)), workflow_id=wid + "-q") == 8
    Path(runs, "deaths").write_text("1")  # the pair dies: nobody is charged
    assert workflow.run(consumer.bind(runs, producer.bind(runs)), workflow_id=wid) == 8
    Path(runs, "deaths").write_text("2")  # then the consumer dies alone: charged, no retry
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(consumer.bind(runs, producer.bind(runs)), workflow_id=wid + "-2")
