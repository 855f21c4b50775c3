"""Drop-in for real: code written for Ray 2.47's ``ray.workflow`` (and the 1.x step
API) keeps working where it caught errors, retried steps or caught a continuation's
failure; Ray actor handles, which the seeds say cannot pass between steps, are refused
before anything is stored."""

from __future__ import annotations

import dataclasses
import queue
import time
from pathlib import Path
from typing import Any

import pytest
import ray
from helpers import count_runs, record_run, wait_for
from ray.dag import InputNode

import ray_workflows as workflow
from ray_workflows.exceptions import (
    NothingToResumeError,
    TaskNotFoundError,
    WorkflowNotFoundError,
    WorkflowNotResumableError,
    WorkflowQueueFullError,
)


@ray.remote
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n


@ray.remote
def use(counter: Any) -> int:
    return int(ray.get(counter.incr.remote()))


@dataclasses.dataclass
class Holder:
    counter: Any


def assert_not_stored(wf_id: str) -> None:
    with pytest.raises(WorkflowNotFoundError):
        workflow.get_status(wf_id)


# -- Ray actor handles -----------------------------------------------------------------


@pytest.mark.parametrize(
    "bind",
    [
        pytest.param(lambda c: use.bind(c), id="top-level"),
        pytest.param(lambda c: use.bind([1, c]), id="in-a-list"),
        pytest.param(lambda c: use.bind({"counter": c}), id="in-a-dict"),
        pytest.param(lambda c: use.bind(Holder(c)), id="in-a-dataclass"),
        pytest.param(lambda c: use.bind(counter=c), id="keyword"),
        pytest.param(lambda c: use.bind(use.bind((c,))), id="upstream-task"),
    ],
)
def test_an_actor_handle_argument_is_refused_before_anything_is_stored(
    storage: str, wid: str, bind: Any
) -> None:
    counter = Counter.remote()
    with pytest.raises(TypeError, match="actor handle") as info:
        workflow.run(bind(counter), workflow_id=wid)
    message = str(info.value)
    assert "'test_compat.use'" in message  # the task
    assert "inside the task" in message and "virtual actor" in message  # what to do
    assert_not_stored(wid)


def test_an_actor_handle_as_a_workflow_input_or_step_argument_is_refused(
    storage: str, wid: str
) -> None:
    counter = Counter.remote()
    with InputNode() as inp:
        dag = use.bind(inp)
    with pytest.raises(TypeError, match="actor handle"):
        workflow.run(dag, counter, workflow_id=wid)
    with pytest.raises(TypeError, match="actor handle"):
        workflow.run_async(dag, counter, workflow_id=wid)
    step = workflow.step(lambda c: 1)
    with pytest.raises(TypeError, match="actor handle"):
        step.step(counter).run(workflow_id=wid)
    assert_not_stored(wid)


@workflow.step
def make_counter(runs: str) -> Any:
    record_run(runs, "make_counter")
    return Counter.remote()


def test_a_task_returning_an_actor_handle_fails_once_with_a_clear_error(
    storage: str, wid: str, counter_dir: Path
) -> None:
    # A step retries its exceptions (max_retries=3), but not this one: it cannot go away.
    with pytest.raises(workflow.WorkflowExecutionError) as info:
        make_counter.step(str(counter_dir)).run(workflow_id=wid)
    cause = info.value.__cause__
    assert isinstance(cause, TypeError)
    assert "actor handle" in str(cause) and "virtual actor" in str(cause)
    assert count_runs(counter_dir, "make_counter") == 1
    # An output that is not checkpointed is not refused: it passes to its consumer.
    producer = make_counter.options(checkpoint=False).step(str(counter_dir))
    assert workflow.run(use.bind(producer), workflow_id=wid + "-unstored") == 1


# -- retries: the step API's rule, and the DAG API's ------------------------------------


def _flaky(runs: str, failures: int) -> str:
    record_run(runs, "flaky")
    if count_runs(runs, "flaky") <= failures:
        raise RuntimeError("flaky failure")
    return "OK"


flaky_step = workflow.step(_flaky)
flaky_task = ray.remote(_flaky)


def test_a_step_retries_its_exceptions_and_a_bind_task_only_with_retry_exceptions(
    storage: str, wid: str, tmp_path: Path
) -> None:
    runs = [tmp_path / name for name in ("step", "narrowed", "bind")]
    for directory in runs:
        directory.mkdir()
    # Ray 1.x's step API: max_retries retries the step's own exceptions.
    assert flaky_step.options(max_retries=5).step(str(runs[0]), 3).run(workflow_id=wid) == "OK"
    assert count_runs(runs[0], "flaky") == 4
    # retry_exceptions=False narrows a step to Ray 2's rule.
    narrowed = flaky_step.options(max_retries=5, retry_exceptions=False).step(str(runs[1]), 3)
    with pytest.raises(workflow.WorkflowExecutionError):
        narrowed.run(workflow_id=wid + "-narrowed")
    assert count_runs(runs[1], "flaky") == 1
    # The same function as a .bind() task keeps Ray 2's rule: no retry_exceptions, no retry.
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(
            flaky_task.options(max_retries=5).bind(str(runs[2]), 3), workflow_id=wid + "-bind"
        )
    assert count_runs(runs[2], "flaky") == 1


