"""A new workflow is stored by its caller, then handed to the manager in one call.

``run_async`` writes the plan (its metadata in its header), a lease granted to the
manager and the RUNNING marker itself, returns, and the manager adopts the workflow
without touching storage. These tests take the two halves apart: a workflow stored as a caller would
store it, whose hand-over is delayed, never comes, or comes after a cancel or a
manager restart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import ray
from helpers import count_runs, record_run, wait_for

import ray_workflows as workflow
from ray_workflows import aio
from ray_workflows._core import bridge, client, config, serialization
from ray_workflows._core.keys import lease_key
from ray_workflows._core.lease import grant
from ray_workflows._core.store import WorkflowStore
from ray_workflows.exceptions import (
    WorkflowNotFoundError,
    WorkflowNotResumableError,
    WorkflowStillActiveError,
)
from ray_workflows.storage import open_storage

# The manager's scheduler is what these tests test: not a hosted runner.
pytestmark = pytest.mark.usefixtures("manager_runs")


@ray.remote
def step(runs: str, value: int) -> int:
    record_run(runs, "step")
    return value + 1


def _lease(root: str, wid: str) -> dict[str, Any]:
    return dict(json.loads(Path(root, lease_key(wid)).read_bytes()))


def _manager() -> tuple[Any, dict[str, Any]]:
    cfg = config.current()
    handle = bridge.run(config.manager(cfg))
    info = config.described(cfg)
    assert info is not None
    return handle, info


def _store_as_caller(storage: str, wid: str, runs: Path, owner: str, ttl: float) -> tuple:
    """Store ``wid`` exactly as ``run_async`` does, without handing it over."""
    prepared = client.prepare(step.bind(str(runs), 1), (), {}, wid, {"who": "caller"})
    record = grant(wid, owner, ttl)
    store = WorkflowStore(open_storage(storage))
    leased = bridge.run(
        store.create_started(wid, prepared.plan, "RUNNING", (lease_key(wid), record))
    )
    assert leased is True
    return prepared.plan, prepared.meta, record


def test_run_async_stores_the_workflow_and_the_manager_adopts_its_lease(
    storage: str, wid: str, counter_dir: Path
) -> None:
    _, info = _manager()
    assert info["caller_stores"] is True
    ref = workflow.run_async(step.bind(str(counter_dir), 1), workflow_id=wid, metadata={"k": 1})
    # Durable before run_async returned, written by this process.
    wf = Path(storage, "workflows", wid)
    header = serialization.peek_header((wf / "plan").read_bytes())
    assert header["meta"]["user_metadata"] == {"k": 1}
    assert Path(storage, "status", "RUNNING", wid).is_file() and (wf / "lease").is_file()
    assert ray.get(ref) == 2
    # Adopted, not acquired again: the granted record is the one the manager held.
    lease = _lease(storage, wid)
    assert (lease["owner"], lease["epoch"]) == (info["owner"], 1)
    assert workflow.get_status(wid) == workflow.SUCCESSFUL
    # The old marker goes with the next batch after the status, without a wait.
    wait_for(lambda: not Path(storage, "status", "RUNNING", wid).exists(), timeout=10)
    assert workflow.get_metadata(wid)["user_metadata"] == {"k": 1}
    assert count_runs(counter_dir, "step") == 1


def test_a_workflow_never_handed_over_is_running_until_resumed(
    storage: str, wid: str, counter_dir: Path
) -> None:
    # The caller died between storing it and handing it over.
    _, info = _manager()
    _store_as_caller(storage, wid, counter_dir, info["owner"], info["ttl"])
    # Its lease names this manager: RUNNING (handed over), not RESUMABLE.
    assert workflow.get_status(wid) == workflow.RUNNING
    assert (wid, workflow.RUNNING) in workflow.list_all(workflow.RUNNING)
    assert count_runs(counter_dir, "step") == 0
    # resume_all (as the manager's sweep does every ttl) takes it and runs it, once.
    resumed = dict(workflow.resume_all())
    assert ray.get(resumed[wid]) == 2
    assert count_runs(counter_dir, "step") == 1
    assert _lease(storage, wid)["epoch"] == 2
    assert workflow.get_metadata(wid)["user_metadata"] == {"who": "caller"}


def test_a_late_hand_over_after_a_cancel_is_refused(
    storage: str, wid: str, counter_dir: Path
) -> None:
    handle, info = _manager()
    plan, meta, record = _store_as_caller(storage, wid, counter_dir, info["owner"], info["ttl"])
    workflow.cancel(wid)
    with pytest.raises(WorkflowNotResumableError):
        bridge.run(aio.get(handle.run.remote(client.run_call(wid, plan, meta, record))))
    assert count_runs(counter_dir, "step") == 0
    assert workflow.get_status(wid) == workflow.CANCELED


def test_a_workflow_being_handed_over_is_live_until_its_lease_lapses(
    storage: str, wid: str, counter_dir: Path
) -> None:
    handle, info = _manager()
    # Granted for 1 s: the caller stored it and (say) died before the hand-over.
    plan, meta, record = _store_as_caller(storage, wid, counter_dir, info["owner"], 1.0)
    # Its lease is live: it shows RUNNING and cannot be deleted, as any running one.
    assert workflow.get_status(wid) == workflow.RUNNING
    with pytest.raises(WorkflowStillActiveError):
        workflow.delete(wid)
    wait_for(lambda: workflow.get_status(wid) == workflow.RESUMABLE, timeout=10)
    workflow.delete(wid)
    # A hand-over that comes after all that is refused; nothing ran.
    with pytest.raises(WorkflowNotFoundError):
        bridge.run(aio.get(handle.run.remote(client.run_call(wid, plan, meta, record))))
    assert count_runs(counter_dir, "step") == 0
    assert not Path(storage, "workflows", wid).exists()


def test_a_lease_granted_to_an_earlier_incarnation_is_taken_over(
    storage: str, wid: str, counter_dir: Path
) -> None:
    # The caller asked the manager before Ray restarted it: the grant names a dead
    # incarnation of the same manager, which this one supersedes.
    handle, info = _manager()
    lineage = info["owner"].rsplit("|", 1)[0] + "|"
    plan, meta, record = _store_as_caller(
        storage, wid, counter_dir, lineage + "host:1:dead", info["ttl"]
    )
    assert bridge.run(aio.get(handle.run.remote(client.run_call(wid, plan, meta, record)))) == 2
    lease = _lease(storage, wid)
    assert (lease["owner"], lease["epoch"]) == (info["owner"], 2)
    assert count_runs(counter_dir, "step") == 1


def test_a_second_hand_over_joins_the_running_workflow(
    storage: str, wid: str, counter_dir: Path
) -> None:
    handle, info = _manager()
    plan, meta, record = _store_as_caller(storage, wid, counter_dir, info["owner"], info["ttl"])
    first = handle.run.remote(client.run_call(wid, plan, meta, record))
    second = handle.run.remote(client.run_call(wid, plan, meta, record))
    assert ray.get([first, second]) == [2, 2]
    assert count_runs(counter_dir, "step") == 1


def test_queue_limits_make_the_manager_store_new_workflows(fresh_storage: str) -> None:
    # A pending-queue limit may refuse a workflow, which must then leave nothing stored:
    # only the manager can decide that, so the caller does not store it.
    workflow.init(fresh_storage, max_running_workflows=1, max_pending_workflows=1)
    _, info = _manager()
    assert info["caller_stores"] is False
    workflow.init(fresh_storage, max_running_workflows=-1, max_pending_workflows=-1)
    _, info = _manager()
    assert info["caller_stores"] is True


def test_starting_a_stored_id_again_resumes_it_and_leaves_no_stray_marker(
    storage: str, wid: str, counter_dir: Path
) -> None:
    assert workflow.run(step.bind(str(counter_dir), 1), workflow_id=wid) == 2
    # The same id again: the stored workflow's output, not a new run of this DAG.
    assert workflow.run(step.bind(str(counter_dir), 10), workflow_id=wid) == 2
    assert count_runs(counter_dir, "step") == 1
    # The old marker goes with the next batch after the status, without a wait.
    wait_for(lambda: not Path(storage, "status", "RUNNING", wid).exists(), timeout=10)
    assert [s for w, s in workflow.list_all() if w == wid] == [workflow.SUCCESSFUL]


def test_a_caller_that_cannot_see_the_managers_storage_lets_the_manager_store(
    storage: str, tmp_path: Path
) -> None:
    # The manager's probe record is read back through this process's own view of the
    # storage; a different directory (a mount elsewhere, a driver off the cluster)
    # does not have it.
    _, info = _manager()
    assert info["caller_stores"] is True and info["probe"] is not None
    key, token = info["probe"]
    assert Path(storage, key).read_bytes() == token
    elsewhere = str(tmp_path / "not-the-managers")
    assert bridge.run(config.sees_manager_storage(elsewhere, info))["caller_stores"] is False
    assert bridge.run(config.sees_manager_storage(storage, info))["caller_stores"] is True
    # A storage this process cannot open at all is the same answer, not an error.
    unreachable = "s3://no-bucket/x?endpoint_url=http://127.0.0.1:9"
    assert bridge.run(config.sees_manager_storage(unreachable, info))["caller_stores"] is False
