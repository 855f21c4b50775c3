"""Fencing: a runner whose writes stall past its lease changes nothing once another
runner took the workflow over.

Runner A is a real engine whose storage holds every write back while a gate is shut
(a storage that stalls, as a paused process or a slow S3 does). Runner B, a second
engine on the same directory, takes the workflow over once A's lease has run out and
finishes it. Then A's gate opens and everything A queued lands, or tries to.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from helpers import count_runs, record_run
from ray_workflows.backends.filesystem import FileStorage

from ray_workflows.engine import Engine
from ray_workflows.exceptions import WorkflowRunningElsewhereError
from ray_workflows.plan import compile_dag
from ray_workflows.plugins import open_storage
from ray_workflows.status import WorkflowStatus
from ray_workflows.store import decode_pack


class Stalling(FileStorage):
    """The real file storage, whose writes wait while ``gate`` is clear."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.gate = asyncio.Event()
        self.gate.set()

    async def _wait(self) -> None:
        await self.gate.wait()

    async def put(self, key: str, data: bytes) -> None:
        await self._wait()
        await super().put(key, data)

    async def put_many(self, items: Mapping[str, bytes]) -> None:
        await self._wait()
        await super().put_many(items)

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        await self._wait()
        return await super().put_if_absent(key, data)

    async def put_if_absent_many(self, items: Mapping[str, bytes]) -> dict[str, bool]:
        await self._wait()
        return await super().put_if_absent_many(items)

    async def compare_and_set(self, key: str, expected: bytes | None, data: bytes) -> bool:
        await self._wait()
        return await super().compare_and_set(key, expected, data)

    async def delete(self, key: str) -> bool:
        await self._wait()
        return await super().delete(key)

    async def discard_many(self, keys: list[str]) -> None:
        await self._wait()
        await super().discard_many(keys)


@ray.remote
def first(runs: str) -> int:
    record_run(runs, "first")
    return 1


@ray.remote
def last(x: int, runs: str, started: str) -> int:
    """Returns how many times it has run: A's attempt says 1, B's says 2."""
    import time

    record_run(runs, "last")
    Path(started).touch()
    time.sleep(1.0)  # A's writes stall meanwhile
    return x + 10 * count_runs(runs, "last")


async def _wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_a_stalled_runner_changes_nothing_after_a_takeover(
    tmp_path: Path, counter_dir: Path
) -> None:
    uri = f"file://{tmp_path / 'shared'}"
    runs, started = str(counter_dir), str(tmp_path / "last-started")
    stalling = Stalling(uri)
    a = Engine(stalling, lease_ttl=1.5)
    # A runs the workflow; its writes stall from the moment its last task starts, so
    # its last output, its final status and its lease renewals all wait in the gate.
    finished_a = await a.start("w", compile_dag(last.bind(first.bind(runs), runs, started)))
    epoch_1 = tmp_path / "shared" / "workflows" / "w" / "tasks" / "1"

    def first_is_stored() -> bool:
        packs = epoch_1.glob("*.pack")
        return any("test_fencing.first" in decode_pack(p.read_bytes(), str(p)) for p in packs)

    await _wait_for(lambda: Path(started).exists() and first_is_stored())
    stalling.gate.clear()
    # A's lease runs out (its renewals stall); B takes the workflow over and ends it.
    await asyncio.sleep(2.5)
    b = Engine(open_storage(uri), lease_ttl=1.5)
    finished_b = await b.resume("w")
    assert await (await finished_b) == 21  # B's run of `last`: 1 + 10 * 2
    meta_path = tmp_path / "shared" / "workflows" / "w" / "meta.json"
    meta_b = meta_path.read_bytes()
    assert json.loads(meta_b)["lease_epoch"] == 2
    records_b = await b.store.task_records("w")

    # A wakes up: whatever it queued now lands, or tries to.
    stalling.gate.set()
    try:
        outcome: Any = await asyncio.wait_for(await_ref(finished_a), 30)
    except WorkflowRunningElsewhereError as exc:
        outcome = exc
    assert isinstance(outcome, WorkflowRunningElsewhereError), outcome
    # B's status stands, byte for byte, and so do B's records.
    assert meta_path.read_bytes() == meta_b
    assert await b.status("w") == WorkflowStatus.SUCCESSFUL
    assert await (await b.output("w")) == 21
    reader = Engine(open_storage(uri))
    assert await reader.status("w") == WorkflowStatus.SUCCESSFUL
    assert await (await reader.output("w")) == 21
    records = await reader.store.task_records("w")
    assert dict(records.where) == dict(records_b.where)  # A's late records do not count
    # A's late output is on disk, under its old epoch, where no reader looks.
    late = epoch_1.glob("*.pack")
    late_tasks = {t for p in late for t in decode_pack(p.read_bytes(), str(p))}
    assert "test_fencing.last" in late_tasks, late_tasks
    # The task that finished before the takeover ran once; the one in flight twice.
    assert count_runs(runs, "first") == 1
    assert count_runs(runs, "last") == 2
    for engine in (a, b, reader):
        await engine.close()


async def await_ref(finished: asyncio.Future[Any]) -> Any:
    return await (await finished)
