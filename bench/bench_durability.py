"""Durability benchmark: resume a finished workflow, resume one interrupted half-way,
and list 10,000 workflows.

Run from the repository root::

    RAY_USAGE_STATS_ENABLED=0 python bench/bench_durability.py [--quick] [--only finished,list]
        [--repeat 3]

It starts one local Ray (2 CPUs, no dashboard), warms it up, then measures:

1. ``finished``: a fan-out of N tiny tasks into one ``gather`` (N + 1 tasks) runs to
   SUCCESSFUL; then ``workflow.resume(wid)`` (which returns the stored output) and
   ``workflow.get_output(wid)`` are timed with the manager warm, and again each with a
   fresh manager (the manager actor killed, the next ``workflow.init`` recreates it).
   Target: resume under 2 s.
2. ``interrupted``: the same fan-out shape, whose tasks record each execution in a
   file. Tasks ``i >= N/2`` wait for a "go" file. Once the first half is done and
   durable (its outputs are counted in the packs on disk) and two waiting tasks
   hold the two CPUs, the manager actor is killed (``ray.kill``, no restart): a
   crash of the process that runs the workflow. Then the go file is created and
   the time is taken from ``workflow.init`` (recreates the manager, whose automatic
   recovery resumes the workflow) through ``workflow.resume_async(wid)`` (returns once
   the run is rebuilt) to the output; also until the first and the last re-run task
   started. Checked: no task whose output was durable ran again.
3. ``list``: N stored workflows (one task each), created through ``run_async`` in
   batches of 100; if that would take more than the budget (3 minutes), the rest are
   copies of a real finished workflow's storage layout (said in the output). Then
   ``list_all()``, ``list_all(SUCCESSFUL)`` and ``list_all()`` on a fresh manager are
   timed. Target: under 1 s.

See bench/README.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

import ray_workflows as workflow  # noqa: E402

TARGETS = {"resume": 2.0, "list": 1.0}
FULL = {"tasks": 10_000, "workflows": 10_000, "min_real": 1_000, "budget": 180.0}
QUICK = {"tasks": 1_000, "workflows": 1_000, "min_real": 100, "budget": 10.0}
ORDER = ["finished", "interrupted", "list"]
BATCH = 100  # run_async calls per batch when creating the workflows for list_all


# --------------------------------------------------------------------------- tasks
from bench_core import gather, leaf  # noqa: E402  (workers import bench_core by name)


@ray.remote
def counted(i: int, half: int, run_dir: str, go: str) -> int:
    """Records this execution (``<i>.<pid>.<start ns>`` in ``run_dir``); tasks of the
    second half then wait until the ``go`` file exists (at most 15 minutes)."""
    start = time.time_ns()
    with open(os.path.join(run_dir, f"{i}.{os.getpid()}.{start}"), "wb"):
        pass
    if i >= half:
        end = time.monotonic() + 900
        while not os.path.exists(go) and time.monotonic() < end:
            time.sleep(0.02)
    return i


# --------------------------------------------------------------------------- helpers
class Timeout(Exception):
    pass


def timed(fn: Callable[[], Any], timeout: float) -> tuple[float, Any]:
    """``(seconds, value)`` of ``fn()`` run in a thread; ``Timeout`` if it hangs."""
    box: dict[str, Any] = {}

    def target() -> None:
        t0 = time.perf_counter()
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc
        box["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise Timeout(f"no answer after {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["seconds"], box["value"]


def storage_uri() -> str:
    from ray_workflows._core import config

    uri: str = config.current().storage
    return uri


def kill_manager(timeout: float = 60.0) -> None:
    """Kill the manager actor for good (``no_restart``) and wait until its name is free,
    so the next ``workflow.init`` creates a new one (as tests/conftest.py does)."""
    from ray_workflows._core import config
    from ray_workflows._core.manager import NAMESPACE, manager_name

    name = manager_name(storage_uri())
    try:
        handle = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return
    ray.kill(handle, no_restart=True)
    config.forget_managers()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.05)
    raise Timeout(f"the killed manager's name {name!r} was not freed in {timeout:g} s")


def start_manager(storage: str) -> float:
    """Create the manager (``workflow.init``: actor creation and its ``ready`` call)."""
    t0 = time.perf_counter()
    workflow.init(storage)
    return time.perf_counter() - t0


def durable_outputs(storage: str, wid: str) -> int:
    """Task outputs committed for ``wid``: members of its packs plus ``.out`` records,
    read from the files (what a recovery would find)."""
    from ray_workflows._core.store import decode_pack

    tasks = os.path.join(storage, "workflows", wid, "tasks")
    count = 0
    try:
        names = os.listdir(tasks)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.endswith(".out"):
            count += 1
        elif name.endswith(".pack"):
            try:
                with open(os.path.join(tasks, name), "rb") as f:
                    count += len(decode_pack(f.read(), name))
            except Exception:  # noqa: BLE001 - a pack being replaced; counted next poll
                pass
    return count


def executions(run_dir: str) -> list[tuple[int, int, str]]:
    """``(task index, start ns, file name)`` of every execution recorded in ``run_dir``."""
    out = []
    for name in os.listdir(run_dir):
        i, _, start = name.split(".")
        out.append((int(i), int(start), name))
    return out


def raylet_pid() -> int | None:
    try:
        node: Any = ray._private.worker._global_node
        return int(node.all_processes["raylet"][0].process.pid)
    except Exception:  # noqa: BLE001
        return None


def worker_starts() -> int | None:
    """Ray worker processes the raylet has started so far (its log's count)."""
    try:
        node: Any = ray._private.worker._global_node
        path = os.path.join(node.get_session_dir_path(), "logs", "raylet.out")
        with open(path, errors="replace") as f:
            return sum(1 for line in f if "Started worker process" in line)
    except Exception:  # noqa: BLE001
        return None


def ray_workers(parent: int) -> int:
    """Processes whose parent is ``parent`` (the raylet: Ray's workers and agents)."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2 :].split()[1]) == parent:
                count += 1
    return count


class WorkerSampler:
    """Peak number of the raylet's child processes, sampled every 0.25 s."""

    def __init__(self) -> None:
        self.parent = raylet_pid()
        self.base = ray_workers(self.parent) if self.parent else None
        self.peak = self.base or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while self.parent and not self._stop.wait(0.25):
            self.peak = max(self.peak, ray_workers(self.parent))

    def __enter__(self) -> WorkerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- results
class Row:
    """One measured quantity: its samples, the load at each, and a target if any."""

    def __init__(self, label: str, target: float | None = None) -> None:
        self.label, self.target = label, target
        self.samples: list[float] = []
        self.loads: list[float] = []
        self.notes: list[str] = []
        self.errors: list[str] = []

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)
        self.loads.append(os.getloadavg()[0])

    def line(self) -> str:
        if self.samples:
            med = f"{statistics.median(self.samples):.3f}"
            rng = (
                f"{min(self.samples):.3f}-{max(self.samples):.3f}" if len(self.samples) > 1 else ""
            )
            load = f"{statistics.median(self.loads):.1f}"
        else:
            med, rng, load = "-", "", "-"
        target = mark = ""
        if self.target is not None:
            target = f"< {self.target:g}"
            if self.samples:
                mark = "ok" if statistics.median(self.samples) < self.target else "!!"
            else:
                mark = "!!"
        notes = "; ".join(self.errors + self.notes)
        return (
            f"{self.label:<44} {med:>8} {rng:>13} {target:>6} {mark:2} {load:>5}  {notes}"
        ).rstrip()