# -- errors Ray 2.47 code catches ---------------------------------------------------------


@ray.remote
def add(a: int, b: int) -> int:
    return a + b


def test_unknown_ids_are_value_errors_as_in_ray_2_47(storage: str, wid: str) -> None:
    for call in (
        lambda: workflow.get_output(wid),
        lambda: workflow.get_metadata(wid),
        lambda: workflow.get_status(wid),
        lambda: workflow.cancel(wid),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert isinstance(info.value, WorkflowNotFoundError)
    workflow.run(add.bind(1, 2), workflow_id=wid)
    for call in (
        lambda: workflow.get_output(wid, task_id="no-such-task"),
        lambda: workflow.get_metadata(wid, task_id="no-such-task"),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert isinstance(info.value, TaskNotFoundError)


def test_resuming_an_unknown_id_is_not_resumable_as_in_ray_2_47(storage: str, wid: str) -> None:
    before = workflow.list_all()
    with pytest.raises(WorkflowNotResumableError) as info:
        workflow.resume(wid)
    assert isinstance(info.value, WorkflowNotFoundError)
    assert isinstance(info.value, NothingToResumeError)
    assert wid in str(info.value)
    with pytest.raises(WorkflowNotResumableError):
        ray.get(workflow.resume_async(wid), timeout=60)
    assert workflow.list_all() == before


@ray.remote
def gated(gate: str) -> str:
    while not Path(gate).exists():
        time.sleep(0.02)
    return "done"


def test_a_full_queue_is_a_queue_full_as_in_ray_2_47(fresh_storage: str, tmp_path: Path) -> None:
    workflow.init(fresh_storage, max_running_workflows=1, max_pending_workflows=0)
    gate = str(tmp_path / "gate")
    ref = workflow.run_async(gated.bind(gate), workflow_id="holds-the-slot")
    wait_for(lambda: workflow.get_status("holds-the-slot") == workflow.RUNNING)
    with pytest.raises(queue.Full) as info:
        workflow.run_async(add.bind(1, 2), workflow_id="no-room")
    assert isinstance(info.value, WorkflowQueueFullError)
    Path(gate).touch()
    assert ray.get(ref, timeout=60) == "done"


class AppError(Exception):
    pass


@ray.remote
def fail(message: str) -> int:
    raise AppError(message)


def test_get_output_of_a_failed_workflow_raises_what_run_raised(storage: str, wid: str) -> None:
    failing = fail.options(**workflow.options(task_id="failing")).bind("boom")
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(add.bind(1, failing), workflow_id=wid)
    with pytest.raises(workflow.WorkflowExecutionError) as info:
        workflow.get_output(wid)
    assert info.value.task_id == "failing"
    assert type(info.value.__cause__) is AppError and str(info.value.__cause__) == "boom"
    with pytest.raises(workflow.WorkflowExecutionError) as again:
        ray.get(workflow.get_output_async(wid), timeout=60)
    assert "boom" in str(again.value)


# -- catch_exceptions covers the whole call tree (Ray 2.47) --------------------------------


@ray.remote
def maybe_fail(fail: bool) -> int:
    if fail:
        raise ValueError("failed inside the continuation")
    return 5


@ray.remote
def double(x: int) -> int:
    return 2 * x


@ray.remote
def parent(fail: bool) -> Any:
    # maybe_fail is not the continuation's output task: its failure is caught above.
    return workflow.continuation(double.bind(maybe_fail.bind(fail)))


@ray.remote
def grandparent(fail: bool) -> Any:
    return workflow.continuation(double.bind(parent.bind(fail)))


@ray.remote
def describe(result: tuple[Any, BaseException | None]) -> str:
    value, error = result
    return f"error: {error}" if error is not None else f"value: {value}"


catching = workflow.options(catch_exceptions=True)


def test_a_failure_inside_a_continuation_is_caught_by_its_creator(storage: str, wid: str) -> None:
    value, error = workflow.run(parent.options(**catching).bind(True), workflow_id=wid)
    assert value is None
    assert type(error) is ValueError and str(error) == "failed inside the continuation"
    # Durable: read back from storage, it is the same.
    value, error = workflow.get_output(wid)
    assert value is None and type(error) is ValueError
    assert workflow.get_status(wid) == workflow.SUCCESSFUL
    assert workflow.run(parent.options(**catching).bind(False), workflow_id=wid + "-ok") == (
        10,
        None,
    )


def test_a_caught_failure_two_continuations_down_reaches_the_catchers_consumer(
    storage: str, wid: str
) -> None:
    dag = describe.bind(grandparent.options(**catching).bind(True))
    assert workflow.run(dag, workflow_id=wid) == "error: failed inside the continuation"
    dag = describe.bind(grandparent.options(**catching).bind(False))
    assert workflow.run(dag, workflow_id=wid + "-ok") == "value: 20"
    # A failing input of a catching task is data, not a call the task made: not caught.
    dag = describe.options(**catching).bind(parent.bind(True))
    with pytest.raises(workflow.WorkflowExecutionError) as info:
        workflow.run(dag, workflow_id=wid + "-input")
    assert type(info.value.__cause__) is ValueError
