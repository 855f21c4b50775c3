"""The runner's rules hold whatever the placement: each semantic test runs once per
placement (alone, fused, batched, submitted ahead, in place as a hosted runner does),
on a real engine and real Ray, and fails if that placement was not exercised.

Events never take a placement (they are coroutines in the runner), and a killed
worker in place is the hosting Ray task's death: tests/test_host.py kills one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import ray
from helpers import count_runs, record_run

import ray_workflows as workflow
from ray_workflows._core import batching
from ray_workflows._core.compiler import compile_dag
from ray_workflows._core.engine import Engine
from ray_workflows._core.status import WorkflowStatus
from ray_workflows.exceptions import WorkflowCancellationError, WorkflowExecutionError
from ray_workflows.storage import open_storage

PLACEMENTS = ["alone", "fused", "batched", "ahead", "in place"]


@ray.remote
def source(runs: str) -> int:
    record_run(runs, "source")
    return 1


@ray.remote
def flaky(x: int, runs: str, fails: int, error: str = "ValueError") -> int:
    """Raises ``error`` the first ``fails`` times it runs for ``runs``."""
    record_run(runs, "flaky")
    if count_runs(runs, "flaky") <= fails:
        raise {"ValueError": ValueError, "KeyError": KeyError}[error]("planned")
    return x + 1


@ray.remote
def describe(result: Any) -> str:
    value, error = result
    return f"{value}:{type(error).__name__}"


@ray.remote
def unsaved(x: int) -> int:
    return x * 10


@ray.remote
def continues(x: int, runs: str) -> Any:
    record_run(runs, "continues")
    return workflow.continuation(unsaved.bind(source.bind(runs)))


@ray.remote
def gate(x: int, path: str) -> int:
    Path(path, "started").touch()
    while not Path(path, "open").exists():
        time.sleep(0.02)
    return x


@ray.remote
def dies_once(x: int, runs: str) -> int:
    record_run(runs, "dies")
    if count_runs(runs, "dies") == 1:
        os._exit(1)
    return x + 2


@pytest.fixture(params=PLACEMENTS)
async def engine(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Engine]:
    placement: str = request.param
    engine = Engine(open_storage(str(tmp_path / "storage")), here=placement == "in place")
    engine.executor.use(
        dataclasses.replace(
            engine.executor.settings,
            submit_ahead=placement in ("fused", "ahead"),
            fuse=placement == "fused",
            batch=placement == "batched",
        )
    )
    if placement == "batched":
        engine.executor.batcher.cpus = 0  # always busy: quick ready tasks wait and go in batches
        monkeypatch.setattr(batching, "HOLD_SECONDS", 0.2)  # time to gather
    # Every function once, so that it counts as quick (only quick ones fuse or batch).
    warm = str(tmp_path / "warm")
    os.mkdir(warm)
    Path(warm, "open").touch()
    record_run(warm, "dies")  # dies_once dies on its first run only
    for i, dag in enumerate(
        [
            flaky.bind(source.bind(warm), warm, 0),
            describe.bind(
                flaky.options(**workflow.options(catch_exceptions=True)).bind(1, warm, 0)
            ),
            unsaved.bind(unsaved.bind(1)),
            gate.bind(dies_once.bind(1, warm), warm),
            continues.bind(1, warm),
        ]
    ):
        assert await (await (await engine.start(f"warm{i}", compile_dag(dag)))) is not None
    engine.executor.placed.clear()
    engine.placement_name = placement  # type: ignore[attr-defined]
    yield engine
    await engine.close()


def _exercised(engine: Engine) -> None:
    name: str = engine.placement_name  # type: ignore[attr-defined]
    assert engine.executor.placed[name] > 0, (name, dict(engine.executor.placed))


async def _run_all(engine: Engine, dags: dict[str, Any]) -> dict[str, Any]:
    """Run ``dags`` at once (several at once form batches); each id -> its output or
    the error it raised."""
    starts = [engine.start(wid, compile_dag(dag)) for wid, dag in dags.items()]
    started = dict(zip(dags, await asyncio.gather(*starts), strict=True))
    outcome: dict[str, Any] = {}
    for wid, finished in started.items():
        try:
            outcome[wid] = await (await finished)
        except Exception as exc:
            outcome[wid] = exc
    return outcome


def _runs(tmp_path: Path, n: int) -> list[str]:
    dirs = [tmp_path / f"runs{i}" for i in range(n)]
    for d in dirs:
        d.mkdir()
    return [str(d) for d in dirs]


async def test_retries_until_success(engine: Engine, tmp_path: Path) -> None:
    retry = workflow.options(retry_exceptions=True, max_retries=3)
    runs = _runs(tmp_path, 3)
    dags = {f"r{i}": flaky.options(**retry).bind(source.bind(r), r, 2) for i, r in enumerate(runs)}
    assert await _run_all(engine, dags) == {f"r{i}": 2 for i in range(3)}
    for r in runs:
        assert (count_runs(r, "source"), count_runs(r, "flaky")) == (1, 3)
    _exercised(engine)


async def test_only_the_listed_exceptions_are_retried(engine: Engine, tmp_path: Path) -> None:
    retry = workflow.options(retry_exceptions=[ValueError], max_retries=3)
    runs = _runs(tmp_path, 3)
    dags = {
        f"k{i}": flaky.options(**retry).bind(source.bind(r), r, 5, "KeyError")
        for i, r in enumerate(runs)
    }
    outcome = await _run_all(engine, dags)
    for i, r in enumerate(runs):
        assert isinstance(outcome[f"k{i}"], WorkflowExecutionError)
        assert "KeyError" in str(outcome[f"k{i}"])
        assert count_runs(r, "flaky") == 1  # KeyError is not listed: no retry
    _exercised(engine)


async def test_caught_exceptions_are_results(engine: Engine, tmp_path: Path) -> None:
    catch = workflow.options(catch_exceptions=True, max_retries=0)
    runs = _runs(tmp_path, 3)
    dags = {
        f"c{i}": describe.bind(flaky.options(**catch).bind(source.bind(r), r, 5))
        for i, r in enumerate(runs)
    }
    assert await _run_all(engine, dags) == {f"c{i}": "None:ValueError" for i in range(3)}
    _exercised(engine)


async def test_unsaved_tasks_give_their_value_and_store_nothing(
    engine: Engine, tmp_path: Path
) -> None:
    off = workflow.options(checkpoint=False, task_id="unsaved")
    dags = {f"u{i}": unsaved.bind(unsaved.options(**off).bind(i)) for i in range(3)}
    assert await _run_all(engine, dags) == {f"u{i}": i * 100 for i in range(3)}
    for i in range(3):
        records = await engine.store.task_records(f"u{i}")
        assert "unsaved" not in records and len(records) == 1
    _exercised(engine)


async def test_continuations_run_their_dag(engine: Engine, tmp_path: Path) -> None:
    runs = _runs(tmp_path, 3)
    dags = {f"n{i}": continues.bind(source.bind(r), r) for i, r in enumerate(runs)}
    assert await _run_all(engine, dags) == {f"n{i}": 10 for i in range(3)}
    for r in runs:
        assert (count_runs(r, "continues"), count_runs(r, "source")) == (1, 2)
    _exercised(engine)


async def test_cancel_stops_a_running_workflow(engine: Engine, tmp_path: Path) -> None:
    gates = _runs(tmp_path, 3)
    started = {
        f"x{i}": await engine.start(f"x{i}", compile_dag(gate.bind(unsaved.bind(i), g)))
        for i, g in enumerate(gates)
    }
    deadline = time.monotonic() + 60
    while not any(Path(g, "started").exists() for g in gates):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    for wid, finished in started.items():
        await engine.cancel(wid)
        with pytest.raises(WorkflowCancellationError):
            await finished
        assert await engine.status(wid) == WorkflowStatus.CANCELED
    for g in gates:  # an attempt under way in place (or in a batch) ends in the background
        Path(g, "open").touch()
    _exercised(engine)


async def test_a_killed_worker_is_retried_and_done_tasks_do_not_rerun(
    engine: Engine, tmp_path: Path
) -> None:
    if engine.placement_name == "in place":  # type: ignore[attr-defined]
        pytest.skip("in place, the worker is the host: tests/test_host.py kills one")
    runs = _runs(tmp_path, 3)
    dags = {f"d{i}": dies_once.bind(source.bind(r), r) for i, r in enumerate(runs)}
    assert await _run_all(engine, dags) == {f"d{i}": 3 for i in range(3)}
    for r in runs:
        assert count_runs(r, "dies") == 2
        assert count_runs(r, "source") in (1, 2)  # a fused or batched source shared its fate
    _exercised(engine)
