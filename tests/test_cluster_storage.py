"""Workflows started inside Ray tasks and actors, and by a second driver of the same
cluster, go to the storage the driver chose with ``workflow.init``, without repeating
it; a task or actor that asks for another storage is refused with a clear error."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import ray
from clusters import Cluster, write_script
from conftest import kill_manager

import ray_workflows as workflow
from ray_workflows._core import cluster_storage, config
from ray_workflows.exceptions import ClusterStorageError


@ray.remote
def add(a: int, b: int) -> int:
    return a + b


def _own_default(tmp_path: Path) -> dict[str, Any]:
    """Options giving a task or actor a process whose default storage directory is
    under ``tmp_path`` (and no storage variable): where it would go on its own."""
    env = {"XDG_DATA_HOME": str(tmp_path / "xdg"), "RAY_WORKFLOWS_STORAGE": ""}
    return {"runtime_env": {"env_vars": env}}


def _nothing_in_default(tmp_path: Path) -> None:
    default = tmp_path / "xdg" / "ray-workflows"
    assert not default.exists() or not any(default.iterdir()), sorted(default.rglob("*"))


@ray.remote
def start_in_task(wid: str, storage: str | None = None) -> tuple[int, str]:
    if storage is not None:
        workflow.init(storage)
    return workflow.run(add.bind(1, 2), workflow_id=wid), config.current().storage


@ray.remote
class Starter:
    def start(self, wid: str, storage: str | None = None) -> tuple[int, str]:
        if storage is not None:
            workflow.init(storage)
        return workflow.run(add.bind(2, 3), workflow_id=wid), config.current().storage


def test_a_workflow_started_in_a_task_goes_to_the_drivers_storage(
    fresh_storage: str, wid: str, tmp_path: Path
) -> None:
    task = start_in_task.options(**_own_default(tmp_path))
    output, used = ray.get(task.remote(wid), timeout=240)
    assert (output, used) == (3, fresh_storage)
    assert dict(workflow.list_all())[wid] == workflow.SUCCESSFUL
    assert workflow.get_output(wid) == 3
    _nothing_in_default(tmp_path)


def test_a_workflow_started_in_an_actor_follows_the_drivers_storage(
    fresh_storage: str, wid: str, tmp_path: Path
) -> None:
    actor = Starter.options(**_own_default(tmp_path)).remote()  # type: ignore[attr-defined]
    try:
        assert ray.get(actor.start.remote(wid), timeout=240) == (5, fresh_storage)
        assert workflow.get_output(wid) == 5
        # The driver moves to another storage: the actor's next workflow follows it.
        second = str(tmp_path / "second")
        workflow.init(second)
        try:
            assert ray.get(actor.start.remote(wid + "-2"), timeout=240) == (5, second)
            assert workflow.get_output(wid + "-2") == 5
        finally:
            workflow.init(fresh_storage)
            kill_manager(second)
        assert wid + "-2" not in dict(workflow.list_all())
        _nothing_in_default(tmp_path)
    finally:
        ray.kill(actor)


def test_a_task_or_actor_asking_for_another_storage_is_refused(
    fresh_storage: str, wid: str, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    with pytest.raises(ClusterStorageError, match="driver") as info:
        ray.get(start_in_task.remote(wid, str(other)), timeout=240)
    assert str(other) in str(info.value) and fresh_storage in str(info.value)
    actor = Starter.remote()  # type: ignore[attr-defined]
    try:
        with pytest.raises(ClusterStorageError):
            ray.get(actor.start.remote(wid, str(other)), timeout=240)
        # The cluster's own storage, named again, is fine.
        assert ray.get(actor.start.remote(wid, fresh_storage), timeout=240) == (5, fresh_storage)
    finally:
        ray.kill(actor)
    assert not other.exists()
    assert workflow.get_output(wid) == 5


SECOND_TASKS = """
@ray.remote
def add(a, b):
    return a + b


@ray.remote
def start_in_task(wid):
    return workflow.run(add.bind(20, 2), workflow_id=wid)
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_second_driver_and_its_tasks_use_the_clusters_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every node and driver of this cluster would default to tmp_path/xdg.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    storage, ready, go = tmp_path / "storage", tmp_path / "ready", tmp_path / "go"
    first = write_script(
        tmp_path,
        "first",
        SECOND_TASKS,
        f"""
        connect()
        workflow.init(storage={str(storage)!r})
        workflow.run(add.bind(1, 1), workflow_id="from-first")
        Path({str(ready)!r}).touch()
        wait_file({str(go)!r})
        emit(
            listed=dict(workflow.list_all()),
            second=workflow.get_output("from-second"),
            task=workflow.get_output("from-second-task"),
        )
        """,
    )
    second = write_script(
        tmp_path,
        "second",
        SECOND_TASKS,
        """
        connect("auto")  # no workflow.init, no RAY_WORKFLOWS_STORAGE
        emit(
            run=workflow.run(add.bind(10, 1), workflow_id="from-second"),
            task=ray.get(start_in_task.remote("from-second-task")),
            listed=dict(workflow.list_all()),
        )
        """,
    )
    cluster = Cluster("storage")
    try:
        cluster.start_head(num_cpus=2)
        driver = cluster.spawn(first)
        driver.wait_file(ready, timeout=300)
        seen = cluster.run(second, env={"RWF_ADDRESS": "auto"}, timeout=300)
        go.touch()
        found = driver.result(timeout=300)
    finally:
        cluster.shutdown()
    assert seen["run"] == 11 and seen["task"] == 22
    everything = {"from-first", "from-second", "from-second-task"}
    assert seen["listed"] == dict.fromkeys(everything, "SUCCESSFUL")
    assert found == {
        "listed": dict.fromkeys(everything, "SUCCESSFUL"),
        "second": 11,
        "task": 22,
    }
    _nothing_in_default(tmp_path)


def test_a_driver_naming_no_storage_takes_the_clusters_and_another_is_logged(
    fresh_storage: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name in ("RAY_WORKFLOWS_STORAGE", "RAY_WORKFLOW_STORAGE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    cluster = cluster_storage.shared(False)
    assert cluster is not None  # the first storage chosen in this Ray
    try:
        assert config.configure().storage == cluster.settings.storage
        other = str(tmp_path / "other")
        with caplog.at_level(logging.WARNING, logger="ray_workflows"):
            assert config.configure(other).storage == other
        assert "storage.second_in_cluster" in caplog.text
        assert cluster_storage.shared(False) == cluster  # the cluster's stays
    finally:
        workflow.init(fresh_storage)
    _nothing_in_default(tmp_path)
