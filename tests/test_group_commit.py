"""The engine's group commit: concurrent writers share durable batches, and
concurrent creations of one key still have exactly one winner."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from pathlib import Path

import ray
from ray_workflows.backends.filesystem import FileStorage

from ray_workflows._core.compiler import compile_dag
from ray_workflows._core.store import GroupCommit, WorkflowStore
from ray_workflows.storage import open_storage


@ray.remote
def _inc(x: int) -> int:
    return x + 1


class Counting(FileStorage):
    """The real file storage, with its batch creations counted."""

    batches = 0

    async def put_if_absent_many(self, items: Mapping[str, bytes]) -> dict[str, bool]:
        self.batches += 1
        return await super().put_if_absent_many(items)


async def test_concurrent_creations_share_batches(tmp_path: Path) -> None:
    storage = Counting(f"file://{tmp_path / 's'}")
    commit = GroupCommit(storage)
    results = await asyncio.gather(
        *(commit.create_many({f"k/{i}/a": b"a", f"k/{i}/b": b"b"}) for i in range(50))
    )
    assert all(r == {f"k/{i}/a": True, f"k/{i}/b": True} for i, r in enumerate(results))
    assert storage.batches <= 2  # the first call's batch, then everything queued meanwhile
    assert await storage.get("k/49/b") == b"b"


async def test_one_key_created_twice_in_one_batch_has_one_winner(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path / "s"))
    await storage.put("taken", b"old")
    commit = GroupCommit(storage)
    first, second, third = await asyncio.gather(
        commit.create_many({"x": b"1", "taken": b"new"}),
        commit.create_many({"x": b"2"}),
        commit.create_many({"y": b"3"}),
    )
    assert [first["x"], second["x"]].count(True) == 1
    assert first["taken"] is False and third["y"] is True
    assert await storage.get("x") in (b"1", b"2")
    assert await storage.get("taken") == b"old"


async def test_two_callers_starting_one_workflow_id_have_one_winner() -> None:
    store = WorkflowStore(open_storage(f"memory://{uuid.uuid4().hex}"))
    starts = await asyncio.gather(
        *(
            store.create_started("w", b"plan%d" % i, "RUNNING", ("workflows/w/lease", b"l"))
            for i in range(5)
        )
    )
    assert sum(s is not None for s in starts) == 1


async def test_a_key_that_cannot_be_written_fails_only_its_own_caller(tmp_path: Path) -> None:
    # Three callers share one batch; the file system refuses one name (longer than 255
    # bytes). The batch fails, and is written again caller by caller: the two others'
    # writes land and succeed, only the bad one's caller gets the error.
    storage = FileStorage(str(tmp_path))
    commit = GroupCommit(storage)
    bad = "workflows/w2/" + "x" * 300
    first = asyncio.ensure_future(commit.enqueue_many({"workflows/w1/a": b"1"}))
    second = asyncio.ensure_future(commit.queue_creates({bad: b"2"}))
    third = asyncio.ensure_future(commit.queue_creates({"workflows/w3/c": b"3"}))
    results = await asyncio.gather(first, second, third, return_exceptions=True)
    assert not isinstance(results[0], BaseException), results
    assert isinstance(results[1], Exception), results
    assert results[2] == {"workflows/w3/c": True}, results
    assert await storage.get("workflows/w1/a") == b"1"
    assert await storage.get("workflows/w3/c") == b"3"


async def test_a_stored_workflow_is_in_the_index_before_its_first_status_write(
    tmp_path: Path,
) -> None:
    # A workflow the manager stores (the driver cannot reach the storage) is one batch
    # with its RUNNING marker: a crash before its first status write leaves a workflow
    # recovery finds, not one list_all and resume_all never see.
    store = WorkflowStore(FileStorage(str(tmp_path)))
    plan = compile_dag(_inc.bind(1))
    assert await store.create("w", plan)
    assert await store.indexed() == {"w": "RUNNING"}
    assert not await store.storage.exists("workflows/w/meta.json")
    # An id that exists keeps the markers it had: none is added.
    await store.storage.delete("status/RUNNING/w")
    await store.storage.put("status/SUCCESSFUL/w", b"")
    assert not await store.create("w", plan)
    assert await store.indexed() == {"w": "SUCCESSFUL"}
