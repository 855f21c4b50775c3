"""Task options: both forms, validation, Ray options, retries, catch_exceptions, checkpoint."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import ray
from helpers import count_runs, record_run

import ray_workflows as workflow
from ray_workflows import exceptions as wf_exceptions


class AppError(Exception):
    pass


class OtherError(Exception):
    pass


@ray.remote
def add(a: int, b: int) -> int:
    return a + b


@ray.remote
def value(x):
    return x


@ray.remote
def raise_counted(directory: str, name: str, kind: str = "app"):
    record_run(directory, name)
    Path(directory, f"{name}-times", f"{time.time():.6f}-{uuid.uuid4().hex}").touch()
    raise (AppError if kind == "app" else OtherError)(f"{name} failed")


@ray.remote
def fail_until(directory: str, name: str, failures: int):
    """Raise AppError on the first ``failures`` attempts, then succeed."""
    record_run(directory, name)
    if count_runs(directory, name) <= failures:
        raise AppError(f"attempt {count_runs(directory, name)}")
    return f"ok after {count_runs(directory, name)}"


@ray.remote
def die_once(directory: str, name: str):
    """Kill the worker process on the first attempt (a system error)."""
    record_run(directory, name)
    if count_runs(directory, name) == 1:
        os._exit(1)
    return "survived"


@ray.remote
def die_always(directory: str, name: str):
    record_run(directory, name)
    os._exit(1)


@ray.remote
def assigned_cpus():
    return ray.get_runtime_context().get_assigned_resources().get("CPU")


@ray.remote
def describe(result):
    value, error = result
    return {"value": value, "error": None if error is None else (type(error).__name__, str(error))}


def _times_dir(counter_dir: Path, name: str) -> Path:
    path = counter_dir / f"{name}-times"
    path.mkdir(exist_ok=True)
    return path


# -- validation ------------------------------------------------------------------------


def test_unknown_option_is_rejected_listing_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        workflow.options(bogus=1)
    message = str(info.value)
    assert "bogus" in message
    for key in (
        "task_id",
        "metadata",
        "catch_exceptions",
        "checkpoint",
        "max_retries",
        "retry_exceptions",
    ):
        assert key in message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"catch_exceptions": "yes"},
        {"checkpoint": 1},
        {"max_retries": -2},
        {"max_retries": 1.5},
        {"max_retries": True},
        {"retry_exceptions": "AppError"},
        {"retry_exceptions": [AppError, 3]},
        {"metadata": [1, 2]},
        {"metadata": {"x": object()}},
        {"task_id": ""},
        {"task_id": "a/b"},
    ],
)
def test_invalid_option_values_are_rejected(kwargs) -> None:
    with pytest.raises(ValueError):
        workflow.options(**kwargs)


def test_options_decorator_needs_a_remote_function() -> None:
    def plain():
        return 1

    with pytest.raises(ValueError, match="ray.remote"):
        workflow.options(task_id="x")(plain)


# -- both forms ----------------------------------------------------------------------------


@workflow.options(task_id="decorated", metadata={"form": "decorator"}, max_retries=1)
@ray.remote
def decorated(x):
    return x * 2


def test_options_via_dot_options(storage: str, wid: str) -> None:
    opts = workflow.options(
        task_id="dotted",
        metadata={"form": "options", "n": [1, 2]},
        catch_exceptions=False,
        checkpoint=True,
        max_retries=5,
        retry_exceptions=True,
    )
    assert workflow.run(add.options(**opts).bind(1, 2), workflow_id=wid) == 3
    meta = workflow.get_metadata(wid, "dotted")
    assert meta["task_id"] == "dotted"
    assert meta["user_metadata"] == {"form": "options", "n": [1, 2]}
    task_options = meta["task_options"]
    assert task_options["max_retries"] == 5
    assert task_options["retry_exceptions"] is True
    assert task_options["catch_exceptions"] is False
    assert task_options["checkpoint"] is True
    assert isinstance(task_options["ray_options"], dict)
    assert workflow.get_output(wid, task_id="dotted") == 3


def test_options_via_decorator(storage: str, wid: str) -> None:
    assert workflow.run(decorated.bind(21), workflow_id=wid) == 42
    meta = workflow.get_metadata(wid, "decorated")
    assert meta["user_metadata"] == {"form": "decorator"}
    assert meta["task_options"]["max_retries"] == 1
    assert workflow.get_output(wid, task_id="decorated") == 42


def test_decorator_options_survive_later_ray_options(storage: str, wid: str) -> None:
    assert workflow.run(decorated.options(num_cpus=1).bind(5), workflow_id=wid) == 10
    meta = workflow.get_metadata(wid, "decorated")
    assert meta["user_metadata"] == {"form": "decorator"}


def test_options_via_ray_remote_arguments(storage: str, wid: str) -> None:
    @ray.remote(**workflow.options(task_id="in-remote", metadata={"form": "remote"}))
    def inner():
        return "hi"

    assert workflow.run(inner.bind(), workflow_id=wid) == "hi"
    assert workflow.get_metadata(wid, "in-remote")["user_metadata"] == {"form": "remote"}


def test_name_is_an_alias_of_task_id(storage: str, wid: str) -> None:
    dag = add.options(**workflow.options(name="named")).bind(2, 2)
    assert workflow.run(dag, workflow_id=wid) == 4
    assert workflow.get_metadata(wid, "named")["task_id"] == "named"
    assert workflow.get_output(wid, task_id="named") == 4


def test_repeated_task_ids_are_numbered_bottom_up(storage: str, wid: str) -> None:
    f = add.options(**workflow.options(task_id="f"))
    assert workflow.run(f.bind(1, f.bind(2, f.bind(3, 4))), workflow_id=wid) == 10
    assert workflow.get_output(wid, task_id="f") == 7
    assert workflow.get_output(wid, task_id="f_1") == 9
    assert workflow.get_output(wid, task_id="f_2") == 10


def test_explicit_id_colliding_with_a_generated_one_is_an_error(storage: str, wid: str) -> None:
    f = add.options(**workflow.options(task_id="f"))
    g = add.options(**workflow.options(task_id="f_1"))
    with pytest.raises(wf_exceptions.TaskIdCollisionError):
        workflow.run(g.bind(0, f.bind(1, f.bind(2, 3))), workflow_id=wid)
    with pytest.raises(workflow.WorkflowNotFoundError):
        workflow.get_status(wid)


# -- Ray's own options ---------------------------------------------------------------------


def test_num_cpus_from_dot_options_is_honoured(storage: str, wid: str) -> None:
    dag = assigned_cpus.options(num_cpus=2, **workflow.options(task_id="cpus")).bind()
    assert workflow.run(dag, workflow_id=wid) == 2.0
    assert workflow.get_metadata(wid, "cpus")["task_options"]["ray_options"]["num_cpus"] == 2


def test_num_cpus_from_ray_remote_and_decorator_is_honoured(storage: str, wid: str) -> None:
    @workflow.options(task_id="two-cpus")
    @ray.remote(num_cpus=2)
    def two_cpus():
        return ray.get_runtime_context().get_assigned_resources().get("CPU")

    assert workflow.run(two_cpus.bind(), workflow_id=wid) == 2.0


def test_default_task_gets_one_cpu(storage: str, wid: str) -> None:
    assert workflow.run(assigned_cpus.bind(), workflow_id=wid) == 1.0


def test_scheduling_strategy_object_is_accepted(storage: str, wid: str) -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    strategy = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    assert (
        workflow.run(value.options(scheduling_strategy=strategy).bind("here"), workflow_id=wid)
        == "here"
    )


# -- retries ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "attempts"),
    [
        ({}, 1),
        ({"retry_exceptions": True}, 4),
        ({"max_retries": 2, "retry_exceptions": True}, 3),
        ({"max_retries": 0, "retry_exceptions": True}, 1),
        ({"max_retries": 1, "retry_exceptions": [AppError]}, 2),
        ({"max_retries": 1, "retry_exceptions": [OtherError, Exception]}, 2),
        ({"max_retries": 3, "retry_exceptions": [OtherError]}, 1),
    ],
    ids=[
        "default",
        "retry-all",
        "max2",
        "max0",
        "matching-list",
        "base-class",
        "non-matching-list",
    ],
)
def test_application_error_attempts(
    storage: str, wid: str, counter_dir: Path, options: dict, attempts: int
) -> None:
    d = str(counter_dir)
    _times_dir(counter_dir, "app")
    dag = raise_counted.options(**workflow.options(task_id="flaky", **options)).bind(d, "app")
    with pytest.raises(workflow.WorkflowExecutionError) as info:
        workflow.run(dag, workflow_id=wid)
    assert type(info.value.__cause__) is AppError
    assert str(info.value.__cause__) == "app failed"
    assert count_runs(counter_dir, "app") == attempts
    assert workflow.get_status(wid) == workflow.FAILED


def test_ray_remote_retry_options_are_honoured(storage: str, wid: str, counter_dir: Path) -> None:
    @ray.remote(max_retries=1, retry_exceptions=True)
    def ray_level(directory):
        record_run(directory, "ray-level")
        raise AppError("ray-level failed")

    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(ray_level.bind(str(counter_dir)), workflow_id=wid)
    assert count_runs(counter_dir, "ray-level") == 2


def test_ray_max_retries_in_dot_options_is_honoured(
    storage: str, wid: str, counter_dir: Path
) -> None:
    d = str(counter_dir)
    _times_dir(counter_dir, "dot")
    dag = raise_counted.options(max_retries=2, retry_exceptions=True).bind(d, "dot")
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(dag, workflow_id=wid)
    assert count_runs(counter_dir, "dot") == 3


def test_retry_exceptions_with_a_locally_defined_class(
    storage: str, wid: str, counter_dir: Path
) -> None:
    class LocalError(Exception):
        pass

    @ray.remote
    def raise_local(directory):
        record_run(directory, "local")
        raise LocalError("local failed")

    dag = raise_local.options(
        **workflow.options(max_retries=1, retry_exceptions=[LocalError])
    ).bind(str(counter_dir))
    with pytest.raises(workflow.WorkflowExecutionError) as info:
        workflow.run(dag, workflow_id=wid)
    assert "AttributeError" not in str(info.value)
    assert count_runs(counter_dir, "local") == 2
    assert type(info.value.__cause__).__name__ == "LocalError"
    assert str(info.value.__cause__) == "local failed"


def test_retried_task_succeeds(storage: str, wid: str, counter_dir: Path) -> None:
    d = str(counter_dir)
    dag = fail_until.options(**workflow.options(retry_exceptions=True)).bind(d, "flaky", 2)
    assert workflow.run(dag, workflow_id=wid) == "ok after 3"
    assert count_runs(counter_dir, "flaky") == 3
    assert workflow.get_status(wid) == workflow.SUCCESSFUL


def test_retries_back_off(storage: str, wid: str, counter_dir: Path) -> None:
    d = str(counter_dir)
    times_dir = _times_dir(counter_dir, "backoff")
    dag = raise_counted.options(**workflow.options(retry_exceptions=True)).bind(d, "backoff")
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(dag, workflow_id=wid)
    times = sorted(float(p.name.split("-")[0]) for p in times_dir.iterdir())
    assert len(times) == 4
    gaps = [b - a for a, b in zip(times[:-1], times[1:], strict=True)]
    # 50, 100, 200 ms, each jittered down to at most half.
    assert gaps[0] >= 0.025 and gaps[1] >= 0.05 and gaps[2] >= 0.1, gaps
    assert times[-1] - times[0] >= 0.175


def test_worker_death_is_retried_without_retry_exceptions(
    storage: str, wid: str, counter_dir: Path
) -> None:
    assert workflow.run(die_once.bind(str(counter_dir), "die"), workflow_id=wid) == "survived"
    assert count_runs(counter_dir, "die") == 2
    assert workflow.get_status(wid) == workflow.SUCCESSFUL


def test_worker_death_obeys_max_retries(storage: str, wid: str, counter_dir: Path) -> None:
    dag = die_always.options(**workflow.options(max_retries=1)).bind(str(counter_dir), "dead")
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(dag, workflow_id=wid)
    assert count_runs(counter_dir, "dead") == 2
    assert workflow.get_status(wid) == workflow.FAILED


# -- catch_exceptions --------------------------------------------------------------------------


def test_catch_exceptions_on_success(storage: str, wid: str) -> None:
    dag = value.options(**workflow.options(catch_exceptions=True)).bind({"a": 1})
    assert workflow.run(dag, workflow_id=wid) == ({"a": 1}, None)
    assert workflow.get_output(wid) == ({"a": 1}, None)


def test_catch_exceptions_on_failure_is_durable(storage: str, wid: str, counter_dir: Path) -> None:
    d = str(counter_dir)
    _times_dir(counter_dir, "caught")
    dag = raise_counted.options(**workflow.options(catch_exceptions=True)).bind(d, "caught")
    result, error = workflow.run(dag, workflow_id=wid)
    assert result is None
    assert type(error) is AppError
    assert str(error) == "caught failed"
    assert workflow.get_status(wid) == workflow.SUCCESSFUL
    stored, stored_error = workflow.get_output(wid)
    assert stored is None
    assert type(stored_error) is AppError and str(stored_error) == "caught failed"
    resumed, resumed_error = workflow.resume(wid)
    assert resumed is None and type(resumed_error) is AppError
    assert count_runs(counter_dir, "caught") == 1


def test_caught_error_flows_to_a_downstream_task(storage: str, wid: str, counter_dir: Path) -> None:
    d = str(counter_dir)
    _times_dir(counter_dir, "inner")
    inner = raise_counted.options(**workflow.options(task_id="inner", catch_exceptions=True)).bind(
        d, "inner"
    )
    assert workflow.run(describe.bind(inner), workflow_id=wid) == {
        "value": None,
        "error": ("AppError", "inner failed"),
    }
    stored, stored_error = workflow.get_output(wid, task_id="inner")
    assert stored is None and type(stored_error) is AppError


def test_catch_after_retries(storage: str, wid: str, counter_dir: Path) -> None:
    d = str(counter_dir)
    _times_dir(counter_dir, "retry-catch")
    dag = raise_counted.options(
        **workflow.options(catch_exceptions=True, retry_exceptions=True, max_retries=1)
    ).bind(d, "retry-catch")
    result, error = workflow.run(dag, workflow_id=wid)
    assert result is None and type(error) is AppError
    assert count_runs(counter_dir, "retry-catch") == 2


# -- checkpoint=False ---------------------------------------------------------------------------


def test_checkpoint_false_output_is_not_stored(storage: str, wid: str) -> None:
    volatile = value.options(**workflow.options(task_id="volatile", checkpoint=False)).bind(10)
    durable = value.options(**workflow.options(task_id="durable")).bind(20)
    assert workflow.run(add.bind(volatile, durable), workflow_id=wid) == 30
    assert workflow.get_output(wid, task_id="durable") == 20
    with pytest.raises(wf_exceptions.TaskNotFoundError):
        workflow.get_output(wid, task_id="volatile")
    assert workflow.get_output(wid) == 30
    meta = workflow.get_metadata(wid, "volatile")
    assert meta["task_options"]["checkpoint"] is False
    assert workflow.get_metadata(wid, "durable")["task_options"]["checkpoint"] is True


def test_compiled_options_are_per_node_and_per_workflow_defaults() -> None:
    """Options and defaults are cached per function across compiles (the driver
    parses them once); a cached entry must never leak into another node's options,
    another workflow's defaults, or the argument values."""
    from ray_workflows._core.compiler import compile_dag, serialization

    plain = compile_dag(add.bind(1, 2))
    retried = compile_dag(add.options(**workflow.options(max_retries=7)).bind(1, 2))
    spread = compile_dag(add.options(num_cpus=0.5).bind(1, 2))
    assert plain.tasks[plain.output_task_id].options.max_retries == 3
    assert retried.tasks[retried.output_task_id].options.max_retries == 7
    assert spread.tasks[spread.output_task_id].options.ray_options == {"num_cpus": 0.5}
    assert plain.tasks[plain.output_task_id].options.ray_options == {}

    for checkpoint, catch in [(True, False), (False, True), (True, True), (False, False)]:
        dag = add.bind(add.bind(1, 2), 3)
        compiled = compile_dag(dag, checkpoint=checkpoint, catch_exceptions=catch)
        out = compiled.tasks[compiled.output_task_id].options
        inner = next(t for t in compiled.tasks.values() if t.task_id != compiled.output_task_id)
        assert (out.checkpoint, out.catch_exceptions) == (checkpoint, catch)
        # catch_exceptions defaults only to the output task; checkpoint to all.
        assert (inner.options.checkpoint, inner.options.catch_exceptions) == (checkpoint, False)

    explicit = compile_dag(
        add.options(**workflow.options(checkpoint=False)).bind(1, 2), checkpoint=True
    )
    assert explicit.tasks[explicit.output_task_id].options.checkpoint is False

    # Plain arguments take the C pickler; they must load back with their exact types.
    mixed = compile_dag(value.bind((True, 1, 1.5, "s", b"b", None)))
    flat = compile_dag(add.bind(True, 2**70))
    for plan, expected in [(mixed, ((True, 1, 1.5, "s", b"b", None),)), (flat, (True, 2**70))]:
        spec = plan.tasks[plan.output_task_id]
        args, kwargs = serialization.loads(spec.args, [])
        assert args == expected and kwargs == {}
        assert [type(a) for a in args] == [type(e) for e in expected]

    # A driver making new option values for every run does not grow the cache forever.
    from ray_workflows._core import compiler as compiler_module

    for i in range(200):
        many = compile_dag(add.options(num_cpus=i / 1000).bind(1, 2))
        assert many.tasks[many.output_task_id].options.ray_options == {"num_cpus": i / 1000}
    info = compiler_module._FUNCS[add._function]
    assert len(info.options) <= compiler_module._OPTIONS_PER_FUNCTION
    # A dict option changed in place after a compile does not change what is cached.
    res = {"custom": 1}
    compile_dag(add.options(resources=res).bind(1, 2))
    res["custom"] = 2
    compile_dag(add.options(resources=res).bind(1, 2))
    again = compile_dag(add.options(resources={"custom": 1}).bind(1, 2))
    assert again.tasks[again.output_task_id].options.ray_options == {"resources": {"custom": 1}}
    # Option values that cannot be a cache key are parsed every time, still correctly.
    env = {"env_vars": {"A": "1"}}
    odd = compile_dag(add.options(runtime_env=env).bind(1, 2))
    assert odd.tasks[odd.output_task_id].options.ray_options == {"runtime_env": env}

    with pytest.raises(TypeError, match="do not match"):
        compile_dag(add.bind(1))
    with pytest.raises(TypeError, match="do not match"):
        compile_dag(add.bind(1, 2, 3))
    with pytest.raises(TypeError, match="do not match"):
        compile_dag(add.bind(1, c=2))


def test_a_finished_workflow_whose_output_was_not_checkpointed_says_so(
    storage: str, wid: str
) -> None:
    # Its output was never stored: resuming it, or running its id again, cannot return
    # it. That is an error naming what to do (it used to recurse for ever).
    dag = add.options(**workflow.options(checkpoint=False)).bind(1, 2)
    assert workflow.run(dag, workflow_id=wid) == 3
    assert workflow.get_status(wid) == workflow.SUCCESSFUL
    for again in (lambda: workflow.resume(wid), lambda: workflow.run(dag, workflow_id=wid)):
        started = time.monotonic()
        with pytest.raises(workflow.exceptions.WorkflowError, match="checkpoint=False"):
            again()
        assert time.monotonic() - started < 30
    assert workflow.get_status(wid) == workflow.SUCCESSFUL
