"""The blocking API: run/run_async, inputs, status, list_all, metadata, outputs,
failures, resume semantics, threads and the task context."""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path

import pytest
import ray
from helpers import count_runs, record_run
from ray.dag import InputNode

import ray_workflows as workflow
from ray_workflows import exceptions as wf_exceptions


class AppError(Exception):
    """An application error defined in this module (its class must survive the trip)."""


@ray.remote
def add(a: int, b: int) -> int:
    return a + b


@ray.remote
def pair(a, b):
    return (a, b)


@ray.remote
def identity(x):
    return x


@ray.remote
def counted(directory: str, name: str, value):
    record_run(directory, name)
    return value


@ray.remote
def fail(message: str) -> None:
    raise AppError(message)


@ray.remote
def sleepy(seconds: float, value):
    time.sleep(seconds)
    return value


@ray.remote
def whoami():
    return workflow.get_current_workflow_id(), workflow.get_current_task_id()


# -- run / run_async -------------------------------------------------------------------


def test_run_returns_output_and_status_is_a_str_enum(storage: str, wid: str) -> None:
    assert workflow.run(add.bind(1, add.bind(2, 3)), workflow_id=wid) == 6
    status = workflow.get_status(wid)
    assert isinstance(status, workflow.WorkflowStatus)
    assert status is workflow.SUCCESSFUL
    assert status == "SUCCESSFUL"


def test_run_async_returns_an_object_ref(storage: str, wid: str) -> None:
    ref = workflow.run_async(add.bind(40, 2), workflow_id=wid)
    assert isinstance(ref, ray.ObjectRef)
    assert ray.get(ref, timeout=60) == 42
    assert workflow.get_status(wid) == workflow.SUCCESSFUL


def test_run_without_id_creates_a_new_workflow_each_time(storage: str, counter_dir: Path) -> None:
    dag = counted.bind(str(counter_dir), "anon", 7)
    assert workflow.run(dag) == 7
    assert workflow.run(dag) == 7
    assert count_runs(counter_dir, "anon") == 2


def test_create_handle_runs(storage: str, wid: str) -> None:
    assert workflow.create(add.bind(1, 1)).run(workflow_id=wid) == 2
    assert workflow.get_output(wid) == 2


# -- InputNode -----------------------------------------------------------------------


def test_input_node_positional_and_keyword(storage: str, wid: str) -> None:
    with InputNode() as inp:
        dag = pair.bind(inp[0], inp.x)
    assert workflow.run(dag, 1, x=2, workflow_id=wid) == (1, 2)


def test_input_node_index_and_string_key(storage: str, wid: str) -> None:
    with InputNode() as inp:
        dag = add.bind(inp[1], inp["k"])
    assert workflow.run(dag, 100, 20, k=3, workflow_id=wid) == 23


def test_input_node_passed_directly_gets_the_single_positional_input(
    storage: str, wid: str
) -> None:
    with InputNode() as inp:
        dag = identity.bind(inp)
    assert workflow.run(dag, {"v": [1, 2]}, workflow_id=wid) == {"v": [1, 2]}


def test_input_values_are_durable_across_resume(storage: str, wid: str) -> None:
    with InputNode() as inp:
        dag = add.bind(inp[0], add.bind(inp[1], 1))
    assert workflow.run(dag, 10, 5, workflow_id=wid) == 16
    assert workflow.resume(wid) == 16
    assert workflow.get_output(wid) == 16


# -- status, list_all, metadata -----------------------------------------------------------


def test_get_status_of_unknown_id_raises_not_found(storage: str, wid: str) -> None:
    with pytest.raises(workflow.WorkflowNotFoundError) as info:
        workflow.get_status(wid)
    assert wid in str(info.value)


def test_get_metadata_of_unknown_id_raises_not_found(storage: str, wid: str) -> None:
    with pytest.raises(workflow.WorkflowNotFoundError):
        workflow.get_metadata(wid)


def test_get_output_of_unknown_id_raises_not_found(storage: str, wid: str) -> None:
    with pytest.raises(workflow.WorkflowNotFoundError):
        workflow.get_output(wid)


