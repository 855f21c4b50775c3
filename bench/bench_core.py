"""Core overhead benchmark: each workload as a durable workflow and as plain Ray tasks.

Run from the repository root::

    RAY_USAGE_STATS_ENABLED=0 python bench/bench_core.py [--quick] [--only chain,fib] [--repeat 3]

It starts one local Ray (2 CPUs, no dashboard), warms it up, then runs every selected
workload as plain Ray tasks and as a workflow doing the same work, and prints one
table: plain seconds, workflow seconds, their ratio, and notes. The issue's target
is a ratio of at most 2.0 on 2 cores. See bench/README.md.

The task functions live at module level and workers import this module by name
(``bench_core`` on PYTHONPATH), so both sides ship functions by reference, as a
library or application package would; nothing is pickled by value from ``__main__``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray import ObjectRef  # noqa: E402

import ray_workflows as workflow  # noqa: E402

TARGET = 2.0
# Ratios (workflow / plain Ray) the issue measured with Ray 2.47's ray.workflow.
RAY_247 = {"chain": 13.6, "fanout": 20.8, "many": 24.6}

FULL = {"chain": 200, "fanout": 1000, "fib": 12, "many": 100, "bigfanout": 20_000}
QUICK = {"chain": 50, "fanout": 200, "fib": 8, "many": 20, "bigfanout": 2_000}
SIZED = ["chain", "fanout", "fib", "many", "bigfanout"]
ORDER = ["chain", "fanout", "fib", "many", "many_aio", "many_floor", "bigfanout"]


# --------------------------------------------------------------------------- tasks
@ray.remote
def inc(x: int) -> int:
    return x + 1


@ray.remote
def leaf(i: int) -> int:
    return i


@ray.remote
def gather(*values: int) -> int:
    return sum(values)


@ray.remote
def add(a: int, b: int) -> int:
    return a + b


@ray.remote
def wf_fib(n: int) -> Any:
    if n <= 1:
        return n
    return workflow.continuation(add.bind(wf_fib.bind(n - 1), wf_fib.bind(n - 2)))


@ray.remote(num_cpus=0)
class BareManager:
    """What any manager actor costs by itself (the 'many_floor' row): one actor call
    per workflow that submits the same two tasks, awaits them and replies with the
    value. No storage, no bookkeeping; a durable engine in a detached actor cannot be
    cheaper than this."""

    async def run(self, i: int, plan: bytes) -> int:
        value: int = await add.remote(inc.remote(i), 1)
        return value


def fib_value(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def fib_tree(n: int) -> ObjectRef[int]:
    """The plain baseline's fib(n): the driver submits the whole call tree at once, a
    ``leaf`` task returning n for n <= 1, else ``add.remote(fib_tree(n-1), fib_tree(n-2))``
    with the two refs as arguments. No task blocks or submits; Ray runs it as one graph."""
    if n <= 1:
        return leaf.remote(n)
    return add.remote(fib_tree(n - 1), fib_tree(n - 2))


def fib_plain_task_count(n: int) -> int:
    """Tasks ``fib_tree(n)`` submits: a leaf per fib call with n <= 1, an add per other one."""
    return 2 * fib_value(n + 1) - 1


def fib_wf_task_count(n: int) -> int:
    """Tasks the workflow fib(n) runs: every fib call (leaves return n, the others a
    continuation), plus one add per continuation."""
    calls = 2 * fib_value(n + 1) - 1
    return calls + (calls - 1) // 2


# --------------------------------------------------------------------------- helpers
class Timeout(Exception):
    pass


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise Timeout()
        return left


def get(refs: Any, deadline: Deadline) -> Any:
    try:
        return ray.get(refs, timeout=deadline.left())
    except ray.exceptions.GetTimeoutError:
        raise Timeout() from None


def read_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler:
    """Samples VmRSS of ``pid`` every ``interval`` seconds in a background thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.peak_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"rss-{pid}")

    def _loop(self) -> None:
        while True:
            rss = read_rss_kib(self.pid)
            if rss is not None:
                self.peak_kib = max(self.peak_kib, rss)
                self.samples += 1
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def manager_pid() -> int | None:
    """PID of the WorkflowManager actor: the state API if it answers (it needs the
    dashboard), else the GCS actor table, else the process title."""
    try:
        from ray.util.state import list_actors

        alive = [
            a
            for a in list_actors(filters=[("class_name", "=", "WorkflowManager")])
            if a.state == "ALIVE"
        ]
        if len(alive) == 1 and alive[0].pid:
            return int(alive[0].pid)
    except Exception:
        pass
    try:
        from ray._private import state

        pids = [
            int(a["Pid"])
            for a in state.actors().values()
            if a.get("ActorClassName") == "WorkflowManager"
            and a.get("State") == "ALIVE"
            and a.get("Pid")
        ]
        if len(pids) == 1:
            return pids[0]
    except Exception:
        pass
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::WorkflowManager"):
                        found.append(int(entry))
            except OSError:
                pass
    return found[0] if len(found) == 1 else None


