"""The awaitable API (``ray_workflows.aio``): every twin works and none blocks the loop."""

from __future__ import annotations

import asyncio
import inspect
import time
from pathlib import Path

import pytest
import ray
from helpers import count_runs, record_run

import ray_workflows as workflow
from ray_workflows import aio, api
from ray_workflows import exceptions as wf_exceptions
from ray_workflows._core import bridge


class AsyncAppError(Exception):
    pass


@ray.remote
def add(a: int, b: int) -> int:
    return a + b


@ray.remote
def counted(directory: str, name: str, value):
    record_run(directory, name)
    return value


@ray.remote
def sleepy(seconds: float, value):
    time.sleep(seconds)
    return value


@ray.remote
def fail(message: str) -> None:
    raise AsyncAppError(message)


class Ticker:
    """Counts 20 ms ticks on the running loop while a workflow call is awaited."""

    def __init__(self) -> None:
        self.ticks = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(0.02)
            self.ticks += 1

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


def test_every_blocking_call_has_an_awaitable_twin_with_the_same_signature() -> None:
    for name in (
        "run",
        "run_async",
        "resume",
        "resume_async",
        "get_output",
        "get_output_async",
        "get_status",
        "get_metadata",
        "list_all",
    ):
        twin = getattr(workflow.aio, name)
        assert inspect.iscoroutinefunction(twin), name
        sync_params = list(inspect.signature(getattr(api, name)).parameters.values())
        aio_params = list(inspect.signature(twin).parameters.values())
        assert [(p.name, p.kind, p.default) for p in sync_params] == [
            (p.name, p.kind, p.default) for p in aio_params
        ], name


# -- the twins ---------------------------------------------------------------------------


async def test_aio_run_returns_the_output(storage: str, wid: str) -> None:
    assert (
        await workflow.aio.run(
            add.bind(1, add.bind(2, 3)), workflow_id=wid, metadata={"via": "aio"}
        )
        == 6
    )
    status = await aio.get_status(wid)
    assert isinstance(status, workflow.WorkflowStatus)
    assert status == "SUCCESSFUL"
    assert (await aio.get_metadata(wid))["user_metadata"] == {"via": "aio"}


async def test_aio_run_async_ref_is_awaitable_and_gettable(storage: str, wid: str) -> None:
    ref = await aio.run_async(add.bind(20, 22), workflow_id=wid)
    assert isinstance(ref, ray.ObjectRef)
    assert await ref == 42
    assert ray.get(ref, timeout=60) == 42


async def test_aio_input_node(storage: str, wid: str) -> None:
    from ray.dag import InputNode

    with InputNode() as inp:
        dag = add.bind(inp[0], inp.y)
    assert await aio.run(dag, 5, y=6, workflow_id=wid) == 11


async def test_aio_resume_returns_stored_output_without_rerunning(
    storage: str, wid: str, counter_dir: Path
) -> None:
    dag = counted.bind(str(counter_dir), "aio-once", "value")
    assert await aio.run(dag, workflow_id=wid) == "value"
    assert await aio.resume(wid) == "value"
    ref = await aio.resume_async(wid)
    assert isinstance(ref, ray.ObjectRef)
    assert await ref == "value"
    assert count_runs(counter_dir, "aio-once") == 1


async def test_aio_get_output_forms(storage: str, wid: str) -> None:
    dag = add.bind(1, add.options(**workflow.options(task_id="inner")).bind(10, 20))
    assert await aio.run(dag, workflow_id=wid) == 31
    assert await aio.get_output(wid) == 31
    assert await aio.get_output(wid, task_id="inner") == 30
    ref = await aio.get_output_async(wid)
    assert isinstance(ref, ray.ObjectRef)
    assert await ref == 31
    assert await (await aio.get_output_async(wid, task_id="inner")) == 30


async def test_aio_get_status_and_metadata_of_unknown_id(storage: str, wid: str) -> None:
    with pytest.raises(workflow.WorkflowNotFoundError):
        await aio.get_status(wid)
    with pytest.raises(workflow.WorkflowNotFoundError):
        await aio.get_metadata(wid)
    with pytest.raises(workflow.WorkflowNotFoundError):
        await aio.get_output(wid)


async def test_aio_get_metadata(storage: str, wid: str) -> None:
    dag = add.options(**workflow.options(task_id="t", metadata={"m": 1})).bind(1, 2)
    await aio.run(dag, workflow_id=wid, metadata={"w": [1, 2]})
    meta = await aio.get_metadata(wid)
    assert meta["workflow_id"] == wid
    assert meta["status"] == "SUCCESSFUL" == await aio.get_status(wid)
    assert meta["user_metadata"] == {"w": [1, 2]}
    assert meta["stats"]["start_time"] <= meta["stats"]["end_time"]
    task = await aio.get_metadata(wid, "t")
    assert task["task_id"] == "t"
    assert task["user_metadata"] == {"m": 1}
    assert task["task_options"]["max_retries"] == 3


async def test_aio_list_all(storage: str, wid: str) -> None:
    await aio.run(add.bind(0, 0), workflow_id=wid)
    every = await aio.list_all()
    assert (wid, workflow.SUCCESSFUL) in every
    assert every == sorted(every)
    assert (wid, "SUCCESSFUL") in await aio.list_all("SUCCESSFUL")
    assert (wid, "SUCCESSFUL") in await aio.list_all({workflow.SUCCESSFUL, "FAILED"})
    assert wid not in [w for w, _ in await aio.list_all(workflow.FAILED)]
    with pytest.raises(ValueError):
        await aio.list_all("NOT_A_STATUS")