def test_list_all_filters_sorting_and_consistency(fresh_storage: str) -> None:
    assert workflow.list_all() == []
    ok_a, ok_b, bad = "b-ok", "d-ok", "a-bad"
    assert workflow.run(add.bind(1, 2), workflow_id=ok_b) == 3
    assert workflow.run(add.bind(2, 2), workflow_id=ok_a) == 4
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(fail.bind("x"), workflow_id=bad)

    everything = workflow.list_all()
    assert everything == [(bad, "FAILED"), (ok_a, "SUCCESSFUL"), (ok_b, "SUCCESSFUL")]
    assert all(isinstance(s, workflow.WorkflowStatus) for _, s in everything)
    assert everything == sorted(everything)
    for wf_id, status in everything:
        assert workflow.get_status(wf_id) == status
        assert workflow.get_metadata(wf_id)["status"] == status

    assert workflow.list_all("SUCCESSFUL") == [
        (ok_a, workflow.SUCCESSFUL),
        (ok_b, workflow.SUCCESSFUL),
    ]
    assert workflow.list_all(workflow.FAILED) == [(bad, workflow.FAILED)]
    assert workflow.list_all({workflow.SUCCESSFUL, "FAILED"}) == everything
    assert workflow.list_all({"RUNNING", workflow.CANCELED}) == []


@pytest.mark.parametrize("bad_filter", ["bogus", "successful", {"SUCCESSFUL", "nope"}, "NONE"])
def test_list_all_rejects_unknown_status(storage: str, bad_filter) -> None:
    with pytest.raises(ValueError):
        workflow.list_all(bad_filter)


def test_workflow_metadata_round_trip(storage: str, wid: str) -> None:
    user = {"owner": "alice", "n": 3, "nested": {"tags": ["a", "b"], "ok": True, "x": None}}
    before = time.time()
    assert workflow.run(add.bind(1, 2), workflow_id=wid, metadata=user) == 3
    after = time.time()
    meta = workflow.get_metadata(wid)
    assert meta["workflow_id"] == wid
    assert meta["status"] == "SUCCESSFUL"
    assert meta["status"] == workflow.get_status(wid)
    assert meta["user_metadata"] == user
    assert "error" not in meta
    stats = meta["stats"]
    assert before - 1 <= stats["start_time"] <= stats["end_time"] <= after + 1


def test_workflow_metadata_defaults_to_empty(storage: str, wid: str) -> None:
    workflow.run(add.bind(1, 2), workflow_id=wid)
    assert workflow.get_metadata(wid)["user_metadata"] == {}


def test_task_metadata(storage: str, wid: str) -> None:
    dag = add.options(**workflow.options(task_id="top", metadata={"k": "v"})).bind(
        1, add.options(**workflow.options(task_id="leaf")).bind(2, 3)
    )
    assert workflow.run(dag, workflow_id=wid) == 6
    meta = workflow.get_metadata(wid, "top")
    assert meta["task_id"] == "top"
    assert meta["user_metadata"] == {"k": "v"}
    opts = meta["task_options"]
    for key in ("max_retries", "retry_exceptions", "catch_exceptions", "checkpoint", "ray_options"):
        assert key in opts
    assert opts["max_retries"] == 3
    assert opts["retry_exceptions"] is False
    assert opts["catch_exceptions"] is False
    assert opts["checkpoint"] is True
    assert meta["stats"]["start_time"] <= meta["stats"]["end_time"]
    leaf = workflow.get_metadata(wid, "leaf")
    assert leaf["task_id"] == "leaf"
    assert leaf["user_metadata"] == {}
    # The task-level view is also reachable by the older keyword.
    assert workflow.get_metadata(wid, name="leaf")["task_id"] == "leaf"


def test_task_metadata_of_unknown_task(storage: str, wid: str) -> None:
    workflow.run(add.bind(1, 2), workflow_id=wid)
    with pytest.raises(wf_exceptions.TaskNotFoundError):
        workflow.get_metadata(wid, "no-such-task")


def test_status_is_consistent_while_running(storage: str, wid: str) -> None:
    ref = workflow.run_async(sleepy.bind(1.5, "done"), workflow_id=wid)
    # run_async returns once the workflow is stored and registered: it is visible at once.
    assert workflow.get_status(wid) == workflow.RUNNING
    assert workflow.get_metadata(wid)["status"] == "RUNNING"
    assert (wid, workflow.RUNNING) in workflow.list_all(workflow.RUNNING)
    assert (wid, workflow.RUNNING) in workflow.list_all()
    assert ray.get(ref, timeout=60) == "done"
    assert workflow.get_status(wid) == workflow.SUCCESSFUL
    assert workflow.get_metadata(wid)["status"] == "SUCCESSFUL"
    assert (wid, workflow.SUCCESSFUL) in workflow.list_all("SUCCESSFUL")
    assert wid not in [w for w, _ in workflow.list_all(workflow.RUNNING)]


def test_status_known_immediately_after_run_async(storage: str, wid: str) -> None:
    """No window in which a just-started workflow is unknown (or RESUMABLE)."""
    seen = []
    refs = []
    for i in range(3):
        w = f"{wid}-{i}"
        refs.append(workflow.run_async(sleepy.bind(0.5, i), workflow_id=w))
        try:
            seen.append(workflow.get_status(w))
        except workflow.WorkflowNotFoundError as exc:
            seen.append(exc)
    assert ray.get(refs, timeout=60) == list(range(3))
    assert all(s in (workflow.RUNNING, workflow.SUCCESSFUL) for s in seen), seen


