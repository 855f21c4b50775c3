"""The Engine embedded in an asyncio program (no manager actor), on ``memory://`` storage:
the engine, not the workers, writes the checkpoints of a per-process storage."""

from __future__ import annotations

import asyncio
import json
import operator
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import ray
from helpers import count_runs, record_run

from ray_workflows._core import keys
from ray_workflows._core.admission import EXEMPT
from ray_workflows._core.compiler import compile_dag
from ray_workflows._core.engine import Engine
from ray_workflows._core.status import WorkflowStatus
from ray_workflows._core.store import PackWriter
from ray_workflows.exceptions import (
    TaskNotFoundError,
    WorkflowExecutionError,
    WorkflowNotResumableError,
    WorkflowQueueFullError,
)
from ray_workflows.storage import open_storage


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
    packs = PackWriter(store, "w", flushed.extend, lambda tid, exc: None, lambda: 1)
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
    tables = (
        "graph.specs",
        "graph.values",
        "graph.stored",
        "graph.done",
        "graph.waiting",
        "graph.consumers",
        "graph.needed",
        "graph.root_of",
        "graph.roots",
        "running",
        "started",
        "attempts",
        "inflight",
        "ahead",
        "calls.headers",
        "placement._indirect",
        "graph._waiters",
        "graph.waits",
    )
    peak = dict.fromkeys(tables, 0)
    samples = 0
    while not finished.done():
        for name in tables:
            peak[name] = max(peak[name], len(operator.attrgetter(name)(run)))
        samples += 1
        await asyncio.sleep(0.005)
    assert await (await finished) == 0
    assert samples > 50  # sampled throughout the chain, not once
    assert peak["graph.specs"] == 1 and peak["running"] == 1, peak  # the one live level
    assert max(peak.values()) <= 3, peak
    await engine.close()


async def test_a_small_output_comes_with_its_record_from_the_run_it_waited_for() -> None:
    """A caller waiting for a run is handed the output record itself when the output
    was small and held no ObjectRefs: the manager answers with the value instead of a
    ref to fetch from it. An output read from storage comes without one."""
    from ray_workflows._core.manager import InlineOutput

    engine = Engine(open_storage(f"memory://{uuid.uuid4().hex}"))
    await engine.start("small", compile_dag(add.bind(2, 3)))
    ref, record = await engine.result_and_record("small")
    assert await ref == 5 and record is not None
    # What a caller unpickles is the checkpointed value.
    assert ray.get(ray.put(InlineOutput(record))) == 5
    # Once the run is over, the output is read from storage (it may be another
    # manager's by then), without a record.
    ref, record = await engine.result_and_record("small")
    assert await ref == 5 and record is None

    # An output holding an ObjectRef comes without one (the caller resolves it).
    await engine.start("boxed", compile_dag(boxed.bind(4)))
    ref, record = await engine.result_and_record("boxed")
    assert await ref != [] and record is None
    await engine.close()


async def test_a_manager_never_answers_with_the_output_of_an_earlier_run_of_the_id() -> None:
    """Two managers share a storage; the second deletes a workflow the first ran and
    runs the id again: the first answers with the new run's output, read from storage."""
    from ray_workflows._core.manager import InlineOutput, ResolvingRef, WorkflowManager
    from ray_workflows._core.settings import Settings

    uri = f"memory://{uuid.uuid4().hex}"
    # Of one cluster, so the second takes the first's leases over at once (as an
    # earlier incarnation's) and need not wait for them to lapse before it deletes.
    first = WorkflowManager(Settings(uri, auto_resume=False))
    second = WorkflowManager(Settings(uri, auto_resume=False))
    await first.submit("small", compile_dag(add.bind(2, 3)), {})
    reply = await first.result("small")
    assert isinstance(reply, InlineOutput) and ray.get(ray.put(reply)) == 5

    await second.delete("small")
    await second.submit("small", compile_dag(add.bind(10, 20)), {})
    assert ray.get(ray.put(await second.result("small"))) == 30
    reply = await first.result("small")
    assert isinstance(reply, ResolvingRef) and await reply.ref == 30
    await first.engine.close()
    await second.engine.close()


@ray.remote
def fails_until(marker: str) -> str:
    if not Path(marker).exists():
        raise ValueError("not yet")
    return "done"


@ray.remote
def held(gate: str) -> str:
    while not Path(gate).exists():
        time.sleep(0.02)
    return "held"


