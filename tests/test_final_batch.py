"""A finished workflow's final status is written after its last checkpoints are durable,
by a compare-and-set of ``meta.json`` against what its runner last saw."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import ray
from ray_workflows.backends.filesystem import FileStorage

from ray_workflows.engine import Engine
from ray_workflows.exceptions import StorageError, WorkflowError
from ray_workflows.plan import compile_dag
from ray_workflows.status import WorkflowStatus
from ray_workflows.store import PackWriter


@ray.remote
def add(a: int, b: int) -> int:
    return a + b


class Recording(FileStorage):
    """The real file storage, with the keys of each write recorded in order (a
    ``put_many`` batch, or one compare-and-set), and batches holding ``fail`` refused."""

    def __init__(self, uri: str, fail: str | None = None) -> None:
        super().__init__(uri)
        self.fail = fail
        self.batches: list[list[str]] = []

    async def put_many(self, items: Mapping[str, bytes]) -> None:
        if self.fail is not None and any(self.fail in key for key in items):
            raise StorageError(f"refused a batch with {self.fail!r} (test)")
        self.batches.append(list(items))
        await super().put_many(items)

    async def compare_and_set(self, key: str, expected: bytes | None, data: bytes) -> bool:
        done = await super().compare_and_set(key, expected, data)
        if done:
            self.batches.append([key])
        return done


def _packs(keys: list[str], wid: str) -> list[str]:
    return [k for k in keys if k.startswith(f"workflows/{wid}/tasks/") and k.endswith(".pack")]


@pytest.fixture(autouse=True)
def one_pack(monkeypatch: pytest.MonkeyPatch) -> None:
    # Records gather until the workflow's end drains them: one pack per workflow.
    monkeypatch.setattr(PackWriter, "WINDOW", 10.0)


async def test_the_status_is_written_after_the_checkpoints(tmp_path: Path) -> None:
    storage = Recording(f"file://{tmp_path / 's'}")
    engine = Engine(storage)
    finished = await engine.start("w", compile_dag(add.bind(add.bind(1, 2), 3)))
    assert await (await finished) == 6
    keys = [k for batch in storage.batches for k in batch]
    final = keys.index("workflows/w/meta.json", keys.index("status/SUCCESSFUL/w"))
    packs = [keys.index(p) for p in _packs(keys, "w")]
    assert packs and max(packs) < keys.index("status/SUCCESSFUL/w") < final
    stored = json.loads((tmp_path / "s" / "workflows" / "w" / "meta.json").read_bytes())
    assert stored["status"] == "SUCCESSFUL" and stored["output_key"]
    assert stored["lease_epoch"] == 1  # the epoch of the lease that wrote it
    assert await engine.status("w") == WorkflowStatus.SUCCESSFUL
    assert await (await engine.output("w")) == 6
    await engine.close()


async def test_a_failed_status_write_leaves_the_workflow_resumable(tmp_path: Path) -> None:
    uri = f"file://{tmp_path / 's'}"
    storage = Recording(uri, fail="status/SUCCESSFUL/")
    engine = Engine(storage)
    finished = await engine.start("w", compile_dag(add.bind(add.bind(1, 2), 3)))
    with pytest.raises(WorkflowError, match="could not be stored.*RESUMABLE"):
        await finished
    stored = json.loads((tmp_path / "s" / "workflows" / "w" / "meta.json").read_bytes())
    assert stored["status"] == "RUNNING"  # nothing claims it finished
    assert _packs(await storage.list("workflows/w/tasks/"), "w")  # its outputs are stored
    await engine.close()

    # Another engine resumes it once the storage takes writes again: from the outputs.
    engine = Engine(Recording(uri))
    assert await engine.status("w") == WorkflowStatus.RESUMABLE
    assert await (await (await engine.resume("w"))) == 6
    assert await engine.status("w") == WorkflowStatus.SUCCESSFUL
    await engine.close()
