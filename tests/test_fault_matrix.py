"""The fault matrix, part one (issue 22): every fault we can cause inside one Ray, each
against file storage and S3, with many workflows in flight, counted through files.

Every workflow is the same small graph, ``a -> (b, c) -> j -> g -> z``, and ``z``
continues as ``zz`` (a continuation to commit): ``g`` waits for a "go" file and ``z``
for a second one, so a fault always hits with ``a b c j``
durable (the test waits until their records are in storage) and ``g`` in flight.
Every task records its start and its end as files. Afterwards each row asserts: every
workflow SUCCESSFUL with the right output (none lost), and no task that was durable
when the fault hit started again (no re-run of a finished task, README "What survives
what"). A task caught in flight may run again; the table counts those separately.

Cluster-wide faults (driver, whole cluster, a stalled manager taken over) are in
test_fault_matrix_clusters.py. The table is printed at the end of the session.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import fault_table
import pytest
import ray
from conftest import kill_manager
from helpers import count_runs, record_run, wait_for
from s3server import S3Server

import ray_workflows as workflow
from ray_workflows._core import bridge, config
from ray_workflows._core.manager import NAMESPACE, manager_name
from ray_workflows._core.records import decode_pack
from ray_workflows.storage import open_storage

pytestmark = [pytest.mark.faultmatrix, pytest.mark.timeout(600)]

WORKFLOWS = 8
BEFORE = ("a", "b", "c", "j")  # durable when a fault hits
TASKS = (*BEFORE, "g", "z", "zz")
OUTPUT = 8  # a=1, b=c=2, j=5, g=6; z continues as zz(7) = 8


@ray.remote
def task(
    *inputs: int, name: str, runs: str, gate: str = "", pids: str = "", then: str = ""
) -> object:
    """``sum(inputs) + 1``, once ``gate`` exists; with ``then``, continues as task
    ``then`` of that value (a continuation record to commit)."""
    record_run(runs, f"{name}.start")
    if gate:
        if pids:
            Path(pids, f"{name}.{os.getpid()}").touch()
        while not Path(gate).exists():
            time.sleep(0.02)
    record_run(runs, f"{name}.done")
    if then:
        opts = workflow.options(task_id="zz")
        return workflow.continuation(
            task.options(num_cpus=0, **opts).bind(sum(inputs) + 1, name=then, runs=runs)
        )
    return sum(inputs) + 1


@dataclasses.dataclass
class Load:
    """WORKFLOWS workflows in flight on one storage."""

    uri: str
    runs: Path
    go: Path  # opens g
    go2: Path  # opens z
    pids: Path  # g's worker processes
    wids: list[str]
    refs: list[ray.ObjectRef] = dataclasses.field(default_factory=list)
    durable_at_fault: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.monotonic)

    def dag(self, wid: str) -> object:
        def t(tid: str, *inputs: object, gate: Path | None = None, then: str = "") -> object:
            # No CPU: eight waiting gates must not starve the session's four CPUs.
            opts = workflow.options(task_id=tid)
            return task.options(num_cpus=0, **opts).bind(
                *inputs,
                name=f"{wid}.{tid}",
                runs=str(self.runs),
                gate=str(gate or ""),
                pids=str(self.pids) if gate == self.go else "",
                then=then,
            )

        a = t("a")
        j = t("j", t("b", a), t("c", a))
        return t("z", t("g", j, gate=self.go), gate=self.go2, then=f"{wid}.zz")

    def start(self) -> None:
        self.refs = [workflow.run_async(self.dag(w), workflow_id=w) for w in self.wids]

    def durable(self, wid: str) -> set[str]:
        return fault_table.durable_tasks(self.uri, wid)

    def wait_in_flight(self) -> None:
        """Until every workflow has ``a b c j`` durable and ``g`` running."""
        for wid in self.wids:
            wait_for(lambda w=wid: count_runs(self.runs, f"{w}.g.start") >= 1, timeout=180)
            wait_for(lambda w=wid: set(BEFORE) <= self.durable(w), timeout=120)
            self.durable_at_fault[wid] = self.durable(wid)

    def open_gates(self) -> None:
        self.go.touch()
        self.go2.touch()

    def results(self, timeout: float = 240) -> list[object]:
        out: list[object] = []
        for ref in self.refs:
            try:
                out.append(ray.get(ref, timeout=timeout))
            except Exception as exc:  # noqa: BLE001 - the row counts it as lost
                out.append(exc)
        return out

    def row(self, fault: str, storage: str, outputs: list[object]) -> fault_table.Row:
        succeeded = {
            wid: output == OUTPUT
            and workflow.get_status(wid) == workflow.SUCCESSFUL
            and workflow.get_output(wid) == OUTPUT
            for wid, output in zip(self.wids, outputs, strict=True)
        }
        seconds = time.monotonic() - self.started
        return fault_table.count(
            fault, storage, self.runs, self.durable_at_fault, succeeded, TASKS, seconds
        )


def _assert_row(row: fault_table.Row) -> None:
    assert row.finished_tasks >= len(BEFORE) * row.workflows, row
    assert (row.lost, row.reruns) == (0, 0), row


@pytest.fixture(params=["file", "s3"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def inner_uri(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "file":
        return str(tmp_path / "storage")
    server: S3Server = request.getfixturevalue("seaweedfs")
    return server.uri(f"fm-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def control(tmp_path: Path) -> Path:
    return tmp_path / "faults.json"


@pytest.fixture
def load(inner_uri: str, control: Path, tmp_path: Path, manager_runs: None) -> Iterator[Load]:
    """WORKFLOWS workflows on a faulty storage (no faults until the test sets them)
    over file or S3 storage, with a manager of its own."""
    uri = f"faulty://?inner={quote(inner_uri, safe='')}&control={quote(str(control), safe='')}"
    workflow.init(uri)
    runs, pids = tmp_path / "runs", tmp_path / "pids"
    runs.mkdir()
    pids.mkdir()
    tag = uuid.uuid4().hex[:6]
    wids = [f"fm-{tag}-{i}" for i in range(WORKFLOWS)]
    loaded = Load(uri, runs, tmp_path / "go", tmp_path / "go2", pids, wids)
    loaded.start()
    loaded.wait_in_flight()
    yield loaded
    loaded.open_gates()
    kill_manager(uri)


def _manager_pid(uri: str) -> int:
    handle = ray.get_actor(manager_name(config.normalise_storage(uri)), namespace=NAMESPACE)
    pid: int = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
    return pid


def _kill_manager_process(uri: str) -> None:
    os.kill(_manager_pid(uri), signal.SIGKILL)


def test_worker_sigkill(load: Load, kind: str) -> None:
    """Every worker running a ``g`` is SIGKILLed; Ray's retry runs ``g`` again."""
    wait_for(lambda: len(list(load.pids.iterdir())) >= WORKFLOWS, timeout=60)
    for entry in load.pids.iterdir():
        os.kill(int(entry.name.rsplit(".", 1)[1]), signal.SIGKILL)
    load.open_gates()
    _assert_row(load.row("SIGKILL of every worker running a task", kind, load.results()))


