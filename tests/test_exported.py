"""The public surface: ``ray_workflows.__all__`` is pinned, and every call the
blocking API offers has an awaitable twin in ``ray_workflows.aio``."""

from __future__ import annotations

import inspect

import pytest

import ray_workflows
from ray_workflows import aio

EXPORTED = [
    "CANCELED",
    "EventListener",
    "FAILED",
    "NONE",
    "PENDING",
    "RESUMABLE",
    "RUNNING",
    "SUCCESSFUL",
    "Storage",
    "WorkflowCancellationError",
    "WorkflowError",
    "WorkflowExecutionError",
    "WorkflowNotFoundError",
    "WorkflowNotResumableError",
    "WorkflowQueueFullError",
    "WorkflowRunningElsewhereError",
    "WorkflowStatus",
    "WorkflowStillActiveError",
    "aio",
    "cancel",
    "continuation",
    "create",
    "delete",
    "delete_finished",
    "event_listener",
    "exceptions",
    "get_actor",
    "get_current_task_id",
    "get_current_workflow_id",
    "get_metadata",
    "get_output",
    "get_output_async",
    "get_status",
    "init",
    "list_all",
    "options",
    "resume",
    "resume_all",
    "resume_async",
    "run",
    "run_async",
    "send_event",
    "sleep",
    "step",
    "virtual_actor",
    "wait",
    "wait_for_event",
]

ASYNC_TWINS = [
    "send_event",
    "run",
    "run_async",
    "resume",
    "resume_async",
    "get_output",
    "get_output_async",
    "get_status",
    "get_metadata",
    "list_all",
]


def test_all_is_pinned_and_sorted() -> None:
    assert EXPORTED == sorted(EXPORTED)
    assert list(ray_workflows.__all__) == EXPORTED
    assert len(set(ray_workflows.__all__)) == len(ray_workflows.__all__)


@pytest.mark.parametrize("name", EXPORTED)
def test_every_exported_name_exists(name: str) -> None:
    assert getattr(ray_workflows, name, None) is not None


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from ray_workflows import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == EXPORTED


def test_status_constants_are_the_enum_members() -> None:
    status = ray_workflows.WorkflowStatus
    for name in ("CANCELED", "FAILED", "NONE", "PENDING", "RESUMABLE", "RUNNING", "SUCCESSFUL"):
        assert getattr(ray_workflows, name) is status[name]


def test_exported_errors_share_one_base() -> None:
    for name in EXPORTED:
        if name.endswith("Error"):
            assert issubclass(getattr(ray_workflows, name), ray_workflows.WorkflowError)
    assert issubclass(ray_workflows.exceptions.TaskIdCollisionError, ValueError)


@pytest.mark.parametrize("name", ASYNC_TWINS)
def test_aio_has_a_coroutine_twin(name: str) -> None:
    twin = getattr(aio, name, None)
    assert twin is not None, f"ray_workflows.aio.{name} is missing"
    assert inspect.iscoroutinefunction(twin), f"ray_workflows.aio.{name} is not async"
    assert name in aio.__all__


@pytest.mark.parametrize("name", ASYNC_TWINS)
def test_aio_twin_takes_the_same_arguments(name: str) -> None:
    def shape(fn: object) -> list[tuple[str, object, object]]:
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]  # type: ignore[arg-type]

    assert shape(getattr(aio, name)) == shape(getattr(ray_workflows, name))
