"""Direct runs (ray_workflows.direct): a small chain run by one Ray task its caller
submits, with the records, statuses and failure handling of a run by the manager."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import ray
from helpers import count_runs, lease_owner, lease_record, record_run, status_keys, wait_for

import ray_workflows as workflow
from ray_workflows import direct

MOD = __name__


@ray.remote
def step(x: int, runs: str, name: str) -> int:
    record_run(runs, name)
    return x + 1


@ray.remote
def flaky(x: int, runs: str, gate: str) -> int:
    record_run(runs, "flaky")
    if not os.path.exists(gate):
        raise ValueError("not yet")
    return x * 10


@ray.remote
def continues(x: int, runs: str) -> object:
    record_run(runs, "continues")
    return workflow.continuation(step.bind(x, runs, "continued"))


def test_a_small_chain_runs_directly_and_is_stored_as_the_manager_stores_it(
    storage: str, wid: str, counter_dir: Path
) -> None:
    runs = str(counter_dir)
    dag = step.bind(step.bind(step.bind(0, runs, "a"), runs, "b"), runs, "c")
    ref = workflow.run_async(dag, workflow_id=wid, metadata={"k": 1})
    assert isinstance(ref, ray.ObjectRef)
    assert ray.get(ref, timeout=60) == 3
    assert lease_owner(storage, wid).startswith("direct:")
    assert [count_runs(counter_dir, n) for n in "abc"] == [1, 1, 1]
    assert workflow.get_status(wid) == workflow.SUCCESSFUL
    assert workflow.get_output(wid) == 3
    assert workflow.get_output(wid, task_id=f"{MOD}.step_1") == 2
    meta = workflow.get_metadata(wid)
    assert meta["status"] == "SUCCESSFUL" and meta["user_metadata"] == {"k": 1}
    assert meta["stats"]["end_time"] >= meta["stats"]["start_time"]
    task = workflow.get_metadata(wid, task_id=f"{MOD}.step")
    assert task["stats"]["end_time"] >= task["stats"]["start_time"]
    # One status marker, as after a run by the manager.
    assert status_keys(storage, wid) == [f"status/SUCCESSFUL/{wid}"]
    assert (wid, workflow.SUCCESSFUL) in workflow.list_all()
    assert workflow.resume(wid) == 3  # finished: nothing runs again
    assert [count_runs(counter_dir, n) for n in "abc"] == [1, 1, 1]
    workflow.delete(wid)  # at once, though the direct run's lease has not expired
    with pytest.raises(workflow.WorkflowNotFoundError):
        workflow.get_status(wid)


def test_what_is_not_a_plain_chain_goes_to_the_manager(
    storage: str, wid: str, counter_dir: Path
) -> None:
    runs = str(counter_dir)
    fan_in = step.bind(step.bind(0, runs, "x"), runs, "y")
    plans = {
        "fan-in": (
            ray.remote(lambda a, b: a + b).bind(step.bind(0, runs, "p"), step.bind(0, runs, "q")),
            2,
        ),
        "resources": (step.options(num_cpus=0.5).bind(0, runs, "r"), 1),
        "no-checkpoint": (
            step.options(**workflow.options(checkpoint=False)).bind(0, runs, "n"),
            1,
        ),
        "chain": (fan_in, 2),
    }
    plans["one task"] = (step.bind(0, runs, "one"), 1)  # most often a dynamic root
    for name, (dag, expected) in plans.items():
        assert workflow.run(dag, workflow_id=f"{wid}-{name}") == expected
        owner = lease_owner(storage, f"{wid}-{name}")
        assert owner.startswith("direct:") == (name == "chain"), (name, owner)


def test_direct_runs_can_be_turned_off(
    storage: str, wid: str, counter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(direct.ENV_DIRECT, "0")
    runs = str(counter_dir)
    assert workflow.run(step.bind(step.bind(0, runs, "a"), runs, "b"), workflow_id=wid) == 2
    assert not lease_owner(storage, wid).startswith("direct:")


def test_a_failing_task_is_retried_as_its_options_say_then_fails_and_resumes(
    storage: str, wid: str, counter_dir: Path, tmp_path: Path
) -> None:
    runs, gate = str(counter_dir), str(tmp_path / "gate")
    opts = workflow.options(max_retries=2, retry_exceptions=True)
    dag = flaky.options(**opts).bind(step.bind(1, runs, "first"), runs, gate)
    with pytest.raises(workflow.WorkflowExecutionError) as info:
        ray.get(workflow.run_async(dag, workflow_id=wid), timeout=60)
    assert "ValueError: not yet" in str(info.value)
    assert count_runs(counter_dir, "flaky") == 3  # one attempt and two retries
    assert lease_owner(storage, wid).startswith("direct:")
    assert workflow.get_status(wid) == workflow.FAILED
    assert "not yet" in workflow.get_metadata(wid)["error"]
    Path(gate).touch()
    assert workflow.resume(wid) == 20  # resumable at once: its lease was released
    assert count_runs(counter_dir, "first") == 1  # its output was stored
    assert count_runs(counter_dir, "flaky") == 4


def test_a_caught_error_is_the_durable_result(storage: str, wid: str, tmp_path: Path) -> None:
    runs, gate = str(tmp_path), str(tmp_path / "never")
    dag = flaky.options(**workflow.options(catch_exceptions=True)).bind(
        step.bind(0, runs, "first"), runs, gate
    )
    value, error = workflow.run(dag, workflow_id=wid)
    assert value is None and isinstance(error, ValueError)
    assert lease_owner(storage, wid).startswith("direct:")
    value, error = workflow.get_output(wid)  # the same, from storage
    assert value is None and isinstance(error, ValueError)
    assert count_runs(tmp_path, "flaky") == 1


def test_a_continuation_goes_on_in_the_manager_without_running_its_task_again(
    storage: str, wid: str, counter_dir: Path
) -> None:
    runs = str(counter_dir)
    dag = continues.bind(step.bind(1, runs, "before"), runs)
    assert workflow.run(dag, workflow_id=wid) == 3
    assert [count_runs(counter_dir, n) for n in ("before", "continues", "continued")] == [1, 1, 1]
    assert workflow.get_status(wid) == workflow.SUCCESSFUL


def test_a_failed_checkpoint_write_fails_the_workflow_and_it_resumes(
    faulty: tuple[str, Path], counter_dir: Path
) -> None:
    uri, control = faulty
    runs = str(counter_dir)
    dag = step.bind(step.bind(0, runs, "a"), runs, "b")
    control.write_text(json.dumps({"fail": r"tasks/[^/]*\.pack$"}))
    with pytest.raises(workflow.WorkflowExecutionError) as info:
        workflow.run(dag, workflow_id="w")
    assert "injected write failure" in str(info.value)
    assert type(info.value.__cause__).__name__ == "StorageError"
    assert workflow.get_status("w") == workflow.FAILED
    assert lease_owner(uri, "w").startswith("direct:")
    control.write_text("{}")
    assert workflow.resume("w") == 2


def test_cancel_between_tasks_stops_the_chain(
    storage: str, wid: str, counter_dir: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"

    started = tmp_path / "started"
    runs = str(counter_dir)
    dag = step.bind(_waits.bind(0, str(gate), str(started)), runs, "after")
    ref = workflow.run_async(dag, workflow_id=wid)
    wait_for(started.exists)
    assert lease_owner(storage, wid).startswith("direct:")
    workflow.cancel(wid)  # returns once the run has stopped
    assert workflow.get_status(wid) == workflow.CANCELED
    gate.touch()
    with pytest.raises(workflow.WorkflowCancellationError):
        ray.get(ref, timeout=30)
    assert count_runs(counter_dir, "after") == 0
    assert status_keys(storage, wid) == [f"status/CANCELED/{wid}"]


@ray.remote
def _waits(x: int, gate: str, started: str) -> int:
    Path(started).touch()
    deadline = time.monotonic() + 0.8  # below the cancel poll: it ends by itself
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x


@ray.remote
def dies(x: int, runs: str, name: str, times: int) -> int:
    record_run(runs, name)
    if count_runs(runs, name) <= times:
        os._exit(1)  # the worker dies, as if killed
    return x + 1


def test_worker_deaths_are_charged_to_the_task_that_died(
    storage: str, wid: str, counter_dir: Path
) -> None:
    runs = str(counter_dir)
    opts = workflow.options(max_retries=2)
    # a's worker dies twice, b's once: each within its own max_retries, though Ray's
    # own count of attempts of the one direct task reaches three.
    dag = dies.options(**opts).bind(dies.options(**opts).bind(0, runs, "a", 2), runs, "b", 1)
    assert ray.get(workflow.run_async(dag, workflow_id=wid), timeout=120) == 2
    assert [count_runs(counter_dir, n) for n in "ab"] == [3, 2]
    assert lease_owner(storage, wid).startswith("direct:")
    assert workflow.get_status(wid) == workflow.SUCCESSFUL


def test_a_task_killing_its_worker_too_often_fails_the_workflow(
    storage: str, wid: str, counter_dir: Path
) -> None:
    runs = str(counter_dir)
    opts = workflow.options(max_retries=1)
    dag = dies.options(**opts).bind(step.bind(0, runs, "s"), runs, "d", 9)
    with pytest.raises(workflow.WorkflowExecutionError) as info:
        ray.get(workflow.run_async(dag, workflow_id=wid), timeout=120)
    assert "died" in str(info.value)
    # One attempt and one retry; and one run more when the first death is charged to
    # "s" (its output was not committed yet), as the scheduler charges a fused pair's
    # death to the producer. From then on each death is charged to the task that died.
    assert count_runs(counter_dir, "d") in (2, 3)
    assert workflow.get_status(wid) == workflow.FAILED


def test_dead_owners_are_those_of_ended_jobs_restarted_clusters_or_given_up(
    storage: str,
) -> None:
    dead = direct.DeadOwners()
    mine = direct.owner_id()
    ctx = ray.get_runtime_context()
    gcs, session, job, rest = mine[len("direct:") :].split("|", 3)
    assert (gcs, job) == (ctx.gcs_address, ctx.get_job_id())
    assert not dead(mine)  # this driver's job is alive
    assert not dead("192.0.2.1:1|" + mine)  # not a direct owner at all
    assert not dead(f"direct:10.9.9.9:6379|{session}|{job}|{rest}")  # another cluster
    assert dead(f"direct:{gcs}|session_other|{job}|{rest}")  # this cluster restarted
    assert not dead(f"direct:{gcs}|{session}|ff000000|{rest}")  # a job not seen yet
    dead.add([mine])  # its driver handed its runs over at exit
    assert dead(mine)


@ray.remote
def _sleeps(x: int, runs: str, seconds: float) -> int:
    record_run(runs, "sleeps")
    time.sleep(seconds)
    return x + 1


def test_a_run_longer_than_its_lease_ttl_keeps_the_lease_by_renewing_it(
    short_ttl_storage: str, counter_dir: Path
) -> None:
    # A manager with a 1.5 s ttl sweeps for expired leases every ttl: a direct run
    # whose renewals stopped would be resumed by it, and the slow task run twice.
    uri, runs, wid = short_ttl_storage, str(counter_dir), "outlasts-ttl"
    ref = workflow.run_async(step.bind(_sleeps.bind(0, runs, 5.0), runs, "after"), workflow_id=wid)
    wait_for(lambda: count_runs(counter_dir, "sleeps") == 1)
    first = lease_record(uri, wid)
    assert first["owner"].startswith("direct:") and first["ttl"] == 1.5
    time.sleep(3.0)  # two ttls into the slow task
    assert workflow.get_status(wid) == workflow.RUNNING
    now = lease_record(uri, wid)
    assert now["owner"] == first["owner"], "a manager took the lease of a live run"
    assert now["renewed_at"] > first["renewed_at"] + 1.0
    assert now["expires_at"] > time.time()
    assert ray.get(ref, timeout=60) == 2
    assert [count_runs(counter_dir, n) for n in ("sleeps", "after")] == [1, 1]
    assert workflow.get_status(wid) == workflow.SUCCESSFUL
