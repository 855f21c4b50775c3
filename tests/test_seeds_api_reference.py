"""Seed 004, the Ray 1.x API reference: its management examples, written with steps.

The ``...`` in the seed's examples (``trip = ...``) become small steps. Where 1.x and
2.x disagree, 2.x wins (seeds 000 and 001 are written against it): ``resume`` and
``get_output`` return the value, so the seed's ``ray.get(workflow.resume(...))`` and
``ray.get(workflow.get_output(...))`` use their ``_async`` twins, marked where they
stand. ``resume_all`` returns (id, ObjectRef) pairs that also answer ``.get(id)``,
so the 1.x dict-style lookup works unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

import ray_workflows as workflow


@workflow.step
def failing(flag: str) -> str:
    if not Path(flag).exists():
        raise RuntimeError("JobFailed")
    return "recovered"


@workflow.step
def start_trip(name: str) -> str:
    return f"trip to {name}"


def test_resume_all_after_a_failure(fresh_storage: str, tmp_path: Path) -> None:
    flag = str(tmp_path / "fixed")
    failed_job = failing.options(max_retries=0)
    workflow_step = failed_job.step(flag)
    output = workflow_step.run_async(workflow_id="failed_job")
    with pytest.raises(Exception, match="JobFailed"):
        ray.get(output)
    jobs = workflow.list_all()
    assert jobs == [("failed_job", workflow.FAILED)]
    Path(flag).touch()
    resumed = workflow.resume_all(include_failed=True)
    assert resumed.get("failed_job") is not None
    assert ray.get(resumed.get("failed_job")) == "recovered"
    assert dict(resumed).keys() == {"failed_job"}


def test_resume_list_all_get_status_get_output(fresh_storage: str, tmp_path: Path) -> None:
    trip = start_trip.step("SAN")
    res1 = trip.run_async(workflow_id="trip1")
    res2 = workflow.resume_async("trip1")  # the seed: workflow.resume("trip1")
    assert ray.get(res1) == ray.get(res2)

    gate = tmp_path / "gate"

    @workflow.step
    def long_running_job() -> str:
        import time

        while not gate.exists():
            time.sleep(0.05)
        return "done"

    wf = long_running_job.step().run_async(workflow_id="long_running_job")
    jobs = workflow.list_all()
    assert ("long_running_job", workflow.RUNNING) in jobs
    gate.touch()
    ray.get(wf)
    jobs = workflow.list_all({workflow.RUNNING})
    assert jobs == []
    jobs = workflow.list_all(workflow.SUCCESSFUL)
    assert ("long_running_job", workflow.SUCCESSFUL) in jobs

    output = start_trip.step("OAK").run(workflow_id="trip")
    assert workflow.SUCCESSFUL == workflow.get_status("trip")
    assert output == "trip to OAK"

    named = start_trip.options(name="trip").step("SEA")
    res1 = named.run_async(workflow_id="trip2")
    # you could "get_output()" in another machine
    res2 = workflow.get_output_async("trip2")  # the seed: workflow.get_output("trip2")
    assert ray.get(res1) == ray.get(res2)
    step_output = workflow.get_output("trip2", "trip")  # the step's name, positionally
    assert step_output == ray.get(res1)


def test_get_metadata_of_a_workflow_and_a_step(fresh_storage: str) -> None:
    workflow_step = start_trip.options(name="trip", metadata={"k1": "v1"}).step("LAX")
    workflow_step.run(workflow_id="trip1", metadata={"k2": "v2"})
    workflow_metadata = workflow.get_metadata("trip1")
    assert workflow_metadata["status"] == "SUCCESSFUL"
    assert workflow_metadata["user_metadata"] == {"k2": "v2"}
    assert "start_time" in workflow_metadata["stats"]
    assert "end_time" in workflow_metadata["stats"]
    step_metadata = workflow.get_metadata("trip1", "trip")
    assert step_metadata["step_type"] == "FUNCTION"
    assert step_metadata["user_metadata"] == {"k1": "v1"}
    assert "start_time" in step_metadata["stats"]
    assert "end_time" in step_metadata["stats"]