async def test_an_exempt_workflow_is_exempt_from_admission_when_it_resumes(
    tmp_path: Path,
) -> None:
    """An actor call's sub-workflow (``exempt``) neither takes a running slot nor queues,
    also when it resumes: a resumed caller's task may hold the slot, waiting for it."""
    engine = Engine(open_storage(f"memory://{uuid.uuid4().hex}"))
    engine.admission.configure(1, 0)  # one running, no queue
    marker, gate = tmp_path / "marker", tmp_path / "gate"
    failed = await engine.start("sub", compile_dag(fails_until.bind(str(marker))), exempt=True)
    with pytest.raises(WorkflowExecutionError, match="not yet"):
        await failed
    # Kept in the plan's header too, for a resume before the first status write.
    assert (await engine.store.started_meta("sub") or {}).get(EXEMPT) is True

    holder = await engine.start("holder", compile_dag(held.bind(str(gate))))
    with pytest.raises(WorkflowQueueFullError):  # the slot is taken, and there is no queue
        await engine.start("other", compile_dag(add.bind(1, 2)))
    marker.touch()
    resumed = await engine.resume("sub")
    assert await engine.status("sub") == WorkflowStatus.RUNNING
    assert await (await resumed) == "done"
    gate.touch()
    assert await (await holder) == "held"
    await engine.close()


@ray.remote
def fails() -> int:
    raise ValueError("no")


async def test_cancel_goes_on_when_meta_json_changes_under_it(tmp_path: Path) -> None:
    # cancel() marks a stored workflow CANCELED by compare-and-set; if meta.json changed
    # between its read and its write (another runner took the workflow up or ended
    # it), it looks again. It used to look again while still holding the id's lock,
    # which is not reentrant: it waited for itself for ever.
    engine = Engine(open_storage(str(tmp_path / "storage")))
    finished = await engine.start("w", compile_dag(fails.options(max_retries=0).bind()))
    with pytest.raises(WorkflowExecutionError):
        await finished
    swap = engine.store.swap_meta
    raced = []

    async def another_writer_first(wid: str, meta: Any, old: Any, expected: Any) -> Any:
        if not raced:  # once: meta.json changes between cancel's read and its write
            raced.append(True)
            changed = json.loads(expected)
            changed["error"] = "rewritten by another runner"
            await engine.storage.put(keys.meta_key(wid), json.dumps(changed).encode())
        return await swap(wid, meta, old, expected)

    engine.store.swap_meta = another_writer_first  # type: ignore[method-assign]
    await asyncio.wait_for(engine.cancel("w"), 10)
    assert raced and await engine.status("w") == WorkflowStatus.CANCELED
    await engine.close()


async def test_recovery_skips_what_it_cannot_read_and_resumes_the_rest(tmp_path: Path) -> None:
    # A stray key under status/ (a folder an S3 console made, a file of unknown status)
    # or one workflow's corrupt meta.json is logged and skipped: the sweep and list_all
    # go on, and every readable interrupted workflow is resumed.
    root = tmp_path / "storage"
    first = Engine(open_storage(str(root)))
    assert await (await (await first.start("good", compile_dag(add.bind(1, 2))))) == 3
    await first.close()
    # "good" now looks interrupted, as after a crash of its manager.
    meta = root / "workflows" / "good" / "meta.json"
    meta.write_text(meta.read_text().replace('"SUCCESSFUL"', '"RUNNING"'))
    (root / "status" / "SUCCESSFUL" / "good").rename(root / "status" / "RUNNING" / "good")
    (root / "workflows" / "good" / "lease").unlink()  # and its lease ran out
    (root / "status" / "BOGUS").write_bytes(b"")  # not status/<STATUS>/<wid>
    (root / "status" / "NOPE").mkdir()
    (root / "status" / "NOPE" / "w9").write_bytes(b"")  # an unknown status
    (root / "status" / "FAILED").mkdir(exist_ok=True)
    for status in ("RUNNING", "FAILED"):  # two markers: settled from a corrupt meta.json
        (root / "status" / status / "bad").write_bytes(b"")
    (root / "workflows" / "bad").mkdir()
    (root / "workflows" / "bad" / "meta.json").write_text("{not json")

    engine = Engine(open_storage(str(root)))
    assert await engine.resume_all() == ["good"]
    assert await (await engine.output("good")) == 3
    assert await engine.list_all() == [("good", WorkflowStatus.SUCCESSFUL)]
    await engine.close()


async def test_readers_leave_a_torn_pack_where_it_is(tmp_path: Path) -> None:
    # get_metadata and get_output read task records without holding the workflow's
    # lease: a torn pack they find is skipped, not deleted (only a runner taking the
    # workflow over repairs it, and then the task runs again).
    root = tmp_path / "storage"
    engine = Engine(open_storage(str(root)))
    assert await (await (await engine.start("w", compile_dag(add.bind(1, 2))))) == 3
    [pack] = list((root / "workflows" / "w" / "tasks").glob("*/*.pack"))
    record = pack.read_bytes()
    pack.write_bytes(record[:-3])  # torn
    meta = await engine.metadata("w", "test_engine_inprocess.add")
    assert meta["task_id"] == "test_engine_inprocess.add" and not meta["stats"]
    with pytest.raises(TaskNotFoundError):  # its only record is torn
        await engine.output("w", "test_engine_inprocess.add")
    assert pack.exists() and pack.read_bytes() == record[:-3]
    await engine.close()


