"""The fault matrix, part two (issue 22): faults of whole processes of a real `ray start`
cluster, each against file storage and S3 at once, with workflows in flight, counted
through files: the submitting driver SIGKILLed right after ``run_async``; the manager
stopped (SIGSTOP) past its lease while another cluster takes its workflows over, then
continued; the whole cluster SIGKILLed and its workflows recovered by another.

The workflows are test_fault_matrix.py's graph ``a -> (b, c) -> j -> g -> z`` with
gates on ``g`` and ``z``; the rows join the same table.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fault_table
import pytest
from clusters import Cluster, marked, write_script
from helpers import count_runs, wait_for
from s3server import S3Server

pytestmark = [pytest.mark.faultmatrix, pytest.mark.slow, pytest.mark.timeout(900)]

PER_STORAGE = 4  # workflows on each storage, per fault
# Seconds. Longer than the crash tests' 2 s: on a busy 2-core machine an S3 round trip
# can take seconds, and a lease that lapses on its own is another fault than the one
# a row names. Run by the manager: a hosted workflow's in-flight task ends with its
# driver, which is not what the rows measure.
TTL = 5
ENV = {"RAY_WORKFLOWS_HOST": "0", "RAY_WORKFLOWS_LEASE_TTL": str(TTL)}
TASKS = ("a", "b", "c", "j", "g", "z")
BEFORE = ("a", "b", "c", "j")
OUTPUT = 7

GRAPH = """
@ray.remote(num_cpus=0)
def task(*inputs, name, runs, gate=""):
    record(runs, f"{name}.start")
    if gate:
        wait_file(gate)
    record(runs, f"{name}.done")
    return sum(inputs) + 1


def dag(wid, runs, go, go2):
    def t(tid, *inputs, gate=""):
        opts = workflow.options(task_id=tid)
        return task.options(**opts).bind(*inputs, name=f"{wid}.{tid}", runs=runs, gate=gate)

    a = t("a")
    j = t("j", t("b", a), t("c", a))
    return t("z", t("g", j, gate=go), gate=go2)