HEADER = (
    f"{'measurement':<44} {'median s':>8} {'range s':>13} {'target':>6} {'':2} {'load1':>5}  notes"
)


def section(title: str) -> None:
    print(f"\n{title}", flush=True)
    print(HEADER)
    print("-" * len(HEADER))


def show(*rows: Row) -> None:
    for row in rows:
        print(row.line(), flush=True)


# --------------------------------------------------------------------------- 1 finished
def bench_finished(args: argparse.Namespace, n: int, storage: str, tag: str) -> None:
    wid = f"dur-finished-{tag}"
    expected = n * (n - 1) // 2
    run = Row(f"run fan-out {n:,} + gather (setup)")
    t0 = time.perf_counter()
    dag: Any = gather.bind(*[leaf.bind(i) for i in range(n)])
    ref = workflow.run_async(dag, workflow_id=wid)
    t_submit = time.perf_counter() - t0
    value = ray.get(ref, timeout=args.timeout)
    run.add(time.perf_counter() - t0)
    assert value == expected, value
    assert workflow.get_status(wid) == workflow.SUCCESSFUL
    run.notes.append(f"submit {t_submit:.2f}s, {n / run.samples[0]:.0f} tasks/s")
    files = sum(len(fs) for _, _, fs in os.walk(os.path.join(storage, "workflows", wid)))
    run.notes.append(f"{files} files stored")

    warm_resume = Row("resume finished (warm manager)", TARGETS["resume"])
    warm_output = Row("get_output finished (warm manager)")
    fresh_start = Row("  manager start (kill, workflow.init)")
    fresh_resume = Row("resume finished (fresh manager)", TARGETS["resume"])
    fresh_output = Row("get_output finished (fresh manager)")
    for _ in range(args.repeat):
        for row, call in ((warm_resume, workflow.resume), (warm_output, workflow.get_output)):
            seconds, value = timed(functools.partial(call, wid), args.timeout)
            assert value == expected, value
            row.add(seconds)
    started: dict[str, list[int]] = {"resume": [], "get_output": []}
    for _ in range(args.repeat):
        for row, call in ((fresh_resume, workflow.resume), (fresh_output, workflow.get_output)):
            kill_manager()
            fresh_start.add(start_manager(storage))
            before = worker_starts()
            seconds, value = timed(functools.partial(call, wid), args.timeout)
            after = worker_starts()
            assert value == expected, value
            row.add(seconds)
            if before is not None and after is not None:
                started[call.__name__].append(after - before)
    for row, name in ((fresh_resume, "resume"), (fresh_output, "get_output")):
        row.notes.append("first call after the manager started")
        if started[name]:
            row.notes.append(f"Ray worker processes started during the call: {started[name]}")
    section(f"1. finished workflow: fan-out of {n:,} tasks into one gather ({n + 1:,} tasks)")
    show(run, warm_resume, warm_output, fresh_start, fresh_resume, fresh_output)


