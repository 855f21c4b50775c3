"""Finished tasks never run again: real kills, counted through files."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
import ray
from helpers import count_runs, record_run, wait_for

import ray_workflows as workflow
from ray_workflows._core import config, serialization
from ray_workflows._core.manager import NAMESPACE, manager_name
from ray_workflows._core.store import decode_pack


@ray.remote
def step(x: int, i: int, runs: str, delay: float) -> int:
    time.sleep(delay)
    record_run(runs, f"step{i}")
    return x + 1


@ray.remote
def slow_victim(x: int, runs: str, pid_file: str) -> int:
    record_run(runs, "victim-start")
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(30 if count_runs(runs, "victim-start") == 1 else 0)
    record_run(runs, "victim")
    return x * 10


def _durable_outputs(storage: str, wid: str) -> set[str]:
    """The tasks whose outputs are on disk now: in packs, or in records of their own."""
    found: set[str] = set()
    for path in Path(storage, "workflows", wid, "tasks").glob("*/*"):
        if path.suffix == ".out":
            found.add(path.stem)
        elif path.suffix == ".pack":
            with contextlib.suppress(Exception):  # a pack being written
                found |= set(decode_pack(path.read_bytes(), str(path)))
    return found


def _chain(n: int, runs: Path, delay: float) -> object:
    node: object = 0
    for i in range(n):
        node = step.bind(node, i, str(runs), delay)
    return node


@pytest.mark.parametrize("runs_in", ["host", "manager"])
def test_worker_killed_mid_task_is_retried_and_finished_tasks_do_not_rerun(
    storage: str,
    wid: str,
    counter_dir: Path,
    tmp_path: Path,
    runs_in: str,
    request: pytest.FixtureRequest,
) -> None:
    # Hosted, the task runs in the host's own process: killing it kills the host.
    request.getfixturevalue("hosted_runs" if runs_in == "host" else "manager_runs")
    pid_file = tmp_path / "victim.pid"
    dag = slow_victim.bind(_chain(3, counter_dir, 0.0), str(counter_dir), str(pid_file))
    ref = workflow.run_async(dag, workflow_id=wid)
    wait_for(pid_file.exists)
    # Finished means durable: an output still on its way to storage when its process
    # dies is lost with it, and its task runs again (docs/performance.md). The victim
    # sleeps 30 s: time for the three outputs to land before it is killed.
    steps = {"test_durability.step", "test_durability.step_1", "test_durability.step_2"}
    wait_for(lambda: steps <= _durable_outputs(storage, wid))
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert ray.get(ref, timeout=120) == 30
    assert count_runs(counter_dir, "victim-start") == 2
    assert count_runs(counter_dir, "victim") == 1
    for i in range(3):
        assert count_runs(counter_dir, f"step{i}") == 1


@pytest.mark.usefixtures("manager_runs")  # the manager's own recovery
def test_manager_killed_mid_workflow_resumes_without_rerunning(
    fresh_storage: str, wid: str, counter_dir: Path
) -> None:
    n = 50  # the issue: a 50-task workflow
    ref = workflow.run_async(_chain(n, counter_dir, 0.1), workflow_id=wid)
    wait_for(lambda: count_runs(counter_dir, "step9") == 1)
    manager = ray.get_actor(
        manager_name(config.normalise_storage(fresh_storage)), namespace=NAMESPACE
    )
    ray.kill(manager, no_restart=False)  # the actor restarts, with no memory of the run
    # Ray replays the in-flight `run` call on the restarted manager, which finds the
    # workflow in storage and resumes it from its checkpoints.
    assert ray.get(ref, timeout=120) == n
    assert workflow.get_status(wid) == workflow.SUCCESSFUL
    assert workflow.resume(wid) == n  # resuming a finished workflow re-runs nothing
    counts = [count_runs(counter_dir, f"step{i}") for i in range(n)]
    # Every task whose output was committed ran once. The one task in flight when the
    # manager died (its output reported but not yet in a pack, or not yet reported)
    # may have run twice; in a chain there is at most one such task.
    assert all(c in (1, 2) for c in counts), counts
    assert sum(c == 2 for c in counts) <= 1, counts


def test_torn_checkpoint_is_never_read_as_an_output(
    storage: str, wid: str, counter_dir: Path
) -> None:
    # Steps of 0.1 s: each output lands in a pack of its own (a pack gathers 20 ms).
    assert workflow.run(_chain(3, counter_dir, 0.1), workflow_id=wid) == 3
    # Small outputs are committed in packs, several per write; a torn pack loses
    # every output in it, and only those. Tear the one holding the last step.
    packs = sorted(Path(storage, "workflows", wid, "tasks").glob("*/*.pack"))
    members = {p: set(decode_pack(p.read_bytes(), str(p))) for p in packs}
    [out] = [p for p, tids in members.items() if "test_durability.step_2" in tids]
    lost = members[out]
    record = out.read_bytes()
    assert serialization.decode(record)[0]["kind"] == "pack"
    out.write_bytes(record[: len(record) - 3])  # as a torn, non-atomic write would leave it
    with pytest.raises(workflow.exceptions.CheckpointError):
        serialization.decode(out.read_bytes(), str(out))
    # Make the stored workflow look interrupted, as after a crash of its manager.
    meta = Path(storage, "workflows", wid, "meta.json")
    meta.write_text(meta.read_text().replace('"SUCCESSFUL"', '"RUNNING"'))
    assert workflow.resume(wid) == 3
    # The torn output was discarded and its task ran again; its inputs came from
    # their intact checkpoints.
    ids = ["test_durability.step", "test_durability.step_1", "test_durability.step_2"]
    assert len(packs) > 1 and "test_durability.step" not in lost
    expected = [2 if tid in lost else 1 for tid in ids]
    assert [count_runs(counter_dir, f"step{i}") for i in range(3)] == expected


@ray.remote
def leaf_value(i: int, runs: str) -> int:
    record_run(runs, f"leaf{i}")
    return i


@ray.remote
def picky_sum(*values: int, gate: str) -> int:
    if not Path(gate).exists():
        raise RuntimeError("not yet")
    return sum(values)


def test_resumed_fan_in_loads_its_stored_inputs_in_batches(
    storage: str, wid: str, counter_dir: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    runs = str(counter_dir)
    leaves = [leaf_value.bind(i, runs) for i in range(60)]
    dag = picky_sum.options(**workflow.options(max_retries=0)).bind(*leaves, gate=str(gate))
    with pytest.raises(workflow.WorkflowExecutionError, match="not yet"):
        workflow.run(dag, workflow_id=wid)
    gate.touch()
    # All 60 inputs come back from storage (a few loading tasks, not 60 workers).
    assert workflow.resume(wid) == sum(range(60))
    assert all(count_runs(counter_dir, f"leaf{i}") == 1 for i in range(60))
