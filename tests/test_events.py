"""Events end to end: sleeps, custom listeners, mailboxes and their exactly-once rules,
run by the real manager on a real local Ray (timers on the virtual clock)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from conftest import kill_manager
from helpers import count_runs, record_run, wait_for

import ray_workflows as workflow
from ray_workflows import aio
from ray_workflows._core import bridge
from ray_workflows._core.mailbox import Mailbox
from ray_workflows.storage import open_storage


@pytest.fixture
def virtual(tmp_path: Path) -> Iterator[str]:
    """A storage of its own whose manager runs on the virtual clock."""
    uri = str(tmp_path / "storage")
    workflow.init(uri, clock="virtual")
    yield uri
    kill_manager(uri)


class MyEventListener(workflow.EventListener):
    async def poll_for_event(self) -> str:
        return "event"


@ray.remote
def gather(*args: object) -> tuple[object, ...]:
    return args


def test_seed_sleep_and_custom_listener(virtual: str) -> None:
    # The "Using events" sample of the docs, literally (on the virtual clock).
    sleep_task = workflow.sleep(100)
    event_task = workflow.wait_for_event(MyEventListener)
    started = time.monotonic()
    result = workflow.run(gather.bind(sleep_task, event_task, "hello world"))
    assert result == (None, "event", "hello world")
    assert time.monotonic() - started < 30  # 100 s of virtual time, not of real time


def test_seed_timer_listeners_by_absolute_time(virtual: str) -> None:
    # seed 002, Example 16: two timers on absolute deadlines, gathered.
    event1 = workflow.wait_for_event(workflow.event_listener.TimerListener, time.time() + 60)
    event2 = workflow.wait_for_event(workflow.event_listener.TimerListener, time.time() + 30)
    assert workflow.run(gather.bind(event1, event2)) == (None, None)


def test_a_day_long_sleep_takes_no_real_time(virtual: str) -> None:
    started = time.monotonic()
    assert workflow.run(gather.bind(workflow.sleep(24 * 3600), 1)) == (None, 1)
    assert time.monotonic() - started < 30


def test_events_sent_before_and_after_the_wait_arrive_once(storage: str, wid: str) -> None:
    ref = workflow.run_async(
        gather.bind(
            workflow.wait_for_event("http", event_key="first"),
            workflow.wait_for_event("http", event_key="second"),
        ),
        workflow_id=wid,
    )
    first = workflow.send_event(wid, "first", {"n": 1}, event_id="e-1")
    assert workflow.send_event(wid, "first", {"n": 1}, event_id="e-1") == first  # deduplicated
    workflow.send_event(wid, "second", "payload")
    assert ray.get(ref, timeout=60) == ({"n": 1}, "payload")


def test_an_event_that_arrives_before_the_workflow_waits_is_kept(storage: str, wid: str) -> None:
    gate = workflow.run_async(
        gather.bind(workflow.sleep(0), workflow.wait_for_event("http", event_key="k")),
        workflow_id=wid,
    )
    workflow.send_event(wid, "k", 42)
    assert ray.get(gate, timeout=60) == (None, 42)


def test_sending_to_an_unknown_workflow_is_a_clear_error(storage: str) -> None:
    with pytest.raises(workflow.WorkflowNotFoundError, match="no-such-workflow"):
        workflow.send_event("no-such-workflow", "k", 1)
    with pytest.raises(ValueError, match="event key"):
        workflow.send_event("no-such-workflow", "a/b", 1)


@ray.remote
def fail_once(flag: str, event: object) -> object:
    if not Path(flag).exists():
        Path(flag).touch()
        raise RuntimeError("first attempt fails")
    return event


def test_a_finished_workflow_refuses_events_and_a_failed_one_keeps_them(
    storage: str, wid: str, tmp_path: Path
) -> None:
    assert workflow.run(gather.bind(1), workflow_id=wid) == (1,)
    with pytest.raises(workflow.exceptions.WorkflowFinishedError, match="SUCCESSFUL"):
        workflow.send_event(wid, "late", 1)
    assert workflow.get_status(wid) == workflow.SUCCESSFUL
    # A FAILED workflow may be resumed and wait again: its events are kept.
    failed = wid + "-failed"
    flag = str(tmp_path / "failed-once")
    dag = fail_once.options(**workflow.options(max_retries=0)).bind(
        flag, workflow.wait_for_event("http", event_key="first")
    )
    ref = workflow.run_async(dag, workflow_id=failed)
    workflow.send_event(failed, "first", "one")
    with pytest.raises(workflow.WorkflowExecutionError):
        ray.get(ref, timeout=60)
    assert workflow.get_status(failed) == workflow.FAILED
    workflow.send_event(failed, "later", "kept")  # not refused
    assert workflow.resume(failed) == "one"  # the committed event, not polled again


async def test_send_event_has_an_awaitable_twin(storage: str, wid: str) -> None:
    ref = await aio.run_async(workflow.wait_for_event("http", event_key="k"), workflow_id=wid)
    await aio.send_event(wid, "k", "async")
    assert await ref == "async"


def test_bad_listeners_and_sleeps_are_refused() -> None:
    with pytest.raises(TypeError, match="EventListener subclass"):
        workflow.wait_for_event(int)
    with pytest.raises(ValueError, match="Unknown event listener 'nope'"):
        workflow.wait_for_event("nope")
    with pytest.raises(ValueError, match="non-negative"):
        workflow.sleep(-1)
    with pytest.raises(TypeError, match="number of seconds"):
        workflow.sleep("10")  # type: ignore[arg-type]


# -- exactly once across crashes of the manager ------------------------------------
class CountingListener(workflow.EventListener):
    async def poll_for_event(self, runs: str, gate: str) -> str:
        import asyncio

        record_run(runs, "poll")
        while not Path(gate, "poll").exists():
            await asyncio.sleep(0.02)
        return f"event for {gate}"

    async def event_checkpointed(self, event: str) -> None:
        import asyncio

        gate = event.removeprefix("event for ")
        record_run(Path(gate).parent / "runs", "ack")
        while not Path(gate, "ack").exists():
            await asyncio.sleep(0.02)


@ray.remote
def consume(event: str, runs: str) -> str:
    record_run(runs, "consume")
    return event.upper()


def _gates(tmp_path: Path) -> tuple[Path, Path]:
    gate, runs = tmp_path / "gate", tmp_path / "runs"
    gate.mkdir()
    runs.mkdir(exist_ok=True)
    return gate, runs


def test_a_crash_before_the_checkpoint_polls_the_event_again(
    fresh_storage: str, wid: str, tmp_path: Path
) -> None:
    gate, runs = _gates(tmp_path)
    dag = consume.bind(workflow.wait_for_event(CountingListener, str(runs), str(gate)), str(runs))
    ref = workflow.run_async(dag, workflow_id=wid)
    wait_for(lambda: count_runs(runs, "poll") == 1)
    kill_manager(fresh_storage, no_restart=False)  # Ray restarts it; it resumes the workflow
    wait_for(lambda: count_runs(runs, "poll") == 2)  # not committed: polled again
    (gate / "poll").touch()
    (gate / "ack").touch()
    assert ray.get(ref, timeout=60) == f"EVENT FOR {gate}".upper()
    assert count_runs(runs, "consume") == 1


def test_a_crash_after_the_checkpoint_never_polls_again_but_acknowledges_again(
    fresh_storage: str, wid: str, tmp_path: Path
) -> None:
    gate, runs = _gates(tmp_path)
    dag = consume.bind(workflow.wait_for_event(CountingListener, str(runs), str(gate)), str(runs))
    workflow.run_async(dag, workflow_id=wid)
    (gate / "poll").touch()
    wait_for(lambda: count_runs(runs, "ack") == 1)  # committed, acknowledgement under way
    kill_manager(fresh_storage, no_restart=False)
    wait_for(lambda: count_runs(runs, "ack") == 2)  # event_checkpointed: at least once
    (gate / "ack").touch()
    assert workflow.get_output(wid) == f"EVENT FOR {gate}".upper()
    assert count_runs(runs, "poll") == 1  # never polled again
    assert count_runs(runs, "consume") == 1


# -- waiting holds no Ray worker ------------------------------------------------------
@ray.remote
def cpu_task(i: int) -> int:
    return i * 2


def test_200_waiting_workflows_hold_no_cpu(storage: str) -> None:
    prefix = f"waiter-{time.time_ns()}"
    waiting = [
        workflow.run_async(
            workflow.wait_for_event("http", event_key="go"), workflow_id=f"{prefix}-{i}"
        )
        for i in range(200)
    ]
    busy = gather.bind(*[cpu_task.bind(i) for i in range(100)])
    # The session cluster has 4 CPUs: if each waiter held one, this could never finish.
    assert workflow.run(busy, workflow_id=f"{prefix}-busy") == tuple(i * 2 for i in range(100))
    statuses = dict(workflow.list_all(workflow.RUNNING))
    assert all(statuses.get(f"{prefix}-{i}") == workflow.RUNNING for i in range(200))
    for i in range(200):
        workflow.send_event(f"{prefix}-{i}", "go", i)
    assert ray.get(waiting, timeout=120) == list(range(200))


# -- workflow.wait ----------------------------------------------------------------------
@ray.remote
def do_task(i: int, runs: str) -> str:
    import random

    record_run(runs, f"task{i}")
    time.sleep(random.random() / 10)
    return f"task {i}"


@ray.remote
def report_results(wait_result: tuple[list[str], list[object]], seen: list[str]) -> object:
    # Seed 003 ("report results as they complete, by continuation"), collecting instead
    # of printing so the test can check them.
    ready, remaining = wait_result
    seen = seen + list(ready)
    if not remaining:
        return seen
    return workflow.continuation(report_results.bind(workflow.wait(remaining), seen))


def test_seed_wait_reports_results_as_they_complete(
    storage: str, wid: str, counter_dir: Path
) -> None:
    tasks = [do_task.bind(i, str(counter_dir)) for i in range(20)]
    seen = workflow.run(report_results.bind(workflow.wait(tasks), []), workflow_id=wid)
    assert sorted(seen, key=lambda s: int(s.split()[1])) == [f"task {i}" for i in range(20)]
    assert len(seen) == 20
    # Each task ran once: the handles in `remaining` name the running tasks, they do
    # not start new ones.
    assert [count_runs(counter_dir, f"task{i}") for i in range(20)] == [1] * 20


@ray.remote
def slow(x: int, gate: str) -> int:
    while not Path(gate).exists():
        time.sleep(0.02)
    return x


@ray.remote
def split_sizes(result: tuple[list[int], list[object]]) -> tuple[list[int], int]:
    ready, remaining = result
    return ready, len(remaining)


def test_wait_num_returns_and_timeout(storage: str, wid: str, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    nodes = [cpu_task.bind(1), slow.bind(2, gate), cpu_task.bind(3)]
    dag = split_sizes.bind(workflow.wait(nodes, num_returns=2))
    assert workflow.run(dag, workflow_id=wid) == ([2, 6], 1)
    timed = split_sizes.bind(workflow.wait([slow.bind(5, gate)], timeout=0.5))
    assert workflow.run(timed, workflow_id=wid + "-t") == ([], 1)
    Path(gate).touch()


def test_wait_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one task"):
        workflow.wait([])
    with pytest.raises(ValueError, match="num_returns"):
        workflow.wait([cpu_task.bind(1)], num_returns=2)
    with pytest.raises(ValueError, match="timeout"):
        workflow.wait([cpu_task.bind(1)], timeout=-1)


class FlakyAck(workflow.EventListener):
    async def poll_for_event(self, runs: str) -> str:
        record_run(runs, "poll")
        return f"event-{count_runs(runs, 'poll') - 1}|{runs}/ack-failed-once"

    async def event_checkpointed(self, event: str) -> None:
        marker = Path(event.split("|")[1])
        if not marker.exists():
            marker.touch()
            raise ConnectionError("the acknowledgement failed")


def test_a_failing_acknowledgement_never_polls_again(
    storage: str, wid: str, counter_dir: Path
) -> None:
    runs = str(counter_dir)
    result = workflow.run(
        consume.bind(workflow.wait_for_event(FlakyAck, runs), runs), workflow_id=wid
    )
    assert result.startswith("EVENT-0|")  # the committed event, not a second one
    assert count_runs(counter_dir, "poll") == 1
    assert Path(runs, "ack-failed-once").exists()


def test_a_full_mailbox_refuses_new_events_but_not_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wid: str
) -> None:
    # The limit is set in the driver only; the manager enforces it.
    monkeypatch.setenv("RAY_WORKFLOWS_MAILBOX_LIMIT", "2")
    uri = str(tmp_path / "storage")
    workflow.init(uri)
    try:
        workflow.run_async(
            gather.bind(workflow.wait_for_event("http", event_key="go")), workflow_id=wid
        )
        workflow.send_event(wid, "unread", 1, event_id="a")
        workflow.send_event(wid, "unread", 2, event_id="b")
        with pytest.raises(workflow.exceptions.MailboxFullError, match=wid) as info:
            workflow.send_event(wid, "go", "now")
        assert info.value.limit == 2
        assert workflow.send_event(wid, "unread", 1, event_id="a") == "a"  # a retry
        with pytest.raises(workflow.exceptions.EventConflictError):
            workflow.send_event(wid, "unread", 3, event_id="b")
        assert workflow.get_status(wid) == workflow.WorkflowStatus.RUNNING
    finally:
        workflow.cancel(wid)
        kill_manager(uri)


def test_an_event_output_never_lands_without_its_acknowledgement_marker(
    faulty: tuple[str, Path], wid: str
) -> None:
    # A storage that may land a batch's keys in any order (S3), here the output before
    # the 'unacked' marker, and the marker's write fails: an output without its marker
    # would count the event task done and never acknowledge the event.
    uri, control = faulty
    control.write_text(json.dumps({"fail": r"\.unacked$", "unordered": True}))
    ref = workflow.run_async(
        gather.bind(workflow.wait_for_event("http", event_key="k")), workflow_id=wid
    )
    workflow.send_event(wid, "k", "paid", event_id="e1")
    with pytest.raises(Exception, match="injected write failure"):
        ray.get(ref, timeout=120)
    control.unlink()
    assert ray.get(workflow.resume_async(wid), timeout=120) == ("paid",)
    # The event was delivered and acknowledged: nothing is left in the mailbox.
    left = bridge.run(Mailbox(open_storage(uri)).pending(wid, "k"))
    assert left == []
