"""Signed records (RAY_WORKFLOWS_SIGNING_KEY): every record is signed when written and
verified before it is unpickled; a changed, moved, unsigned or foreign-key record is a
RecordSignatureError naming its key, and its bytes are never unpickled."""

from __future__ import annotations

import asyncio
import pickle
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from conftest import kill_manager
from helpers import blocked_step, count_runs, step, wait_for
from ray_workflows.backends.s3 import S3Storage
from s3server import S3Server

import ray_workflows as workflow
from ray_workflows._core import config, serialization, signing
from ray_workflows._core.incarnation import NAMESPACE, manager_name
from ray_workflows._core.settings import ENV_SIGNING_KEY, build
from ray_workflows._core.signing import HEADER_BYTES, MAGIC, SignedStorage, SigningKey
from ray_workflows.exceptions import RecordSignatureError
from ray_workflows.storage import Storage, forget_storage, open_storage
from ray_workflows.testing import StorageConformance

SECRET = "test-secret-" + "9f3c" * 10
KEY = SigningKey(SECRET.encode())
OTHER = SigningKey(("other-secret-" + "77ab" * 10).encode())
BIG = 200_000  # above the inline size: the worker writes this output itself


class Plant:
    """Unpickling this creates a file: what an attacker who can write storage plants."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def planted_record(record: bytes, marker: Path) -> bytes:
    """``record`` (an engine record, unsigned) with its payload replaced by a Plant."""
    header, _ = serialization.decode(record)
    meta = {k: v for k, v in header.items() if k not in ("kind", "len", "crc", "refs")}
    return serialization.encode(header["kind"], pickle.dumps(Plant(str(marker))), **meta)


@ray.remote
def blob(n: int) -> bytes:
    return b"x" * n


@ray.remote
def gated_len(data: bytes, gate: str) -> int:
    if not Path(gate).exists():
        raise RuntimeError("not yet")
    return len(data)


@pytest.fixture
def signed_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv(ENV_SIGNING_KEY, SECRET)
    uri = str(tmp_path / "storage")
    workflow.init(uri)
    yield uri
    kill_manager(uri)


@pytest.fixture
def signed_s3(seaweedfs: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv(ENV_SIGNING_KEY, SECRET)
    uri = seaweedfs.uri(f"signed-{uuid.uuid4().hex[:12]}")
    workflow.init(uri)
    yield uri
    kill_manager(uri)


async def raw_records(uri: str) -> dict[str, bytes]:
    """Every record as the backend stores it (no verification)."""
    storage = S3Storage(uri) if uri.startswith("s3://") else open_storage(uri)
    try:
        return {k: await storage.get(k) or b"" for k in await storage.list("")}
    finally:
        if isinstance(storage, S3Storage):
            await storage.close()


@pytest.mark.usefixtures("manager_runs")  # the manager's own recovery after the kill
@pytest.mark.parametrize("where", ["file", "s3"])
def test_signed_workflow_runs_and_resumes(
    where: str, request: pytest.FixtureRequest, wid: str, counter_dir: Path, tmp_path: Path
) -> None:
    uri = request.getfixturevalue(f"signed_{where}")
    gate = tmp_path / "gate"
    runs = str(counter_dir)
    node = step.bind(
        blocked_step.bind(step.bind(0, "s0", runs), "blocked", runs, str(gate)), "s2", runs
    )
    first = workflow.run_async(node, workflow_id=wid)
    wait_for(lambda: count_runs(counter_dir, "blocked") == 1)
    prefix = f"workflows/{wid}/tasks/"  # s0's output is durable before the kill
    wait_for(
        lambda: any(k.startswith(prefix + "1/helpers.step") for k in asyncio.run(raw_records(uri)))
    )
    manager = ray.get_actor(manager_name(uri), namespace=NAMESPACE)
    ray.kill(manager, no_restart=False)  # restarts with no memory; resumes from storage
    gate.touch()
    assert ray.get(first, timeout=120) == 3
    assert count_runs(counter_dir, "s0") == 1  # its stored output was read back, checked
    dag = gated_len.bind(blob.bind(BIG), str(gate))
    assert workflow.run(dag, workflow_id=f"{wid}-big") == BIG
    records = asyncio.run(raw_records(uri))
    data = {k: v for k, v in records.items() if not k.startswith(".rwf-locks/")}
    assert any(k.endswith(".out") for k in data), sorted(data)  # written by a worker
    unsigned = [k for k, v in data.items() if not v.startswith(MAGIC + KEY.key_id.encode())]
    assert not unsigned
    assert not [k for k, v in records.items() if SECRET.encode() in v]


def test_changed_records_are_refused_and_never_unpickled(
    signed_file: str, wid: str, tmp_path: Path
) -> None:
    root, gate, marker = Path(signed_file), tmp_path / "gate", tmp_path / "planted"
    dag = gated_len.options(**workflow.options(max_retries=0)).bind(blob.bind(BIG), str(gate))
    with pytest.raises(workflow.WorkflowExecutionError, match="not yet"):
        workflow.run(dag, workflow_id=wid)
    gate.touch()
    plan = root / "workflows" / wid / "plan"
    (out,) = (root / "workflows" / wid).rglob("*blob*.out")
    signed_plan, signed_out = plan.read_bytes(), out.read_bytes()

    # An unsigned plan, as someone without the key would write it.
    plan.write_bytes(planted_record(signed_plan[HEADER_BYTES:], marker))
    kill_manager(signed_file)  # a new manager reads everything from storage
    with pytest.raises(RecordSignatureError, match=f"workflows/{wid}/plan.*not signed"):
        workflow.resume(wid)
    plan.write_bytes(signed_plan)

    # A signed output whose bytes were changed (the signature kept).
    out.write_bytes(signed_out[:HEADER_BYTES] + planted_record(signed_out[HEADER_BYTES:], marker))
    kill_manager(signed_file)
    with pytest.raises(Exception, match=f"{out.name}.*fails its signature check"):
        workflow.resume(wid)
    assert not marker.exists()

    # The record of another key, copied here with its valid signature.
    out.write_bytes(signed_plan)
    kill_manager(signed_file)
    with pytest.raises(Exception, match=f"{out.name}.*fails its signature check"):
        workflow.resume(wid)

    out.write_bytes(signed_out)
    kill_manager(signed_file)
    assert workflow.resume(wid) == BIG
    assert not marker.exists()


def test_without_a_key_a_planted_plan_runs_code(
    fresh_storage: str, wid: str, tmp_path: Path
) -> None:
    # What the signature prevents: the same planted plan, unsigned storage.
    gate, marker = tmp_path / "gate", tmp_path / "planted"
    dag = gated_len.options(**workflow.options(max_retries=0)).bind(blob.bind(10), str(gate))
    with pytest.raises(workflow.WorkflowExecutionError, match="not yet"):
        workflow.run(dag, workflow_id=wid)
    plan = Path(fresh_storage) / "workflows" / wid / "plan"
    plan.write_bytes(planted_record(plan.read_bytes(), marker))
    kill_manager(fresh_storage)
    with pytest.raises(Exception):  # noqa: B017,PT011 (what it fails with does not matter)
        workflow.resume(wid)
    assert marker.exists()


def test_a_driver_with_another_key_is_refused(
    signed_file: str, wid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert workflow.run(blob.bind(3), workflow_id=wid) == b"xxx"
    monkeypatch.setenv(ENV_SIGNING_KEY, "another-" + "0" * 40)
    with pytest.raises(ValueError, match=r"runs with signing key SigningKey\(id="):
        workflow.init(signed_file)  # reaches the running manager, which refuses it


async def test_moved_foreign_unsigned_and_changed_records_are_refused(tmp_path: Path) -> None:
    uri = str(tmp_path / "store")
    raw = open_storage(uri)
    storage, foreign = SignedStorage(raw, KEY), SignedStorage(raw, OTHER)
    await storage.put("workflows/a/plan", b"payload a")
    assert await storage.get("workflows/a/plan") == b"payload a"
    assert (await raw.get("workflows/a/plan") or b"").startswith(MAGIC)

    await raw.put("workflows/b/plan", await raw.get("workflows/a/plan") or b"")
    with pytest.raises(RecordSignatureError, match="'workflows/b/plan'.*another key") as moved:
        await storage.get("workflows/b/plan")
    assert moved.value.key == "workflows/b/plan" and uri in str(moved.value)
    with pytest.raises(RecordSignatureError, match=f"another key.*{KEY.key_id}.*{OTHER.key_id}"):
        await foreign.get("workflows/a/plan")
    await raw.put("workflows/c/plan", b"an old unsigned record")
    with pytest.raises(RecordSignatureError, match="'workflows/c/plan'.*not signed.*new storage"):
        await storage.get("workflows/c/plan")
    signed = await raw.get("workflows/a/plan") or b""
    await raw.put("workflows/a/plan", signed[:-1] + b"A")
    with pytest.raises(RecordSignatureError, match="fails its signature check"):
        await storage.get("workflows/a/plan")
    # Without the key, a signed record is refused as such, not taken for a torn one
    # (whose task would run again and replace it).
    record = await raw.get("workflows/b/plan") or b""
    with pytest.raises(RecordSignatureError, match="'workflows/b/plan' is signed.*no signing key"):
        serialization.decode(record, "'workflows/b/plan'")
    # A conditional write compares the bytes it signs with the stored ones.
    assert await storage.compare_and_set("lease", None, b"1")
    assert not await storage.compare_and_set("lease", b"0", b"2")
    assert await storage.compare_and_set("lease", b"1", b"2")
    assert await storage.get("lease") == b"2"
    assert not await foreign.compare_and_set("lease", b"2", b"3")  # another key's "2"
    forget_storage(uri)


def test_the_key_is_never_shown_nor_pickled_with_the_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = str(tmp_path / "store")
    monkeypatch.setenv(ENV_SIGNING_KEY, SECRET)
    settings = build(uri)
    assert settings.signing_key == KEY
    signing.use(uri, settings.signing_key)
    try:
        storage = signing.engine_storage(uri)
        assert isinstance(storage, SignedStorage) and storage.key.key_id == KEY.key_id
        pickled = pickle.dumps(storage)
        shown = [repr(settings), repr(storage), repr(KEY), str(settings), pickled.decode("latin1")]
        assert not [text for text in shown if SECRET in text]
        assert KEY.key_id in repr(storage)
        assert pickle.loads(pickled) is storage
    finally:
        signing.use(uri, None)
    with pytest.raises(RecordSignatureError, match=f"key id {KEY.key_id}.*no such key"):
        pickle.loads(pickled)  # a process without the key does not read unchecked


def test_a_short_key_is_refused_without_showing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_SIGNING_KEY, "tooshort")
    with pytest.raises(ValueError, match=f"{ENV_SIGNING_KEY} must be .* at least 32") as bad:
        config.configure(str(tmp_path))
    assert "tooshort" not in str(bad.value)


class TestSignedMemoryStorage(StorageConformance):
    @pytest.fixture
    async def storage(self) -> AsyncIterator[Storage]:
        uri = f"memory://signed-{uuid.uuid4().hex}"
        signing.use(uri, KEY)
        storage = signing.engine_storage(uri)
        assert isinstance(storage, SignedStorage)
        yield storage
        signing.use(uri, None)
        await storage.close()
        forget_storage(uri)
