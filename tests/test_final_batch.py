"""A finished workflow's final status never lands before its last checkpoints: where
the storage's batches land in order and the workflow has no ``meta.json`` yet (its
caller stored it), both share one batch, the checkpoints first; otherwise the status is
written, by a compare-and-set of ``meta.json``, once the checkpoints are durable."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import ray
from ray_workflows.backends.filesystem import FileStorage

from ray_workflows._core.client import prepare
from ray_workflows._core.compiler import compile_dag
from ray_workflows._core.engine import Engine
from ray_workflows._core.keys import lease_key
from ray_workflows._core.lease import grant
from ray_workflows._core.status import WorkflowStatus
from ray_workflows._core.store import PackWriter, WorkflowStore
from ray_workflows.exceptions import StorageError, WorkflowError


@ray.remote
def add(a: int, b: int) -> int:
    return a + b


class Recording(FileStorage):
    """The real file storage, with the keys of each write recorded in order (a batch,
    or one compare-and-set), ``ordered_batches`` as the test says, and batches
    holding ``fail`` refused."""

    def __init__(self, uri: str, ordered: bool = True, fail: str | None = None) -> None:
        super().__init__(uri)
        self.ordered, self.fail = ordered, fail
        self.batches: list[list[str]] = []

    @property
    def ordered_batches(self) -> bool:  # type: ignore[override]
        return self.ordered

    def _record(self, keys: list[str]) -> None:
        if self.fail is not None and any(self.fail in key for key in keys):
            raise StorageError(f"refused a batch with {self.fail!r} (test)")
        self.batches.append(keys)

    async def put_many(self, items: Mapping[str, bytes]) -> None:
        self._record(list(items))
        await super().put_many(items)

    async def put_if_absent_many(self, items: Mapping[str, bytes]) -> dict[str, bool]:
        self._record(list(items))
        return await super().put_if_absent_many(items)

    async def compare_and_set(self, key: str, expected: bytes | None, data: bytes) -> bool:
        self._record([key])
        return await super().compare_and_set(key, expected, data)


def _packs(keys: list[str], wid: str) -> list[str]:
    return [k for k in keys if k.startswith(f"workflows/{wid}/tasks/") and k.endswith(".pack")]


def _final(storage: Recording, wid: str) -> tuple[int, list[str]]:
    marker = f"status/{WorkflowStatus.SUCCESSFUL.value}/{wid}"
    [(i, keys)] = [(i, b) for i, b in enumerate(storage.batches) if marker in b]
    return i, keys


@pytest.fixture(autouse=True)
def one_pack(monkeypatch: pytest.MonkeyPatch) -> None:
    # Records gather until the workflow's end drains them: one pack per workflow.
    monkeypatch.setattr(PackWriter, "WINDOW", 10.0)


async def _adopted(storage: Recording, engine: Engine, wid: str) -> int:
    """Store a two-task workflow as its caller would, hand it to ``engine``, run it."""
    prepared = prepare(add.bind(add.bind(1, 2), 3), (), {}, wid, None)
    record = grant(wid, engine.leases.owner, engine.leases.ttl)
    store = WorkflowStore(storage)
    assert await store.create_started(wid, prepared.plan, "RUNNING", (lease_key(wid), record))
    plan = WorkflowStore.decode_plan(prepared.plan, wid)
    finished = await engine.adopt(wid, plan, prepared.meta, record)
    output: int = await (await finished)
    return output


async def test_ordered_batches_create_the_status_with_the_last_checkpoint(
    tmp_path: Path,
) -> None:
    storage = Recording(f"file://{tmp_path / 's'}")
    engine = Engine(storage)
    assert await _adopted(storage, engine, "w") == 6
    _, keys = _final(storage, "w")
    packs = _packs(keys, "w")
    assert packs, keys  # the output's record went with the status...
    # ...and comes first: a crash that keeps the status keeps the output too.
    meta = keys.index("workflows/w/meta.json")
    assert max(keys.index(p) for p in packs) < keys.index("status/SUCCESSFUL/w") < meta
    stored = json.loads((tmp_path / "s" / "workflows" / "w" / "meta.json").read_bytes())
    assert stored["status"] == "SUCCESSFUL" and stored["output_key"]
    assert stored["lease_epoch"] == 1  # the epoch of the lease that wrote it
    assert await engine.status("w") == WorkflowStatus.SUCCESSFUL
    assert await (await engine.output("w")) == 6
    await engine.close()


@pytest.mark.parametrize("ordered", [True, False])
async def test_otherwise_the_status_follows_the_durable_checkpoints(
    tmp_path: Path, ordered: bool
) -> None:
    storage = Recording(f"file://{tmp_path / 's'}", ordered=ordered)
    engine = Engine(storage)
    # Started by the engine (meta.json written at the start), or unordered batches.
    if ordered:
        finished = await engine.start("w", compile_dag(add.bind(add.bind(1, 2), 3)))
        assert await (await finished) == 6
    else:
        assert await _adopted(storage, engine, "w") == 6
    final, keys = _final(storage, "w")
    assert not _packs(keys, "w"), keys
    earlier = [k for batch in storage.batches[:final] for k in _packs(batch, "w")]
    assert earlier  # every record was durable before the status was written
    assert ["workflows/w/meta.json"] in storage.batches[final:]  # by compare-and-set...
    stored = json.loads((tmp_path / "s" / "workflows" / "w" / "meta.json").read_bytes())
    assert stored["status"] == "SUCCESSFUL"  # ...after the marker
    assert await engine.status("w") == WorkflowStatus.SUCCESSFUL
    await engine.close()


async def test_a_failed_final_batch_leaves_the_workflow_resumable(tmp_path: Path) -> None:
    uri = f"file://{tmp_path / 's'}"
    storage = Recording(uri, fail="status/SUCCESSFUL/")
    engine = Engine(storage)
    with pytest.raises(WorkflowError, match="could not be stored.*RESUMABLE"):
        await _adopted(storage, engine, "w")
    assert not (tmp_path / "s" / "workflows" / "w" / "meta.json").exists()  # no status
    assert not await storage.list("status/SUCCESSFUL/")
    # (The last pack, queued before the status in that batch, may have landed on its
    # own: a failed batch is written again caller by caller, in order.)
    await engine.close()

    # Another engine resumes it once the storage takes writes again.
    engine = Engine(Recording(uri))
    assert await engine.status("w") == WorkflowStatus.RESUMABLE
    assert await (await (await engine.resume("w"))) == 6
    assert await engine.status("w") == WorkflowStatus.SUCCESSFUL
    await engine.close()
