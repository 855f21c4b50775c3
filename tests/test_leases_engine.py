"""One runner per workflow: engines sharing one storage coordinate through leases.

Each Engine here is a real engine in this process with its own lease owner, on a
real file storage, running real Ray tasks: exactly what two managers of two
clusters sharing a directory do, minus the actors around them.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from helpers import blocked_step, count_runs, faulty_uri, step, wait_for

from ray_workflows._core.compiler import compile_dag
from ray_workflows._core.engine import Engine
from ray_workflows._core.keys import lease_key
from ray_workflows._core.status import WorkflowStatus
from ray_workflows.exceptions import WorkflowRunningElsewhereError
from ray_workflows.storage import forget_storage, open_storage


def _dag(wid: str, runs: str) -> object:
    return step.bind(step.bind(step.bind(0, f"{wid}-a", runs), f"{wid}-b", runs), f"{wid}-c", runs)


async def _outcome(engine: Engine, wid: str, runs: str) -> object:
    try:
        finished = await engine.start(wid, compile_dag(_dag(wid, runs)))
        return await (await finished)
    except WorkflowRunningElsewhereError as exc:
        return exc


async def test_two_engines_racing_for_20_workflows_run_each_task_once(
    tmp_path: Path, counter_dir: Path
) -> None:
    storage = open_storage(str(tmp_path / "shared"))
    first, second = Engine(storage, lease_ttl=5), Engine(storage, lease_ttl=5)
    runs = str(counter_dir)
    wids = [f"race-{i}" for i in range(20)]
    try:
        results = await asyncio.gather(
            *(_outcome(engine, wid, runs) for wid in wids for engine in (first, second))
        )
        for wid, (a, b) in zip(wids, zip(results[::2], results[1::2], strict=True), strict=True):
            # One engine ran it; the other found it running elsewhere or read its output.
            assert 3 in (a, b), (wid, a, b)
            assert all(r == 3 or isinstance(r, WorkflowRunningElsewhereError) for r in (a, b))
            for name in "abc":
                assert count_runs(counter_dir, f"{wid}-{name}") == 1, (wid, name)
        # Whoever ran them, both engines agree on the outcome.
        for wid in wids:
            assert await first.status(wid) == WorkflowStatus.SUCCESSFUL
            assert await second.status(wid) == WorkflowStatus.SUCCESSFUL
    finally:
        await first.close()
        await second.close()
        forget_storage(storage.uri)


async def test_a_workflow_held_elsewhere_is_running_there_and_taken_over_when_it_lapses(
    tmp_path: Path, counter_dir: Path
) -> None:
    storage = open_storage(str(tmp_path / "shared"))
    runs, gate = str(counter_dir), str(tmp_path / "gate")
    holder, other = Engine(storage, lease_ttl=1.5), Engine(storage, lease_ttl=1.5)
    dag = step.bind(blocked_step.bind(step.bind(0, "a", runs), "b", runs, gate), "c", runs)
    try:
        held = await holder.start("w", compile_dag(dag))
        await asyncio.to_thread(wait_for, lambda: count_runs(counter_dir, "b") > 0)
        # The other engine sees it running (not RESUMABLE) and may neither resume,
        # cancel nor delete it.
        assert await other.status("w") == WorkflowStatus.RUNNING
        assert ("w", WorkflowStatus.RUNNING) in await other.list_all()
        with pytest.raises(WorkflowRunningElsewhereError, match="lease"):
            await other.resume("w")
        with pytest.raises(WorkflowRunningElsewhereError):
            await other.cancel("w")

        # The holder dies without a word: its keeper stops renewing, and its run stops
        # without writing anything (as a killed process would).
        assert holder.leases._keeper is not None
        holder.leases._keeper.cancel()
        holder.leases.held["w"].lost = True
        holder.runs["w"].abandon(WorkflowRunningElsewhereError("simulated death"))
        with pytest.raises(WorkflowRunningElsewhereError):
            await held
        assert await other.status("w") == WorkflowStatus.RUNNING  # still within its ttl
        Path(gate).touch()
        # get_output-style waiting: resumes it here once the lease lapses.
        ref = await asyncio.wait_for(other.result("w"), timeout=30)
        assert await ref == 3
        assert count_runs(counter_dir, "a") == 1  # finished before: never again
        assert count_runs(counter_dir, "b") in (1, 2)  # in flight when the holder died
        assert await other.status("w") == WorkflowStatus.SUCCESSFUL
    finally:
        await holder.close()
        await other.close()
        forget_storage(storage.uri)


async def test_a_lost_lease_stops_the_run_without_writing_its_status(
    tmp_path: Path, counter_dir: Path
) -> None:
    storage = open_storage(str(tmp_path / "shared"))
    runs, gate = str(counter_dir), str(tmp_path / "gate")
    engine = Engine(storage, lease_ttl=5)
    dag = blocked_step.bind(0, "b", runs, gate)
    try:
        finished = await engine.start("w", compile_dag(dag))
        lease = engine.leases.held["w"]
        # Another manager takes it over (its live record replaces ours), and the
        # keeper notices: the run must stop rather than take it back. The takeover is
        # a compare-and-set, as a real one is: a plain put raced the keeper's first
        # renewal, which could land after it and undo the takeover (this test then
        # timed out, flaky, for two sessions).
        while True:
            raw = await storage.get(lease_key("w"))
            assert raw is not None
            record = json.loads(raw)
            record.update(
                owner="another-manager",
                epoch=record["epoch"] + 1,
                expires_at=time.time() + 60,
                renewed_at=time.time(),
            )
            if await storage.compare_and_set(lease_key("w"), raw, json.dumps(record).encode()):
                break
        engine.leases._lose(lease, "test: taken over")
        with pytest.raises(WorkflowRunningElsewhereError, match="taken over"):
            await asyncio.wait_for(finished, timeout=30)
        meta = await engine.store.read_meta("w")
        assert meta is not None and meta["status"] == "RUNNING"  # left to the new holder
    finally:
        Path(gate).touch()
        await engine.close()
        forget_storage(storage.uri)


async def test_a_lapsed_lease_nobody_took_is_taken_again_and_the_run_goes_on(
    tmp_path: Path, counter_dir: Path
) -> None:
    storage = open_storage(str(tmp_path / "shared"))
    runs, gate = str(counter_dir), str(tmp_path / "gate")
    engine = Engine(storage, lease_ttl=5)
    try:
        finished = await engine.start("w", compile_dag(blocked_step.bind(0, "b", runs, gate)))
        first = engine.leases.held["w"]
        engine.leases._lose(first, "test: renewal came too late")  # a starved manager
        await asyncio.to_thread(wait_for, lambda: "w" in engine.leases.held)
        assert engine.leases.held["w"].epoch > first.epoch
        Path(gate).touch()
        assert await (await asyncio.wait_for(finished, timeout=30)) == 1
        assert await engine.status("w") == WorkflowStatus.SUCCESSFUL
    finally:
        Path(gate).touch()
        await engine.close()
        forget_storage(storage.uri)


async def test_a_lease_lost_while_the_run_is_built_is_taken_again(
    tmp_path: Path, counter_dir: Path
) -> None:
    """A storage slower than the lease's ttl (S3 on a loaded machine): the lease of a
    workflow being started is lost before its run is registered, and retaking it times
    out at first. The run keeps trying, takes it again once the storage is fast again
    and finishes, where it used to hold its tasks back for ever (or give up, saying
    another manager ran it)."""
    control = tmp_path / "faults.json"
    storage = open_storage(faulty_uri(tmp_path / "shared", control))
    runs, gate = str(counter_dir), str(tmp_path / "gate")
    engine = Engine(storage, lease_ttl=1)
    try:
        # A first workflow keeps the engine's lease keeper renewing.
        first = await engine.start("w0", compile_dag(blocked_step.bind(0, "w0", runs, gate)))
        control.write_text(json.dumps({"delay": 1.6}))  # every write takes > ttl
        starting = asyncio.ensure_future(engine.start("w", compile_dag(_dag("w", runs))))
        await asyncio.sleep(4)
        control.write_text("{}")
        Path(gate).touch()
        finished = await asyncio.wait_for(starting, timeout=30)
        assert await (await asyncio.wait_for(finished, timeout=30)) == 3
        assert await engine.status("w") == WorkflowStatus.SUCCESSFUL
        first.cancel()  # w0's own renewals were late too: taken again, or abandoned
    finally:
        control.write_text("{}")
        Path(gate).touch()
        await engine.close()
        forget_storage(storage.uri)
