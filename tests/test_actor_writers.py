"""One virtual actor, two managers sharing its storage (two clusters, say): no update is
lost. Each ``Actors`` here is what a manager runs, in this process, on one real file
storage, running the methods as real Ray tasks."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from ray import cloudpickle

import ray_workflows as workflow
from ray_workflows._core.actors import Actors
from ray_workflows.storage import forget_storage, open_storage


@workflow.virtual_actor
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n

    @workflow.virtual_actor.readonly
    def value(self) -> int:
        return self.n


async def test_two_managers_calling_one_actor_lose_no_update(tmp_path: Path) -> None:
    uri = str(tmp_path / "shared")
    workflow.init(uri)
    actor_id = f"shared-{uuid.uuid4().hex[:6]}"
    await Counter.get_or_create(actor_id).ready()  # created by this driver's manager
    first, second = Actors(open_storage(uri)), Actors(open_storage(uri))
    call = cloudpickle.dumps(((), {}))

    async def incr(actors: Actors, n: int) -> list[int]:
        return [
            await actors.call(actor_id, uuid.uuid4().hex, "incr", call, False, {}) for _ in range(n)
        ]

    a, b = await asyncio.gather(incr(first, 50), incr(second, 50))
    # Every call got its own number (at least once each, never an update lost), and
    # the state counts all of them.
    assert sorted(a + b) == list(range(1, 101)), (a, b)
    assert await first.call(actor_id, uuid.uuid4().hex, "value", call, True, {}) == 100
    assert workflow.get_actor(actor_id).value.run() == 100
    forget_storage(uri)
