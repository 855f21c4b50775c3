"""Crash tests against real, separate Ray clusters (``ray start --head --block``).

Issue 3, "Prove it": the whole head killed at once in the middle of a workflow, a
fresh head on the same storage, and the first API call: the workflow completes by
automatic recovery, or, with recovery turned off, stays RESUMABLE until
``resume_all``. And the submitting driver exiting (cleanly, or by SIGKILL) right
after ``run_async`` does not stop its workflow.

Every task execution is a file in a counter directory, so the tests assert exact
counts; tasks that must be caught in flight wait for a "go" file the test creates.
The clusters are subprocesses of their own (see tests/clusters.py); this module
never uses the test session's Ray.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusters import LEASE_TTL, Cluster, runs_of, write_script
from helpers import count_runs

# Each test needs a `ray start` cluster or two (~20 s each to start, more on a busy
# machine) and a few driver processes (~10 s each).
# (The timeout covers a test and its share of module fixtures.)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 10  # a chain of STEPS tasks, step i -> step i + 1
GATE = 5  # step GATE waits for the go file: steps 0..4 finished, 5 in flight

# Step i records "start{i}" when it begins and "done{i}" right before it returns;
# step GATE waits for the go file in between. A chain ends with STEPS.
TASKS = f"""
STEPS, GATE = {STEPS}, {GATE}


@ray.remote
def step(x, i, runs, go):
    record(runs, f"start{{i}}")
    if i == GATE:
        wait_file(go)
    record(runs, f"done{{i}}")
    return x + 1


def chain(runs, go):
    node = 0
    for i in range(STEPS):
        node = step.bind(node, i, runs, go)
    return node