def test_manager_sigkill(load: Load, kind: str) -> None:
    """The manager's process is SIGKILLed; Ray restarts it, replays the ``run`` calls,
    and the new manager resumes every workflow from storage."""
    _kill_manager_process(load.uri)
    load.open_gates()
    _assert_row(load.row("SIGKILL of the manager", kind, load.results()))


def _fail_then_resume(load: Load, control: Path, rules: dict[str, str]) -> list[object]:
    control.write_text(json.dumps(rules))
    load.open_gates()
    first = load.results()  # the runs end on the failed write (FAILED, or still RUNNING)
    control.write_text("{}")
    assert any(not isinstance(o, int) for o in first) or rules.get("tear"), first
    outputs = []
    for wid in load.wids:
        try:
            outputs.append(workflow.resume(wid))
        except Exception as exc:  # noqa: BLE001 - the row counts it as lost
            outputs.append(exc)
    return outputs


@pytest.mark.parametrize(
    ("what", "regex"),
    [
        ("task outputs", r"/tasks/\d+/[gz]\.(pack|out)$"),
        ("workflow status", r"/meta\.json$"),
        ("continuation records", r"/tasks/\d+/[^/]+\.(cont|latest)$|/ids\.json$"),
    ],
)
def test_storage_error_at_commit(
    load: Load, control: Path, kind: str, what: str, regex: str
) -> None:
    """Every write of one commit point fails; the workflows end; the storage heals;
    ``resume`` finishes each from what was durable."""
    outputs = _fail_then_resume(load, control, {"fail": regex})
    _assert_row(load.row(f"storage error at every write of {what}", kind, outputs))


def test_torn_write_then_manager_sigkill(load: Load, control: Path, kind: str) -> None:
    """``g``'s output is torn on its way to storage (a backend breaking its contract),
    then the manager is SIGKILLed: recovery never reads the torn record as an output
    and runs ``g`` again."""
    control.write_text(json.dumps({"tear": r"/tasks/\d+/g\.(pack|out)$"}))
    load.go.touch()
    for wid in load.wids:
        wait_for(lambda w=wid: count_runs(load.runs, f"{w}.z.start") >= 1, timeout=120)
    torn = _wait_torn(load)
    control.write_text("{}")
    _kill_manager_process(load.uri)
    load.go2.touch()
    row = load.row("torn output write, then SIGKILL of the manager", kind, load.results())
    _assert_row(row)
    assert all(count_runs(load.runs, f"{w}.g.start") >= 2 for w in torn), torn


def _wait_torn(load: Load) -> list[str]:
    """The workflows whose ``g`` record is in storage, torn (all, after a while)."""
    store = open_storage(config.normalise_storage(load.uri))

    def torn_ones() -> list[str]:
        async def read() -> list[str]:
            out = []
            for wid in load.wids:
                keys = [k for k in await store.list(f"workflows/{wid}/tasks/") if "/g." in k]
                for key in keys:
                    data = await store.get(key)
                    try:
                        decode_pack(data or b"", key)
                    except Exception:  # noqa: BLE001
                        out.append(wid)
            return out

        return bridge.run(read())

    wait_for(lambda: len(torn_ones()) == WORKFLOWS, timeout=60)
    return torn_ones()