@ray.remote
def fails_but_the_third(runs: str) -> int:
    """Attempts 1 and 2 fail; 3 waits (until it is cancelled); any later one fails."""
    record_run(runs, "try")
    if count_runs(runs, "try") == 3:
        time.sleep(60)
    raise ValueError(f"attempt {count_runs(runs, 'try')}")


async def test_failed_attempts_are_counted_across_a_resume(tmp_path: Path) -> None:
    # max_retries=2: three attempts in all. Two fail, the third is under way when its
    # engine stops; the engine that resumes the workflow knows of the two failures, so
    # the task gets one more attempt, not three more (Ray 2.47 started counting again).
    runs, root = tmp_path / "runs", tmp_path / "storage"
    runs.mkdir()
    task = fails_but_the_third.options(max_retries=2, retry_exceptions=True)
    first = Engine(open_storage(str(root)))
    finished = await first.start("w", compile_dag(task.bind(str(runs))))
    for _ in range(600):
        if count_runs(runs, "try") >= 3:
            break
        await asyncio.sleep(0.05)
    assert count_runs(runs, "try") == 3
    await first.close()  # as if its manager died: the workflow stays RUNNING
    finished.cancel()
    second = Engine(open_storage(str(root)))
    with pytest.raises(WorkflowExecutionError, match="attempt 4"):
        await (await second.resume("w"))
    assert count_runs(runs, "try") == 4
    await second.close()


async def test_a_start_that_fails_holds_no_lease(tmp_path: Path) -> None:
    # Starting an id that is stored as CANCELED fails; the lease the start took (in
    # parallel with storing the plan) is released, not kept and renewed for ever,
    # which made the id look running here to every other cluster.
    engine = Engine(open_storage(str(tmp_path / "storage")))
    finished = await engine.start("w", compile_dag(fails.options(max_retries=0).bind()))
    with pytest.raises(WorkflowExecutionError):
        await finished
    await engine.cancel("w")
    assert await engine.status("w") == WorkflowStatus.CANCELED
    with pytest.raises(WorkflowNotResumableError):
        await engine.start("w", compile_dag(add.bind(1, 2)))
    assert "w" not in engine.leases.held
    assert await engine.leases.holder("w") is None
    await engine.close()


@ray.remote
def tally_down(n: int, runs: str) -> Any:
    record_run(runs, f"cd{n}")
    if n == 0:
        return 0
    return tally_down.bind(n - 1, runs)  # a bare DAG is a continuation


async def test_a_continuation_whose_records_landed_only_in_part_resumes(tmp_path: Path) -> None:
    # On a storage whose batches do not land in order (S3), a continuation's records
    # (its plan, the chain's `latest` pointer, the id counters) may land without each
    # other. Here the newest continuation's plan and every ids.json are lost, its
    # `latest` pointer stayed: the chain is walked from its root, the task whose plan
    # was lost runs again, and the ids it takes are new ones.
    runs, root = tmp_path / "runs", tmp_path / "storage"
    runs.mkdir()
    engine = Engine(open_storage(str(root)))
    assert await (await (await engine.start("c", compile_dag(tally_down.bind(3, str(runs)))))) == 0
    await engine.close()
    wf = root / "workflows" / "c"
    name = "test_engine_inprocess.tally_down"
    [lost] = list(wf.glob(f"tasks/*/{name}_2.cont"))  # countdown(1)'s continuation
    assert list(wf.glob(f"tasks/*/{name}.latest"))
    lost.unlink()
    for ids in wf.glob("tasks/*/ids.json"):
        ids.unlink()
    meta = wf / "meta.json"  # interrupted, as after a crash of its manager
    meta.write_text(meta.read_text().replace('"SUCCESSFUL"', '"RUNNING"'))
    (root / "status" / "SUCCESSFUL" / "c").rename(root / "status" / "RUNNING" / "c")
    (wf / "lease").unlink()

    engine = Engine(open_storage(str(root)))
    assert await (await (await engine.resume("c"))) == 0
    await engine.close()
    counts = [count_runs(runs, f"cd{n}") for n in (3, 2, 1, 0)]
    assert counts == [1, 1, 2, 2], counts
    # countdown(0) ran again as a new task, not under an id already used.
    assert list(wf.glob(f"tasks/*/{name}_4.*")) or any(
        f"{name}_4" in p.read_bytes().decode("latin-1") for p in wf.glob("tasks/*/*.pack")
    )
