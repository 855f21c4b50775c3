"""Direct runs (ray_workflows.direct) meeting a manager: a lease taken over while the
run goes on, a run that waited for CPUs past its lease grant, a cancel racing the
final status. Each ends with one run's records and status, and each task after the
point where the manager took over runs once."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import ray
from conftest import NUM_CPUS
from helpers import count_runs, lease_owner, record_run, status_keys, wait_for

import ray_workflows as workflow
from ray_workflows import config
from ray_workflows.manager import NAMESPACE, manager_name


@ray.remote
def step(x: int, runs: str, name: str) -> int:
    record_run(runs, name)
    return x + 1


@ray.remote
def gated(x: int, runs: str, gate: str, first_gate: str = "") -> int:
    """Waits for ``gate``; its first run (the direct run's) also for ``first_gate``."""
    first = count_runs(runs, "gated") == 0
    record_run(runs, "gated")
    while not os.path.exists(gate) or (first and first_gate and not os.path.exists(first_gate)):
        time.sleep(0.01)
    return x + 10


@ray.remote(num_cpus=1)
def hold_cpu(gate: str) -> None:
    while not os.path.exists(gate):
        time.sleep(0.01)


def _manager(uri: str) -> Any:
    return ray.get_actor(manager_name(config.normalise_storage(uri)), namespace=NAMESPACE)


def test_a_run_whose_lease_is_taken_over_hands_over_and_its_later_tasks_run_once(
    fresh_storage: str, counter_dir: Path, tmp_path: Path
) -> None:
    # The manager takes the lease of a live direct run, as it does when the run's
    # driver hands it over at exit while the run's task is still going: it resumes
    # the workflow and runs the task under way again. The direct run must see that it
    # lost the lease at its next task boundary, not at its next renewal (ttl / 3
    # away), and answer with the manager's result; the task after it runs once.
    runs, gate, wid = str(counter_dir), str(tmp_path / "gate"), "taken-over"
    ref = workflow.run_async(step.bind(gated.bind(0, runs, gate), runs, "after"), workflow_id=wid)
    wait_for(lambda: count_runs(counter_dir, "gated") == 1)
    owner = lease_owner(fresh_storage, wid)
    assert owner.startswith("direct:")
    taken = ray.get(_manager(fresh_storage).take_over.remote([(wid, owner)]))
    assert taken == 1
    wait_for(lambda: count_runs(counter_dir, "gated") == 2)  # the manager's run of it
    assert not lease_owner(fresh_storage, wid).startswith("direct:")
    Path(gate).touch()
    assert ray.get(ref, timeout=60) == 11
    assert workflow.get_output(wid) == 11
    time.sleep(1.0)  # (the manager's run of "after", had the direct run not stopped)
    assert count_runs(counter_dir, "after") == 1
    assert workflow.get_status(wid) == workflow.SUCCESSFUL
    assert status_keys(fresh_storage, wid) == [f"status/SUCCESSFUL/{wid}"]


def test_a_run_whose_lease_was_taken_over_and_finished_elsewhere_answers_with_that_result(
    fresh_storage: str, counter_dir: Path, tmp_path: Path
) -> None:
    # As above, but the manager's run finishes the workflow while the direct run's
    # task is still going (a worker stalled past its lease, say): the direct run's
    # output of that task then meets the manager's stored one, and it must give way
    # to it, not fail the workflow that succeeded.
    runs, wid = str(counter_dir), "finished-elsewhere"
    gate, first_gate = str(tmp_path / "gate"), str(tmp_path / "first-gate")
    dag = step.bind(gated.bind(0, runs, gate, first_gate), runs, "after")
    ref = workflow.run_async(dag, workflow_id=wid)
    wait_for(lambda: count_runs(counter_dir, "gated") == 1)
    owner = lease_owner(fresh_storage, wid)
    taken = ray.get(_manager(fresh_storage).take_over.remote([(wid, owner)]))
    assert taken == 1
    Path(gate).touch()
    wait_for(lambda: workflow.get_status(wid) == workflow.SUCCESSFUL)
    assert count_runs(counter_dir, "after") == 1
    Path(first_gate).touch()  # the direct run's task returns now
    assert ray.get(ref, timeout=60) == 11
    assert workflow.get_output(wid) == 11
    assert count_runs(counter_dir, "after") == 1
    assert status_keys(fresh_storage, wid) == [f"status/SUCCESSFUL/{wid}"]


def test_a_run_queued_past_its_lease_grant_hands_over_instead_of_running_beside_the_manager(
    short_ttl_storage: str, counter_dir: Path, tmp_path: Path
) -> None:
    # The caller grants the lease when it submits the run; the run's task then waits
    # for a CPU. Past the grant, a manager may have resumed the workflow: the run must
    # not start its tasks too, but hand over. Here every CPU is busy for two ttls.
    uri, runs, gate, wid = short_ttl_storage, str(counter_dir), str(tmp_path / "gate"), "queued"
    try:
        assert workflow.run(step.bind(step.bind(0, runs, "warm"), runs, "warm")) == 2
        holders = [hold_cpu.remote(gate) for _ in range(NUM_CPUS)]
        wait_for(lambda: len(ray.wait(holders, timeout=0)[0]) == 0 and _busy(NUM_CPUS))
        ref = workflow.run_async(step.bind(step.bind(0, runs, "a"), runs, "b"), workflow_id=wid)
        assert lease_owner(uri, wid).startswith("direct:")
        time.sleep(3.0)  # two ttls: the grant has run out
        assert count_runs(counter_dir, "a") == 0  # (still queued)
        Path(gate).touch()
        assert ray.get(ref, timeout=60) == 2
        time.sleep(1.0)  # (a second run of the tasks, had the direct run gone on)
        assert [count_runs(counter_dir, n) for n in "ab"] == [1, 1]
        assert workflow.get_status(wid) == workflow.SUCCESSFUL
        assert not lease_owner(uri, wid).startswith("direct:")
        assert status_keys(uri, wid) == [f"status/SUCCESSFUL/{wid}"]
    finally:
        Path(gate).touch()  # (the CPUs back for the tests after this one)


def _busy(cpus: int) -> bool:
    return bool(ray.available_resources().get("CPU", 0.0) <= 0.0 < cpus)


@pytest.mark.parametrize("fails", [False, True], ids=["succeeds", "fails"])
def test_a_cancel_racing_the_final_status_leaves_one_status_everywhere(
    storage: str, wid: str, counter_dir: Path, fails: bool
) -> None:
    # Cancels sent around the moment quick direct runs store their final status. A
    # success stored first stands; otherwise the cancel does: of a run under way, or
    # of one that failed (a cancel marks a FAILED workflow CANCELED). The run's answer,
    # get_status, the status index and get_output agree with that.
    runs = str(counter_dir)
    answers: set[str] = set()
    for i in range(12):
        w = f"{wid}-{i}"
        first = step.bind(0, runs, "a")
        ref = workflow.run_async(
            boom.bind(first, runs) if fails else step.bind(first, runs, "b"), workflow_id=w
        )
        time.sleep(0.004 * i)
        workflow.cancel(w)
        try:
            answer = "SUCCESSFUL" if ray.get(ref, timeout=60) == 2 else "a wrong value"
        except workflow.WorkflowCancellationError:
            answer = "CANCELED"
        except workflow.WorkflowExecutionError:
            answer = "FAILED"
        answers.add(answer)
        final = "CANCELED" if answer == "FAILED" else answer
        assert workflow.get_status(w).value == final, (w, answer)
        assert status_keys(storage, w) == [f"status/{final}/{w}"]
        if final == "SUCCESSFUL":
            assert workflow.get_output(w) == 2
        else:
            with pytest.raises(workflow.WorkflowError):
                workflow.get_output(w)
    assert answers <= {"CANCELED", "FAILED" if fails else "SUCCESSFUL"}
    assert count_runs(counter_dir, "a") <= 12  # none ran twice


@ray.remote
def boom(x: int, runs: str) -> int:
    record_run(runs, "boom")
    raise ValueError("boom")
