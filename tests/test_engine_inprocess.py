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


@ray.remote
def countdown(n: int) -> int:
    if n == 0:
        return 0
    return countdown.bind(n - 1)  # a tail continuation


async def test_a_long_tail_chain_keeps_the_live_state_of_one_level() -> None:
    # "Without per-level state piling up in the manager": the run's tables are sampled
    # while 1,000 levels continue one after another; none may grow with the level.
    storage = open_storage(f"memory://{uuid.uuid4().hex}")
    engine = Engine(storage)
    finished = await engine.start("chain", compile_dag(countdown.bind(1000)))
    run = engine.runs["chain"]
    tables = ("specs", "values", "stored", "done", "waiting", "consumers", "needed",
              "root_of", "roots", "running", "started", "attempts", "inflight", "ahead",
              "_headers", "_indirect", "_waiters")
    peak = dict.fromkeys(tables, 0)
    samples = 0
    while not finished.done():
        for name in tables:
            peak[name] = max(peak[name], len(getattr(run, name)))
        samples += 1
        await asyncio.sleep(0.005)
    assert await (await finished) == 0
    assert samples > 50  # sampled throughout the chain, not once
    assert peak["specs"] == 1 and peak["running"] == 1, peak  # the one live level
    assert max(peak.values()) <= 3, peak
    await engine.close()


async def test_a_small_output_is_kept_as_its_record_until_the_id_changes_hands() -> None:
    """The manager answers a caller with the output record itself when the output was
    small and held no ObjectRefs (see ``Engine.inline_output``): never with the record
    of an earlier run of the same id."""
    from ray_workflows.manager import InlineOutput

    engine = Engine(open_storage(f"memory://{uuid.uuid4().hex}"))
    assert await (await (await engine.start("small", compile_dag(add.bind(2, 3))))) == 5
    record = engine.inline_output("small")
    assert record is not None
    # What a caller unpickles is the checkpointed value.
    assert ray.get(ray.put(InlineOutput(record))) == 5

    # An output holding an ObjectRef is not inlined (the caller resolves it).
    assert await (await (await engine.start("boxed", compile_dag(boxed.bind(4))))) != []
    assert engine.inline_output("boxed") is None

    # Deleting forgets it; the id's next run answers with its own output.
    await engine.delete("small")
    assert engine.inline_output("small") is None
    assert await (await (await engine.start("small", compile_dag(add.bind(10, 20))))) == 30
    again = engine.inline_output("small")
    assert again is not None and ray.get(ray.put(InlineOutput(again))) == 30
    await engine.close()
