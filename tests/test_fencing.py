"""Fencing: a runner whose writes stall past its lease changes nothing once another
runner took the workflow over, on file storage and on S3.

Runner A is a real engine whose storage holds every write back while a gate is shut
(a storage that stalls, as a paused process or a slow S3 does). Runner B, a second
engine on the same storage, takes the workflow over once A's lease has run out and
finishes it. Then A's gate opens and everything A queued lands, or tries to.

The S3 variants run against real S3-compatible servers on loopback (SeaweedFS and
moto, see s3server), started once per session by the fixtures below.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import ray
import s3server
from helpers import count_runs, record_run
from ray_workflows.backends.s3 import preload_models
from s3server import S3Server

from ray_workflows._core.compiler import compile_dag
from ray_workflows._core.engine import Engine
from ray_workflows._core.keys import lease_key
from ray_workflows._core.status import WorkflowStatus
from ray_workflows._core.store import decode_pack
from ray_workflows.exceptions import WorkflowRunningElsewhereError
from ray_workflows.storage import Storage, forget_storage, open_storage

# Before the session's ray.init (collection comes first), so Ray workers inherit it
# (conftest does the same; this keeps the module self-contained).
s3server.configure_aws_environment()
# botocore's S3 models, loaded now rather than by the first client inside the test:
# on a busy machine that takes seconds, and A's lease lasts 1.5 s.
preload_models()

STORAGES = ["file", "seaweedfs", "moto"]
#: Both runners' lease ttl. A holds its lease only while it renews it every ttl / 3
#: and each renewal lands before ttl * 0.8: short, and a busy machine (a stalled loop,
#: a slow fsync) loses it before the test shuts A's gate. B waits out whatever A's
#: lease has left once the gate is shut, at most this long.
LEASE_TTL = 4.0


@pytest.fixture(params=STORAGES)
async def shared_uri(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URI of a fresh, empty storage both runners share: a directory of this
    test's own, or a prefix of its own in the bucket of a session's S3 server."""
    if request.param == "file":
        yield f"file://{tmp_path / 'shared'}"
        return
    server: S3Server = request.getfixturevalue(request.param)
    uri = server.uri(f"fencing-{uuid.uuid4().hex[:12]}")
    yield uri
    storage = open_storage(uri)
    await storage.delete_prefix("")
    await storage.close()
    forget_storage(uri)


# Set inside a gated call: the calls a backend makes to itself (S3's put_many calls
# put for each key) pass, so a batch waits at its start as a whole, never halfway.
_inside_gate: contextvars.ContextVar[bool] = contextvars.ContextVar("inside_gate", default=False)

_GATED = (
    "put",
    "put_many",
    "put_if_absent",
    "put_if_absent_many",
    "compare_and_set",
    "delete",
    "delete_many",
    "discard_many",
    "delete_prefix",
)


def _gated(name: str) -> Callable[..., Awaitable[Any]]:
    async def method(self: Any, *args: Any) -> Any:
        call = getattr(super(type(self), self), name)
        if _inside_gate.get():
            return await call(*args)
        await self.gate.wait()
        token = _inside_gate.set(True)
        try:
            return await call(*args)
        finally:
            _inside_gate.reset(token)

    method.__name__ = name
    return method


def stalling(uri: str) -> Any:
    """A new instance of the real storage class behind ``uri`` (``FileStorage``,
    ``S3Storage``), whose writes wait while its ``gate`` is clear. Reads pass."""
    base = type(open_storage(uri))
    cls = type(f"Stalling{base.__name__}", (base,), {n: _gated(n) for n in _GATED})
    storage = cls(uri)
    storage.gate = asyncio.Event()
    storage.gate.set()
    return storage


@ray.remote
def first(runs: str) -> int:
    record_run(runs, "first")
    return 1


@ray.remote
def last(x: int, runs: str, started: str, gate_shut: str) -> int:
    """Returns how many times it has run: A's attempt says 1, B's says 2. It ends only
    once A's gate is shut (at once for B's attempt), so A's result always stalls."""
    record_run(runs, "last")
    Path(started).touch()
    deadline = time.monotonic() + 60
    while not Path(gate_shut).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return x + 10 * count_runs(runs, "last")


