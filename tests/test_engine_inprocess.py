"""The Engine embedded in an asyncio program (no manager actor), on ``memory://`` storage:
the engine, not the workers, writes the checkpoints of a per-process storage."""

from __future__ import annotations

import asyncio
import uuid

import ray

from ray_workflows.engine import Engine
from ray_workflows.plan import compile_dag
from ray_workflows.plugins import open_storage
from ray_workflows.status import WorkflowStatus
from ray_workflows.store import PackWriter


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



async def test_packs_gather_records_and_drain_makes_them_durable() -> None:
    storage = open_storage(f"memory://{uuid.uuid4().hex}")
    store = Engine(storage).store
    flushed: list[str] = []
    packs = PackWriter(store, "w", flushed.extend, lambda tid, exc: None)
    # Records that come within the gathering window share one write...
    for i in range(300):
        packs.add(f"t{i}", f"t{i}", b"record %d" % i)
    await asyncio.sleep(PackWriter.WINDOW * 3)
    assert len(await storage.list("workflows/w/tasks/")) == 1 and len(flushed) == 300
    # ...records spread over ten windows take about ten, not one each...
    for i in range(300, 400):
        packs.add(f"t{i}", f"t{i}", b"record %d" % i)
        await asyncio.sleep(PackWriter.WINDOW / 10)
    # ...and draining writes what is still gathering at once.
    packs.add("last", "last", b"the end")
    await asyncio.wait_for(packs.drain(), PackWriter.WINDOW / 2)
    keys = await storage.list("workflows/w/tasks/")
    assert 2 <= len(keys) <= 16, keys
    assert len(flushed) == 401 and not packs.pending
