"""The Engine embedded in an asyncio program (no manager actor), on ``memory://`` storage:
the engine, not the workers, writes the checkpoints of a per-process storage."""

from __future__ import annotations

import uuid

import ray

from ray_workflows.engine import Engine
from ray_workflows.plan import compile_dag
from ray_workflows.plugins import open_storage
from ray_workflows.status import WorkflowStatus


@ray.remote
def add(a: int, b: int) -> int:
    return a + b


@ray.remote
def fib(n: int) -> int:
    if n <= 1:
        return n
    return add.bind(fib.bind(n - 1), fib.bind(n - 2))  # a bare DAG is a continuation


@ray.remote
def boxed(x: int) -> list[ray.ObjectRef]:
    return [ray.put(x * 2)]


@ray.remote
def unbox(refs: list[ray.ObjectRef]) -> int:
    return int(ray.get(refs[0]))


async def test_engine_runs_workflows_in_process_on_memory_storage() -> None:
    storage = open_storage(f"memory://{uuid.uuid4().hex}")
    assert storage.shared is False
    engine = Engine(storage)

    finished = await engine.start("fib", compile_dag(fib.bind(8)))
    assert await (await finished) == 21
    assert await engine.status("fib") == WorkflowStatus.SUCCESSFUL
    # Outputs, continuations and objects all went into the engine's own memory store.
    keys = await storage.list("workflows/fib/tasks/")
    assert any(k.endswith(".pack") for k in keys) and any(k.endswith(".cont") for k in keys)

    finished = await engine.start("objects", compile_dag(unbox.bind(boxed.bind(21))))
    assert await (await finished) == 42
    assert len(await storage.list("workflows/objects/objects/")) == 1

    # A finished workflow's output comes back from the memory checkpoint.
    assert await (await engine.output("fib")) == 21
    [ref] = await (await engine.output("objects", "test_engine_inprocess.boxed"))
    assert await ref == 42  # the nested ObjectRef was checkpointed and comes back as one
    await engine.close()
