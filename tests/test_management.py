"""cancel, delete, resume_all, queue limits and automatic recovery, with real Ray."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
import ray
from helpers import count_runs, record_run, wait_for

import ray_workflows as workflow
from ray_workflows._core import config
from ray_workflows._core.manager import NAMESPACE, manager_name
from ray_workflows.exceptions import (
    WorkflowNotResumableError,
    WorkflowQueueFullError,
    WorkflowStillActiveError,
)


@ray.remote
def sleeper(seconds: float, runs: str, name: str) -> str:
    record_run(runs, name + "-start")
    time.sleep(seconds)
    record_run(runs, name)
    return name


def test_cancel_stops_the_running_task(storage: str, wid: str, counter_dir: Path) -> None:
    ref = workflow.run_async(sleeper.bind(5, str(counter_dir), "long"), workflow_id=wid)
    wait_for(lambda: count_runs(counter_dir, "long-start") == 1)
    workflow.cancel(wid)
    assert workflow.get_status(wid) == workflow.CANCELED
    with pytest.raises(workflow.WorkflowCancellationError):
        ray.get(ref, timeout=30)  # Ray's error wrapper is also a WorkflowCancellationError
    time.sleep(6)  # the task would have finished by now had it not been killed
    assert count_runs(counter_dir, "long") == 0
    assert (wid, workflow.CANCELED) in workflow.list_all(workflow.CANCELED)
    assert workflow.get_metadata(wid)["status"] == "CANCELED"
    with pytest.raises(WorkflowNotResumableError):
        workflow.resume(wid)


def test_cancel_of_unknown_and_finished_workflows(
    storage: str, wid: str, counter_dir: Path
) -> None:
    with pytest.raises(workflow.WorkflowNotFoundError):
        workflow.cancel(wid + "-nobody")
    with pytest.raises(workflow.WorkflowNotFoundError):
        workflow.get_status(wid + "-nobody")
    assert workflow.run(sleeper.bind(0, str(counter_dir), "quick"), workflow_id=wid) == "quick"
    workflow.cancel(wid)  # a finished workflow stays finished, its output readable
    assert workflow.get_status(wid) == workflow.SUCCESSFUL
    assert workflow.get_output(wid) == "quick"


def test_delete_of_a_live_workflow_raises_intact(storage: str, wid: str, counter_dir: Path) -> None:
    ref = workflow.run_async(sleeper.bind(2, str(counter_dir), "d"), workflow_id=wid)
    with pytest.raises(WorkflowStillActiveError) as info:
        workflow.delete(wid)
    assert info.value.workflow_id == wid and "cancel" in str(info.value)
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is WorkflowStillActiveError and str(clone) == str(info.value)
    assert ray.get(ref) == "d"
    workflow.delete(wid)
    with pytest.raises(workflow.WorkflowNotFoundError):
        workflow.get_status(wid)
    assert not Path(storage, "workflows", wid).exists()
    # The id can be used again, from scratch.
    assert workflow.run(sleeper.bind(0, str(counter_dir), "d"), workflow_id=wid) == "d"
    assert count_runs(counter_dir, "d") == 2
    with pytest.raises(workflow.WorkflowNotFoundError):
        workflow.delete(wid + "-nobody")


@ray.remote
def gated(marker: str, runs: str, name: str) -> str:
    record_run(runs, name + "-start")
    while not Path(marker).exists():
        time.sleep(0.02)
    record_run(runs, name)
    return name


def test_queue_limits_fifo_and_full_queue(fresh_storage: str, counter_dir: Path) -> None:
    workflow.init(fresh_storage, max_running_workflows=1, max_pending_workflows=2)
    marker = str(counter_dir.parent / "go")
    refs = [
        workflow.run_async(gated.bind(marker, str(counter_dir), f"q{i}"), workflow_id=f"q{i}")
        for i in range(3)
    ]
    assert workflow.get_status("q0") == workflow.RUNNING
    assert workflow.get_status("q1") == workflow.PENDING
    assert workflow.get_status("q2") == workflow.PENDING
    assert count_runs(counter_dir, "q1-start") == 0  # queued workflows really wait
    with pytest.raises(WorkflowQueueFullError):
        workflow.run_async(sleeper.bind(0, str(counter_dir), "q3"), workflow_id="q3")
    with pytest.raises(workflow.WorkflowNotFoundError):  # nothing of it was stored
        workflow.get_status("q3")
    workflow.cancel("q2")  # a pending workflow can be canceled, at once
    assert workflow.get_status("q2") == workflow.CANCELED
    Path(marker).touch()
    assert ray.get(refs[:2]) == ["q0", "q1"]
    assert count_runs(counter_dir, "q2-start") == 0
    assert workflow.list_all({"SUCCESSFUL"}) == [
        ("q0", workflow.SUCCESSFUL),
        ("q1", workflow.SUCCESSFUL),
    ]


@pytest.mark.usefixtures("manager_runs")  # the manager's own recovery
def test_manager_restart_resumes_running_workflows_by_itself(
    fresh_storage: str, wid: str, counter_dir: Path
) -> None:
    dag = sleeper.bind(0.3, str(counter_dir), "final")
    for i in range(6):
        dag = _then.bind(dag, i, str(counter_dir))
    workflow.run_async(dag, workflow_id=wid)
    wait_for(lambda: count_runs(counter_dir, "then2") == 1)
    ray.kill(
        ray.get_actor(manager_name(config.normalise_storage(fresh_storage)), namespace=NAMESPACE),
        no_restart=False,
    )
    # Nobody calls resume: the restarted manager resumes what storage says was running.
    wait_for(lambda: count_runs(counter_dir, "then5") == 1, timeout=120)
    assert count_runs(counter_dir, "final") == 1
    # Committed tasks ran once; the ones whose outputs were reported but not yet
    # committed when the manager died (then2, maybe its predecessor) may run again.
    counts = [count_runs(counter_dir, f"then{i}") for i in range(6)]
    assert set(counts) <= {1, 2} and sum(counts) <= 8, counts
    wait_for(lambda: workflow.get_status(wid) == workflow.SUCCESSFUL, timeout=30)


@ray.remote
def _then(prev: str, i: int, runs: str) -> str:
    time.sleep(0.3)
    record_run(runs, f"then{i}")
    return f"{prev}>{i}"


def test_resume_all_brings_back_resumable_and_failed_on_request(
    fresh_storage: str, counter_dir: Path
) -> None:
    workflow.init(fresh_storage, auto_resume=False)
    marker = counter_dir / "allow"

    assert workflow.run(sleeper.bind(0, str(counter_dir), "ok"), workflow_id="ok") == "ok"
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(_fails_until.bind(str(marker)), workflow_id="bad")
    assert workflow.resume_all() == []  # nothing RESUMABLE
    marker.touch()
    resumed = workflow.resume_all(include_failed=True)
    assert [wid for wid, _ in resumed] == ["bad"]
    assert ray.get(resumed[0][1]) == "finally"
    assert workflow.get_status("bad") == workflow.SUCCESSFUL


@ray.remote
def _fails_until(marker: str) -> str:
    if not Path(marker).exists():
        raise RuntimeError("not yet")
    return "finally"