"""


@dataclasses.dataclass
class Case:
    """One workflow on a storage of its own."""

    wid: str
    storage: Path
    runs: Path
    go: Path

    @classmethod
    def make(cls, base: Path, wid: str) -> Case:
        base.mkdir(parents=True)
        (base / "runs").mkdir()
        return cls(wid, base / "storage", base / "runs", base / "go")

    def counts(self, what: str) -> list[int]:
        return [count_runs(self.runs, f"{what}{i}") for i in range(STEPS)]


@pytest.fixture(scope="module")
def live_cluster() -> Iterator[Cluster]:
    """A `ray start` cluster: the "restarted" cluster of the crash tests, and the
    cluster of the driver-exit tests."""
    cluster = Cluster("live")
    try:
        yield cluster  # its head is started by the first test that uses it
    finally:
        cluster.shutdown()


def started(cluster: Cluster, wait: bool = True) -> Cluster:
    if cluster.head is None:
        cluster.start_head(num_cpus=2, wait=False)
    if wait:
        cluster.wait_ready(cluster.head)
    return cluster


@dataclasses.dataclass
class Crashed:
    auto: Case  # to be recovered automatically
    manual: Case  # to be recovered by resume_all, recovery turned off
    cluster: Cluster  # the fresh cluster


@pytest.fixture(scope="module")
def crashed(live_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crashed]:
    """Two workflows (on two storages) half-way through on a cluster whose head is
    then SIGKILLed, process group and workers, at once."""
    base = tmp_path_factory.mktemp("crash")
    auto = Case.make(base / "auto", "crash-auto")
    manual = Case.make(base / "manual", "crash-manual")
    old = Cluster("old")
    try:
        old.start_head(num_cpus=2)
        started(live_cluster, wait=False)  # (not at once: two starts at once are slow)
        cases = [(str(c.storage), str(c.runs), str(c.go), c.wid) for c in (auto, manual)]
        driver = write_script(
            base,
            "start_both",
            TASKS,
            f"""
            connect()
            cases = {cases!r}
            for storage, runs, go, wid in cases:
                workflow.init(storage=storage)
                workflow.run_async(chain(runs, go), workflow_id=wid)
            for storage, runs, go, wid in cases:
                wait_started(runs, f"start{{GATE}}")
            emit(started=True)  # and exit: the workflows go on without this driver
            """,
        )
        # Run by the manager, so that its task in flight outlives this driver as the
        # tests require (a hosted workflow's task ends with its driver: ray_workflows._core.host).
        assert old.run(driver, env={"RAY_WORKFLOWS_HOST": "0"}) == {"started": True}
        for case in (auto, manual):
            # Half-way: steps before the gate finished, the gate's task in flight.
            assert case.counts("done")[:GATE] == [1] * GATE
            assert case.counts("start")[GATE:] == [1] + [0] * (STEPS - GATE - 1)
        old.kill()  # SIGKILL: `ray start`, GCS, raylet, ..., and every worker
        assert not old.head.alive()
        for case in (auto, manual):
            case.go.touch()  # from now on the gate is open (for the re-run)
        yield Crashed(auto, manual, started(live_cluster))
    finally:
        old.shutdown()


def _assert_recovered_counts(case: Case) -> None:
    starts, dones = case.counts("start"), case.counts("done")
    # No task finished twice. Finished before the kill: never started again. In
    # flight (the gate's task): once cut off, once more after the restart.
    assert dones == [1] * STEPS, (starts, dones)
    assert starts[:GATE] == [1] * GATE, (starts, dones)
    assert starts[GATE] == 2, (starts, dones)


def test_head_killed_mid_workflow_first_api_call_recovers_it(crashed: Crashed) -> None:
    case = crashed.auto
    # The new driver's very first workflow call is get_status (storage from the
    # environment): it creates the manager, which resumes what storage says was
    # running. Nothing calls resume or get_output before the workflow is done.
    driver = write_script(
        case.storage.parent,
        "first_call",
        f"""
        connect()
        wid = {case.wid!r}
        seen = [workflow.get_status(wid).value]
        deadline = time.monotonic() + 180
        while seen[-1] not in ("SUCCESSFUL", "FAILED", "CANCELED"):
            assert time.monotonic() < deadline, f"not done after 180 s: {{seen}}"
            time.sleep(0.2)
            status = workflow.get_status(wid).value
            if status != seen[-1]:
                seen.append(status)
        emit(seen=seen, output=workflow.get_output(wid), listed=dict(workflow.list_all()))
        """,
    )
    result = crashed.cluster.run(
        driver, env={"RAY_WORKFLOWS_STORAGE": str(case.storage)}, timeout=300
    )
    assert result["seen"][-1] == "SUCCESSFUL", result
    assert "FAILED" not in result["seen"] and "CANCELED" not in result["seen"], result
    assert result["output"] == STEPS
    assert result["listed"] == {case.wid: "SUCCESSFUL"}
    _assert_recovered_counts(case)


def test_head_killed_with_auto_resume_off_waits_for_resume_all(crashed: Crashed) -> None:
    case = crashed.manual
    # Longer than a lease's ttl: the old manager's lease has long expired, and a
    # manager that resumed on its own would have had time to run the gated task.
    watch = 3 * LEASE_TTL + 1
    driver = write_script(
        case.storage.parent,
        "resume_all",
        f"""
        connect()
        wid, runs = {case.wid!r}, {str(case.runs)!r}
        workflow.init(storage={str(case.storage)!r}, auto_resume=False)
        seen = set()
        end = time.monotonic() + {watch}
        while time.monotonic() < end:
            seen.add(workflow.get_status(wid).value)
            time.sleep(0.25)
        listed = dict(workflow.list_all())
        runs_before = len(os.listdir(runs))
        resumed = workflow.resume_all()
        outputs = {{w: ray.get(ref, timeout=180) for w, ref in resumed}}
        emit(
            seen=sorted(seen),
            listed=listed,
            runs_before=runs_before,
            outputs=outputs,
            after=workflow.get_status(wid).value,
        )
        """,
    )
    result = crashed.cluster.run(driver, timeout=300)
    assert result["seen"] == ["RESUMABLE"], result
    assert result["listed"] == {case.wid: "RESUMABLE"}, result
    # Nothing ran while the workflow waited: the records of the first cluster only.
    assert result["runs_before"] == 2 * GATE + 1, result
    assert result["outputs"] == {case.wid: STEPS}, result
    assert result["after"] == "SUCCESSFUL"
    _assert_recovered_counts(case)


# -- the submitting driver goes away ------------------------------------------------
SHORT = """
@ray.remote
def stage(x, i, runs, go):
    record(runs, f"start{i}")
    if i == 1:
        wait_file(go)  # the workflow is still running when its driver is gone
    record(runs, f"done{i}")
    return x * 10 + i