async def _wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def lease_record(storage: Storage) -> dict[str, Any]:
    raw = await storage.get(lease_key("w"))
    assert raw is not None
    record: dict[str, Any] = json.loads(raw)
    return record


async def packed_tasks(storage: Storage, prefix: str) -> set[str]:
    """The tasks in every pack stored under ``prefix``, read through the storage."""
    tasks: set[str] = set()
    for key in await storage.list(prefix):
        if key.endswith(".pack"):
            data = await storage.get(key)
            if data is not None:
                tasks.update(decode_pack(data, key))
    return tasks


async def test_a_stalled_runner_changes_nothing_after_a_takeover(
    shared_uri: str, tmp_path: Path, counter_dir: Path
) -> None:
    uri = shared_uri
    runs, started = str(counter_dir), str(tmp_path / "last-started")
    gate_shut = tmp_path / "gate-shut"
    storage = open_storage(uri)  # the plain storage, as B, readers and workers open it
    stalled = stalling(uri)
    engines = [a := Engine(stalled, lease_ttl=LEASE_TTL)]
    try:
        # Connect both before A takes its lease: a first S3 client costs a moment (more
        # on a busy machine), which must not eat into A's lease.
        await stalled.list("workflows/w/")
        await storage.list("workflows/w/")
        # A runs the workflow; its writes stall from the moment its last task starts,
        # so its last output, its final status and its lease renewals all wait in the
        # gate.
        dag = compile_dag(last.bind(first.bind(runs), runs, started, str(gate_shut)))
        finished_a = await a.start("w", dag)
        epoch_1 = "workflows/w/tasks/1/"

        async def first_is_stored() -> bool:
            if not Path(started).exists():
                return False
            return "test_fencing.first" in await packed_tasks(storage, epoch_1)

        await _wait_for(first_is_stored)
        stalled.gate.clear()
        gate_shut.touch()  # A's `last` ends now; its result waits in the gate
        held = await lease_record(storage)
        assert held["epoch"] == 1 and held["expires_at"] > time.time(), (
            f"A lost its lease before its writes stalled (a stalled loop?): {held}"
        )

        # A's lease runs out (its renewals stall); B takes the workflow over, ends it.
        async def lease_expired() -> bool:
            return float((await lease_record(storage))["expires_at"]) < time.time()

        await _wait_for(lease_expired)
        engines.append(b := Engine(storage, lease_ttl=LEASE_TTL))
        finished_b = await b.resume("w")
        assert await (await finished_b) == 21  # B's run of `last`: 1 + 10 * 2
        meta_b = await storage.get("workflows/w/meta.json")
        assert meta_b is not None
        assert json.loads(meta_b)["lease_epoch"] == 2
        records_b = await b.store.task_records("w")

        # A wakes up: whatever it queued now lands, or tries to.
        stalled.gate.set()
        try:
            outcome: Any = await asyncio.wait_for(await_ref(finished_a), 30)
        except WorkflowRunningElsewhereError as exc:
            outcome = exc
        assert isinstance(outcome, WorkflowRunningElsewhereError), outcome
        # B's status stands, byte for byte, and so do B's records.
        assert await storage.get("workflows/w/meta.json") == meta_b
        assert await b.status("w") == WorkflowStatus.SUCCESSFUL
        assert await (await b.output("w")) == 21
        engines.append(reader := Engine(storage))
        assert await reader.status("w") == WorkflowStatus.SUCCESSFUL
        assert await (await reader.output("w")) == 21
        records = await reader.store.task_records("w")
        assert dict(records.where) == dict(records_b.where)  # A's late records do not count
        # A's late output is stored, under its old epoch, where no reader looks.
        late_tasks = await packed_tasks(storage, epoch_1)
        assert "test_fencing.last" in late_tasks, late_tasks
        # The task that finished before the takeover ran once; the one in flight twice.
        assert count_runs(runs, "first") == 1
        assert count_runs(runs, "last") == 2
    finally:
        stalled.gate.set()  # a failed run must not leave A's writes waiting forever
        for engine in engines:
            await engine.close()


async def await_ref(finished: asyncio.Future[Any]) -> Any:
    return await (await finished)
