"""A cluster incarnation is named by Ray's cluster id, never by an address.

A manager takes over at once the live leases of owners that share its lineage
(``<cluster token>|<manager name>|``): earlier incarnations of itself in the same
cluster, dead since Ray restarted it. Two clusters whose GCS address strings coincide
(Docker's default bridge address, identical pod ranges in two Kubernetes clusters)
have different tokens, so neither takes the other's leases.

Two clusters cannot share a real address on one machine, so the lease tests run two
real engines in this process on one real file storage with the lineages two such
clusters' managers build, as tests/test_leases_engine.py does.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest
import ray
from clusters import base_env, marked
from helpers import blocked_step, count_runs, step, wait_for

from ray_workflows._core import bridge, config, incarnation
from ray_workflows._core.compiler import compile_dag
from ray_workflows._core.engine import Engine
from ray_workflows._core.incarnation import cluster_token, lineage
from ray_workflows._core.keys import lease_key
from ray_workflows._core.manager import manager_name
from ray_workflows._core.status import WorkflowStatus
from ray_workflows.exceptions import WorkflowRunningElsewhereError
from ray_workflows.storage import forget_storage, open_storage


def _tokens() -> dict[str, str]:
    return {"token": cluster_token(), "again": cluster_token()}


@ray.remote
def token_in_task() -> dict[str, str]:
    return _tokens()


@ray.remote
class TokenActor:
    def token(self) -> dict[str, str]:
        return _tokens()

    def own_token(self) -> str:
        return incarnation._own_token()


@ray.remote
def own_token_in_task() -> str:
    return incarnation._own_token()


def _slow_dag(name: str, runs: str, gate: str) -> object:
    first = step.bind(0, f"{name}-a", runs)
    return step.bind(blocked_step.bind(first, f"{name}-b", runs, gate), f"{name}-c", runs)


# -- the token -------------------------------------------------------------------------
def test_the_token_is_one_per_cluster_in_driver_task_and_actor() -> None:
    driver = _tokens()
    task = ray.get(token_in_task.remote())
    actor = TokenActor.remote()
    try:
        in_actor = ray.get(actor.token.remote())
    finally:
        ray.kill(actor)
    assert driver["token"] == driver["again"] == task["token"] == task["again"]
    assert in_actor["token"] == in_actor["again"] == driver["token"]
    # Ray's cluster id (28 random bytes the GCS drew), read without a call: the same
    # bytes as the GCS's own record, which a process without that copy reads instead.
    assert len(driver["token"]) == 56 and int(driver["token"], 16) > 0
    assert incarnation._stored_cluster_id() == driver["token"]
    # Nothing of the address in it.
    address = ray.get_runtime_context().gcs_address
    assert address.split(":")[0] not in driver["token"]


def test_the_fallback_token_is_created_once_and_read_by_every_process() -> None:
    # Where Ray keeps no cluster id: put-if-absent in Ray's KV, then read back.
    actor = TokenActor.remote()
    try:
        tokens = ray.get(
            [own_token_in_task.remote() for _ in range(4)] + [actor.own_token.remote()]
        )
    finally:
        ray.kill(actor)
    tokens.append(incarnation._own_token())
    assert len(set(tokens)) == 1 and len(tokens[0]) == 32 and int(tokens[0], 16) >= 0


def test_another_cluster_has_another_token(tmp_path: Path) -> None:
    # A second, real cluster (ray.init in a process of its own, with a Ray of its own).
    root = tempfile.mkdtemp(prefix="r", dir="/tmp")
    script = tmp_path / "other.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, ray
            from ray_workflows._core.incarnation import cluster_token
            ray.init(address="local", num_cpus=1, include_dashboard=False,
                     log_to_driver=False, _temp_dir={root!r})
            print("RESULT " + json.dumps({{"token": cluster_token(),
                  "gcs": ray.get_runtime_context().gcs_address}}), flush=True)
            ray.shutdown()
            """
        )
    )
    marker = f"incarnation-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=base_env(RWF_CLUSTER=marker),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=180)
    finally:
        # Only the processes this test started (they carry its marker), by pid.
        for pid in marked(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    lines = [line for line in out.decode().splitlines() if line.startswith("RESULT ")]
    assert lines, out.decode()[-3000:]
    other = json.loads(lines[-1][len("RESULT ") :])
    assert other["token"] != cluster_token()
    assert len(other["token"]) == 56


def test_a_lineage_is_token_then_manager_and_its_parts_cannot_hold_the_separator() -> None:
    token = cluster_token()
    assert lineage("manager-0123") == f"{token}|manager-0123|"
    assert lineage("manager-0123", "ab") == "ab|manager-0123|"
    # No lineage is a prefix of another's: "ab|m|" never starts "abc|m|" or "ab|m2|".
    assert not lineage("m", "abc").startswith(lineage("m", "ab"))
    assert not lineage("m2", "ab").startswith(lineage("m", "ab"))
    for bad_token, bad_manager in (("a|b", "m"), ("ab", "m|x"), ("", "m"), ("ab", "")):
        with pytest.raises(ValueError, match="lineage"):
            lineage(bad_manager, bad_token)


def test_the_manager_names_its_lease_owner_by_cluster_token(storage: str) -> None:
    cfg = config.current()
    bridge.run(config.manager(cfg))
    info = config.described(cfg)
    assert info is not None
    prefix = lineage(manager_name(config.normalise_storage(storage)))
    assert info["owner"].startswith(prefix)
    assert ray.get_runtime_context().gcs_address not in info["owner"]
    # The caller-start tests find the lineage as everything up to the last "|".
    assert info["owner"].rsplit("|", 1)[0] + "|" == prefix


# -- leases across clusters at one address -------------------------------------------
async def test_two_clusters_at_one_address_never_take_each_others_leases(
    tmp_path: Path, counter_dir: Path
) -> None:
    uri = str(tmp_path / "shared")
    name = manager_name(uri)  # both clusters' managers serve this storage: the same name
    # Two heads at Docker's default bridge address: before, both managers built
    # "172.17.0.2:6379|<name>|", one lineage for two clusters. Now their ids differ.
    here, there = lineage(name), lineage(name, secrets.token_hex(28))
    assert here != there and not here.startswith(there) and not there.startswith(here)

    storage = open_storage(uri)
    runs, gate = str(counter_dir), str(tmp_path / "gate")
    # A ttl far above the test's length: any takeover seen here would be at once,
    # through the lineage, never through an expiry.
    a = Engine(storage, owner_prefix=here, lease_ttl=60)
    b = Engine(storage, owner_prefix=there, lease_ttl=60)
    try:
        done_a = await a.start("wa", compile_dag(_slow_dag("wa", runs, gate)))
        done_b = await b.start("wb", compile_dag(_slow_dag("wb", runs, gate)))
        await asyncio.to_thread(
            wait_for, lambda: count_runs(counter_dir, "wa-b") and count_runs(counter_dir, "wb-b")
        )
        before = {wid: _lease(tmp_path, wid) for wid in ("wa", "wb")}
        assert before["wa"]["owner"] == a.leases.owner and before["wb"]["owner"] == b.leases.owner

        # Each manager's sweep, more than once: nothing of the other is resumed here.
        for _ in range(3):
            assert await a.resume_all() == []
            assert await b.resume_all() == []
        # Each sees the other's workflow running elsewhere, not RESUMABLE.
        assert await a.status("wb") == WorkflowStatus.RUNNING
        assert await b.status("wa") == WorkflowStatus.RUNNING
        with pytest.raises(WorkflowRunningElsewhereError):
            await a.resume("wb")
        with pytest.raises(WorkflowRunningElsewhereError):
            await b.resume("wa")
        assert set(a.leases.held) == {"wa"} and set(b.leases.held) == {"wb"}
        assert {wid: _lease(tmp_path, wid) for wid in ("wa", "wb")} == before

        Path(gate).touch()
        assert await (await asyncio.wait_for(done_a, 60)) == 3
        assert await (await asyncio.wait_for(done_b, 60)) == 3
        for wid in ("wa", "wb"):
            for task in "abc":
                assert count_runs(counter_dir, f"{wid}-{task}") == 1, (wid, task)
        assert _lease(tmp_path, "wa")["owner"] == a.leases.owner
        assert _lease(tmp_path, "wb")["owner"] == b.leases.owner
        assert all(_lease(tmp_path, wid)["epoch"] == 1 for wid in ("wa", "wb"))
    finally:
        Path(gate).touch()
        await a.close()
        await b.close()
        forget_storage(storage.uri)


async def test_a_restarted_manager_in_the_same_cluster_takes_over_at_once(
    tmp_path: Path, counter_dir: Path
) -> None:
    uri = str(tmp_path / "shared")
    prefix = lineage(manager_name(uri))  # the same cluster, the same manager
    storage = open_storage(uri)
    runs, gate = str(counter_dir), str(tmp_path / "gate")
    old = Engine(storage, owner_prefix=prefix, lease_ttl=60)
    new = None
    try:
        held = await old.start("w", compile_dag(_slow_dag("w", runs, gate)))
        await asyncio.to_thread(wait_for, lambda: count_runs(counter_dir, "w-b") > 0)
        # The old incarnation dies without a word (as a killed actor): no renewal, no
        # release, no further writes; its lease stays live for another minute.
        assert old.leases._keeper is not None
        old.leases._keeper.cancel()
        old.leases.held["w"].lost = True
        old.runs["w"].abandon(WorkflowRunningElsewhereError("simulated death"))
        with pytest.raises(WorkflowRunningElsewhereError):
            await held
        stale = _lease(tmp_path, "w")
        assert stale["owner"] == old.leases.owner and not stale["released"]

        # Ray restarts the actor: a new owner id of the same lineage, whose first sweep
        # takes the live lease over at once, long before it would expire.
        new = Engine(storage, owner_prefix=prefix, lease_ttl=60)
        assert new.leases.owner != old.leases.owner
        assert await new.status("w") == WorkflowStatus.RESUMABLE
        assert await new.resume_all() == ["w"]
        taken = _lease(tmp_path, "w")
        assert (taken["owner"], taken["epoch"]) == (new.leases.owner, stale["epoch"] + 1)
        assert taken["acquired_at"] < stale["expires_at"]
        Path(gate).touch()
        ref = await asyncio.wait_for(new.result("w"), timeout=60)
        assert await ref == 3
        assert count_runs(counter_dir, "w-a") == 1  # done before the death: never again
        assert count_runs(counter_dir, "w-b") in (1, 2)  # in flight when it died
        assert count_runs(counter_dir, "w-c") == 1
    finally:
        Path(gate).touch()
        await old.close()
        if new is not None:
            await new.close()
        forget_storage(storage.uri)


def _lease(root: Path, wid: str) -> dict[str, object]:
    record: dict[str, object] = json.loads((root / "shared" / lease_key(wid)).read_bytes())
    return record