# -- outputs -----------------------------------------------------------------------------


def test_get_output_forms(storage: str, wid: str) -> None:
    dag = add.bind(100, add.options(**workflow.options(task_id="leaf")).bind(2, 3))
    assert workflow.run(dag, workflow_id=wid) == 105
    assert workflow.get_output(wid) == 105
    ref = workflow.get_output_async(wid)
    assert isinstance(ref, ray.ObjectRef)
    assert ray.get(ref, timeout=60) == 105
    assert workflow.get_output(wid, task_id="leaf") == 5
    assert workflow.get_output(wid, name="leaf") == 5
    assert ray.get(workflow.get_output_async(wid, task_id="leaf"), timeout=60) == 5


def test_get_output_waits_for_a_running_workflow(storage: str, wid: str) -> None:
    ref = workflow.run_async(sleepy.bind(0.8, "late"), workflow_id=wid)
    assert workflow.get_output(wid) == "late"
    assert ray.get(ref, timeout=60) == "late"


def test_get_output_of_unknown_task(storage: str, wid: str) -> None:
    workflow.run(add.bind(1, 2), workflow_id=wid)
    with pytest.raises(wf_exceptions.TaskNotFoundError):
        workflow.get_output(wid, task_id="no-such-task")


# -- failures ----------------------------------------------------------------------------


def test_failure_raises_execution_error_with_the_original_cause(storage: str, wid: str) -> None:
    failing = fail.options(**workflow.options(task_id="failing")).bind("boom")
    with pytest.raises(workflow.WorkflowExecutionError) as info:
        workflow.run(add.bind(1, failing), workflow_id=wid)
    assert info.value.workflow_id == wid
    assert info.value.task_id == "failing"
    cause = info.value.__cause__
    assert type(cause) is AppError
    assert str(cause) == "boom"
    assert isinstance(info.value, workflow.WorkflowError)
    assert wid in str(info.value)
    assert workflow.get_status(wid) == workflow.FAILED
    meta = workflow.get_metadata(wid)
    assert meta["status"] == "FAILED"
    assert "boom" in meta["error"]
    assert "end_time" in meta["stats"]


def test_builtin_exception_cause(storage: str, wid: str) -> None:
    @ray.remote
    def divide(a, b):
        return a / b

    with pytest.raises(workflow.WorkflowExecutionError) as info:
        workflow.run(divide.bind(1, 0), workflow_id=wid)
    assert type(info.value.__cause__) is ZeroDivisionError
    assert "division by zero" in str(info.value.__cause__)


def test_run_async_failure_is_an_execution_error(storage: str, wid: str) -> None:
    ref = workflow.run_async(fail.bind("async boom"), workflow_id=wid)
    with pytest.raises(Exception) as info:
        ray.get(ref, timeout=60)
    assert isinstance(info.value, workflow.WorkflowExecutionError)
    assert "async boom" in str(info.value)
    # Ray wraps the manager's error (RayTaskError(WorkflowExecutionError)); the task's own
    # exception stays reachable through the wrapped error.
    inner = info.value.__cause__ or getattr(info.value, "cause", None).__cause__
    assert type(inner) is AppError and str(inner) == "async boom"
    assert workflow.get_status(wid) == workflow.FAILED


def test_get_output_of_a_failed_workflow_raises(storage: str, wid: str) -> None:
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(fail.bind("x"), workflow_id=wid)
    with pytest.raises(workflow.WorkflowError):
        workflow.get_output(wid)


def _exception_classes() -> list:
    classes = [
        obj
        for name in wf_exceptions.__all__
        if isinstance(obj := getattr(wf_exceptions, name), type) and issubclass(obj, BaseException)
    ]
    assert len(classes) >= 12
    return [pytest.param(cls, id=cls.__name__) for cls in classes]


@pytest.mark.parametrize("cls", _exception_classes())
def test_every_exception_pickles_with_message_and_cause(cls: type[BaseException]) -> None:
    exc = cls("something went wrong")
    exc.__cause__ = AppError("the root cause")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert str(back) == "something went wrong"
    assert type(back.__cause__) is AppError
    assert str(back.__cause__) == "the root cause"


def test_exception_details_survive_pickling() -> None:
    exc = workflow.WorkflowNotFoundError.of("wf-1", "/some/where")
    back = pickle.loads(pickle.dumps(exc))
    assert back.workflow_id == "wf-1"
    assert str(back) == str(exc)
    err = wf_exceptions.WorkflowExecutionError.of("wf-2", "t", AppError("inner"))
    back2 = pickle.loads(pickle.dumps(err))
    assert (back2.workflow_id, back2.task_id) == ("wf-2", "t")
    assert type(back2.__cause__) is AppError and str(back2.__cause__) == "inner"


