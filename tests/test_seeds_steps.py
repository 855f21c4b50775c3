# The samples are kept as the seed prints them (its imports, `typing.List`), so the
# lint rules they break are off for this file:
# ruff: noqa: I001, UP006, UP032, UP035, UP037, F811, F821
"""Seed 002's samples of the older step API: ``@workflow.step``, ``.step()``, ``.run()``.

Only the import line changes (``from ray import workflow`` becomes ``import
ray_workflows as workflow``), except where the seed's own text cannot run, each
marked where it stands: Example 3 calls ``.run()`` on the int its first line
returns; Example 5 calls ``get_val1``/``get_val2`` but defines
``get_value1``/``get_value2``; Examples 7 and 8 leave bodies as ``...`` or call an
undefined ``faulty_function`` (the ``random_failure`` it defines just above).

Virtual actors are in test_virtual_actors.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from conftest import kill_manager
from helpers import count_runs, record_run

import ray_workflows as workflow
from ray_workflows._core.steps import StepNode


def test_example_1_hello_world_with_objects(
    fresh_storage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # the sample's relative "tmp/workflow_data"
    try:
        _example_1(tmp_path)
    finally:
        kill_manager(str(tmp_path / "tmp" / "workflow_data"))


def _example_1(tmp_path: Path) -> None:
    import ray
    import ray_workflows as workflow
    from typing import List

    # Creating an arbitrary Ray remote function
    @ray.remote
    def hello():
        return "hello"

    # Defining a workflow step that puts an object into the object store
    @workflow.step
    def words() -> List[ray.ObjectRef]:
        return [hello.remote(), ray.put("world")]

    # Defining a step that receives an object
    @workflow.step
    def concat(words: List[ray.ObjectRef]) -> str:
        return " ".join([ray.get(w) for w in words])

    # Creating workflow
    workflow.init("tmp/workflow_data")
    output: "Workflow[int]" = concat.step(words.step())

    # Running workflow
    assert output.run(workflow_id="workflow_1") == "hello world"
    assert workflow.get_status("workflow_1") == workflow.WorkflowStatus.SUCCESSFUL
    assert workflow.get_output("workflow_1") == "hello world"
    assert (tmp_path / "tmp" / "workflow_data" / "workflows" / "workflow_1" / "plan").is_file()


def test_example_2_resources_reach_the_task(storage: str, wid: str) -> None:
    # The seed's step asks for a GPU, which this machine has not: what is checked is
    # that the option reaches the Ray task, with a resource this cluster lacks too.
    @workflow.step(num_gpus=1)
    def train_model() -> None:
        pass  # This step is assigned a GPU by Ray.

    node = train_model.step()
    assert isinstance(node, StepNode)
    assert node.get_options()["num_gpus"] == 1

    @workflow.step(resources={"no-such-resource": 1})
    def placed() -> str:
        return "ran"

    ref = placed.step().run_async(wid)
    ready, _ = ray.wait([ref], timeout=2)
    assert not ready  # waits for a node with that resource: the option reached Ray
    workflow.cancel(wid)
    with pytest.raises(workflow.WorkflowCancellationError):
        ray.get(ref, timeout=30)


def test_example_3_dynamic_workflow_factorial(storage: str) -> None:
    @workflow.step
    def factorial(n: int) -> int:
        if n == 1:
            return 1
        else:
            return mult.step(n, factorial.step(n - 1))

    @workflow.step
    def mult(a: int, b: int) -> int:
        return a * b

    # Calculate the factorial of 5 by creating a recursion of 5 steps
    factorial_workflow = factorial.step(5).run()
    # The seed then calls `factorial_workflow.run()`, on that int: it checks 120.
    assert factorial_workflow == 120


def test_example_5_steps_as_arguments_and_names(storage: str, wid: str) -> None:
    @workflow.step
    def sum(x: int, y: int, z: int) -> int:
        return x + y + z

    @workflow.step
    def get_value1() -> int:
        return 100

    @workflow.step
    def get_value2(x: int) -> int:
        return 10 * x

    # The seed writes get_val1/get_val2 here, names it never defines.
    sum_workflow = sum.step(get_value1.step(), get_value2.step(10), 100)

    assert sum_workflow.run(wid) == 300
    # Named steps: .options(name=...) and @workflow.step(name=...).
    named = get_value1.options(name="first").step()

    @workflow.step(name="second")
    def double(x: int) -> int:
        return 2 * x

    assert double.step(named).run(wid + "-named") == 200
    assert ray.get(workflow.get_output_async(wid + "-named", name="first")) == 100
    assert workflow.get_output(wid + "-named", name="second") == 200


def test_example_6_fib_by_steps(storage: str) -> None:
    @workflow.step
    def add(a: int, b: int) -> int:
        return a + b

    @workflow.step
    def fib(n: int) -> int:
        if n <= 1:
            return n
        return add.step(fib.step(n - 1), fib.step(n - 2))

    assert fib.step(10).run() == 55


def test_example_7_conditional_steps_with_nested_step_lists(storage: str) -> None:
    # The seed's bodies are "...": each returns what it was asked to book.
    @workflow.step
    def book_flight(origin: str, dest: str, date: str) -> str:
        return f"flight {origin}-{dest} {date}"

    @workflow.step
    def book_hotel(dest: str, dates: list[str]) -> str:
        return f"hotel {dest} {'..'.join(dates)}"

    @workflow.step
    def finalize_or_cancel(flights: list, hotels: list) -> str:
        # Steps nested in a list arrive as ObjectRefs, as ray.remote tasks do.
        return "; ".join(ray.get(flights) + ray.get(hotels))

    @workflow.step
    def book_trip(origin: str, dest: str, dates) -> "Workflow[Receipt]":
        # Note that the workflow engine will not begin executing
        # child workflows until the parent step returns.
        # This avoids step overlap and ensures recoverability.
        f1 = book_flight.step(origin, dest, dates[0])
        f2 = book_flight.step(dest, origin, dates[1])
        hotel = book_hotel.step(dest, dates)
        return finalize_or_cancel.step([f1, f2], [hotel])

    fut = book_trip.step("OAK", "SAN", ["6/12", "7/5"])
    assert fut.run() == "flight OAK-SAN 6/12; flight SAN-OAK 7/5; hotel SAN 6/12..7/5"


@workflow.step
def flaky(runs: str, failures: int) -> str:
    record_run(runs, "flaky")
    if count_runs(runs, "flaky") <= failures:
        raise RuntimeError("Found failure")
    return "OK"


@workflow.step
def handle_errors(result: tuple) -> str:
    # Setting the exception field to NONE on success
    err = result[1]
    if err:
        return "There was an error: {}".format(err)
    else:
        return "OK"


def test_example_8_retries_and_caught_exceptions(storage: str, counter_dir: Path) -> None:
    # The seed's random_failure fails at random; this one fails its first attempts.
    runs = str(counter_dir)
    # As the seed writes it: in the step API, max_retries retries the step's exceptions.
    s1 = flaky.options(max_retries=5).step(runs, 3)
    assert s1.run() == "OK"
    assert count_runs(runs, "flaky") == 4
    for p in counter_dir.iterdir():
        p.unlink()
    # `handle_errors` receives a tuple of (result, exception): the error of the last of
    # the 1 + 3 attempts (max_retries defaults to 3, retrying the step's exceptions).
    s2 = flaky.options(catch_exceptions=True).step(runs, 10)
    assert handle_errors.step(s2).run() == "There was an error: Found failure"
    assert count_runs(runs, "flaky") == 4


@workflow.step
def generate_id(runs: str) -> str:
    import uuid

    record_run(runs, "generate_id")
    # Generate a unique idempotency token.
    return uuid.uuid4().hex


@workflow.step
def book_flight_idempotent(request_id: str, runs: str) -> str:
    record_run(runs, "book")
    return f"ticket-{request_id}"


def test_example_9_idempotency_token_is_durable(storage: str, wid: str, counter_dir: Path) -> None:
    runs = str(counter_dir)
    request_id = generate_id.step(runs)
    ticket = book_flight_idempotent.step(request_id, runs).run(wid)
    # The token is checkpointed: the same workflow again never makes a new one.
    assert (
        workflow.run(book_flight_idempotent.step(generate_id.step(runs), runs), workflow_id=wid)
        == ticket
    )
    assert workflow.resume(wid) == ticket
    assert (count_runs(runs, "generate_id"), count_runs(runs, "book")) == (1, 1)


def test_steps_mix_with_bound_ray_tasks_and_validate_options(storage: str) -> None:
    @ray.remote
    def plain(x: int) -> int:
        return x + 1

    @workflow.step
    def twice(x: int) -> int:
        return 2 * x

    assert twice.step(plain.bind(twice.step(3))).run() == 14
    assert workflow.run(plain.bind(twice.step(5))) == 11
    assert twice(4) == 8  # calling the function itself: no workflow
    with pytest.raises(ValueError, match="no_such_option"):
        workflow.step(no_such_option=1)(lambda: None)
    with pytest.raises(TypeError, match="decorates a function"):
        workflow.step(3)
