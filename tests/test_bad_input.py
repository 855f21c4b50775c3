"""Bad input fails early and clearly: nothing is stored for a rejected workflow."""

from __future__ import annotations

import os
import threading
import unicodedata
from pathlib import Path

import pytest
import ray
from helpers import count_runs, record_run
from ray.dag import InputNode

import ray_workflows as workflow
from ray_workflows import plugins
from ray_workflows._core import config
from ray_workflows._core.ids import MAX_ID_LENGTH, default_task_name
from ray_workflows.exceptions import UnknownStorageError


@ray.remote
def add(a: int, b: int) -> int:
    return a + b


@ray.remote
def takes(x):
    return "took"


@ray.remote
def returns_unpicklable(directory: str):
    record_run(directory, "unpicklable-return")
    return threading.Lock()


_LOCK = threading.Lock()


@ray.remote
def closes_over_a_lock():
    with _LOCK:
        return 1


def assert_not_stored(wf_id: str) -> None:
    with pytest.raises(workflow.WorkflowNotFoundError):
        workflow.get_status(wf_id)


def stored_ids() -> set[str]:
    return {w for w, _ in workflow.list_all()}


@pytest.fixture
def restore_storage(session_storage: str):
    """Re-select the session storage after a test that calls ``workflow.init`` itself."""
    yield
    workflow.init(session_storage)
    assert config.current().storage == config.normalise_storage(session_storage)


# -- not a DAG -------------------------------------------------------------------------


def _plain_function():
    return 1


@pytest.mark.parametrize(
    "not_a_dag",
    [
        pytest.param(lambda: _plain_function, id="plain-function"),
        pytest.param(lambda: add, id="unbound-remote-function"),
        pytest.param(lambda: add.remote(1, 2), id="object-ref"),
        pytest.param(lambda: 3, id="int"),
        pytest.param(lambda: [add.bind(1, 2)], id="list-of-dags"),
    ],
)
def test_run_rejects_a_non_dag(storage: str, wid: str, not_a_dag) -> None:
    with pytest.raises(TypeError, match="bind"):
        workflow.run(not_a_dag(), workflow_id=wid)
    with pytest.raises(TypeError):
        workflow.run_async(not_a_dag(), workflow_id=wid)
    assert_not_stored(wid)


def test_actor_nodes_are_rejected(storage: str, wid: str) -> None:
    @ray.remote
    class Counter:
        def get(self):
            return 1

    with pytest.raises(TypeError):
        workflow.run(Counter.bind().get.bind(), workflow_id=wid)
    assert_not_stored(wid)


def test_num_returns_above_one_is_rejected(storage: str, wid: str) -> None:
    with pytest.raises(ValueError, match="num_returns"):
        workflow.run(add.options(num_returns=2).bind(1, 2), workflow_id=wid)
    assert_not_stored(wid)


# -- workflow ids -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_id", "problem"),
    [
        ("", "empty"),
        ("a/b", "separator"),
        ("a\\b", "separator"),
        ("a..b", ".."),
        ("..", ".."),
        ("a\nb", "control character"),
        ("a\x00b", "control character"),
        ("x" * (MAX_ID_LENGTH + 1), f"{MAX_ID_LENGTH + 1} bytes"),
        # 150 characters, 300 bytes: the limits of file names and S3 keys are in bytes.
        ("é" * 150, "300 bytes"),
        ("pay\u200bment", "U+200B"),  # zero-width space
        ("abc\u202edcba", "U+202E"),  # right-to-left override
        ("a\u2028b", "U+2028"),  # line separator
    ],
    ids=[
        "empty",
        "slash",
        "backslash",
        "dotdot",
        "only-dotdot",
        "newline",
        "nul",
        "too-long",
        "too-many-bytes",
        "zero-width",
        "bidi",
        "line-separator",
    ],
)
def test_invalid_workflow_ids(storage: str, bad_id: str, problem: str) -> None:
    before = stored_ids()
    with pytest.raises(ValueError) as info:
        workflow.run(add.bind(1, 2), workflow_id=bad_id)
    assert problem in str(info.value)
    with pytest.raises(ValueError):
        workflow.run_async(add.bind(1, 2), workflow_id=bad_id)
    # The read-side calls validate ids the same way.
    for call in (workflow.get_status, workflow.get_output, workflow.get_metadata, workflow.resume):
        with pytest.raises(ValueError):
            call(bad_id)
    assert stored_ids() == before


