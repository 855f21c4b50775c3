"""Hosting: a small chain runs in a Ray task its caller submits, the same runner as
the manager's with its tasks in place (ray_workflows._core.host). These tests go through the
public API on the session's real Ray and a real storage directory."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import ray
from helpers import count_runs, lease_record, record_run, wait_for

import ray_workflows as workflow
from ray_workflows.exceptions import WorkflowCancellationError

pytestmark = pytest.mark.usefixtures("hosted_runs")  # hosting is off by default


@ray.remote
def first(runs: str) -> int:
    record_run(runs, "first")
    return 1


@ray.remote
def second(x: int, runs: str) -> int:
    record_run(runs, "second")
    return x + 1


@ray.remote
def victim(x: int, runs: str) -> int:
    """Writes its pid and waits to be killed the first time; then returns at once."""
    record_run(runs, "victim")
    if count_runs(runs, "victim") == 1:
        Path(runs, "pid").write_text(str(os.getpid()))
        time.sleep(60)
    return x + 10


@ray.remote
def sleeper(x: int, runs: str) -> int:
    record_run(runs, "sleeper")
    Path(runs, "sleeping").touch()
    time.sleep(30)
    return x


def test_a_small_chain_is_hosted_and_answers_every_query(
    storage: str, wid: str, counter_dir: Path
) -> None:
    runs = str(counter_dir)
    assert workflow.run(second.bind(first.bind(runs), runs), workflow_id=wid) == 2
    assert str(lease_record(storage, wid)["owner"]).startswith("host:")  # not the manager
    assert workflow.get_status(wid) == workflow.SUCCESSFUL
    assert workflow.get_output(wid) == 2
    assert workflow.get_output(wid, task_id="test_host.first") == 1
    assert workflow.get_metadata(wid)["status"] == "SUCCESSFUL"
    assert (wid, workflow.SUCCESSFUL) in workflow.list_all()
    assert (count_runs(runs, "first"), count_runs(runs, "second")) == (1, 1)
    # Run again: stored, so nothing runs.
    assert workflow.run(second.bind(first.bind(runs), runs), workflow_id=wid) == 2
    assert (count_runs(runs, "first"), count_runs(runs, "second")) == (1, 1)


def test_a_killed_host_is_run_again_and_finished_tasks_do_not_rerun(
    storage: str, wid: str, counter_dir: Path
) -> None:
    runs = str(counter_dir)
    ref = workflow.run_async(victim.bind(first.bind(runs), runs), workflow_id=wid)
    pid_file = counter_dir / "pid"
    wait_for(pid_file.exists)
    assert str(lease_record(storage, wid)["owner"]).startswith("host:")
    # The task runs in place: its process is the host's. Kill it.
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert ray.get(ref, timeout=120) == 11
    assert count_runs(runs, "first") == 1  # committed before the kill
    assert count_runs(runs, "victim") == 2
    assert workflow.get_status(wid) == workflow.SUCCESSFUL


def test_a_hosted_workflow_is_canceled_through_the_manager(
    storage: str, wid: str, counter_dir: Path
) -> None:
    runs = str(counter_dir)
    ref = workflow.run_async(sleeper.bind(first.bind(runs), runs), workflow_id=wid)
    wait_for((counter_dir / "sleeping").exists)
    started = time.monotonic()
    workflow.cancel(wid)
    assert time.monotonic() - started < 10  # the host looks for requests every second
    assert workflow.get_status(wid) == workflow.CANCELED
    with pytest.raises(WorkflowCancellationError):
        ray.get(ref, timeout=60)
    with pytest.raises(workflow.WorkflowNotResumableError):
        workflow.resume(wid)


def test_a_live_hosted_id_is_joined(storage: str, wid: str, counter_dir: Path) -> None:
    runs = str(counter_dir)
    ref = workflow.run_async(victim.bind(first.bind(runs), runs), workflow_id=wid)
    wait_for((counter_dir / "pid").exists)
    again = workflow.run_async(second.bind(first.bind(runs), runs), workflow_id=wid)
    os.kill(int((counter_dir / "pid").read_text()), signal.SIGKILL)
    assert ray.get([ref, again], timeout=120) == [11, 11]
    assert count_runs(runs, "second") == 0  # the stored DAG ran, not the new one


def test_hosting_can_be_turned_off(
    storage: str, wid: str, counter_dir: Path, manager_runs: None
) -> None:
    """``manager_runs`` (last: after the module's ``hosted_runs``) turns hosting off, as
    by default."""
    runs = str(counter_dir)
    assert workflow.run(second.bind(first.bind(runs), runs), workflow_id=wid) == 2
    assert not str(lease_record(storage, wid)["owner"]).startswith("host:")
