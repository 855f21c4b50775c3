"""Events without the engine: the mailbox, the clocks, the timer listener, the context.

Everything is real: file storage in tmp_path, real asyncio, real processes.
"""

from __future__ import annotations

import asyncio
import math
import pickle
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray
from ray_workflows.backends.clocks import SystemClock, VirtualClock
from ray_workflows.listeners.timer import TimerListener

from ray_workflows import plugins
from ray_workflows import storage as storage_module
from ray_workflows._core import keys
from ray_workflows._core.events import (
    EventContext,
    EventListener,
    NoEventContextError,
    context_or_none,
    current_context,
    use_context,
)
from ray_workflows._core.mailbox import EventPayloadError, Mailbox
from ray_workflows.clock import Clock
from ray_workflows.exceptions import EventConflictError, WorkflowError
from ray_workflows.storage import Storage
from ray_workflows.testing import ListenerConformance

DAY = 24 * 3600.0


@pytest.fixture(scope="module", autouse=True)
def ray_session() -> None:
    """Overrides the conftest's: nothing here needs Ray, so these tests start none
    (when other modules run in the same session, their Ray is simply unused here)."""


@pytest.fixture
def disk(tmp_path: Path) -> Storage:
    """A real file storage of this test's own."""
    return storage_module.open_storage(str(tmp_path / "storage"))


async def claim_soon(mailbox: Mailbox, wid: str, key: str, task_id: str) -> tuple[str, Any]:
    return await asyncio.wait_for(mailbox.claim(wid, key, task_id), 10)


async def assert_waits(coro: Any, seconds: float = 0.3) -> None:
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait([task], timeout=seconds)
    task.cancel()
    assert not done, f"expected to keep waiting, got {task.result()!r}"


# -- the mailbox ---------------------------------------------------------------------


async def test_events_are_claimed_in_arrival_order(disk: Storage) -> None:
    mailbox = Mailbox(disk)
    ids = [await mailbox.send("w", "k", {"n": n}) for n in range(5)]
    assert await mailbox.pending("w", "k") == ids
    got = [await claim_soon(mailbox, "w", "k", f"t{n}") for n in range(5)]
    assert got == [(eid, {"n": n}) for n, eid in enumerate(ids)]


async def test_event_sent_before_anyone_waits_is_kept(disk: Storage) -> None:
    await Mailbox(disk).send("w", "approval", "yes", event_id="e1")
    # Another Mailbox, as after a manager restart, finds it.
    assert await claim_soon(Mailbox(disk), "w", "approval", "t") == ("e1", "yes")


async def test_keys_and_workflows_are_separate(disk: Storage) -> None:
    mailbox = Mailbox(disk)
    await mailbox.send("w1", "a", 1)
    await mailbox.send("w2", "a", 2)
    await mailbox.send("w1", "b", 3)
    assert (await claim_soon(mailbox, "w2", "a", "t"))[1] == 2
    assert (await claim_soon(mailbox, "w1", "b", "t"))[1] == 3
    assert (await claim_soon(mailbox, "w1", "a", "t"))[1] == 1


async def test_send_in_this_process_wakes_a_waiting_claimer_at_once(disk: Storage) -> None:
    mailbox = Mailbox(disk, poll_interval=60)  # only a wake-up can be this fast
    claim = asyncio.create_task(mailbox.claim("w", "k", "t"))
    await asyncio.sleep(0.05)
    assert not claim.done()
    started = time.monotonic()
    # A different Mailbox instance on the same storage wakes it too.
    event_id = await Mailbox(disk).send("w", "k", "hello")
    assert await asyncio.wait_for(claim, 5) == (event_id, "hello")
    assert time.monotonic() - started < 3.0


async def test_notify_wakes_a_claimer_for_an_event_stored_elsewhere(disk: Storage) -> None:
    assert isinstance(disk.uri, str)
    elsewhere = storage_module.open_storage("file://" + str(Path(disk.uri).resolve()))
    mailbox = Mailbox(disk, poll_interval=60)
    claim = asyncio.create_task(mailbox.claim("w", "k", "t"))
    await asyncio.sleep(0.05)
    await Mailbox(elsewhere).send("w", "k", "from afar")  # another URI: no wake-up here
    await asyncio.sleep(0.1)
    assert not claim.done()
    mailbox.notify("w", "k")
    assert (await asyncio.wait_for(claim, 5))[1] == "from afar"