def test_longest_allowed_id_works(storage: str) -> None:
    long_id = "L" * (MAX_ID_LENGTH - 9) + "-" + os.urandom(4).hex()
    assert len(long_id) == MAX_ID_LENGTH
    assert workflow.run(add.bind(1, 2), workflow_id=long_id) == 3
    assert workflow.get_status(long_id) == workflow.SUCCESSFUL
    assert workflow.get_output(long_id) == 3
    assert (long_id, workflow.SUCCESSFUL) in workflow.list_all()


def test_ids_are_one_whatever_unicode_form_they_were_typed_in(storage: str) -> None:
    # "é" typed as one code point or as "e" + a combining accent is the same id.
    composed = "caf\u00e9-" + os.urandom(4).hex()
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    assert workflow.run(add.bind(1, 2), workflow_id=decomposed) == 3
    assert workflow.get_status(composed) == workflow.SUCCESSFUL
    assert workflow.get_output(decomposed) == 3
    assert (composed, workflow.SUCCESSFUL) in workflow.list_all()


def test_a_function_with_a_very_long_name_runs(storage: str, wid: str) -> None:
    # Its default task id is shortened (its end and a hash of the whole) to fit a file
    # name; it used to fail the storage write.
    def long_add(a: int, b: int) -> int:
        return a + b

    long_add.__qualname__ = "Q" * 300
    task = ray.remote(long_add)
    assert workflow.run(task.bind(1, 2), workflow_id=wid) == 3
    tid = default_task_name(long_add)
    assert len(tid.encode()) <= MAX_ID_LENGTH and tid.endswith("Q" * 100)
    assert workflow.get_metadata(wid, task_id=tid)["task_id"] == tid


@pytest.mark.parametrize("bad_id", [123, b"bytes-id", ["a"]], ids=["int", "bytes", "list"])
def test_non_str_workflow_id(storage: str, bad_id) -> None:
    with pytest.raises(TypeError, match="str"):
        workflow.run(add.bind(1, 2), workflow_id=bad_id)
    with pytest.raises(TypeError):
        workflow.get_status(bad_id)


def test_invalid_task_id_option() -> None:
    with pytest.raises(ValueError, match="task_id"):
        workflow.options(task_id="a/b")
    with pytest.raises(TypeError):
        workflow.options(task_id=5)


# -- metadata ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        [("k", "v")],
        "k=v",
        3,
        {"obj": object()},
        {"set": {1, 2}},
        {"nested": {"fn": len}},
    ],
    ids=["list", "str", "int", "object", "set", "nested-function"],
)
def test_bad_workflow_metadata(storage: str, wid: str, metadata) -> None:
    with pytest.raises(ValueError, match="metadata"):
        workflow.run(add.bind(1, 2), workflow_id=wid, metadata=metadata)
    assert_not_stored(wid)


@pytest.mark.parametrize("metadata", [[1], "x", {"obj": object()}], ids=["list", "str", "obj"])
def test_bad_task_metadata(metadata) -> None:
    with pytest.raises(ValueError, match="metadata"):
        workflow.options(metadata=metadata)


def test_unknown_option_names(storage: str, wid: str) -> None:
    with pytest.raises(ValueError) as info:
        add.options(**workflow.options(task_id="t", retries=3)).bind(1, 2)
    message = str(info.value)
    assert "retries" in message
    for valid in (
        "task_id",
        "metadata",
        "catch_exceptions",
        "checkpoint",
        "max_retries",
        "retry_exceptions",
    ):
        assert valid in message
    assert_not_stored(wid)


# -- storage ----------------------------------------------------------------------------------


def test_unknown_storage_scheme(storage: str, wid: str, restore_storage: None) -> None:
    workflow.run(add.bind(1, 1), workflow_id=wid)
    with pytest.raises(UnknownStorageError) as info:
        workflow.init("nosuch://x")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "nosuch" in message
    assert "file" in message and "memory" in message
    # Raised before anything changed: the session storage is still selected.
    assert config.current().storage == config.normalise_storage(storage)
    assert workflow.get_status(wid) == workflow.SUCCESSFUL


def test_s3_without_the_plugin_names_the_extra(storage: str, restore_storage: None) -> None:
    if "s3" in plugins.available(plugins.STORAGE_GROUP):
        pytest.skip("an s3 storage plugin is installed")
    with pytest.raises(UnknownStorageError) as info:
        workflow.init("s3://bucket/x")
    assert "ray-workflows[s3]" in str(info.value)
    assert config.current().storage == config.normalise_storage(storage)


