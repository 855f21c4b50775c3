"""Events benchmark: send_event latency, and 200 waiting workflows on a 2-CPU cluster.

Run from the repository root::

    RAY_USAGE_STATS_ENABLED=0 python bench/bench_events.py [--samples 50] [--waiters 200]

It starts one local Ray (2 CPUs, no dashboard) and a workflow manager on a fresh
temporary file storage, warms them up, then measures:

(a) **latency**: a workflow ``stamp.bind(wait_for_event("http", event_key="go"))``
    is started and left to wait; the driver notes ``time.time()`` and sends the event
    (``workflow.send_event``, then ``workflow.aio.send_event`` in a second series);
    ``stamp``, a Ray task, returns ``time.time()`` at its very start. Latency =
    stamp - send time, over N sequential samples (median, p90, max); the issue's target
    is a median under 20 ms. Also shown: when ``send_event`` returned (the event is
    durable then), when the wait task's output was committed (its stored end time), and,
    as the floor, how long a plain ``stamp.remote()`` takes to start, and how long a
    workflow task's successor takes to start after it ended (no event involved).
(b) **waiting holds no CPU**: a workflow of 100 CPU-bound tasks (about 20 ms of CPU
    each) is timed alone, then again while 200 other workflows each wait on an
    ``http`` event; the manager actor's RSS is read before, during (peak) and after;
    finally all 200 are released at once (concurrent ``aio.send_event``) and timed
    until every one has finished.

See bench/README.md. Task functions are shipped by reference (workers import
``bench_events``), as from an installed package.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

import ray_workflows as workflow  # noqa: E402
from ray_workflows import aio  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_core import (  # noqa: E402
    RssSampler,
    code_version,
    fs_type,
    manager_pid,
    mib,
    read_rss_kib,
)

TARGET_MS = 20.0
STAMP_TASK = "bench_events.stamp"  # the task id of ``stamp`` (module.function)
CPU_SECONDS = 0.02  # CPU each busy task burns


# --------------------------------------------------------------------------- tasks
@ray.remote
def stamp(event: Any) -> float:
    """The dependent task: when did it start?"""
    return time.time()


@ray.remote
def echo(event: Any) -> Any:
    return event


@ray.remote
def burn(i: int) -> int:
    end = time.process_time() + CPU_SECONDS
    x = 0
    while time.process_time() < end:
        x += 1
    return i


@ray.remote
def total(*values: int) -> int:
    return sum(values)


# --------------------------------------------------------------------------- helpers
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def describe(ms: list[float]) -> str:
    return (
        f"median {statistics.median(ms):7.1f}  p90 {percentile(ms, 0.9):7.1f}  "
        f"min {min(ms):6.1f}  max {max(ms):7.1f}"
    )


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:g} s")
        time.sleep(0.05)


def settle_seconds(arm: float) -> None:
    """Let a just-started workflow reach its wait (the event would otherwise be sent
    before anyone waits: kept, but that measures the start of the wait, not the wake)."""
    time.sleep(arm)


# --------------------------------------------------------------------------- (a) latency
class Latency:
    """Milliseconds from the send, per sample: until ``send_event`` returned, until the
    event task's output was committed (its stored ``end_time``), and until the
    dependent task started."""

    def __init__(self) -> None:
        self.call: list[float] = []
        self.commit: list[float] = []
        self.start: list[float] = []

    def add(self, sent: float, returned: float, committed: float | None, started: float) -> None:
        self.call.append((returned - sent) * 1000)
        self.start.append((started - sent) * 1000)
        if committed is not None:
            self.commit.append((committed - sent) * 1000)


def committed_at(meta: dict[str, Any]) -> float | None:
    end = meta.get("stats", {}).get("end_time")
    return float(end) if end is not None else None


def latency_sync(tag: str, n: int, arm: float) -> Latency:
    result = Latency()
    for i in range(n):
        wid = f"lat-sync-{tag}-{i}"
        ref = workflow.run_async(
            stamp.bind(workflow.wait_for_event("http", event_key="go")), workflow_id=wid
        )
        settle_seconds(arm)
        sent = time.time()
        workflow.send_event(wid, "go", i)
        returned = time.time()
        started = ray.get(ref, timeout=120)
        (wait_task,) = workflow.get_metadata(wid, STAMP_TASK)["upstream"]
        result.add(sent, returned, committed_at(workflow.get_metadata(wid, wait_task)), started)
    return result


async def latency_async(tag: str, n: int, arm: float) -> Latency:
    result = Latency()
    for i in range(n):
        wid = f"lat-aio-{tag}-{i}"
        ref = await aio.run_async(
            stamp.bind(workflow.wait_for_event("http", event_key="go")), workflow_id=wid
        )
        await asyncio.sleep(arm)
        sent = time.time()
        await aio.send_event(wid, "go", i)
        returned = time.time()
        started = await asyncio.wait_for(ref, 120)
        (wait_task,) = (await aio.get_metadata(wid, STAMP_TASK))["upstream"]
        meta = await aio.get_metadata(wid, wait_task)
        result.add(sent, returned, committed_at(meta), started)
    return result


def plain_task_start(n: int) -> list[float]:
    """The floor: milliseconds from ``stamp.remote()`` to the task starting (no workflow)."""
    ms = []
    for _ in range(n):
        sent = time.time()
        ms.append((ray.get(stamp.remote(None), timeout=120) - sent) * 1000)
    return ms


def workflow_handoff(tag: str, n: int) -> list[float]:
    """For comparison, no event: milliseconds from a workflow task's end (its stored
    ``end_time``) to the start of the task that depends on it."""
    ms = []
    for i in range(n):
        wid = f"handoff-{tag}-{i}"
        started = workflow.run(stamp.bind(stamp.bind(None)), workflow_id=wid)
        (first,) = workflow.get_metadata(wid, STAMP_TASK + "_1")["upstream"]
        ended = committed_at(workflow.get_metadata(wid, first))
        if ended is not None:
            ms.append((started - ended) * 1000)
    return ms


# --------------------------------------------------------------------------- (b) waiters
def busy_workflow(wid: str, n: int) -> float:
    t0 = time.perf_counter()
    assert workflow.run(total.bind(*[burn.bind(i) for i in range(n)]), workflow_id=wid) == (
        n * (n - 1) // 2
    )
    return time.perf_counter() - t0


def busy_plain(n: int) -> float:
    t0 = time.perf_counter()
    assert ray.get(total.remote(*[burn.remote(i) for i in range(n)]), timeout=600) == (
        n * (n - 1) // 2
    )
    return time.perf_counter() - t0


async def release(wids: list[str]) -> float:
    t0 = time.perf_counter()
    await asyncio.gather(*(aio.send_event(wid, "go", i) for i, wid in enumerate(wids)))
    return time.perf_counter() - t0


def waiters_scenario(tag: str, n_waiters: int, n_tasks: int, repeat: int) -> list[str]:
    rows: list[str] = []
    pid = manager_pid()

    def rss() -> str:
        return mib(read_rss_kib(pid)) if pid else "?"

    plain = [busy_plain(n_tasks) for _ in range(repeat)]
    alone = [busy_workflow(f"busy-alone-{tag}-{r}", n_tasks) for r in range(repeat)]
    rss_before = rss()

    sampler = RssSampler(pid) if pid else None
    if sampler:
        sampler.__enter__()
    try:
        wids = [f"waiter-{tag}-{i}" for i in range(n_waiters)]
        t0 = time.perf_counter()
        refs = [
            workflow.run_async(
                echo.bind(workflow.wait_for_event("http", event_key="go")), workflow_id=wid
            )
            for wid in wids
        ]
        t_start = time.perf_counter() - t0
        mine = set(wids)
        wait_until(
            lambda: len(mine & {w for w, _ in workflow.list_all(workflow.RUNNING)}) == n_waiters,
            120,
            "all waiters RUNNING",
        )
        time.sleep(1.0)  # every wait armed
        rss_waiting = rss()
        load_waiting = load()
        during = [busy_workflow(f"busy-during-{tag}-{r}", n_tasks) for r in range(repeat)]
        still = {w for w, _ in workflow.list_all(workflow.RUNNING)} & mine
        assert len(still) == n_waiters, f"only {len(still)} waiters still running"
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        assert not ready, "a waiter finished before its event was sent"
        rss_during_peak = mib(sampler.peak_kib) if sampler else "?"

        t0 = time.perf_counter()
        t_sent = asyncio.run(release(wids))
        values = ray.get(refs, timeout=600)
        t_all = time.perf_counter() - t0
        assert values == list(range(n_waiters)), "a waiter got the wrong event"
    finally:
        if sampler:
            sampler.__exit__()
    time.sleep(1.0)
    rss_after = rss()

    med = statistics.median
    rows.append(f"{n_tasks} CPU tasks, plain Ray            {med(plain):8.2f} s")
    rows.append(f"{n_tasks} CPU tasks, workflow, no waiters {med(alone):8.2f} s")
    rows.append(
        f"{n_tasks} CPU tasks, workflow, {n_waiters} waiting {med(during):7.2f} s   "
        f"(x{med(during) / med(alone):.2f} of no waiters; load avg {load_waiting})"
    )
    rows.append(
        f"start {n_waiters} waiting workflows        {t_start:8.2f} s   "
        f"({t_start / n_waiters * 1000:.1f} ms per run_async)"
    )
    rows.append(
        f"release {n_waiters}: events stored         {t_sent:8.2f} s   (concurrent aio.send_event)"
    )
    rows.append(f"release {n_waiters}: all finished          {t_all:8.2f} s")
    rows.append(
        f"manager RSS MiB (pid {pid}): before {rss_before}, {n_waiters} waiting {rss_waiting} "
        f"(peak {rss_during_peak}), after release {rss_after}"
    )
    if repeat > 1:
        rows.append(
            "ranges: plain "
            + ", ".join(f"{t:.2f}" for t in plain)
            + " | alone "
            + ", ".join(f"{t:.2f}" for t in alone)
            + " | waiting "
            + ", ".join(f"{t:.2f}" for t in during)
        )
    return rows


# --------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=50, help="latency samples per API")
    parser.add_argument("--waiters", type=int, default=200, help="waiting workflows")
    parser.add_argument("--tasks", type=int, default=100, help="CPU tasks of the busy workflow")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the busy workflow (median)")
    parser.add_argument(
        "--arm", type=float, default=0.2, help="seconds left for a workflow to reach its wait"
    )
    parser.add_argument("--only", help="latency or waiters (default: both)")
    parser.add_argument("--storage", help="workflow storage (default: a fresh temp dir)")
    args = parser.parse_args()

    temp = args.storage is None
    storage = args.storage or tempfile.mkdtemp(prefix="rwf-bench-events-")
    os.environ["PYTHONPATH"] = os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    load0 = load()
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        workflow.init(storage)
        tag = time.strftime("%H%M%S") + "-" + uuid.uuid4().hex[:4]
        # Warm-up: the manager, a few workers, one event round trip each way.
        latency_sync(f"warm-{tag}", 3, args.arm)
        asyncio.run(latency_async(f"warm-{tag}", 3, args.arm))
        busy_plain(8)

        print()
        print(
            f"ray-workflows {workflow.__version__} ({code_version()}) events benchmark | Ray "
            f"{ray.__version__} | Python {platform.python_version()} | num_cpus=2 "
            f"(machine: {os.cpu_count()} cores)"
        )
        print(f"storage {storage} ({fs_type(storage)}) | load average before ray.init {load0}")
        print()
        if args.only in (None, "latency"):
            print(f"(a) send_event -> dependent task start, ms, {args.samples} sequential samples")
            series = [
                ("workflow.send_event", latency_sync(tag, args.samples, args.arm)),
                ("aio.send_event", asyncio.run(latency_async(tag, args.samples, args.arm))),
            ]
            for name, lat in series:
                verdict = "ok" if statistics.median(lat.start) < TARGET_MS else "!! over target"
                print(f"  {name:<20} task started    {describe(lat.start)}  {verdict}")
                print(f"  {'':<20} send returned   {describe(lat.call)}")
                if lat.commit:
                    print(f"  {'':<20} event committed {describe(lat.commit)}")
            floor = plain_task_start(args.samples)
            handoff = workflow_handoff(tag, args.samples)
            print(f"  {'plain Ray .remote()':<20} task started    {describe(floor)}  (the floor)")
            if handoff:
                print(f"  {'workflow, no event':<20} task end->next  {describe(handoff)}")
            print(f"  target: median < {TARGET_MS:g} ms | load average {load()}")
            print()
        if args.only in (None, "waiters"):
            print(
                f"(b) {args.waiters} workflows waiting on an http event, {args.tasks} CPU tasks "
                f"(~{CPU_SECONDS * 1000:g} ms CPU each) on 2 CPUs, median of {args.repeat}"
            )
            for row in waiters_scenario(tag, args.waiters, args.tasks, args.repeat):
                print("  " + row)
            print()
        print(f"load average at end {load()}")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if temp:
            shutil.rmtree(storage, ignore_errors=True)
    return 0


if __name__ == "__main__":
    # Re-enter through the module name so the task functions are `bench_events.*`.
    import bench_events

    sys.exit(bench_events.main())