async def test_slow_poll_finds_an_event_without_notification(disk: Storage) -> None:
    elsewhere = storage_module.open_storage("file://" + str(Path(disk.uri).resolve()))
    mailbox = Mailbox(disk, poll_interval=0.1)
    claim = asyncio.create_task(mailbox.claim("w", "k", "t"))
    await asyncio.sleep(0.05)
    await Mailbox(elsewhere).send("w", "k", "polled")
    assert (await asyncio.wait_for(claim, 5))[1] == "polled"


async def test_notify_from_another_thread(disk: Storage) -> None:
    elsewhere = storage_module.open_storage("file://" + str(Path(disk.uri).resolve()))
    mailbox = Mailbox(disk, poll_interval=60)
    claim = asyncio.create_task(mailbox.claim("w", "k", "t"))
    await asyncio.sleep(0.05)
    await Mailbox(elsewhere).send("w", "k", "threaded")
    thread = threading.Thread(target=mailbox.notify, args=("w", "k"))
    thread.start()
    thread.join()
    assert (await asyncio.wait_for(claim, 5))[1] == "threaded"


async def test_same_event_id_is_delivered_once(disk: Storage) -> None:
    mailbox = Mailbox(disk)
    assert await mailbox.send("w", "k", "first", event_id="order-1") == "order-1"
    assert await mailbox.send("w", "k", "first", event_id="order-1") == "order-1"  # a retry
    # The same id with another payload is no retry: refused, the first event stands.
    with pytest.raises(EventConflictError, match="order-1"):
        await mailbox.send("w", "k", "something else", event_id="order-1")
    assert await mailbox.pending("w", "k") == ["order-1"]
    assert await claim_soon(mailbox, "w", "k", "t1") == ("order-1", "first")
    await assert_waits(mailbox.claim("w", "k", "t2"))
    # A late retry after the event was consumed is not delivered again either.
    assert await mailbox.acknowledge("w", "k", "order-1")
    await mailbox.send("w", "k", "first", event_id="order-1")  # a late retry
    assert await mailbox.pending("w", "k") == []
    await assert_waits(mailbox.claim("w", "k", "t3"))


async def test_retry_restores_an_event_whose_first_send_died_halfway(disk: Storage) -> None:
    mailbox = Mailbox(disk)
    await mailbox.send("w", "k", "payload", event_id="e1")
    # The first send crashed after its dedupe record, before the event record.
    (event_key,) = await disk.list(keys.mailbox_events_prefix("w", "k"))
    await disk.delete(event_key)
    assert await mailbox.pending("w", "k") == []
    await mailbox.send("w", "k", "payload", event_id="e1")
    assert await disk.list(keys.mailbox_events_prefix("w", "k")) == [event_key]
    assert await claim_soon(mailbox, "w", "k", "t") == ("e1", "payload")


async def test_same_event_id_from_racing_senders_is_stored_once(disk: Storage) -> None:
    mailboxes = [Mailbox(disk) for _ in range(8)]
    await asyncio.gather(*(m.send("w", "k", "x", event_id="dup") for m in mailboxes))
    assert await mailboxes[0].pending("w", "k") == ["dup"]


async def test_claim_is_exactly_once_across_a_restart(disk: Storage) -> None:
    before = Mailbox(disk)
    await before.send("w", "k", "one", event_id="e1")
    await before.send("w", "k", "two", event_id="e2")
    assert await claim_soon(before, "w", "k", "t1") == ("e1", "one")
    # The manager dies before t1's output is checkpointed; a new one polls again.
    after = Mailbox(disk)
    assert await claim_soon(after, "w", "k", "t1") == ("e1", "one")
    assert await claim_soon(after, "w", "k", "t2") == ("e2", "two")
    assert await claim_soon(after, "w", "k", "t1") == ("e1", "one")