"""


@dataclasses.dataclass
class Batch:
    """PER_STORAGE workflows on each of two storages (a directory and an S3 prefix)."""

    base: Path
    storages: dict[str, str]  # kind -> URI
    runs: Path
    go: Path
    go2: Path
    wids: dict[str, list[str]]  # kind -> workflow ids
    started: float = dataclasses.field(default_factory=time.monotonic)
    durable_at_fault: dict[str, set[str]] = dataclasses.field(default_factory=dict)

    @classmethod
    def make(cls, base: Path, s3: S3Server) -> Batch:
        base.mkdir(parents=True)
        (base / "runs").mkdir()
        tag = uuid.uuid4().hex[:6]
        storages = {"file": str(base / "storage"), "s3": s3.uri(f"fmc-{tag}")}
        wids = {k: [f"{k}-{tag}-{i}" for i in range(PER_STORAGE)] for k in storages}
        return cls(base, storages, base / "runs", base / "go", base / "go2", wids)

    def submit(self, tail: str) -> Path:
        """A driver script that starts every workflow with ``run_async``, then ``tail``."""
        starts = "\n".join(
            f"workflow.init(storage={uri!r})\n"
            f"for wid in {self.wids[kind]!r}:\n"
            f"    workflow.run_async(dag(wid, {str(self.runs)!r}, {str(self.go)!r}, "
            f"{str(self.go2)!r}), workflow_id=wid)"
            for kind, uri in self.storages.items()
        )
        return write_script(self.base, "submit", GRAPH, "connect()\n" + starts, tail)

    def finish(self, cluster: Cluster) -> dict[str, dict[str, object]]:
        """A driver on ``cluster`` that resumes every workflow and reports its output
        and status (``resume`` of a running one waits for it; of a finished one reads
        its output; of one a dead cluster's lease still holds, says so until the lease
        runs out, a lease ttl at most)."""
        parts = [
            f"""
            workflow.init(storage={uri!r})
            for wid in {self.wids[kind]!r}:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        out[wid] = {{"output": workflow.resume(wid)}}
                    except workflow.WorkflowRunningElsewhereError as exc:
                        if time.monotonic() < deadline:
                            time.sleep(0.5)  # a dead cluster's lease runs out first
                            continue
                        out[wid] = {{"error": repr(exc)}}
                    except Exception as exc:
                        out[wid] = {{"error": repr(exc)}}
                    break
                out[wid]["status"] = workflow.get_status(wid).value
            """
            for kind, uri in self.storages.items()
        ]
        script = write_script(
            self.base, "finish", GRAPH, "connect()\nout = {}", *parts, "emit(**out)"
        )
        return cluster.run(script, env=ENV, timeout=400)

    def run_on(self, cluster: Cluster) -> None:
        """Start every workflow from a driver on ``cluster`` that then exits, and wait
        until they are in flight."""
        assert cluster.run(self.submit("emit(submitted=True)"), env=ENV)
        self.wait_in_flight()

    def open_gates(self) -> None:
        self.go.touch()
        self.go2.touch()

    def wait_in_flight(self) -> None:
        for kind, uri in self.storages.items():
            for wid in self.wids[kind]:
                wait_for(lambda w=wid: count_runs(self.runs, f"{w}.g.start") >= 1, timeout=240)
                wait_for(lambda u=uri, w=wid: set(BEFORE) <= fault_table.durable_tasks(u, w), 120)
        self.snapshot()

    def snapshot(self) -> None:
        for kind, uri in self.storages.items():
            for wid in self.wids[kind]:
                self.durable_at_fault[wid] = fault_table.durable_tasks(uri, wid)

    def rows(self, fault: str, results: dict[str, dict[str, object]]) -> list[fault_table.Row]:
        rows = []
        for kind in self.storages:
            succeeded = {
                wid: results.get(wid, {}).get("output") == OUTPUT
                and results[wid].get("status") == "SUCCESSFUL"
                for wid in self.wids[kind]
            }
            rows.append(
                fault_table.count(
                    fault,
                    kind,
                    self.runs,
                    self.durable_at_fault,
                    succeeded,
                    TASKS,
                    time.monotonic() - self.started,
                )  # fmt: skip
            )
        return rows


def _assert_rows(rows: list[fault_table.Row], results: object) -> None:
    for row in rows:
        assert (row.lost, row.reruns) == (0, 0), (row, results)


@pytest.fixture(scope="module")
def clusters() -> Iterator[tuple[Cluster, Cluster]]:
    """Cluster A, where the faults happen, and cluster B, which takes over."""
    a, b = Cluster("fa"), Cluster("fb")
    try:
        a.start_head(num_cpus=2, wait=False)
        b.start_head(num_cpus=2, wait=False)
        a.wait_ready(a.head)
        b.wait_ready(b.head)
        yield a, b
    finally:
        a.shutdown()
        b.shutdown()


def _managers(cluster: Cluster) -> list[int]:
    """The PIDs of the workflow managers running on ``cluster``."""
    found = []
    for pid in marked(str(cluster.root)):
        try:
            cmdline = Path("/proc", str(pid), "cmdline").read_bytes()
        except OSError:
            continue
        if b"WorkflowManager" in cmdline:
            found.append(pid)
    return found


def test_1_driver_sigkill_right_after_run_async(
    clusters: tuple[Cluster, Cluster], seaweedfs: S3Server, tmp_path: Path
) -> None:
    a, _ = clusters
    batch = Batch.make(tmp_path / "driver", seaweedfs)
    submitted = batch.base / "submitted"
    driver = a.spawn(
        batch.submit(f"Path({str(submitted)!r}).touch()\ntime.sleep(600)"),
        env=ENV,
    )
    driver.wait_file(submitted)
    driver.kill()  # SIGKILL, right after the last run_async returned
    batch.wait_in_flight()  # the workflows go on without their driver
    batch.open_gates()
    results = batch.finish(a)
    _assert_rows(batch.rows("SIGKILL of the driver right after run_async", results), results)


def test_2_manager_sigstop_past_its_lease_while_another_cluster_takes_over(
    clusters: tuple[Cluster, Cluster], seaweedfs: S3Server, tmp_path: Path
) -> None:
    a, b = clusters
    batch = Batch.make(tmp_path / "stall", seaweedfs)
    batch.run_on(a)
    stopped = _managers(a)
    assert len(stopped) >= 2, stopped  # one per storage
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        batch.open_gates()
        time.sleep(TTL * 2)  # past the stopped managers' leases
        results = batch.finish(b)  # B takes every workflow over and finishes it
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    # A's managers wake up holding finished gates and lost leases: nothing of theirs
    # may land. Give them time to try, then read again.
    time.sleep(TTL * 3)
    again = batch.finish(b)
    assert again == results, (again, results)
    rows = batch.rows("SIGSTOP of the manager past its lease, another cluster takes over", results)
    _assert_rows(rows, results)


def test_3_whole_cluster_sigkill(
    clusters: tuple[Cluster, Cluster], seaweedfs: S3Server, tmp_path: Path
) -> None:
    a, b = clusters
    batch = Batch.make(tmp_path / "cluster", seaweedfs)
    batch.run_on(a)
    a.kill()  # every process of cluster A at once
    batch.open_gates()
    results = batch.finish(b)
    _assert_rows(batch.rows("SIGKILL of the whole cluster, another recovers", results), results)