async def test_aio_failure_has_the_original_cause(storage: str, wid: str) -> None:
    with pytest.raises(workflow.WorkflowExecutionError) as info:
        await aio.run(fail.bind("async boom"), workflow_id=wid)
    assert type(info.value.__cause__) is AsyncAppError
    assert str(info.value.__cause__) == "async boom"
    assert await aio.get_status(wid) == workflow.FAILED
    assert "async boom" in (await aio.get_metadata(wid))["error"]


async def test_await_ref_of_a_failed_run_async(storage: str, wid: str) -> None:
    ref = await aio.run_async(fail.bind("ref boom"), workflow_id=wid)
    with pytest.raises(Exception) as info:
        await ref
    assert isinstance(info.value, workflow.WorkflowExecutionError)
    assert "ref boom" in str(info.value)


async def test_aio_run_with_existing_id_returns_stored_output(
    storage: str, wid: str, counter_dir: Path
) -> None:
    d = str(counter_dir)
    assert await aio.run(counted.bind(d, "a", 1), workflow_id=wid) == 1
    assert await aio.run(counted.bind(d, "b", 2), workflow_id=wid) == 1
    assert count_runs(counter_dir, "b") == 0


async def test_aio_concurrent_runs(storage: str, wid: str) -> None:
    results = await asyncio.gather(
        *(aio.run(add.bind(i, i), workflow_id=f"{wid}-{i}") for i in range(4))
    )
    assert results == [0, 2, 4, 6]


# -- the event loop is never blocked ---------------------------------------------------------


async def test_aio_run_does_not_block_the_event_loop(storage: str, wid: str) -> None:
    async with Ticker() as ticker:
        start = time.monotonic()
        assert await workflow.aio.run(sleepy.bind(1.5, "slept"), workflow_id=wid) == "slept"
        elapsed = time.monotonic() - start
        ticks = ticker.ticks
    assert elapsed >= 1.5
    # 1.5 s of 20 ms ticks is ~75; a blocked loop would give ~0. (Half the ideal
    # count, at least 37, leaves room for a loaded machine.)
    assert ticks >= 0.5 * elapsed / 0.02, (ticks, elapsed)


async def test_ticker_detects_a_blocked_loop(storage: str, wid: str) -> None:
    """Control for the test above: the blocking API called on the loop stops the ticks."""
    async with Ticker() as ticker:
        start = time.monotonic()
        assert workflow.run(sleepy.bind(0.6, "blocked"), workflow_id=wid) == "blocked"
        elapsed = time.monotonic() - start
        ticks = ticker.ticks
    assert elapsed >= 0.6
    assert ticks <= 2, ticks


async def test_aio_get_output_of_a_running_workflow_does_not_block(storage: str, wid: str) -> None:
    ref = await aio.run_async(sleepy.bind(1.2, "later"), workflow_id=wid)
    assert await aio.get_status(wid) == workflow.RUNNING
    async with Ticker() as ticker:
        start = time.monotonic()
        assert await aio.get_output(wid) == "later"
        elapsed = time.monotonic() - start
        ticks = ticker.ticks
    assert ticks >= max(10, int(elapsed / 0.02 * 0.5)), (ticks, elapsed)
    assert await ref == "later"


# -- the bridge ------------------------------------------------------------------------------


def test_blocking_call_on_the_bridge_loop_raises_runtime_error(storage: str, wid: str) -> None:
    workflow.run(add.bind(1, 1), workflow_id=wid)

    async def call_blocking() -> object:
        return workflow.get_status(wid)

    future = asyncio.run_coroutine_threadsafe(call_blocking(), bridge.loop())
    with pytest.raises(RuntimeError, match="aio"):
        future.result(timeout=30)
    # The bridge still serves blocking callers afterwards.
    assert workflow.get_status(wid) == workflow.SUCCESSFUL


def test_every_blocking_api_refuses_to_run_on_the_bridge_loop(storage: str, wid: str) -> None:
    calls = {
        "get_output": lambda: workflow.get_output(wid),
        "get_metadata": lambda: workflow.get_metadata(wid),
        "list_all": lambda: workflow.list_all(),
        "run": lambda: workflow.run(add.bind(1, 2), workflow_id=wid),
    }
    for name, call in calls.items():

        async def on_bridge(call=call) -> object:
            return call()

        future = asyncio.run_coroutine_threadsafe(on_bridge(), bridge.loop())
        with pytest.raises(RuntimeError):
            future.result(timeout=30)
            pytest.fail(f"{name} ran on the bridge loop")
    # Nothing ran: the refused `run` stored nothing.
    with pytest.raises(workflow.WorkflowNotFoundError):
        workflow.get_status(wid)


async def test_blocking_call_from_another_loop_still_works(storage: str, wid: str) -> None:
    """Only the bridge's own loop is refused; a user's loop may call the blocking API."""
    await aio.run(add.bind(2, 2), workflow_id=wid)
    assert workflow.get_status(wid) == workflow.SUCCESSFUL
    assert workflow.get_output(wid) == 4


async def test_bad_input_raises_before_anything_is_stored(storage: str, wid: str) -> None:
    with pytest.raises(TypeError):
        await aio.run(lambda: 1, workflow_id=wid)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await aio.run(add.bind(1, 2), workflow_id=wid, metadata={"x": object()})
    with pytest.raises(ValueError):
        await aio.get_status("bad/id")
    with pytest.raises(workflow.WorkflowNotFoundError):
        await aio.get_status(wid)
    assert issubclass(wf_exceptions.WorkflowNotFoundError, workflow.WorkflowError)