def mib(kib: int | None) -> str:
    return "?" if kib is None else f"{kib / 1024:.0f}"


# --------------------------------------------------------------------------- workloads
@dataclass
class Sample:
    seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass
class Workload:
    name: str
    label: str
    plain: Callable[[Deadline], Sample]
    flow: Callable[[str, Deadline], Sample]
    expected: Any = None
    reference: bool = False  # not a workflow: shown for comparison, not held to the target


def check(name: str, got: Any, expected: Any) -> None:
    if got != expected:
        raise AssertionError(f"{name}: wrong result {got!r:.80}, expected {expected!r:.80}")


def make_workloads(sizes: dict[str, int]) -> dict[str, Workload]:
    n_chain, n_fan, n_fib, n_many, n_big = (sizes[k] for k in SIZED)

    # (1) chain ------------------------------------------------------------
    def chain_plain(dl: Deadline) -> Sample:
        t0 = time.perf_counter()
        ref: Any = 0
        for _ in range(n_chain):
            ref = inc.remote(ref)
        value = get(ref, dl)
        t = time.perf_counter() - t0
        check("chain", value, n_chain)
        return Sample(t)

    def chain_flow(wid: str, dl: Deadline) -> Sample:
        t0 = time.perf_counter()
        dag: Any = 0
        for _ in range(n_chain):
            dag = inc.bind(dag)
        ref = workflow.run_async(dag, workflow_id=wid)
        t_submit = time.perf_counter() - t0
        value = get(ref, dl)
        t = time.perf_counter() - t0
        check("chain", value, n_chain)
        return Sample(t, [f"submit {t_submit:.2f}s"])

    # (2)/(5) fan-out --------------------------------------------------------
    def fan_plain(n: int) -> Callable[[Deadline], Sample]:
        def run(dl: Deadline) -> Sample:
            t0 = time.perf_counter()
            refs = [leaf.remote(i) for i in range(n)]
            value = get(gather.remote(*refs), dl)
            t = time.perf_counter() - t0
            check("fanout", value, n * (n - 1) // 2)
            return Sample(t)

        return run

    def fan_flow(n: int, memory: bool) -> Callable[[str, Deadline], Sample]:
        def run(wid: str, dl: Deadline) -> Sample:
            pid = manager_pid() if memory else None
            base = read_rss_kib(pid) if pid else None
            driver_base = read_rss_kib(os.getpid())
            sampler = RssSampler(pid) if pid else None
            driver = RssSampler(os.getpid())
            with driver:
                if sampler:
                    sampler.__enter__()
                try:
                    t0 = time.perf_counter()
                    nodes: list[Any] = [leaf.bind(i) for i in range(n)]
                    dag: Any = gather.bind(*nodes)
                    t_bind = time.perf_counter() - t0
                    ref = workflow.run_async(dag, workflow_id=wid)
                    t_submit = time.perf_counter() - t0
                    value = get(ref, dl)
                    t = time.perf_counter() - t0
                finally:
                    if sampler:
                        sampler.__exit__()
            check("fanout", value, n * (n - 1) // 2)
            notes = [f"bind {t_bind:.2f}s", f"submit {t_submit:.2f}s"]
            if memory:
                if sampler:
                    after = read_rss_kib(pid) if pid else None
                    notes.append(
                        f"manager RSS base {mib(base)} MiB, peak {mib(sampler.peak_kib)}"
                        f" MiB, after {mib(after)} MiB (pid {pid}, {sampler.samples}"
                        " samples)"
                    )
                else:
                    notes.append("manager pid not found: no RSS")
                notes.append(f"driver RSS base {mib(driver_base)} peak {mib(driver.peak_kib)} MiB")
            return Sample(t, notes)

        return run

    # (3) fib by continuations ----------------------------------------------
    def fib_plain(dl: Deadline) -> Sample:
        t0 = time.perf_counter()
        ref = fib_tree(n_fib)
        t_submit = time.perf_counter() - t0
        value = get(ref, dl)
        t = time.perf_counter() - t0
        check("fib", value, fib_value(n_fib))
        return Sample(
            t, [f"{fib_plain_task_count(n_fib)} tasks from the driver, submit {t_submit:.2f}s"]
        )

    def fib_flow(wid: str, dl: Deadline) -> Sample:
        t0 = time.perf_counter()
        ref = workflow.run_async(wf_fib.bind(n_fib), workflow_id=wid)
        value = get(ref, dl)
        t = time.perf_counter() - t0
        check("fib", value, fib_value(n_fib))
        return Sample(t, [f"{fib_wf_task_count(n_fib)} tasks"])

    # (4) many small workflows started at once ---------------------------------
    def many_plain(dl: Deadline) -> Sample:
        t0 = time.perf_counter()
        refs = [add.remote(inc.remote(i), 1) for i in range(n_many)]
        values = get(refs, dl)
        t = time.perf_counter() - t0
        check("many", values, [i + 2 for i in range(n_many)])
        return Sample(t)

    def many_flow(wid: str, dl: Deadline) -> Sample:
        t0 = time.perf_counter()
        refs = [
            workflow.run_async(add.bind(inc.bind(i), 1), workflow_id=f"{wid}-{i}")
            for i in range(n_many)
        ]
        t_submit = time.perf_counter() - t0
        values = get(refs, dl)
        t = time.perf_counter() - t0
        check("many", values, [i + 2 for i in range(n_many)])
        return Sample(t, [f"submit {t_submit:.2f}s ({t_submit / n_many * 1000:.1f} ms/run_async)"])

    def many_aio_flow(wid: str, dl: Deadline) -> Sample:
        # The same workflows from an asyncio program: the starts overlap, so their
        # durable writes share group commits (each await still returns only once its
        # workflow is stored).
        from ray_workflows import aio

        async def start_all() -> list[Any]:
            starts = [
                aio.run_async(add.bind(inc.bind(i), 1), workflow_id=f"{wid}-{i}")
                for i in range(n_many)
            ]
            return list(await asyncio.gather(*starts))

        t0 = time.perf_counter()
        refs = asyncio.run(start_all())
        t_submit = time.perf_counter() - t0
        values = get(refs, dl)
        t = time.perf_counter() - t0
        check("many", values, [i + 2 for i in range(n_many)])
        return Sample(t, [f"submit {t_submit:.2f}s ({t_submit / n_many * 1000:.1f} ms/run_async)"])

    bare: list[Any] = []

    def many_floor(wid: str, dl: Deadline) -> Sample:
        if not bare:
            bare.append(BareManager.options(max_concurrency=1000).remote())
            get(bare[0].run.remote(0, b""), dl)
        plan = b"x" * 2048  # about the size of a small workflow's plan
        t0 = time.perf_counter()
        refs = [bare[0].run.remote(i, plan) for i in range(n_many)]
        values = get(refs, dl)
        t = time.perf_counter() - t0
        check("many", values, [i + 2 for i in range(n_many)])
        return Sample(
            t,
            [
                "a bare async actor doing the same two tasks: the floor of "
                "any manager actor, not a workflow"
            ],
        )

    return {
        "chain": Workload("chain", f"chain {n_chain}", chain_plain, chain_flow),
        "fanout": Workload(
            "fanout", f"fan-out {n_fan}", fan_plain(n_fan), fan_flow(n_fan, memory=False)
        ),
        "fib": Workload("fib", f"fib({n_fib}) cont.", fib_plain, fib_flow),
        "many": Workload("many", f"{n_many} workflows x2", many_plain, many_flow),
        "many_aio": Workload("many_aio", f"{n_many} wf x2, aio", many_plain, many_aio_flow),
        "many_floor": Workload(
            "many_floor", f"{n_many} x2, bare actor", many_plain, many_floor, reference=True
        ),
        "bigfanout": Workload(
            "bigfanout", f"fan-out {n_big}", fan_plain(n_big), fan_flow(n_big, memory=True)
        ),
    }


# --------------------------------------------------------------------------- running
def guarded(fn: Callable[[], Sample], timeout: float) -> Sample | str:
    """Run ``fn`` in a thread; a Sample, or "TIMEOUT"/"ERROR ..." (the script always ends)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["sample"] = fn()
        except Timeout:
            box["error"] = "TIMEOUT"
        except BaseException as exc:  # noqa: BLE001 - reported in the table
            box["error"] = f"ERROR {type(exc).__name__}: {exc}"
            box["trace"] = traceback.format_exc()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout + 30)  # ray.get timeouts fire first; this catches a hung submit
    if thread.is_alive():
        return "TIMEOUT (hung outside ray.get)"
    if "trace" in box:
        print(box["trace"], file=sys.stderr)
    result: Sample | str = box.get("sample") or box["error"]
    return result


def restart_manager() -> None:
    """After a workflow timed out: restart the manager so the hung run stops using it."""
    from ray_workflows._core import config
    from ray_workflows._core.manager import NAMESPACE, manager_name

    try:
        handle = ray.get_actor(manager_name(config.current().storage), namespace=NAMESPACE)
        ray.kill(handle, no_restart=False)
        ray.get(handle.ready.remote(), timeout=120)
        print("  (manager restarted after a timeout)", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001
        print(f"  (could not restart the manager: {exc})", file=sys.stderr)


def warm_up(run_tag: str) -> float:
    t0 = time.perf_counter()
    assert workflow.run(add.bind(inc.bind(1), 1), workflow_id=f"bench-warmup-{run_tag}") == 3
    assert ray.get([inc.remote(i) for i in range(4)]) == [1, 2, 3, 4]
    assert ray.get(gather.remote(*[leaf.remote(i) for i in range(4)])) == 6
    assert ray.get(add.remote(inc.remote(1), 1)) == 3
    assert ray.get(fib_tree(3)) == 2
    assert workflow.run(wf_fib.bind(3), workflow_id=f"bench-warmup-fib-{run_tag}") == 2
    return time.perf_counter() - t0


def fs_type(path: str) -> str:
    try:
        out = subprocess.run(["df", "-T", path], capture_output=True, text=True, timeout=10)
        return out.stdout.splitlines()[1].split()[1]
    except Exception:  # noqa: BLE001
        return "?"


def durable_put_ms(path: str, n: int = 50) -> str:
    """Median ms of one durable 1 KiB put (write, fsync, rename, directory fsync) in
    ``path``: the 'many' row tracks this host's fsync cost, so it is printed with it."""
    probe = os.path.join(path, ".rwf-bench-fsync")
    os.makedirs(probe, exist_ok=True)
    times = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            tmp, final = os.path.join(probe, f"{i}.tmp"), os.path.join(probe, str(i))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"x" * 1024)
            os.fsync(fd)
            os.close(fd)
            os.rename(tmp, final)
            dfd = os.open(probe, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
            times.append(time.perf_counter() - t0)
    except OSError:
        return "?"
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return f"{statistics.median(times) * 1000:.2f}"


def cpu_probe_ms(n: int = 1_000_000, rounds: int = 5) -> str:
    """Median ms of a plain Python loop of ``n`` additions: this host's CPU speed at the
    moment (on the shared 2-core machines of this project it varied about 4x between
    minutes, and every row's times with it), printed at the start and the end."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        x = 0
        for i in range(n):
            x += i
        times.append(time.perf_counter() - t0)
    return f"{statistics.median(times) * 1000:.0f}"


def code_version() -> str:
    """The commit under test, and whether the library's source differs from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "src", "backends", "listeners"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (head or "?") + (" +uncommitted changes in src/" if dirty else "")
    except Exception:  # noqa: BLE001
        return "?"


def fmt_seconds(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--storage", help="workflow storage (default: a fresh temp dir, removed afterwards)"
    )
    parser.add_argument("--only", help=f"comma-separated workloads: {','.join(ORDER)}")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side; the median is shown")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds allowed per measurement (default 300)"
    )
    parser.add_argument("--keep-storage", action="store_true", help="keep the temp storage")
    parser.add_argument("--log-to-driver", action="store_true", help="show worker/manager logs")
    parser.add_argument(
        "--signed", action="store_true", help="sign every record (a fresh signing key)"
    )
    args = parser.parse_args()
    if args.signed:  # read once into the settings by workflow.init, like any knob
        os.environ["RAY_WORKFLOWS_SIGNING_KEY"] = secrets.token_hex(32)

    names = ORDER if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {ORDER}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    sizes = QUICK if args.quick else FULL
    temp_storage = args.storage is None
    storage = args.storage or tempfile.mkdtemp(prefix="rwf-bench-")
    try:
        return run_all(args, names, sizes, storage)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if temp_storage and not args.keep_storage:
            shutil.rmtree(storage, ignore_errors=True)


def start_ray(log_to_driver: bool) -> None:
    """A local 2-CPU Ray for a benchmark (shared by the bench_* scripts)."""
    for attempt in (1, 2):  # on an overloaded machine the node can time out starting up
        try:
            ray.init(
                address="local", num_cpus=2, include_dashboard=False, log_to_driver=log_to_driver
            )
            return
        except Exception as exc:  # noqa: BLE001
            if attempt == 2:
                raise
            print(f"ray.init failed ({exc}); retrying once", file=sys.stderr)
            ray.shutdown()


def run_all(args: argparse.Namespace, names: list[str], sizes: dict[str, int], storage: str) -> int:
    run_tag = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]

    # Workers import this module by name, so functions are shipped by reference.
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    start_ray(args.log_to_driver)
    t_init = time.perf_counter() - t0
    workflow.init(storage)
    t_warm = warm_up(run_tag)

    print()
    print(
        f"ray-workflows {workflow.__version__} ({code_version()}) core benchmark | Ray "
        f"{ray.__version__} | Python {platform.python_version()} | num_cpus=2 "
        f"(machine: {os.cpu_count()} cores)"
    )
    print(
        f"storage {storage} ({fs_type(storage)}, durable 1 KiB put {durable_put_ms(storage)} "
        f"ms) | sizes {'quick' if args.quick else 'full'} | repeat {args.repeat} (median) "
        f"| timeout {args.timeout:g}s/measurement | signed records {'on' if args.signed else 'off'}"
    )
    print(
        f"ray.init {t_init:.1f}s, warm-up {t_warm:.1f}s | ratio = workflow / plain Ray | "
        f"target <= {TARGET:.1f} (rows above it marked '!!')"
    )
    print("Ray 2.47 reference ratios: chain 13.6x, fan-out 20.8x, 100 workflows 24.6x")
    print(
        f"load average before ray.init {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} | "
        f"CPU probe {cpu_probe_ms()} ms (1M-addition Python loop)"
        + ("  WARNING: the machine is busy, numbers are not comparable" if load0[0] > 1.5 else "")
    )
    print()

    workloads = make_workloads(sizes)
    header = (
        f"{'workload':<20} {'plain s':>9} {'workflow s':>11} {'ratio':>7} {'':2} {'2.47':>6}  notes"
    )
    print(header)
    print("-" * len(header))
    worst: tuple[float, str] | None = None
    for name in names:
        w = workloads[name]
        plain_times: list[float] = []
        flow_times: list[float] = []
        plain_notes: list[str] = []
        flow_notes: list[str] = []
        failures: list[str] = []
        for rep in range(args.repeat):
            res = guarded(functools.partial(w.plain, Deadline(args.timeout)), args.timeout)
            if isinstance(res, str):
                failures.append(f"plain: {res}")
            else:
                plain_times.append(res.seconds)
                plain_notes = res.notes
            wid = f"bench-{name}-{run_tag}-{rep}"
            res = guarded(functools.partial(w.flow, wid, Deadline(args.timeout)), args.timeout)
            if isinstance(res, str):
                failures.append(f"workflow: {res}")
                if res.startswith("TIMEOUT"):
                    restart_manager()
            else:
                flow_times.append(res.seconds)
                flow_notes = res.notes
        notes = plain_notes + flow_notes  # from the last successful run of each side
        ratio_s, mark = "-", ""
        if plain_times and flow_times:
            ratio = statistics.median(flow_times) / statistics.median(plain_times)
            ratio_s, mark = f"{ratio:.1f}x", ("!!" if ratio > TARGET else "ok")
            if w.reference:
                mark = "--"
            elif worst is None or ratio > worst[0]:
                worst = (ratio, w.label)
        if args.repeat > 1:
            spread = []
            if plain_times:
                spread.append(f"plain {min(plain_times):.3f}-{max(plain_times):.3f}")
            if flow_times:
                spread.append(f"wf {min(flow_times):.3f}-{max(flow_times):.3f}")
            notes.insert(0, "range " + ", ".join(spread))
        ref = f"{RAY_247[name]:.1f}x" if name in RAY_247 else "-"
        print(
            f"{w.label:<20} {fmt_seconds(plain_times):>9} {fmt_seconds(flow_times):>11} "
            f"{ratio_s:>7} {mark:2} {ref:>6}  {'; '.join(failures + notes)}",
            flush=True,
        )
    print()
    load = os.getloadavg()
    print(
        f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} | "
        f"CPU probe {cpu_probe_ms()} ms"
    )
    if worst:
        print(
            f"worst ratio: {worst[1]} {worst[0]:.1f}x "
            f"({'meets' if worst[0] <= TARGET else 'misses'} the target <= {TARGET:.1f})"
        )
    return 0


if __name__ == "__main__":
    # Re-enter through the module name so that the task functions are `bench_core.*`
    # (importable by workers, pickled by reference), not `__main__.*`.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_core

    sys.exit(bench_core.main())