def pipeline(runs, go):
    return stage.bind(stage.bind(stage.bind(1, 0, runs, go), 1, runs, go), 2, runs, go)
"""


def _submit_script(case: Case) -> str:
    return f"""
        connect()
        workflow.init(storage={str(case.storage)!r})
        ref = workflow.run_async(pipeline({str(case.runs)!r}, {str(case.go)!r}),
                                 workflow_id={case.wid!r})
        """


def _check_completes(cluster: Cluster, case: Case, hosted: bool = False) -> None:
    """Another driver, later: the workflow finishes, every task ran exactly once. A
    hosted workflow's task under way when its driver went away ended with the driver's
    job, or ran on until the manager took the workflow over: it may finish twice, the
    others once (ray_workflows._core.host)."""
    case.go.touch()
    checker = write_script(
        case.storage.parent,
        "check",
        f"""
        connect()
        workflow.init(storage={str(case.storage)!r})
        emit(output=workflow.get_output({case.wid!r}),
             status=workflow.get_status({case.wid!r}).value,
             node=ray.get_runtime_context().get_node_id())
        """,
    )
    result = cluster.run(checker)
    assert (result["output"], result["status"]) == (1012, "SUCCESSFUL")
    starts, dones = case.counts("start")[:3], case.counts("done")[:3]
    assert dones[0] == dones[2] == 1 and dones[1] in ((1, 2) if hosted else (1,)), (starts, dones)
    assert starts[0] == 1, (starts, dones)  # finished before the driver went away
    # All ran on this cluster's one node (not in the test session's own Ray).
    runs = [r for i in range(3) for r in runs_of(case.runs, f"done{i}")]
    assert {r["node_id"] for r in runs} == {result["node"]}


@pytest.mark.parametrize("hosted", [False, True], ids=["manager", "hosted"])
def test_driver_exits_cleanly_right_after_run_async(
    live_cluster: Cluster, tmp_path: Path, hosted: bool
) -> None:
    case = Case.make(tmp_path / "clean", "driver-exits")
    script = write_script(tmp_path, "submit", SHORT, _submit_script(case), "emit(submitted=True)")
    env = {"RAY_WORKFLOWS_HOST": "1" if hosted else "0"}
    # The driver has exited (a hosted one after handing its workflow to the manager).
    assert started(live_cluster).run(script, env=env) == {"submitted": True}
    assert count_runs(case.runs, "start2") == 0  # the workflow was not done by then
    _check_completes(live_cluster, case, hosted)


def test_driver_killed_right_after_run_async(live_cluster: Cluster, tmp_path: Path) -> None:
    case = Case.make(tmp_path / "killed", "driver-killed")
    submitted = tmp_path / "submitted"
    script = write_script(
        tmp_path,
        "submit",
        SHORT,
        _submit_script(case),
        f"Path({str(submitted)!r}).touch()\ntime.sleep(600)",
    )
    driver = started(live_cluster).spawn(script, env={"RAY_WORKFLOWS_HOST": "0"})
    driver.wait_file(submitted)
    driver.kill()  # SIGKILL, right after run_async returned
    assert driver.proc.returncode == -9
    assert count_runs(case.runs, "start2") == 0
    _check_completes(live_cluster, case)