async def test_claim_survives_a_crash_between_claim_and_index(disk: Storage) -> None:
    mailbox = Mailbox(disk)
    await mailbox.send("w", "k", "one", event_id="e1")
    await mailbox.send("w", "k", "two", event_id="e2")
    assert await claim_soon(mailbox, "w", "k", "t1") == ("e1", "one")
    assert await disk.delete(keys.mailbox_task_key("w", "t1"))
    assert await claim_soon(Mailbox(disk), "w", "k", "t1") == ("e1", "one")
    assert await claim_soon(Mailbox(disk), "w", "k", "t2") == ("e2", "two")


async def test_racing_claimers_get_distinct_events(disk: Storage) -> None:
    sent = {await Mailbox(disk).send("w", "k", n) for n in range(6)}
    mailboxes = [Mailbox(disk) for _ in range(3)]
    claims = [mailboxes[n % 3].claim("w", "k", f"t{n}") for n in range(6)]
    got = await asyncio.wait_for(asyncio.gather(*claims), 10)
    assert {event_id for event_id, _ in got} == sent


async def test_waiting_claimers_each_get_one_of_later_events(disk: Storage) -> None:
    mailbox = Mailbox(disk, poll_interval=60)
    claims = [asyncio.create_task(mailbox.claim("w", "k", f"t{n}")) for n in range(3)]
    await asyncio.sleep(0.05)
    for n in range(3):
        await mailbox.send("w", "k", n)
    got = await asyncio.wait_for(asyncio.gather(*claims), 10)
    assert sorted(payload for _, payload in got) == [0, 1, 2]


async def test_acknowledge_removes_the_event(disk: Storage) -> None:
    mailbox = Mailbox(disk)
    await mailbox.send("w", "k", "a", event_id="e1")
    await mailbox.send("w", "k", "b", event_id="e2")
    await claim_soon(mailbox, "w", "k", "t1")
    await claim_soon(mailbox, "w", "k", "t2")
    assert await mailbox.acknowledge("w", "k", "e1")
    assert not await mailbox.acknowledge("w", "k", "e1")
    assert await mailbox.acknowledge_task("w", "t2")
    assert not await mailbox.acknowledge_task("w", "t2")
    assert await mailbox.pending("w", "k") == []
    # The acknowledged task is done: polling again would wait for a new event.
    await assert_waits(mailbox.claim("w", "k", "t1"))


async def test_delete_all_removes_the_mailbox(disk: Storage) -> None:
    mailbox = Mailbox(disk)
    await mailbox.send("w", "k", 1, event_id="e")
    await mailbox.send("other", "k", 2)
    await claim_soon(mailbox, "w", "k", "t")
    assert await mailbox.delete_all("w") >= 3
    assert await disk.list("workflows/w/") == []
    assert await mailbox.pending("other", "k") != []


