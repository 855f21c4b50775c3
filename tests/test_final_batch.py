"""A finished workflow's last checkpoints and its final status share one durable batch
where the storage's batches land in order; elsewhere the status waits for them."""

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
    """The real file storage, with the keys of each ``put_many`` batch recorded, its
    ``ordered_batches`` as the test says, and batches holding ``fail`` refused."""

    def __init__(self, uri: str, ordered: bool, fail: str | None = None) -> None:
        super().__init__(uri)
        self.ordered, self.fail = ordered, fail
        self.batches: list[list[str]] = []

    @property
    def ordered_batches(self) -> bool:  # type: ignore[override]
        return self.ordered

    async def put_many(self, items: Mapping[str, bytes]) -> None:
        if self.fail is not None and any(self.fail in key for key in items):
            raise StorageError(f"refused a batch with {self.fail!r} (test)")
        self.batches.append(list(items))
        await super().put_many(items)


def _final_batch(storage: Recording, wid: str) -> tuple[int, list[str]]:
    marker = f"status/{WorkflowStatus.SUCCESSFUL.value}/{wid}"
    [(i, keys)] = [(i, b) for i, b in enumerate(storage.batches) if marker in b]
    return i, keys


def _packs(keys: list[str], wid: str) -> list[str]:
    return [k for k in keys if k.startswith(f"workflows/{wid}/tasks/") and k.endswith(".pack")]


@pytest.fixture(autouse=True)
def one_pack(monkeypatch: pytest.MonkeyPatch) -> None:
    # Records gather until the workflow's end drains them: one pack per workflow.
    monkeypatch.setattr(PackWriter, "WINDOW", 10.0)


async def _ran(tmp_path: Path, ordered: bool) -> tuple[Recording, Engine]:
    """A two-task workflow "w" run to its end on a fresh recording storage."""
    storage = Recording(f"file://{tmp_path / 's'}", ordered=ordered)
    engine = Engine(storage)
    finished = await engine.start("w", compile_dag(add.bind(add.bind(1, 2), 3)))
    assert await (await finished) == 6
    return storage, engine


async def test_ordered_batches_write_the_last_checkpoint_with_the_status(tmp_path: Path) -> None:
    storage, engine = await _ran(tmp_path, ordered=True)
    _, keys = _final_batch(storage, "w")
    packs = _packs(keys, "w")
    assert packs, keys  # the output's record went with the status...
    meta = keys.index("workflows/w/meta.json")
    # ...and comes first: a crash that keeps the status keeps the output too.
    assert max(keys.index(p) for p in packs) < keys.index("status/SUCCESSFUL/w") < meta
    stored = json.loads((tmp_path / "s" / "workflows" / "w" / "meta.json").read_bytes())
    assert stored["status"] == "SUCCESSFUL" and stored["output_key"]
    assert await engine.status("w") == WorkflowStatus.SUCCESSFUL
    assert await (await engine.output("w")) == 6
    await engine.close()


async def test_unordered_batches_write_the_status_after_the_checkpoints(tmp_path: Path) -> None:
    storage, engine = await _ran(tmp_path, ordered=False)
    final, keys = _final_batch(storage, "w")
    assert not _packs(keys, "w"), keys
    earlier = [k for batch in storage.batches[:final] for k in _packs(batch, "w")]
    assert earlier  # every record was durable before the status was written
    assert await engine.status("w") == WorkflowStatus.SUCCESSFUL
    await engine.close()


async def test_a_failed_final_batch_leaves_the_workflow_resumable(tmp_path: Path) -> None:
    uri = f"file://{tmp_path / 's'}"
    storage = Recording(uri, ordered=True, fail="status/SUCCESSFUL/")
    engine = Engine(storage)
    finished = await engine.start("w", compile_dag(add.bind(add.bind(1, 2), 3)))
    with pytest.raises(WorkflowError, match="could not be stored.*RESUMABLE"):
        await finished
    stored = json.loads((tmp_path / "s" / "workflows" / "w" / "meta.json").read_bytes())
    assert stored["status"] == "RUNNING"  # nothing claims it finished...
    assert not _packs(await storage.list("workflows/w/tasks/"), "w")  # ...in one batch
    await engine.close()

    # Another engine resumes it once the storage takes writes again.
    engine = Engine(Recording(uri, ordered=True))
    assert await engine.status("w") == WorkflowStatus.RESUMABLE
    assert await (await (await engine.resume("w"))) == 6
    assert await engine.status("w") == WorkflowStatus.SUCCESSFUL
    await engine.close()
