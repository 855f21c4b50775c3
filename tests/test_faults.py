"""Storage that fails or tears writes (the ``faulty`` plugin): clear errors, nothing lost."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import ray
from helpers import count_runs, faulty_uri, record_run

import ray_workflows as workflow
from ray_workflows.testing import StorageConformance


@ray.remote
def step(x: int, name: str, runs: str) -> int:
    record_run(runs, name)
    # Far apart enough that each output lands in a pack of its own (a pack gathers
    # records for 20 ms), which is named after it and can be failed by name.
    time.sleep(0.3)
    return x + 1


@pytest.mark.usefixtures("manager_runs")  # the manager's pack timing
def test_failing_writes_fail_the_workflow_clearly_and_it_resumes(
    faulty: tuple[str, Path], counter_dir: Path
) -> None:
    _, control = faulty
    runs = str(counter_dir)
    dag = step.bind(step.bind(step.bind(0, "a", runs), "b", runs), "c", runs)
    control.write_text(json.dumps({"fail": r"tasks/\d+/test_faults\.step_1\.(out|pack)$"}))
    with pytest.raises(workflow.WorkflowExecutionError) as info:
        workflow.run(dag, workflow_id="w")
    assert "injected write failure" in str(info.value)
    assert type(info.value.__cause__).__name__ == "StorageError"
    assert workflow.get_status("w") == workflow.FAILED
    control.write_text("{}")  # storage works again
    assert workflow.resume("w") == 3
    # "a" had been checkpointed: it never runs again; "b" ran twice (its first output
    # never reached storage). "c" starts as soon as "b" reports, before b's output is
    # durable, so it may have run once on that first attempt too; it was never
    # committed, so running it again is not running a finished task again.
    assert [count_runs(counter_dir, n) for n in "ab"] == [1, 2]
    assert count_runs(counter_dir, "c") in (1, 2)


def test_a_torn_write_is_never_read_as_an_output(
    faulty: tuple[str, Path], tmp_path: Path, counter_dir: Path
) -> None:
    _, control = faulty
    runs = str(counter_dir)
    control.write_text(json.dumps({"tear": r"tasks/\d+/test_faults\.step_1\.(out|pack)$"}))
    assert workflow.run(step.bind(step.bind(0, "a", runs), "b", runs), workflow_id="t") == 2
    control.write_text("{}")
    # The final output was torn on its way to storage: reading it back is an error,
    # never a wrong value.
    with pytest.raises(Exception, match="torn"):
        workflow.get_output("t")
    meta = tmp_path / "inner" / "workflows" / "t" / "meta.json"
    meta.write_text(meta.read_text().replace('"SUCCESSFUL"', '"RUNNING"'))
    assert workflow.resume("t") == 2  # recovery discards the torn record and re-runs "b"
    assert [count_runs(counter_dir, n) for n in "ab"] == [1, 2]


class TestFaultyStorageConformance(StorageConformance):
    """With no faults configured, the wrapper keeps the whole storage contract."""

    @pytest.fixture
    def storage(self, tmp_path: Path):  # type: ignore[no-untyped-def]
        from ray_workflows.storage import open_storage

        return open_storage(faulty_uri(tmp_path / "inner", tmp_path / "none.json"))