# Run by each sender process: only what a sender needs is imported.
SENDER = """
import asyncio, sys
from ray_workflows._core.mailbox import Mailbox
from ray_workflows.storage import open_storage

async def main(uri, sender, count):
    mailbox = Mailbox(open_storage(uri))
    for n in range(count):
        for _ in range(2):  # every event twice with its id, as a client retrying would
            await mailbox.send("w", "k", (sender, n), event_id=f"s{sender}-{n}")

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


async def test_senders_in_several_processes_deliver_each_event_once(disk: Storage) -> None:
    senders, count = 3, 8
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", SENDER, disk.uri, str(s), str(count)
        )
        for s in range(senders)
    ]
    mailbox = Mailbox(disk, poll_interval=0.05)
    got = [
        await asyncio.wait_for(mailbox.claim("w", "k", f"t{n}"), 120)
        for n in range(senders * count)
    ]
    for p in processes:
        assert await asyncio.wait_for(p.wait(), 60) == 0
    payloads = [payload for _, payload in got]
    assert sorted(payloads) == [(s, n) for s in range(senders) for n in range(count)]
    for s in range(senders):  # one sender's events arrive in the order it sent them
        assert [n for sender, n in payloads if sender == s] == list(range(count))
    await assert_waits(mailbox.claim("w", "k", "one-more"))


@pytest.mark.parametrize(
    ("key", "error"),
    [("", ValueError), ("a/b", ValueError), ("..", ValueError), (3, TypeError)],
)
async def test_bad_keys_are_refused(disk: Storage, key: Any, error: type[Exception]) -> None:
    mailbox = Mailbox(disk)
    with pytest.raises(error, match="event key"):
        await mailbox.send("w", key, "x")
    with pytest.raises(error, match="event key"):
        await mailbox.claim("w", key, "t")


async def test_bad_event_ids_and_workflow_ids_are_refused(disk: Storage) -> None:
    with pytest.raises(ValueError, match="event_id"):
        await Mailbox(disk).send("w", "k", "x", event_id="a/b")
    with pytest.raises(ValueError, match="workflow_id"):
        await Mailbox(disk).send("../w", "k", "x")
    with pytest.raises(ValueError, match="poll_interval"):
        Mailbox(disk, poll_interval=0)


async def test_unpicklable_payload_is_a_clear_error(disk: Storage) -> None:
    with pytest.raises(EventPayloadError, match="'approval' for workflow 'order-7'") as info:
        await Mailbox(disk).send("order-7", "approval", threading.Lock())
    assert isinstance(info.value, WorkflowError) and info.value.__cause__ is not None
    copy = pickle.loads(pickle.dumps(info.value))  # errors cross process boundaries
    assert type(copy) is EventPayloadError and copy.key == "approval"
    assert await disk.list("workflows/") == []


async def test_payload_with_an_object_ref_is_refused(disk: Storage) -> None:
    with pytest.raises(EventPayloadError, match="ObjectRef"):
        await Mailbox(disk).send("w", "k", {"ref": ray.ObjectRef(b"\x01" * 28)})


# -- the listener contract and its context ----------------------------------------------


def make_context(disk: Storage, clock: Clock | None = None) -> EventContext:
    return EventContext("w", "t", disk, clock or VirtualClock(), Mailbox(disk))


async def test_current_context_outside_a_poll_is_a_clear_error() -> None:
    assert context_or_none() is None
    with pytest.raises(NoEventContextError, match="poll_for_event"):
        current_context()


async def test_a_task_created_in_use_context_keeps_it(disk: Storage) -> None:
    ctx = make_context(disk)

    class WhoAmI(EventListener):
        async def poll_for_event(self) -> str:
            await asyncio.sleep(0)
            return current_context().task_id

    with use_context(ctx):
        task = asyncio.create_task(WhoAmI().poll_for_event())
    assert context_or_none() is None
    assert await task == "t"


async def test_base_listener() -> None:
    assert not EventListener.waits_on_clock and TimerListener.waits_on_clock
    listener = EventListener()
    with pytest.raises(NotImplementedError, match="poll_for_event"):
        await listener.poll_for_event()
    assert await listener.event_checkpointed("anything") is None


# -- clocks ----------------------------------------------------------------------------


def test_clocks_are_plugins() -> None:
    assert plugins.load(plugins.CLOCK_GROUP, "system") is SystemClock
    assert plugins.load(plugins.CLOCK_GROUP, "virtual") is VirtualClock
    assert plugins.load(plugins.LISTENER_GROUP, "timer") is TimerListener
    with pytest.raises(LookupError, match="virtual"):
        plugins.load(plugins.CLOCK_GROUP, "sundial")


async def test_virtual_clock_skips_a_day_in_milliseconds() -> None:
    clock = VirtualClock()
    start, real_start = clock.time(), time.monotonic()
    assert abs(start - time.time()) < 1.0  # starts at the real wall time
    await asyncio.wait_for(clock.sleep_until(start + DAY), 5)
    assert time.monotonic() - real_start < 1.0
    assert clock.time() >= start + DAY
    await asyncio.wait_for(clock.sleep(DAY), 5)
    assert clock.time() >= start + 2 * DAY


async def test_virtual_clock_does_not_jump_during_an_activity() -> None:
    clock = VirtualClock()
    deadline = clock.time() + DAY
    with clock.activity():
        sleeper = asyncio.create_task(clock.sleep_until(deadline))
        await asyncio.sleep(0.3)
        assert not sleeper.done()
        assert clock.time() < deadline - DAY / 2
        with clock.activity():  # nested activities count
            pass
        await asyncio.sleep(0.1)
        assert not sleeper.done()
    await asyncio.wait_for(sleeper, 5)
    assert clock.time() >= deadline


async def test_virtual_clock_activity_from_another_thread() -> None:
    clock = VirtualClock()
    opened, release = threading.Event(), threading.Event()

    def worker() -> None:
        with clock.activity():
            opened.set()
            release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    opened.wait(10)
    sleeper = asyncio.create_task(clock.sleep(DAY))
    await asyncio.sleep(0.2)
    assert not sleeper.done()
    release.set()
    await asyncio.to_thread(thread.join)
    await asyncio.wait_for(sleeper, 5)


async def test_virtual_clock_wakes_sleepers_in_deadline_order() -> None:
    clock = VirtualClock()
    start = clock.time()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, deadline: float) -> None:
        await clock.sleep_until(deadline)
        woke.append((name, clock.time()))

    deadlines = {"late": start + 3 * DAY, "early": start + DAY, "middle": start + 2 * DAY}
    await asyncio.wait_for(asyncio.gather(*(sleeper(name, d) for name, d in deadlines.items())), 10)
    assert [name for name, _ in woke] == ["early", "middle", "late"]
    for name, woke_at in woke:
        assert deadlines[name] <= woke_at < deadlines[name] + 60


async def test_virtual_clock_still_follows_real_time_while_busy() -> None:
    clock = VirtualClock()
    real_start = time.monotonic()
    with clock.activity():
        await asyncio.wait_for(clock.sleep(0.2), 5)
    assert time.monotonic() - real_start >= 0.15


async def test_cancelled_virtual_sleep_does_not_hold_the_clock() -> None:
    clock = VirtualClock()
    start = clock.time()
    with clock.activity():
        doomed = asyncio.create_task(clock.sleep_until(start + DAY))
        await asyncio.sleep(0.05)
        doomed.cancel()
        later = asyncio.create_task(clock.sleep_until(start + 2 * DAY))
        await asyncio.sleep(0.05)
    await asyncio.wait_for(later, 5)
    assert doomed.cancelled()


async def test_system_clock_sleeps_for_real() -> None:
    clock = SystemClock()
    started = time.monotonic()
    await clock.sleep_until(clock.time() + 0.2)
    assert time.monotonic() - started >= 0.19
    started = time.monotonic()
    await clock.sleep_until(clock.time() - 100)  # past: at once
    with clock.activity():
        await clock.sleep(0)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("clock_type", [SystemClock, VirtualClock])
async def test_bad_deadlines_are_refused(clock_type: type[Clock]) -> None:
    clock = clock_type()
    with pytest.raises(TypeError, match="deadline"):
        await clock.sleep_until("tomorrow")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="deadline"):
        await clock.sleep_until(True)
    with pytest.raises(ValueError, match="finite"):
        await clock.sleep_until(math.nan)


# -- the timer listener -----------------------------------------------------------------


class TestTimerListenerConformance(ListenerConformance):
    listener = TimerListener

    def arguments(self, ctx: EventContext) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (ctx.clock.time() + DAY,), {}

    async def trigger(
        self, ctx: EventContext, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Nothing to do: the virtual clock jumps once the test's activity ends."""

    def check_event(self, ctx: EventContext, event: Any) -> None:
        assert event is None  # as in Ray 2.47: sleep() returns None
        assert ctx.clock.time() >= time.time() + DAY - 60


async def test_timer_listener_sleeps_on_the_context_clock(disk: Storage) -> None:
    ctx = make_context(disk)
    with use_context(ctx):
        deadline = ctx.clock.time() + 7 * DAY
        assert await asyncio.wait_for(TimerListener().poll_for_event(deadline), 5) is None
    assert ctx.clock.time() >= deadline


async def test_timer_listener_outside_a_workflow_uses_real_time() -> None:
    started = time.monotonic()
    await TimerListener().poll_for_event(time.time() + 0.1)
    assert time.monotonic() - started >= 0.09
    await asyncio.wait_for(TimerListener().poll_for_event(0), 1)  # long past


async def test_timer_listener_refuses_a_bad_deadline() -> None:
    with pytest.raises(TypeError, match="deadline"):
        await TimerListener().poll_for_event("soon")  # type: ignore[arg-type]