# --------------------------------------------------------------------------- 2 interrupted
def bench_interrupted(
    args: argparse.Namespace, n: int, storage: str, tag: str, scratch: str
) -> bool:
    half = n // 2
    expected = n * (n - 1) // 2
    first = Row(f"first half ({half:,} tasks) before the kill")
    restart = Row("  manager start (workflow.init)")
    returned = Row("restart -> resume_async returned (rebuilt)")
    to_task = Row("restart -> first re-run task started")
    to_last = Row("restart -> last re-run task started")
    total = Row(f"restart + resume -> output ({n - half:,} tasks left)")
    ok = True
    for rep in range(args.repeat):
        wid = f"dur-interrupted-{tag}-{rep}"
        run_dir = os.path.join(scratch, f"runs-{rep}")
        go = os.path.join(scratch, f"go-{rep}")
        os.makedirs(run_dir)
        try:
            t0 = time.perf_counter()
            dag: Any = gather.bind(*[counted.bind(i, half, run_dir, go) for i in range(n)])
            workflow.run_async(dag, workflow_id=wid)
            # Wait until every first-half task ran and its output is durable, and the
            # two CPUs are held by waiting second-half tasks.
            end = time.monotonic() + args.timeout
            progress, last_change = -1, time.monotonic()
            while True:
                runs = executions(run_dir)
                done_first = len({i for i, _, _ in runs if i < half})
                waiting = len({i for i, _, _ in runs if i >= half})
                durable = durable_outputs(storage, wid) if done_first == half else 0
                if done_first == half and durable >= half and waiting >= 2:
                    break
                if durable > half:
                    raise AssertionError(f"{durable} outputs durable, only {half} can finish")
                now = time.monotonic()
                if done_first + durable != progress:
                    progress, last_change = done_first + durable, now
                elif now - last_change > 60 and waiting >= 2:
                    raise Timeout(
                        f"stalled at {done_first}/{half} first-half tasks: waiting "
                        f"second-half tasks hold the CPUs (Ray did not run the "
                        f"tasks in submission order)"
                    )
                if now > end:
                    raise Timeout(
                        f"first half not done: {done_first}/{half} ran, "
                        f"{durable} durable, {waiting} waiting"
                    )
                time.sleep(0.1)
            first.add(time.perf_counter() - t0)
            kill_manager()
            before = {name for _, _, name in executions(run_dir)}
            open(go, "wb").close()  # the restarted tasks need not wait

            starts0 = worker_starts()
            with WorkerSampler() as workers:
                wall0 = time.time()
                t0 = time.perf_counter()
                restart.add(start_manager(storage))
                _, ref = timed(functools.partial(workflow.resume_async, wid), args.timeout)
                returned.add(time.perf_counter() - t0)
                value = ray.get(ref, timeout=args.timeout)
                total.add(time.perf_counter() - t0)
            assert value == expected, value
            runs = executions(run_dir)
            new = sorted(start for i, start, name in runs if name not in before)
            if new:
                to_task.add(new[0] / 1e9 - wall0)
                to_last.add(new[-1] / 1e9 - wall0)
            counts: dict[int, int] = {}
            for i, _, _ in runs:
                counts[i] = counts.get(i, 0) + 1
            rerun = sorted(i for i in range(half) if counts.get(i, 0) != 1)
            twice = sorted(i for i in range(half, n) if counts.get(i, 0) > 1)
            missing = [i for i in range(n) if i not in counts]
            if rerun or missing:
                ok = False
                total.errors.append(
                    f"run {rep}: FINISHED TASKS RAN AGAIN {rerun[:10]} "
                    f"({len(rerun)}), never ran {missing[:10]}"
                )
            else:
                total.notes.append(
                    f"run {rep}: ok, 0 of {half:,} finished tasks ran again, "
                    f"{len(twice)} interrupted ones ran twice {twice[:4]}, "
                    f"{len(new):,} new executions"
                )
            if new and len(new) > 1:
                to_last.notes = [
                    f"{len(new) / max(1e-9, (new[-1] - new[0]) / 1e9):.0f} "
                    f"tasks/s between first and last re-run task"
                ]
            starts1 = worker_starts()
            if workers.base is not None:
                total.notes.append(
                    f"raylet children (workers, agents): {workers.base} before the restart, peak "
                    f"{workers.peak}; Ray worker processes started (incl. the manager): "
                    f"{'?' if starts0 is None or starts1 is None else starts1 - starts0}"
                )
        except Exception as exc:  # noqa: BLE001 - reported in the table
            ok = False
            total.errors.append(f"run {rep}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            open(go, "wb").close()
    if first.samples:
        rate = half / statistics.median(first.samples)
        first.notes.append(f"{rate:.0f} tasks/s (incl. building and submitting all {n:,})")
    returned.notes.append("manager recovery + rebuild from storage; tasks are submitted after")
    total.notes.insert(
        0, "after the last re-run task: the gather, whose stored inputs are loaded back"
    )
    section(
        f"2. interrupted: fan-out of {n:,} into one gather, manager killed with {half:,} "
        f"done, {n - half:,} left"
    )
    show(first, restart, returned, to_task, to_last, total)
    return ok


# --------------------------------------------------------------------------- 3 list
def copy_workflow(storage: str, src: str, dst: str) -> None:
    """Store workflow ``dst`` as a byte copy of finished workflow ``src`` (its plan, meta
    with the output key renamed, task records) and its SUCCESSFUL index marker. Plain
    writes, no fsync: setup only."""
    src_dir = os.path.join(storage, "workflows", src)
    dst_dir = os.path.join(storage, "workflows", dst)
    for root, _, files in os.walk(src_dir):
        rel = os.path.relpath(root, src_dir)
        target = os.path.normpath(os.path.join(dst_dir, rel))
        os.makedirs(target, exist_ok=True)
        for name in files:
            if name.startswith(".rwf-") or (rel == "." and name == "lease"):
                continue
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            if rel == "." and name == "meta.json":
                data = data.replace(f"workflows/{src}/".encode(), f"workflows/{dst}/".encode())
            with open(os.path.join(target, name), "wb") as f:
                f.write(data)
    open(os.path.join(storage, "status", "SUCCESSFUL", dst), "wb").close()


def bench_list(args: argparse.Namespace, sizes: dict[str, Any], storage: str, tag: str) -> None:
    n = sizes["workflows"]
    create = Row(f"create {n:,} one-task workflows (setup)")
    t0 = time.perf_counter()
    submit = 0.0
    real = 0
    while real < n:
        count = min(BATCH, n - real)
        s0 = time.perf_counter()
        refs = [
            workflow.run_async(leaf.bind(real + k), workflow_id=f"dur-list-{tag}-{real + k:05d}")
            for k in range(count)
        ]
        submit += time.perf_counter() - s0
        assert ray.get(refs, timeout=args.timeout) == list(range(real, real + count))
        real += count
        elapsed = time.perf_counter() - t0
        if real >= sizes["min_real"] and elapsed / real * n > sizes["budget"] and real < n:
            break
    t_real = time.perf_counter() - t0
    copied = n - real
    t1 = time.perf_counter()
    template = f"dur-list-{tag}-{real - 1:05d}"
    for k in range(real, n):
        copy_workflow(storage, template, f"dur-list-{tag}-{k:05d}")
    t_copy = time.perf_counter() - t1
    create.add(time.perf_counter() - t0)
    create.notes.append(
        f"{real:,} real through run_async in batches of {BATCH}: "
        f"{real / submit:.1f} workflows/s started (run_async returned), "
        f"{real / t_real:.1f} workflows/s finished"
    )
    if copied:
        create.notes.append(
            f"{copied:,} COPIED from {template}'s files on disk in {t_copy:.1f}s (running them "
            f"all would take ~{t_real / real * n:.0f}s, over the {sizes['budget']:.0f}s budget)"
        )
    total_stored = len(os.listdir(os.path.join(storage, "workflows")))

    every = Row(f"list_all() over {total_stored:,} workflows", TARGETS["list"])
    success = Row("list_all(SUCCESSFUL)", TARGETS["list"])
    fresh_start = Row("  manager start (kill, workflow.init)")
    fresh = Row("list_all() (fresh manager)", TARGETS["list"])
    counts = set()
    for _ in range(args.repeat):
        seconds, listed = timed(workflow.list_all, args.timeout)
        every.add(seconds)
        counts.add(len(listed))
        seconds, listed = timed(lambda: workflow.list_all(workflow.SUCCESSFUL), args.timeout)
        success.add(seconds)
        success.notes = [f"{len(listed):,} listed"]
    every.notes.append(f"{sorted(counts)} listed")
    for _ in range(args.repeat):
        kill_manager()
        fresh_start.add(start_manager(storage))
        seconds, listed = timed(workflow.list_all, args.timeout)
        fresh.add(seconds)
    fresh.notes.append(
        "first call after the manager started; includes waiting for its "
        "start-up recovery scan of the index"
    )
    section(f"3. list_all over {n:,} stored workflows (+ the others of this run)")
    show(create, every, success, fresh_start, fresh)


# --------------------------------------------------------------------------- running
def warm_up(tag: str) -> float:
    t0 = time.perf_counter()
    nodes: list[Any] = [leaf.bind(1), leaf.bind(2)]
    dag: Any = gather.bind(*nodes)
    assert workflow.run(dag, workflow_id=f"dur-warm-{tag}") == 3
    assert ray.get([leaf.remote(i) for i in range(4)]) == [0, 1, 2, 3]
    assert workflow.resume(f"dur-warm-{tag}") == 3
    assert workflow.list_all()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--storage",
        help="workflow storage (default: a fresh temp dir, removed "
        "afterwards); must be a local path: the bench reads its files",
    )
    parser.add_argument("--only", help=f"comma-separated parts: {','.join(ORDER)}")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (median)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1,000 tasks and 1,000 workflows (100 real), for a smoke run",
    )
    parser.add_argument("--tasks", type=int, help="fan-out size for parts 1 and 2")
    parser.add_argument("--workflows", type=int, help="stored workflows for part 3")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds allowed per wait (default 600)"
    )
    parser.add_argument("--keep-storage", action="store_true", help="keep the temp storage")
    parser.add_argument("--log-to-driver", action="store_true", help="show worker/manager logs")
    args = parser.parse_args()

    names = ORDER if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {ORDER}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    sizes = dict(QUICK if args.quick else FULL)
    if args.tasks:
        sizes["tasks"] = args.tasks
    if args.workflows:
        sizes["workflows"] = args.workflows
        sizes["min_real"] = min(sizes["min_real"], args.workflows)

    temp_storage = args.storage is None
    storage = os.path.abspath(args.storage or tempfile.mkdtemp(prefix="rwf-bench-dur-"))
    scratch = tempfile.mkdtemp(prefix="rwf-bench-dur-runs-")
    try:
        return run_all(args, names, sizes, storage, scratch)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
        if temp_storage and not args.keep_storage:
            shutil.rmtree(storage, ignore_errors=True)


