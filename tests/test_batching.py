"""Batching: while the CPUs are busy, quick tasks whose inputs exist wait a moment
and then share one Ray task; a batch that dies is not charged to its tasks."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import ray

import ray_workflows as workflow
from ray_workflows._core.compiler import compile_dag
from ray_workflows._core.engine import Engine
from ray_workflows.exceptions import WorkflowCancellationError
from ray_workflows.storage import open_storage

# The manager's scheduler is what these tests test: not a hosted runner.
pytestmark = pytest.mark.usefixtures("manager_runs")


@ray.remote
def where(i: int) -> tuple[int, str]:
    """``i``, and the Ray task it ran in."""
    return i, ray.get_runtime_context().get_task_id()


@ray.remote
def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@ray.remote
def die_once(marker: str, runs: str) -> str:
    with open(runs, "a") as f:
        f.write("run\n")
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)  # the whole batch's worker dies
    return "survived"


async def _engine(cpus: int = 1) -> Engine:
    engine = Engine(open_storage(f"memory://{uuid.uuid4().hex}"))
    engine.executor.batcher.cpus = cpus
    # Seen once, so quick from now on: only quick functions are batched.
    for name, dag in [("warm-nap", nap.bind(0)), ("warm-where", where.bind(0))]:
        assert await (await (await engine.start(name, compile_dag(dag)))) is not None
    return engine


async def _start(engine: Engine, wid: str, dag: Any) -> Any:
    return await engine.start(wid, compile_dag(dag))


async def test_quick_tasks_share_a_ray_task_while_the_cpus_are_busy() -> None:
    engine = await _engine()
    assert engine.executor.settings.batch
    busy = await _start(engine, "busy", nap.bind(0.3))  # quick last time: sent, holds the CPU
    finished = await asyncio.gather(*(_start(engine, f"w{i}", where.bind(i)) for i in range(12)))
    outputs = [await (await f) for f in finished]
    assert [i for i, _ in outputs] == list(range(12))
    ray_tasks = {task for _, task in outputs}
    assert len(ray_tasks) <= 6, ray_tasks  # twelve tasks, a few Ray tasks
    assert await (await busy) == 0.3
    await engine.close()


async def test_held_tasks_go_after_a_moment_even_if_no_cpu_frees() -> None:
    engine = await _engine()
    slow = await _start(engine, "slow", nap.bind(3.0))  # ran quickly last time
    t0 = time.monotonic()
    finished = await asyncio.gather(*(_start(engine, f"q{i}", where.bind(i)) for i in range(5)))
    outputs = await asyncio.wait_for(asyncio.gather(*(await asyncio.gather(*finished))), 2.5)
    assert [i for i, _ in outputs] == list(range(5))
    assert not slow.done() and time.monotonic() - t0 < 2.5
    assert await (await slow) == 3.0
    await engine.close()


async def test_a_batch_that_dies_is_not_charged_to_its_tasks(tmp_path: Path) -> None:
    marker, runs = str(tmp_path / "died"), str(tmp_path / "runs")
    engine = await _engine()
    open(marker, "w").close()
    assert await (await (await _start(engine, "warm", die_once.bind(marker, runs)))) == "survived"
    os.unlink(marker)

    # Long enough that the CPU is still busy when the others come, however slowly a
    # loaded machine starts them: then they are held and go as one batch.
    busy = await _start(engine, "busy", nap.bind(3.0))
    # Innocent tasks with no retries at all: a charged batch death would fail them.
    innocent = where.options(**workflow.options(max_retries=0))
    dying = die_once.options(**workflow.options(max_retries=0))
    finished = await asyncio.gather(
        _start(engine, "dies", dying.bind(marker, runs)),
        *(_start(engine, f"i{i}", innocent.bind(i)) for i in range(5)),
    )
    outputs = [await (await f) for f in finished]
    assert outputs[0] == "survived"
    assert [i for i, _ in outputs[1:]] == list(range(5))
    # It ran in the batch (and killed it), then once more alone.
    assert open(runs).read().count("run") == 1 + 2
    assert await (await busy) == 3.0
    await engine.close()


@ray.remote
def sleeper(path: str, seconds: float) -> str:
    time.sleep(seconds)
    Path(path).write_text("done")
    return path


async def test_a_shared_batch_is_cancelled_only_once_no_workflow_wants_it(tmp_path: Path) -> None:
    engine = await _engine()
    warm = str(tmp_path / "warm")
    assert await (await (await _start(engine, "warm", sleeper.bind(warm, 0)))) == warm

    def started(name: str, seconds: float) -> Any:
        return _start(engine, name, sleeper.bind(str(tmp_path / name), seconds))

    first = await started("first", 1.0)  # sent alone: it holds the one CPU
    c1, c2 = await asyncio.gather(started("c1", 1.0), started("c2", 1.0))  # one batch
    await asyncio.sleep(0.2)
    await engine.cancel("c1")
    assert await (await c2) == str(tmp_path / "c2")  # its batch went on without c1
    with pytest.raises(WorkflowCancellationError):
        await c1
    await (await first)

    blocker = await started("blocker", 2.0)
    d1, d2 = await asyncio.gather(started("d1", 1.5), started("d2", 1.5))
    await asyncio.sleep(0.2)
    await engine.cancel("d1")
    await engine.cancel("d2")  # nobody wants the batch now: it is cancelled
    for cancelled in (d1, d2):
        with pytest.raises(WorkflowCancellationError):
            await cancelled
    await asyncio.sleep(1.8)
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()
    assert not engine.executor.batcher._batches
    await (await blocker)
    await engine.close()
