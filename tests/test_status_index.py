"""The status index read by status: the recovery sweep lists only the markers of the
workflows that may need it, and settles each from meta.json (an in-process Engine on
memory storage, with real Ray tasks)."""

from __future__ import annotations

import json
import uuid

import ray
from ray_workflows.backends.memory import MemoryStorage

from ray_workflows._core import keys
from ray_workflows._core.compiler import compile_dag
from ray_workflows._core.engine import Engine
from ray_workflows._core.status import WorkflowStatus


class ListingRecorder(MemoryStorage):
    """A real memory storage that remembers which prefixes were listed."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.listed: list[str] = []

    async def list(self, prefix: str = "") -> list[str]:
        self.listed.append(prefix)
        return await super().list(prefix)


@ray.remote
def add(a: int, b: int) -> int:
    return a + b


def _meta(status: str) -> bytes:
    return json.dumps({"status": status, "user_metadata": {}, "end_time": 1.0}).encode()


async def test_the_sweep_lists_only_running_and_pending_markers() -> None:
    storage = ListingRecorder(f"memory://{uuid.uuid4().hex}")
    engine = Engine(storage)
    finished = {}
    for i in range(50):
        wid = f"done-{i}"
        finished[keys.plan_key(wid)] = b"not read"
        finished[keys.meta_key(wid)] = _meta("SUCCESSFUL")
        finished[keys.status_key("SUCCESSFUL", wid)] = b""
    # Crashed between its two markers' writes: FAILED says meta.json, so never resumed
    # by the sweep, though a RUNNING marker was left.
    finished[keys.meta_key("failed")] = _meta("FAILED")
    finished[keys.status_key("FAILED", "failed")] = b""
    finished[keys.status_key("RUNNING", "failed")] = b""
    # Half deleted (its plan, the commit point, is gone): nothing to resume.
    finished[keys.status_key("RUNNING", "gone")] = b""
    await storage.put_many(finished)
    # Orphaned while it ran, with a SUCCESSFUL marker written before a crash kept its
    # meta.json from saying so: it is still to run.
    assert await engine.store.create("orphan", compile_dag(add.bind(1, 2)))
    await storage.put(keys.status_key("SUCCESSFUL", "orphan"), b"")

    storage.listed.clear()
    assert await engine.resume_all() == ["orphan"]
    index_listings = [p for p in storage.listed if p.startswith("status")]
    assert sorted(index_listings) == ["status/PENDING/", "status/RUNNING/"]

    assert await (await engine.result("orphan")) == 3
    assert await engine.status("orphan") == WorkflowStatus.SUCCESSFUL
    # list_all still reads the whole index and settles every pair of markers.
    listed = dict(await engine.list_all())
    assert listed["failed"] == WorkflowStatus.FAILED
    assert listed["orphan"] == WorkflowStatus.SUCCESSFUL
    assert sum(s == WorkflowStatus.SUCCESSFUL for s in listed.values()) == 51
    assert await engine.list_all({WorkflowStatus.FAILED}) == [("failed", WorkflowStatus.FAILED)]
    await engine.close()