def test_non_str_storage(storage: str, restore_storage: None) -> None:
    with pytest.raises((TypeError, ValueError), match="storage"):
        workflow.init(123)  # type: ignore[arg-type]


def test_empty_storage_string(
    storage: str, restore_storage: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(ValueError, match="storage"):
            workflow.init("")
    finally:
        if config.current().storage == str(tmp_path):
            from conftest import kill_manager

            kill_manager(str(tmp_path))


# -- init limits ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_running_workflows": 0}, ValueError),
        ({"max_running_workflows": -2}, ValueError),
        ({"max_running_workflows": 1.5}, TypeError),
        ({"max_running_workflows": True}, TypeError),
        ({"max_running_workflows": "3"}, TypeError),
        ({"max_pending_workflows": -2}, ValueError),
        ({"max_pending_workflows": 0.5}, TypeError),
    ],
)
def test_init_limits_are_validated(storage: str, kwargs: dict, error: type) -> None:
    before = config.current()
    with pytest.raises(error, match=next(iter(kwargs))):
        workflow.init(storage, **kwargs)
    assert config.current() == before


def test_init_arguments_after_storage_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        workflow.init(None, 1)  # type: ignore[misc]


# -- task arguments ---------------------------------------------------------------------------


def test_unpicklable_input_value_names_the_task(storage: str, wid: str) -> None:
    # (Ray's own .bind() already refuses an unpicklable literal argument; a value fed
    # through the InputNode reaches only the workflow's own checkpointing.)
    with InputNode() as inp:
        dag = takes.bind(inp)
    with pytest.raises(TypeError) as info:
        workflow.run(dag, threading.Lock(), workflow_id=wid)
    assert "takes" in str(info.value)
    assert "pickle" in str(info.value)
    assert_not_stored(wid)


def test_unpicklable_input_nested_in_a_container(storage: str, wid: str) -> None:
    with InputNode() as inp:
        dag = takes.bind({"locks": [inp.lock]})
    with pytest.raises(TypeError, match="takes"):
        workflow.run(dag, lock=threading.Lock(), workflow_id=wid)
    assert_not_stored(wid)


def test_argument_made_unpicklable_after_bind(storage: str, wid: str) -> None:
    arg: dict = {}
    dag = takes.bind(arg)
    arg["lock"] = threading.Lock()
    with pytest.raises(TypeError, match="takes"):
        workflow.run(dag, workflow_id=wid)
    assert_not_stored(wid)


def test_unpicklable_function_names_the_task(storage: str, wid: str) -> None:
    with pytest.raises(TypeError, match="closes_over_a_lock"):
        workflow.run(closes_over_a_lock.bind(), workflow_id=wid)
    assert_not_stored(wid)


@pytest.mark.parametrize(
    "make_dag",
    [
        pytest.param(lambda: add.bind(1), id="missing"),
        pytest.param(lambda: add.bind(1, 2, 3), id="too-many"),
        pytest.param(lambda: add.bind(1, c=2), id="unknown-keyword"),
        pytest.param(lambda: add.bind(1, add.bind(2)), id="nested-task"),
    ],
)
def test_arguments_not_matching_the_signature(storage: str, wid: str, make_dag) -> None:
    with pytest.raises(TypeError) as info:
        workflow.run(make_dag(), workflow_id=wid)
    assert "add" in str(info.value)
    assert_not_stored(wid)


def test_missing_input_node_values(storage: str, wid: str) -> None:
    with InputNode() as inp:
        by_index = add.bind(inp[0], inp[1])
    with pytest.raises(TypeError):
        workflow.run(by_index, 1, workflow_id=wid)
    with InputNode() as inp:
        by_name = add.bind(inp[0], inp.b)
    with pytest.raises(TypeError, match="'b'"):
        workflow.run(by_name, 1, c=2, workflow_id=wid)
    with InputNode() as inp:
        whole = takes.bind(inp)
    with pytest.raises(TypeError):
        workflow.run(whole, 1, 2, workflow_id=wid)
    with pytest.raises(TypeError):
        workflow.run(whole, workflow_id=wid)
    assert_not_stored(wid)


def test_unpicklable_return_value_fails_once_with_its_cause(
    storage: str, wid: str, counter_dir: Path
) -> None:
    with pytest.raises(workflow.WorkflowExecutionError) as info:
        workflow.run(returns_unpicklable.bind(str(counter_dir)), workflow_id=wid)
    assert "returns_unpicklable" in str(info.value)
    assert count_runs(counter_dir, "unpicklable-return") == 1
    assert isinstance(info.value.__cause__, TypeError)