# -- resume semantics ----------------------------------------------------------------------


def test_resume_of_finished_workflow_returns_stored_output_and_runs_nothing(
    storage: str, wid: str, counter_dir: Path
) -> None:
    d = str(counter_dir)
    dag = counted.bind(d, "outer", counted.bind(d, "inner", 5))
    assert workflow.run(dag, workflow_id=wid) == 5
    assert workflow.resume(wid) == 5
    assert ray.get(workflow.resume_async(wid), timeout=60) == 5
    assert count_runs(counter_dir, "outer") == 1
    assert count_runs(counter_dir, "inner") == 1
    assert workflow.get_status(wid) == workflow.SUCCESSFUL


def test_run_with_an_existing_id_returns_the_stored_output(
    storage: str, wid: str, counter_dir: Path
) -> None:
    d = str(counter_dir)
    assert (
        workflow.run(counted.bind(d, "first", "one"), workflow_id=wid, metadata={"run": 1}) == "one"
    )
    assert (
        workflow.run(counted.bind(d, "second", "two"), workflow_id=wid, metadata={"run": 2})
        == "one"
    )
    assert (
        ray.get(workflow.run_async(counted.bind(d, "third", "three"), workflow_id=wid), timeout=60)
        == "one"
    )
    assert count_runs(counter_dir, "first") == 1
    assert count_runs(counter_dir, "second") == 0
    assert count_runs(counter_dir, "third") == 0
    assert workflow.get_output(wid) == "one"
    # The stored workflow is untouched: its metadata is the first run's.
    assert workflow.get_metadata(wid)["user_metadata"] == {"run": 1}
    assert workflow.get_status(wid) == workflow.SUCCESSFUL


def test_resume_of_unknown_workflow_raises(storage: str, wid: str) -> None:
    with pytest.raises(workflow.WorkflowError):
        workflow.resume(wid)
    with pytest.raises(workflow.WorkflowNotFoundError):
        workflow.get_status(wid)


# -- threads and context -------------------------------------------------------------------


def test_run_from_non_main_threads(storage: str, wid: str) -> None:
    results: dict[int, object] = {}

    def target(i: int) -> None:
        try:
            results[i] = workflow.run(add.bind(i, 1000), workflow_id=f"{wid}-t{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            results[i] = exc

    threads = [threading.Thread(target=target, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {0: 1000, 1: 1001, 2: 1002}
    assert all(workflow.get_status(f"{wid}-t{i}") == workflow.SUCCESSFUL for i in range(3))


def test_task_sees_its_workflow_and_task_id(storage: str, wid: str) -> None:
    assert workflow.run(
        whoami.options(**workflow.options(task_id="me")).bind(), workflow_id=wid
    ) == (wid, "me")


def test_task_default_id_in_context(storage: str, wid: str) -> None:
    got_wid, got_tid = workflow.run(whoami.bind(), workflow_id=wid)
    assert got_wid == wid
    assert got_tid == f"{whoami._function.__module__}.whoami"
    assert workflow.get_metadata(wid, got_tid)["task_id"] == got_tid


def test_context_outside_a_task_raises() -> None:
    with pytest.raises(RuntimeError):
        workflow.get_current_workflow_id()
    with pytest.raises(RuntimeError):
        workflow.get_current_task_id()


@ray.remote
def _slow_inc(x: int, runs: str) -> int:
    record_run(runs, "slow")
    time.sleep(2.0)
    return x + 1


@ray.remote
def _other(x: int, runs: str) -> int:
    record_run(runs, "other")
    return x


def test_run_or_resume_of_a_live_id_joins_it_without_running_the_new_dag(
    storage: str, wid: str, counter_dir: Path
) -> None:
    # An id that is already stored resumes that workflow; one that is running is
    # joined (Ray 2.47 raised RuntimeError; a workflow engine's caller wants the one
    # result).
    runs = str(counter_dir)
    first = workflow.run_async(_other.bind(_slow_inc.bind(1, runs), runs), workflow_id=wid)
    time.sleep(0.5)
    assert workflow.get_status(wid) == workflow.RUNNING
    again = workflow.run_async(_other.bind(_other.bind(100, runs), runs), workflow_id=wid)
    resumed = workflow.resume_async(wid)
    assert workflow.run(_other.bind(_other.bind(200, runs), runs), workflow_id=wid) == 2
    assert ray.get([first, again, resumed], timeout=60) == [2, 2, 2]
    assert [count_runs(counter_dir, n) for n in ("slow", "other")] == [1, 1]
