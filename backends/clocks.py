"""The built-in clock plugins (``ray_workflows.clocks`` entry points).

Both implement the contract in :mod:`ray_workflows.clock`. ``system`` is the
real clock. ``virtual`` is for tests: its time starts at the real wall time and
jumps to the earliest pending deadline whenever nothing but timers is waiting,
so a test of a day-long ``workflow.sleep`` takes milliseconds (trio's autojump
clock, Temporal's time-skipping test server).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ray_workflows.clock import Clock, check_deadline

# A real sleep is re-checked at least this often, so that a wall-clock step
# (NTP, a suspended VM) delays a deadline by at most this much.
_MAX_REAL_SLEEP = 60.0


class SystemClock(Clock):
    def time(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        deadline = check_deadline(deadline)
        # asyncio sleeps on the monotonic clock; re-reading the wall clock keeps
        # an absolute deadline right when the wall clock is stepped meanwhile.
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, _MAX_REAL_SLEEP))


@dataclass(order=True)
class _Sleeper:
    deadline: float
    seq: int
    future: asyncio.Future[None] = field(compare=False)


class VirtualClock(Clock):
    """Real time plus an offset that grows by jumps.

    ``time()`` is ``time.time() + offset``: between jumps virtual time flows like
    real time, so a task that takes a second of real time also takes one here.
    When no activity is open and at least one sleeper waits, the clock lets the
    loop settle (``settle_iterations`` loop turns, then ``settle_seconds`` of real
    time, restarting if any activity came or went meanwhile) and then jumps to the
    earliest deadline. Sleepers wake in deadline order, one jump per distinct
    deadline, each followed by a new settling period, so the work a timer
    triggers can open an activity before the next jump.

    What the settling cannot see: a sleep about to be registered by work that is
    not marked as an activity (say a storage write that takes longer than
    ``settle_seconds``) may find its deadline already overtaken, and then wakes
    at once rather than in order.
    """

    def __init__(self, *, settle_iterations: int = 5, settle_seconds: float = 0.005) -> None:
        self._offset = 0.0
        self._busy = 0
        self._generation = 0  # changes with every activity enter/exit
        self._sleepers: list[_Sleeper] = []
        self._seq = itertools.count()
        self._jumper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()  # activities may open in other threads
        self._settle_iterations = settle_iterations
        self._settle_seconds = settle_seconds

    def time(self) -> float:
        return time.time() + self._offset

    @property
    def offset(self) -> float:
        """How far virtual time is ahead of real time, in seconds."""
        return self._offset

    async def sleep_until(self, deadline: float) -> None:
        deadline = check_deadline(deadline)
        if deadline <= self.time():
            await asyncio.sleep(0)
            return
        loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._sleepers, _Sleeper(deadline, next(self._seq), future))

        # Real time may reach the deadline first (with an activity open all along).
        timer: list[asyncio.TimerHandle] = []

        def on_timer() -> None:
            self._wake_due()
            if not future.done():
                timer[0] = loop.call_later(self._real_wait(deadline), on_timer)

        timer.append(loop.call_later(self._real_wait(deadline), on_timer))
        self._kick()
        try:
            await future
        finally:
            timer[0].cancel()
            if not future.done():
                future.cancel()  # dropped lazily by _earliest()

    @contextlib.contextmanager
    def activity(self) -> Iterator[None]:
        with self._lock:
            self._busy += 1
            self._generation += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                self._generation += 1
                idle = self._busy == 0
            if idle:
                self._kick()

    def _earliest(self) -> _Sleeper | None:
        while self._sleepers and self._sleepers[0].future.done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0] if self._sleepers else None

    def _real_wait(self, deadline: float) -> float:
        return max(0.0, min(deadline - self.time(), _MAX_REAL_SLEEP))

    def _wake_due(self) -> None:
        now = self.time()
        while (first := self._earliest()) is not None and first.deadline <= now:
            heapq.heappop(self._sleepers).future.set_result(None)
        self._kick()

    def _kick(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # no sleeper ever waited: nothing to jump to
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not loop:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._kick)
            return
        if self._busy or self._earliest() is None:
            return
        if self._jumper is None or self._jumper.done():
            self._jumper = loop.create_task(self._autojump())

    async def _autojump(self) -> None:
        while not self._busy and self._earliest() is not None:
            generation = self._generation
            for _ in range(self._settle_iterations):
                await asyncio.sleep(0)
            await asyncio.sleep(self._settle_seconds)
            first = self._earliest()
            if self._busy or first is None or generation != self._generation:
                continue
            self._offset += max(0.0, first.deadline - self.time())
            self._wake_due()


__all__ = ["SystemClock", "VirtualClock"]