def run_all(
    args: argparse.Namespace, names: list[str], sizes: dict[str, Any], storage: str, scratch: str
) -> int:
    from bench_core import code_version, fs_type, manager_pid, start_ray

    tag = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    start_ray(args.log_to_driver)
    t_init = time.perf_counter() - t0
    workflow.init(storage)
    t_warm = warm_up(tag)
    t_start = time.perf_counter()

    print()
    print(
        f"ray-workflows {workflow.__version__} ({code_version()}) durability benchmark | Ray "
        f"{ray.__version__} | Python {platform.python_version()} | num_cpus=2 "
        f"(machine: {os.cpu_count()} cores)"
    )
    print(
        f"storage {storage} ({fs_type(storage)}) | sizes {'quick' if args.quick else 'full'}: "
        f"{sizes['tasks']:,} tasks, {sizes['workflows']:,} workflows | repeat {args.repeat} "
        f"(median) | timeout {args.timeout:g}s"
    )
    print(
        f"ray.init {t_init:.1f}s, warm-up {t_warm:.1f}s (excluded) | manager pid "
        f"{manager_pid()} (changes after each kill) | targets: resume finished < "
        f"{TARGETS['resume']:g}s, list_all < {TARGETS['list']:g}s"
    )
    print(
        f"load average before ray.init {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}"
        + ("  WARNING: the machine is busy, numbers are not comparable" if load0[0] > 1.5 else "")
        + " | load1 column: at each measurement"
    )
    sys.stdout.flush()

    ok = True
    for name in names:
        try:
            if name == "finished":
                bench_finished(args, sizes["tasks"], storage, tag)
            elif name == "interrupted":
                ok = bench_interrupted(args, sizes["tasks"], storage, tag, scratch) and ok
            elif name == "list":
                bench_list(args, sizes, storage, tag)
        except Exception as exc:  # noqa: BLE001 - the other parts still run
            ok = False
            traceback.print_exc()
            print(f"\n{name}: ERROR {type(exc).__name__}: {exc}", flush=True)
            try:  # a hung manager would spoil the next part
                kill_manager()
                workflow.init(storage)
            except Exception as exc2:  # noqa: BLE001
                print(f"  (could not restart the manager: {exc2})", file=sys.stderr)
    print()
    load = os.getloadavg()
    print(
        f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} | measured part "
        f"{time.perf_counter() - t_start:.0f}s"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    # Re-enter through the module name so that the task functions are
    # `bench_durability.*` (importable by workers, pickled by reference).
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_durability

    sys.exit(bench_durability.main())
