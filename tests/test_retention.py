"""Deleting finished workflows by age (delete_finished) and automatically (init's
retention), with real Ray and a real file storage."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
import ray
from conftest import kill_manager
from helpers import blocked_step, count_runs, step, wait_for
from ray_workflows.backends._file_layout import LOCK_STRIPES

import ray_workflows as workflow
from ray_workflows._core.settings import build


@ray.remote(max_retries=0)
def broken() -> None:
    raise RuntimeError("broken on purpose")


def stored_under(root: str, wid: str) -> list[str]:
    """Every file of ``wid`` in a file storage: its records and its index marker(s)."""
    base = Path(root)
    return sorted(str(p.relative_to(base)) for p in base.glob(f"*/{wid}*")) + sorted(
        str(p.relative_to(base)) for p in base.glob(f"status/*/{wid}")
    )


def test_delete_finished_removes_old_finished_workflows_only(
    fresh_storage: str, tmp_path: Path, counter_dir: Path
) -> None:
    runs, gate = str(counter_dir), str(tmp_path / "gate")
    assert workflow.run(step.bind(1, "ok", runs), workflow_id="ok") == 2
    with pytest.raises(workflow.WorkflowExecutionError):
        workflow.run(broken.bind(), workflow_id="bad")
    workflow.send_event("bad", "later", {"kept": "for a resume"})  # in its mailbox
    workflow.run_async(blocked_step.bind(1, "stopped", runs, gate), workflow_id="stopped")
    wait_for(lambda: count_runs(counter_dir, "stopped") == 1)
    workflow.cancel("stopped")
    live = workflow.run_async(blocked_step.bind(1, "live", runs, gate), workflow_id="live")
    wait_for(lambda: count_runs(counter_dir, "live") == 1)
    assert stored_under(fresh_storage, "bad")

    assert workflow.delete_finished(datetime.timedelta(hours=1)) == []  # none so old
    assert workflow.delete_finished(0, statuses=[workflow.FAILED]) == ["bad"]
    assert stored_under(fresh_storage, "bad") == []  # records, mailbox, lease, marker
    assert sorted(workflow.list_all()) == [
        ("live", workflow.RUNNING),
        ("ok", workflow.SUCCESSFUL),
        ("stopped", workflow.CANCELED),
    ]
    time.sleep(0.05)
    assert workflow.delete_finished(0.01) == ["ok", "stopped"]
    assert workflow.list_all() == [("live", workflow.RUNNING)]
    for wid in ("ok", "stopped"):
        assert stored_under(fresh_storage, wid) == []
        with pytest.raises(workflow.WorkflowNotFoundError):
            workflow.get_status(wid)
    # Deleting keys leaves no lock file per key behind: they are a fixed set of stripes.
    assert len(list(Path(fresh_storage, ".rwf-locks").iterdir())) <= LOCK_STRIPES

    # An id deleted by age can be used again.
    assert workflow.run(step.bind(5, "ok", runs), workflow_id="ok") == 6
    Path(gate).touch()
    assert ray.get(live, timeout=60) == 2

    with pytest.raises(ValueError, match="older_than"):
        workflow.delete_finished(-1)
    with pytest.raises(ValueError, match="older_than"):
        workflow.delete_finished("a week")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'RUNNING'.*workflow.cancel"):
        workflow.delete_finished(0, statuses=["SUCCESSFUL", "RUNNING"])
    with pytest.raises(ValueError, match="none"):
        workflow.delete_finished(0, statuses=[])


async def test_the_awaitable_twin_deletes_too(fresh_storage: str, counter_dir: Path) -> None:
    ref = await workflow.aio.run_async(step.bind(1, "ok", str(counter_dir)), workflow_id="ok")
    assert await ref == 2
    assert await workflow.aio.delete_finished(datetime.timedelta(0), statuses="FAILED") == []
    assert await workflow.aio.delete_finished(datetime.timedelta(0)) == ["ok"]
    assert await workflow.aio.list_all() == []


def test_retention_deletes_what_finished_and_keeps_what_runs(
    tmp_path: Path, counter_dir: Path
) -> None:
    uri, runs, gate = str(tmp_path / "storage"), str(counter_dir), str(tmp_path / "gate")
    workflow.init(uri, retention=datetime.timedelta(seconds=1))
    try:
        live = workflow.run_async(blocked_step.bind(1, "live", runs, gate), workflow_id="live")
        assert workflow.run(step.bind(1, "a", runs), workflow_id="a") == 2
        assert workflow.run(step.bind(1, "b", runs), workflow_id="b") == 2
        wait_for(lambda: workflow.list_all() == [("live", workflow.RUNNING)])
        assert stored_under(uri, "a") == stored_under(uri, "b") == []
        assert stored_under(uri, "live")
        # A later init without a retention leaves the manager's as it is.
        workflow.init(uri)
        Path(gate).touch()
        assert ray.get(live, timeout=60) == 2
        wait_for(lambda: workflow.list_all() == [])
        assert stored_under(uri, "live") == []
    finally:
        kill_manager(uri)


def test_retention_is_a_setting_with_a_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = str(tmp_path)
    monkeypatch.delenv("RAY_WORKFLOWS_RETENTION", raising=False)
    assert build(uri).retention is None
    assert build(uri, retention=datetime.timedelta(days=7)).retention == 7 * 86400
    monkeypatch.setenv("RAY_WORKFLOWS_RETENTION", "3600")
    assert build(uri).retention == 3600
    assert build(uri, retention=60).retention == 60
    monkeypatch.setenv("RAY_WORKFLOWS_RETENTION", "a week")
    with pytest.raises(ValueError, match="RAY_WORKFLOWS_RETENTION"):
        build(uri)
    with pytest.raises(ValueError, match="retention"):
        build(uri, retention=datetime.timedelta(seconds=-1))
